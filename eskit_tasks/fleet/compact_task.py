"""The ``eskit_tasks.compact_stream`` task: one stream, under a per-stream Redis lock.

It wires the process's resources, a :class:`~eskit_tasks.fleet.locks.StreamLock` and
the registered decider into a :class:`~eskit_tasks.core.compactor.Compactor`. Each
delivery is harmless (see :mod:`eskit_tasks.fleet.redelivery`):

* a copy whose task's result is already claimed ignores itself (it counts that result
  in its run);
* a copy that finds the stream locked by *another* task retries later (``locked`` when
  its retries run out); one that finds it locked by its *own* id (a redelivered copy of
  a task still running, or of one whose worker died) retries after the lock's TTL and
  never stores a result over the copy that worked;
* a copy that finishes after another copy of the same task id stores nothing: the first
  to finish claims the result in Redis.

A task whose outcome needs attention (``failed``, ``verification_failed``, ``fenced``,
``locked``) ends in Celery's FAILURE state, so Flower shows it failed: once its result
is claimed, counted in its run and logged, it raises
:class:`~eskit_tasks.errors.CompactionNeedsAttention`, which carries the result
(``eskit_tasks.fleet.runs.compaction_result`` reads it back). The other outcomes are
the task's return value (SUCCESS).

Redis is asked once before a compaction starts — done key, run state, throttle caps and
the stream's lock in one script (:mod:`eskit_tasks.fleet.task_start`) — and the
throttle's own gates run only when a cap is set. :func:`compact_copy` is the work for
one stream; a batch of small streams (:mod:`eskit_tasks.fleet.batch`) runs it for each
of its streams, each under the task id the fan-out gave that stream.
"""

from __future__ import annotations

import contextlib
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Retry
from redis.exceptions import RedisError

from eskit_tasks.core.registry import (
    Registration,
    StreamSource,
    get_registration,
    get_source,
    import_decider_modules,
)
from eskit_tasks.core.settlement import committed_fields
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.domain.redact import mask_url
from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.errors import (
    CompactionNeedsAttention,
    ConfigurationError,
    DatabaseUnavailableError,
    EskitError,
)
from eskit_tasks.fleet import metrics
from eskit_tasks.fleet.constants import PAUSE_POLL_MIN_S
from eskit_tasks.fleet.locks import StreamLock
from eskit_tasks.fleet.observability import record
from eskit_tasks.fleet.progress import RUN_ID_PATTERN as _RUN_ID
from eskit_tasks.fleet.quarantine import note_outcome
from eskit_tasks.fleet.redelivery import TaskCopy, is_transient
from eskit_tasks.fleet.resources import Resources, resources_of
from eskit_tasks.fleet.settings import EskitSettings
from eskit_tasks.fleet.task_start import Started
from eskit_tasks.fleet.throttle import Throttle, global_scope, run_scope


def compact_stream(
    self: Task[Any, Any],
    /,
    stream_type: str,
    stream_id: str,
    run_id: str | None = None,
    **policy: Any,
) -> dict[str, Any]:
    """Compact one stream under a per-stream lock; return its CompactionResult as JSON.

    Args:
        stream_type: The stream's type (a decider must be registered for it).
        stream_id: The stream's id.
        run_id: The fleet run this task belongs to, for progress.
        **policy: ``retain_last``, ``retain_younger_than`` (seconds or "30d"), ``dry_run``.

    Raises:
        CompactionNeedsAttention: the outcome needs attention; the exception carries
            the result (the task is stored as FAILURE).
    """
    if not isinstance(stream_type, str) or not isinstance(stream_id, str):
        raise TypeError(  # a hand-made message: no result can name such a stream
            "compact_stream takes the stream type and id as strings, got "
            f"{type(stream_type).__name__} and {type(stream_id).__name__}"
        )
    res = resources_of(self.app)
    return compact_copy(TaskCopy(self, res, run_id), stream_type, stream_id, policy)


def compact_copy(
    copy: TaskCopy, stream_type: str, stream_id: str, policy: dict[str, Any]
) -> dict[str, Any]:
    """The work of one copy of a stream's task: its result as JSON, once claimed.

    Raises:
        Ignore: another copy owns the result, or this copy was re-sent (a retry, a wait).
        Retry: the copy is retried.
        CompactionNeedsAttention: the outcome needs attention (carries the result).
    """
    # Every copy asks, not only one flagged as a retry or redelivery: a page sent again
    # carries the same task ids unflagged, and a claim is gone when Redis restarted
    # without persistence; the result backend still holds the first copy's result.
    if copy.already_finished():
        raise Ignore()
    try:
        result = _compact_started(copy, stream_type, stream_id, policy)
    except (Ignore, Retry):
        raise
    except Exception as exc:  # anything else still ends in a reported result
        if isinstance(exc, DatabaseUnavailableError | RedisError):
            copy.retry_later()
        result = CompactionResult.failed(
            stream_type, stream_id, exc, compaction_id=copy.compaction_id
        )
        record(result, copy.run_id, copy.task_id)
    return _claimed(copy, result)


def _claimed(copy: TaskCopy, result: CompactionResult) -> dict[str, Any]:
    if not copy.claim_result(result):
        raise Ignore()  # another copy of this very task finished first and owns the result
    answer = result.model_dump(mode="json")
    if result.outcome.needs_attention:
        # Claimed, counted and logged already: failures.py leaves this exception alone.
        raise CompactionNeedsAttention(attention_message(result), answer)
    return answer


def attention_message(result: CompactionResult) -> str:
    """What Flower shows as the exception of a task whose outcome needs attention."""
    said = f": {result.error}" if result.error else ""
    return f"{result.outcome.value} {result.stream_type}/{result.stream_id}{said}"


class _Prepared:
    """What a compaction needs before it starts: the policy, and the stream's source
    (a pyeventsourcing application) or registration (a decider)."""

    def __init__(self, policy: dict[str, Any], stream_type: str) -> None:
        self.policy = CompactionPolicy(**policy)
        self.source: StreamSource | None = get_source(stream_type)
        self.registration: Registration | None = (
            None if self.source is not None else get_registration(stream_type)
        )


def _early(
    copy: TaskCopy,
    stream_type: str,
    stream_id: str,
    outcome: Outcome,
    error: str,
    error_type: str,
) -> CompactionResult:
    """A result reached before the compactor ran (recorded: metrics and log line)."""
    result = CompactionResult.failed(
        stream_type,
        stream_id,
        error,
        outcome=outcome,
        error_type=error_type,
        compaction_id=copy.compaction_id,
    )
    record(result, copy.run_id, copy.task_id)
    return result


def _compact_started(
    copy: TaskCopy, stream_type: str, stream_id: str, policy: dict[str, Any]
) -> CompactionResult:
    """Ask Redis once whether and how this copy may start (see task_start.py), then
    compact under the lock that answer took."""
    settings, res = copy.settings, copy.res
    import_decider_modules(settings.decider_module_list)
    try:
        prepared = _Prepared(policy, stream_type)
    except ConfigurationError as exc:  # an invalid policy, an unknown stream type
        held = _held_by_run(copy, stream_type, stream_id)  # a cancelled run says so first
        return held or _early(
            copy, stream_type, stream_id, Outcome.FAILED, str(exc), type(exc).__name__
        )
    res.store, res.snapshots  # noqa: B018 -- connect before taking the lock
    lock = StreamLock(res.redis, stream_type, stream_id, ttl=settings.lock_ttl, owner=copy.task_id)
    try:
        started = copy.start(lock, gates=True)
    except RedisError as exc:
        return _redis_down(copy, stream_type, stream_id, exc)
    if started.answer == "done":
        copy.finished_elsewhere(started.value or "")
        raise Ignore()  # a copy of this task finished: its result is counted
    if started.answer == "paused":
        copy.wait_later(pause_poll(settings))
    if started.answer == "cancelled":
        return _cancelled(copy, stream_type, stream_id)
    if started.answer == "throttled":
        return _compact_throttled(copy, stream_type, stream_id, prepared, lock)
    return _compact_locked(copy, stream_type, stream_id, prepared, lock, started)


def _redis_down(
    copy: TaskCopy, stream_type: str, stream_id: str, exc: RedisError
) -> CompactionResult:
    copy.retry_later()
    return _early(
        copy,
        stream_type,
        stream_id,
        Outcome.FAILED,
        f"Redis for locks unreachable at {mask_url(copy.settings.redis_url)}: {exc}",
        type(exc).__name__,
    )


def _held_by_run(copy: TaskCopy, stream_type: str, stream_id: str) -> CompactionResult | None:
    """Read the run's state: a paused run's task waits (re-sent later, reading
    nothing); a cancelled run's ends ``cancelled`` (its result, to claim) without
    touching the database. (Asked in the start script; read on its own only after a
    throttle's wait or before an early failure.)"""
    state = _run_state(copy.res, copy.run_id)
    if state == "paused":
        copy.wait_later(pause_poll(copy.settings))
    if state != "cancelled":
        return None
    return _cancelled(copy, stream_type, stream_id)


def _cancelled(copy: TaskCopy, stream_type: str, stream_id: str) -> CompactionResult:
    result = _committed_before(copy, stream_type, stream_id) or CompactionResult(
        stream_type=stream_type,
        stream_id=stream_id,
        outcome=Outcome.CANCELLED,
        compaction_id=copy.compaction_id,
    )
    record(result, copy.run_id, copy.task_id)
    return result


def _committed_before(copy: TaskCopy, stream_type: str, stream_id: str) -> CompactionResult | None:
    """For a copy that follows an earlier attempt of its task (a retry, a redelivery):
    the deletion that attempt committed, if it did — reported, not hidden behind
    ``cancelled``. One read of the audit log; a first delivery reads nothing."""
    if not copy.follows_attempt:
        return None
    try:
        found = copy.res.store.find_compaction(copy.compaction_id)
    except EskitError:
        return None
    if found is None:
        return None
    return CompactionResult(stream_type=stream_type, stream_id=stream_id, **committed_fields(found))


def _run_state(res: Resources, run_id: str | None) -> str:
    """The run's state (paused, cancelled or running); running when Redis cannot say
    (the lock step reports Redis being down)."""
    if run_id is None:
        return "running"
    try:
        return res.progress.state(run_id)
    except (RedisError, ConfigurationError):  # Redis down; not a run id (never counted)
        return "running"


def pause_poll(settings: EskitSettings) -> float:
    """Seconds before the work of a paused run looks again."""
    return max(settings.fanout_backoff, PAUSE_POLL_MIN_S)


def _compact_throttled(
    copy: TaskCopy,
    stream_type: str,
    stream_id: str,
    prepared: _Prepared,
    lock: StreamLock,
) -> CompactionResult:
    """A cap is set: compact once the fleet-wide caps let this compaction start (see
    :mod:`eskit_tasks.fleet.throttle`); charge what it deleted. A task still waiting
    after ``WAIT_IN_TASK_S`` gives its worker back and is re-sent."""
    settings = copy.settings
    scopes = [global_scope(settings.max_events_per_second, settings.max_concurrent_compactions)]
    if copy.run_id is not None and _RUN_ID.fullmatch(copy.run_id):
        scopes.append(run_scope(copy.run_id))  # a malformed id never becomes a key
    throttle = Throttle(copy.res.redis, scopes, lease=settings.lock_ttl)
    try:
        waited = throttle.try_admit() != 0.0
        admitted = not waited or throttle.admit()
    except RedisError:  # load control only: the lock step says Redis is down
        waited, admitted = False, True
    if not admitted:
        copy.wait_later(pause_poll(settings))
    try:
        # Paused or cancelled while this task waited for its turn (read again only then).
        result = _held_by_run(copy, stream_type, stream_id) if waited else None
        if result is None:
            try:
                started = copy.start(lock, gates=False)  # the done key and the lock
            except RedisError as exc:
                return _redis_down(copy, stream_type, stream_id, exc)
            if started.answer == "done":
                copy.finished_elsewhere(started.value or "")
                raise Ignore()
            result = _compact_locked(copy, stream_type, stream_id, prepared, lock, started)
    finally:
        with contextlib.suppress(RedisError):
            throttle.release()
    if result.outcome is Outcome.COMPACTED and not result.recovered:
        with contextlib.suppress(RedisError):
            throttle.charge(result.events_deleted)
    return result


def _compact_locked(
    copy: TaskCopy,
    stream_type: str,
    stream_id: str,
    prepared: _Prepared,
    lock: StreamLock,
    started: Started,
) -> CompactionResult:
    """Compact under the lock ``started`` took; or, if another task holds it, retry
    later (``locked`` once the retries are used up)."""
    settings, res = copy.settings, copy.res
    if started.answer != "locked":
        holder = started.value
        metrics.record_lock_wait(stream_type)
        if holder == copy.task_id:
            # A redelivered copy of this very task: the first copy is still running, or
            # died and its lock has not expired yet. Look again once it has.
            copy.retry_later(settings.lock_ttl + 1, unlimited=True)
        copy.retry_later()
        return _early(
            copy,
            stream_type,
            stream_id,
            Outcome.LOCKED,
            f"{stream_type}/{stream_id} is locked by task {holder}; gave up after "
            f"{settings.locked_max_retries} retries",
            "LockedError",
        )
    # The done key was read as the lock was taken: no copy of this task had finished.
    try:
        if prepared.source is not None:
            result = prepared.source.compactor(prepared.policy, guard=copy.guard(lock)).compact(
                stream_id, compaction_id=copy.compaction_id, run_id=copy.run_id
            )
        else:
            assert prepared.registration is not None
            result = prepared.registration.compactor(
                res.store,
                res.snapshots,
                prepared.policy,
                guard=copy.guard(lock),
                archive=res.archive,
            ).compact(stream_type, stream_id, compaction_id=copy.compaction_id, run_id=copy.run_id)
        retry = is_transient(result)
        # Claim the result while still holding the lock, so a redelivered copy that
        # takes the lock next sees that this task is done.
        claimed = False if retry else copy.claim_result(result)
        # A deletion is accounted by the copy that owns the task's result only: a copy
        # paused past its lock may commit while a redelivered copy reports the same
        # deletion from the audit log (both under the task's compaction id).
        if claimed or result.outcome is not Outcome.COMPACTED:
            record(result, copy.run_id, copy.task_id, timed=True)
        if claimed:
            note_outcome(res.quarantine, result)
    finally:
        lock.release()
    if retry:
        copy.retry_later()  # Ignore unless the retries are used up
        claimed = copy.claim_result(result)
    if not claimed:
        raise Ignore()
    return result
