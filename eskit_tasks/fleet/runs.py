"""Starting and following fleet runs from a Python shell (or the CLI).

>>> from eskit_tasks import compact_all
>>> run = compact_all(min_events=1000, dry_run=True)
>>> run.wait(timeout=600).done
>>> run.summary()
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from celery import Celery
from pydantic import BaseModel

from eskit_tasks.domain.result import CompactionResult
from eskit_tasks.errors import RunNotFoundError, RunTimeoutError
from eskit_tasks.fleet.constants import FAN_OUT_TASK
from eskit_tasks.fleet.fan_out import finishes
from eskit_tasks.fleet.messages import check_run_args, policy_kwargs
from eskit_tasks.fleet.progress import FailedStream, RunProgress, check_run_id, new_run_id
from eskit_tasks.fleet.resources import Resources, resources_of
from eskit_tasks.fleet.services import (
    BROKER,
    RESULT_BACKEND,
    STATE_REDIS,
    raised_by_result_backend,
    reaching,
    unavailable,
    unreachable,
)


class RunSummary(BaseModel):
    """Totals of a run plus the streams that failed, with their errors."""

    run_id: str
    finished: bool
    candidates: int
    done: int
    outcomes: dict[str, int]
    events_deleted: int
    bytes_reclaimed: int
    dry_run_events: int
    dry_run_bytes: int
    elapsed_s: float
    failed_streams: list[FailedStream]
    error: str | None = None
    #: Events deleted per stream type.
    deleted_by_type: dict[str, int] = {}
    #: What the run's finishing step reclaimed, measured (None: nothing to reclaim,
    #: ESKIT_RECLAIM=off, a dry run, or not finished yet). See eskit_tasks.fleet.finish.
    reclaim: dict[str, Any] | None = None


class CompactionRun:
    """A handle on a fleet run; cheap to create from a run id anywhere.

    Args:
        run_id: The id ``compact_all`` returned (``run.run_id``).
        app: The fleet app whose Redis holds the run (default: the process's app).
    """

    def __init__(self, run_id: str, *, app: Celery | None = None) -> None:
        self.run_id = check_run_id(run_id)
        self._app = app

    def _resources(self) -> Resources:
        return resources_of(self._app or _default_app())

    def __repr__(self) -> str:
        return f"CompactionRun({self.run_id!r})"

    def progress(self) -> RunProgress:
        """The run's counters now.

        Raises:
            RunNotFoundError: nothing is stored for this run (wrong id, or expired).
        """
        res = self._resources()
        with reaching(STATE_REDIS, res.settings.redis_url):
            found = res.progress.get(self.run_id)
        if found is None:
            raise RunNotFoundError(
                f"no progress stored for run {self.run_id}: unknown id, or older than ESKIT_RUN_TTL"
            )
        return found

    def wait(
        self,
        timeout: float | None = None,
        poll: float = 0.5,
        *,
        on_progress: Callable[[RunProgress], object] | None = None,
    ) -> RunProgress:
        """Block until every candidate has reported and the run's finishing step
        (reclaiming the space of what it deleted) is done; return the final progress.

        Args:
            timeout: Give up after this many seconds (default: wait for ever).
            poll: Seconds between two reads of the run's progress.
            on_progress: Called with each progress read (a progress bar, a log line).

        Raises:
            RunTimeoutError: still running after ``timeout`` seconds (it keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current = self.progress()
            if on_progress is not None:
                on_progress(current)
            if current.finished:
                return current
            if deadline is not None and time.monotonic() >= deadline:
                raise RunTimeoutError(
                    f"run {self.run_id} not finished after {timeout}s: {current.done} of "
                    f"{current.candidates} streams reported"
                    f"{'' if current.fanout_done else ', fan-out still paging'}"
                    f"{', reclaiming space' if current.reclaiming else ''}"
                )
            time.sleep(poll)

    def results(self, after: str = "0-0") -> tuple[list[CompactionResult], str]:
        """The stream results reported after the position ``after`` (``"0-0"``: from the
        oldest the run keeps, about the newest RUN_RESULTS_KEEP), oldest first, and the
        position to ask after next time: a follower prints each result once::

            seen, after = run.results()
            more, after = run.results(after)
        """
        res = self._resources()
        with reaching(STATE_REDIS, res.settings.redis_url):
            return res.progress.results(self.run_id, after)

    def summary(self) -> RunSummary:
        """Totals plus the failed streams and their errors."""
        p = self.progress()
        res = self._resources()
        with reaching(STATE_REDIS, res.settings.redis_url):
            failed = res.progress.failed_streams(self.run_id)
        return RunSummary(
            run_id=self.run_id,
            finished=p.finished,
            candidates=p.candidates,
            done=p.done,
            outcomes=p.outcomes,
            events_deleted=p.events_deleted,
            bytes_reclaimed=p.bytes_reclaimed,
            dry_run_events=p.dry_run_events,
            dry_run_bytes=p.dry_run_bytes,
            elapsed_s=round(p.updated_at - p.started_at, 3),
            failed_streams=failed,
            error=p.error,
            deleted_by_type=p.deleted_by_type,
            reclaim=p.reclaim,
        )


def compact_all(
    *,
    min_events: int = 1,
    stream_types: list[str] | None = None,
    max_streams: int | None = None,
    retain_last: int = 0,
    retain_younger_than: timedelta | float | str | None = None,
    dry_run: bool = False,
    app: Celery | None = None,
) -> CompactionRun:
    """Start a fleet run: a fan-out over every candidate stream, compacted by the workers.

    Args:
        min_events: Only streams with at least this many events since their last
            compaction.
        stream_types: Only these stream types (default: all).
        max_streams: At most this many streams in this run.
        retain_last: Keep this many newest events per stream.
        retain_younger_than: Keep events younger than this (timedelta, seconds, "30d").
        dry_run: Verify in memory, delete nothing; the run reports what would go.
        app: The fleet app to send the run to (default: the process's app, configured
            from the environment).

    Raises:
        InvalidPolicyError: a bad value; nothing was sent.
        ServiceUnavailableError: the Redis for run progress, the result backend or the
            broker cannot be reached (the message says which); the run did not start.
    """
    policy = policy_kwargs(retain_last, retain_younger_than, dry_run)
    check_run_args(min_events, stream_types, max_streams)
    run_id = new_run_id()
    kwargs: dict[str, Any] = {
        "run_id": run_id,
        "min_events": min_events,
        "stream_types": None if stream_types is None else list(stream_types),
        "max_streams": max_streams,
        **policy,
    }
    app = app or _default_app()
    res = resources_of(app)
    with reaching(STATE_REDIS, res.settings.redis_url):
        res.progress.create(run_id, kwargs, finish=finishes(res.settings, dry_run))
    try:
        app.tasks[FAN_OUT_TASK].apply_async(kwargs=kwargs)
    except Exception as exc:
        if not unreachable(exc):
            raise
        if raised_by_result_backend(exc):
            raise unavailable(RESULT_BACKEND, app.conf.result_backend, exc) from exc
        raise unavailable(BROKER, app.conf.broker_url, exc) from exc
    return CompactionRun(run_id, app=app)


def _default_app() -> Celery:
    from eskit_tasks.fleet.app import app  # the environment's app, built on first use

    return app
