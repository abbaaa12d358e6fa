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

from tests.services import free_port

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

# The fleet tests run their own redis-servers (one for the broker and results, one for
# locks and run progress, which a test may restart). Their ports and the fleet's
# settings go into the environment now, before anything imports the Celery app, so this
# process and every worker it starts agree on them. A developer's own CELERY_*/ESKIT_*
# variables are overridden for the test run.
BROKER_REDIS_PORT = free_port()
STATE_REDIS_PORT = free_port()
os.environ.update(
    {
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{BROKER_REDIS_PORT}/0",
        "CELERY_RESULT_BACKEND": f"redis://127.0.0.1:{BROKER_REDIS_PORT}/1",
        "ESKIT_REDIS_URL": f"redis://127.0.0.1:{STATE_REDIS_PORT}/0",
        "ESKIT_DECIDER_MODULES": "tests.fleet_deciders",
        "ESKIT_CELERY_CONFIG": "celeryconfig",
        "ESKIT_LOCK_TTL": "3",
        "ESKIT_TASK_SOFT_TIME_LIMIT": "40",
        "ESKIT_TASK_TIME_LIMIT": "45",
        "ESKIT_VISIBILITY_TIMEOUT": "60",
        "ESKIT_RESTORE_INTERVAL": "1",
        "ESKIT_LOCKED_RETRY_BASE": "0.5",
        "ESKIT_LOCKED_MAX_RETRIES": "6",
        "ESKIT_FANOUT_BACKOFF": "0.5",
        "ESKIT_DATABASE_URL": "postgresql+psycopg://set-by-the-fleet-fixture.invalid/x",
    }
)
for _name in [n for n in os.environ if n.startswith("ESKIT_NIGHTLY")]:
    del os.environ[_name]


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
