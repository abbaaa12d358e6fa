"""The first layout: streams, events, snapshots (without schema markers), audit log.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Written out here, not taken from eskit_tasks.stores.schema: a migration describes the
# tables as they were at its revision, whatever the current code says.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "eskit_streams",
        sa.Column("pk", _ID, primary_key=True, autoincrement=True),
        sa.Column("stream_type", sa.Text, nullable=False),
        sa.Column("stream_id", sa.Text, nullable=False),
        sa.Column("head_version", sa.BigInteger, nullable=False),
        sa.Column("compacted_through", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("fence_token", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("created_at", _WHEN, nullable=False),
        sa.UniqueConstraint("stream_type", "stream_id", name="eskit_streams_type_id_key"),
    )
    op.create_table(
        "eskit_events",
        sa.Column("stream_pk", sa.BigInteger, primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("recorded_at", _WHEN, nullable=False),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "eskit_snapshots",
        sa.Column("stream_pk", sa.BigInteger, primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("state_hash", sa.String(64), nullable=False),
        sa.Column("verified", sa.Boolean, nullable=False),
        sa.Column("fence_token", sa.BigInteger, nullable=False),
        sa.Column("created_at", _WHEN, nullable=False),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "eskit_compaction_log",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("compaction_id", sa.String(36), nullable=False, unique=True),
        sa.Column("stream_pk", sa.BigInteger, nullable=False),
        sa.Column("stream_type", sa.Text, nullable=False),
        sa.Column("stream_id", sa.Text, nullable=False),
        sa.Column("from_version", sa.BigInteger, nullable=False),
        sa.Column("through_version", sa.BigInteger, nullable=False),
        sa.Column("snapshot_version", sa.BigInteger, nullable=False),
        sa.Column("head_version", sa.BigInteger, nullable=False),
        sa.Column("state_hash", sa.String(64), nullable=False),
        sa.Column("events_deleted", sa.BigInteger, nullable=False),
        sa.Column("bytes_reclaimed", sa.BigInteger, nullable=False),
        sa.Column("fence_token", sa.BigInteger, nullable=False),
        sa.Column("compacted_at", _WHEN, nullable=False),
    )
    op.create_index("ix_eskit_compaction_log_stream_pk", "eskit_compaction_log", ["stream_pk"])


def downgrade() -> None:
    for table in ("eskit_compaction_log", "eskit_snapshots", "eskit_events", "eskit_streams"):
        op.drop_table(table)
