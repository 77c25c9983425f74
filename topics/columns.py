"""Dictionary-encoded string columns: segment ids and ops repeat on almost every row, so
messages carry their distinct values once and an int per row, which fastavro reads about
four times faster than a string per row."""

from __future__ import annotations

from typing import Any


def dict_column(values: list[str]) -> dict[str, list[Any]]:
    lookup: dict[str, int] = {}
    index = [lookup.setdefault(v, len(lookup)) for v in values]
    return {"values": list(lookup), "index": index}


def column(value: dict[str, Any], dictionary: str, plain: str) -> list[str]:
    """The column as strings, from its dictionary form or (older writers) its plain form."""
    col = value.get(dictionary)
    if col and col["index"]:
        return list(map(col["values"].__getitem__, col["index"]))
    return value[plain]
