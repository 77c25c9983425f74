"""Warehouses by URL: a DuckDB path or `duckdb:///path` (the default), `postgresql://...`
(or `postgres://...`), `redshift://...`. Each dialect lives in its own module and is
imported only when used (psycopg is an optional dependency; pyarrow and DuckDB weigh ~50 MB
in a process that only imports)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # base imports pyarrow: not for a settings check (`streams import`)
    from connectors.warehouses.base import Warehouse

__all__ = ["dialect_of", "duckdb_path", "open_warehouse"]


def _duckdb(url: str, options: dict[str, Any]) -> Warehouse:
    from connectors.warehouses.duckdb import DuckDBWarehouse

    return DuckDBWarehouse(duckdb_path(url), **options)


def _postgres(url: str, options: dict[str, Any]) -> Warehouse:
    from connectors.warehouses.postgres import PostgresWarehouse

    return PostgresWarehouse(url, **options)


def _redshift(url: str, options: dict[str, Any]) -> Warehouse:
    from connectors.warehouses.redshift import RedshiftWarehouse

    return RedshiftWarehouse(url, **options)


# URL scheme -> (dialect, opener).
REGISTRY: dict[str, tuple[str, Callable[[str, dict[str, Any]], Warehouse]]] = {
    "duckdb": ("duckdb", _duckdb),
    "postgresql": ("postgres", _postgres),
    "postgres": ("postgres", _postgres),
    "redshift": ("redshift", _redshift),
}


def dialect_of(url: str) -> str:
    """duckdb, postgres or redshift; a URL without a known scheme is a DuckDB path."""
    scheme, sep, _rest = url.partition("://")
    if not sep:
        return "duckdb"
    if scheme.lower() not in REGISTRY:
        raise ValueError(f"--warehouse {url!r}: unknown scheme {scheme!r}; expected a DuckDB "
                         f"path or one of {', '.join(s + '://' for s in REGISTRY)}")
    return REGISTRY[scheme.lower()][0]


def duckdb_path(url: str) -> Path:
    """`duckdb:///abs/path` or `duckdb://rel/path` or a plain path."""
    return Path(url.split("://", 1)[1]) if "://" in url else Path(url)


def open_warehouse(url: str, **options: Any) -> Warehouse:
    """The warehouse this URL names; options go to its dialect's constructor."""
    dialect = dialect_of(url)
    scheme = url.partition("://")[0].lower() if "://" in url else "duckdb"
    opener = REGISTRY[scheme][1]
    assert REGISTRY[scheme][0] == dialect
    return opener(url, options)
