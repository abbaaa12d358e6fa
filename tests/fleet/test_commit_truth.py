"""A worker killed right after its deletion committed: the redelivery tells the truth.

The pool child is kill -9ed between the delete's COMMIT and everything after it (its
result, its log line, its lock release) by tests/fleet_crash_after_commit.py. The task
is acks_late and reject_on_worker_lost, so its message is redelivered with the same
task id, hence the same compaction id: the copy that runs it finds the deletion in the
audit log and reports it (``recovered``), where it used to report nothing_to_compact —
no result anywhere said that the events had been deleted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from celery.result import AsyncResult

from eskit_tasks import Outcome, compact_all
from eskit_tasks.tasks import compact_stream, compaction_id_for
from tests.fleet.conftest import Fleet, results_in_backend, wait_until
from tests.fleet_crash_after_commit import MARKER_ENV
from tests.services import QUIET_WORKER

#: Redelivery in seconds, not minutes: the dead child's lock (held by this very task id)
#: expires after ESKIT_LOCK_TTL and the redelivered copy looks again a second later.
FAST_REDELIVERY = {
    "ESKIT_DECIDER_MODULES": "tests.fleet_deciders,tests.fleet_crash_after_commit",
    "ESKIT_LOCK_TTL": "2",
    "ESKIT_TASK_SOFT_TIME_LIMIT": "8",
    "ESKIT_TASK_TIME_LIMIT": "9",
    "ESKIT_VISIBILITY_TIMEOUT": "10",
}


def _crashing_worker(fleet: Fleet, marker: Path) -> None:
    env = {**FAST_REDELIVERY, MARKER_ENV: str(marker)}
    fleet.worker("crashy", concurrency=1, options=QUIET_WORKER, **env)


def _crash(marker: Path) -> dict[str, Any]:
    """What the killed process committed (the test is vacuous without the crash)."""
    assert marker.exists(), "no worker process was killed after a commit"
    crash: dict[str, Any] = json.loads(marker.read_text())
    return crash


def _killed(fleet: Fleet, crash: dict[str, Any]) -> bool:
    """The worker saw its pool child die of the SIGKILL."""
    return f"pid:{crash['pid']} exited with 'signal 9 (SIGKILL)'" in fleet.workers[0].text()


def _compaction_lines(fleet: Fleet, stream_id: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in fleet.workers[0].text().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("event") == "compaction" and x["stream_id"] == stream_id]


def test_kill_9_right_after_the_commit_the_redelivery_reports_the_deletion(
    fleet: Fleet, tmp_path: Path
):
    fleet.seed("ledger", "doomed", 300)
    marker = tmp_path / "crashed.json"
    _crashing_worker(fleet, marker)
    sent = compact_stream.delay("ledger", "doomed")
    result: dict[str, Any] = AsyncResult(sent.id).get(timeout=60)

    crash = _crash(marker)
    assert (crash["stream_id"], crash["events_deleted"]) == ("doomed", 300)
    assert crash["compaction_id"] == compaction_id_for(sent.id)
    assert _killed(fleet, crash)
    # Before the fix: nothing_to_compact, 0 deleted, although this task deleted 300.
    assert result["outcome"] == Outcome.COMPACTED, (result, fleet.worker_logs())
    assert (result["recovered"], result["events_deleted"]) == (True, 300), result
    assert (result["error"], result["error_type"]) == (None, None)
    [row] = fleet.store.compaction_log("ledger", "doomed")
    assert result["compaction_id"] == row.compaction_id == crash["compaction_id"]
    assert (row.events_deleted, result["snapshot_version"]) == (300, 300)
    assert fleet.live_versions("ledger", "doomed") == []
    # One log line: the redelivered copy's (the killed one died before logging).
    [line] = _compaction_lines(fleet, "doomed")
    assert (line["outcome"], line["recovered"], line["events_deleted"]) == ("compacted", True, 300)
    assert line["task_id"] == sent.id
    fleet.assert_nothing_lost()


def test_a_run_counts_a_deletion_whose_worker_died_after_commit_exactly_once(
    fleet: Fleet, tmp_path: Path
):
    sizes = {"run-a": 120, "run-b": 80, "run-c": 50}
    for stream_id, n in sizes.items():
        fleet.seed("ledger", stream_id, n)
    marker = tmp_path / "crashed.json"
    _crashing_worker(fleet, marker)
    final = compact_all(min_events=1).wait(timeout=90)

    crash = _crash(marker)
    doomed = crash["stream_id"]
    assert crash["events_deleted"] == sizes[doomed]
    assert _killed(fleet, crash)
    assert final.error is None and final.finished, final
    assert (final.candidates, final.done) == (3, 3)
    # Before the fix the crashed stream counted as nothing_to_compact, its events not at all.
    assert final.outcomes == {"compacted": 3}, (final, fleet.worker_logs())
    assert final.events_deleted == sum(sizes.values())

    def stored_results() -> dict[str, tuple[str, dict[str, Any]]] | None:
        found = {
            r["result"]["stream_id"]: (task_id, r["result"])
            for task_id, r in results_in_backend(fleet.broker).items()
            if isinstance(r.get("result"), dict) and "stream_id" in r["result"]
        }
        return found if len(found) == len(sizes) else None

    # A task reports to the run just before it returns and its result is stored.
    results = wait_until(stored_results, 30, "the three tasks' results")
    assert set(results) == set(sizes)
    for stream_id, (task_id, result) in results.items():
        assert AsyncResult(task_id).get(timeout=10) == result
        [row] = fleet.store.compaction_log("ledger", stream_id)
        assert result["compaction_id"] == row.compaction_id == compaction_id_for(task_id)
        assert (result["outcome"], result["events_deleted"]) == ("compacted", sizes[stream_id])
        assert result["recovered"] is (stream_id == doomed), result
        assert fleet.live_versions("ledger", stream_id) == []
    assert results[doomed][1]["compaction_id"] == crash["compaction_id"]
    fleet.assert_nothing_lost()
