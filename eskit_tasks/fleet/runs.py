"""Starting and following fleet runs from a Python shell (or the CLI).

>>> from eskit_tasks import compact_all
>>> run = compact_all(min_events=1000, dry_run=True)
>>> run.wait(timeout=600).done
>>> run.summary()

A ``compact_stream`` task whose outcome needs attention is stored as FAILURE (Flower
shows it failed); :func:`compaction_result` reads the result of any finished task:

>>> compaction_result(task_id, timeout=60)["outcome"]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from celery import Celery, states
from pydantic import BaseModel

from eskit_tasks.domain.result import CompactionResult
from eskit_tasks.errors import (
    CompactionNeedsAttention,
    ConfigurationError,
    InvalidPolicyError,
    RunNotFoundError,
    RunTimeoutError,
)
from eskit_tasks.fleet.constants import FAN_OUT_TASK, FINISH_RESEND_S
from eskit_tasks.fleet.messages import check_run_args, policy_kwargs
from eskit_tasks.fleet.observability import send_finish
from eskit_tasks.fleet.progress import (
    FailedStream,
    RunProgress,
    RunState,
    RunStatus,
    check_run_id,
    new_run_id,
)
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
from eskit_tasks.fleet.throttle import run_scope, set_caps
from eskit_tasks.stores.engine import create_engine
from eskit_tasks.stores.sql_plans import Plan, applicable_plan


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
    #: running, paused or cancelled.
    state: str = "running"


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
            poll: Seconds between two reads of the run's progress (without
                ``on_progress``, of the six fields that say whether it has ended; the
                whole progress is read once it has).
            on_progress: Called with each progress read (a progress bar, a log line).

        Raises:
            RunTimeoutError: still running after ``timeout`` seconds (it keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        resent = time.time()
        while True:
            current: RunProgress | RunStatus
            if on_progress is None:
                current = self._status()
            else:
                current = self.progress()
                on_progress(current)
            if current.finished:
                return self.progress() if isinstance(current, RunStatus) else current
            resent = self._resend_finish(current, resent)
            if deadline is not None and time.monotonic() >= deadline:
                raise RunTimeoutError(
                    f"run {self.run_id} not finished after {timeout}s: {current.done} of "
                    f"{current.candidates} streams reported"
                    f"{'' if current.fanout_done else ', fan-out still paging'}"
                    f"{', reclaiming space' if current.reclaiming else ''}"
                )
            time.sleep(poll)

    def _status(self) -> RunStatus | RunProgress:
        """Whether the run has ended, in one light read (see RunProgressStore.status)."""
        res = self._resources()
        with reaching(STATE_REDIS, res.settings.redis_url):
            found = res.progress.status(self.run_id)
        return self.progress() if found is None else found  # raises RunNotFoundError

    def _resend_finish(self, current: RunProgress | RunStatus, last: float) -> float:
        """Send the finishing step again when a complete run has waited for it longer
        than FINISH_RESEND_S (its message may have been lost); when it was last sent."""
        now = time.time()
        if not current.reclaiming or now - max(current.updated_at, last) < FINISH_RESEND_S:
            return last
        try:
            send_finish(self._app or _default_app(), self.run_id)
        except Exception:  # the next look tries again
            return last
        return now

    def pause(self) -> bool:
        """Pause the run: its fan-out enqueues nothing and its queued tasks wait (a
        compaction already running finishes). False if it has ended or was cancelled.

        Raises:
            RunNotFoundError: nothing is stored for this run.
        """
        return self._set("paused")

    def resume(self) -> bool:
        """Resume a paused run. False if it has ended or was cancelled."""
        return self._set("running")

    def cancel(self) -> bool:
        """Cancel the run: its fan-out enqueues nothing more, and its queued tasks end
        ``cancelled`` without touching the database (a compaction already running
        finishes). The run then finishes as usual. False if it has ended already."""
        return self._set("cancelled")

    def _set(self, state: RunState) -> bool:
        done = self._resources().progress.set_state(self.run_id, state)
        if done is None:
            raise RunNotFoundError(
                f"no progress stored for run {self.run_id}: unknown id, or older than ESKIT_RUN_TTL"
            )
        return done

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
            state=p.state,
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
    trigger: str = "shell",
    max_events_per_second: float | None = None,
    max_concurrent: int | None = None,
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
        trigger: Who started the run, as ``eskit-tasks runs`` shows it.
        max_events_per_second: Cap the events this run deletes per second, fleet-wide
            (the global cap holds too; see eskit_tasks.fleet.throttle).
        max_concurrent: Cap this run's compactions at once, fleet-wide.

    Raises:
        InvalidPolicyError: a bad value; nothing was sent.
        ServiceUnavailableError: the Redis for run progress, the result backend or the
            broker cannot be reached (the message says which); the run did not start.
    """
    policy = policy_kwargs(retain_last, retain_younger_than, dry_run)
    check_run_args(min_events, stream_types, max_streams)
    _check_caps(max_events_per_second=max_events_per_second, max_concurrent=max_concurrent)
    run_id = new_run_id()
    kwargs: dict[str, Any] = {
        "run_id": run_id,
        "min_events": min_events,
        "stream_types": None if stream_types is None else list(stream_types),
        "max_streams": max_streams,
        **policy,
        "trigger": trigger,
    }
    app = app or _default_app()
    res = resources_of(app)
    with reaching(STATE_REDIS, res.settings.redis_url):
        res.progress.create(run_id, kwargs, finish=True)
        if max_events_per_second is not None or max_concurrent is not None:
            set_caps(
                res.redis,
                run_scope(run_id),
                events_per_second=max_events_per_second,
                max_concurrent=max_concurrent,
            )
    _send_fan_out(app, kwargs)
    return CompactionRun(run_id, app=app)


def _send_fan_out(app: Celery, kwargs: dict[str, Any]) -> None:
    """Send a run's first fan-out page; an unreachable broker or result backend is said
    by name."""
    try:
        app.tasks[FAN_OUT_TASK].apply_async(kwargs=kwargs)
    except Exception as exc:
        if not unreachable(exc):
            raise
        if raised_by_result_backend(exc):
            raise unavailable(RESULT_BACKEND, app.conf.result_backend, exc) from exc
        raise unavailable(BROKER, app.conf.broker_url, exc) from exc


def compaction_result(
    task_id: str, *, app: Celery | None = None, timeout: float | None = None
) -> dict[str, Any] | None:
    """The ``CompactionResult`` (as JSON) of a ``compact_stream`` task, from the result
    backend, whatever its outcome: a task that compacted (or had nothing to do, or ran
    dry) returns it (SUCCESS, also what ``.get()`` gives); one whose outcome needs
    attention carries it in its :class:`~eskit_tasks.errors.CompactionNeedsAttention`
    (FAILURE, so Flower shows it failed).

    Args:
        task_id: The task's id (``compact_stream.delay(...).id``, Flower's UUID).
        app: The fleet app whose backend holds it (default: the process's app).
        timeout: Wait this many seconds for the task to finish (default: do not wait).

    Returns:
        The result as a dict; None if the task has not finished (or its result expired,
        ``result_expires``), or it died without one (a hard time limit: its run counts it
        as ``failed``; ``AsyncResult(task_id).result`` holds the exception).

    Raises:
        celery.exceptions.TimeoutError: not finished after ``timeout`` seconds.
    """
    app = app or _default_app()
    if timeout is not None:
        app.AsyncResult(task_id).get(timeout=timeout, propagate=False)
    return compaction_result_of(app.backend.get_task_meta(task_id))


def compaction_result_of(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``CompactionResult`` JSON that one stored task state holds: the backend's meta
    (``status`` and ``result``), decoded by Celery or read raw from the backend (a
    ``celery-task-meta-<id>`` key's JSON). None for any other state or result."""
    status, value = meta.get("status"), meta.get("result")
    if status == states.SUCCESS:
        return value if _is_result(value) else None
    if status != states.FAILURE:
        return None
    if isinstance(value, CompactionNeedsAttention):
        return value.result if _is_result(value.result) else None
    if (  # serialised by a JSON backend: {"exc_type", "exc_module", "exc_message": args}
        isinstance(value, Mapping)
        and value.get("exc_type") == CompactionNeedsAttention.__qualname__
        and value.get("exc_module") == CompactionNeedsAttention.__module__
        and isinstance(value.get("exc_message"), list | tuple)
    ):
        return next((a for a in value["exc_message"] if _is_result(a)), None)
    return None


def batch_results_of(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``CompactionResult`` JSON of each stream one stored ``compact_batch`` state
    holds (SUCCESS: its return value; FAILURE: carried by its
    ``CompactionNeedsAttention``), as :func:`compaction_result_of` reads a
    ``compact_stream``'s; empty for any other state or result."""
    status, value = meta.get("status"), meta.get("result")
    if status == states.FAILURE and isinstance(value, CompactionNeedsAttention):
        value = value.result
    elif (
        status == states.FAILURE
        and isinstance(value, Mapping)
        and value.get("exc_type") == CompactionNeedsAttention.__qualname__
        and isinstance(value.get("exc_message"), list | tuple)
    ):
        value = next((a for a in value["exc_message"] if isinstance(a, dict)), None)
    elif status != states.SUCCESS:
        return []
    if not isinstance(value, Mapping) or not isinstance(value.get("results"), Mapping):
        return []
    return [r for r in value["results"].values() if _is_result(r)]


def _is_result(value: Any) -> bool:
    return isinstance(value, dict) and "outcome" in value and "stream_id" in value


def _check_caps(**caps: Any) -> None:
    for name, cap in caps.items():
        number = isinstance(cap, int | float) and not isinstance(cap, bool)
        if cap is not None and (not number or cap < 0):
            raise InvalidPolicyError(f"{name} must be a number, 0 or more (0: no cap), got {cap!r}")


def apply_plan(
    plan_id: str, *, app: Celery | None = None, database: str | None = None
) -> CompactionRun:
    """Start a fleet run that compacts exactly the streams of a stored plan, each at most
    through its planned version (``eskit-tasks plan`` made it; see
    :mod:`eskit_tasks.core.planning`). A stream whose compaction point moved past the
    plan meanwhile ends ``nothing_to_compact``.

    Args:
        plan_id: The id ``eskit-tasks plan`` printed.
        app: The fleet app to send the run to (default: the process's app).
        database: The database holding the plan (default: the app's, ESKIT_DATABASE_URL).

    Raises:
        ConfigurationError: no such plan in the database, or it has expired.
    """
    app = app or _default_app()
    res = resources_of(app)
    plan = _plan_to_apply(res, plan_id, database)
    run_id = new_run_id()
    kwargs: dict[str, Any] = {
        "run_id": run_id,
        **policy_kwargs(plan.policy.get("retain_last", 0), plan.policy.get("retain_younger_than")),
        "trigger": "plan",
        "plan_id": plan.plan_id,
    }
    with reaching(STATE_REDIS, res.settings.redis_url):
        res.progress.create(run_id, kwargs, finish=True)
    _send_fan_out(app, kwargs)
    return CompactionRun(run_id, app=app)


def _plan_to_apply(res: Resources, plan_id: str, database: str | None) -> Plan:
    if database is not None:
        engine = create_engine(database)
        try:
            return applicable_plan(engine, plan_id)
        finally:
            engine.dispose()
    found = getattr(res.store, "engine", None)
    if found is None:
        raise ConfigurationError("plans need the SQL event store (ESKIT_DATABASE_URL)")
    return applicable_plan(found, plan_id)


def _default_app() -> Celery:
    from eskit_tasks.fleet.app import app  # the environment's app, built on first use

    return app
