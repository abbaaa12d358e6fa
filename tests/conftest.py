"""Shared fixtures: a PostgreSQL database per test session, SQLite files per test.

PostgreSQL is required. Its admin URL comes from ESKIT_TEST_POSTGRES_URL (default:
postgresql+psycopg://postgres@127.0.0.1:5432/postgres). The session creates its own
database and drops it at the end; an unreachable server stops the run with a message.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from eskit_tasks.testing.services import (
    free_port,
    postgres_admin_url,
    postgres_problem,
    scratch_database,
)

#: The fast tier and the services tier (``make test-fast`` runs ``-m "not services"``).
pytest_plugins = ["tests.tiers"]

# The fleet tests run their own redis-servers (one for the broker and results, one for
# locks and run progress, which a test may restart) on these ports.
BROKER_REDIS_PORT = free_port()
STATE_REDIS_PORT = free_port()

#: The environment of the test session, set by pytest_configure: before any test module
#: is imported (and with it the Celery app, which reads its settings at import), so that
#: this process and every worker it starts agree on them. A developer's own
#: CELERY_*/ESKIT_* variables are overridden for the run.
FLEET_ENV = {
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
#: Variables removed for the run: a nightly schedule would start runs of its own.
UNSET_PREFIXES = ("ESKIT_NIGHTLY",)

#: The values pytest_configure replaced (None: the variable was not set), for
#: pytest_unconfigure to put back.
_saved: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    names = {*FLEET_ENV, *(n for n in os.environ if n.startswith(UNSET_PREFIXES))}
    _saved.update({name: os.environ.get(name) for name in names})
    for name in names - set(FLEET_ENV):
        del os.environ[name]
    os.environ.update(FLEET_ENV)


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _saved.clear()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database for this test session (dropped afterwards)."""
    admin = postgres_admin_url()
    problem = postgres_problem(admin, purpose="the tests")
    if problem is not None:
        pytest.exit(problem, returncode=3)
    with scratch_database(admin, "eskit_test") as url:
        yield url
