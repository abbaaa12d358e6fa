"""The fan-out's page messages (eskit_tasks/fleet/publish.py): the message Celery builds,
but for the ids; and a real worker runs them."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import signals
from celery._state import _set_task_join_will_block, task_join_will_block

from eskit_tasks import CompactionRun
from eskit_tasks.fleet.app import app
from eskit_tasks.fleet.constants import COMPACT_STREAM_TASK, COMPACTION_QUEUE, FAN_OUT_TASK
from eskit_tasks.fleet.fan_out import enqueue, fan_out_page
from eskit_tasks.fleet.progress import new_run_id
from eskit_tasks.fleet.publish import template_applies
from eskit_tasks.fleet.resources import Resources
from tests.fleet.conftest import Fleet, results_in_backend

KWARGS = {"run_id": "c" * 32, "retain_last": 2, "retain_younger_than": None, "dry_run": False}


@pytest.fixture
def as_in_a_worker() -> Iterator[None]:
    """Publish as a prefork pool process does: without subscribing to each task's result."""
    before = task_join_will_block()
    _set_task_join_will_block(True)
    yield
    _set_task_join_will_block(before)


@pytest.fixture
def res(fleet: Fleet) -> Iterator[Resources]:
    state = redis.Redis(port=fleet.state.port)
    yield Resources(app.eskit_settings, store=fleet.store, redis=state)
    state.close()


def _take_queued(fleet: Fleet) -> list[dict[str, Any]]:
    """The compaction queue's raw messages, oldest first; the queue is emptied."""
    client = redis.Redis(port=fleet.broker.port, db=0)
    raw = client.lrange(COMPACTION_QUEUE, 0, -1)
    client.delete(COMPACTION_QUEUE)
    return [json.loads(m) for m in reversed(raw)]


def _decoded(envelope: dict[str, Any]) -> dict[str, Any]:
    """A message as the worker reads it: the body decoded, the per-message ids apart."""
    message = json.loads(json.dumps(envelope))
    headers, props = message["headers"], message["properties"]
    task_id = headers.pop("id")
    assert props.pop("correlation_id") == task_id
    assert headers.pop("root_id") == task_id  # sent from no task: the root is the task
    assert uuid.UUID(task_id)
    props.pop("delivery_tag")  # kombu's, per message
    assert props.pop("body_encoding") == "base64"
    message["body"] = json.loads(base64.b64decode(message.pop("body")))
    return message


@pytest.mark.usefixtures("as_in_a_worker")
def test_a_page_message_is_the_message_celery_builds_but_for_its_ids(fleet: Fleet):
    task = app.tasks[COMPACT_STREAM_TASK]
    assert template_applies(app, task)
    page = [("ledger", "s-1"), ("ledger", "s-2"), ("other", "x" * 2000)]
    caps = {("ledger", "s-2"): 7}

    enqueue(app, page, KWARGS, caps)
    ours = _take_queued(fleet)
    for stream in page:  # the same tasks, sent by Celery itself
        cap = caps.get(stream)
        kwargs = KWARGS if cap is None else {**KWARGS, "through_version": cap}
        task.apply_async(args=stream, kwargs=kwargs)
    celerys = _take_queued(fleet)

    assert len(ours) == len(celerys) == 3
    assert len({m["headers"]["id"] for m in ours}) == 3
    for stream, mine, theirs in zip(page, ours, celerys, strict=True):
        mine, theirs = _decoded(mine), _decoded(theirs)
        if stream[1] != "x" * 2000:
            assert mine == theirs  # headers, properties, routing, body: all alike
            continue
        # A long id: Celery's saferepr and our repr cut it differently, both bounded.
        assert mine["headers"].pop("argsrepr").endswith("...")
        theirs["headers"].pop("argsrepr")
        assert mine == theirs
    args, kwargs, embed = _decoded(ours[1])["body"]
    assert (args, kwargs) == (["ledger", "s-2"], {**KWARGS, "through_version": 7})
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert _decoded(ours[1])["headers"]["kwargsrepr"] == repr(kwargs)


@pytest.mark.usefixtures("as_in_a_worker")
def test_the_headers_are_those_of_celerys_task_protocol_2(fleet: Fleet):
    """Field by field against ``amqp.as_task_v2``, the function that defines protocol 2."""
    stream = ("ledger", "s-1")
    enqueue(app, [stream], KWARGS)
    (mine,) = _take_queued(fleet)
    task_id = mine["headers"]["id"]
    task = app.tasks[COMPACT_STREAM_TASK]
    assert (task.time_limit, task.soft_time_limit) == (
        app.conf.task_time_limit,
        app.conf.task_soft_time_limit,
    )
    headers, properties, body, _ = app.amqp.as_task_v2(
        task_id,
        COMPACT_STREAM_TASK,
        args=stream,
        kwargs=KWARGS,
        reply_to=app.thread_oid,
        time_limit=task.time_limit,  # the limits the worker enforces travel with the task
        soft_time_limit=task.soft_time_limit,
        argsrepr=repr(stream),
        kwargsrepr=repr(KWARGS),
    )
    assert mine["headers"] == headers
    assert {k: mine["properties"][k] for k in properties} == properties
    assert json.loads(base64.b64decode(mine["body"])) == json.loads(json.dumps(body))
    delivery = mine["properties"]
    assert delivery["delivery_info"] == {"exchange": "", "routing_key": COMPACTION_QUEUE}
    assert (delivery["delivery_mode"], delivery["priority"]) == (2, 0)  # persistent
    assert mine["content-type"] == "application/json"


@pytest.mark.usefixtures("as_in_a_worker")
def test_ids_differ_across_pages(fleet: Fleet):
    page = [("ledger", f"s-{n}") for n in range(200)]
    enqueue(app, page, KWARGS)
    enqueue(app, page, KWARGS)
    ids = [m["headers"]["id"] for m in _take_queued(fleet)]
    assert len(set(ids)) == 400
    assert all(uuid.UUID(i).version == 4 for i in ids)


@pytest.mark.usefixtures("as_in_a_worker")
def test_with_a_publish_signal_receiver_celery_sends_each_message(fleet: Fleet):
    """A receiver of before_task_publish may stamp each message its own way and expects
    a call per message: the template is not used then."""
    seen: list[str] = []

    def receiver(headers: dict[str, Any], **_: Any) -> None:
        seen.append(headers["id"])
        headers["x-stamp"] = headers["id"]

    signals.before_task_publish.connect(receiver)
    try:
        assert not template_applies(app, app.tasks[COMPACT_STREAM_TASK])
        enqueue(app, [("ledger", f"s-{n}") for n in range(5)], KWARGS)
    finally:
        signals.before_task_publish.disconnect(receiver)
    queued = _take_queued(fleet)
    assert [m["headers"]["id"] for m in queued] == seen
    assert all(m["headers"]["x-stamp"] == m["headers"]["id"] for m in queued)
    assert template_applies(app, app.tasks[COMPACT_STREAM_TASK])


@pytest.mark.usefixtures("as_in_a_worker")
def test_a_real_worker_runs_a_page_built_from_the_template(fleet: Fleet, res: Resources):
    """A page of 40 streams fanned out here (template path), executed by a real
    ``celery worker``: every task runs once under the id it was sent with, its result
    is stored, and the run counts each and finishes."""
    for n in range(40):
        fleet.seed("ledger", f"p-{n:02d}", 8)
    run_id = new_run_id()
    args = {
        "run_id": run_id,
        "min_events": 5,
        "stream_types": None,
        "max_streams": None,
        "retain_last": 2,
        "retain_younger_than": None,
        "dry_run": False,
        "sources": None,
        "trigger": "test",
        "plan_id": None,
    }
    assert template_applies(app, app.tasks[COMPACT_STREAM_TASK])
    # Streams this small would go in compact_batch messages: send each alone here, as
    # streams above ESKIT_BATCH_EVENTS / 2 go.
    alone = Resources(
        app.eskit_settings.model_copy(update={"batch_events": 0}),
        store=fleet.store,
        redis=res.redis,
    )
    sent = fan_out_page(app.tasks[FAN_OUT_TASK], alone, args, 0)
    assert (sent["enqueued"], sent["done"]) == (40, True)
    client = redis.Redis(port=fleet.broker.port, db=0)
    queued = [json.loads(m) for m in client.lrange(COMPACTION_QUEUE, 0, -1)]
    ids = {m["headers"]["id"] for m in queued}
    assert len(ids) == 40

    fleet.worker("w1")
    final = CompactionRun(run_id).wait(timeout=180)

    assert (final.candidates, final.done) == (40, 40), fleet.worker_logs()
    assert final.outcomes == {"compacted": 40}
    assert final.events_deleted == 40 * 6
    results = {
        task_id: meta
        for task_id, meta in results_in_backend(fleet.broker).items()
        if meta.get("name") == COMPACT_STREAM_TASK
    }
    assert set(results) == ids  # each ran under the id it was sent with
    for meta in results.values():
        assert meta["status"] == "SUCCESS"
        result = meta["result"]
        assert meta["args"] == ["ledger", result["stream_id"]]
        assert meta["kwargs"]["run_id"] == run_id
        assert (result["outcome"], result["events_deleted"]) == ("compacted", 6)
    for n in range(40):
        assert fleet.live_versions("ledger", f"p-{n:02d}") == [7, 8]
    fleet.assert_nothing_lost()
