"""A service the CLI needs is down: one line naming it (setting, URL, password masked), exit 3.

Issue 14, case 1. Each command runs as the console script, whose default app is built
from the environment given here; the other services are the fleet tests' redis-servers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from eskit_tasks.testing.services import RedisServer, free_port, worker_env
from tests import REPO
from tests.test_cli import CLI, SECRET

RUN_ID = "0" * 32


@pytest.fixture
def up(redis_servers: tuple[RedisServer, RedisServer], tmp_path: Path) -> dict[str, str]:
    """An environment whose every service is up: the test replaces one with a closed port."""
    _, state = redis_servers
    if not state.running:  # a previous test left it stopped
        state.start()
    return {"ESKIT_DATABASE_URL": f"sqlite:///{tmp_path / 'up.db'}"}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        cwd=REPO,
        env=worker_env(REPO, COLUMNS="80", **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _assert_one_line_naming(done: subprocess.CompletedProcess[str], service: str) -> None:
    assert done.returncode == 3, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: cannot reach {service}: "), done.stderr
    assert "Check that it is running" in done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "command", [["compact-all", "--wait", "--timeout", "30"], ["compact-all", "--json"]]
)
def test_result_backend_down(up, command):
    port = free_port()
    url = f"redis://:{SECRET}@127.0.0.1:{port}/1"
    done = _cli({**up, "CELERY_RESULT_BACKEND": url}, *command)
    _assert_one_line_naming(
        done, f"the result backend (CELERY_RESULT_BACKEND redis://:***@127.0.0.1:{port}/1)"
    )


@pytest.mark.parametrize(
    "command", [["compact-all", "--wait"], ["status", RUN_ID], ["status", RUN_ID, "--wait"]]
)
def test_redis_for_locks_and_progress_down(up, command):
    port = free_port()
    done = _cli({**up, "ESKIT_REDIS_URL": f"redis://u:{SECRET}@127.0.0.1:{port}/0"}, *command)
    _assert_one_line_naming(
        done,
        f"the Redis for locks and run progress (ESKIT_REDIS_URL redis://u:***@127.0.0.1:{port}/0)",
    )


@pytest.mark.parametrize(
    "scheme", ["amqp://guest:{secret}@127.0.0.1:{port}//", "redis://:{secret}@127.0.0.1:{port}/0"]
)
def test_broker_down(up, scheme):
    port = free_port()
    url = scheme.format(secret=SECRET, port=port)
    done = _cli({**up, "CELERY_BROKER_URL": url}, "compact-all", "--wait")
    shown = url.replace(SECRET, "***")
    _assert_one_line_naming(done, f"the broker (CELERY_BROKER_URL {shown})")


def test_database_down_in_a_fleet_shell(up):
    port = free_port()
    url = f"postgresql://bob:{SECRET}@127.0.0.1:{port}/x"
    done = _cli({**up, "ESKIT_DATABASE_URL": url}, "compact-all", "--stream-type", "ledger2")
    shown = f"postgresql+psycopg://bob:***@127.0.0.1:{port}/x"
    assert done.returncode == 3, done.stderr
    assert f"cannot reach the database (ESKIT_DATABASE_URL {shown})" in done.stderr
    assert done.stderr.count("\n") == 1 and SECRET not in done.stderr
