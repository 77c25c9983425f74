"""Throughput of the Kafka backend's producer, group consumer and reader on Tansu.

    python -m tests.bench_kafka [--linger-ms N] [--batch-size N]

Starts a broker of its own, then for each shape (100k x 200 B; 200 x 150 KB, the packed
messages the pipeline sends) produces to a 4-partition topic and flushes, consumes it all
with a group consumer, and reads every partition with `Log.read`. Not a test: run by hand.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.kafka_broker import GROUP_TIMEOUTS, tansu, unique
from topics.backends import open_log
from topics.backends.kafka.log import KafkaLog
from topics.spec import TopicSpec

SHAPES = ((100_000, 200), (200, 150_000))


class Null:
    def on_assigned(self, tps: object) -> None: ...

    def on_revoked(self, tps: object) -> None: ...


def bench(log: KafkaLog, count: int, size: int) -> dict[str, float]:
    topic = unique("bench")
    log.ensure_topics([TopicSpec(topic, 4, ("X",))])
    payload = b"x" * size
    producer = log.producer()
    started = time.perf_counter()
    for i in range(count):
        producer.send(topic, i % 4, payload, b"user-%d" % i)
    producer.flush()
    produce_s = time.perf_counter() - started

    consumer = log.consumer(unique("g"), [topic], Null(), member="bench")
    seen = 0
    while not consumer.assignment():  # the join is not what is measured
        seen += len(consumer.poll(1000, 0.05))
    started = time.perf_counter()
    while seen < count:
        seen += len(consumer.poll(1000, 0.05))
    consume_s = time.perf_counter() - started
    consumer.close()

    started = time.perf_counter()
    read = sum(1 for p in range(4) for _ in log.read(topic, p))
    read_s = time.perf_counter() - started
    assert read == count
    return {"produce": count / produce_s, "consume": count / consume_s, "read": count / read_s,
            "produce_mb": count * size / produce_s / 1e6,
            "consume_mb": count * size / consume_s / 1e6,
            "read_mb": count * size / read_s / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--linger-ms", default=None)
    parser.add_argument("--batch-size", default=None)
    args = parser.parse_args()
    options = {k: v for k, v in (("linger_ms", args.linger_ms),
                                 ("batch_size", args.batch_size)) if v is not None}
    with tempfile.TemporaryDirectory() as tmp, tansu(Path(tmp)) as bootstrap:
        log = open_log(f"kafka://{bootstrap}", kafka_options=options, **GROUP_TIMEOUTS)
        assert isinstance(log, KafkaLog)
        try:
            for count, size in SHAPES:
                r = bench(log, count, size)
                print(f"{count:>7,} x {size:>7,} B  produce {r['produce']:>9,.0f}/s "
                      f"({r['produce_mb']:6.1f} MB/s)  consume {r['consume']:>9,.0f}/s "
                      f"({r['consume_mb']:6.1f} MB/s)  read {r['read']:>9,.0f}/s "
                      f"({r['read_mb']:6.1f} MB/s)", flush=True)
        finally:
            log.close()


if __name__ == "__main__":
    main()
