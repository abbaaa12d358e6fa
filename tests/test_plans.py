"""Plan then apply (issue 14): ``eskit-tasks plan`` stores, per candidate, the cut its
compaction would reach; ``eskit-tasks apply`` compacts exactly those streams through
exactly those versions — never further, even if a stream grew — and skips and reports
a stream whose compaction point moved past the plan. Fast tier: the local CLI on SQLite
and the in-process fleet; tests/fleet/test_plans_fleet.py does it with real workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from eskit_tasks import NewEvent, SqlEventStore
from eskit_tasks.cli import Exit, main
from eskit_tasks.fleet.runs import apply_plan
from eskit_tasks.stores.sql_runs import find_run
from eskit_tasks.testing.deciders import deposits
from tests.test_fleet_in_process import InProcessFleet, _running, fleet  # noqa: F401

DECIDERS = ("--decider-module", "tests.fleet_deciders")


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    try:
        parsed = json.loads(captured.out)
    except json.JSONDecodeError:
        parsed = None
    return code, parsed, captured.out + captured.err


@pytest.fixture
def db(tmp_path: Path) -> tuple[str, SqlEventStore]:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    store = SqlEventStore.from_url(url)
    for name in ("a", "b", "c"):
        store.append("ledger", name, deposits(*range(1, 21)), expected_version=0)
    store.append("ledger", "small", deposits(1, 2), expected_version=0)
    yield url, store
    store.engine.dispose()


def test_apply_compacts_exactly_the_planned_streams_through_the_planned_versions(capsys, db):
    url, store = db
    code, plan, said = _run(
        capsys, "plan", "--database", url, "--retain-last", "5", "--min-events", "10",
        "--json", *DECIDERS,
    )  # fmt: skip
    assert code == Exit.OK, said
    cuts = {(s["stream_type"], s["stream_id"]): s["through_version"] for s in plan["streams"]}
    assert cuts == {("ledger", "a"): 15, ("ledger", "b"): 15, ("ledger", "c"): 15}
    assert plan["totals"] == {"streams": 3, "events": 45, "bytes": plan["totals"]["bytes"]}
    assert plan["totals"]["bytes"] > 0 and plan["verified"] is False
    assert store.compaction_log() == []  # planning deletes nothing

    # Meanwhile: "a" grows, "b" is compacted further by another run, "d" appears.
    store.append("ledger", "a", deposits(*range(21, 41)), expected_version=20)
    code, _, said = _run(
        capsys, "compact", "ledger", "b", "--database", url, "--retain-last", "1", *DECIDERS
    )
    assert code == Exit.OK, said
    store.append("ledger", "d", deposits(*range(1, 31)), expected_version=0)

    code, applied, said = _run(capsys, "apply", plan["plan_id"], "--local", "--database", url,
                               "--json", *DECIDERS)  # fmt: skip
    assert code == Exit.OK, said
    assert applied["outcomes"] == {"compacted": 2, "nothing_to_compact": 1}
    assert applied["moved_past_plan"] == [{"stream_type": "ledger", "stream_id": "b"}]
    # Never further than planned: "a" grew to 40, yet only 1..15 went.
    assert [e.version for e in store.read("ledger", "a")] == list(range(16, 41))
    assert [e.version for e in store.read("ledger", "c")] == list(range(16, 21))
    assert [e.version for e in store.read("ledger", "d")] == list(range(1, 31))  # unplanned
    rows = store.compaction_log(run_id=applied["run_id"])
    assert sorted((r.stream_id, r.through_version) for r in rows) == [("a", 15), ("c", 15)]
    record = find_run(store.engine, applied["run_id"])
    assert record is not None and record.trigger == "plan" and record.plan_id == plan["plan_id"]

    code, shown, _ = _run(capsys, "plan", "show", plan["plan_id"], "--database", url, "--json")
    assert code == Exit.OK and [s["stream_id"] for s in shown["streams"]] == ["a", "b", "c"]


def test_a_verified_plan_leaves_out_a_stream_that_would_fail_and_says_why(capsys, db):
    url, store = db
    store.append(
        "lossy",
        "l-1",
        [NewEvent("Tagged", {"tag": f"t{n}"}) for n in range(12)],
        expected_version=0,
    )
    code, plan, said = _run(
        capsys, "plan", "--database", url, "--verify", "--min-events", "10", "--json", *DECIDERS
    )
    assert code == Exit.OK, said
    assert plan["verified"] is True
    assert {s["stream_id"] for s in plan["streams"]} == {"a", "b", "c"}
    assert all(s["outcome"] == "dry_run" for s in plan["streams"])
    [left_out] = plan["not_planned"]
    assert (left_out["stream_id"], left_out["outcome"]) == ("l-1", "verification_failed")
    assert store.compaction_log() == []


def test_an_expired_or_unknown_plan_is_refused_and_nothing_is_compacted(capsys, db):
    url, store = db
    code, plan, _ = _run(capsys, "plan", "--database", url, "--json", *DECIDERS)
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE eskit_plans SET expires_at = created_at"))
    code, _, said = _run(capsys, "apply", plan["plan_id"], "--local", "--database", url, *DECIDERS)
    assert code == Exit.USAGE and "expired" in said and "eskit-tasks plan" in said
    code, _, said = _run(capsys, "apply", "f" * 32, "--local", "--database", url, *DECIDERS)
    assert code == Exit.USAGE and "no plan" in said
    assert store.compaction_log() == []


def test_the_fleet_applies_a_plan_through_the_planned_versions(
    fleet: InProcessFleet,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
):
    for name in ("p", "q"):
        fleet.seed(name, 12)
    url = str(fleet.store.engine.url)
    code, plan, said = _run(
        capsys, "plan", "--database", url, "--retain-last", "2", "--json", *DECIDERS
    )
    assert code == Exit.OK, said
    fleet.seed("p", 8)  # grows to 20 after planning
    run = apply_plan(plan["plan_id"], app=fleet.app)
    final = run.wait(timeout=60, poll=0.05)
    assert final.outcomes == {"compacted": 2}, final
    assert fleet.live("p") == list(range(11, 21))  # through the planned 10, not 18
    assert fleet.live("q") == [11, 12]
    record = find_run(fleet.store.engine, run.run_id)
    assert record is not None and (record.trigger, record.plan_id) == ("plan", plan["plan_id"])


def test_a_copy_of_a_plan_page_that_read_fewer_streams_still_caps_every_stream_it_sends(
    fleet: InProcessFleet,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    """From review: the caps came from this copy's own read of the plan, the streams from
    the page the first copy stored; a copy that read fewer (a fuller queue, a smaller
    page) sent the others uncapped, and they were compacted past the plan."""
    from eskit_tasks.fleet import fan_out as fan_out_module
    from eskit_tasks.fleet.constants import FAN_OUT_TASK
    from eskit_tasks.fleet.progress import Page, new_run_id
    from eskit_tasks.fleet.resources import resources_of
    from eskit_tasks.fleet.runs import CompactionRun

    names = [f"g-{n}" for n in range(4)]
    for name in names:
        fleet.seed(name, 12)
    url = str(fleet.store.engine.url)
    code, plan, said = _run(
        capsys, "plan", "--database", url, "--retain-last", "2", "--json", *DECIDERS
    )
    assert code == Exit.OK, said
    for name in names:
        fleet.seed(name, 8)  # each grows to 20 after planning
    run_id = new_run_id()
    kwargs = {"run_id": run_id, "retain_last": 2, "trigger": "plan", "plan_id": plan["plan_id"]}
    progress = resources_of(fleet.app).progress
    progress.create(run_id, kwargs, finish=True)
    # The first copy stored the whole page, then died before sending it.
    assert progress.store_page(run_id, Page(0, 4, True, tuple(("ledger", n) for n in names)))
    real = fan_out_module.plan_page
    monkeypatch.setattr(  # this copy reads only two rows of the plan
        fan_out_module, "plan_page", lambda *a, **k: real(*a, **{**k, "limit": 2})
    )
    fleet.app.tasks[FAN_OUT_TASK].apply_async(kwargs=kwargs)
    final = CompactionRun(run_id, app=fleet.app).wait(timeout=60, poll=0.05)
    assert final.outcomes == {"compacted": 4}, final
    for name in names:
        assert fleet.live(name) == list(range(11, 21)), name  # through 10, as planned
