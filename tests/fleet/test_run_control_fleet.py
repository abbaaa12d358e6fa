"""Pause, resume and cancel a run mid-way with real workers, redis-servers and
PostgreSQL (issue 14): while paused the run's done count stops (the compaction running
at that moment finishes) and its queued tasks wait; resumed, it goes on; cancelled, its
remaining tasks end ``cancelled`` and their streams keep every event."""

from __future__ import annotations

import time

from eskit_tasks import compact_all
from tests.fleet.conftest import Fleet, wait_until

STREAMS, EVENTS = 24, 20


def test_pause_resume_then_cancel_a_run_with_queued_tasks(fleet: Fleet):
    for n in range(STREAMS):
        fleet.seed("slow", f"s-{n:02d}", EVENTS)
    fleet.worker(
        "w1", concurrency=1, ESKIT_DECIDER_MODULES="tests.fleet_deciders", ESKIT_TEST_SLOW_S="0.01"
    )
    run = compact_all(min_events=1, retain_last=1)
    wait_until(lambda: run.progress().done >= 2, 60, "two streams compacted")
    assert run.pause() is True
    time.sleep(1.0)  # the compaction in flight finishes
    paused_at = run.progress().done
    time.sleep(3.0)
    held = run.progress()
    assert held.state == "paused" and held.done == paused_at, fleet.worker_logs()
    assert held.candidates == STREAMS  # queued, waiting

    assert run.resume() is True
    wait_until(lambda: run.progress().done >= paused_at + 3, 60, "the run going on")
    assert run.cancel() is True
    final = run.wait(timeout=60)
    assert final.finished and final.state == "cancelled", fleet.worker_logs()
    compacted = final.outcomes.get("compacted", 0)
    cancelled = final.outcomes.get("cancelled", 0)
    assert compacted + cancelled == STREAMS and cancelled > 0, final.outcomes
    intact = [n for n in range(STREAMS) if len(fleet.live_versions("slow", f"s-{n:02d}")) == EVENTS]
    assert len(intact) == cancelled  # a cancelled task read and wrote nothing
    assert len(fleet.store.compaction_log(run_id=run.run_id)) == compacted
    fleet.assert_nothing_lost()
