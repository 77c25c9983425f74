"""The Lambda handlers of deploy/lambdas called with real event shapes (EventBridge's S3
"Object Created", the classic S3 notification, a Kinesis event of KPL-aggregated records
read back from a stream, an EventBridge Scheduler input) against moto's S3 and DynamoDB
and kinesalite's Kinesis (realistic 56-digit sequence numbers); the handlers' own log is
an embedded one in the test's directory, each handler's environment read from the
template."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from connectors import aws
from connectors.dynamo_status import StatusTable
from deploy.lambdas import import_file, kinesis, scheduled, status_step, submit
from deploy.lambdas.runtime import BadConfiguration, BadEvent
from tests.aws_server import aws_env, moto_endpoint, unique_name
from tests.deploy_support import (
    Deployment,
    csv_bytes,
    deployment,
    eventbridge_event,
    kinesis_event,
    s3_notification,
    upload,
)
from tests.support import expected_members, random_rows, write_csv

__all__ = ["aws_env", "deployment", "moto_endpoint"]  # fixtures, used by name


def test_submit_guards_double_fires_in_both_event_shapes(deployment: Deployment,
                                                         tmp_path: Path) -> None:
    key = "uploads/team a/list 1.csv"  # a space: URL-encoded in the notification
    head = upload(deployment, key, csv_bytes(tmp_path, [("u1", "vip", "add")]))
    event = eventbridge_event(deployment.input_bucket, key, head)
    first = submit.handler({"event": event, "execution": "exec-1"})
    assert first["duplicate"] is False and first["on_lambda"] is True
    assert (first["size"], first["format"], first["key"]) == (head["ContentLength"], "csv", key)
    assert first["url"] == f"s3://{deployment.input_bucket}/{key}"
    assert first["command"] == ["import", first["url"], "--batch-id", first["batch_id"], "-q"]
    item = StatusTable(deployment.status_table).get(first["batch_id"])
    assert item is not None
    assert (item["status"], item["source"], item["source_position"]) == (
        "submitted", first["url"], -1)
    assert item["step_submit"]["phase"] == "ended"
    assert item["step_submit"]["execution"] == "exec-1"
    # A retry of the same execution (it failed after claiming) goes on.
    assert submit.handler({"event": event, "execution": "exec-1"})["duplicate"] is False
    # A double fire (another execution, or the notification shape of the same version).
    again = submit.handler({"event": event, "execution": "exec-2"})
    assert again["duplicate"] is True and again["batch_id"] == first["batch_id"]
    notified = submit.handler(s3_notification(deployment.input_bucket, key, head))
    assert notified["duplicate"] is True and notified["batch_id"] == first["batch_id"]
    # A new version of the object is a new batch.
    head2 = upload(deployment, key, csv_bytes(tmp_path, [("u2", "vip", "add")]))
    newer = submit.handler(s3_notification(deployment.input_bucket, key, head2))
    assert newer["duplicate"] is False and newer["batch_id"] != first["batch_id"]


@pytest.mark.parametrize(("event", "message"), [
    ("text", "expected an S3 event (a JSON object), got str"),
    ({}, "got an empty object"),
    ({"foo": 1}, "got keys foo"),
    ({"detail-type": "Object Deleted", "source": "aws.s3", "detail": {}},
     "expected source 'aws.s3', detail-type 'Object Created'"),
    ({"detail-type": "Object Created", "source": "aws.s3", "detail": {"bucket": {}}},
     "detail.bucket.name: expected str, got nothing"),
    ({"detail-type": "Object Created", "source": "aws.s3",
      "detail": {"bucket": {"name": "b"}, "object": {"key": "k.csv", "size": "12"}}},
     "detail.object.size '12': expected the object's size in bytes"),
    ({"Records": []}, "S3 notification with 0 records"),
    ({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectRemoved:Delete"}]},
     "eventName 'ObjectRemoved:Delete'"),
])
def test_bad_events_get_one_line_errors(deployment: Deployment, event: Any,
                                        message: str) -> None:
    with pytest.raises(BadEvent, match=message.replace("(", r"\(").replace(")", r"\)")):
        submit.handler(event)


def test_bad_names_and_settings_are_refused(deployment: Deployment, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    head = upload(deployment, "notes.txt", b"user_id\nu1\n")
    with pytest.raises(BadEvent, match=r"notes.txt: unknown format \(extension '.txt'\)"):
        submit.handler(eventbridge_event(deployment.input_bucket, "notes.txt", head))
    monkeypatch.delenv("STREAMS_GUARD_TABLE")
    head = upload(deployment, "a.csv", b"user_id,segment_id\nu1,s\n")
    with pytest.raises(BadConfiguration, match="STREAMS_GUARD_TABLE is not set"):
        submit.handler(eventbridge_event(deployment.input_bucket, "a.csv", head))
    monkeypatch.setenv("STREAMS_LAMBDA_IMPORT_MAX_BYTES", "lots")
    with pytest.raises(BadConfiguration, match="STREAMS_LAMBDA_IMPORT_MAX_BYTES='lots': "
                                               "expected int"):
        submit.handler(eventbridge_event(deployment.input_bucket, "a.csv", head))
    with pytest.raises(BadEvent, match="expected Submit's output"):
        import_file.handler({"url": "s3://b/k"})
    with pytest.raises(BadEvent, match="'phase': one of started, ended, failed"):
        status_step.handler({"step": "import", "phase": "halfway"})


def test_import_on_lambda_then_status_steps(deployment: Deployment, tmp_path: Path) -> None:
    rows = random_rows(300, 50, 3, seed=1)
    head = upload(deployment, "big/list.csv", csv_bytes(tmp_path, rows))
    event = eventbridge_event(deployment.input_bucket, "big/list.csv", head)
    batch = submit.handler({"event": event, "execution": "exec-1"})
    result = import_file.handler(batch)
    assert (result["batch_id"], result["outcome"], result["rows"]) == (
        batch["batch_id"], "published", 300)
    assert sum(result["partition_counts"]) == 300
    # The state machine's retry of the step: the batch is there; nothing is published twice.
    assert import_file.handler(batch)["outcome"] == "resumed"
    state = {"event": event, "batch": batch}
    table = StatusTable(deployment.status_table)
    status_step.handler({"step": "import", "phase": "started", "state": state,
                         "execution": "exec-1"})
    status_step.handler({"step": "import", "phase": "ended", "state": state})
    item = table.get(batch["batch_id"])
    assert item is not None and item["step_import"]["phase"] == "ended"
    # A Lambda error's Cause is JSON: the record keeps its type and message, one line.
    cause = json.dumps({"errorMessage": "s3://b/k: no data rows;\nexpected a header",
                        "errorType": "ImportFailed", "stackTrace": ["..."]})
    failed = status_step.handler({"step": "import", "phase": "failed", "state": {
        **state, "error": {"Error": "ImportFailed", "Cause": cause}}})
    assert failed["error"] == "ImportFailed: s3://b/k: no data rows; expected a header"
    item = table.get(batch["batch_id"])
    assert item is not None
    assert (item["execution_failed_step"], item["execution_error"]) == (
        "import", failed["error"])
    # Submit itself failed (no batch in the state): the batch id comes from the event.
    assert status_step.handler({"step": "submit", "phase": "failed", "state": {
        **event, "error": {"Error": "BadEvent", "Cause": "x"}}})["batch_id"] == \
        batch["batch_id"]
    # No S3 event at all: nothing to record, and the handler says so.
    assert status_step.handler({"step": "submit", "phase": "failed",
                                "state": {"foo": 1}})["recorded"] is False


def _rows_messages(d: Deployment, rows: list[tuple[str, str, str]],
                   tmp_path: Path) -> list[Any]:
    """The audience.rows messages of an import (on an embedded log of their own)."""
    from streams.pipeline import Pipeline
    from streams.settings import Settings
    from topics.spec import ROWS

    pipe = Pipeline(Settings(data_dir=tmp_path / "producer"))
    try:
        path = write_csv(tmp_path / "k.csv", rows)
        pipe.importer().run(pipe.import_request(str(path)))
        return [m for p in pipe.log.partitions(ROWS) for m in pipe.log.read(ROWS, p)]
    finally:
        pipe.close()


@pytest.fixture
def kinesalite(kinesis_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Kinesis clients on kinesalite (realistic sequence numbers; S3 and DynamoDB stay on
    moto)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_KINESIS", kinesis_endpoint)
    return kinesis_endpoint


def _put_aggregated(stream: str, messages: list[Any], poison_after: int) -> list[Any]:
    """Puts the messages as KPL aggregates (one per virtual partition and a few messages),
    with a record that is no message envelope after `poison_after` aggregates, on the
    `kinesalite` fixture's server; returns the stream's records as GetRecords reads them."""
    from aws_kinesis_agg.aggregator import RecordAggregator

    from topics.backends.kinesis.envelope import encode

    assert os.environ.get("AWS_ENDPOINT_URL_KINESIS"), "use the kinesalite fixture"
    client = aws.client("kinesis")
    client.create_stream(StreamName=stream, ShardCount=1)
    client.get_waiter("stream_exists").wait(StreamName=stream)
    blobs: list[tuple[str, bytes]] = []
    for partition in sorted({m.partition for m in messages}):
        aggregator = RecordAggregator(max_size=256 * 1024)
        mine = [m for m in messages if m.partition == partition]
        for i in range(0, len(mine), 2):  # two messages per aggregate
            for m in mine[i:i + 2]:
                aggregator.add_user_record(str(partition), encode(m.partition, m.key, m.value))
            pk, _ehk, data = aggregator.clear_and_get().get_contents()
            blobs.append((pk, data))
    blobs.insert(poison_after, ("9", b"not a message of this project"))
    for pk, data in blobs:  # one by one: the order on the shard is the order here
        client.put_record(StreamName=stream, PartitionKey=pk, Data=data)
    shard = client.list_shards(StreamName=stream)["Shards"][0]["ShardId"]
    iterator = client.get_shard_iterator(StreamName=stream, ShardId=shard,
                                         ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    records = client.get_records(ShardIterator=iterator, Limit=1000)["Records"]
    assert len(records) == len(blobs)
    return records


def test_kinesis_handler_reports_the_poison_record_mid_batch(deployment: Deployment,
                                                             tmp_path: Path,
                                                             kinesalite: str) -> None:
    from processors.segments import AudienceSegments
    from streams.pipeline import Pipeline
    from streams.settings import Settings
    from streams.state.recovery import restore
    from topics.spec import CHANGES

    rows = random_rows(400, 60, 3, seed=7)
    messages = _rows_messages(deployment, rows, tmp_path)
    stream = unique_name("prefix") + ".audience.rows"  # PREFIX + topic, as the template
    records = _put_aggregated(stream, messages, poison_after=3)
    arn = f"arn:aws:kinesis:us-east-1:123456789012:stream/{stream}"
    poison = records[3]["SequenceNumber"]
    event = kinesis_event(records, arn)

    def members() -> tuple[set[tuple[str, str]], int]:
        """The processor's state as its changelog holds it (its input is on Kinesis, not on
        this log), and the changes it emitted."""
        segments = AudienceSegments()
        pipe = Pipeline(Settings(data_dir=deployment.data_dir))
        try:
            table: dict[str, Any] = {}
            for p in pipe.log.partitions(segments.input_topic):
                store, _tail = restore(pipe.log, segments.changelog_topic, p, segments.tables,
                                       pipe.snapshots)
                table.update(store.data["members"])
            changes = sum(1 for p in pipe.log.partitions(CHANGES)
                          for _ in pipe.log.read(CHANGES, p))
        finally:
            pipe.close()
        return {(s, u) for u, ms in table.items() for s, _b in ms}, changes

    # The batch: the records before the poison are applied, the response names the poison.
    assert kinesis.handler(event) == {"batchItemFailures": [{"itemIdentifier": poison}]}
    before, _ = members()
    assert before  # the first three aggregates' rows
    # Lambda retries from the poison: it fails again, nothing after it is applied.
    retry = kinesis_event(records[3:], arn)
    assert kinesis.handler(retry) == {"batchItemFailures": [{"itemIdentifier": poison}]}
    assert members()[0] == before
    # Retries exhausted, the mapping goes on after it (the poison's metadata to the
    # on-failure destination): every row is applied.
    assert kinesis.handler(kinesis_event(records[4:], arn)) == {"batchItemFailures": []}
    after, changes = members()
    assert after == expected_members([("add", rows)])
    # The whole batch again (a re-delivery): the stamps skip it, no change is emitted twice.
    assert kinesis.handler(event) == {"batchItemFailures": [{"itemIdentifier": poison}]}
    assert members() == (after, changes)


def test_kinesis_handler_refuses_other_events(deployment: Deployment) -> None:
    assert kinesis.handler({"Records": []}) == {"batchItemFailures": []}
    with pytest.raises(BadEvent, match="expected a Kinesis event"):
        kinesis.handler({"detail": {}})
    record = {"kinesis": {"sequenceNumber": "1", "data": "eA=="},
              "eventSourceARN": "arn:aws:kinesis:us-east-1:1:stream/other"}
    with pytest.raises(BadEvent, match=r"eventSourceARN .*: expected a Kinesis stream named"):
        kinesis.handler({"Records": [record]})


def test_scheduled_reimport_and_bad_jobs(deployment: Deployment, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    key = "nightly/vip.csv"
    upload(deployment, key, csv_bytes(tmp_path, [("u1", "vip", "add"), ("u2", "vip", "add")]))
    job = {"job": "reimport", "url": f"s3://{deployment.input_bucket}/{key}", "mode": "replace"}
    first = scheduled.handler(job)  # EventBridge Scheduler delivers the schedule's Input
    assert (first["outcome"], first["rows"]) == ("published", 2)
    again = scheduled.handler(job)  # the list unchanged: the same batch, no row again
    # (resumed: no worker has closed it yet here, so only its end markers are re-sent)
    assert (again["batch_id"], again["outcome"]) == (first["batch_id"], "resumed")
    rule_event = {"version": "0", "id": "x", "detail-type": "Scheduled Event",
                  "source": "aws.events", "account": "123456789012",
                  "time": "2026-12-01T03:00:00Z", "region": "us-east-1",
                  "resources": ["arn:aws:events:us-east-1:123456789012:rule/nightly"],
                  "detail": {}}
    with pytest.raises(BadEvent, match="a scheduled rule's event names no job"):
        scheduled.handler(rule_event)
    monkeypatch.setenv("STREAMS_SCHEDULED_JOB", json.dumps(job))
    assert scheduled.handler(rule_event)["batch_id"] == first["batch_id"]
    with pytest.raises(BadEvent, match="job 'compact': expected an object with 'job' one of"):
        scheduled.handler({"job": "compact"})
    with pytest.raises(BadEvent, match=r"reimport: url .file\.csv.: expected s3://"):
        scheduled.handler({"job": "reimport", "url": "file.csv"})
    replayed = scheduled.handler({"job": "replay", "from": "earliest"})
    assert replayed["job"] == "replay" and "replayed from earliest" in replayed["report"]


class _FailingProducer:
    """A producer whose sends fail once `allowed[0]` sends are used up (the log becomes
    unreachable part-way)."""

    def __init__(self, inner: Any, allowed: list[float]):
        self.inner, self.allowed = inner, allowed

    def send(self, *args: Any, **kwargs: Any) -> None:
        if self.allowed[0] <= 0:
            raise ConnectionError("the log is unreachable")
        self.allowed[0] -= 1
        self.inner.send(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("allowed", [0, 6])  # from the start, or mid-batch
def test_kinesis_handler_retries_the_whole_batch_when_the_log_fails(
        deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        allowed: int, kinesalite: str) -> None:
    """Writes of the changelog or outputs failing: the response names the batch's first
    record (nothing of it may count as done), and the retry applies every row once."""
    from processors.segments import AudienceSegments
    from streams.pipeline import Pipeline
    from streams.settings import Settings
    from streams.state.recovery import restore

    rows = random_rows(200, 30, 2, seed=5)
    stream = unique_name("prefix") + ".audience.rows"
    records = _put_aggregated(stream, _rows_messages(deployment, rows, tmp_path),
                              poison_after=0)[1:]  # no poison this time
    event = kinesis_event(records, f"arn:aws:kinesis:us-east-1:123456789012:stream/{stream}")
    budget: list[float] = [allowed]
    pipe = Pipeline(Settings(data_dir=deployment.data_dir))
    real = pipe.log.producer
    monkeypatch.setattr(pipe.log, "producer", lambda: _FailingProducer(real(), budget))
    try:
        first = records[0]["SequenceNumber"]
        response = kinesis.run_batch(pipe, AudienceSegments(), event["Records"])
        assert response == {"batchItemFailures": [{"itemIdentifier": first}]}
        budget[0] = float("inf")
        assert kinesis.run_batch(pipe, AudienceSegments(), event["Records"]) == {
            "batchItemFailures": []}
        segments, table = AudienceSegments(), {}
        for p in pipe.log.partitions(segments.input_topic):
            store, _tail = restore(pipe.log, segments.changelog_topic, p, segments.tables,
                                   pipe.snapshots)
            table.update(store.data["members"])
    finally:
        pipe.close()
    assert {(s, u) for u, ms in table.items() for s, _b in ms} == expected_members(
        [("add", rows)])


def test_kinesis_handler_runs_the_pipeline_processor_on_its_events_stream(
        deployment: Deployment, tmp_path: Path, kinesalite: str) -> None:
    """pipeline.events on Lambda: the batch table folded from its events, as a worker of
    the pipeline role does."""
    from processors.pipeline_state import PipelineState
    from streams.pipeline import Pipeline
    from streams.settings import Settings
    from streams.state.recovery import restore
    from topics.spec import EVENTS

    producer = Pipeline(Settings(data_dir=tmp_path / "producer"))
    try:
        path = write_csv(tmp_path / "k.csv", random_rows(50, 10, 2, seed=9))
        result = producer.importer().run(producer.import_request(str(path)))
        events = [m for p in producer.log.partitions(EVENTS)
                  for m in producer.log.read(EVENTS, p)]
    finally:
        producer.close()
    stream = unique_name("prefix") + ".pipeline.events"
    records = _put_aggregated(stream, events, poison_after=0)[1:]
    event = kinesis_event(records, f"arn:aws:kinesis:us-east-1:123456789012:stream/{stream}")
    assert kinesis.handler(event) == {"batchItemFailures": []}
    pipe = Pipeline(Settings(data_dir=deployment.data_dir))
    try:
        state = PipelineState()
        batches: dict[str, Any] = {}
        for p in pipe.log.partitions(state.input_topic):
            store, _tail = restore(pipe.log, state.changelog_topic, p, state.tables,
                                   pipe.snapshots)
            batches.update(store.data["batches"])
    finally:
        pipe.close()
    status = batches[result.batch_id]
    assert (status.status, status.rows) == ("published", 50)
