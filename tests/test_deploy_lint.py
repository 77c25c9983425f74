"""The deployment's static checks: cfn-lint on the template (it validates the embedded state
machine too), asl-validator (npm, installed into a cache directory on first use) on the
definition file, the template's copy of the definition equal to the file, and the rules
the issue sets: retries and catches on every task, a timeout on the execution, no `*`
actions, the event source mappings' settings, the health check and stop timeout."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from deploy.definition import DEFINITION, TEMPLATE, embedded
from tests.deploy_support import FUNCTIONS, definition, template
from tests.npm_packages import npm_install

ASL_VALIDATOR = "4.0.0"


@pytest.fixture(scope="session")
def asl_validator() -> Path:
    """The asl-validator CLI, installed with npm into the cache on first use."""
    return npm_install("asl-validator", ASL_VALIDATOR) / "node_modules" / ".bin" / "asl-validator"


def _validate(binary: Path, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), "--json-path", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_asl_validator_passes_the_definition(asl_validator: Path, tmp_path: Path) -> None:
    done = _validate(asl_validator, DEFINITION)
    assert done.returncode == 0, done.stdout + done.stderr
    # It does check: a transition to a state that does not exist fails.
    broken = definition()
    broken["States"]["Submit"]["Next"] = "NoSuchState"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    assert _validate(asl_validator, tmp_path / "broken.json").returncode != 0


def test_cfn_lint_passes_the_template(tmp_path: Path) -> None:
    from cfnlint.api import lint_file

    problems = lint_file(TEMPLATE)
    assert not problems, "\n".join(str(p) for p in problems)
    # It checks the embedded definition: a state of an unknown type fails.
    text = TEMPLATE.read_text(encoding="utf-8").replace('"Type": "Wait"', '"Type": "Sleep"')
    (tmp_path / "broken.yaml").write_text(text)
    assert any("Sleep" in str(p) for p in lint_file(tmp_path / "broken.yaml"))


def test_the_template_embeds_the_definition_file() -> None:
    text = TEMPLATE.read_text(encoding="utf-8")
    assert embedded(text) == text, "run python -m deploy.definition"
    machine = template()["Resources"]["StateMachine"]["Properties"]
    assert machine["Definition"] == definition()
    used = set(re.findall(r"\$\{(\w+)\}", DEFINITION.read_text(encoding="utf-8")))
    assert used == set(machine["DefinitionSubstitutions"])


def _tasks(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in d["States"].items() if s["Type"] == "Task"}


def test_every_task_retries_with_backoff_and_catches() -> None:
    d = definition()
    assert 0 < d["TimeoutSeconds"] <= 24 * 3600
    for name, state in _tasks(d).items():
        assert state.get("TimeoutSeconds"), name
        assert state["Retry"], name
        for retry in state["Retry"]:
            assert retry["BackoffRate"] > 1 and 0 < retry["MaxAttempts"] <= 10, name
        assert any("States.ALL" in c["ErrorEquals"] for c in state["Catch"]), name
    # Every failure records the failed step, then alerts, then fails the execution.
    states = d["States"]
    failing = [n for n, s in states.items() if s["Type"] == "Pass" and
               s.get("ResultPath") == "$.failed_step"]
    assert {"SubmitFailed", "ImportFailed", "CloseFailed", "NotifyFailed"} <= set(failing)
    assert {states[n]["Next"] for n in failing} == {"RecordFailure"}
    assert states["RecordFailure"]["Parameters"]["phase"] == "failed"
    assert states["RecordFailure"]["Next"] == states["RecordFailure"]["Catch"][0]["Next"] \
        == "Alert"
    assert states[states["Alert"]["Next"]]["Type"] == "Fail"
    # Catches outside the failure branch lead into it (or past a record of a step's end).
    for name, state in _tasks(d).items():
        for catch in state["Catch"]:
            target = catch["Next"]
            assert target in failing or name in ("RecordImportEnded", "RecordClosed",
                                                 "RecordFailure", "Alert"), (name, target)


def _statements(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        found = [node] if "Effect" in node and "Action" in node else []
        return found + [s for v in node.values() for s in _statements(v)]
    if isinstance(node, list):
        return [s for v in node for s in _statements(v)]
    return []


def test_iam_lists_its_actions() -> None:
    statements = _statements(template()["Resources"])
    assert len(statements) > 10
    for statement in statements:
        actions = statement["Action"] if isinstance(statement["Action"], list) \
            else [statement["Action"]]
        assert all("*" not in action for action in actions), statement
        if statement.get("Resource") == "*":  # only APIs that take no resource, read no data
            assert all(a.startswith("logs:") or a == "kinesis:ListStreams"
                       for a in actions), statement


def test_event_source_mappings_are_set_as_documented() -> None:
    t = template()
    mappings = {n: r["Properties"] for n, r in t["Resources"].items()
                if r["Type"] == "AWS::Lambda::EventSourceMapping"}
    assert set(mappings) == {"SegmentsEventSource", "PipelineEventSource"}
    for props in mappings.values():
        assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
        assert props["BisectBatchOnFunctionError"] is True
        assert props["MaximumRetryAttempts"] == {"Ref": "KinesisMaxRetries"}
        assert props["DestinationConfig"]["OnFailure"]["Destination"]
        for key, param in [("BatchSize", "KinesisBatchSize"),
                           ("MaximumBatchingWindowInSeconds", "KinesisBatchWindowSeconds"),
                           ("ParallelizationFactor", "KinesisParallelization"),
                           ("MaximumRecordAgeInSeconds", "KinesisMaxRecordAgeSeconds")]:
            assert props[key] == {"Ref": param}
    params = t["Parameters"]
    assert params["KinesisMaxRetries"]["MinValue"] >= 0  # finite: never -1 (forever)


def test_task_definitions_and_functions_run_the_image_as_documented() -> None:
    resources = template()["Resources"]
    roles = {}
    for name, r in resources.items():
        if r["Type"] != "AWS::ECS::TaskDefinition":
            continue
        container = r["Properties"]["ContainerDefinitions"][0]
        assert container["Name"] == "streams" and container["StopTimeout"] <= 120
        assert container["LinuxParameters"]["InitProcessEnabled"] is True  # signals reach it
        names = {e["Name"] for e in container["Environment"]}
        assert all(n.startswith("STREAMS_") for n in names)
        if container["Command"][0] == "worker":
            roles[name] = container["Command"][2]
            check = container["HealthCheck"]["Command"]
            assert check[0] == "CMD-SHELL" and check[1].startswith("python -c")
            assert "http://127.0.0.1:${STREAMS_METRICS_PORT}/healthz" in check[1]
    assert roles == {"ProcessorTaskDefinition": "segments,pipeline",
                     "SinkTaskDefinition": "s3,warehouse,status-table"}
    functions = {n: r["Properties"] for n, r in resources.items()
                 if r["Type"] == "AWS::Lambda::Function"}
    for name, props in functions.items():
        assert props["ImageConfig"]["EntryPoint"] == ["python", "-m", "awslambdaric"]
        handler = props["ImageConfig"]["Command"][0]
        assert FUNCTIONS.get(name, handler) == handler
        module, _, attr = handler.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), handler


def test_the_dockerfile_installs_the_extras_and_names_the_entry_points() -> None:
    text = (TEMPLATE.parent / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)
    assert '.[aws,postgres' in text and "awslambdaric" in text
    assert 'ENTRYPOINT ["streams"]' in text and 'CMD ["worker"]' in text
