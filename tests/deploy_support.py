"""The deployment under test: the template and the state machine read from deploy/, their
references resolved to the test's resources (moto's S3 and DynamoDB, an embedded log in a
temporary directory), and the environment each piece gets from the template."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connectors import aws
from connectors.dynamo_status import StatusTable
from deploy.definition import DEFINITION, TEMPLATE
from tests.aws_server import unique_name
from tests.support import write_csv

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = {  # Lambda function (logical id) -> its handler, as the template names them
    "SubmitFunction": "deploy.lambdas.submit.handler",
    "ImportFunction": "deploy.lambdas.import_file.handler",
    "StatusFunction": "deploy.lambdas.status_step.handler",
    "ScheduledFunction": "deploy.lambdas.scheduled.handler",
    "SegmentsFunction": "deploy.lambdas.kinesis.handler",
}


def template() -> dict[str, Any]:
    from cfnlint.decode import decode_str

    parsed, problems = decode_str(TEMPLATE.read_text(encoding="utf-8"))
    assert not problems, problems
    return json.loads(json.dumps(parsed))  # plain dicts and lists


def definition() -> dict[str, Any]:
    return json.loads(DEFINITION.read_text(encoding="utf-8"))


def resolve(value: Any, refs: dict[str, str]) -> Any:
    """Ref, Fn::Sub and Fn::GetAtt of the template, from `refs` (logical id or parameter ->
    value; GetAtt as 'Id.Attribute')."""
    if isinstance(value, dict) and len(value) == 1:
        (fn, arg), = value.items()
        if fn == "Ref":
            return refs[arg]
        if fn == "Fn::GetAtt":
            return refs[".".join(arg) if isinstance(arg, list) else arg]
        if fn == "Fn::Sub":
            return re.sub(r"\$\{([\w.:]+)\}", lambda m: refs[m.group(1)], arg)
    if isinstance(value, dict):
        return {k: resolve(v, refs) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, refs) for v in value]
    return value


@dataclass
class Deployment:
    """Names of the test's resources, standing in for the template's."""

    input_bucket: str
    output_bucket: str
    status_table: str
    guard_table: str
    data_dir: Path
    aws_env: dict[str, str]
    backend: str = "embedded"  # the Kinesis backend is not in this tree yet
    lambda_import_max_bytes: int = 256 << 20

    @property
    def refs(self) -> dict[str, str]:
        return {"Backend": self.backend, "KafkaBootstrap": "", "OutputBucket": self.output_bucket,
                "InputBucket": self.input_bucket, "StatusTable": self.status_table,
                "GuardTable": self.guard_table,
                "LambdaImportMaxBytes": str(self.lambda_import_max_bytes),
                "AWS::Region": "us-east-1", "AWS::StackName": "test"}

    def container(self, task_definition: str) -> tuple[list[str], dict[str, str]]:
        """(command, environment) of a task definition's container, as ECS starts it; the
        data dir moves from the task's /tmp to the test's."""
        props = template()["Resources"][task_definition]["Properties"]
        container = props["ContainerDefinitions"][0]
        env = {e["Name"]: str(resolve(e["Value"], self.refs)) for e in container["Environment"]}
        env["STREAMS_DATA_DIR"] = str(self.data_dir)
        return list(container["Command"]), env

    def function_env(self, function: str) -> dict[str, str]:
        props = template()["Resources"][function]["Properties"]
        env = {k: str(resolve(v, self.refs))
               for k, v in props["Environment"]["Variables"].items()}
        env["STREAMS_DATA_DIR"] = str(self.data_dir)
        return env

    def process(self, command: list[str], env: dict[str, str],
                entrypoint: list[str] | None = None, **kwargs: Any) -> subprocess.Popen[str]:
        """The image's ENTRYPOINT (`streams`; by default this interpreter's, from this tree)
        with a task's command, as a plain process."""
        full = {**os.environ, **self.aws_env, **env}
        if entrypoint is None:
            entrypoint = [sys.executable, "-m", "streams"]
            full["PYTHONPATH"] = str(ROOT)
        return subprocess.Popen([*entrypoint, *command], env=full, text=True,
                                cwd=self.data_dir.parent, **kwargs)


def eventbridge_event(bucket: str, key: str, head: dict[str, Any]) -> dict[str, Any]:
    """S3's "Object Created" event as EventBridge delivers it."""
    return {
        "version": "0", "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": "Object Created", "source": "aws.s3", "account": "123456789012",
        "time": "2026-12-01T12:00:00Z", "region": "us-east-1",
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {"version": "0", "bucket": {"name": bucket},
                   "object": {"key": key, "size": head["ContentLength"],
                              "etag": head["ETag"].strip('"'),
                              "version-id": head.get("VersionId", ""),
                              "sequencer": "00617F08299329D189"},
                   "request-id": "N4N7GDK58NMKJ12R", "requester": "123456789012",
                   "source-ip-address": "1.2.3.4", "reason": "PutObject"}}


def s3_notification(bucket: str, key: str, head: dict[str, Any]) -> dict[str, Any]:
    """The classic S3 event notification (Lambda, SNS, SQS targets)."""
    from urllib.parse import quote_plus

    return {"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-12-01T12:00:00.000Z", "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AWS:EXAMPLE"},
        "requestParameters": {"sourceIPAddress": "1.2.3.4"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "upload",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "EXAMPLE"},
                          "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": quote_plus(key), "size": head["ContentLength"],
                          "eTag": head["ETag"].strip('"'),
                          "versionId": head.get("VersionId", ""),
                          "sequencer": "0A1B2C3D4E5F678901"}}}]}


def kinesis_event(records: list[dict[str, Any]], stream_arn: str) -> dict[str, Any]:
    """GetRecords' records as a Kinesis event source mapping hands them to Lambda."""
    return {"Records": [{
        "kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": r["PartitionKey"],
                    "sequenceNumber": r["SequenceNumber"],
                    "data": base64.b64encode(r["Data"]).decode(),
                    "approximateArrivalTimestamp": r["ApproximateArrivalTimestamp"].timestamp()},
        "eventSource": "aws:kinesis", "eventVersion": "1.0",
        "eventID": f"shardId-000000000000:{r['SequenceNumber']}",
        "eventName": "aws:kinesis:record", "awsRegion": "us-east-1",
        "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambda",
        "eventSourceARN": stream_arn} for r in records]}


@pytest.fixture
def deployment(aws_env: dict[str, str], tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Deployment:
    s3 = aws.client("s3")
    names = Deployment(unique_name("input"), unique_name("output"), unique_name("status"),
                       unique_name("guard"), tmp_path / "data", aws_env)
    for bucket in (names.input_bucket, names.output_bucket):
        s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=names.input_bucket,
                             VersioningConfiguration={"Status": "Enabled"})
    StatusTable(names.status_table)  # the template's table (created here on first use)
    for name, value in names.function_env("SubmitFunction").items():
        monkeypatch.setenv(name, value)
    return names


def upload(d: Deployment, key: str, body: bytes) -> dict[str, Any]:
    s3 = aws.client("s3")
    s3.put_object(Bucket=d.input_bucket, Key=key, Body=body)
    return s3.head_object(Bucket=d.input_bucket, Key=key)


def csv_bytes(tmp_path: Path, rows: list[tuple[str, str, str]]) -> bytes:
    return write_csv(tmp_path / "rows.csv", rows).read_bytes()


