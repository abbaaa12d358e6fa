"""What a compaction may delete: the retention policy and the cut it implies."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError, field_validator

from eskit_tasks.domain.duration import parse_duration
from eskit_tasks.errors import InvalidPolicyError


class CompactionPolicy(BaseModel):
    """Retention rules for one compaction. Invalid values raise :class:`InvalidPolicyError`
    (a ``ValueError``) when the policy is built, before any I/O.

    Args:
        retain_last: Keep at least this many of the newest events as an audit trail.
        retain_younger_than: Keep every event recorded less than this long ago. A
            ``timedelta``, seconds (a number or ``"90"``), or a text such as ``"30d"``,
            ``"1d12h"``, ``"2 weeks"`` or ``"P30D"`` (see :func:`~eskit_tasks.domain.
            duration.parse_duration`).
        dry_run: Plan, replay and verify in memory; write and delete nothing.
        through_version: Never compact past this version, whatever the rules above
            allow (what a stored plan decided for one stream: ``eskit-tasks apply``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    retain_last: StrictInt = 0
    retain_younger_than: timedelta | None = None
    dry_run: StrictBool = False
    through_version: StrictInt | None = None

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'policy'}: {err['msg']}"
                for err in exc.errors()
            )
            raise InvalidPolicyError(f"invalid compaction policy: {problems}") from None

    @field_validator("retain_last")
    @classmethod
    def _non_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"must be 0 or more, got {value}")
        return value

    @field_validator("through_version")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be 1 or more, got {value}")
        return value

    @field_validator("retain_younger_than", mode="before")
    @classmethod
    def _parse_age(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("retain_younger_than")
    @classmethod
    def _non_negative_age(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value < timedelta(0):
            raise ValueError(f"must not be negative, got {value}")
        return value

    def age_cutoff(self, now: datetime) -> datetime | None:
        """Events recorded at or before this instant are old enough to delete."""
        if self.retain_younger_than is None:
            return None
        return now - self.retain_younger_than


def plan_cut(
    *,
    head: int,
    compacted_through: int,
    retain_last: int,
    newest_old_enough: int | None,
    through_version: int | None = None,
) -> int | None:
    """Return the version C to compact through, or None when there is nothing to do.

    C = min(head - retain_last, newest version old enough to delete). Only a C above
    the previous compaction point means work.

    Args:
        head: The stream's head version.
        compacted_through: The previous compaction point (0 if never compacted).
        retain_last: Events to keep at the head.
        newest_old_enough: The version before the oldest event younger than the age
            cutoff (the head when no event is that young); None when the policy has no
            age rule.
        through_version: The highest C allowed (a stored plan's cut); None: no cap.
    """
    cut = head - retain_last
    if newest_old_enough is not None:
        cut = min(cut, newest_old_enough)
    if through_version is not None:
        cut = min(cut, through_version)
    return cut if cut > compacted_through else None
