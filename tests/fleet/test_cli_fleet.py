"""The console script against PostgreSQL and a real worker."""

from __future__ import annotations

import json
import subprocess

from eskit_tasks.testing.services import worker_env
from tests import REPO
from tests.fleet.conftest import Fleet
from tests.test_cli import CLI


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        cwd=REPO,
        env=worker_env(REPO, COLUMNS="120"),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_compact_all_wait_and_status_drive_a_real_fleet(fleet: Fleet):
    for n in range(30):
        fleet.seed("ledger", f"c-{n:02d}", 12)
    fleet.seed("ghost", "unknown-type", 12)
    fleet.worker("w1")

    done = _cli("compact-all", "--min-events", "10", "--retain-last", "2", "--wait", "--json")
    assert done.returncode == 4, done.stderr + fleet.worker_logs()  # the ghost stream failed
    *streams, summary = [json.loads(line) for line in done.stdout.splitlines()]
    # Issue 14, case 11: a line per stream as it was reported, then the summary line.
    assert sorted((s["stream_id"], s["outcome"]) for s in streams) == sorted(
        [*((f"c-{n:02d}", "compacted") for n in range(30)), ("unknown-type", "failed")]
    )
    assert all(s["events_deleted"] == 10 for s in streams if s["outcome"] == "compacted")
    assert summary["summary"] is True and summary["results_listed"] == 31
    assert summary["outcomes"] == {"compacted": 30, "failed": 1}
    assert summary["events_deleted"] == 30 * 10
    [failed] = summary["failed_streams"]
    assert failed["stream_id"] == "unknown-type"

    status = _cli("status", summary["run_id"], "--json")
    assert status.returncode == 4
    assert json.loads(status.stdout)["done"] == 31

    table = _cli("status", summary["run_id"])
    assert "streams compacted" in table.stdout and "unknown-type" in table.stdout

    log = _cli("log", "--database", fleet.store.engine.url.render_as_string(False), "--json")
    assert log.returncode == 0
    assert len(json.loads(log.stdout)) == 30
    fleet.assert_nothing_lost()


def test_compact_all_without_wait_prints_the_run_id(fleet: Fleet):
    fleet.seed("ledger", "one", 3)
    fleet.worker("w1", concurrency=1)
    started = _cli("compact-all", "--json")
    assert started.returncode == 0, started.stderr
    run_id = json.loads(started.stdout)["run_id"]
    followed = _cli("status", run_id, "--wait", "--timeout", "60", "--json")
    assert followed.returncode == 0, followed.stderr
    [stream, summary] = [json.loads(line) for line in followed.stdout.splitlines()]
    assert (stream["stream_id"], stream["outcome"]) == ("one", "compacted")
    assert summary["outcomes"] == {"compacted": 1} and summary["summary"] is True
