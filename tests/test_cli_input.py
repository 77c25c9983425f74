"""The CLI as a new user meets it (issue 8): request identity, options after the
subcommand, one-line errors with their exit codes, standard input and compressed files,
interrupted imports, runs side by side and Ctrl-C. Real processes, the embedded backend."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import duckdb
import pytest

from tests.support import expected_members, random_rows, run_cli, warehouse_members, write_csv

USAGE, DATA = 2, 1


def statuses(data: Path) -> list[dict[str, Any]]:
    return json.loads(run_cli("status", "--json", data_dir=data).stdout)


def rows_published(data: Path) -> int:
    out = run_cli("topics", data_dir=data).stdout.split("\n\n")[0].splitlines()[1:]
    return sum(int(f[2]) for f in (line.split() for line in out) if f[0] == "audience.rows")


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *parts: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    for part in parts:
        assert part in errors[0], (part, errors[0])


# ---------------------------------------------------------------------- request identity


def test_same_file_with_other_options_is_a_new_batch(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rows = [(f"u{i}", "", "add") for i in range(50)]
    path = tmp_path / "u.csv"
    path.write_text("user_id\n" + "".join(f"{u}\n" for u, _s, _o in rows), encoding="utf-8")
    run_cli("run", str(path), "--segment", "a", "-q", data_dir=data)
    run_cli("run", str(path), "--segment", "b", "-q", data_dir=data)
    assert set(warehouse_members(data)) == {(s, u) for s in "ab" for u, _s, _o in rows}
    # Same content and options: a double-fired trigger, nothing changes.
    again = run_cli("run", str(path), "--segment", "b", "-q", data_dir=data)
    assert "already imported with these options" in again.stdout
    # The same file with --mode remove is another request: it removes.
    run_cli("run", str(path), "--segment", "a", "--mode", "remove", "-q", data_dir=data)
    assert set(warehouse_members(data)) == {("b", u) for u, _s, _o in rows}
    found = statuses(data)
    assert len(found) == 3 and len({s["batch_id"] for s in found}) == 3
    assert [s["request"]["segment"] for s in found] == ["a", "b", "a"]


def test_explicit_batch_id_reused_with_other_options_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = write_csv(tmp_path / "u.csv", random_rows(100, 50, 2, seed=1))
    run_cli("run", str(path), "--batch-id", "b-x", "-q", data_dir=data)
    before = statuses(data)
    proc = run_cli("run", str(path), "--batch-id", "b-x", "--mode", "replace", data_dir=data,
                   check=False)
    one_line_error(proc, USAGE, "batch id b-x", "mode 'add' then, 'replace' now")
    assert statuses(data) == before


# ------------------------------------------------------- options where users type them


def test_group_options_work_after_the_subcommand(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "u.csv", random_rows(200, 80, 2, seed=2))
    here = tmp_path / "here"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMS_")}
    proc = subprocess.run([sys.executable, "-m", "streams", "run", str(path), "--data-dir",
                           str(here), "--s3-format", "jsonl", "-q"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (here / "warehouse.duckdb").exists() and not (tmp_path / ".streams").exists()
    assert list((here / "s3").rglob("part-*.jsonl"))
    assert set(warehouse_members(here)) == expected_members(
        [("add", random_rows(200, 80, 2, seed=2))])
    for sub in ("run", "import", "worker", "status", "topics", "replay", "dead-letters"):
        shown = subprocess.run([sys.executable, "-m", "streams", sub, "--help"], env=env,
                               capture_output=True, text=True, timeout=60).stdout
        assert "--data-dir" in shown and "--warehouse-memory-limit" in shown, sub


# ------------------------------------------------------------ one line, the right code


def test_usage_errors_are_one_line_exit_2_and_publish_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = write_csv(tmp_path / "u.csv", random_rows(100, 50, 2, seed=3))
    cases = [
        (["--warehouse-memory-limit", "banana", "run", str(path)], "--warehouse-memory-limit"),
        (["run", str(path), "--warehouse-memory-limit", "banana"], "--warehouse-memory-limit"),
        (["worker", "--roles", "s3,s3"], "s3 given more than once"),
        (["worker", "--roles", ""], "no role"),
        (["worker", "--roles", "s3,sql"], "unknown role(s) 'sql'"),
        (["run", str(path), "--batch-id", "no spaces"], "--batch-id"),
        (["run", str(path), "--max-rejects", "lots"], "--max-rejects"),
        (["run", str(path), "--delimiter", "ab"], "--delimiter 'ab'"),
        (["run", "-"], "needs --format"),
        (["status", "b-nope"], "no batch b-nope"),
        (["dead-letters", "b-nope"], "no batch b-nope"),
        (["--data-dir", "/proc/streams-test", "status"], "--data-dir /proc/streams-test"),
        (["run", str(path), "--data-dir", str(path)], "is a file"),
    ]
    for args, part in cases:
        proc = run_cli(*args, data_dir=data, check=False, timeout=60)
        one_line_error(proc, USAGE, part)
    assert statuses(data) == [] and rows_published(data) == 0


def test_data_errors_exit_1_and_publish_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    quote = tmp_path / "quote.csv"
    quote.write_text('user_id,segment_id,note\nu1,s,ok\nu2,s,"never closed\n'
                     + "".join(f"u{i},s,fine\n" for i in range(3, 3000)), encoding="utf-8")
    proc = run_cli("run", str(quote), data_dir=data, check=False)
    one_line_error(proc, DATA, "line 3: a quoted field opened here is never closed")
    proc = run_cli("run", str(tmp_path / "nope.csv"), data_dir=data, check=False)
    one_line_error(proc, DATA, "no such file")
    # Found in the first chunk read: refused before the batch was even submitted.
    assert rows_published(data) == 0 and statuses(data) == []


def test_a_failed_batch_is_not_called_published(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = tmp_path / "bad.csv"
    path.write_text("user_id,segment_id\nu1,s\n,s\n,s\n", encoding="utf-8")
    proc = run_cli("run", str(path), data_dir=data, check=False)
    assert proc.returncode == DATA and "Traceback" not in proc.stderr
    assert "nothing was published" in proc.stdout
    assert " published," not in proc.stdout
    assert "see: streams dead-letters" in proc.stdout


def test_unknown_config_key_is_a_warning_with_the_nearest_match(tmp_path: Path) -> None:
    (tmp_path / "streams.toml").write_text('data_dirr = "x"\nsegment = "vip"\n',
                                           encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMS_")}
    proc = subprocess.run([sys.executable, "-m", "streams", "status"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "unknown key 'data_dirr' (did you mean 'data_dir'?)" in proc.stderr
    assert "'segment'" not in proc.stderr  # a key of the run subcommand: known


def test_duplicate_member_is_a_one_line_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {**os.environ, "STREAMS_DATA_DIR": str(data)}
    # Processor roles only: a second worker of the warehouse role would first wait for
    # the warehouse, which the first one holds.
    roles = ["--roles", "segments,pipeline"]
    first = subprocess.Popen([sys.executable, "-m", "streams", "worker", "--member", "m1",
                              *roles], env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert first.stderr is not None
        assert first.stderr.readline().startswith("worker running")
        second = run_cli("worker", "--member", "m1", *roles, data_dir=data, check=False,
                         timeout=60)
        one_line_error(second, USAGE, "--member m1", "already running")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)


# ------------------------------------------------------------ files as users send them


def test_gzip_and_stdin(tmp_path: Path) -> None:
    rows = random_rows(3_000, 1_000, 3, seed=4)
    plain = write_csv(tmp_path / "u.csv", rows)
    packed = tmp_path / "u.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    want = expected_members([("add", rows)])
    gz_data = tmp_path / "gz"
    run_cli("run", str(packed), "-q", data_dir=gz_data)
    assert set(warehouse_members(gz_data)) == want
    # The same bytes on standard input: the same batch id (content + options).
    in_data = tmp_path / "stdin"
    proc = subprocess.run([sys.executable, "-m", "streams", "run", "-", "--format", "csv"],
                          input=plain.read_bytes(), capture_output=True, timeout=120,
                          env={**os.environ, "STREAMS_DATA_DIR": str(in_data)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert b"reading standard input: waiting for data" in proc.stderr
    assert set(warehouse_members(in_data)) == want
    (s,) = statuses(in_data)
    assert s["source"] == "<stdin>" and s["rows"] == 3_000
    file_data = tmp_path / "file"
    run_cli("run", str(plain), "-q", data_dir=file_data)
    assert statuses(file_data)[0]["batch_id"] == s["batch_id"]
    assert not list((in_data / "spool").glob("*"))  # the copy of stdin is gone


def test_closed_stdin_is_no_data_rows(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "streams", "import", "-", "--format", "csv"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "STREAMS_DATA_DIR": str(data)},
                          cwd=tmp_path)
    one_line_error(proc, DATA, "<stdin>: no data rows")


# --------------------------------------------------------- interrupted, side by side


def test_killed_import_shows_interrupted_and_the_same_command_finishes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rows = random_rows(5_000, 2_000, 2, seed=5)
    path = write_csv(tmp_path / "u.csv", rows)
    killed = run_cli("--message-rows", "50", "import", str(path), "-q", data_dir=data,
                     env={"STREAMS_CRASH_AT": "import.publishing:3"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    (s,) = statuses(data)
    assert s["status"] == "submitted" and s["interrupted"] is True
    table = run_cli("status", data_dir=data).stdout
    assert "interrupted" in table and "run the same command again" in table
    run_cli("--message-rows", "50", "run", str(path), "-q", data_dir=data)
    (s,) = statuses(data)
    assert s["status"] == "closed" and s["interrupted"] is False
    assert set(warehouse_members(data)) == expected_members([("add", rows)])


def test_two_runs_side_by_side_both_finish(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = random_rows(20_000, 5_000, 3, seed=6)
    second = [(u, "other", o) for u, _s, o in random_rows(20_000, 5_000, 1, seed=7)]
    paths = [write_csv(tmp_path / "a.csv", first), write_csv(tmp_path / "b.csv", second)]
    data.mkdir()
    run_cli("status", data_dir=data)  # topics exist: both runs start on the same footing
    results: list[subprocess.CompletedProcess[str]] = []
    lock = threading.Lock()

    def one(path: Path) -> None:
        proc = run_cli("run", str(path), data_dir=data, check=False, timeout=300)
        with lock:
            results.append(proc)

    threads = [threading.Thread(target=one, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=320)
    assert len(results) == 2
    for proc in results:
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr and "status      closed" in proc.stdout
    assert set(warehouse_members(data)) == expected_members([("add", first), ("add", second)])
    assert [s["status"] for s in statuses(data)] == ["closed", "closed"]


def test_closed_at_is_after_the_last_load(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_cli("run", str(write_csv(tmp_path / "u.csv", random_rows(20_000, 5_000, 3, seed=8))),
            "-q", data_dir=data)
    (s,) = statuses(data)
    con = duckdb.connect(str(data / "warehouse.duckdb"), read_only=True)
    try:
        (loaded,) = con.execute("SELECT epoch_ms(max(loaded_at)) FROM load_ledger").fetchone()
    finally:
        con.close()
    assert s["closed_at"] >= loaded


def test_sigint_during_the_import_stops_and_the_same_command_finishes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rows = random_rows(400_000, 100_000, 4, seed=9)
    path = write_csv(tmp_path / "u.csv", rows)
    env = {**os.environ, "STREAMS_DATA_DIR": str(data)}
    proc = subprocess.Popen([sys.executable, "-m", "streams", "run", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    assert proc.stderr is not None
    for line in proc.stderr:  # the import is under way
        if "import:" in line:
            break
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, 1), err
    assert "Traceback" not in err
    again = run_cli("run", str(path), "-q", data_dir=data)
    assert "status      closed" in again.stdout
    assert set(warehouse_members(data)) == expected_members([("add", rows)])


def test_data_dir_of_another_user_is_named(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """As another user (the tests run as root, who may write anywhere): a data dir that
    cannot be written names the setting, the reason and the owner."""
    import tempfile

    from streams.settings import Settings

    def refuse(**_kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    with pytest.raises(ValueError, match=r"--data-dir .*: cannot write there \(Permission "
                       r"denied; it belongs to root\); expected a directory this user"):
        Settings(data_dir=tmp_path).check_data_dir()


# ------------------------------------------------------------------ progress and summary


def test_progress_plain_lines_when_not_a_terminal() -> None:
    import io

    from streams.progress import Progress

    out = io.StringIO()
    progress = Progress(quiet=False, stream=out, tty=False)
    progress.import_rows(50_000, 10, 100)
    progress.import_rows(60_000, 20, 100)  # within the second: not shown
    progress.phases({"segments": 12, "pipeline": 3}, {})
    progress("forced", force=True)
    progress.end()
    lines = out.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["import: 50,000 rows read", "forced"]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    quiet = io.StringIO()
    silent = Progress(quiet=True, stream=quiet, tty=True)
    silent.import_rows(1, 1, 2)
    silent("x", force=True)
    silent.end()
    assert quiet.getvalue() == ""


def test_progress_bar_on_a_terminal_redraws_one_line_and_ends_it() -> None:
    import io

    from streams import progress as progress_module
    from streams.progress import Progress

    out = io.StringIO()
    progress = Progress(quiet=False, stream=out, tty=True)
    progress.import_rows(1_000, 250, 1_000)
    progress_module.time.sleep(progress_module.TTY_INTERVAL_S)  # the redraw interval
    progress.phases({"segments": 4}, {"s3": 2, "warehouse": 0})
    progress.end()
    text = out.getvalue()
    first, second = text.split("\r")[1:]
    assert "import    [######------------------]  25%  1,000 rows" in first
    assert "rows/s" in first and "ETA" in first and first.endswith("\x1b[K")
    assert "segments: 4 messages" in second and "s3 2 behind" in second
    assert "warehouse caught up" in second and second.endswith("\x1b[K\n")


def test_run_on_a_terminal_renders_the_bar_and_ends_cleanly(tmp_path: Path) -> None:
    """stderr on a pseudo-terminal: the bar draws in place (carriage returns), the line is
    ended before the run exits, and the summary (stdout) is whole."""
    import pty
    import select

    rows = random_rows(150_000, users=100_000, segments=3, seed=4)
    path = write_csv(tmp_path / "big.csv", rows)
    data = tmp_path / "data"
    leader, follower = pty.openpty()
    env = {**os.environ, "STREAMS_DATA_DIR": str(data), "COLUMNS": "160"}
    proc = subprocess.Popen([sys.executable, "-m", "streams", "run", str(path)],
                            stdout=subprocess.PIPE, stderr=follower, env=env, cwd=tmp_path)
    os.close(follower)
    chunks: list[bytes] = []
    while True:  # bounded: the child exits (and the pty closes) or communicate times out
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    stdout, _ = proc.communicate(timeout=120)
    os.close(leader)
    terminal = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, terminal
    assert "] import    [" in terminal and "rows/s" in terminal and "\r[" in terminal
    assert "\x1b[K" in terminal and "Traceback" not in terminal
    assert terminal.endswith("\n")  # the bar's line was ended
    assert b"status      closed" in stdout


def test_summary_shows_the_ten_largest_segments(tmp_path: Path) -> None:
    rows = [(f"u{i}-{s}", f"seg-{s:02d}", "add") for s in range(15) for i in range(s + 1)]
    path = write_csv(tmp_path / "many.csv", rows)
    out = run_cli("run", str(path), "-q", data_dir=tmp_path / "data").stdout
    segments = [line for line in out.splitlines() if line.startswith("segment ")]
    assert [line.split()[1] for line in segments] == [f"seg-{s:02d}:" for s in
                                                      range(14, 4, -1)]
    assert "            ... and 5 more segments" in out.splitlines()
