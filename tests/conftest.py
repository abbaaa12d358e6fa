"""Shared fixtures: a PostgreSQL database per test session, SQLite files per test.

PostgreSQL is required. Its admin URL comes from ESKIT_TEST_POSTGRES_URL (default:
postgresql+psycopg://postgres@127.0.0.1:5432/postgres). The session creates its own
database and drops it at the end; an unreachable server stops the run with a message.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database for this test session (dropped afterwards)."""
    admin = os.environ.get("ESKIT_TEST_POSTGRES_URL", DEFAULT_PG_URL)
    try:
        conn = psycopg.connect(_libpq(admin), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        shown = make_url(admin).render_as_string(hide_password=True)
        pytest.exit(
            f"PostgreSQL is not reachable at {shown}: {exc}\n"
            "The tests need a real PostgreSQL. Start the local one with\n"
            "    pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n"
            "or point ESKIT_TEST_POSTGRES_URL at a server where you may create databases.",
            returncode=3,
        )
    name = f"eskit_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(admin).set(database=name).render_as_string(hide_password=False)
        finally:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
