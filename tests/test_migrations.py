"""The eskit tables' revisions: created, recognised, upgraded in place, refused.

Each case runs on SQLite and on PostgreSQL (a scratch database of its own: the layout
is changed by hand).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from eskit_tasks import CompactionPolicy, Compactor, SqlEventStore, SqlSnapshotStore, load_state
from eskit_tasks.cli import Exit, main
from eskit_tasks.errors import DatabaseNotReadyError, TableLayoutError
from eskit_tasks.stores import migrate, positions
from eskit_tasks.stores.schema import metadata
from eskit_tasks.testing.deciders import Ledger, deposits, ledger_fold
from eskit_tasks.testing.services import scratch_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'events.db'}"
        return
    with scratch_database(request.getfixturevalue("postgres_url"), "eskit_migrate") as made:
        yield made


def _run(url: str, *statements: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
    engine.dispose()


def _layout(url: str) -> dict[str, object]:
    """Everything about the eskit tables that a migration could get wrong."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        found: dict[str, object] = {}
        for table in sorted(metadata.tables):
            columns = [
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                for c in inspector.get_columns(table)
            ]
            found[table] = (
                columns,
                inspector.get_pk_constraint(table)["constrained_columns"],
                sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
                sorted((i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(table)),
            )
        if engine.dialect.name == "sqlite":
            found["triggers"] = sorted(
                conn.exec_driver_sql(
                    "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger'"
                ).all()
            )
        else:
            found["functions"] = sorted(
                conn.exec_driver_sql(
                    "SELECT proname, prosrc FROM pg_proc WHERE proname LIKE 'eskit%%'"
                ).all()
            )
        if engine.dialect.name == "sqlite":
            found["without rowid"] = sorted(
                row[0]
                for row in conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND sql LIKE '%WITHOUT ROWID%'"
                )
            )
    engine.dispose()
    return found


def tables_at(url: str, revision: str) -> None:
    """Make the eskit tables as they were at ``revision`` (the migrations replayed up to
    it: tests/test_migrations.py checks that the newest replay is the code's layout)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        cfg = migrate._config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    engine.dispose()


def _made_before_migrations(url: str, *, first_layout: bool) -> None:
    """Tables as a release before migrations made them, with a compacted stream."""
    tables_at(url, migrate.FIRST_LAYOUT if first_layout else migrate.SCHEMA_MARKERS)
    _run(url, f"DROP TABLE {migrate.VERSION_TABLE}")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO eskit_streams (stream_type, stream_id, head_version, created_at) "
            "VALUES ('account', 'a-1', 4, '2026-01-01 00:00:00')"
        )
        for n in range(1, 5):
            conn.execute(
                sa.text(
                    "INSERT INTO eskit_events (stream_pk, version, type, data, metadata, "
                    "recorded_at) VALUES (1, :n, 'Deposited', :d, '{}', '2026-01-01 00:00:00')"
                ),
                {"n": n, "d": f'{{"amount":{n}}}'},
            )
    old = b'{"count":3,"last":3,"total":6}'
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO eskit_snapshots (stream_pk, version, state, state_hash, verified, "
                "fence_token, created_at) VALUES (1, 3, :s, :h, true, 7, :t)"
            ),
            {"s": old.decode(), "h": hashlib.sha256(old).hexdigest(), "t": "2026-01-01 00:00:00"},
        )
        conn.execute(sa.text("UPDATE eskit_streams SET compacted_through = 3, fence_token = 7"))
        conn.exec_driver_sql("DELETE FROM eskit_events WHERE version <= 3")
    engine.dispose()


def test_a_new_database_gets_the_layout_of_the_code_at_the_newest_revision(url: str, tmp_path):
    """The migrations make exactly the tables the code describes (columns, types, keys,
    indexes, WITHOUT ROWID on SQLite)."""
    engine = sa.create_engine(url)
    before, after = migrate.upgrade(engine, replay=True)  # through 0001, 0002, ...
    newest = migrate.head()
    assert (before.state, after) == ("empty", migrate.SchemaStatus("current", newest, newest))
    engine.dispose()
    with _another_database_like(url, tmp_path) as plain:
        store = SqlEventStore.from_url(plain)  # an empty database: the newest layout at once
        assert migrate.status(store.engine) == after
        store.engine.dispose()
        assert _layout(url) == _layout(plain)
    assert _layout(url)["triggers" if url.startswith("sqlite") else "functions"]


def _another_database_like(url: str, tmp_path: Path) -> contextlib.AbstractContextManager[str]:
    if url.startswith("sqlite"):
        return contextlib.nullcontext(f"sqlite:///{tmp_path / 'plain.db'}")
    admin = sa.engine.make_url(url).set(database="postgres").render_as_string(hide_password=False)
    return scratch_database(admin, "eskit_plain")


@pytest.mark.parametrize("first_layout", [False, True], ids=["current-layout", "first-layout"])
def test_init_db_upgrades_a_database_made_before_migrations_in_place(
    url: str, first_layout: bool, capsys: pytest.CaptureFixture[str]
):
    _made_before_migrations(url, first_layout=first_layout)
    engine = sa.create_engine(url)
    assert migrate.status(engine).state == "unversioned"
    engine.dispose()
    if first_layout:  # the library and the read-only commands refuse until init-db
        with pytest.raises(DatabaseNotReadyError, match="init-db"):
            SqlEventStore.from_url(url)
        assert main(["log", "--database", url]) == Exit.USAGE
        assert "run eskit-tasks init-db" in capsys.readouterr().err

    assert main(["init-db", "--database", url]) == Exit.OK
    said = capsys.readouterr().out
    assert f"tables from before migrations upgraded to revision {migrate.head()}" in said

    store = SqlEventStore.from_url(url)
    snaps = SqlSnapshotStore(store.engine)
    info = store.stream_info("account", "a-1")
    assert info is not None
    assert (info.head_version, info.compacted_through, info.fence_token) == (4, 3, 7)
    assert [e.version for e in store.read("account", "a-1")] == [4]
    identity = {"unrecorded": lambda s: s}
    got = load_state(store, snaps, Ledger(), dict, "account", "a-1", upcasters=identity)
    assert got == (ledger_fold([1, 2, 3, 4]), 4)
    result = Compactor(
        store=store,
        snapshot_store=snaps,
        decider=Ledger(),
        state_type=dict,
        policy=CompactionPolicy(),
        upcasters=identity,
    ).compact("account", "a-1")
    assert result.outcome == "compacted", result.error
    store.engine.dispose()
    assert main(["init-db", "--database", url]) == Exit.OK
    assert "already current" in capsys.readouterr().out


def _append_as_before_positions(conn: sa.Connection, stream_pk: int, versions: range) -> None:
    """What an eskit-tasks from before revision 0003 does to append: the head moves, the
    events go in without a position."""
    conn.execute(
        sa.text("UPDATE eskit_streams SET head_version = :head WHERE pk = :pk"),
        {"head": versions[-1], "pk": stream_pk},
    )
    for n in versions:
        conn.execute(
            sa.text(
                "INSERT INTO eskit_events (stream_pk, version, type, data, metadata, "
                "recorded_at) VALUES (:pk, :n, 'Deposited', :d, '{}', '2026-06-01 00:00:00')"
            ),
            {"pk": stream_pk, "n": n, "d": f'{{"amount":{n}}}'},
        )


def test_an_older_eskit_tasks_appending_after_the_upgrade_is_given_positions(url: str):
    """A rolling upgrade: a process still running the code from before positions appends
    to the upgraded tables. Its events get positions after every earlier one, a follower
    reads them, and a consumer that has not read them holds them back from compaction
    (without revision 0004 they had no position: never read, and deleted all the same)."""
    _made_before_migrations(url, first_layout=False)
    assert main(["init-db", "--database", url]) == Exit.OK
    store = SqlEventStore.from_url(url)
    store.append("account", "a-1", deposits(5, 6), expected_version=4)
    seen = store.last_position()
    store.save_checkpoint("projection", seen)
    with store.engine.begin() as conn:
        _append_as_before_positions(conn, 1, range(7, 11))
    fresh = list(store.read_all(after_position=seen))
    assert [e.version for e in fresh] == [7, 8, 9, 10]
    assert all(e.position is not None and e.position > seen for e in fresh)
    store.append("account", "a-1", deposits(11), expected_version=10)
    assert [e.version for e in store.read_all(after_position=seen)] == [7, 8, 9, 10, 11]

    result = Compactor(
        store=store,
        snapshot_store=SqlSnapshotStore(store.engine),
        decider=Ledger(),
        state_type=dict,
        policy=CompactionPolicy(retain_last=1),
        upcasters={"unrecorded": lambda s: s},  # the snapshot made before schema markers
    ).compact("account", "a-1")
    assert result.outcome == "compacted", result.error
    assert result.held_back_by is not None and result.held_back_by.consumer == "projection"
    assert [e.version for e in store.read("account", "a-1")] == [7, 8, 9, 10, 11]
    store.engine.dispose()


def test_events_an_older_eskit_tasks_appended_at_revision_0003_are_numbered(url: str):
    """A database left at revision 0003 while an older process appended: those events
    have no position (revision 0004 was not there to give one). The upgrade numbers them
    after every position handed out, so followers read them as the newest events (from
    review: they stayed without a position, and on PostgreSQL SET NOT NULL failed)."""
    tables_at(url, "0003")
    postgresql = not url.startswith("sqlite")
    moved = (
        "SELECT setval('eskit_events_position_seq', 3)"
        if postgresql
        else "INSERT INTO eskit_position_counter (id, last_position) VALUES (1, 3)"
    )
    _run(
        url,
        "INSERT INTO eskit_streams (stream_type, stream_id, head_version, created_at) "
        "VALUES ('account', 'a-1', 3, '2026-01-01 00:00:00')",
        *(
            "INSERT INTO eskit_events (stream_pk, version, type, data, metadata, recorded_at, "
            f"position) VALUES (1, {n}, 'Deposited', '{{\"amount\":{n}}}', '{{}}', "
            f"'2026-01-01 00:00:00', {n})"
            for n in (1, 2, 3)
        ),
        moved,
    )
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        _append_as_before_positions(conn, 1, range(4, 6))
    engine.dispose()
    assert main(["init-db", "--database", url]) == Exit.OK
    store = SqlEventStore.from_url(url)
    assert [(e.version, e.position) for e in store.read_all(after_position=3)] == [(4, 4), (5, 5)]
    assert store.last_position() == 5
    store.append("account", "a-1", deposits(6), expected_version=5)
    assert [e.position for e in store.read("account", "a-1")] == [1, 2, 3, 4, 5, 6]
    store.engine.dispose()


@pytest.mark.services
def test_an_older_eskit_tasks_append_holds_the_append_lock_to_commit(postgres_url: str):
    """Its positions come in commit order like any other append's: the default that gives
    them takes the append lock, held until the transaction ends."""
    with scratch_database(postgres_url, "eskit_migrate") as url:
        store = SqlEventStore.from_url(url)
        store.append("account", "a-1", deposits(1), expected_version=0)
        probe = sa.text("SELECT pg_try_advisory_xact_lock(:key)")
        key = {"key": positions.APPEND_LOCK_KEY}
        with store.engine.connect() as writer, store.engine.connect() as other:
            with writer.begin():
                _append_as_before_positions(writer, 1, range(2, 3))
                with other.begin():
                    assert other.execute(probe, key).scalar_one() is False
            with other.begin():
                assert other.execute(probe, key).scalar_one() is True
        assert [e.position for e in store.read_all()] == [1, 2]
        store.engine.dispose()


def test_a_database_of_an_unknown_layout_is_refused_and_left_alone(url: str):
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    engine.dispose()
    _run(url, "ALTER TABLE eskit_streams DROP COLUMN fence_token")
    engine = sa.create_engine(url)
    with pytest.raises(TableLayoutError, match="eskit_streams lacks column fence_token"):
        migrate.upgrade(engine)
    assert migrate.status(engine).state == "unversioned"  # not even stamped
    engine.dispose()


def test_a_revision_this_code_does_not_know_is_refused(url: str):
    SqlEventStore.from_url(url).engine.dispose()
    _run(url, f"UPDATE {migrate.VERSION_TABLE} SET version_num = '9999'")
    with pytest.raises(TableLayoutError, match="revision 9999, which this eskit-tasks"):
        SqlEventStore.from_url(url)
    engine = sa.create_engine(url)
    with pytest.raises(TableLayoutError, match="revision 9999, which this eskit-tasks"):
        migrate.upgrade(engine)
    engine.dispose()
    assert main(["db-status", "--database", url]) == Exit.ERROR


def test_read_only_commands_never_create_anything(tmp_path: Path, capsys):
    missing = tmp_path / "typo.db"
    for args in (["candidates"], ["log"], ["verify-snapshots"], ["db-status"]):
        assert main([*args, "--database", f"sqlite:///{missing}"]) == Exit.USAGE, args
        said = capsys.readouterr()
        assert "init-db" in said.err + said.out, args
        assert not missing.exists(), args
    empty = tmp_path / "empty.db"
    sa.create_engine(f"sqlite:///{empty}").connect().close()  # a file without tables
    assert main(["log", "--database", f"sqlite:///{empty}"]) == Exit.USAGE
    assert "not initialised: run eskit-tasks init-db" in capsys.readouterr().err
    engine = sa.create_engine(f"sqlite:///{empty}")
    with engine.connect() as conn:
        assert sa.inspect(conn).get_table_names() == []
    engine.dispose()


def test_db_status_says_what_init_db_would_do(url: str, capsys: pytest.CaptureFixture[str]):
    assert main(["db-status", "--database", url, "--json"]) == Exit.USAGE
    assert '"state": "empty"' in capsys.readouterr().out
    assert main(["init-db", "--database", url]) == Exit.OK
    assert f"created at revision {migrate.head()}" in capsys.readouterr().out
    assert main(["db-status", "--database", url, "--json"]) == Exit.OK
    said = capsys.readouterr().out
    assert '"state": "current"' in said and f'"revision": "{migrate.head()}"' in said


STREAMS, PER_STREAM = 200, 1000  # 200,000 events


def _fill_previous_revision(url: str) -> None:
    """A database as the previous release left it (revision 0002), with 200,000 events
    in 200 streams; stream 1 compacted through 400 (snapshot, audit row, fencing token)."""
    tables_at(url, migrate.SCHEMA_MARKERS)
    when = "'2026-01-01 00:00:00'"
    _run(
        url,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < "
        f"{STREAMS}) INSERT INTO eskit_streams (stream_type, stream_id, head_version, "
        f"created_at) SELECT 'account', 'a-' || i, {PER_STREAM}, {when} FROM n",
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < "
        f"{STREAMS * PER_STREAM - 1}) INSERT INTO eskit_events (stream_pk, version, type, "
        f"data, metadata, recorded_at) SELECT i / {PER_STREAM} + 1, "
        f"i - i / {PER_STREAM} * {PER_STREAM} + 1, "
        f"'Deposited', '{{\"amount\":1}}', '{{}}', {when} FROM n",
    )
    state = b'{"count":400,"last":1,"total":400}'
    digest = hashlib.sha256(state).hexdigest()
    _run(
        url,
        "DELETE FROM eskit_events WHERE stream_pk = 1 AND version <= 400",
        "UPDATE eskit_streams SET compacted_through = 400, fence_token = 9 WHERE pk = 1",
        "INSERT INTO eskit_snapshots (stream_pk, version, state, state_hash, verified, "
        f"fence_token, created_at, fingerprint) VALUES (1, 400, '{state.decode()}', "
        f"'{digest}', true, 9, {when}, 'unrecorded')",
        "INSERT INTO eskit_compaction_log (compaction_id, stream_pk, stream_type, stream_id, "
        "from_version, through_version, snapshot_version, head_version, state_hash, "
        "events_deleted, bytes_reclaimed, fence_token, compacted_at) VALUES ('c-old', 1, "
        f"'account', 'a-1', 1, 400, 400, {PER_STREAM}, '{digest}', 400, 1, 9, {when})",
    )


@pytest.mark.slow
def test_the_previous_revision_with_200k_events_is_upgraded_in_place(url: str, capsys):
    """Positions are back-filled in key order, in batches (memory stays flat); events,
    snapshots, audit rows, tokens and heads survive; appends and compaction go on."""
    import tracemalloc

    _fill_previous_revision(url)
    engine = sa.create_engine(url)
    assert migrate.status(engine).state == "behind"
    tracemalloc.start()
    before, after = migrate.upgrade(engine)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    engine.dispose()
    assert (before.revision, after.state) == (migrate.SCHEMA_MARKERS, "current")
    assert peak < 5_000_000, f"the back-fill held {peak / 1e6:.1f} MB"

    store = SqlEventStore.from_url(url)
    total = STREAMS * PER_STREAM - 400
    assert store.last_position() == total
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT count(*), count(DISTINCT position), min(position), max(position) "
            "FROM eskit_events"
        ).one()
        assert tuple(rows) == (total, total, 1, total)
        out_of_order = conn.exec_driver_sql(
            "SELECT count(*) FROM eskit_events a JOIN eskit_events b ON "
            "b.stream_pk = a.stream_pk AND b.version = a.version + 1 "
            "WHERE b.position <= a.position"
        ).scalar_one()
        assert out_of_order == 0
    first = list(store.read_all(limit=3))
    assert [(e.stream_id, e.version, e.position) for e in first] == [
        ("a-1", 401, 1),
        ("a-1", 402, 2),
        ("a-1", 403, 3),
    ]
    info = store.stream_info("account", "a-1")
    assert info is not None
    assert (info.head_version, info.compacted_through, info.fence_token) == (PER_STREAM, 400, 9)
    assert [r.compaction_id for r in store.compaction_log("account", "a-1")] == ["c-old"]
    store.append("account", "a-2", deposits(5), expected_version=PER_STREAM)
    assert store.last_position() == total + 1
    assert [e.position for e in store.read("account", "a-2", from_version=PER_STREAM + 1)] == [
        total + 1
    ]
    snaps = SqlSnapshotStore(store.engine)
    identity = {"unrecorded": lambda s: s}
    result = Compactor(
        store=store,
        snapshot_store=snaps,
        decider=Ledger(),
        state_type=dict,
        policy=CompactionPolicy(retain_last=10),
        upcasters=identity,
    ).compact("account", "a-1")
    assert (result.outcome, result.events_deleted) == ("compacted", PER_STREAM - 400 - 10)
    store.engine.dispose()
