"""Operating in production: runs you can see, quarantined streams, plans.

* ``eskit_compaction_log.run_id``: the run that made each compaction (indexed).
* ``eskit_runs``: every run, who started it, its policy, totals and what its end
  reclaimed.
* ``eskit_quarantine``: streams whose compactions keep failing, skipped by candidates
  until their backoff ends.
* ``eskit_plans`` and ``eskit_plan_streams``: what ``eskit-tasks plan`` decided, for
  ``eskit-tasks apply`` to do exactly.

Only new tables and a nullable column: an older eskit-tasks goes on working beside it
during a rolling upgrade.

Revision ID: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("eskit_compaction_log", sa.Column("run_id", sa.String(32), nullable=True))
    op.create_index("ix_eskit_compaction_log_run_id", "eskit_compaction_log", ["run_id"])
    op.create_table(
        "eskit_runs",
        sa.Column("run_id", sa.String(32), primary_key=True),
        sa.Column("trigger", sa.Text, nullable=False),
        sa.Column("policy", sa.Text, nullable=False),
        sa.Column("plan_id", sa.String(32), nullable=True),
        sa.Column("started_at", _WHEN, nullable=False),
        sa.Column("finished_at", _WHEN, nullable=True),
        sa.Column("candidates", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("done", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("outcomes", sa.Text, nullable=False, server_default="{}"),
        sa.Column("events_deleted", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("reclaim", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_table(
        "eskit_quarantine",
        sa.Column("stream_type", sa.Text, primary_key=True),
        sa.Column("stream_id", sa.Text, primary_key=True),
        sa.Column("failures", sa.BigInteger, nullable=False),
        sa.Column("last_outcome", sa.Text, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("first_failed_at", _WHEN, nullable=False),
        sa.Column("last_failed_at", _WHEN, nullable=False),
        sa.Column("quarantined_at", _WHEN, nullable=True),
        sa.Column("retry_after", _WHEN, nullable=True),
    )
    op.create_table(
        "eskit_plans",
        sa.Column("plan_id", sa.String(32), primary_key=True),
        sa.Column("policy", sa.Text, nullable=False),
        sa.Column("created_at", _WHEN, nullable=False),
        sa.Column("expires_at", _WHEN, nullable=False),
        sa.Column("verified", sa.Boolean, nullable=False),
        sa.Column("streams", sa.BigInteger, nullable=False),
        sa.Column("events", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "eskit_plan_streams",
        sa.Column("plan_id", sa.String(32), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("stream_type", sa.Text, nullable=False),
        sa.Column("stream_id", sa.Text, nullable=False),
        sa.Column("head_version", sa.BigInteger, nullable=False),
        sa.Column("compacted_through", sa.BigInteger, nullable=False),
        sa.Column("through_version", sa.BigInteger, nullable=False),
        sa.Column("events", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("outcome", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "eskit_plan_streams_stream_key",
        "eskit_plan_streams",
        ["plan_id", "stream_type", "stream_id"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_table("eskit_plan_streams")
    op.drop_table("eskit_plans")
    op.drop_table("eskit_quarantine")
    op.drop_table("eskit_runs")
    op.drop_index("ix_eskit_compaction_log_run_id", table_name="eskit_compaction_log")
    op.drop_column("eskit_compaction_log", "run_id")
