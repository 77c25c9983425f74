"""Throughput of the Kinesis backend's producer and lease consumer on kinesalite.

    python -m tests.bench_kinesis [--shards N]

Starts kinesalite and a moto server (the lease table) of its own, then for each shape
(100k x 200 B; 200 x 150 KB, the packed messages the pipeline sends) produces to a topic of
8 virtual partitions and flushes, then consumes it all with one consumer. Not a test: run by
hand.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import uuid
from collections.abc import Iterator

from tests.kinesis_server import kinesalite, kinesis_env_for
from tests.ports import free_port
from topics.backends import open_log
from topics.backends.kinesis.log import KinesisLog
from topics.spec import TopicSpec

SHAPES = ((100_000, 200), (200, 150_000))


class Null:
    def on_assigned(self, tps: object) -> None: ...

    def on_revoked(self, tps: object) -> None: ...


@contextlib.contextmanager
def servers() -> Iterator[None]:
    from moto.server import ThreadedMotoServer

    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    try:
        with kinesalite() as (kinesis, _pid):
            os.environ.update(kinesis_env_for(kinesis, f"http://127.0.0.1:{moto_port}"))
            yield
    finally:
        moto.stop()


def measure(shards: int, count: int, size: int) -> None:
    log = open_log("kinesis://", kinesis_prefix=f"b{uuid.uuid4().hex[:6]}.",
                   kinesis_shards=shards)
    assert isinstance(log, KinesisLog)
    log.ensure_topics([TopicSpec("t", 8, ("X",))])
    producer = log.producer()
    value = b"x" * size
    started = time.monotonic()
    for i in range(count):
        producer.send("t", i % 8, value)
    producer.flush()
    took = time.monotonic() - started
    print(f"{count:>7} x {size:>7} B  produce {count / took:>9,.0f} msg/s "
          f"{count * size / took / 1e6:6.1f} MB/s ({producer.calls} PutRecords)")
    consumer = log.consumer("bench", ["t"], Null(), "m")
    started, got = time.monotonic(), 0
    while got < count:
        got += len(consumer.poll(5000, 0.1))
    took = time.monotonic() - started
    print(f"{'':>19}  consume {count / took:>9,.0f} msg/s {count * size / took / 1e6:6.1f} MB/s")
    log.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    with servers():
        for count, size in SHAPES:
            measure(args.shards, count, size)


if __name__ == "__main__":
    main()
