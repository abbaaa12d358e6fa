"""Global positions: every event's place in the whole store, handed out in commit order.

A consumer (a projection, an outbox) reads the store with ``read_all(after_position=p)``
and keeps the last position it processed. That is only sound if a position never
becomes visible *after* a higher one: a reader that has moved past 11 would never see a
10 that commits late. Each dialect guarantees it its own way:

* **PostgreSQL**: positions come from a sequence, but a sequence alone is not enough
  (two transactions take 10 and 11; 11 commits first; a reader sees 11, moves on, and
  10 appears behind it). So an append takes a transaction-level advisory lock *before*
  it takes its positions and holds it until COMMIT. PostgreSQL makes a commit visible
  before it releases the transaction's locks, so the next append can only take a
  position once every lower one is visible. Appends to the store are serialised for
  the length of their insert and commit (not their whole transaction: the stream's row
  lock is taken first); compaction's deletes never take this lock.
* **SQLite**: one writer at a time (``BEGIN IMMEDIATE``) gives the order; the last
  position handed out is kept in ``eskit_position_counter``, never recomputed from
  ``max(position)``, because a compaction may delete the newest event and its number
  must not be handed out again.

Positions have gaps (an append that rolls back on PostgreSQL burns its numbers), are
unique, and increase with version inside each stream.

An insert that gives no position — an eskit-tasks from before positions, still running
during a rolling upgrade — gets one all the same, in the same order (revision 0004,
:data:`UNGIVEN_POSITION_DDL`): on PostgreSQL the column's default takes the advisory
lock and then the sequence, so such an append is ordered like any other; on SQLite a
trigger numbers the row from the counter inside the insert's write transaction.
Without it the event would have no position: ``read_all`` would never yield it, and no
checkpoint could hold it back from a compaction.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

#: Key of the advisory lock that orders appends on PostgreSQL (arbitrary, "eskitpos").
APPEND_LOCK_KEY = 0x65736B6974706F73

#: The statements that give a position to an insert that gives none, per dialect (the
#: migration to revision 0004 holds its own copy; tests/test_migrations.py checks both
#: make the same database).
UNGIVEN_POSITION_DDL = {
    "postgresql": [
        "CREATE FUNCTION eskit_next_position() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$ "
        f"BEGIN PERFORM pg_advisory_xact_lock({APPEND_LOCK_KEY}); "
        "RETURN nextval('eskit_events_position_seq'); END $$",
        "ALTER TABLE eskit_events ALTER COLUMN position SET DEFAULT eskit_next_position(), "
        "ALTER COLUMN position SET NOT NULL",
    ],
    "sqlite": [
        "CREATE TRIGGER eskit_events_position_ungiven AFTER INSERT ON eskit_events "
        "WHEN NEW.position IS NULL BEGIN "
        "INSERT INTO eskit_position_counter (id, last_position) "
        "VALUES (1, (SELECT coalesce(max(position), 0) + 1 FROM eskit_events)) "
        "ON CONFLICT (id) DO UPDATE SET last_position = last_position + 1; "
        "UPDATE eskit_events SET position = "
        "(SELECT last_position FROM eskit_position_counter WHERE id = 1) "
        "WHERE stream_pk = NEW.stream_pk AND version = NEW.version; "
        "END"
    ],
}

_PG_TAKE = sa.text(
    "WITH ordered AS (SELECT pg_advisory_xact_lock(:key)) "
    "SELECT setval('eskit_events_position_seq', "
    "nextval('eskit_events_position_seq') + :n - 1) FROM ordered"
)
_SQLITE_TAKE = sa.text(
    "INSERT INTO eskit_position_counter (id, last_position) "
    "VALUES (1, (SELECT coalesce(max(position), 0) FROM eskit_events) + :n) "
    "ON CONFLICT (id) DO UPDATE SET last_position = last_position + :n "
    "RETURNING last_position"
)


def last_taken(conn: Connection) -> int:
    """The highest position handed out so far (0: none), committed or in flight."""
    if conn.dialect.name == "postgresql":
        query = (
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM eskit_events_position_seq"
        )
    else:
        query = "SELECT last_position FROM eskit_position_counter WHERE id = 1"
    return int(conn.exec_driver_sql(query).scalar_one_or_none() or 0)


def take(conn: Connection, n: int) -> int:
    """Hand out ``n`` consecutive positions inside ``conn``'s write transaction, as its
    last step before inserting the events; return the first. The numbers become visible
    when the transaction commits, and no higher number can become visible before them.
    """
    if conn.dialect.name == "postgresql":
        last = conn.execute(_PG_TAKE, {"key": APPEND_LOCK_KEY, "n": n}).scalar_one()
    else:
        last = conn.execute(_SQLITE_TAKE, {"n": n}).scalar_one()
    return int(last) - n + 1
