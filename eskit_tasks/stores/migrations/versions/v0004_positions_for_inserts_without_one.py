"""Positions for inserts that give none: an eskit-tasks from before revision 0003, still
running during a rolling upgrade, appends events without a position, which ``read_all``
would never yield and no checkpoint could hold back.

* PostgreSQL: ``position`` defaults to ``eskit_next_position()``, which takes the append
  lock (held to COMMIT) before the sequence, as every append does; the column becomes
  NOT NULL (revision 0003 numbered every existing row).
* SQLite: a trigger numbers such a row from ``eskit_position_counter`` inside the
  insert's write transaction.

Revision ID: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_APPEND_LOCK_KEY = 0x65736B6974706F73  # eskit_tasks.stores.positions.APPEND_LOCK_KEY

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
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in _POSTGRESQL if postgresql else _SQLITE:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "ALTER TABLE eskit_events ALTER COLUMN position DROP DEFAULT, "
            "ALTER COLUMN position DROP NOT NULL"
        )
        op.execute("DROP FUNCTION eskit_next_position()")
    else:
        op.execute("DROP TRIGGER eskit_events_position_ungiven")
