"""The fleet under faults: duplicate tasks, killed workers, paused workers, Redis restarts."""

from __future__ import annotations

import os
import signal
import time

from celery.result import AsyncResult

from eskit_tasks import Outcome
from eskit_tasks.tasks import compact_stream
from tests.fleet.conftest import Fleet, results_in_backend, wait_until


def _results(ids: list[str], timeout: float) -> list[dict]:
    return [AsyncResult(i).get(timeout=timeout) for i in ids]


def test_same_stream_five_times_at_once_deletes_once_and_overwrites_no_result(fleet: Fleet):
    fleet.seed("slow", "twin", 400)
    fleet.worker("w1", concurrency=3, ESKIT_TEST_SLOW_S="0.002")
    fleet.worker("w2", concurrency=2, ESKIT_TEST_SLOW_S="0.002")
    sent = [compact_stream.delay("slow", "twin") for _ in range(5)]
    results = _results([r.id for r in sent], timeout=120)

    outcomes = sorted(r["outcome"] for r in results)
    assert outcomes.count("compacted") == 1, (outcomes, fleet.worker_logs())
    assert set(outcomes) <= {"compacted", "locked", "nothing_to_compact"}
    [row] = fleet.store.compaction_log("slow", "twin")
    [winner] = [r for r in results if r["outcome"] == "compacted"]
    assert winner["compaction_id"] == row.compaction_id
    assert row.events_deleted == 400
    # Each task id holds exactly the result its own copy produced: read them again after
    # every retry has settled, and nothing changed.
    time.sleep(2)
    stored = results_in_backend(fleet.broker)
    for r, result in zip(sent, results, strict=True):
        assert stored[r.id]["status"] == "SUCCESS"
        assert stored[r.id]["result"] == result
    fleet.assert_nothing_lost()


def test_kill_9_of_a_worker_mid_compaction_is_redelivered_and_compacts_once(fleet: Fleet):
    fleet.seed("slow", "victim", 1500)
    fast_redelivery = {
        "ESKIT_TEST_SLOW_S": "0.002",
        "ESKIT_LOCK_TTL": "3",
        "ESKIT_TASK_SOFT_TIME_LIMIT": "8",
        "ESKIT_TASK_TIME_LIMIT": "9",
        "ESKIT_VISIBILITY_TIMEOUT": "10",
    }
    doomed = fleet.worker("doomed", concurrency=1, **fast_redelivery)
    sent = compact_stream.delay("slow", "victim")
    fleet.wait_for_marker("victim")
    doomed.kill9()  # the whole worker, mid-compaction; its message was never acknowledged
    assert fleet.live_versions("slow", "victim") == list(range(1, 1501))

    fleet.worker("rescuer", concurrency=1, **fast_redelivery)
    result = AsyncResult(sent.id).get(timeout=90)
    assert result["outcome"] == Outcome.COMPACTED, fleet.worker_logs()
    assert len(fleet.store.compaction_log("slow", "victim")) == 1
    assert fleet.live_versions("slow", "victim") == []
    fleet.assert_nothing_lost()


def test_worker_paused_past_its_lock_expiry_ends_fenced(fleet: Fleet):
    fleet.seed("slow", "sleeper", 600)
    fleet.worker("paused", concurrency=1, ESKIT_TEST_SLOW_S="0.005")
    first = compact_stream.delay("slow", "sleeper")
    pid = fleet.wait_for_marker("sleeper")
    os.kill(pid, signal.SIGSTOP)  # e.g. a long GC pause or a frozen VM
    try:
        time.sleep(4.5)  # the 3 s lock expires; nobody renews it
        fleet.worker("healthy", concurrency=1, ESKIT_TEST_SLOW_S="0")
        second = compact_stream.delay("slow", "sleeper")
        assert second.get(timeout=60)["outcome"] == Outcome.COMPACTED, fleet.worker_logs()
    finally:
        os.kill(pid, signal.SIGCONT)
    stale = first.get(timeout=60)
    assert stale["outcome"] == Outcome.FENCED, (stale, fleet.worker_logs())
    assert stale["events_deleted"] == 0
    [row] = fleet.store.compaction_log("slow", "sleeper")
    assert row.compaction_id == second.get()["compaction_id"]
    fleet.assert_nothing_lost()


def test_redis_for_locks_stopped_and_restarted_during_a_run(fleet: Fleet):
    for n in range(40):
        fleet.seed("slow", f"r-{n:02d}", 150)
    fleet.worker("w1", concurrency=2, ESKIT_TEST_SLOW_S="0.003")
    fleet.worker("w2", concurrency=2, ESKIT_TEST_SLOW_S="0.003")
    sent = [compact_stream.delay("slow", f"r-{n:02d}") for n in range(40)]
    wait_until(lambda: len(fleet.store.compaction_log(limit=100)) >= 3, 60, "a few compactions")

    fleet.state.stop()
    down_from = fleet.store.now()
    time.sleep(3)
    down_until = fleet.store.now()
    fleet.state.start()

    results = _results([r.id for r in sent], timeout=180)
    outcomes = {r["outcome"] for r in results}
    assert outcomes <= {"compacted", "fenced", "failed"}, outcomes
    assert "compacted" in outcomes
    for r in results:
        if r["outcome"] == "failed":
            assert r["error_type"] in ("ConnectionError", "TimeoutError", "RedisError"), r
    log = fleet.store.compaction_log(limit=100)
    compacted = {r["compaction_id"] for r in results if r["outcome"] == "compacted"}
    assert {row.compaction_id for row in log} == compacted
    # Deletions commit only right after the lock was confirmed in Redis: none can have
    # committed while Redis was down (allowing for the check-to-commit gap).
    grace = 0.5
    for row in log:
        inside = (down_from.timestamp() + grace) < row.compacted_at.timestamp()
        assert not (inside and row.compacted_at < down_until), row
    fleet.assert_nothing_lost()
