"""Session-wide test servers: started once, on demand, and always (no test skips because
a server is missing: the dev extra installs them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.aws_server import moto_endpoint
from tests.kinesis_server import kinesis_endpoint, kinesis_env
from tests.postgres_server import fresh_database, postgres_server

# kinesalite (Kinesis) and the moto server (its lease tables in DynamoDB), by name
__all__ = ["kinesis_endpoint", "kinesis_env", "moto_endpoint"]


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[str]:
    with postgres_server() as uri:
        yield uri


@pytest.fixture
def postgres_url(postgres_admin: str) -> str:
    """A database of its own for each test."""
    return fresh_database(postgres_admin)
