"""Pausing, resuming and cancelling a fleet run (issue 14): a paused run enqueues nothing
and its queued tasks wait; a cancelled run enqueues nothing more and its queued tasks
end ``cancelled`` without touching the database. Fast tier: the in-process fleet;
tests/fleet/test_run_control_fleet.py does it with real workers."""

from __future__ import annotations

import time
from typing import Any

import pytest

from eskit_tasks.cli import Exit, main
from eskit_tasks.fleet.constants import COMPACT_STREAM_TASK, FAN_OUT_TASK
from eskit_tasks.fleet.progress import new_run_id
from eskit_tasks.fleet.resources import resources_of
from eskit_tasks.fleet.runs import CompactionRun
from eskit_tasks.stores.sql_runs import find_run
from tests.test_fleet_in_process import InProcessFleet, _running, fleet  # noqa: F401


def _paused_run(
    fleet: InProcessFleet,  # noqa: F811
    *queued: str,
    counted: bool = False,
) -> CompactionRun:
    """A run paused before its fan-out ran, with tasks for ``queued`` already sent
    (``counted``: as candidates of the run, as a fan-out page counts the tasks it sends
    before sending them; otherwise each becomes one as it reports)."""
    run_id = new_run_id()
    kwargs: dict[str, Any] = {"run_id": run_id, "min_events": 5, "retain_last": 1}
    progress = resources_of(fleet.app).progress
    progress.create(run_id, kwargs, finish=True)
    if counted:
        from eskit_tasks.fleet.progress import Page

        progress.store_page(run_id, Page(0, 1, False, tuple(("ledger", s) for s in queued)))
    run = CompactionRun(run_id, app=fleet.app)
    assert run.pause() is True
    fleet.app.tasks[FAN_OUT_TASK].apply_async(kwargs=kwargs)
    for stream_id in queued:
        fleet.app.tasks[COMPACT_STREAM_TASK].apply_async(
            args=("ledger", stream_id), kwargs={"run_id": run_id, "retain_last": 1}
        )
    return run


def test_a_paused_run_enqueues_nothing_and_its_queued_tasks_wait_until_resumed(
    fleet: InProcessFleet,  # noqa: F811
):
    for n in range(6):
        fleet.seed(f"s-{n}", 8)
    run = _paused_run(fleet, "s-0")
    time.sleep(2.5)  # the fan-out and the queued task have each looked at least twice
    now = run.progress()
    assert (now.state, now.candidates, now.done) == ("paused", 0, 0)
    assert fleet.live("s-0") == list(range(1, 9))  # nothing was compacted
    assert fleet.store.compaction_log() == []
    assert run.resume() is True
    final = run.wait(timeout=60, poll=0.05)
    assert (final.candidates, final.done, final.outcomes) == (6, 6, {"compacted": 6})
    assert all(fleet.live(f"s-{n}") == [8] for n in range(6))


def test_a_cancelled_run_ends_its_queued_tasks_cancelled_without_touching_the_database(
    fleet: InProcessFleet,  # noqa: F811
):
    for n in range(4):
        fleet.seed(f"s-{n}", 8)
    run = _paused_run(fleet, "s-0", "s-1", counted=True)
    time.sleep(1.2)
    assert run.cancel() is True
    final = run.wait(timeout=60, poll=0.05)
    assert final.finished and final.state == "cancelled"
    assert (final.candidates, final.done, final.outcomes) == (2, 2, {"cancelled": 2})
    assert all(fleet.live(f"s-{n}") == list(range(1, 9)) for n in range(4))
    assert fleet.store.compaction_log() == []
    assert run.resume() is False and run.pause() is False  # cancelled stays cancelled
    record = find_run(fleet.store.engine, run.run_id)
    assert record is not None and record.outcomes == {"cancelled": 2}


def test_a_finished_run_cannot_be_paused_and_the_commands_say_so(
    fleet: InProcessFleet,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    from eskit_tasks.fleet import runs as runs_module
    from eskit_tasks.fleet.runs import compact_all

    fleet.seed("s-0", 8)
    run = compact_all(min_events=5, app=fleet.app)
    run.wait(timeout=60, poll=0.05)
    assert run.pause() is False and run.cancel() is False
    monkeypatch.setattr(runs_module, "_default_app", lambda: fleet.app)
    assert main(["pause", run.run_id]) == Exit.ERROR
    assert "has ended" in capsys.readouterr().err
    live = _paused_run(fleet)
    assert main(["resume", live.run_id]) == Exit.OK
    assert "running" in capsys.readouterr().out
    assert main(["cancel", live.run_id, "--json"]) == Exit.OK
    assert '"state": "cancelled"' in capsys.readouterr().out
    live.wait(timeout=30, poll=0.05)  # its fan-out has stopped before the next test
    assert main(["pause", new_run_id()]) != Exit.OK  # unknown run


def test_ctrl_c_while_waiting_leaves_the_run_going_and_says_how_to_stop_it(
    fleet: InProcessFleet,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    from eskit_tasks.fleet import runs as runs_module

    run = _paused_run(fleet)
    monkeypatch.setattr(runs_module, "_default_app", lambda: fleet.app)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(CompactionRun, "wait", interrupted)
    assert main(["status", run.run_id, "--wait"]) == Exit.INTERRUPTED
    said = capsys.readouterr().err
    assert f"eskit-tasks cancel {run.run_id}" in said and "goes on" in said
    assert run.progress().state == "paused"  # untouched
    run.cancel()
    monkeypatch.undo()
    run.wait(timeout=30, poll=0.05)  # its fan-out has stopped before the next test


def test_a_task_cancelled_while_it_waited_for_the_throttle_touches_nothing(
    fleet: InProcessFleet,  # noqa: F811
):
    """From review: the run's state was read once, before the throttle's wait; a run
    cancelled meanwhile still compacted once admitted."""
    from eskit_tasks.fleet.throttle import Throttle, global_scope, set_caps

    fleet.seed("s-0", 8)
    res = resources_of(fleet.app)
    scope = global_scope(0, 0)
    set_caps(res.redis, scope, max_concurrent=1)
    holder = Throttle(res.redis, [scope], lease=30)
    assert holder.try_admit() == 0.0  # the one slot is taken
    run = _paused_run(fleet, counted=False)
    assert run.resume() is True
    fleet.app.tasks[COMPACT_STREAM_TASK].apply_async(
        args=("ledger", "s-0"), kwargs={"run_id": run.run_id, "retain_last": 1}
    )
    time.sleep(1.5)  # the task waits for the slot
    assert run.cancel() is True
    holder.release()
    final = run.wait(timeout=60, poll=0.05)
    assert final.outcomes == {"cancelled": 1}, final
    assert fleet.live("s-0") == list(range(1, 9)) and fleet.store.compaction_log() == []
    set_caps(res.redis, scope, max_concurrent=0)


def test_a_cancelled_run_sends_the_page_it_stored_but_never_sent_so_it_can_finish(
    fleet: InProcessFleet,  # noqa: F811
):
    """From review: a page stored (its streams counted) whose publish failed or whose
    worker died, then the run cancelled: the next copy stopped the fan-out and the run
    waited for ever for those streams."""
    from eskit_tasks.fleet.progress import Page

    for n in range(3):
        fleet.seed(f"s-{n}", 8)
    run_id = new_run_id()
    kwargs: dict[str, Any] = {"run_id": run_id, "min_events": 5, "retain_last": 1}
    progress = resources_of(fleet.app).progress
    progress.create(run_id, kwargs, finish=True)
    streams = tuple(("ledger", f"s-{n}") for n in range(3))
    assert progress.store_page(run_id, Page(0, 3, True, streams)) is not None  # never sent
    run = CompactionRun(run_id, app=fleet.app)
    assert run.cancel() is True
    fleet.app.tasks[FAN_OUT_TASK].apply_async(kwargs=kwargs)  # the page's next copy
    final = run.wait(timeout=30, poll=0.05)
    assert (final.candidates, final.done, final.outcomes) == (3, 3, {"cancelled": 3})
    assert all(fleet.live(f"s-{n}") == list(range(1, 9)) for n in range(3))


def test_a_cancelled_copy_of_a_task_whose_first_attempt_committed_reports_the_deletion(
    fleet: InProcessFleet,  # noqa: F811
):
    """From review: a copy committed and died before claiming its result, the run was
    then cancelled, and the redelivered copy said ``cancelled``: the deletion went
    unreported. A copy that follows an attempt reads the audit log first."""
    from eskit_tasks.fleet.redelivery import done_key

    fleet.seed("s-0", 8)
    run_id = new_run_id()
    res = resources_of(fleet.app)
    res.progress.create(run_id, {"run_id": run_id}, finish=True)
    task = fleet.app.tasks[COMPACT_STREAM_TASK]
    first = task.apply_async(
        args=("ledger", "s-0"), kwargs={"run_id": run_id, "retain_last": 1}, task_id="t-commit"
    ).get(timeout=30)
    assert first["outcome"] == "compacted"
    fleet.redis.delete(done_key("t-commit"))  # as if it died before claiming...
    fleet.app.backend.forget("t-commit")  # ...and before storing a result
    assert CompactionRun(run_id, app=fleet.app).cancel() is True
    again = task.apply_async(
        args=("ledger", "s-0"),
        kwargs={"run_id": run_id, "retain_last": 1},
        task_id="t-commit",
        retries=1,
    ).get(timeout=30)
    assert (again["outcome"], again["recovered"], again["events_deleted"]) == (
        "compacted",
        True,
        7,
    )
