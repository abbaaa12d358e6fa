"""A pyeventsourcing application through the fleet: real workers compact its aggregates
in its own database (here a SQLite file; the adapter's PostgreSQL path is in
tests/eventsourcing), from compact_all's fan-out and from the command line."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from eskit_tasks import compact_all
from eskit_tasks.cli import Exit, main
from eskit_tasks.core.registry import get_source, unregister_source
from eskit_tasks.testing.services import eventsourcing_postgres_env
from tests.eventsourcing.fleet_apps import Ledgers
from tests.fleet.conftest import Fleet, stream_results

MODULES = "tests.fleet_deciders,tests.eventsourcing.fleet_apps"


@pytest.fixture(params=["sqlite", "postgres"])
def ledgers(request: pytest.FixtureRequest, tmp_path: Path, postgres_url: str) -> Any:
    """The application: in a SQLite file, or in the fleet's own PostgreSQL database
    beside the eskit tables (its aggregates' rows in eskit_streams must not make them
    candidates of the event store too)."""
    if request.param == "sqlite":
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(tmp_path / "l.db"),
        }
    else:
        env = eventsourcing_postgres_env(postgres_url)
        engine = sa.create_engine(postgres_url)
        with engine.begin() as conn:  # a clean application for each test
            conn.exec_driver_sql("DROP TABLE IF EXISTS ledgers_events, ledgers_snapshots")
        engine.dispose()
    app = Ledgers(env=env)
    app.test_env = env
    yield app
    app.close()


def _worker(fleet: Fleet, app: Any, name: str = "w1", **env: str) -> None:
    fleet.worker(
        name, ESKIT_DECIDER_MODULES=MODULES, ESKIT_TEST_ES_ENV=json.dumps(app.test_env), **env
    )


def _app_results(fleet: Fleet) -> list[dict[str, Any]]:
    """The application's streams' results (alone or in a batch)."""
    return [r for r in stream_results(fleet.broker) if r["stream_type"] == "Ledgers"]


def test_compact_all_compacts_an_applications_aggregates(
    fleet: Fleet, ledgers: Any, postgres_url: str
):
    ids = [ledgers.open_with(list(range(1, 41))) for _ in range(6)]
    small = ledgers.open_with([1])  # 2 events: below min_events
    fleet.seed("ledger", "own", 30)  # the event store's own streams go on as before
    before = {i: ledgers.state(i) for i in [*ids, small]}
    _worker(fleet, ledgers)

    final = compact_all(min_events=10, retain_last=5).wait(timeout=120)
    assert (final.candidates, final.outcomes) == (7, {"compacted": 7}), fleet.worker_logs()
    results = _app_results(fleet)
    assert sorted(r["stream_id"] for r in results) == sorted(str(i) for i in ids)
    assert {(r["snapshot_version"], r["events_deleted"]) for r in results} == {(36, 36)}
    fresh = Ledgers(env=ledgers.test_env)
    assert {i: fresh.state(i) for i in [*ids, small]} == before
    fresh.close()
    fleet.assert_nothing_lost()
    # The run ends by reclaiming the space once: the event store's file or tables, and
    # the application's tables on PostgreSQL (the library turned autovacuum off there;
    # on SQLite the application's file is never vacuumed).
    assert final.finished_at is not None and final.reclaim is not None, final
    assert final.reclaim["store"]["total_bytes_after"] > 0
    app_reclaim = final.reclaim["applications"]["Ledgers"]
    if ledgers.test_env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite":
        assert app_reclaim is None
    else:
        assert app_reclaim["mode"] == "vacuum", app_reclaim
        assert [t["table"] for t in app_reclaim["before"]["tables"]] == [
            "public.ledgers_events",
            "public.ledgers_snapshots",
        ]
        engine = sa.create_engine(postgres_url)
        with engine.connect() as conn:
            vacuums = conn.exec_driver_sql(
                "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'ledgers_events'"
            ).scalar_one()
        engine.dispose()
        assert vacuums == 1  # once for the run, not once per aggregate

    again = compact_all(min_events=1, retain_last=5).wait(timeout=120)
    assert again.outcomes.get("compacted", 0) == 0, fleet.worker_logs()


def test_kill_9_mid_compaction_loses_nothing_and_compacts_once(fleet: Fleet, ledgers: Any):
    [ledger_id] = [ledgers.open_with(list(range(1, 601)))]
    before = ledgers.state(ledger_id)
    _worker(fleet, ledgers, ESKIT_TEST_SLOW_S="0.005")
    run = compact_all(min_events=1, retain_last=1)
    os.kill(fleet.wait_for_marker(str(ledger_id)), signal.SIGKILL)  # OOM killer, say
    final = run.wait(timeout=120)
    assert final.outcomes == {"compacted": 1}, fleet.worker_logs()
    fresh = Ledgers(env=ledgers.test_env)
    assert fresh.state(ledger_id) == before
    fresh.close()
    [result] = _app_results(fleet)
    assert (result["snapshot_version"], result["events_deleted"]) == (600, 600)


def test_the_command_line_lists_and_compacts_an_application(
    ledgers: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """The event store's own database is another (an empty SQLite file, here)."""
    ids = [ledgers.open_with(list(range(1, 21))) for _ in range(3)]
    own = f"sqlite:///{tmp_path / 'eskit.db'}"
    assert main(["init-db", "--database", own]) == Exit.OK
    capsys.readouterr()
    monkeypatch.setenv("ESKIT_TEST_ES_ENV", json.dumps(ledgers.test_env))
    # Imported here already (without the variable): --decider-module imports it anew.
    monkeypatch.delitem(sys.modules, "tests.eventsourcing.fleet_apps")
    try:
        args = ["--database", own, "--decider-module", "tests.eventsourcing.fleet_apps", "--json"]
        assert main(["candidates", "--min-events", "5", *args]) == Exit.OK
        listed = json.loads(capsys.readouterr().out)
        assert sorted(c["stream_id"] for c in listed) == sorted(str(i) for i in ids)
        assert {c["stream_type"] for c in listed} == {"Ledgers"}
        code = main(["compact", "Ledgers", str(ids[0]), "--retain-last", "2", *args])
        assert code == Exit.OK
        assert json.loads(capsys.readouterr().out)["events_deleted"] == 19
        code = main(["compact-all", "--local", "--retain-last", "2", *args])
        *streams, summary = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert (code, summary["outcomes"]) == (Exit.OK, {"compacted": 2})  # the other two
        assert sorted(s["stream_id"] for s in streams) == sorted(str(i) for i in ids[1:])
        fresh = Ledgers(env=ledgers.test_env)
        assert [fresh.state(i)["total"] for i in ids] == [210, 210, 210]
        fresh.close()
    finally:
        source = get_source("Ledgers")
        if source is not None:
            source.close()  # type: ignore[attr-defined]
        unregister_source("Ledgers")
