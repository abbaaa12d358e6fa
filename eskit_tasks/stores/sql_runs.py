"""The record of runs in the database (``eskit_runs``): who started each, its policy, and
once it ended its totals and what its end reclaimed. A fleet run's live counters are in
Redis (see eskit_tasks.fleet.progress); this is what stays once those expire, and what
``eskit-tasks runs`` lists. Audit-log rows name their run (``eskit_compaction_log.run_id``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.engine import Engine

from eskit_tasks.stores.engine import reading, writing
from eskit_tasks.stores.schema import runs

#: Who may start a run.
TRIGGERS = ("beat", "shell", "cli", "local", "plan")


class RunRecord(BaseModel):
    """One run as the database keeps it."""

    run_id: str
    trigger: str
    policy: dict[str, Any]
    plan_id: str | None = None
    started_at: datetime
    finished_at: datetime | None = None
    candidates: int = 0
    done: int = 0
    outcomes: dict[str, int] = {}
    events_deleted: int = 0
    reclaim: dict[str, Any] | None = None
    error: str | None = None

    @property
    def state(self) -> str:
        if self.error is not None:
            return "failed"
        return "running" if self.finished_at is None else "finished"


def record_start(
    engine: Engine,
    run_id: str,
    trigger: str,
    policy: Mapping[str, Any],
    *,
    plan_id: str | None = None,
    started_at: datetime | None = None,
) -> bool:
    """Record that a run started (once: a second call for the same run changes nothing);
    True if this call recorded it."""
    with writing(engine, f"record the start of run {run_id}") as conn:
        found = conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id == run_id)).first()
        if found is not None:
            return False
        conn.execute(
            runs.insert().values(
                run_id=run_id,
                trigger=trigger,
                policy=json.dumps(dict(policy), default=str, sort_keys=True),
                plan_id=plan_id,
                started_at=started_at or datetime.now(UTC),
            )
        )
        return True


def record_end(
    engine: Engine,
    run_id: str,
    *,
    candidates: int,
    done: int,
    outcomes: Mapping[str, int],
    events_deleted: int,
    reclaim: Mapping[str, Any] | None = None,
    error: str | None = None,
    trigger: str = "shell",
    policy: Mapping[str, Any] | None = None,
    finished_at: datetime | None = None,
) -> None:
    """Record a run's end and totals (its start too, if that was never recorded: a run
    from an older worker). Recording it again overwrites the totals with the latest."""
    record_start(engine, run_id, trigger, policy or {})
    with writing(engine, f"record the end of run {run_id}") as conn:
        conn.execute(
            sa.update(runs)
            .where(runs.c.run_id == run_id)
            .values(
                finished_at=finished_at or datetime.now(UTC),
                candidates=candidates,
                done=done,
                outcomes=json.dumps(dict(outcomes), sort_keys=True),
                events_deleted=events_deleted,
                reclaim=None if reclaim is None else json.dumps(dict(reclaim)),
                error=error,
            )
        )


def recent_runs(engine: Engine, limit: int = 20) -> list[RunRecord]:
    """The newest runs first."""
    with reading(engine, "read the runs") as conn:
        rows = conn.execute(sa.select(runs).order_by(runs.c.started_at.desc()).limit(limit))
        return [_record(row._mapping) for row in rows]


def run_counts(engine: Engine, *, now: datetime | None = None) -> dict[str, int]:
    """Runs by state: ``running`` (started in the last week and not ended: an older one
    lost its progress), ``finished`` and ``failed`` (ended in the last day)."""
    now = now or datetime.now(UTC)
    week, day = now - timedelta(days=7), now - timedelta(days=1)
    c = runs.c
    query = sa.select(
        sa.func.count().filter(c.finished_at.is_(None), c.started_at >= week),
        sa.func.count().filter(c.finished_at >= day, c.error.is_(None)),
        sa.func.count().filter(c.finished_at >= day, c.error.is_not(None)),
    )
    with reading(engine, "count the runs") as conn:
        running, finished, failed = conn.execute(query).one()
    return {"running": int(running), "finished": int(finished), "failed": int(failed)}


def find_run(engine: Engine, run_id: str) -> RunRecord | None:
    with reading(engine, f"read run {run_id}") as conn:
        row = conn.execute(sa.select(runs).where(runs.c.run_id == run_id)).first()
        return None if row is None else _record(row._mapping)


def _record(row: sa.RowMapping) -> RunRecord:
    return RunRecord(
        run_id=row["run_id"],
        trigger=row["trigger"],
        policy=json.loads(row["policy"]),
        plan_id=row["plan_id"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        candidates=row["candidates"],
        done=row["done"],
        outcomes=json.loads(row["outcomes"]),
        events_deleted=row["events_deleted"],
        reclaim=None if row["reclaim"] is None else json.loads(row["reclaim"]),
        error=row["error"],
    )
