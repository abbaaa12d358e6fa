"""Batches of small streams (issue 15): one message, each stream still its own unit —
its own task id, lock, compaction id, done key, audit row and report to the run; and the
one Redis call that starts a compaction (fleet/task_start.py). Fast tier: the
in-process fleet; tests/fleet/test_fan_out.py runs batches on real workers."""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery.exceptions import TimeLimitExceeded

from eskit_tasks import CompactionNeedsAttention, CompactionResult, Outcome
from eskit_tasks.fleet.batch import Member, batches, sent_again_key
from eskit_tasks.fleet.constants import COMPACT_BATCH_TASK, COMPACT_STREAM_TASK
from eskit_tasks.fleet.locks import StreamLock
from eskit_tasks.fleet.progress import new_run_id
from eskit_tasks.fleet.redelivery import TaskCopy, compaction_id_for, done_key
from eskit_tasks.fleet.resources import resources_of
from eskit_tasks.fleet.runs import compaction_result
from tests.test_fleet_in_process import InProcessFleet, _running, fleet  # noqa: F401


def _streams(*members: tuple[str, str, str]) -> list[list[Any]]:
    return [[t, s, task_id, None] for t, s, task_id in members]


def _batch(
    fleet: InProcessFleet,  # noqa: F811
    streams: list[list[Any]],
    run_id: str | None,
    **options: Any,
) -> Any:
    """Run a batch message in this process, as a worker would; its answer (the one an
    outcome that needs attention carries too)."""
    sent = fleet.app.tasks[COMPACT_BATCH_TASK].apply(
        args=(streams,), kwargs={"run_id": run_id, "retain_last": 1}, **options
    )
    if isinstance(sent.result, CompactionNeedsAttention):
        return sent.state, sent.result.result
    return sent.state, sent.result


def _run(fleet: InProcessFleet) -> str:  # noqa: F811
    run_id = new_run_id()
    resources_of(fleet.app).progress.create(run_id, {"run_id": run_id})
    return run_id


def test_a_stream_that_fails_in_a_batch_spares_the_others(
    fleet: InProcessFleet,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    for stream_id in ("s-0", "s-1", "s-2"):
        fleet.seed(stream_id, 6)
    fleet.seed("g-0", 6, stream_type="ghost")  # no decider registered
    fleet.seed("b-0", 6, stream_type="brittle")
    monkeypatch.setenv("ESKIT_TEST_BROKEN", "1")  # its decider raises
    run_id = _run(fleet)
    streams = _streams(
        ("ledger", "s-0", "t-0"),
        ("ghost", "g-0", "t-1"),
        ("ledger", "s-1", "t-2"),
        ("brittle", "b-0", "t-3"),
        ("ledger", "s-2", "t-4"),
    )

    state, answer = _batch(fleet, streams, run_id)

    assert state == "FAILURE"  # Flower shows the batch failed: two streams need attention
    outcomes = {task_id: r["outcome"] for task_id, r in answer["results"].items()}
    assert outcomes == {
        "t-0": "compacted",
        "t-1": "failed",
        "t-2": "compacted",
        "t-3": "failed",
        "t-4": "compacted",
    }
    assert answer["sent_again"] == []
    for stream_id in ("s-0", "s-1", "s-2"):
        assert fleet.live(stream_id) == [6]
    assert fleet.live("g-0", "ghost") == list(range(1, 7))
    assert fleet.live("b-0", "brittle") == list(range(1, 7))
    log = {row.compaction_id: row.stream_id for row in fleet.store.compaction_log()}
    assert log == {
        compaction_id_for(t): s for t, s in (("t-0", "s-0"), ("t-2", "s-1"), ("t-4", "s-2"))
    }
    progress = resources_of(fleet.app).progress.get(run_id)
    assert progress is not None
    assert (progress.done, progress.outcomes) == (5, {"compacted": 3, "failed": 2})
    assert progress.events_deleted == 15
    failed = {
        (f.stream_type, f.stream_id)
        for f in resources_of(fleet.app).progress.failed_streams(run_id)
    }
    assert failed == {("ghost", "g-0"), ("brittle", "b-0")}


@pytest.mark.parametrize("how", ["delivered again", "after a copy died unclaimed"])
def test_a_batch_delivered_again_compacts_and_counts_each_stream_once(
    fleet: InProcessFleet,  # noqa: F811
    how: str,
):
    for n in range(3):
        fleet.seed(f"s-{n}", 6)
    run_id = _run(fleet)
    streams = _streams(*(("ledger", f"s-{n}", f"t-{n}") for n in range(3)))
    res = resources_of(fleet.app)
    if how == "delivered again":
        state, first = _batch(fleet, streams, run_id)
    else:  # the first copy claimed none of its reports in the run (it died counting)...
        state, first = _batch(fleet, streams, None)
        res.redis.delete(done_key("t-1"))  # ...nor claimed t-1, whose delete committed
        fleet.app.backend.forget("t-1")  # (and so never stored it either)
    assert state == "SUCCESS" and len(first["results"]) == 3

    state, again = _batch(fleet, streams, run_id, retries=1)

    assert state == "SUCCESS"
    progress = res.progress.get(run_id)
    assert progress is not None
    if how == "delivered again":
        assert again["results"] == {}  # every stream's task was claimed: nothing redone
    else:
        [(task_id, result)] = again["results"].items()
        assert task_id == "t-1" and result["outcome"] == "compacted" and result["recovered"]
        assert result["compaction_id"] == compaction_id_for("t-1")
    # Each stream counted once: t-0 and t-2 from their claims, t-1 as it reports.
    assert (progress.done, progress.outcomes) == (3, {"compacted": 3})
    assert progress.events_deleted == 15
    assert len(fleet.store.compaction_log()) == 3  # one audit row per stream
    assert all(fleet.live(f"s-{n}") == [6] for n in range(3))


def test_a_locked_stream_of_a_batch_is_handed_to_a_task_of_its_own(
    fleet: InProcessFleet,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    fleet.seed("s-0", 6)
    fleet.seed("s-1", 6)
    res = resources_of(fleet.app)
    retrying = res.settings.model_copy(update={"locked_max_retries": 3, "locked_retry_base": 1})
    monkeypatch.setattr(res, "settings", retrying)
    run_id = _run(fleet)
    other = StreamLock(res.redis, "ledger", "s-1", ttl=30, owner="another-task")
    assert other.acquire()
    try:
        state, answer = _batch(
            fleet, _streams(("ledger", "s-0", "t-0"), ("ledger", "s-1", "t-1")), run_id
        )
    finally:
        other.release()
    assert state == "SUCCESS"
    assert list(answer["results"]) == ["t-0"] and answer["sent_again"] == ["t-1"]
    # The stream's own task, under the id the batch gave it, compacts it once the lock
    # is free; its result is in the backend under that id.
    found = compaction_result("t-1", app=fleet.app, timeout=30)
    assert found is not None and found["outcome"] == "compacted"
    assert found["compaction_id"] == compaction_id_for("t-1")
    progress = res.progress.get(run_id)
    assert progress is not None and (progress.done, progress.outcomes) == (2, {"compacted": 2})


def test_a_batch_that_died_accounts_for_each_of_its_streams(
    fleet: InProcessFleet,  # noqa: F811
):
    """A hard time limit (or a bug) kills a batch: the stream it finished counts as its
    claim says, the one it handed off is left to its own task, the one it was compacting
    (its lock held under its task id) counts as failed, and the ones it never reached
    are sent again, in a batch of their own, under the same task ids."""
    from eskit_tasks.fleet.failures import _report_task_failure

    res = resources_of(fleet.app)
    run_id = _run(fleet)
    fleet.seed("s-3", 6)
    done = CompactionResult(
        stream_type="ledger",
        stream_id="s-0",
        outcome=Outcome.COMPACTED,
        events_deleted=5,
        compaction_id=compaction_id_for("t-0"),
    )
    task = fleet.app.tasks[COMPACT_BATCH_TASK]
    claimer = TaskCopy(task, res, None, task_id="t-0")  # claimed, not counted: then killed
    assert claimer.claim_result(done)
    res.redis.set(sent_again_key("t-1"), "1")
    hung = StreamLock(res.redis, "ledger", "s-2", ttl=30, owner="t-2")
    assert hung.acquire()
    streams = _streams(
        ("ledger", "s-0", "t-0"),
        ("ledger", "s-1", "t-1"),
        ("ledger", "s-2", "t-2"),
        ("ledger", "s-3", "t-3"),
    )
    try:
        for _ in range(2):  # Celery reports one hard time limit twice
            _report_task_failure(
                sender=task,
                task_id="b-dead",
                exception=TimeLimitExceeded(5),
                args=[streams],
                kwargs={"run_id": run_id, "retain_last": 1},
            )
    finally:
        hung.release()

    found = compaction_result("t-3", app=fleet.app)  # a batched stream has none of its own
    assert found is None
    progress = res.progress

    def counted() -> Any:
        got = progress.get(run_id)
        return got if got is not None and got.done == 3 else None

    for _ in range(300):  # the never-reached s-3, sent again, reports by itself
        if counted():
            break
        time.sleep(0.05)
    final = counted()
    assert final is not None, progress.get(run_id)
    assert final.outcomes == {"compacted": 2, "failed": 1}
    [failed] = progress.failed_streams(run_id)
    assert failed.stream_id == "s-2" and "died" in (failed.error or "")
    assert fleet.live("s-3") == [6]
    [row] = fleet.store.compaction_log("ledger", "s-3")
    assert row.compaction_id == compaction_id_for("t-3")


@pytest.mark.parametrize("sent", ["alone", "batched"])
def test_a_copy_whose_claim_redis_lost_finds_its_result_and_compacts_nothing(
    fleet: InProcessFleet,  # noqa: F811
    sent: str,
):
    """The soak of seed 20772122: a task ran (nothing to compact then); Redis restarted
    without persistence, losing its claim; a second copy of that task id came, not
    flagged as a redelivery (a page sent again), after the stream had grown. It must find
    the first copy's result in the result backend and do nothing: compacting now, under
    the same compaction id, made one compaction report both "nothing to compact" and a
    deletion."""
    fleet.seed("s-0", 1)
    kwargs = {"retain_last": 1}  # (as _batch sends) the one event is kept: nothing to do
    if sent == "alone":
        task = fleet.app.tasks[COMPACT_STREAM_TASK]
        first = task.apply(args=("ledger", "s-0"), kwargs=kwargs, task_id="t-0")
        assert first.result["outcome"] == "nothing_to_compact"
        fleet.app.backend.mark_as_done("t-0", first.result)  # what a worker stores
    else:
        _, first = _batch(fleet, _streams(("ledger", "s-0", "t-0")), None)
        assert first["results"]["t-0"]["outcome"] == "nothing_to_compact"
    fleet.redis.delete(done_key("t-0"))  # the restart
    fleet.seed("s-0", 5)  # compactable now: 1..5 could go

    if sent == "alone":
        again = task.apply(args=("ledger", "s-0"), kwargs=kwargs, task_id="t-0")
        assert again.state == "IGNORED"
    else:
        _, again = _batch(fleet, _streams(("ledger", "s-0", "t-0")), None)
        assert again["results"] == {}
    assert fleet.live("s-0") == list(range(1, 7))
    assert fleet.store.find_compaction(compaction_id_for("t-0")) is None


def test_a_page_goes_out_in_batches_of_small_streams_and_big_ones_alone():
    page = [("t", f"s-{n}") for n in range(7)] + [("t", "big"), ("t", "unknown"), ("t", "z")]
    sizes = {("t", f"s-{n}"): 200 for n in range(7)} | {("t", "big"): 3000, ("t", "z"): 10}

    messages = list(batches(page, sizes, None, max_events=1000))

    shapes = [
        [m.stream_id for m in message] if isinstance(message, list) else message[1]
        for message in messages
    ]
    assert shapes == [
        ["s-0", "s-1", "s-2", "s-3", "s-4"],
        "big",  # more than half a batch: alone
        "unknown",  # size not known (a stored page a copy got back): alone
        ["s-5", "s-6", "z"],
    ]
    ids = [m.task_id for message in messages if isinstance(message, list) for m in message]
    assert len(set(ids)) == len(ids) == 8  # a task id of its own for each stream
    assert all(not isinstance(m, list) for m in batches(page, sizes, None, max_events=0))
    assert isinstance(next(iter(batches(page[:2], sizes, None, 1000))), list)
    [alone] = batches(page[:1], sizes, None, 1000)
    assert alone == ("t", "s-0")  # a batch of one is a stream alone
    assert Member("t", "s", "x").as_message() == ["t", "s", "x", None]


def test_the_results_of_a_stored_batch_read_back_whatever_its_state():
    from eskit_tasks.fleet.runs import batch_results_of, compaction_result_of

    ok = {"stream_type": "t", "stream_id": "a", "outcome": "compacted"}
    bad = {"stream_type": "t", "stream_id": "b", "outcome": "failed"}
    answer = {"results": {"t-1": ok, "t-2": bad}, "sent_again": []}
    raw_failure = {  # as a JSON result backend stores CompactionNeedsAttention
        "status": "FAILURE",
        "result": {
            "exc_type": "CompactionNeedsAttention",
            "exc_module": "eskit_tasks.errors",
            "exc_message": ["1 of 2: failed t/b", answer],
        },
    }
    assert batch_results_of({"status": "SUCCESS", "result": answer}) == [ok, bad]
    assert batch_results_of(raw_failure) == [ok, bad]
    exc = CompactionNeedsAttention("1 of 2", answer)
    assert batch_results_of({"status": "FAILURE", "result": exc}) == [ok, bad]
    assert batch_results_of({"status": "SUCCESS", "result": ok}) == []  # a stream's own
    assert compaction_result_of({"status": "SUCCESS", "result": answer}) is None
    assert batch_results_of({"status": "PENDING", "result": None}) == []
