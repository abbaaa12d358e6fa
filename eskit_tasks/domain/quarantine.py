"""When a stream whose compactions keep failing is left alone, and for how long.

A compaction that ends ``failed`` or ``verification_failed`` counts against its stream;
after ``after`` of them in a row the stream is quarantined: candidates and fan-outs skip
it until its backoff ends, then it is tried once more. Each failure after that doubles
the backoff (``backoff``, ``2 x backoff``, ... up to ``max_backoff``), so a stream that
stays broken costs a few attempts a week, and one whose decider was fixed heals by
itself: a compaction that ends ``compacted`` (or a dry run that verifies) releases it.
``fenced`` and ``locked`` say nothing about the stream and change nothing;
``nothing_to_compact`` neither (no replay happened).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from eskit_tasks.domain.result import Outcome

#: Outcomes that count against a stream.
FAILURES = frozenset({Outcome.FAILED, Outcome.VERIFICATION_FAILED})
#: Outcomes that release a stream (it replayed, verified and, unless a dry run, compacted).
HEALED = frozenset({Outcome.COMPACTED, Outcome.DRY_RUN})


@dataclass(frozen=True)
class QuarantineRules:
    """Args:
    after: Failures in a row that quarantine a stream (0: never quarantine).
    backoff: How long the first quarantine lasts.
    max_backoff: The longest quarantine, however many failures.
    """

    after: int = 3
    backoff: timedelta = timedelta(hours=1)
    max_backoff: timedelta = timedelta(days=7)

    def retry_after(self, failures: int, now: datetime) -> datetime | None:
        """When a stream with ``failures`` in a row is tried again (None: it is not
        quarantined)."""
        if self.after <= 0 or failures < self.after:
            return None
        doublings = min(failures - self.after, 64)  # in float seconds: no overflow
        seconds = self.backoff.total_seconds() * 2.0**doublings
        return now + timedelta(seconds=min(seconds, self.max_backoff.total_seconds()))


@dataclass(frozen=True)
class QuarantineEntry:
    """A stream with failures in a row; ``quarantined`` once they reached the threshold."""

    stream_type: str
    stream_id: str
    failures: int
    last_outcome: str
    last_error: str | None
    first_failed_at: datetime
    last_failed_at: datetime
    quarantined_at: datetime | None
    retry_after: datetime | None

    @property
    def quarantined(self) -> bool:
        return self.quarantined_at is not None

    def held_at(self, now: datetime) -> bool:
        """Candidates skip the stream at ``now``."""
        return self.retry_after is not None and self.retry_after > now
