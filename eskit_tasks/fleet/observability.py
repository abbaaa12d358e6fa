"""What a compaction attempt leaves behind for people and monitors: its metrics, one JSON
log line (logger ``eskit_tasks.compaction``), its report to the run's progress, and in a
worker the JSON-lines formatting of that logger."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from logging.handlers import WatchedFileHandler
from typing import Any

from celery import Celery, signals
from celery.utils.log import get_task_logger
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from eskit_tasks.domain.redact import mask_url
from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.errors import EskitError
from eskit_tasks.fleet import metrics
from eskit_tasks.fleet.constants import COMPACTION_LOGGER, FINISH_RUN_TASK
from eskit_tasks.fleet.progress import check_run_id
from eskit_tasks.fleet.resources import Resources

log = get_task_logger("eskit_tasks")
#: One JSON line per compaction attempt (see log_result).
compaction_log = logging.getLogger(COMPACTION_LOGGER)

# Outcomes worth a look: a warning, or an error for a snapshot that did not verify.
_LOG_LEVELS = {
    Outcome.VERIFICATION_FAILED: logging.ERROR,
    Outcome.FAILED: logging.WARNING,
    Outcome.FENCED: logging.WARNING,
}


def record(
    result: CompactionResult, run_id: str | None, task_id: str | None, *, timed: bool = False
) -> None:
    """Account for one compaction attempt that ended: its metrics (``timed`` when the
    compactor ran and measured it) and its log line. Called once per attempt."""
    metrics.record_compaction(result, timed=timed)
    log_result(result, run_id, task_id)


def compaction_fields(
    result: CompactionResult, run_id: str | None, task_id: str | None = None
) -> dict[str, Any]:
    """The fields of a compaction's log line (passwords in the error masked)."""
    return {
        "event": "compaction",
        "stream_type": result.stream_type,
        "stream_id": result.stream_id,
        "outcome": result.outcome.value,
        "head_version": result.head_version,
        "snapshot_version": result.snapshot_version,
        "events_deleted": result.events_deleted,
        "events_retained": result.events_retained,
        "bytes_reclaimed": result.bytes_reclaimed,
        "duration_ms": result.duration_ms,
        "compaction_id": result.compaction_id,
        "recovered": result.recovered,
        "held_back_by": None
        if result.held_back_by is None
        else {"consumer": result.held_back_by.consumer, "position": result.held_back_by.position},
        "archive_uri": result.archive_uri,
        "run_id": run_id,
        "task_id": task_id,
        "error_type": result.error_type,
        "error": None if result.error is None else mask_url(result.error),
    }


def log_result(result: CompactionResult, run_id: str | None, task_id: str | None = None) -> None:
    """Log one line for a compaction: a JSON object (logger ``eskit_tasks.compaction``).

    In a worker the line is the bare object with ``ts``, ``level`` and ``logger`` added
    (see :class:`JsonLineFormatter`); under another logging set-up the message is the
    same object.
    """
    fields = compaction_fields(result, run_id, task_id)
    compaction_log.log(
        _LOG_LEVELS.get(result.outcome, logging.INFO),
        "%s",
        json.dumps(fields, default=str),
        extra={"eskit_fields": fields},
    )


def report_to_run(res: Resources, run_id: str, result: CompactionResult, app: Celery) -> None:
    """Count a stream's result in its run (and send the run's finishing step when this
    report completed it); a warning (never an exception) when the run's progress cannot
    be written."""
    try:
        reported = res.progress.report(check_run_id(run_id), result)
        if reported is not None and reported.finished:  # ended: nothing to reclaim
            metrics.record_run_finished(error=False)
        if reported is not None and reported.complete:
            send_finish(app, run_id)
        if reported is None:
            log.warning(
                "run %s has no progress in Redis (expired, or Redis restarted without "
                "persistence): %s/%s not counted",
                run_id,
                result.stream_type,
                result.stream_id,
            )
    except (RedisError, EskitError, KombuOperationalError) as exc:
        log.warning("could not record progress of run %s: %s", run_id, exc)


def send_finish(app: Celery, run_id: str) -> None:
    """Send the finishing step of a run whose candidates have all reported."""
    app.tasks[FINISH_RUN_TASK].apply_async(args=(run_id,))


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC), ``level``, ``logger``, then the fields
    the record carries in ``eskit_fields`` (or its ``message``)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "eskit_fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


@signals.after_setup_logger.connect
def _compaction_log_as_json_lines(logfile: Any = None, **_: Any) -> None:
    """In a worker, write the one-line-per-compaction records as bare JSON lines (no
    "[time: LEVEL/process]" prefix) to where the worker logs (stderr or --logfile), so a
    log shipper can parse each of those lines whole. Elsewhere (the CLI, your own logging
    set-up) the record propagates as usual; its message is the same JSON object."""
    target = logging.getLogger(COMPACTION_LOGGER)
    for old in [h for h in target.handlers if isinstance(h.formatter, JsonLineFormatter)]:
        target.removeHandler(old)
        old.close()
    handler: logging.Handler
    if logfile is None:
        handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
    elif hasattr(logfile, "write"):
        handler = logging.StreamHandler(logfile)
    else:
        handler = WatchedFileHandler(logfile, encoding="utf-8")
    handler.setFormatter(JsonLineFormatter())
    target.addHandler(handler)
    target.propagate = False
