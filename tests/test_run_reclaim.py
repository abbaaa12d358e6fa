"""A run ends by reclaiming the space of what it deleted (ESKIT_RECLAIM=auto), once,
with measured sizes in its summary; a dry run, a run that deleted nothing and
ESKIT_RECLAIM=off end without it. The end is sent again by any later report of a
complete run, so a worker killed between completing a run and sending its end does not
leave the run "running" for ever.

Fast tier: the in-process fleet of tests/test_fleet_in_process.py (memory://, fakeredis,
SQLite); tests/fleet/test_reclaim_fleet.py runs the same on PostgreSQL with real workers.
"""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest

from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.fleet import fan_out as fan_out_module
from eskit_tasks.fleet import observability
from eskit_tasks.fleet.progress import RunProgressStore, new_run_id
from eskit_tasks.fleet.resources import resources_of
from eskit_tasks.fleet.runs import compact_all
from tests.test_fleet_in_process import InProcessFleet, _running, fleet  # noqa: F401


def _result(stream_id: str, deleted: int, stream_type: str = "ledger") -> CompactionResult:
    return CompactionResult(
        stream_type=stream_type,
        stream_id=stream_id,
        outcome=Outcome.COMPACTED if deleted else Outcome.NOTHING_TO_COMPACT,
        events_deleted=deleted,
        compaction_id=f"c-{stream_id}",
    )


def test_a_run_that_deleted_events_ends_by_reclaiming_their_space(
    fleet: InProcessFleet,  # noqa: F811
):
    for n in range(6):
        fleet.seed(f"s-{n}", 400)
    final = compact_all(min_events=5, retain_last=1, app=fleet.app).wait(timeout=60, poll=0.05)
    assert final.finished and final.finished_at is not None
    assert final.deleted_by_type == {"ledger": 6 * 399}
    store = final.reclaim["store"]
    # The SQLite file of the in-process fleet allows incremental vacuum: it shrank.
    assert store["mode"] == "incremental", store
    assert store["total_bytes_after"] < store["total_bytes_before"], store
    assert store["free_bytes_after"] == 0
    assert final.reclaim["applications"] == {}


@pytest.mark.parametrize("how", ["dry run", "nothing deleted", "ESKIT_RECLAIM=off"])
def test_a_run_without_deletions_or_with_reclaim_off_ends_without_reclaiming(
    fleet: InProcessFleet,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    how: str,
):
    calls: list[Any] = []
    monkeypatch.setattr("eskit_tasks.fleet.finish.reclaim", lambda *a, **k: calls.append(a))
    fleet.seed("s-0", 10)
    settings = resources_of(fleet.app).settings
    if how == "ESKIT_RECLAIM=off":
        monkeypatch.setattr(
            resources_of(fleet.app), "settings", settings.model_copy(update={"reclaim": "off"})
        )
    policy: dict[str, Any] = {"min_events": 5}
    if how == "dry run":
        policy["dry_run"] = True
    elif how == "nothing deleted":
        policy["min_events"] = 50  # no candidate
    final = compact_all(**policy, app=fleet.app).wait(timeout=60, poll=0.05)
    assert final.finished and final.reclaim is None and calls == []


def test_a_complete_run_is_ended_by_a_later_report_if_its_end_was_never_sent():
    """The worker whose report completed the run died before sending finish_run: the
    redelivered copy reports the same stream again, which answers "complete" again."""
    progress = RunProgressStore(fakeredis.FakeRedis(), ttl=600)
    run = new_run_id()
    progress.create(run, {}, finish=True)
    page = fan_out_module.Page(0, 2, True, (("ledger", "a"), ("ledger", "b")))
    assert progress.store_page(run, page) is not None
    assert progress.advance(run, page, depth=0).complete is False
    assert progress.report(run, _result("a", 5)).complete is False
    first = progress.report(run, _result("b", 0))
    assert (first.counted, first.complete) == (True, True)
    again = progress.report(run, _result("b", 0))  # a redelivered copy, before the end
    assert (again.counted, again.complete) == (False, True)
    assert not progress.get(run).finished
    assert progress.finish(run, {"store": None, "applications": {}}) is True
    assert progress.finish(run, {"store": "second"}) is False  # the first end stands
    late = progress.report(run, _result("b", 0))
    assert (late.counted, late.complete) == (False, False)
    got = progress.get(run)
    assert got.finished and got.reclaim == {"store": None, "applications": {}}


def test_the_last_page_ends_a_run_whose_streams_all_reported_before_it_was_counted():
    """Every task reported before the fan-out moved its cursor past the last page: the
    page's advance is what completes the run."""
    progress = RunProgressStore(fakeredis.FakeRedis(), ttl=600)
    run = new_run_id()
    progress.create(run, {}, finish=True)
    page = fan_out_module.Page(0, 1, True, (("ledger", "a"),))
    assert progress.store_page(run, page) is not None
    assert progress.report(run, _result("a", 3)).complete is False  # fan-out not done
    advanced = progress.advance(run, page, depth=0)
    assert (advanced.claimed, advanced.complete) == (True, True)
    duplicate = progress.advance(run, page, depth=0)  # a copy of that page
    assert (duplicate.claimed, duplicate.complete) == (False, True)


def test_a_run_without_a_finishing_step_is_finished_by_its_last_report():
    progress = RunProgressStore(fakeredis.FakeRedis(), ttl=600)
    run = new_run_id()
    progress.create(run, {}, finish=False)
    page = fan_out_module.Page(0, 1, True, (("ledger", "a"),))
    progress.store_page(run, page)
    progress.advance(run, page, depth=0)
    assert progress.report(run, _result("a", 3)).complete is False
    assert progress.get(run).finished


def test_a_lost_finish_message_is_sent_again_by_the_redelivered_report(
    fleet: InProcessFleet,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    """End to end: the first send of finish_run is lost (the worker died after its
    report completed the run); the task's redelivered copy, finding its result claimed,
    reports again and sends it."""
    real = observability.send_finish
    lost: list[str] = []

    def lose_the_first(app: Any, run_id: str) -> None:
        if not lost:
            lost.append(run_id)
            return
        real(app, run_id)

    monkeypatch.setattr(observability, "send_finish", lose_the_first)
    fleet.seed("s-0", 10)
    run = compact_all(min_events=5, app=fleet.app)
    with pytest.raises(Exception, match="not finished"):
        run.wait(timeout=3, poll=0.05)
    assert lost == [run.run_id] and run.progress().reclaiming
    # The redelivered copy finds the task's result claimed and counts it again, as
    # redelivery.already_finished does.
    claimed = _claimed_results(fleet)
    assert [r.stream_id for r in claimed] == ["s-0"]
    observability.report_to_run(resources_of(fleet.app), run.run_id, claimed[0], fleet.app)
    final = run.wait(timeout=30, poll=0.05)
    assert final.finished and final.reclaim["store"]["mode"] == "incremental"


def _claimed_results(of: InProcessFleet) -> list[CompactionResult]:
    """The results claimed by finished tasks (eskit:done:<hash of the task id>)."""
    import json

    from eskit_tasks.fleet.constants import DONE_PREFIX

    return [
        CompactionResult.model_validate(json.loads(of.redis.get(key))["result"])
        for key in of.redis.scan_iter(f"{DONE_PREFIX}*")
    ]
