"""The fleet under faults: duplicate tasks, killed workers, paused workers, Redis restarts."""

from __future__ import annotations

import json
import os
import signal
import time

from celery.result import AsyncResult

from eskit_tasks import Outcome
from eskit_tasks.fleet.runs import compaction_result, compaction_result_of
from eskit_tasks.tasks import compact_stream
from tests.fleet.conftest import Fleet, results_in_backend, wait_until


def _results(ids: list[str], timeout: float) -> list[dict]:
    """Each task's result, whatever its outcome (one that needs attention is FAILURE)."""
    return [_result(i, timeout) for i in ids]


def _result(task_id: str, timeout: float) -> dict:
    found = compaction_result(task_id, timeout=timeout)
    assert found is not None, AsyncResult(task_id).state
    return found


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
        failed = Outcome(result["outcome"]).needs_attention  # locked: Flower shows it failed
        assert stored[r.id]["status"] == ("FAILURE" if failed else "SUCCESS")
        assert compaction_result_of(stored[r.id]) == result
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
    stale = _result(first.id, timeout=60)
    # The paused compaction ends fenced; when it noticed its lost lock itself (rather
    # than being refused by the database) the task retries and finds nothing left.
    lines = [json.loads(x) for x in fleet.workers[0].text().splitlines() if x.startswith("{")]
    assert {
        (x["stream_type"], x["stream_id"], x["outcome"])
        for x in lines
        if x.get("event") == "compaction"
    } >= {("slow", "sleeper", "fenced")}, fleet.worker_logs()
    assert stale["outcome"] in (Outcome.FENCED, Outcome.NOTHING_TO_COMPACT), stale
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


def test_the_same_task_id_delivered_twice_keeps_the_first_result(fleet: Fleet):
    """Two deliveries of one message (a visibility-timeout redelivery while the first copy
    still runs): one compacts, and the other stores nothing over its result."""
    fleet.seed("slow", "dup", 400)
    fleet.worker("w1", concurrency=2, ESKIT_TEST_SLOW_S="0.003")
    task_id = "dup-task-0001"
    compact_stream.apply_async(("slow", "dup"), task_id=task_id)
    compact_stream.apply_async(("slow", "dup"), task_id=task_id)
    result = AsyncResult(task_id).get(timeout=90)
    assert result["outcome"] == Outcome.COMPACTED, fleet.worker_logs()
    time.sleep(8)  # the second copy waits for the lock to expire, then finds it done
    assert results_in_backend(fleet.broker)[task_id]["result"] == result
    assert len(fleet.store.compaction_log("slow", "dup")) == 1
    fleet.assert_nothing_lost()


def test_kill_9_of_the_pool_child_requeues_at_once_and_compacts_once(fleet: Fleet):
    fleet.seed("slow", "child", 800)
    fleet.worker("w1", concurrency=1, ESKIT_TEST_SLOW_S="0.003")
    sent = compact_stream.delay("slow", "child")
    os.kill(fleet.wait_for_marker("child"), signal.SIGKILL)  # OOM killer, say
    result = sent.get(timeout=90)
    assert result["outcome"] == Outcome.COMPACTED, fleet.worker_logs()
    assert len(fleet.store.compaction_log("slow", "child")) == 1
    fleet.assert_nothing_lost()


def test_a_stream_locked_through_every_retry_ends_locked(fleet: Fleet):
    import redis as redis_client

    from eskit_tasks.fleet.locks import lock_key

    fleet.seed("ledger", "held", 5)
    state = redis_client.Redis(port=fleet.state.port)
    state.set(lock_key("ledger", "held"), "someone-else|x", px=60_000)
    fleet.worker("w1", concurrency=1, ESKIT_LOCKED_MAX_RETRIES="2", ESKIT_LOCKED_RETRY_BASE="0.2")
    sent = compact_stream.delay("ledger", "held")
    result = _result(sent.id, timeout=60)
    assert sent.state == "FAILURE"
    assert result["outcome"] == Outcome.LOCKED
    assert "locked by task someone-else" in result["error"]
    assert fleet.live_versions("ledger", "held") == [1, 2, 3, 4, 5]


def test_a_run_survives_redis_for_locks_restarting_and_the_next_run_finishes(fleet: Fleet):
    from eskit_tasks import RunNotFoundError, compact_all

    for n in range(60):
        fleet.seed("slow", f"rr-{n:02d}", 60)
    fleet.worker(
        "w1",
        concurrency=2,
        ESKIT_TEST_SLOW_S="0.003",
        ESKIT_FANOUT_PAGE_SIZE="10",
        ESKIT_FANOUT_HIGH_WATER="10",
    )
    run = compact_all(min_events=1)
    wait_until(lambda: len(fleet.store.compaction_log(limit=100)) >= 2, 60, "compactions")
    fleet.state.stop()
    time.sleep(2)
    fleet.state.start()  # empty: locks and this run's progress are gone
    try:
        first = run.wait(timeout=120)
        assert first.error is not None or first.finished
    except RunNotFoundError:
        pass  # the fan-out had already finished paging; its progress died with Redis
    second = compact_all(min_events=1).wait(timeout=180)
    assert second.error is None, second.error
    # The first run's queued tasks may still be compacting streams the second run also
    # listed: those find nothing left to do.
    assert set(second.outcomes) <= {"compacted", "nothing_to_compact"}, (
        second.outcomes,
        fleet.worker_logs(),
    )
    for n in range(60):
        assert fleet.live_versions("slow", f"rr-{n:02d}") == [], n
    fleet.assert_nothing_lost()
