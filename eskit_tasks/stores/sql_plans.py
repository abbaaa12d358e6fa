"""Stored plans (``eskit_plans``, ``eskit_plan_streams``): what ``eskit-tasks plan``
decided — each stream and the version C its compaction may reach — for ``eskit-tasks
apply`` to do exactly that later, never further. A plan expires; an expired plan is
refused, since the streams it describes have moved on.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from eskit_tasks.domain.plan import PlannedStream
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.stores.engine import reading, writing
from eskit_tasks.stores.schema import plan_streams, plans

#: How long a plan stays applicable when the caller does not say.
DEFAULT_LIFETIME = timedelta(days=7)
#: Rows inserted per statement.
BATCH = 1000


@dataclass(frozen=True)
class Plan:
    """A stored plan's header: its policy, when it was made and expires, its totals."""

    plan_id: str
    policy: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    verified: bool
    streams: int
    events: int
    bytes: int

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires_at


def new_plan_id() -> str:
    return uuid.uuid4().hex


def save_plan(
    engine: Engine,
    policy: Mapping[str, Any],
    streams: Iterable[PlannedStream],
    *,
    verified: bool,
    lifetime: timedelta = DEFAULT_LIFETIME,
    plan_id: str | None = None,
) -> Plan:
    """Store a plan: its streams in the order given, ``BATCH`` per transaction (planning
    a large store holds no write lock for long), then its header, which makes it
    visible to ``apply``. A plan whose planning stopped half-way has no header, and
    apply refuses its id."""
    plan_id = plan_id or new_plan_id()
    count = events = size = 0
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        if batch:
            with writing(engine, f"store plan {plan_id}") as conn:
                conn.execute(plan_streams.insert(), batch)
            batch.clear()

    for seq, s in enumerate(streams, start=1):
        batch.append({"plan_id": plan_id, "seq": seq, **s.__dict__})
        count, events, size = count + 1, events + s.events, size + s.bytes
        if len(batch) >= BATCH:
            flush()
    flush()
    now = datetime.now(UTC)
    with writing(engine, f"store plan {plan_id}") as conn:
        conn.execute(
            plans.insert().values(
                plan_id=plan_id,
                policy=json.dumps(dict(policy), default=str, sort_keys=True),
                created_at=now,
                expires_at=now + lifetime,
                verified=verified,
                streams=count,
                events=events,
                bytes=size,
            )
        )
    return Plan(plan_id, dict(policy), now, now + lifetime, verified, count, events, size)


def find_plan(engine: Engine, plan_id: str) -> Plan | None:
    with reading(engine, f"read plan {plan_id}") as conn:
        row = conn.execute(sa.select(plans).where(plans.c.plan_id == plan_id)).first()
    if row is None:
        return None
    m = row._mapping
    return Plan(
        plan_id=m["plan_id"],
        policy=json.loads(m["policy"]),
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        verified=bool(m["verified"]),
        streams=int(m["streams"]),
        events=int(m["events"]),
        bytes=int(m["bytes"]),
    )


def applicable_plan(engine: Engine, plan_id: str) -> Plan:
    """The plan ``plan_id``, if it can still be applied.

    Raises:
        ConfigurationError: no such plan, or it has expired.
    """
    found = find_plan(engine, plan_id)
    if found is None:
        raise ConfigurationError(
            f"no plan {plan_id!r} in this database: make one with eskit-tasks plan"
        )
    if found.expired():
        raise ConfigurationError(
            f"plan {plan_id} expired at {found.expires_at.isoformat(timespec='seconds')}: "
            "the streams have moved on since; make a new one with eskit-tasks plan"
        )
    return found


def plan_page(
    engine: Engine, plan_id: str, *, after: int, limit: int
) -> list[tuple[int, PlannedStream]]:
    """At most ``limit`` streams of a plan after position ``after``, in plan order, each
    with its position (``seq``)."""
    query = (
        sa.select(plan_streams)
        .where(plan_streams.c.plan_id == plan_id, plan_streams.c.seq > after)
        .order_by(plan_streams.c.seq)
        .limit(limit)
    )
    with reading(engine, f"read plan {plan_id}") as conn:
        return [(int(row.seq), _stream(row._mapping)) for row in conn.execute(query)]


def plan_caps(
    engine: Engine, plan_id: str, streams: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """The planned cut of each of ``streams`` that the plan holds (indexed lookups)."""
    wanted = list(streams)
    if not wanted:
        return {}
    c = plan_streams.c
    query = sa.select(c.stream_type, c.stream_id, c.through_version).where(
        c.plan_id == plan_id, sa.tuple_(c.stream_type, c.stream_id).in_(wanted)
    )
    with reading(engine, f"read plan {plan_id}") as conn:
        return {(str(t), str(i)): int(v) for t, i, v in conn.execute(query)}


def plan_streams_of(engine: Engine, plan_id: str) -> Iterable[PlannedStream]:
    """Every stream of a plan, in order, a page at a time."""
    after = 0
    while True:
        page = plan_page(engine, plan_id, after=after, limit=BATCH)
        if not page:
            return
        for seq, stream in page:
            yield stream
            after = seq


def _stream(m: sa.RowMapping) -> PlannedStream:
    return PlannedStream(
        stream_type=m["stream_type"],
        stream_id=m["stream_id"],
        head_version=int(m["head_version"]),
        compacted_through=int(m["compacted_through"]),
        through_version=int(m["through_version"]),
        events=int(m["events"]),
        bytes=int(m["bytes"]),
        outcome=m["outcome"],
        error=m["error"],
    )
