"""Global positions, consumers' checkpoints, the trash bin's audit columns.

* ``eskit_events.position``: every event's place in the whole store. Existing events
  are numbered in key order (stream, then version) in batches of ``BATCH`` rows, so
  memory stays flat whatever the size of the table; new events are numbered in commit
  order (a sequence on PostgreSQL, ``eskit_position_counter`` on SQLite).
* ``eskit_checkpoints``: where each consumer of the store has read up to.
* ``eskit_compaction_log.archive_uri``, ``archive_sha256``, ``restored_at``.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: Events numbered per statement while back-filling positions.
BATCH = 20_000
_WHEN = sa.DateTime(timezone=True)

# Number the next BATCH events after key (:pk, :version), in key order, from :base + 1.
_BACKFILL = """
UPDATE eskit_events SET position = numbered.n
FROM (
    SELECT stream_pk, version,
           :base + row_number() OVER (ORDER BY stream_pk, version) AS n
    FROM eskit_events
    WHERE position IS NULL AND (stream_pk, version) > (:pk, :version)
    ORDER BY stream_pk, version
    LIMIT :batch
) AS numbered
WHERE eskit_events.stream_pk = numbered.stream_pk
  AND eskit_events.version = numbered.version
"""


def upgrade() -> None:
    # Plain ADD COLUMN on SQLite too: no table rebuild, so WITHOUT ROWID is kept.
    op.add_column("eskit_events", sa.Column("position", sa.BigInteger, nullable=True))
    # The index first: each batch finds where it ended through it (NULLs do not collide).
    op.create_index("eskit_events_position_key", "eskit_events", ["position"], unique=True)
    bind = op.get_bind()
    last = _backfill(bind)
    op.create_table(
        "eskit_position_counter",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("last_position", sa.BigInteger, nullable=False),
    )
    if bind.dialect.name == "postgresql":
        op.execute(sa.schema.CreateSequence(sa.Sequence("eskit_events_position_seq")))
        if last:
            bind.execute(
                sa.text("SELECT setval('eskit_events_position_seq', :last)"), {"last": last}
            )
    elif last:
        bind.execute(
            sa.text("INSERT INTO eskit_position_counter (id, last_position) VALUES (1, :last)"),
            {"last": last},
        )
    op.create_table(
        "eskit_checkpoints",
        sa.Column("consumer", sa.Text, primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("stream_types", sa.Text, nullable=True),
        sa.Column("updated_at", _WHEN, nullable=False),
    )
    op.add_column("eskit_compaction_log", sa.Column("archive_uri", sa.Text, nullable=True))
    op.add_column("eskit_compaction_log", sa.Column("archive_sha256", sa.String(64), nullable=True))
    op.add_column("eskit_compaction_log", sa.Column("restored_at", _WHEN, nullable=True))


def _backfill(bind: sa.Connection) -> int:
    """Number the existing events in key order, a batch per statement; return the last
    position handed out."""
    base, pk, version = 0, -1, -1
    while True:
        numbered = bind.execute(
            sa.text(_BACKFILL),
            {"base": base, "pk": pk, "version": version, "batch": BATCH},
        ).rowcount
        if not numbered:
            return base
        base += numbered
        pk, version = bind.execute(
            sa.text("SELECT stream_pk, version FROM eskit_events WHERE position = :last"),
            {"last": base},
        ).one()


def downgrade() -> None:
    op.drop_column("eskit_compaction_log", "restored_at")
    op.drop_column("eskit_compaction_log", "archive_sha256")
    op.drop_column("eskit_compaction_log", "archive_uri")
    op.drop_table("eskit_checkpoints")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.schema.DropSequence(sa.Sequence("eskit_events_position_seq")))
    op.drop_table("eskit_position_counter")
    op.drop_index("eskit_events_position_key", table_name="eskit_events")
    op.drop_column("eskit_events", "position")
