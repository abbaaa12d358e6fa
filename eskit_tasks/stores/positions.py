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
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

#: Key of the advisory lock that orders appends on PostgreSQL (arbitrary, "eskitpos").
APPEND_LOCK_KEY = 0x65736B6974706F73

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
