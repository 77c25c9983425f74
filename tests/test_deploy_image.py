"""The Dockerfile, proved without Docker: its COPY steps into a directory of their own and
its `pip install` step in a fresh virtual environment (with the system's site-packages
visible and no index: the dependencies the dev extra installed are reused, so the test takes
seconds and needs no network; what it checks is that the copied tree installs as a package
with its entry points and data files, and that the installed copy, not this tree, runs).
Then each entry point of the image runs as a plain process of that environment: `streams`
(the ENTRYPOINT) with the task definitions' commands and environment, and awslambdaric
with the Lambda functions' handlers, fed by a Lambda Runtime API of the test's."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.dynamo_status import StatusTable
from tests.aws_server import aws_env, moto_endpoint
from tests.deploy_support import ROOT, Deployment, deployment, template
from tests.lambda_runtime_api import RuntimeApi
from tests.support import expected_members, random_rows, warehouse_members, write_csv
from tests.test_deploy_state_machine import start_worker, stop

__all__ = ["aws_env", "deployment", "moto_endpoint"]  # fixtures, used by name

DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    return [(line.split(None, 1)[0], line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The image's filesystem as a directory and a virtual environment."""
    root = tmp_path_factory.mktemp("image")
    task = root / "var" / "task"
    task.mkdir(parents=True)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    entrypoint: list[str] = []
    for op, arg in _instructions():
        if op == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", arg)))
        elif op == "COPY":
            *sources, _dest = arg.split()
            for source in sources:
                src = ROOT / source
                target = task / source
                if src.is_dir():
                    shutil.copytree(src, target, ignore=shutil.ignore_patterns(
                        "__pycache__", "*.pyc"))
                else:
                    shutil.copy2(src, target)
        elif op == "RUN" and arg.startswith("pip install"):
            # The image's step, offline: every requirement must already be satisfied.
            args = shlex.split(arg)[2:]
            done = subprocess.run([str(python), "-m", "pip", "install", "--no-index",
                                   "--no-build-isolation", *args], cwd=task, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
        elif op == "ENTRYPOINT":
            entrypoint = json.loads(arg)
    assert entrypoint == ["streams"]
    yield {"venv": venv, "python": python, "task": task, "env": env,
           "streams": [str(venv / "bin" / "streams")]}


def test_the_install_gives_the_entry_points_from_the_copied_tree(
        image: dict[str, Any]) -> None:
    probe = subprocess.run(
        [str(image["python"]), "-c",
         "import streams, deploy.lambdas.kinesis, awslambdaric, boto3, psycopg, kafka; "
         "from deploy.definition import definition; print(streams.__file__); "
         "print(definition()['StartAt'])"],
        cwd="/", env=image["env"], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    where, start = probe.stdout.split()
    assert Path(where).is_relative_to(image["venv"])  # the installed copy, not this tree
    assert start == "Submit"  # the definition file is installed with the package
    for command in (["--help"], ["worker", "--help"], ["import", "--help"]):
        done = subprocess.run([*image["streams"], *command], env=image["env"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr


def test_lambda_handlers_run_under_awslambdaric(image: dict[str, Any],
                                                deployment: Deployment) -> None:
    resources = template()["Resources"]
    env = {**image["env"], **deployment.aws_env, **deployment.function_env("StatusFunction")}
    handlers = {r["Properties"]["ImageConfig"]["Command"][0]
                for r in resources.values() if r["Type"] == "AWS::Lambda::Function"}
    assert "deploy.lambdas.status_step.handler" in handlers
    for handler in sorted(handlers):
        with RuntimeApi() as api:
            entry = resources["StatusFunction"]["Properties"]["ImageConfig"]["EntryPoint"]
            assert entry == ["python", "-m", "awslambdaric"]
            proc = subprocess.Popen([str(image["python"]), "-m", "awslambdaric", handler],
                                    cwd=image["task"], env={
                                        **env, "AWS_LAMBDA_RUNTIME_API": api.address},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            try:
                # A bad event: the handler's one-line error, as Lambda reports it.
                kind, body = api.invoke({"bogus": True})
                assert kind == "error", body
                assert body["errorType"] == "BadEvent", body
                assert body["errorMessage"] and "\n" not in body["errorMessage"]
                if handler.endswith("status_step.handler"):
                    kind, body = api.invoke({"step": "import", "phase": "started",
                                             "state": {"batch": {"batch_id": "b-1"}}})
                    assert (kind, body["recorded"], body["batch_id"]) == ("response", True,
                                                                          "b-1")
            finally:
                proc.kill()
                proc.communicate(timeout=30)
    item = StatusTable(deployment.status_table).get("b-1")
    assert item is not None and item["step_import"]["phase"] == "started"


def test_a_worker_started_as_its_task_definition_processes_a_batch_and_stops_on_sigterm(
        image: dict[str, Any], deployment: Deployment, tmp_path: Path) -> None:
    image_env = {k: v for k, v in image["env"].items() if k.startswith("STREAMS_")}
    workers = []
    try:
        for t in ("ProcessorTaskDefinition", "SinkTaskDefinition"):
            workers.append(start_worker(deployment, t, env=image_env, streams=image["streams"]))
        rows = _process_a_batch(deployment, image, image_env, tmp_path)
        took = stop(workers)
    finally:
        for proc, _log in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert max(took) < 30  # measured: well inside ECS's StopTimeout (120 s)
    # DuckDB has one writer: read the warehouse once the sink worker is gone.
    assert warehouse_members(deployment.data_dir) == sorted(expected_members([("add", rows)]))


def _process_a_batch(deployment: Deployment, image: dict[str, Any], image_env: dict[str, str],
                     tmp_path: Path) -> list[tuple[str, str, str]]:
    """An import run as the import task runs it; returns its rows once the status table
    says the batch is closed."""
    rows = random_rows(3000, 400, 4, seed=11)
    path = write_csv(tmp_path / "users.csv", rows)
    command, env = deployment.container("ImportTaskDefinition")
    assert command[0] == "import"
    done = deployment.process(["import", str(path), "-q"], {**image_env, **env},
                              entrypoint=image["streams"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    batch_id = out.split()[1].rstrip(":")
    table = StatusTable(deployment.status_table)
    deadline = time.monotonic() + 120
    while (item := table.get(batch_id)) is None or item["status"] != "closed":
        assert time.monotonic() < deadline, item
        time.sleep(0.1)  # polling the status table, as the state machine does
    return rows
