"""A fleet run end to end: compact_all -> fan_out -> compact_stream on two real workers."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery._state import _set_task_join_will_block, task_join_will_block

from eskit_tasks import Outcome, compact_all
from eskit_tasks.fleet.app import app
from eskit_tasks.fleet.constants import COMPACTION_QUEUE, FAN_OUT_TASK
from eskit_tasks.fleet.fan_out import FANOUT_RETRIED_ERRORS, enqueue, fan_out_page
from eskit_tasks.fleet.progress import Page, new_run_id
from eskit_tasks.fleet.resources import Resources
from eskit_tasks.tasks import fan_out
from tests.fleet.conftest import Fleet, results_in_backend


def test_fan_out_over_300_streams_on_two_workers_matches_the_database(fleet: Fleet):
    rng = random.Random(3)
    for n in range(320):
        fleet.seed("ledger", f"s-{n:03d}", rng.randint(6, 30))
    for n in range(15):  # below min_events: not candidates
        fleet.seed("ledger", f"small-{n}", 3)
    fleet.worker("w1")
    fleet.worker("w2")

    run = compact_all(min_events=5, retain_last=2)
    final = run.wait(timeout=240)

    assert final.candidates == 320
    assert final.done == 320
    assert final.outcomes == {"compacted": 320}, fleet.worker_logs()
    # Streams this small go in batches (ESKIT_BATCH_EVENTS): a batch's result holds the
    # result of each of its streams, under the task id the fan-out gave that stream.
    results: list[tuple[str, str, dict[str, Any]]] = []  # worker, status, result
    batched = 0
    for meta in results_in_backend(fleet.broker).values():
        if meta.get("name") == "eskit_tasks.compact_stream":
            results.append((meta["worker"], meta["status"], meta["result"]))
        elif meta.get("name") == "eskit_tasks.compact_batch":
            assert meta["result"]["sent_again"] == []
            batched += len(meta["result"]["results"])
            results += [
                (meta["worker"], meta["status"], r) for r in meta["result"]["results"].values()
            ]
    assert len(results) == 320
    assert batched > 0
    assert {worker.split("@")[0] for worker, _, _ in results} == {"w1", "w2"}
    log = {row.compaction_id: row for row in fleet.store.compaction_log(limit=10_000)}
    assert len(log) == 320
    deleted_total = 0
    for _, status, result in results:
        assert status == "SUCCESS"
        assert result["outcome"] == Outcome.COMPACTED
        row = log[result["compaction_id"]]
        assert (row.stream_type, row.stream_id) == (result["stream_type"], result["stream_id"])
        assert row.events_deleted == result["events_deleted"]
        assert row.through_version == result["snapshot_version"] == result["head_version"] - 2
        head = fleet.store.head_version("ledger", result["stream_id"])
        assert fleet.live_versions("ledger", result["stream_id"]) == [head - 1, head]
        deleted_total += row.events_deleted
    assert final.events_deleted == deleted_total
    assert final.bytes_reclaimed == sum(r.bytes_reclaimed for r in log.values())
    for n in range(15):
        assert fleet.live_versions("ledger", f"small-{n}") == [1, 2, 3]
    fleet.assert_nothing_lost()

    summary = run.summary()
    assert summary.finished and summary.failed_streams == []
    # The first page, delivered again, finds the cursor moved and enqueues nothing.
    again = fan_out.apply_async(kwargs={"run_id": run.run_id, "cursor": 0, "min_events": 5})
    assert again.get(timeout=30)["duplicate_page"] == 0
    assert run.progress().candidates == 320


@pytest.fixture
def as_in_a_worker() -> Iterator[None]:
    """Publish as a prefork pool process does: without subscribing to each task's result
    (a client process would, and a stopped broker would break its result consumer)."""
    before = task_join_will_block()
    _set_task_join_will_block(True)
    yield
    _set_task_join_will_block(before)


@pytest.fixture
def res(fleet: Fleet) -> Iterator[Resources]:
    """The clients a fan-out in this process works with: the fleet's database and its
    state Redis, given to the task explicitly rather than read from the environment."""
    state = redis.Redis(port=fleet.state.port)
    yield Resources(app.eskit_settings, store=fleet.store, redis=state)
    state.close()


def _queued(fleet: Fleet) -> list[dict[str, Any]]:
    client = redis.Redis(port=fleet.broker.port, db=0)
    return [json.loads(raw) for raw in reversed(client.lrange(COMPACTION_QUEUE, 0, -1))]


def _streams_sent(fleet: Fleet) -> list[list[str]]:
    """The streams of the queued messages, in order: a compact_stream message's, or each
    of a compact_batch message's (small streams go in batches)."""
    found: list[list[str]] = []
    for message in _queued(fleet):
        args = json.loads(base64.b64decode(message["body"]))[0]
        if message["headers"]["task"] == "eskit_tasks.compact_batch":
            found += [entry[:2] for entry in args[0]]
        else:
            found.append(args)
    return found


@pytest.mark.usefixtures("as_in_a_worker")
def test_a_page_is_sent_in_order_with_every_message_intact(fleet: Fleet):
    long_id = "x" * 5000
    page = [("ledger", f"s-{n}") for n in range(1, 251)]
    page.append(("ledger", long_id))
    kwargs = {"run_id": "a" * 32, "retain_last": 1, "retain_younger_than": None, "dry_run": False}

    enqueue(app, page, kwargs)

    messages = _queued(fleet)
    assert len(messages) == 251  # more than two pipelines' worth, none lost or doubled
    assert len({m["headers"]["id"] for m in messages}) == 251
    for candidate, message in zip(page, messages, strict=True):
        headers = message["headers"]
        assert headers["task"] == "eskit_tasks.compact_stream"
        args, sent_kwargs, _ = json.loads(base64.b64decode(message["body"]))
        assert args == list(candidate)
        assert sent_kwargs == kwargs
        assert headers["kwargsrepr"] == repr(kwargs)
        assert len(headers["argsrepr"]) <= 1024  # monitoring shows a bounded repr
    assert messages[0]["headers"]["argsrepr"] == "('ledger', 's-1')"
    assert messages[-1]["headers"]["argsrepr"].endswith("...")


@pytest.mark.usefixtures("as_in_a_worker")
@pytest.mark.parametrize("fault", ["stopped", "out of memory"])
def test_a_page_the_broker_cannot_take_raises_an_error_the_fan_out_retries(
    fleet: Fleet, fault: str
):
    page = [("ledger", f"s-{n}") for n in range(1, 11)]
    kwargs = {"run_id": "b" * 32, "retain_last": 0, "retain_younger_than": None, "dry_run": False}
    broker = redis.Redis(port=fleet.broker.port)
    if fault == "stopped":
        fleet.broker.stop()
    else:  # connected, but every write refused: the page's pipeline fails as a whole
        broker.config_set("maxmemory", 1)
    try:
        with pytest.raises(FANOUT_RETRIED_ERRORS):
            enqueue(app, page, kwargs)
    finally:
        if fault == "stopped":
            fleet.broker.start()
        else:
            broker.config_set("maxmemory", 0)
    assert _queued(fleet) == []
    enqueue(app, page, kwargs)  # the retry, once the broker is back
    assert [json.loads(base64.b64decode(m["body"]))[0][1] for m in _queued(fleet)] == [
        f"s-{n}" for n in range(1, 11)
    ]


@pytest.mark.usefixtures("as_in_a_worker")
def test_a_copy_of_a_page_sends_the_page_the_first_copy_stored(fleet: Fleet, res: Resources):
    """The same fan-out page twice while writers append (the soak's duplicate fan-out):
    the first copy stored its page of two streams and stalled; a third stream became a
    candidate; the second copy sends the stored two, not its own reading of three, so
    the run counts two candidates and finishes when those two report."""
    fleet.seed("ledger", "s-0", 6)
    fleet.seed("ledger", "s-1", 6)
    run_id = new_run_id()
    args = {
        "run_id": run_id,
        "min_events": 5,
        "stream_types": None,
        "max_streams": None,
        "retain_last": 0,
        "retain_younger_than": None,
        "dry_run": False,
    }
    progress = res.progress
    progress.create(run_id, args)
    streams = (("ledger", "s-0"), ("ledger", "s-1"))
    first = progress.store_page(run_id, Page(0, 10_000, True, streams))
    assert first is not None
    fleet.seed("ledger", "s-2", 6)

    got = fan_out_page(app.tasks[FAN_OUT_TASK], res, args, 0)

    assert (got["enqueued"], got["done"]) == (2, True)
    assert _streams_sent(fleet) == [list(s) for s in streams]
    run = progress.get(run_id)
    assert run is not None and (run.candidates, run.fanout_done) == (2, True)
    # The first copy wakes up, sends its (same) page again and cannot advance.
    assert progress.advance(run_id, first, depth=0).claimed is False
    assert fan_out_page(app.tasks[FAN_OUT_TASK], res, args, 0) == {
        "run_id": run_id,
        "duplicate_page": 0,
    }
