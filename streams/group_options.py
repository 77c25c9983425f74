"""The options of the `streams` group: declared once here, used by the group and copied
onto every subcommand (streams/cli.py). Each is also a setting (streams/settings.py): an
environment variable STREAMS_<NAME> and a key of the config file."""

from __future__ import annotations

from typing import Any

import click

# (flags, settings) of every group option: declared once, used by the group and copied
# onto every subcommand.
GROUP_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--data-dir",), dict(type=click.Path(file_okay=False), default=".streams",
                          help="Where the embedded log, the local object store and the "
                               "warehouse live.")),
    (("--backend",), dict(type=click.Choice(["embedded", "kafka", "kinesis"]),
                          default="embedded")),
    (("--bootstrap",), dict(default="", help="Kafka bootstrap servers, host:port[,...].")),
    (("--s3-format",), dict(type=click.Choice(["parquet", "avro", "jsonl"]), default="parquet",
                           help="Format of the objects the S3 sink writes.")),
    (("--s3-root",), dict(type=click.Path(file_okay=False), default=None,
                         help="Object store root: s3://BUCKET/PREFIX, file:///PATH or a "
                              "path [default: DATA_DIR/s3].")),
    (("--warehouse",), dict(default=None,
                           help="A DuckDB file or duckdb:///PATH, postgresql://... or "
                                "redshift://... [default: DATA_DIR/warehouse.duckdb].")),
    (("--warehouse-max-connections",), dict(type=click.IntRange(1), default=2,
                                           help="PostgreSQL/Redshift: connections per worker "
                                                "(the pool's bound).")),
    (("--warehouse-iam-role",), dict(default="",
                                    help="Redshift: IAM role ARN its COPY reads the S3 "
                                         "sink's objects with.")),
    (("--warehouse-s3-wait-s",), dict(type=click.FloatRange(0), default=600.0,
                                     help="Redshift: how long a merge waits for the S3 sink "
                                          "to close the partition it COPYs.")),
    (("--warehouse-threads",), dict(type=click.IntRange(1), default=1,
                                   help="DuckDB threads of the warehouse sink: its merges are "
                                        "per (batch, partition) and leave the other cores to "
                                        "the processors.")),
    (("--warehouse-memory-limit",), dict(default="",
                                        help="DuckDB memory_limit, e.g. 256MB [default: "
                                             "DuckDB's, 80% of RAM].")),
    (("--warehouse-lock-timeout-s",), dict(type=float, default=600.0,
                                          help="How long to wait for the warehouse while "
                                               "another process holds it.")),
    (("--s3-prefix",), dict(default="audience/segment-changes",
                           help="Key prefix of the S3 sink's objects.")),
    (("--message-rows",), dict(type=click.IntRange(1, 100_000), default=5000,
                              help="Rows packed into one message on the rows topic.")),
    (("--chunk-rows",), dict(type=click.IntRange(1), default=100_000,
                            help="Rows per object the S3 sink writes (and per warehouse "
                                 "staging load).")),
    (("--checkpoint-interval-s",), dict(type=click.FloatRange(0.01), default=1.0,
                                       help="Longest time between processor checkpoints.")),
    (("--state-root",), dict(type=click.Path(file_okay=False), default=None,
                            help="Where partition state snapshots go, as --s3-root "
                                 "[default: DATA_DIR/state].")),
    (("--snapshot-bytes",), dict(type=click.IntRange(1), default=64 << 20,
                                help="Changelog bytes of a partition between state "
                                     "snapshots.")),
    (("--snapshot-interval-s",), dict(type=click.FloatRange(0.01), default=3600.0,
                                     help="Longest time between state snapshots of a "
                                          "partition that changed (keep it well under the "
                                          "changelog's retention).")),
    (("--embedded-session-timeout-ms",), dict(type=click.IntRange(100), default=10_000,
                                             help="Embedded log: a worker silent this long "
                                                  "(paused, stalled) loses its partitions.")),
    (("--kafka-option",), dict(multiple=True, metavar="KEY=VALUE",
                              help="A kafka-python client setting (repeatable), e.g. "
                                   "linger.ms=5.")),
    (("--kafka-session-timeout-ms",), dict(type=int, default=None,
                                          help="Consumer group session timeout [default: "
                                               "Kafka's].")),
    (("--kafka-heartbeat-interval-ms",), dict(type=int, default=None,
                                             help="Consumer group heartbeat interval "
                                                  "[default: Kafka's].")),
    (("--kafka-max-poll-interval-ms",), dict(type=int, default=None,
                                            help="Longest time between polls before a member "
                                                 "is dropped [default: Kafka's].")),
    (("--kafka-replication-factor",), dict(type=int, default=1,
                                          help="Replication factor of topics the pipeline "
                                               "creates.")),
    (("--kafka-max-request-size",), dict(type=int, default=1 << 20,
                                        help="Largest message the producer sends: rows are "
                                             "packed under it, a row too big on its own is "
                                             "dead-lettered.")),
    (("--kinesis-prefix",), dict(default="", help="Kinesis: stream name = prefix + topic.")),
    (("--kinesis-lease-table",), dict(default="streams-leases",
                                     help="Kinesis: DynamoDB lease tables are named "
                                          "<this>.<group>.")),
    (("--kinesis-failover-ms",), dict(type=click.IntRange(100), default=10_000,
                                     help="Kinesis: a lease unrenewed this long is taken by "
                                          "another worker.")),
    (("--kinesis-shards",), dict(type=click.IntRange(0), default=0,
                                help="Kinesis: shards of a new stream [default 0: one per "
                                     "virtual partition].")),
    (("--kinesis-on-demand/--no-kinesis-on-demand",), dict(
        default=False, help="Kinesis: create streams in on-demand capacity mode.")),
    (("--status-table",), dict(default="",
                              help="DynamoDB table mirroring the batch table (created on "
                                   "first use) [default: none].")),
    (("--guard-table",), dict(default="",
                             help="Deployment: DynamoDB table of the triggers' double-fire "
                                  "guard (created on first use).")),
    (("--lambda-import-max-bytes",), dict(type=click.IntRange(0), default=256 << 20,
                                         help="Deployment: files up to this size are "
                                              "imported on Lambda, larger on Fargate.")),
    (("--fsync/--no-fsync",), dict(default=False,
                                   help="fsync the embedded log on every flush (survives "
                                        "power loss, slower).")),
    (("--metrics-port",), dict(type=click.IntRange(0, 65535), default=None,
                              help="Serve Prometheus /metrics, /healthz and /readyz on this "
                                   "port (worker, run) [default: off].")),
    (("--log-format",), dict(type=click.Choice(["human", "json"]), default="human",
                            help="Log lines for people, or one JSON object per line.")),
    (("--alert-webhook",), dict(default="", metavar="URL",
                               help="Slack-compatible webhook for failed and late batches "
                                    "(worker, run) [default: none].")),
    (("--batch-deadline",), dict(default="", metavar="DURATION",
                                help="Alert when a batch is still open this long after it "
                                     "was submitted, e.g. 30m [default: never].")),
    (("-v", "--verbose"), dict(count=True, help="More logging (-v info, -vv debug).")),
]
