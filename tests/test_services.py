"""eskit_tasks.testing.services: the scratch services of the tests, the soak and the
benchmarks create what they say, clean up after themselves and mask passwords."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import redis

from eskit_tasks.testing.services import (
    ADMIN_URL_VARIABLE,
    START_POSTGRES,
    RedisServer,
    free_port,
    libpq_url,
    postgres_admin_url,
    postgres_problem,
    scratch_database,
)

SECRET = "n0t-the-Real-pw"  # noqa: S105 -- a fake password the test looks for in messages


def _exists(admin: str, name: str) -> bool:
    with psycopg.connect(libpq_url(admin)) as conn:
        row = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,))
        return row.fetchone() == (1,)


@pytest.mark.usefixtures("postgres_url")  # stops the session with advice if PostgreSQL is down
def test_a_scratch_database_exists_inside_the_block_and_is_dropped_after_it():
    admin = postgres_admin_url()
    with scratch_database(admin, "eskit_svc") as url:
        assert url.startswith("postgresql+psycopg://")
        with psycopg.connect(libpq_url(url)) as conn:
            # A connection still open at the end does not stop the drop (WITH (FORCE)).
            (name,) = conn.execute("SELECT current_database()").fetchone() or ("",)
            assert name.startswith("eskit_svc_")
            assert _exists(admin, name)
    assert not _exists(admin, name)


def test_an_unreachable_server_is_named_with_its_password_masked_and_advice():
    url = f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:{free_port()}/postgres"
    problem = postgres_problem(url, purpose="this check")
    assert problem is not None
    assert SECRET not in problem
    assert "postgres:***@127.0.0.1" in problem
    assert "not reachable" in problem
    assert "needed for this check" in problem
    assert START_POSTGRES in problem
    assert ADMIN_URL_VARIABLE in problem


@pytest.mark.usefixtures("postgres_url")
def test_the_test_server_has_no_problem():
    assert postgres_problem(postgres_admin_url()) is None


@pytest.mark.services
def test_a_redis_server_answers_inside_the_block_and_is_gone_after_it(tmp_path: Path):
    with RedisServer(free_port(), tmp_path / "redis") as server:
        client = server.client()
        client.set("k", "v")
        server.flush()
        assert client.get("k") is None
        client.close()
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=server.port, socket_connect_timeout=0.5).ping()
