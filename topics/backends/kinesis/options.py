"""The kinesis backend's settings: from `open_log` options (the CLI's --kinesis-* settings)
and from the URL's query, `kinesis://?prefix=dev.&lease_table=leases&failover_ms=10000&
shards=4` (the URL wins). Region and credentials come from boto3's chain, endpoints from
AWS_ENDPOINT_URL_KINESIS / AWS_ENDPOINT_URL_DYNAMODB / AWS_ENDPOINT_URL."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, urlparse

DEFAULT_LEASE_TABLE = "streams-leases"
DEFAULT_FAILOVER_MS = 10_000


@dataclass(frozen=True, slots=True)
class KinesisOptions:
    prefix: str = ""  # stream name = prefix + topic name
    lease_table: str = DEFAULT_LEASE_TABLE  # a group's table: "<lease_table>.<group>"
    failover_ms: int = DEFAULT_FAILOVER_MS  # a lease unrenewed this long may be taken
    shards: int = 0  # shards of a new stream; 0: one per virtual partition
    on_demand: bool = False  # on-demand capacity (then `shards` is not used)

    @property
    def failover_s(self) -> float:
        return self.failover_ms / 1000

    def check(self) -> KinesisOptions:
        if self.failover_ms < 100:
            raise ValueError(f"kinesis failover_ms {self.failover_ms}: expected 100 or more")
        if self.shards < 0:
            raise ValueError(f"kinesis shards {self.shards}: expected 0 (one per virtual "
                             "partition) or more")
        if not self.lease_table:
            raise ValueError("kinesis lease_table: expected a DynamoDB table name prefix")
        return self


_KEYS = {"prefix": "kinesis_prefix", "lease_table": "kinesis_lease_table",
         "failover_ms": "kinesis_failover_ms", "shards": "kinesis_shards",
         "on_demand": "kinesis_on_demand"}


def _typed(name: str, value: object) -> object:
    if name in ("failover_ms", "shards"):
        return int(value)  # type: ignore[call-overload]
    if name == "on_demand":
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    return str(value)


def parse(url: str, options: Mapping[str, object]) -> KinesisOptions:
    found = KinesisOptions()
    given = {name: options[key] for name, key in _KEYS.items()
             if options.get(key) not in (None, "")}
    for name, value in parse_qsl(urlparse(url).query):
        if name not in _KEYS:
            raise ValueError(f"kinesis URL {url!r}: unknown option {name!r}; expected "
                             + ", ".join(_KEYS))
        given[name] = value
    try:
        found = replace(found, **{name: _typed(name, value) for name, value in given.items()})
    except ValueError as exc:
        raise ValueError(f"kinesis options: {exc}") from None
    return found.check()
