"""Settings: one name each, given as a flag (--data-dir), an environment variable
(STREAMS_DATA_DIR) or a key in a TOML config file (data_dir), in that order of precedence.
The CLI reads flags and variables through click; this module holds the defaults, the
config-file loading and the derived paths."""

from __future__ import annotations

import difflib
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "STREAMS"
CONFIG_ENV = "STREAMS_CONFIG"
DEFAULT_CONFIG = "streams.toml"
# DuckDB's memory_limit: a number and a unit (1000^i or 1024^i), or a share of the RAM.
_MEMORY = re.compile(r"^\s*\d+(\.\d+)?\s*(%|b|bytes|[kmgt]i?b)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(".streams")
    backend: str = "embedded"  # embedded | kafka | kinesis
    bootstrap: str = ""  # kafka: host:port[,host:port]
    s3_format: str = "parquet"  # avro | jsonl | parquet
    # Object store root: s3://bucket/prefix, file:///path or a path; default <data_dir>/s3.
    # A string, not a Path: Path("s3://b/p") would fold the "//".
    s3_root: str | None = None
    s3_prefix: str = "audience/segment-changes"
    # A DuckDB path or duckdb:///path (default <data_dir>/warehouse.duckdb),
    # postgresql://... or redshift://... (connectors/warehouses).
    warehouse: str | None = None
    # PostgreSQL / Redshift: connections per worker process (its pool's bound).
    warehouse_max_connections: int = 2
    # Redshift: the IAM role its COPY reads the S3 sink's objects with.
    warehouse_iam_role: str = ""
    # Redshift: how long a merge waits for the S3 sink to close the partition it COPYs.
    warehouse_s3_wait_s: float = 600.0
    warehouse_threads: int = 1
    warehouse_memory_limit: str = ""  # DuckDB's memory_limit; "" keeps DuckDB's default
    max_rejects: str = "1%"
    message_rows: int = 5000
    chunk_rows: int = 100_000
    fsync: bool = False
    checkpoint_interval_s: float = 1.0
    # State snapshots (restore = newest snapshot + changelog tail): where, and how often.
    state_root: str | None = None  # as s3_root; default <data_dir>/state
    snapshot_bytes: int = 64 << 20  # changelog bytes of a partition between snapshots
    snapshot_interval_s: float = 3600.0  # or this long, whichever comes first
    # Embedded log: a member whose heartbeat is older than this loses its partitions.
    embedded_session_timeout_ms: int = 10_000
    # Kafka: client settings pass through as KEY=VALUE; None keeps Kafka's own defaults.
    kafka_option: tuple[str, ...] = ()
    kafka_session_timeout_ms: int | None = None
    kafka_heartbeat_interval_ms: int | None = None
    kafka_max_poll_interval_ms: int | None = None
    kafka_replication_factor: int = 1
    kafka_max_request_size: int = 1 << 20
    # How long a process waits for the warehouse while another process holds DuckDB's
    # one-writer lock (two runs side by side, a run beside a worker of the warehouse role).
    warehouse_lock_timeout_s: float = 600.0
    # Kinesis: stream name prefix, lease tables ("<table>.<group>"), failover, new streams'
    # shards (0: one per virtual partition) or on-demand capacity.
    kinesis_prefix: str = ""
    kinesis_lease_table: str = "streams-leases"
    kinesis_failover_ms: int = 10_000
    kinesis_shards: int = 0
    kinesis_on_demand: bool = False
    # DynamoDB table mirroring the batch table ("" = none): the status-table role.
    status_table: str = ""
    # Operating it (streams/operations.py): Prometheus metrics on this port (None = off),
    # the log format, alerts to a Slack-compatible webhook, and how long a batch may stay open.
    metrics_port: int | None = None
    log_format: str = "human"  # human | json
    alert_webhook: str = ""
    batch_deadline: str = ""  # a duration (90s, 15m, 2h); "" = no deadline alerts
    # Deployment (deploy/lambdas): the triggers' double-fire guard table, and the largest
    # file the Submit step sends to the import on Lambda (larger ones go to a Fargate task).
    guard_table: str = ""
    lambda_import_max_bytes: int = 256 << 20

    def problems(self) -> list[str]:
        """What is wrong with these settings, each naming the setting and what was
        expected; checked before anything is published."""
        found = []
        if self.warehouse_memory_limit and not _MEMORY.match(self.warehouse_memory_limit):
            found.append(f"--warehouse-memory-limit {self.warehouse_memory_limit!r}: expected "
                         "a size such as 256MB, 1.5GB, 2GiB, or a share of the RAM such as 50%")
        if self.backend == "kafka" and not self.bootstrap.strip():
            found.append("--backend kafka needs --bootstrap HOST:PORT[,...]")
        for item in self.kafka_option:
            try:
                _key_value(item)
            except ValueError as exc:
                found.append(str(exc))
        try:
            self.warehouse_dialect  # noqa: B018 (raises for an unknown scheme)
        except ValueError as exc:
            found.append(str(exc))
        if self.warehouse_max_connections < 1:
            found.append(f"--warehouse-max-connections {self.warehouse_max_connections}: "
                         "expected 1 or more")
        for flag, root in (("--s3-root", self.s3_root), ("--state-root", self.state_root)):
            text = str(root or "")
            if text.startswith("s3://") and not text[5:].split("/", 1)[0]:
                found.append(f"{flag} {text!r}: expected s3://BUCKET[/PREFIX]")
            elif "://" in text and not text.startswith(("s3://", "file://")):
                found.append(f"{flag} {text!r}: expected s3://BUCKET[/PREFIX], "
                             "file:///PATH or a local path")
        if self.batch_deadline:
            from streams.alerts import parse_duration

            try:
                parse_duration(self.batch_deadline)
            except ValueError as exc:
                found.append(str(exc))
        if self.alert_webhook and not self.alert_webhook.startswith(("http://", "https://")):
            found.append("--alert-webhook: expected an http:// or https:// URL")
        if self.warehouse_lock_timeout_s < 0:
            found.append(f"--warehouse-lock-timeout-s {self.warehouse_lock_timeout_s}: "
                         "expected 0 or more seconds")
        return found

    def check_data_dir(self) -> None:
        """Raises ValueError naming --data-dir unless it is (or can be made) a directory
        this process can write to."""
        where = self.data_dir
        try:
            where.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=where, prefix=".probe-"):
                pass
            for sub in ("log", "spool"):
                inner = where / sub
                if inner.exists() and not os.access(inner, os.W_OK | os.X_OK):
                    raise PermissionError(13, "Permission denied", str(inner))
        except FileExistsError:
            raise ValueError(f"--data-dir {where}: is a file; expected a directory") from None
        except OSError as exc:
            owner = _owner(where)
            raise ValueError(
                f"--data-dir {where}: cannot write there ({exc.strerror}{owner}); expected a "
                "directory this user can write to") from None

    @property
    def log_url(self) -> str:
        if self.backend == "embedded":
            return f"embedded://{self.data_dir.resolve() / 'log'}"
        if self.backend == "kafka":
            return f"kafka://{self.bootstrap}"
        if self.backend == "kinesis":
            return "kinesis://"
        raise ValueError(f"--backend {self.backend!r}: expected embedded, kafka or kinesis")

    def log_options(self) -> dict[str, Any]:
        """Options for `open_log`: each backend takes the ones it knows."""
        options: dict[str, Any] = {
            "fsync": self.fsync,
            "embedded_session_timeout_ms": self.embedded_session_timeout_ms,
            "kafka_options": dict(_key_value(item) for item in self.kafka_option),
            "session_timeout_ms": self.kafka_session_timeout_ms,
            "heartbeat_interval_ms": self.kafka_heartbeat_interval_ms,
            "max_poll_interval_ms": self.kafka_max_poll_interval_ms,
            "replication_factor": self.kafka_replication_factor,
            "max_request_size": self.kafka_max_request_size,
            "kinesis_prefix": self.kinesis_prefix,
            "kinesis_lease_table": self.kinesis_lease_table,
            "kinesis_failover_ms": self.kinesis_failover_ms,
            "kinesis_shards": self.kinesis_shards,
            "kinesis_on_demand": self.kinesis_on_demand,
        }
        return {k: v for k, v in options.items() if v is not None}

    @property
    def object_root(self) -> str:
        """The S3 sink's store: a URL or a local path (connectors.object_store.open_store)."""
        return str(self.s3_root or self.data_dir / "s3")

    @property
    def state_url(self) -> str:
        """Where state snapshots go, as object_root."""
        return str(self.state_root or self.data_dir / "state")

    @property
    def state_path(self) -> Path:
        """The local snapshot directory (for a state_root that is a local path)."""
        return Path(self.state_root) if self.state_root else self.data_dir / "state"

    @property
    def warehouse_url(self) -> str:
        return self.warehouse or str(self.data_dir / "warehouse.duckdb")

    @property
    def warehouse_dialect(self) -> str:
        from connectors.warehouses import dialect_of

        return dialect_of(self.warehouse_url)

    @property
    def warehouse_path(self) -> Path:
        """The DuckDB file (with the DuckDB dialect)."""
        from connectors.warehouses import duckdb_path

        return duckdb_path(self.warehouse_url)

    def warehouse_options(self) -> dict[str, Any]:
        """Constructor options of a server warehouse (PostgreSQL, Redshift)."""
        options: dict[str, Any] = {"max_connections": self.warehouse_max_connections}
        if self.warehouse_dialect == "redshift":
            # By convention the warehouse reads the S3 sink's objects where it writes them.
            options.update(s3_root=str(self.s3_root or ""), prefix=self.s3_prefix,
                           fmt=self.s3_format, iam_role=self.warehouse_iam_role,
                           s3_wait_s=self.warehouse_s3_wait_s)
        return options

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    def to_env(self) -> dict[str, str]:
        """These settings as the environment variables the CLI reads (for child workers)."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                value = "1" if value else "0"
            elif isinstance(value, tuple):  # a repeatable option: space-separated for click
                value = " ".join(value)
            env[f"{ENV_PREFIX}_{f.name.upper()}"] = str(value)
        return env

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> Settings:
        """The settings from STREAMS_* variables alone (a Lambda handler has no command line);
        ValueError naming the variable when one does not parse."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f"{ENV_PREFIX}_{f.name.upper()}"
            if name not in environ:
                continue
            text, kind = environ[name], str(f.type)
            try:
                if "bool" in kind:
                    if text.lower() not in ("1", "0", "true", "false", "yes", "no", ""):
                        raise ValueError(text)
                    values[f.name] = text.lower() in ("1", "true", "yes")
                elif "tuple" in kind:
                    values[f.name] = tuple(text.split())
                elif "int" in kind:
                    values[f.name] = int(text) if text else None
                elif "float" in kind:
                    values[f.name] = float(text)
                else:
                    values[f.name] = text
            except ValueError:
                raise ValueError(f"{name}={text!r}: expected {kind.replace(' | None', '')}"
                                 ) from None
        return cls.build(values)

    @classmethod
    def build(cls, values: dict[str, Any]) -> Settings:
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if value is None or name not in known:
                continue
            kind = known[name].type
            if "Path" in str(kind):
                value = Path(value)
            elif "tuple" in str(kind):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)


def _owner(path: Path) -> str:
    try:
        uid = path.stat().st_uid
    except OSError:
        return ""
    if uid == os.geteuid():
        return ""
    try:
        import pwd

        return f"; it belongs to {pwd.getpwuid(uid).pw_name}"
    except (ImportError, KeyError):
        return f"; it belongs to user id {uid}"


def unknown_keys(config: dict[str, Any], known: set[str]) -> list[str]:
    """A warning for each config key that is no setting, naming the nearest one."""
    out = []
    for key in sorted(set(config) - known):
        near = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        out.append(f"unknown key {key!r}{hint}; it is ignored")
    return out


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--kafka-option {item!r}: expected KEY=VALUE, e.g. linger.ms=5")
    return key.strip(), value.strip()


def load_config_file(path: str | None) -> dict[str, Any]:
    """Keys of the `[streams]` table (or the top level), with '-' read as '_'."""
    explicit = path or os.environ.get(CONFIG_ENV)
    candidate = Path(explicit) if explicit else Path(DEFAULT_CONFIG)
    if not candidate.exists():
        if explicit:
            raise FileNotFoundError(f"config file {candidate} does not exist")
        return {}
    try:
        raw = tomllib.loads(candidate.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {candidate}: not valid TOML ({exc})") from None
    table = raw.get("streams", raw)
    return {key.replace("-", "_"): value for key, value in table.items()}
