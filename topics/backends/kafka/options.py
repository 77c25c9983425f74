"""Client settings: raw kafka-python options given as strings, typed and split per client.

Options come from config files and environment variables as `{name: "value"}`. Names may
be written the Java way (`linger.ms`) or the kafka-python way (`linger_ms`); values that
look like numbers or booleans become numbers or booleans. Each client (producer, consumer,
admin) gets only the options it knows, and a name that no client knows is refused, so a
typo fails at start rather than being ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")
_CLIENTS: dict[str, frozenset[str]] = {
    "producer": frozenset(KafkaProducer.DEFAULT_CONFIG),
    "consumer": frozenset(KafkaConsumer.DEFAULT_CONFIG),
    "admin": frozenset(KafkaAdminClient.DEFAULT_CONFIG),
}
# Set by the backend itself: letting raw options override them would break its contract.
_RESERVED = frozenset({
    "bootstrap_servers", "group_id", "enable_auto_commit", "key_serializer",
    "value_serializer", "key_deserializer", "value_deserializer", "partitioner",
    "transactional_id",
})


def typed(value: object) -> object:
    """"5" -> 5, "0.5" -> 0.5, "true" -> True; anything else is returned as it is."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return value


def split_options(options: Mapping[str, object] | None) -> dict[str, dict[str, Any]]:
    """{"producer": {...}, "consumer": {...}, "admin": {...}} from raw options."""
    out: dict[str, dict[str, Any]] = {client: {} for client in _CLIENTS}
    for raw_name, raw_value in (options or {}).items():
        name = raw_name.strip().replace(".", "_").replace("-", "_").lower()
        if name in _RESERVED:
            raise ValueError(f"kafka option {raw_name!r} is set by the kafka backend itself "
                             "and cannot be overridden")
        takers = [client for client, known in _CLIENTS.items() if name in known]
        if not takers:
            raise ValueError(f"unknown kafka option {raw_name!r}: not a kafka-python producer, "
                             "consumer or admin client setting")
        for client in takers:
            out[client][name] = typed(raw_value)
    return out
