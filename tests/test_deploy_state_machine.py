"""The state machine of deploy/state_machine.asl.json, run end to end against real pieces:
the Lambda handlers (called by tests/asl_walker.py in the order the definition gives),
the import's Fargate task as a process started from its task definition, the processor
and sink services as `streams worker` processes started from theirs, and moto's S3,
DynamoDB (the status table the definition polls), SNS (notify, alert) and Step Functions.

moto's Step Functions runs the same definition on the Lambda path, with moto's Docker-less
Lambda answering each Lambda task with the result the real handler gave in the walker's
run (in the order moto asks): the states it passes through must be the walker's, so moto's
interpreter checks the walker's (Choice, Wait, intrinsics, the DynamoDB and SNS tasks are
moto's own). The Fargate path (ECS .sync needs a container) and the failure branch (moto's
Lambda cannot fail) run on the walker only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from connectors import aws
from connectors.dynamo_status import StatusTable
from deploy.lambdas import submit
from tests import asl_walker
from tests.aws_server import aws_env, moto_endpoint, unique_name
from tests.deploy_support import (
    FUNCTIONS,
    Deployment,
    csv_bytes,
    definition,
    deployment,
    eventbridge_event,
    template,
    upload,
)
from tests.ports import free_port
from tests.support import expected_members, random_rows, run_cli, warehouse_members

__all__ = ["aws_env", "deployment", "moto_endpoint"]  # fixtures, used by name

ACCOUNT = "123456789012"
LAMBDA_PATH = ["Submit", "IsDuplicate", "RecordImportStarted", "BySize", "ImportOnLambda",
               "RecordImportEnded", "StartPolling"]
FARGATE_PATH = ["Submit", "IsDuplicate", "RecordImportStarted", "BySize", "ImportOnFargate",
                "FargateExitCode", "RecordImportEnded", "StartPolling"]
POLL = ["WaitForClose", "ReadStatus", "CountPoll", "IsClosed"]
CLOSE_PATH = ["RecordClosed", "Notify", "Done"]


def _arn(function: str) -> str:
    return f"arn:aws:lambda:us-east-1:{ACCOUNT}:function:{function}"


class Machine:
    """The definition with the test's substitutions, and a function for each task."""

    def __init__(self, d: Deployment, ecs_runs: list[dict[str, Any]]):
        sns, sqs = aws.client("sns"), aws.client("sqs")
        self.topics, self.queues = {}, {}
        for name in ("notify", "alert"):
            topic = sns.create_topic(Name=unique_name(name))["TopicArn"]
            queue = sqs.create_queue(QueueName=unique_name(name))["QueueUrl"]
            queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])[
                "Attributes"]["QueueArn"]
            sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn,
                          Attributes={"RawMessageDelivery": "true"})
            self.topics[name], self.queues[name] = topic, queue
        substitutions = template()["Resources"]["StateMachine"]["Properties"][
            "DefinitionSubstitutions"]
        values = {
            "SubmitFunctionArn": _arn("submit"), "ImportFunctionArn": _arn("import"),
            "StatusFunctionArn": _arn("status"),
            "ClusterArn": f"arn:aws:ecs:us-east-1:{ACCOUNT}:cluster/test",
            "ImportTaskDefinitionArn": f"arn:aws:ecs:us-east-1:{ACCOUNT}:task-definition/i:1",
            "SubnetIds": "subnet-a,subnet-b", "SecurityGroupId": "sg-1",
            "AssignPublicIp": "DISABLED", "StatusTableName": d.status_table,
            "NotifyTopicArn": self.topics["notify"], "AlertTopicArn": self.topics["alert"]}
        assert set(values) == set(substitutions)
        self.definition = asl_walker.substitute(definition(), values)
        self.d, self.ecs_runs = d, ecs_runs
        handlers = {_arn(short): FUNCTIONS[fn] for short, fn in [
            ("submit", "SubmitFunction"), ("import", "ImportFunction"),
            ("status", "StatusFunction")]}
        self.tasks: dict[str, asl_walker.Task] = {
            arn: _handler(path) for arn, path in handlers.items()}
        dynamodb = aws.client("dynamodb")
        self.tasks["arn:aws:states:::dynamodb:getItem"] = lambda p: dynamodb.get_item(**p)
        self.tasks["arn:aws:states:::sns:publish"] = lambda p: aws.client("sns").publish(**p)
        self.tasks["arn:aws:states:::ecs:runTask.sync"] = self._run_task

    def _run_task(self, params: dict[str, Any]) -> dict[str, Any]:
        """ecs:runTask.sync: the import task definition's container with the overridden
        command, as a process; the result has the fields the definition selects."""
        assert params["LaunchType"] == "FARGATE"
        network = params["NetworkConfiguration"]["AwsvpcConfiguration"]
        assert network["Subnets"] == ["subnet-a", "subnet-b"]
        assert network["SecurityGroups"] == ["sg-1"]
        override, = params["Overrides"]["ContainerOverrides"]
        _command, env = self.d.container("ImportTaskDefinition")
        assert override["Name"] == "streams"
        proc = self.d.process(override["Command"], env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=300)
        self.ecs_runs.append({"command": override["Command"], "rc": proc.returncode,
                              "stdout": out, "stderr": err})
        return {"TaskArn": f"arn:aws:ecs:us-east-1:{ACCOUNT}:task/test/{len(self.ecs_runs)}",
                "Containers": [{"Name": "streams", "ExitCode": proc.returncode}],
                "StoppedReason": "Essential container in task exited"}

    def run(self, event: dict[str, Any], name: str) -> asl_walker.Run:
        execution = f"arn:aws:states:us-east-1:{ACCOUNT}:execution:upload:{name}"
        return asl_walker.run(self.definition, self.tasks, event, execution, timeout_s=240)

    def received(self, topic: str) -> list[str]:
        sqs = aws.client("sqs")
        got = sqs.receive_message(QueueUrl=self.queues[topic], MaxNumberOfMessages=10,
                                  WaitTimeSeconds=1).get("Messages", [])
        return [m["Body"] for m in got]


def _handler(path: str) -> asl_walker.Task:
    module, _, attr = path.rpartition(".")
    import importlib

    function = getattr(importlib.import_module(module), attr)
    return lambda event: json.loads(json.dumps(function(event, None)))  # as serialized JSON


def start_worker(d: Deployment, task_definition: str,
                 env: dict[str, str] | None = None,
                 streams: list[str] | None = None) -> tuple[subprocess.Popen[str], Path]:
    """A service's task: its container's command and environment, as a process (its logs
    in a file, as awslogs takes them); returned once it says it is running."""
    command, task_env = d.container(task_definition)
    # Each ECS task has a network namespace of its own (awsvpc); here they share one host.
    port = str(free_port())
    task_env = {**task_env, "STREAMS_METRICS_PORT": port}
    log = d.data_dir.parent / f"{task_definition}.log"
    with open(log, "w") as out:
        proc = d.process(command, {**(env or {}), **task_env}, stderr=out, stdout=out,
                         entrypoint=streams)
    deadline = time.monotonic() + 120
    while "worker running" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)  # polling its log for the start line
    # The container health check of the task definition, as ECS runs it, passes.
    check = template()["Resources"][task_definition]["Properties"]["ContainerDefinitions"][
        0]["HealthCheck"]["Command"]
    assert check[0] == "CMD-SHELL"
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    while subprocess.run(["sh", "-c", check[1]],
                         env={**os.environ, "PATH": path, "STREAMS_METRICS_PORT": port},
                         capture_output=True, timeout=30).returncode != 0:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"health check failing: {log.read_text()}"
        time.sleep(0.1)  # polling the health endpoint until the worker serves it
    return proc, log


@pytest.fixture
def workers(deployment: Deployment) -> Iterator[list[tuple[subprocess.Popen[str], Path]]]:
    """The processor and sink services: one task each, started from the task definitions."""
    started = [start_worker(deployment, t)
               for t in ("ProcessorTaskDefinition", "SinkTaskDefinition")]
    yield started
    for proc, _log in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def stop(procs: list[tuple[subprocess.Popen[str], Path]]) -> list[float]:
    """SIGTERM, as ECS stops a task: each must exit 0, saying so, inside the task
    definition's StopTimeout (after which ECS would SIGKILL it). Returns the seconds each
    took."""
    stop_timeout = template()["Resources"]["SinkTaskDefinition"]["Properties"][
        "ContainerDefinitions"][0]["StopTimeout"]
    started = time.monotonic()
    for proc, _log in procs:
        proc.send_signal(signal.SIGTERM)
    took = []
    for proc, log in procs:
        proc.wait(timeout=stop_timeout)
        took.append(time.monotonic() - started)
        assert proc.returncode == 0, log.read_text()
        assert "worker stopped cleanly" in log.read_text()
    return took


def test_uploads_run_through_on_lambda_and_on_fargate(
        deployment: Deployment, workers: list[tuple[subprocess.Popen[str], Path]], tmp_path: Path,
        moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(submit, "POLL_SECONDS", 1)  # the wait's length, not its logic
    ecs_runs: list[dict[str, Any]] = []
    machine = Machine(deployment, ecs_runs)
    small_rows = random_rows(200, 40, 2, seed=3)
    large_rows = random_rows(2000, 300, 3, seed=4)
    small = upload(deployment, "in/small.csv", csv_bytes(tmp_path, small_rows))
    large = upload(deployment, "in/large.csv", csv_bytes(tmp_path, large_rows))
    limit = (small["ContentLength"] + large["ContentLength"]) // 2
    monkeypatch.setenv("STREAMS_LAMBDA_IMPORT_MAX_BYTES", str(limit))

    small_event = eventbridge_event(deployment.input_bucket, "in/small.csv", small)
    on_lambda = machine.run(small_event, "small")
    assert on_lambda.status == "SUCCEEDED", (on_lambda.visited, on_lambda.error)
    polls = on_lambda.visited[len(LAMBDA_PATH):-len(CLOSE_PATH)]
    assert on_lambda.visited[:len(LAMBDA_PATH)] == LAMBDA_PATH
    assert on_lambda.visited[-len(CLOSE_PATH):] == CLOSE_PATH
    assert polls and polls == POLL * (len(polls) // 4)  # until the workers closed it

    on_fargate = machine.run(eventbridge_event(deployment.input_bucket, "in/large.csv", large),
                             "large")
    assert on_fargate.status == "SUCCEEDED", (on_fargate.visited, on_fargate.error, ecs_runs)
    assert on_fargate.visited[:len(FARGATE_PATH)] == FARGATE_PATH
    run, = ecs_runs
    assert run["rc"] == 0 and run["command"][:2] == ["import", f"s3://{deployment.input_bucket}"
                                                     "/in/large.csv"]

    table = StatusTable(deployment.status_table)
    for result in (on_lambda, on_fargate):
        batch_id = result.output["batch"]["batch_id"]
        item = table.get(batch_id)
        assert item is not None and item["status"] == "closed"
        assert [item[f"step_{s}"]["phase"] for s in ("submit", "import", "close")] == [
            "ended", "ended", "ended"]
        assert "execution_failed_step" not in item
    notified = machine.received("notify")
    assert sorted(notified) == sorted(
        f"batch {r.output['batch']['batch_id']} closed: {r.output['batch']['url']}"
        for r in (on_lambda, on_fargate))

    # The event again (EventBridge delivers at least once): the guard ends it at once.
    again = machine.run(small_event, "small-again")
    assert (again.status, again.visited) == ("SUCCEEDED",
                                              ["Submit", "IsDuplicate", "AlreadySubmitted"])

    # The same definition on moto's Step Functions, Lambda answered with the real results.
    # (moto's interpreter calls its own server's APIs at localhost:MOTO_PORT)
    monkeypatch.setenv("MOTO_PORT", moto_endpoint.rsplit(":", 1)[1])
    moto_run = _run_on_moto(moto_endpoint, machine, small_event, on_lambda)
    # The batch is closed by now, so moto reads the status table once, then notifies.
    assert moto_run == LAMBDA_PATH + POLL + CLOSE_PATH
    assert machine.received("notify") == [m for m in notified if m.endswith("/in/small.csv")]

    stop(workers)
    assert warehouse_members(deployment.data_dir) == sorted(
        expected_members([("add", small_rows), ("add", large_rows)]))
    verified = run_cli("verify", data_dir=deployment.data_dir, env={
        k: v for k, v in deployment.container("SinkTaskDefinition")[1].items()})
    assert "verified" in verified.stdout


def _run_on_moto(endpoint: str, machine: Machine, event: dict[str, Any],
                 walked: asl_walker.Run) -> list[str]:
    config = requests.get(f"{endpoint}/moto-api/config", timeout=10).json()
    requests.post(f"{endpoint}/moto-api/config", timeout=10, json={
        "stepfunctions": {"execute_state_machine": True}, "lambda": {"use_docker": False}})
    try:
        lambda_results = [json.dumps(value) for state, value in walked.results
                          if machine.definition["States"][state]["Resource"].startswith(
                              "arn:aws:lambda:")]
        response = requests.post(f"{endpoint}/moto-api/static/lambda-simple/response",
                                 json={"results": lambda_results, "region": "us-east-1"},
                                 timeout=10)
        assert response.status_code == 201
        sfn = aws.client("stepfunctions")
        arn = sfn.create_state_machine(
            name=unique_name("upload"), definition=json.dumps(machine.definition),
            roleArn=f"arn:aws:iam::{ACCOUNT}:role/state-machine")["stateMachineArn"]
        execution = sfn.start_execution(stateMachineArn=arn,
                                        input=json.dumps(event))["executionArn"]
        deadline = time.monotonic() + 120
        while (status := sfn.describe_execution(executionArn=execution)["status"]) == "RUNNING":
            assert time.monotonic() < deadline, "moto's execution did not end in 120 s"
            time.sleep(0.2)  # polling moto's execution status
        events = sfn.get_execution_history(executionArn=execution, maxResults=1000)["events"]
        assert status == "SUCCEEDED", events[-3:]
        return [e["stateEnteredEventDetails"]["name"] for e in events
                if "stateEnteredEventDetails" in e]
    finally:
        requests.post(f"{endpoint}/moto-api/config", timeout=10, json={
            "stepfunctions": config.get("stepfunctions", {"execute_state_machine": False}),
            "lambda": config.get("lambda", {"use_docker": True})})


@pytest.mark.parametrize("where", ["lambda", "fargate"])
def test_a_failed_import_records_its_step_and_alerts(
        deployment: Deployment, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if where == "fargate":
        monkeypatch.setenv("STREAMS_LAMBDA_IMPORT_MAX_BYTES", "0")
    ecs_runs: list[dict[str, Any]] = []
    machine = Machine(deployment, ecs_runs)
    head = upload(deployment, "in/empty.csv", b"user_id,segment_id\n")  # a header, no rows
    result = machine.run(eventbridge_event(deployment.input_bucket, "in/empty.csv", head),
                         "empty")
    assert (result.status, result.error) == ("FAILED", "BatchFailed")
    tail = (["ImportOnLambda", "ImportFailed"] if where == "lambda" else
            ["ImportOnFargate", "FargateExitCode", "FargateImportFailed", "ImportFailed"])
    assert result.visited[-len(tail) - 3:] == [*tail, "RecordFailure", "Alert", "Failed"]
    batch_id = result.output["batch"]["batch_id"]
    item = StatusTable(deployment.status_table).get(batch_id)
    assert item is not None
    assert item["execution_failed_step"] == "import"
    assert item["step_import"]["phase"] == "failed"
    if where == "lambda":  # the handler's error type and message
        assert item["execution_error"].startswith("ImportFailed: ")
        assert "no data rows" in item["execution_error"]
    else:  # the task's exit code; its message is in the task's log (stderr here)
        assert item["execution_error"] == (
            "ImportFailed: streams import exited 1: Essential container in task exited")
        run, = ecs_runs
        assert "no data rows" in run["stderr"]
    alert, = machine.received("alert")
    body = json.loads(alert)
    assert body["failed_step"] == "import" and body["batch"]["batch_id"] == batch_id
    assert body["recorded"]["recorded"] is True


def test_a_bad_event_fails_at_submit_and_alerts(deployment: Deployment) -> None:
    machine = Machine(deployment, [])
    result = machine.run({"detail-type": "Object Created", "source": "aws.s3",
                          "detail": {"bucket": {"name": "b"}}}, "bad")
    assert result.visited == ["Submit", "SubmitFailed", "RecordFailure", "Alert", "Failed"]
    alert, = machine.received("alert")
    body = json.loads(alert)
    assert body["error"]["Error"] == "BadEvent"
    assert "detail.object: expected an object" in body["error"]["Cause"]
    assert body["recorded"]["recorded"] is False  # no object, so no batch to record into
