"""A processor on Lambda, fed by a Kinesis event source mapping.

Each record is deaggregated (KPL aggregates, aws-kinesis-agg), each sub-record's data is
the project's message envelope (topics/backends/kinesis/envelope.py: virtual partition, key,
value), and the messages run through the project's ProcessorTask on a pushed consumer,
in order. The processor is the one whose input topic the stream carries (the stream's name
ends with the topic's name: `audience.rows` -> segments, `pipeline.events` -> pipeline).

Partial batch response (the mapping's FunctionResponseTypes: ReportBatchItemFailures): the
records before the first one that cannot be processed are checkpointed (outputs, then the
changelog with its stamp), and the response names that record's sequence number, so Lambda
retries from it; the retried records already applied are skipped by their stamps. A failure
inside a KPL aggregate names the aggregate: its sub-records are all retried, those applied
skipped. An error of the log under the task (the changelog or output stream unreachable)
names the batch's first record: nothing more is made durable, as after a crash. A processor's
own error on a message is not a failed record: ProcessorTask dead-letters it (as on every
backend). A failed record is data that is no message envelope or no project value (another
producer wrote it).

Positions: (sequence number, sub-sequence number) as one integer, sequence * 2**32 + sub.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from deploy.lambdas.pushed_consumer import PushedLog
from deploy.lambdas.runtime import BadEvent, pipeline, settings
from topics.backends.kinesis.envelope import decode as decode_envelope
from topics.backends.kinesis.positions import pack, shard_index
from topics.codec import decode as decode_value
from topics.log import Message

log_ = logging.getLogger(__name__)
def position_of(event_id: str, sequence: str, sub: int) -> int:
    """The Kinesis backend's position of a sub-record (topics/backends/kinesis/positions.py:
    shard index, sequence, sub-sequence), so state written here and by `streams worker
    --backend kinesis` stamps the same inputs alike. The event id is `<shard id>:<seq>`."""
    shard = event_id.partition(":")[0]
    try:
        return pack(shard_index(shard), int(sequence), sub)
    except ValueError as exc:
        raise BadEvent(f"Kinesis record {event_id!r}: {exc}") from None


def handler(event: Any, context: Any = None) -> dict[str, Any]:
    records = _records(event)
    if not records:
        return {"batchItemFailures": []}
    processor = processor_for(records[0].get("eventSourceARN", ""))
    chosen = settings()
    with pipeline(chosen) as pipe:
        return run_batch(pipe, processor, records)


def run_batch(pipe: Any, processor: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    from streams.outputs import OutputWriter
    from streams.pipeline import group_of
    from streams.processor_task import ProcessorTask, SnapshotPolicy

    s = pipe.settings
    log = PushedLog(pipe.log)
    task = ProcessorTask(log, processor, OutputWriter(pipe.log, pipe.log.producer()),
                         group_of(processor.name), "lambda",
                         checkpoint_interval_s=s.checkpoint_interval_s,
                         snapshots=pipe.snapshots,
                         snapshot_policy=SnapshotPolicy(s.snapshot_bytes,
                                                        s.snapshot_interval_s))
    consumer = log.pushed
    assert consumer is not None
    first = records[0]["kinesis"]["sequenceNumber"]
    failed: str | None = None
    try:
        for record in records:
            sequence = record["kinesis"]["sequenceNumber"]
            try:
                messages = _messages(record, processor.input_topic)
            except Exception as exc:  # no message of the project: nothing of it was applied
                log_.error("record %s of %s: %s: %s; reporting it as failed (Lambda retries "
                           "from it)", sequence, processor.input_topic,
                           type(exc).__name__, exc)
                failed = sequence
                break
            try:
                for message in messages:
                    consumer.push(message)
                    task.step(max_messages=1, timeout_s=0.0)
            except Exception as exc:
                # The log failed under the task: what it holds in memory may include part
                # of a message, so nothing more is made durable here (as after a crash);
                # the whole batch is retried, its durable part skipped by the stamps.
                log_.error("record %s of %s: %s: %s; the whole batch is retried", sequence,
                           processor.input_topic, type(exc).__name__, exc)
                return {"batchItemFailures": [{"itemIdentifier": first}]}
        try:
            task.checkpoint()
        except Exception as exc:
            log_.error("checkpoint failed (%s: %s): the whole batch is retried",
                       type(exc).__name__, exc)
            failed = first
    finally:
        task.close()
    return {"batchItemFailures": [] if failed is None else [{"itemIdentifier": failed}]}


def _messages(record: dict[str, Any], topic: str) -> list[Message]:
    """The messages of one Kinesis record (one, or a KPL aggregate's sub-records), decoded
    up front: a record is processed whole or reported whole."""
    from aws_kinesis_agg.deaggregator import iter_deaggregate_records

    kinesis = record["kinesis"]
    arrival = int(float(kinesis.get("approximateArrivalTimestamp") or 0) * 1000)
    out = []
    for sub in iter_deaggregate_records([record]):
        data = base64.b64decode(sub["kinesis"]["data"])
        envelope = decode_envelope(data)
        decode_value(envelope.value)  # a value of no known schema fails here, not mid-fold
        position = position_of(str(record.get("eventID", "")), kinesis["sequenceNumber"],
                               int(sub["kinesis"].get("subSequenceNumber") or 0))
        out.append(Message(topic, envelope.partition, position, envelope.value, envelope.key,
                           arrival))
    return out


def _records(event: Any) -> list[dict[str, Any]]:
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list):
        raise BadEvent("expected a Kinesis event: an object with 'Records'")
    for i, record in enumerate(records):
        kinesis = record.get("kinesis") if isinstance(record, dict) else None
        if not isinstance(kinesis, dict) or not isinstance(kinesis.get("sequenceNumber"), str) \
                or not isinstance(kinesis.get("data"), str | bytes):
            raise BadEvent(f"Records[{i}]: expected a Kinesis record with kinesis.sequenceNumber"
                           " and kinesis.data (eventSource aws:kinesis)")
    return records


def processor_for(source_arn: str) -> Any:
    """The processor whose input topic the stream of this ARN carries."""
    from processors.pipeline_state import PipelineState
    from processors.segments import AudienceSegments

    stream = source_arn.rsplit("/", 1)[-1] if ":stream/" in source_arn else ""
    for processor in (AudienceSegments(), PipelineState()):
        if stream and stream.endswith(processor.input_topic):
            return processor
    raise BadEvent(f"eventSourceARN {source_arn!r}: expected a Kinesis stream named after a "
                   "processor's input topic (audience.rows, pipeline.events, optionally "
                   "with a prefix)")
