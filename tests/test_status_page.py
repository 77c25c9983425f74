"""`streams serve` in a real headless browser (Debian's Chromium, driven by selenium): what
the page shows for a closed, a failed and an open batch, that it escapes what users named
(a file name and a segment holding markup), that it refreshes itself only while a batch is
open; and its JSON API. A screenshot of each page is kept in the test's tmp dir."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ops_support import http_status, wait_for
from tests.ports import free_port
from tests.support import random_rows, run_cli, write_csv

EVIL_SEGMENT = '<img src=x onerror="alert(1)">'
EVIL_FILE = "<b>bold&x.csv"


def _install_chromium() -> None:
    """Debian's chromium and chromium-driver, installed when missing (as root, CI too)."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600,
                   capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"],
                   check=True, env=env, timeout=900, capture_output=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _install_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1700,800", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A data dir with a closed, a failed and an open batch, and `streams serve` on it."""
    root = tmp_path_factory.mktemp("page")
    data = root / "data"
    closed_file = write_csv(root / EVIL_FILE, [(u, EVIL_SEGMENT, op) for u, _s, op in
                                               random_rows(400, 100, 1, 1)])
    run_cli("run", str(closed_file), "-q", data_dir=data)
    failed_file = write_csv(root / "rejected.csv", random_rows(50, 100, 2, 2))
    with open(failed_file, "a", encoding="utf-8") as f:
        f.writelines(f",seg-0,add{i}\n" for i in range(7))  # blank ids, unknown ops
    assert run_cli("run", str(failed_file), "-q", data_dir=data, check=False).returncode == 1
    open_file = write_csv(root / "open.csv", random_rows(300, 100, 2, 3))
    run_cli("import", str(open_file), "-q", data_dir=data)  # no worker: stays published
    batches = {s["status"]: s["batch_id"] for s in
               json.loads(run_cli("status", "--json", data_dir=data).stdout)}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streams", "serve", "--port", str(port)],
                            env={**os.environ, "STREAMS_DATA_DIR": str(data)}, cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_status(f"{url}/healthz") == 200 or proc.poll() is not None,
                 60, "streams serve")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield {"url": url, "batches": batches, "root": root}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _text(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css).text


def _all(driver: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def test_the_batches_page(browser: Any, served: dict[str, Any],
                          tmp_path: Path) -> None:
    ids = served["batches"]
    assert set(ids) == {"closed", "failed", "published"}
    browser.get(served["url"] + "/")
    assert browser.title == "streams: batches"
    shown = {row.get_attribute("data-batch"): row
             for row in _all(browser, "#batches tr[data-batch]")}
    assert set(shown) == set(ids.values())
    for status, batch in ids.items():
        assert shown[batch].find_element("css selector", ".status").text == status
    assert _text(browser, "#summary").startswith("3 batches, 1 open")
    assert _all(browser, 'meta[http-equiv="refresh"]')  # a batch is open: it refreshes
    closed = shown[ids["closed"]].text
    assert EVIL_FILE in closed and EVIL_SEGMENT in closed  # shown as text, not as markup
    assert not _all(browser, "img") and not _all(browser, "#batches b")
    failed = shown[ids["failed"]]
    assert failed.find_element("css selector", ".rejected").text == "7"
    assert "error budget" in failed.text
    freshness = _all(browser, "#freshness tr[data-segment]")
    assert [r.get_attribute("data-segment") for r in freshness] == [EVIL_SEGMENT]
    assert browser.save_screenshot(str(tmp_path / "batches.png"))
    print(f"screenshot: {tmp_path / 'batches.png'}")


def test_a_closed_batch(browser: Any, served: dict[str, Any], tmp_path: Path) -> None:
    batch = served["batches"]["closed"]
    browser.get(f"{served['url']}/batches/{batch}")
    assert _text(browser, "#batch-id") == batch
    assert _text(browser, "#facts .status") == "closed"
    parts = _all(browser, "#partitions tr[data-partition]")
    assert len(parts) == 4
    rows = [p.find_elements("css selector", "td") for p in parts]
    assert sum(int(r[1].text.replace(",", "")) for r in rows) == 400
    assert all(c.text == "committed" for r in rows for c in r[3:]) and len(rows[0]) == 5
    assert not _all(browser, 'meta[http-equiv="refresh"]')  # closed: no refresh
    assert not _all(browser, "tr.dead-letter")
    assert browser.save_screenshot(str(tmp_path / "closed.png"))


def test_a_failed_batch_with_its_dead_letters(browser: Any, served: dict[str, Any],
                                              tmp_path: Path) -> None:
    batch = served["batches"]["failed"]
    browser.get(f"{served['url']}/batches/{batch}")
    assert _text(browser, "#facts .status") == "failed"
    assert "import:" in _text(browser, "#error") and "error budget" in _text(browser, "#error")
    assert _text(browser, "#rejected") == "7"
    dead = _all(browser, "tr.dead-letter")
    assert len(dead) == 7
    assert all("rejected.csv" in d.text for d in dead)
    assert not _all(browser, "#partitions tr[data-partition]")  # nothing was published
    assert browser.save_screenshot(str(tmp_path / "failed.png"))


def test_an_open_batch_refreshes_itself(browser: Any, served: dict[str, Any],
                                        tmp_path: Path) -> None:
    batch = served["batches"]["published"]
    browser.get(f"{served['url']}/batches/{batch}")
    assert _text(browser, "#facts .status") == "published"
    assert _all(browser, 'meta[http-equiv="refresh"]')
    parts = _all(browser, "#partitions tr[data-partition]")
    assert len(parts) == 4
    assert all(p.find_elements("css selector", "td")[2].text == "waiting" for p in parts)
    assert browser.save_screenshot(str(tmp_path / "open.png"))


def test_the_json_api(served: dict[str, Any]) -> None:
    url, ids = served["url"], served["batches"]
    with urllib.request.urlopen(f"{url}/api/batches", timeout=10) as answer:
        listed = json.loads(answer.read())
    assert {b["batch_id"]: b["shown_status"] for b in listed} == {v: k for k, v in ids.items()}
    with urllib.request.urlopen(f"{url}/api/batches/{ids['failed']}", timeout=10) as answer:
        failed = json.loads(answer.read())
    assert failed["status"] == "failed" and len(failed["dead_letters"]) == 7
    with urllib.request.urlopen(f"{url}/api/batches/{ids['closed']}", timeout=10) as answer:
        closed = json.loads(answer.read())
    assert [p["sinks"] for p in closed["partition_progress"]] == [
        {"s3": True, "warehouse": True}] * 4
    assert http_status(f"{url}/api/batches/nope") == 404
    request = urllib.request.Request(f"{url}/api/batches", data=b"{}", method="POST")
    try:
        urllib.request.urlopen(request, timeout=10)
        raise AssertionError("POST accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == 405  # read-only
