"""The guard against stale writers: a trigger on the application's events table that
refuses an event at or below its aggregate's compaction point.

Why: once events 1..C are deleted, the primary key no longer sees a conflict when a
writer that loaded the aggregate at version 50 saves version 51: the insert would
succeed, followers would receive an event the aggregate never had. With the guard, that
insert fails the way a version conflict does, with the library's own
``eventsourcing.persistence.IntegrityError`` (PostgreSQL: SQLSTATE 23505, which the
library translates so; SQLite: ``RAISE(ABORT)``, a constraint failure).

The compaction point is ``eskit_streams.compacted_through`` of the stream
``(application name, str(aggregate id))``; the delete moves it in its own transaction,
holding the row locked. The trigger reads it with an index lookup on each insert (a row
that does not exist: nothing compacted, nothing refused); on PostgreSQL ``FOR SHARE``,
so an insert that races a compaction's commit waits for it and sees its point.

To remove the guard (after the application's events are no longer compacted):

* PostgreSQL: ``DROP TRIGGER eskit_guard_compacted ON <schema>.<name>_events;
  DROP FUNCTION <schema>.eskit_guard_compacted();`` (the function is shared by the
  applications of a schema: drop it with the last trigger);
* SQLite: ``DROP TRIGGER eskit_guard_compacted;``

or call :meth:`eskit_tasks.eventsourcing.ApplicationCompactor.remove_guard`.
"""

from __future__ import annotations

import sqlalchemy as sa

from eskit_tasks.eventsourcing.target import Target
from eskit_tasks.stores.engine import writing

TRIGGER = "eskit_guard_compacted"
#: Key of the advisory lock that serialises installing the guard (arbitrary: "eskitgrd").
_INSTALL_LOCK_KEY = 0x65736B6974677264

_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION {schema}.eskit_guard_compacted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE point bigint;
BEGIN
    -- FOR SHARE: an insert racing a compaction's commit waits for it, then reads the
    -- point it committed (a plain read would see the old point and let the row in).
    SELECT compacted_through INTO point FROM {schema}.eskit_streams
     WHERE stream_type = TG_ARGV[0] AND stream_id = NEW.originator_id::text FOR SHARE;
    IF point IS NOT NULL AND NEW.originator_version <= point THEN
        RAISE EXCEPTION 'eskit-tasks: version % of %/% is at or below its compaction point %: '
            'the writer loaded the aggregate before it was compacted; load it again and retry',
            NEW.originator_version, TG_ARGV[0], NEW.originator_id, point
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NEW;
END $$
"""

_SQLITE_HEX_TO_UUID = (
    "lower(substr({c}, 1, 8) || '-' || substr({c}, 9, 4) || '-' || substr({c}, 13, 4) || '-' "
    "|| substr({c}, 17, 4) || '-' || substr({c}, 21, 12))"
)


def install(target: Target) -> None:
    """Create the guard on the application's events table (again: harmless)."""
    name = _literal(target.name)
    # A write transaction of eskit's (SQLite: BEGIN IMMEDIATE, which waits out the busy
    # timeout while the application writes, where a plain BEGIN fails at once).
    with writing(target.engine, f"install the stale-writer guard on {target.events}") as conn:
        if target.dialect == "postgresql":
            # Workers installing it at once would race on CREATE OR REPLACE FUNCTION.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_INSTALL_LOCK_KEY)))
            schema = _schema(target)
            conn.execute(sa.text(_PG_FUNCTION.format(schema=schema)))  # text(): '%' kept
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {target.events}")
            conn.exec_driver_sql(
                f"CREATE TRIGGER {TRIGGER} BEFORE INSERT ON {target.events} FOR EACH ROW "
                f"EXECUTE FUNCTION {schema}.eskit_guard_compacted({name})"
            )
            return
        stream_id = (
            _SQLITE_HEX_TO_UUID.format(c="NEW.originator_id")
            if target.uuid_ids
            else "NEW.originator_id"
        )
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {TRIGGER}")
        conn.exec_driver_sql(
            f"CREATE TRIGGER {TRIGGER} BEFORE INSERT ON {target.events} "
            "WHEN NEW.originator_version <= (SELECT compacted_through FROM eskit_streams "
            f"WHERE stream_type = {name} AND stream_id = {stream_id}) "
            "BEGIN SELECT RAISE(ABORT, 'eskit-tasks: this version is at or below its "
            "aggregate''s compaction point: the writer loaded the aggregate before it was "
            "compacted; load it again and retry'); END"
        )


def installed(target: Target) -> bool:
    """Whether the guard is on the application's events table."""
    with target.engine.connect() as conn:
        return installed_in(conn, target)


def installed_in(conn: sa.Connection, target: Target) -> bool:
    """Whether the guard is on the application's events table, as ``conn`` sees it."""
    if target.dialect == "postgresql":
        found = conn.execute(
            sa.text(
                "SELECT 1 FROM pg_trigger WHERE tgname = :trigger "
                "AND tgrelid = CAST(:table AS regclass)"
            ),
            {"trigger": TRIGGER, "table": target.events},
        )
    else:
        found = conn.execute(
            sa.text("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = :trigger"),
            {"trigger": TRIGGER},
        )
    return found.first() is not None


def remove(target: Target) -> None:
    """Drop the guard (the compaction points stay in ``eskit_streams``)."""
    with target.engine.begin() as conn:
        if target.dialect == "postgresql":
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {target.events}")
            others = conn.execute(
                sa.text("SELECT count(*) FROM pg_trigger WHERE tgname = :trigger"),
                {"trigger": TRIGGER},
            ).scalar_one()
            if not others:
                conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {_schema(target)}.{TRIGGER}()")
        else:
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {TRIGGER}")


def _schema(target: Target) -> str:
    assert target.schema is not None
    return str(target.engine.dialect.identifier_preparer.quote(target.schema))


def _literal(text: str) -> str:
    """``text`` as an SQL string literal (DDL takes no bind parameters)."""
    return "'" + text.replace("'", "''") + "'"
