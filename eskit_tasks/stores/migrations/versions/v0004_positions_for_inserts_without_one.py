"""Positions for inserts that give none: an eskit-tasks from before revision 0003, still
running during a rolling upgrade, appends events without a position, which ``read_all``
would never yield and no checkpoint could hold back.

* PostgreSQL: ``position`` defaults to ``eskit_next_position()``, which takes the append
  lock (held to COMMIT) before the sequence, as every append does; the column becomes
  NOT NULL (revision 0003 numbered every existing row).
* SQLite: a trigger numbers such a row from ``eskit_position_counter`` inside the
  insert's write transaction.

Rows such a process inserted while the database was at revision 0003 are numbered first,
after every position handed out, in key order (``BATCH`` per statement): followers have
never read them, and now read them as the newest events.

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_APPEND_LOCK_KEY = 0x65736B6974706F73  # eskit_tasks.stores.positions.APPEND_LOCK_KEY
#: Events without a position numbered per statement.
BATCH = 20_000

# Number the next BATCH events without a position, in key order, from :base + 1.
_NUMBER = """
UPDATE eskit_events SET position = numbered.n
FROM (
    SELECT stream_pk, version,
           :base + row_number() OVER (ORDER BY stream_pk, version) AS n
    FROM eskit_events
    WHERE position IS NULL
    ORDER BY stream_pk, version
    LIMIT :batch
) AS numbered
WHERE eskit_events.stream_pk = numbered.stream_pk
  AND eskit_events.version = numbered.version
"""

_POSTGRESQL = [
    "CREATE FUNCTION eskit_next_position() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$ "
    f"BEGIN PERFORM pg_advisory_xact_lock({_APPEND_LOCK_KEY}); "
    "RETURN nextval('eskit_events_position_seq'); END $$",
    "ALTER TABLE eskit_events ALTER COLUMN position SET DEFAULT eskit_next_position(), "
    "ALTER COLUMN position SET NOT NULL",
]
_SQLITE = [
    "CREATE TRIGGER eskit_events_position_ungiven AFTER INSERT ON eskit_events "
    "WHEN NEW.position IS NULL BEGIN "
    "INSERT INTO eskit_position_counter (id, last_position) "
    "VALUES (1, (SELECT coalesce(max(position), 0) + 1 FROM eskit_events)) "
    "ON CONFLICT (id) DO UPDATE SET last_position = last_position + 1; "
    "UPDATE eskit_events SET position = "
    "(SELECT last_position FROM eskit_position_counter WHERE id = 1) "
    "WHERE stream_pk = NEW.stream_pk AND version = NEW.version; "
    "END"
]


def upgrade() -> None:
    bind = op.get_bind()
    postgresql = bind.dialect.name == "postgresql"
    _number_the_unnumbered(bind, postgresql)
    for statement in _POSTGRESQL if postgresql else _SQLITE:
        op.execute(statement)


def _number_the_unnumbered(bind: sa.Connection, postgresql: bool) -> None:
    """Give the rows without a position the next positions, and move the sequence or
    counter past them."""
    if postgresql:
        taken = (
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM eskit_events_position_seq"
        )
    else:
        taken = "SELECT last_position FROM eskit_position_counter WHERE id = 1"
    highest = "SELECT max(position) FROM eskit_events"
    base = max(
        int(bind.exec_driver_sql(taken).scalar_one_or_none() or 0),
        int(bind.exec_driver_sql(highest).scalar_one_or_none() or 0),
    )
    numbered = 0
    while True:
        done = bind.execute(sa.text(_NUMBER), {"base": base + numbered, "batch": BATCH}).rowcount
        if not done:
            break
        numbered += done
    if not numbered:
        return
    last = {"last": base + numbered}
    if postgresql:
        bind.execute(sa.text("SELECT setval('eskit_events_position_seq', :last)"), last)
    else:
        bind.execute(
            sa.text(
                "INSERT INTO eskit_position_counter (id, last_position) VALUES (1, :last) "
                "ON CONFLICT (id) DO UPDATE SET last_position = :last"
            ),
            last,
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "ALTER TABLE eskit_events ALTER COLUMN position DROP DEFAULT, "
            "ALTER COLUMN position DROP NOT NULL"
        )
        op.execute("DROP FUNCTION eskit_next_position()")
    else:
        op.execute("DROP TRIGGER eskit_events_position_ungiven")
