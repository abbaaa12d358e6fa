"""Counting each compaction's outcome towards its stream's quarantine (see
:mod:`eskit_tasks.domain.quarantine`), in a worker or in ``compact-all --local``."""

from __future__ import annotations

import logging

from eskit_tasks.domain.result import CompactionResult
from eskit_tasks.errors import EskitError
from eskit_tasks.fleet.redelivery import is_transient
from eskit_tasks.stores.sql_quarantine import SqlQuarantine

log = logging.getLogger("eskit_tasks.quarantine")


def note_outcome(quarantine: SqlQuarantine | None, result: CompactionResult) -> None:
    """Count ``result`` for its stream. Failures that say nothing about the stream (the
    database or Redis unreachable, a lost lock) are not counted; a database that cannot
    take the count is logged, never changes the result."""
    if quarantine is None or is_transient(result):
        return
    try:
        entry = quarantine.record(result)
    except EskitError as exc:
        log.warning(
            "could not count %s/%s for quarantine: %s", result.stream_type, result.stream_id, exc
        )
        return
    if entry is not None and entry.quarantined and entry.retry_after is not None:
        log.warning(
            "%s/%s quarantined after %d failed compactions in a row (last: %s); "
            "candidates skip it until %s. `eskit-tasks quarantine release %s %s` retries it now",
            result.stream_type,
            result.stream_id,
            entry.failures,
            entry.last_outcome,
            entry.retry_after.isoformat(timespec="seconds"),
            result.stream_type,
            result.stream_id,
        )
