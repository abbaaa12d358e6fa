"""Quarantined streams in the database (``eskit_quarantine``); the rules are in
:mod:`eskit_tasks.domain.quarantine`. Every worker and every ``compact-all --local``
shares the one table, so a stream failing under any of them counts once per attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from eskit_tasks.domain.quarantine import FAILURES, HEALED, QuarantineEntry, QuarantineRules
from eskit_tasks.domain.redact import mask_url
from eskit_tasks.domain.result import CompactionResult
from eskit_tasks.ports import Candidate
from eskit_tasks.stores.engine import insert_ignoring_conflicts, reading, writing
from eskit_tasks.stores.schema import quarantine

#: Longest error kept per stream.
ERROR_KEPT = 2000


class SqlQuarantine:
    """The quarantine of the streams of the database at ``engine``."""

    def __init__(self, engine: Engine, rules: QuarantineRules | None = None) -> None:
        self.engine = engine
        self.rules = rules or QuarantineRules()

    def record(
        self, result: CompactionResult, *, now: datetime | None = None
    ) -> QuarantineEntry | None:
        """Count a compaction's outcome for its stream (see the rules); the stream's
        entry afterwards (None: it has none: never failed, or healed)."""
        key = (quarantine.c.stream_type == result.stream_type) & (
            quarantine.c.stream_id == result.stream_id
        )
        label = f"{result.stream_type}/{result.stream_id}"
        if result.outcome in HEALED:
            # Almost every compaction heals nothing: read first, so that it costs no
            # write transaction (on SQLite, no write lock) on the way of every stream.
            with reading(self.engine, "read the quarantine") as conn:
                counted = conn.execute(sa.select(quarantine.c.failures).where(key)).first()
            if counted is not None:
                with writing(self.engine, f"release {label} from quarantine") as conn:
                    conn.execute(sa.delete(quarantine).where(key))
            return None
        if result.outcome not in FAILURES:
            return self.entry(result.stream_type, result.stream_id)
        now = now or datetime.now(UTC)
        error = None if result.error is None else mask_url(result.error)[:ERROR_KEPT]
        with writing(self.engine, f"count a failure of {label}") as conn:
            conn.execute(
                insert_ignoring_conflicts(self.engine, quarantine).values(
                    stream_type=result.stream_type,
                    stream_id=result.stream_id,
                    failures=0,
                    last_outcome=result.outcome.value,
                    first_failed_at=now,
                    last_failed_at=now,
                )
            )
            conn.execute(
                sa.update(quarantine)
                .where(key)
                .values(
                    failures=quarantine.c.failures + 1,
                    last_outcome=result.outcome.value,
                    last_error=error,
                    last_failed_at=now,
                )
            )
            row = conn.execute(sa.select(quarantine).where(key)).one()
            retry_after = self.rules.retry_after(int(row.failures), now)
            if retry_after is not None:
                conn.execute(
                    sa.update(quarantine)
                    .where(key)
                    .values(
                        quarantined_at=sa.func.coalesce(quarantine.c.quarantined_at, now),
                        retry_after=retry_after,
                    )
                )
                row = conn.execute(sa.select(quarantine).where(key)).one()
        return _entry(row._mapping)

    def held(
        self, streams: Sequence[Candidate], *, now: datetime | None = None
    ) -> set[tuple[str, str]]:
        """Which of ``streams`` candidates skip now (quarantined, backoff not over)."""
        if not streams:
            return set()
        now = now or datetime.now(UTC)
        held_now = quarantine.c.retry_after > now
        with reading(self.engine, "read the quarantine") as conn:
            # Usually nothing is held: one small query instead of a page-sized IN list
            # (rendering its bound pairs was a tenth of the fan-out's time).
            if conn.execute(sa.select(sa.literal(1)).where(held_now).limit(1)).first() is None:
                return set()
            pairs = [(c.stream_type, c.stream_id) for c in streams]
            query = sa.select(quarantine.c.stream_type, quarantine.c.stream_id).where(
                sa.tuple_(quarantine.c.stream_type, quarantine.c.stream_id).in_(pairs), held_now
            )
            return {(str(t), str(i)) for t, i in conn.execute(query)}

    def entry(self, stream_type: str, stream_id: str) -> QuarantineEntry | None:
        query = sa.select(quarantine).where(
            quarantine.c.stream_type == stream_type, quarantine.c.stream_id == stream_id
        )
        with reading(self.engine, "read the quarantine") as conn:
            row = conn.execute(query).first()
        return None if row is None else _entry(row._mapping)

    def entries(self, *, quarantined_only: bool = True) -> list[QuarantineEntry]:
        """The quarantined streams (with ``quarantined_only=False`` also those with
        failures below the threshold), longest failing first."""
        query = sa.select(quarantine).order_by(
            quarantine.c.first_failed_at, quarantine.c.stream_type, quarantine.c.stream_id
        )
        if quarantined_only:
            query = query.where(quarantine.c.quarantined_at.is_not(None))
        with reading(self.engine, "read the quarantine") as conn:
            return [_entry(row._mapping) for row in conn.execute(query)]

    def counts_by_type(self) -> dict[str, int]:
        """Quarantined streams per stream type."""
        query = (
            sa.select(quarantine.c.stream_type, sa.func.count())
            .where(quarantine.c.quarantined_at.is_not(None))
            .group_by(quarantine.c.stream_type)
        )
        with reading(self.engine, "read the quarantine") as conn:
            return {str(t): int(n) for t, n in conn.execute(query)}

    def release(self, stream_type: str, stream_id: str) -> bool:
        """Forget a stream's failures (quarantined, or counted below the threshold):
        candidates take it again. False if none were counted."""
        with writing(self.engine, f"release {stream_type}/{stream_id}") as conn:
            gone = conn.execute(
                sa.delete(quarantine).where(
                    quarantine.c.stream_type == stream_type, quarantine.c.stream_id == stream_id
                )
            ).rowcount
        return bool(gone)

    def release_all(self) -> int:
        """Release every quarantined stream (failures below the threshold stay counted);
        how many were released."""
        with writing(self.engine, "release every quarantined stream") as conn:
            return int(
                conn.execute(
                    sa.delete(quarantine).where(quarantine.c.quarantined_at.is_not(None))
                ).rowcount
            )


def _entry(row: sa.RowMapping) -> QuarantineEntry:
    return QuarantineEntry(
        stream_type=row["stream_type"],
        stream_id=row["stream_id"],
        failures=int(row["failures"]),
        last_outcome=row["last_outcome"],
        last_error=row["last_error"],
        first_failed_at=row["first_failed_at"],
        last_failed_at=row["last_failed_at"],
        quarantined_at=row["quarantined_at"],
        retry_after=row["retry_after"],
    )
