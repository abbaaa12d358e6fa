"""A worker killed right after its deletion committed: the redelivery tells the truth.

The pool child is kill -9ed between the delete's COMMIT and everything after it (its
result, its log line, its lock release) by tests/fleet_crash_after_commit.py. The task
is acks_late and reject_on_worker_lost, so its message is redelivered with the same
task id, hence the same compaction id: the copy that runs it finds the deletion in the
audit log and reports it (``recovered``), where it used to report nothing_to_compact —
no result anywhere said that the events had been deleted.

The other death after COMMIT is Celery's hard time limit: the child hangs (it swallows
the soft limit) until the worker's main process kills it. That task is acknowledged,
not redelivered; the main process's ``task_failure`` handler reports it, and it finds
the deletion in the audit log by the task's compaction id (``recovered``), where it used
to report the stream as failed. A task killed so before its commit is still failed, and
names that compaction id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from eskit_tasks import Outcome, compact_all
from eskit_tasks.fleet.redelivery import compaction_id_for
from eskit_tasks.tasks import compact_stream
from eskit_tasks.testing.services import QUIET_WORKER
from tests.fleet.conftest import Fleet, results_in_backend, wait_until
from tests.fleet_crash_after_commit import HANG_AFTER_ENV, HANG_BEFORE_ENV, MARKER_ENV

#: Redelivery in seconds, not minutes: the dead child's lock (held by this very task id)
#: expires after ESKIT_LOCK_TTL and the redelivered copy looks again a second later.
FAST_REDELIVERY = {
    "ESKIT_DECIDER_MODULES": "tests.fleet_deciders,tests.fleet_crash_after_commit",
    "ESKIT_LOCK_TTL": "2",
    "ESKIT_TASK_SOFT_TIME_LIMIT": "8",
    "ESKIT_TASK_TIME_LIMIT": "9",
    "ESKIT_VISIBILITY_TIMEOUT": "10",
}


#: How a run sends its streams: each alone, or (small streams, the default) in batches.
ALONE = {"ESKIT_BATCH_EVENTS": "0"}
BATCHED = {"ESKIT_BATCH_EVENTS": "5000"}


def _crashing_worker(fleet: Fleet, marker: Path, **extra: str) -> None:
    env = {**FAST_REDELIVERY, MARKER_ENV: str(marker), **extra}
    fleet.worker("crashy", concurrency=1, options=QUIET_WORKER, **env)


def _stream_results(fleet: Fleet) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each stream's stored result and task id: a compact_stream task's, or one of a
    compact_batch's (keyed by the task id the fan-out gave the stream)."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for task_id, meta in results_in_backend(fleet.broker).items():
        value = meta.get("result")
        if meta.get("name") == "eskit_tasks.compact_batch" and isinstance(value, dict):
            for member_id, result in value.get("results", {}).items():
                found[result["stream_id"]] = (member_id, result)
        elif isinstance(value, dict) and "stream_id" in value:
            found[value["stream_id"]] = (task_id, value)
    return found


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


@pytest.mark.parametrize("sent", ["alone", "batched"])
def test_a_run_counts_a_deletion_whose_worker_died_after_commit_exactly_once(
    fleet: Fleet, tmp_path: Path, sent: str
):
    """Batched, the three streams share one message: the redelivered batch reports the
    killed stream's deletion (recovered) and compacts the two it never reached."""
    sizes = {"run-a": 120, "run-b": 80, "run-c": 50}
    for stream_id, n in sizes.items():
        fleet.seed("ledger", stream_id, n)
    marker = tmp_path / "crashed.json"
    _crashing_worker(fleet, marker, **(ALONE if sent == "alone" else BATCHED))
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
        found = _stream_results(fleet)
        return found if len(found) == len(sizes) else None

    # A task reports to the run just before it returns and its result is stored.
    results = wait_until(stored_results, 30, "the three tasks' results")
    assert set(results) == set(sizes)
    names = {meta.get("name") for meta in results_in_backend(fleet.broker).values()}
    assert ("eskit_tasks.compact_batch" in names) is (sent == "batched")
    for stream_id, (task_id, result) in results.items():
        if sent == "alone":
            assert AsyncResult(task_id).get(timeout=10) == result
        [row] = fleet.store.compaction_log("ledger", stream_id)
        assert result["compaction_id"] == row.compaction_id == compaction_id_for(task_id)
        assert (result["outcome"], result["events_deleted"]) == ("compacted", sizes[stream_id])
        assert result["recovered"] is (stream_id == doomed), result
        assert fleet.live_versions("ledger", stream_id) == []
    assert results[doomed][1]["compaction_id"] == crash["compaction_id"]
    fleet.assert_nothing_lost()


# -- the hard time limit --------------------------------------------------------------

#: Limits of a few seconds. The compaction itself commits well within 90% of the soft
#: limit (the task's own deadline before a write); the visibility timeout is far above
#: the test, so no message comes back by timeout (the hard-killed task is acknowledged).
HARD_LIMITED = {
    "ESKIT_DECIDER_MODULES": "tests.fleet_deciders,tests.fleet_crash_after_commit",
    "ESKIT_LOCK_TTL": "2",
    "ESKIT_TASK_SOFT_TIME_LIMIT": "3",
    "ESKIT_TASK_TIME_LIMIT": "5",
    "ESKIT_VISIBILITY_TIMEOUT": "60",
}


def _hanging_worker(fleet: Fleet, env: str, marker: Path, **extra: str) -> None:
    fleet.worker(
        "hangs", concurrency=1, options=QUIET_WORKER, **HARD_LIMITED, **{env: str(marker)}, **extra
    )


def _hang(marker: Path) -> dict[str, Any]:
    """What the hung process was doing (the test is vacuous without the hang)."""
    assert marker.exists(), "no worker process hung at its commit"
    hang: dict[str, Any] = json.loads(marker.read_text())
    # It saw the soft limit and carried on: the hard limit is what ended it.
    soft = Path(f"{marker}.soft")
    assert soft.exists() and soft.read_text().split() == [str(hang["pid"])], "no soft limit"
    return hang


def _timed_out_task(fleet: Fleet, stream_id: str, status: str) -> tuple[str, dict[str, Any]]:
    """The id and stored result of the task for ``stream_id``, once the backend holds
    ``status`` for it (Celery writes FAILURE at each of its two reports of a hard time
    limit; the handler puts a recovered deletion back after each)."""

    def found() -> tuple[str, dict[str, Any]] | None:
        hits = [
            (task_id, meta)
            for task_id, meta in results_in_backend(fleet.broker).items()
            if meta.get("name") == "eskit_tasks.compact_stream" and meta["args"][1] == stream_id
        ]
        return hits[0] if len(hits) == 1 and hits[0][1]["status"] == status else None

    return wait_until(found, 20, f"a {status} result for {stream_id}")


def _hard_limit_hit(fleet: Fleet, task_id: str, hang: dict[str, Any]) -> None:
    """The worker logged the hard time limit for that task, and the death of the child
    it killed for it (reaped a few seconds later)."""
    limit = rf"Hard time limit \(5(\.0)?s\) exceeded for eskit_tasks\.compact_stream\[{task_id}\]"
    assert re.search(limit, fleet.workers[0].text()), fleet.worker_logs()
    exited = re.compile(rf"pid:{hang['pid']} exited with 'signal (9 \(SIGKILL\)|15 \(SIGTERM\))'")
    wait_until(lambda: exited.search(fleet.workers[0].text()), 20, "the hung child's death")


def _failure_report(fleet: Fleet, stream_id: str) -> dict[str, Any]:
    """The compaction line of the task_failure handler for ``stream_id``: exactly one,
    although Celery 5.7 sends task_failure twice for one hard time limit (from
    ``Request.on_failure``, as billiard fails the job, and again from
    ``Request.on_timeout``)."""
    [line] = _compaction_lines(fleet, stream_id)
    return line


def _nothing_unacked(fleet: Fleet) -> bool:
    """Every delivered message was acknowledged (none waits to come back)."""
    client = redis.Redis(port=fleet.broker.port, db=0)
    return client.hlen("unacked") == 0


def test_a_run_counts_a_deletion_its_hard_time_limit_killed_after_commit_exactly_once(
    fleet: Fleet, tmp_path: Path
):
    sizes = {"run-a": 120, "run-b": 80, "run-c": 50}
    for stream_id, n in sizes.items():
        fleet.seed("ledger", stream_id, n)
    marker = tmp_path / "hung.json"
    _hanging_worker(fleet, HANG_AFTER_ENV, marker, **ALONE)
    final = compact_all(min_events=1, retain_last=10).wait(timeout=90)

    hang = _hang(marker)
    doomed = hang["stream_id"]
    assert hang["events_deleted"] == sizes[doomed] - 10
    task_id, stored = _timed_out_task(fleet, doomed, "SUCCESS")
    assert hang["compaction_id"] == compaction_id_for(task_id)
    _hard_limit_hit(fleet, task_id, hang)
    # Flower and AsyncResult see the deletion, not Celery's TimeLimitExceeded.
    assert (stored["result"]["outcome"], stored["result"]["recovered"]) == ("compacted", True)
    assert stored["result"]["compaction_id"] == compaction_id_for(task_id)
    assert final.error is None and final.finished, final
    assert (final.candidates, final.done) == (3, 3)
    # Before the handler looked in the audit log: {"compacted": 2, "failed": 1}, and the
    # killed task's deletion missing from events_deleted.
    assert final.outcomes == {"compacted": 3}, (final, fleet.worker_logs())
    assert final.events_deleted == sum(n - 10 for n in sizes.values())

    [row] = fleet.store.compaction_log("ledger", doomed)
    assert row.compaction_id == compaction_id_for(task_id)
    assert (row.events_deleted, row.through_version) == (sizes[doomed] - 10, sizes[doomed] - 10)
    assert fleet.live_versions("ledger", doomed) == list(
        range(sizes[doomed] - 9, sizes[doomed] + 1)
    )
    # The main process's lines only (the hung child never logged); nothing came back.
    line = _failure_report(fleet, doomed)
    assert (line["outcome"], line["recovered"]) == ("compacted", True), line
    assert (line["events_deleted"], line["task_id"]) == (sizes[doomed] - 10, task_id)
    assert line["compaction_id"] == row.compaction_id and line["error"] is None
    wait_until(lambda: _nothing_unacked(fleet), 10, "every message acknowledged")
    for stream_id in set(sizes) - {doomed}:
        [other] = fleet.store.compaction_log("ledger", stream_id)
        assert other.events_deleted == sizes[stream_id] - 10
        [line] = _compaction_lines(fleet, stream_id)
        assert (line["outcome"], line["recovered"]) == ("compacted", False), line
    fleet.assert_nothing_lost()


def test_a_batch_its_hard_time_limit_killed_after_a_commit_counts_each_stream_once(
    fleet: Fleet, tmp_path: Path
):
    """The three streams in one batch; the first deletion hangs until the hard time
    limit kills the batch: that stream counts as its deletion (from the audit log), and
    the two the batch never reached are sent again and compacted."""
    sizes = {"run-a": 120, "run-b": 80, "run-c": 50}
    for stream_id, n in sizes.items():
        fleet.seed("ledger", stream_id, n)
    marker = tmp_path / "hung.json"
    _hanging_worker(fleet, HANG_AFTER_ENV, marker, **BATCHED)
    final = compact_all(min_events=1, retain_last=10).wait(timeout=90)

    hang = _hang(marker)
    doomed = hang["stream_id"]
    assert hang["events_deleted"] == sizes[doomed] - 10
    assert final.error is None and final.finished, final
    assert (final.candidates, final.done) == (3, 3)
    assert final.outcomes == {"compacted": 3}, (final, fleet.worker_logs())
    assert final.events_deleted == sum(n - 10 for n in sizes.values())
    line = _failure_report(fleet, doomed)
    assert (line["outcome"], line["recovered"]) == ("compacted", True), line
    assert line["compaction_id"] == hang["compaction_id"]
    for stream_id, n in sizes.items():
        [row] = fleet.store.compaction_log("ledger", stream_id)
        assert row.events_deleted == n - 10
        assert fleet.live_versions("ledger", stream_id) == list(range(n - 9, n + 1))
    wait_until(lambda: _nothing_unacked(fleet), 10, "every message acknowledged")
    fleet.assert_nothing_lost()


def test_a_task_its_hard_time_limit_killed_before_commit_is_failed_with_its_compaction_id(
    fleet: Fleet, tmp_path: Path
):
    fleet.seed("ledger", "stuck", 100)
    marker = tmp_path / "hung.json"
    _hanging_worker(fleet, HANG_BEFORE_ENV, marker)
    run = compact_all(min_events=1)
    final = run.wait(timeout=60)

    hang = _hang(marker)
    assert hang["stream_id"] == "stuck"
    task_id, stored = _timed_out_task(fleet, "stuck", "FAILURE")
    assert stored["result"]["exc_type"] == "TimeLimitExceeded"
    assert hang["compaction_id"] == compaction_id_for(task_id)
    _hard_limit_hit(fleet, task_id, hang)
    assert final.error is None and final.finished, final
    assert (final.outcomes, final.events_deleted) == ({"failed": 1}, 0), final
    [failed] = run.summary().failed_streams
    assert failed.stream_id == "stuck" and "TimeLimitExceeded" in str(failed.error), failed
    assert fleet.store.compaction_log("ledger", "stuck") == []
    assert fleet.store.find_compaction(compaction_id_for(task_id)) is None
    assert fleet.live_versions("ledger", "stuck") == list(range(1, 101))
    line = _failure_report(fleet, "stuck")
    assert (line["outcome"], line["recovered"], line["events_deleted"]) == ("failed", False, 0)
    assert line["error_type"] == "TimeLimitExceeded" and line["task_id"] == task_id
    # Before: a random id per report (two lines, two ids), which no audit row could hold.
    assert line["compaction_id"] == compaction_id_for(task_id), line
    wait_until(lambda: _nothing_unacked(fleet), 10, "every message acknowledged")
    fleet.assert_nothing_lost()
