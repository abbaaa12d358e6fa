"""Schema markers on snapshots: which state schema wrote each one.

Snapshots written before this revision get the fingerprint 'unrecorded': they are used
only through an upcaster registered for that key (docs/snapshots.md).

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN on SQLite too: no table rebuild, so WITHOUT ROWID is kept.
    op.add_column(
        "eskit_snapshots",
        sa.Column("fingerprint", sa.String(64), nullable=False, server_default="unrecorded"),
    )
    op.add_column("eskit_snapshots", sa.Column("state_version", sa.BigInteger, nullable=True))


def downgrade() -> None:
    op.drop_column("eskit_snapshots", "state_version")
    op.drop_column("eskit_snapshots", "fingerprint")
