"""Runs you can see (issue 14): every run is recorded in ``eskit_runs`` with who started
it, its policy, totals and what its end reclaimed; audit rows name their run;
``eskit-tasks runs`` lists them and ``eskit-tasks log --run ID`` shows one run's
compactions. Fast tier: the in-process fleet (memory://, fakeredis, SQLite) and the
local CLI; tests/fleet runs the same with real workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eskit_tasks import SqlEventStore
from eskit_tasks.cli import main
from eskit_tasks.fleet.constants import FAN_OUT_TASK
from eskit_tasks.fleet.progress import new_run_id
from eskit_tasks.fleet.runs import compact_all
from eskit_tasks.stores.sql_runs import find_run, recent_runs
from eskit_tasks.testing.deciders import deposits
from tests.test_fleet_in_process import InProcessFleet, _running, fleet  # noqa: F401


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> object:
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    if args[0] == "compact-all":  # a line a stream, then the summary line
        return json.loads(captured.out.strip().splitlines()[-1])
    return json.loads(captured.out)


def test_a_fleet_run_is_recorded_with_its_trigger_totals_and_audit_rows(
    fleet: InProcessFleet,  # noqa: F811
):
    for n in range(5):
        fleet.seed(f"s-{n}", 8)
    run = compact_all(min_events=5, retain_last=2, app=fleet.app)
    final = run.wait(timeout=60, poll=0.05)
    assert final.finished
    record = find_run(fleet.store.engine, run.run_id)
    assert record is not None and record.state == "finished"
    assert (record.trigger, record.candidates, record.done) == ("shell", 5, 5)
    assert record.outcomes == {"compacted": 5} and record.events_deleted == 5 * 6
    assert record.policy["retain_last"] == 2 and record.policy["min_events"] == 5
    assert record.reclaim is not None and record.reclaim["store"]["mode"] == "incremental"
    assert record.finished_at is not None and record.finished_at >= record.started_at
    rows = fleet.store.compaction_log(run_id=run.run_id)
    assert sorted(r.stream_id for r in rows) == [f"s-{n}" for n in range(5)]
    assert fleet.store.compaction_log(run_id=new_run_id()) == []


def test_a_beat_run_is_recorded_as_beat_under_the_id_it_derives(
    fleet: InProcessFleet,  # noqa: F811
):
    """Beat sends the fan-out with no run id: the run's id comes from the task's, and
    its record says beat."""
    fleet.seed("s-0", 8)
    sent = fleet.app.tasks[FAN_OUT_TASK].apply_async(kwargs={"min_events": 5})
    answer = sent.get(timeout=30)
    from eskit_tasks.fleet.runs import CompactionRun

    CompactionRun(answer["run_id"], app=fleet.app).wait(timeout=60, poll=0.05)
    record = find_run(fleet.store.engine, answer["run_id"])
    assert record is not None and (record.trigger, record.state) == ("beat", "finished")


def test_a_dry_run_is_recorded_and_reclaims_nothing(fleet: InProcessFleet):  # noqa: F811
    fleet.seed("s-0", 8)
    run = compact_all(min_events=5, dry_run=True, app=fleet.app)
    run.wait(timeout=60, poll=0.05)
    record = find_run(fleet.store.engine, run.run_id)
    assert record is not None and record.outcomes == {"dry_run": 1}
    assert record.reclaim is None and record.events_deleted == 0


def test_the_runs_command_lists_local_runs_newest_first_and_log_filters_by_run(
    capsys, tmp_path: Path
):
    url = f"sqlite:///{tmp_path / 'events.db'}"
    store = SqlEventStore.from_url(url)
    for n in range(3):
        store.append("ledger", f"s-{n}", deposits(*range(1, 11)), expected_version=0)
    local = [
        "compact-all",
        "--local",
        "--database",
        url,
        "--decider-module",
        "tests.fleet_deciders",
    ]
    first = _json(capsys, *local, "--retain-last", "4")
    store.append("ledger", "s-0", deposits(*range(11, 21)), expected_version=10)
    second = _json(capsys, *local, "--retain-last", "4")
    assert first["run_id"] != second["run_id"]

    listed = _json(capsys, "runs", "--database", url)
    assert [r["run_id"] for r in listed] == [second["run_id"], first["run_id"]]
    newest = listed[0]
    assert (newest["trigger"], newest["state"], newest["outcomes"]) == (
        "local",
        "finished",
        {"compacted": 1},
    )
    assert newest["events_deleted"] == 10 and newest["policy"]["retain_last"] == 4
    assert listed[1]["outcomes"] == {"compacted": 3} and listed[1]["events_deleted"] == 18

    logged = _json(capsys, "log", "--database", url, "--run", first["run_id"])
    assert sorted(r["stream_id"] for r in logged) == ["s-0", "s-1", "s-2"]
    assert {r["run_id"] for r in logged} == {first["run_id"]}
    assert len(_json(capsys, "log", "--database", url)) == 4

    code = main(["runs", "--database", url])
    text = capsys.readouterr().out
    assert code == 0 and first["run_id"][:8] in text and "local" in text
    assert [r.run_id for r in recent_runs(store.engine, 1)] == [second["run_id"]]
    store.engine.dispose()


def test_a_compaction_outside_any_run_has_no_run_id(capsys, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'events.db'}"
    store = SqlEventStore.from_url(url)
    store.append("ledger", "a", deposits(*range(1, 11)), expected_version=0)
    code = main(
        ["compact", "ledger", "a", "--database", url, "--decider-module", "tests.fleet_deciders"]
    )
    assert code == 0
    capsys.readouterr()
    [row] = store.compaction_log()
    assert row.run_id is None
    store.engine.dispose()


def test_a_run_stopped_by_an_error_is_recorded_as_failed_with_it(
    fleet: InProcessFleet,  # noqa: F811
):
    run_id = new_run_id()
    sent = fleet.app.tasks[FAN_OUT_TASK].apply_async(
        kwargs={"run_id": run_id, "min_events": 0, "trigger": "cli"}
    )
    assert "min_events" in sent.get(timeout=30)["error"]
    record = find_run(fleet.store.engine, run_id)
    assert record is not None and record.state == "failed"
    assert record.trigger == "cli" and "min_events" in (record.error or "")


def test_the_runs_gauge_counts_runs_by_state_from_the_database(tmp_path: Path):
    from datetime import UTC, datetime, timedelta

    from eskit_tasks.stores import sql_runs

    store = SqlEventStore.from_url(f"sqlite:///{tmp_path / 'events.db'}")
    engine, now = store.engine, datetime.now(UTC)
    ids = [new_run_id() for _ in range(5)]
    for run_id in ids:
        sql_runs.record_start(engine, run_id, "shell", {}, started_at=now - timedelta(hours=1))
    totals = {"candidates": 1, "done": 1, "outcomes": {"compacted": 1}, "events_deleted": 3}
    sql_runs.record_end(engine, ids[0], **totals)
    sql_runs.record_end(engine, ids[1], **totals, error="fan-out gave up")
    sql_runs.record_end(engine, ids[2], **totals, finished_at=now - timedelta(days=2))
    sql_runs.record_start(engine, new_run_id(), "beat", {}, started_at=now - timedelta(days=9))
    assert sql_runs.run_counts(engine, now=now) == {"running": 2, "finished": 1, "failed": 1}
    store.engine.dispose()
