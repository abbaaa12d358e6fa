"""The fleet's Celery tasks: ``compact_stream`` (one stream) and ``fan_out`` (a run).

Both are thin: ``compact_stream`` wires settings, a Redis lock and the SQL stores into
a :class:`~eskit_tasks.core.compactor.Compactor`; ``fan_out`` pages candidate streams and
enqueues one ``compact_stream`` each. Either may be delivered more than once (late
acknowledgement, redelivery after a crash or visibility timeout); each delivery is
harmless:

* a ``compact_stream`` whose result is already stored ignores itself;
* a copy that finds the stream locked by *another* task retries later (``locked`` when
  its retries run out); one that finds it locked by its *own* id (a redelivered copy of
  a task still running, or of one whose worker died) retries after the lock's TTL and
  never stores a result over the copy that worked;
* a fan-out page moves the run's cursor atomically after enqueueing it; a page
  delivered again later finds the cursor moved and stops (a copy running at the very
  same time enqueues the page twice: the extra tasks find nothing to do and each
  stream is counted once);
* a copy of a compact_stream task that finishes after another copy of the same task id
  stores nothing: the first to finish claims the result in Redis.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import time
import types
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import redis
from celery import Task, signals, states
from celery.exceptions import Ignore, MaxRetriesExceededError, Retry
from celery.utils.log import get_task_logger
from kombu import exceptions as kombu_errors
from kombu.exceptions import ChannelError
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from eskit_tasks.core.candidates import candidate_page
from eskit_tasks.core.compactor import Compactor, recovered_result
from eskit_tasks.core.registry import get_registration, import_decider_modules
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.domain.redact import mask_url
from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.errors import (
    CompactionError,
    ConfigurationError,
    DatabaseUnavailableError,
    EskitError,
    InvalidPolicyError,
)
from eskit_tasks.fleet import metrics
from eskit_tasks.fleet.app import app
from eskit_tasks.fleet.constants import (
    COMPACTION_LOGGER,
    DONE_PREFIX,
    FANOUT_MAX_RETRIES,
    FANOUT_PUBLISH_BATCH,
    LOCKED_RETRY_MAX_S,
)
from eskit_tasks.fleet.locks import StreamLock
from eskit_tasks.fleet.progress import Page, RunProgressStore, check_run_id
from eskit_tasks.fleet.settings import EskitSettings, get_settings
from eskit_tasks.stores.sql import SqlEventStore, SqlSnapshotStore

log = get_task_logger("eskit_tasks")

#: A failed pipeline of a page's messages (kombu>=5.7; its stubs do not know it yet).
BatchPublishError: type[Exception] = kombu_errors.BatchPublishError  # type: ignore[attr-defined]
#: Errors after which a fan-out page is tried again later (with backoff).
FANOUT_RETRIED_ERRORS = (
    RedisError,
    KombuOperationalError,
    BatchPublishError,
    DatabaseUnavailableError,
)
#: One JSON line per compaction attempt (see _log_result).
compaction_log = logging.getLogger(COMPACTION_LOGGER)


class _Resources:
    """Database and Redis clients of one process, made on first use.

    Keyed by pid: a prefork child never reuses connections inherited from its parent.
    """

    def __init__(self, settings: EskitSettings) -> None:
        self.settings = settings
        self._store: SqlEventStore | None = None
        self._redis: redis.Redis | None = None
        self._progress: RunProgressStore | None = None

    @property
    def store(self) -> SqlEventStore:
        if self._store is None:
            self._store = SqlEventStore.from_url(self.settings.database_url)
        return self._store

    @property
    def snapshots(self) -> SqlSnapshotStore:
        return SqlSnapshotStore(self.store.engine, create_tables=False)

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self.settings.redis_url,
                socket_timeout=10,
                socket_connect_timeout=5,
                health_check_interval=30,
            )
        return self._redis

    @property
    def progress(self) -> RunProgressStore:
        if self._progress is None:
            self._progress = RunProgressStore(self.redis, ttl=self.settings.run_ttl)
        return self._progress


_per_process: dict[int, _Resources] = {}


def resources() -> _Resources:
    """The clients of this process."""
    pid = os.getpid()
    found = _per_process.get(pid)
    if found is None:
        found = _Resources(get_settings())
        _per_process.clear()
        _per_process[pid] = found
    return found


def policy_kwargs(
    retain_last: int = 0, retain_younger_than: Any = None, dry_run: bool = False
) -> dict[str, Any]:
    """The policy as JSON-friendly task keyword arguments (ages in seconds)."""
    policy = CompactionPolicy(
        retain_last=retain_last, retain_younger_than=retain_younger_than, dry_run=dry_run
    )
    age = policy.retain_younger_than
    return {
        "retain_last": policy.retain_last,
        "retain_younger_than": None if age is None else age.total_seconds(),
        "dry_run": policy.dry_run,
    }


# -- compact_stream ---------------------------------------------------------------------


@app.task(bind=True, name="eskit_tasks.compact_stream", max_retries=None)
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
    """
    if not isinstance(stream_type, str) or not isinstance(stream_id, str):
        raise TypeError(  # a hand-made message: no result can name such a stream
            "compact_stream takes the stream type and id as strings, got "
            f"{type(stream_type).__name__} and {type(stream_id).__name__}"
        )
    settings = get_settings()
    res = resources()
    if _already_finished(self, res):
        raise Ignore()
    copy = _Copy(self, res, settings, run_id)
    try:
        import_decider_modules(settings.decider_module_list)
        result = _compact_locked(copy, stream_type, stream_id, policy)
    except (Ignore, Retry):
        raise
    except Exception as exc:  # anything else still ends in a reported result
        if isinstance(exc, DatabaseUnavailableError | RedisError):
            copy.retry_later(_backoff(settings, self.request.retries))
        result = CompactionResult(
            stream_type=stream_type,
            stream_id=stream_id,
            outcome=Outcome.FAILED,
            error=mask_url(f"{type(exc).__name__}: {exc}"),
            error_type=type(exc).__name__,
            compaction_id=compaction_id_for(copy.task_id),
        )
        _record(result, run_id, copy.task_id)
    if not copy.claim_result():
        raise Ignore()  # another copy of this very task finished first and owns the result
    if run_id is not None:
        _report(res, run_id, result)
    return result.model_dump(mode="json")


class TimeBudgetError(CompactionError):
    """Raised before a write when the task is about to reach its soft time limit."""


class _Copy:
    """One delivery of a compact_stream task, and how it coordinates with other copies
    of the same task id (redeliveries) through a "result claimed" key in Redis."""

    def __init__(
        self, task: Any, res: _Resources, settings: EskitSettings, run_id: str | None
    ) -> None:
        self.task = task
        self.run_id = run_id
        self.res = res
        self.settings = settings
        self.task_id: str = task.request.id or uuid.uuid4().hex
        self.token = uuid.uuid4().hex
        self.deadline = time.monotonic() + settings.task_soft_time_limit * 0.9

    def retry_later(self, countdown: float, *, unlimited: bool = False) -> None:
        """Re-send this task after ``countdown`` and end this delivery without storing
        a state (``Ignore``), so no other copy's result is overwritten. Returns only when
        the retries are used up."""
        limit = None if unlimited else self.settings.locked_max_retries
        try:
            self.task.retry(countdown=countdown, max_retries=limit, throw=False)
        except MaxRetriesExceededError:
            return
        raise Ignore()

    def claim_result(self) -> bool:
        """True if this copy may store the task's result: the first copy to finish owns
        it. Without Redis it cannot coordinate and stores (the database stays safe)."""
        key = done_key(self.task_id)
        ttl = int(self.settings.visibility_timeout * 2)
        try:
            if self.res.redis.set(key, self.token, nx=True, ex=ttl):
                return True
            owner = self.res.redis.get(key)
        except RedisError:
            return True
        return owner is not None and _text(owner) == self.token

    def result_claimed_by_other(self) -> bool:
        try:
            owner = self.res.redis.get(done_key(self.task_id))
        except RedisError:
            return False
        return owner is not None and _text(owner) != self.token

    def guard(self, lock: StreamLock) -> Callable[[], None]:
        def check() -> None:
            lock.check()
            if time.monotonic() > self.deadline:
                raise TimeBudgetError(
                    "stopped before writing: the task is near its soft time limit "
                    f"({self.settings.task_soft_time_limit:.0f}s, ESKIT_TASK_SOFT_TIME_LIMIT)"
                )

        return check


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def done_key(task_id: str) -> str:
    """Redis key claiming the result of a task id (hashed: task ids are data)."""
    return DONE_PREFIX + hashlib.sha256(task_id.encode()).hexdigest()[:32]


def _compact_locked(
    copy: _Copy, stream_type: str, stream_id: str, policy: dict[str, Any]
) -> CompactionResult:
    task, settings, res = copy.task, copy.settings, copy.res
    compaction_id = compaction_id_for(copy.task_id)

    def early(outcome: Outcome, error: str, error_type: str) -> CompactionResult:
        return CompactionResult(
            stream_type=stream_type,
            stream_id=stream_id,
            outcome=outcome,
            error=error,
            error_type=error_type,
            compaction_id=compaction_id,
        )

    try:
        parsed = CompactionPolicy(**policy)
        registration = get_registration(stream_type)
    except (InvalidPolicyError, ConfigurationError) as exc:
        failed = early(Outcome.FAILED, str(exc), type(exc).__name__)
        _record(failed, copy.run_id, copy.task_id)
        return failed
    store, snapshots = res.store, res.snapshots  # connect before taking the lock

    lock = StreamLock(res.redis, stream_type, stream_id, ttl=settings.lock_ttl, owner=copy.task_id)
    try:
        acquired = lock.acquire()
        holder = None if acquired else lock.holder()
    except RedisError as exc:
        copy.retry_later(_backoff(settings, task.request.retries))
        unreachable = early(
            Outcome.FAILED,
            f"Redis for locks unreachable at {mask_url(settings.redis_url)}: {exc}",
            type(exc).__name__,
        )
        _record(unreachable, copy.run_id, copy.task_id)
        return unreachable
    if not acquired:
        metrics.record_lock_wait()
        if holder == copy.task_id:
            # A redelivered copy of this very task: the first copy is still running, or
            # died and its lock has not expired yet. Look again once it has.
            copy.retry_later(settings.lock_ttl + 1, unlimited=True)
        copy.retry_later(_backoff(settings, task.request.retries))
        locked = early(
            Outcome.LOCKED,
            f"{stream_type}/{stream_id} is locked by task {holder}; gave up after "
            f"{settings.locked_max_retries} retries",
            "LockedError",
        )
        _record(locked, copy.run_id, copy.task_id)
        return locked
    try:
        if copy.result_claimed_by_other():
            raise Ignore()  # a copy of this task finished while we waited for the lock
        result = Compactor(
            store=store,
            snapshot_store=snapshots,
            decider=registration.decider,
            state_type=registration.state_type,
            state_version=registration.state_version,
            upcasters=registration.upcasters,
            policy=parsed,
            guard=copy.guard(lock),
        ).compact(stream_type, stream_id, compaction_id=compaction_id)
        retry = result.error_type in _TRANSIENT
        # Claim the result while still holding the lock, so a redelivered copy that
        # takes the lock next sees that this task is done.
        claimed = False if retry else copy.claim_result()
        # A deletion is accounted by the copy that owns the task's result only: a copy
        # paused past its lock may commit while a redelivered copy reports the same
        # deletion from the audit log (both under the task's compaction id).
        if claimed or result.outcome is not Outcome.COMPACTED:
            _record(result, copy.run_id, copy.task_id, timed=True)
    finally:
        lock.release()
    if retry:
        copy.retry_later(_backoff(settings, task.request.retries))  # Ignore unless used up
        claimed = copy.claim_result()
    if not claimed:
        raise Ignore()
    return result


# Failures worth another try: the database or Redis was unreachable, or the lock was
# lost (Redis blipped) — the stream itself is fine. A delete whose outcome is still
# unknown is settled by the retry, which carries the same compaction id.
_TRANSIENT = ("DatabaseUnavailableError", "CommitOutcomeUnknownError", "LockLostError")

#: Namespace of the compaction ids derived from task ids.
_COMPACTION_IDS = uuid.UUID("5d0c3f7e-8f3a-4c2e-9b1d-6a7e2f0c4b19")


def compaction_id_for(task_id: str) -> str:
    """The compaction id of a task: the same for every retry and redelivery of that task
    id, so a copy that runs after a crash finds the deletion its predecessor committed
    and reports it instead of "nothing to compact"."""
    return str(uuid.uuid5(_COMPACTION_IDS, task_id))


def _backoff(settings: EskitSettings, retries: int) -> float:
    """Doubling delays with jitter, capped well below the visibility timeout (a delayed
    message waits unacknowledged in a worker; past the timeout Redis would redeliver it)."""
    cap = min(LOCKED_RETRY_MAX_S, settings.visibility_timeout / 3)
    base = settings.locked_retry_base * (2**retries)
    jitter = random.uniform(0.8, 1.2)  # noqa: S311 -- spreading retries, not security
    return float(min(base, cap) * jitter)


def _already_finished(task: Any, res: _Resources) -> bool:
    """True when a copy of this task id already finished (a redelivered message)."""
    task_id = task.request.id
    if not task_id:
        return False
    try:
        if res.redis.exists(done_key(task_id)):
            return True
    except RedisError:
        pass
    try:
        return task.AsyncResult(task_id).state in states.READY_STATES
    except Exception:  # the backend being down must not stop the compaction
        return False


def _record(
    result: CompactionResult, run_id: str | None, task_id: str | None, *, timed: bool = False
) -> None:
    """Account for one compaction attempt that ended: its metrics (``timed`` when the
    compactor ran and measured it) and its log line. Called once per attempt."""
    metrics.record_compaction(result, timed=timed)
    _log_result(result, run_id, task_id)


# Outcomes worth a look: a warning, or an error for a snapshot that did not verify.
_LOG_LEVELS = {
    Outcome.VERIFICATION_FAILED: logging.ERROR,
    Outcome.FAILED: logging.WARNING,
    Outcome.FENCED: logging.WARNING,
}


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
        "run_id": run_id,
        "task_id": task_id,
        "error_type": result.error_type,
        "error": None if result.error is None else mask_url(result.error),
    }


def _log_result(result: CompactionResult, run_id: str | None, task_id: str | None = None) -> None:
    """Log one line for a compaction: a JSON object (logger ``eskit_tasks.compaction``).

    In a worker the line is the bare object with ``ts``, ``level`` and ``logger`` added
    (see celery_app); under another logging set-up the message is the same object.
    """
    fields = compaction_fields(result, run_id, task_id)
    compaction_log.log(
        _LOG_LEVELS.get(result.outcome, logging.INFO),
        "%s",
        json.dumps(fields, default=str),
        extra={"eskit_fields": fields},
    )


@signals.task_failure.connect
def _report_task_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    """A compact_stream that died with an exception (hard time limit, a bug) still counts
    in its run, so ``run.wait()`` finishes: as the deletion it committed, if the audit log
    holds its compaction id (killed right after COMMIT), else as failed."""
    if getattr(sender, "name", None) != "eskit_tasks.compact_stream":
        return
    kwargs = kwargs if isinstance(kwargs, dict) else {}  # a hand-made message may be
    args = list(args) if isinstance(args, list | tuple) else []  # any JSON at all
    run_id = kwargs.get("run_id")
    stream_type = args[0] if args else kwargs.get("stream_type")
    stream_id = args[1] if len(args) > 1 else kwargs.get("stream_id")
    if not isinstance(stream_type, str) or not isinstance(stream_id, str):
        return
    earlier = _failures_handled.get(task_id) if task_id else None
    if earlier is not None:
        # Celery sends task_failure twice for one hard time limit (as the pool fails the
        # job, and again from on_timeout), writing FAILURE before each: account for the
        # attempt once, but put the recovered result back each time.
        _store_recovered(sender, task_id, earlier, args, kwargs)
        return
    compaction_id = compaction_id_for(task_id) if task_id else str(uuid.uuid4())
    result = _committed_by(stream_type, stream_id, compaction_id) or CompactionResult(
        stream_type=stream_type,
        stream_id=stream_id,
        outcome=Outcome.FAILED,
        error=mask_url(f"task {task_id} died: {type(exception).__name__}: {exception}"),
        error_type=type(exception).__name__,
        compaction_id=compaction_id,
    )
    if task_id:
        _failures_handled[task_id] = result
        while len(_failures_handled) > _FAILURES_REMEMBERED:
            _failures_handled.popitem(last=False)
    _record(result, run_id, task_id)
    if run_id:
        _report(resources(), run_id, result)
    _store_recovered(sender, task_id, result, args, kwargs)


#: Task ids whose death this process accounted for already (see _report_task_failure).
_failures_handled: OrderedDict[str, CompactionResult] = OrderedDict()
_FAILURES_REMEMBERED = 1024


def _store_recovered(
    task: Any, task_id: str | None, result: CompactionResult, args: Any, kwargs: Any
) -> None:
    """A task that died after its delete committed: the result backend gets the deletion
    (SUCCESS, ``recovered``) instead of Celery's FAILURE, so Flower and ``AsyncResult``
    tell the same as the run, the log line and the audit log."""
    if not result.recovered or not task_id:
        return
    # What an extended result names (task, arguments), as Celery's own write did.
    request = types.SimpleNamespace(
        task=task.name, args=args, kwargs=kwargs, hostname=None, retries=None, delivery_info=None
    )
    try:
        task.backend.store_result(
            task_id, result.model_dump(mode="json"), states.SUCCESS, request=request
        )
    except Exception as exc:  # the backend being down must not hide the report above
        log.warning("could not store the recovered result of task %s: %s", task_id, exc)


def _committed_by(stream_type: str, stream_id: str, compaction_id: str) -> CompactionResult | None:
    """The deletion a dead task committed, from the audit log (None: none, or the
    database cannot say; the result then names the id to look up).

    A new fencing token is taken first: it waits for a delete still in flight (the killed
    process's COMMIT), so "not found" is final, and stops any stale copy of the task.
    """
    store = resources().store
    try:
        store.acquire_fence(stream_type, stream_id)
        record = store.find_compaction(compaction_id)
    except EskitError as exc:
        log.warning("could not look up compaction %s in the audit log: %s", compaction_id, exc)
        return None
    if record is None or (record.stream_type, record.stream_id) != (stream_type, stream_id):
        return None
    return recovered_result(record)


def _report(res: _Resources, run_id: str, result: CompactionResult) -> None:
    try:
        if res.progress.report(check_run_id(run_id), result) is None:
            log.warning(
                "run %s has no progress in Redis (expired, or Redis restarted without "
                "persistence): %s/%s not counted",
                run_id,
                result.stream_type,
                result.stream_id,
            )
    except (RedisError, EskitError) as exc:
        log.warning("could not record progress of run %s: %s", run_id, exc)


# -- fan_out ----------------------------------------------------------------------------


@app.task(bind=True, name="eskit_tasks.fan_out", max_retries=FANOUT_MAX_RETRIES)
def fan_out(
    self: Task[Any, Any],
    /,
    run_id: str | None = None,
    cursor: int = 0,
    min_events: int = 1,
    stream_types: list[str] | None = None,
    max_streams: int | None = None,
    retain_last: int = 0,
    retain_younger_than: Any = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Enqueue one compact_stream per candidate stream, a page at a time.

    Candidates are streams with at least ``min_events`` events since their last
    compaction (and more than ``retain_last``), of ``stream_types`` if given, at most
    ``max_streams`` per run. While the compaction queue holds ``ESKIT_FANOUT_HIGH_WATER``
    messages or more, the fan-out waits and looks again; it re-sends itself for each
    next page, so memory stays bounded by one page whatever the number of candidates.
    If the database, Redis or the broker is unreachable it retries with backoff; if that
    keeps failing, the run is marked failed (``run.wait()`` returns with its error).
    """
    if run_id is None:  # started by beat: derive the id from the task, so a redelivered
        run_id = _run_id_for(self.request.id)  # first page continues the same run
    run_id = check_run_id(run_id)
    args = {
        "run_id": run_id,
        "min_events": min_events,
        "stream_types": stream_types,
        "max_streams": max_streams,
        "retain_last": retain_last,
        "retain_younger_than": retain_younger_than,
        "dry_run": dry_run,
    }
    try:
        return _fan_out_page(args, cursor)
    except FANOUT_RETRIED_ERRORS as exc:
        try:
            raise self.retry(exc=exc, countdown=_backoff(get_settings(), self.request.retries))
        # Out of retries, retry(exc=...) raises exc itself, not MaxRetriesExceededError.
        except (MaxRetriesExceededError, *FANOUT_RETRIED_ERRORS):
            with contextlib.suppress(RedisError):
                resources().progress.fail(run_id, mask_url(f"fan-out gave up: {exc}"))
            raise


def _fan_out_page(args: dict[str, Any], cursor: int) -> dict[str, Any]:
    settings = get_settings()
    res = resources()
    run_id = args["run_id"]
    try:
        policy = policy_kwargs(args["retain_last"], args["retain_younger_than"], args["dry_run"])
        _check_run_args(args["min_events"], args["stream_types"], args["max_streams"])
    except EskitError as exc:
        res.progress.create(run_id, args)
        res.progress.fail(run_id, str(exc))
        return {"run_id": run_id, "error": str(exc)}
    if cursor != 0 and not res.progress.exists(run_id):
        return _progress_lost(res, args)
    res.progress.create(run_id, args)
    if res.progress.cursor(run_id) != cursor:
        return {"run_id": run_id, "duplicate_page": cursor}

    depth = queue_depth(settings.compaction_queue)
    if depth >= settings.fanout_high_water:
        res.progress.note_depth(run_id, depth)
        fan_out.apply_async(kwargs={**args, "cursor": cursor}, countdown=settings.fanout_backoff)
        return {"run_id": run_id, "waiting": depth}

    progress = res.progress.get(run_id)
    budget = (
        None
        if args["max_streams"] is None
        else args["max_streams"] - (0 if progress is None else progress.candidates)
    )
    limit = min(settings.fanout_page_size, settings.fanout_high_water - depth)
    if budget is not None:
        limit = min(limit, budget)
    page, new_cursor = candidate_page(
        res.store,
        after=cursor,
        limit=limit,
        page_size=settings.fanout_page_size,
        min_live_events=max(args["min_events"], args["retain_last"] + 1),
        stream_types=args["stream_types"],
    )
    full = bool(page) and len(page) == limit
    # Not full: every key up to the new cursor was examined.
    exhausted = limit <= 0 or (not full and new_cursor >= res.store.max_stream_key())
    finished = exhausted or (budget is not None and len(page) >= budget)
    # Fix the page before sending anything: a copy of this page (a retry, the same
    # fan-out sent twice) sends the stored streams, not its own reading.
    stored = res.progress.store_page(
        run_id,
        Page(cursor, new_cursor, finished, tuple((c.stream_type, c.stream_id) for c in page)),
    )
    if stored is None:
        if not res.progress.exists(run_id):
            return _progress_lost(res, args)
        return {"run_id": run_id, "duplicate_page": cursor}
    _enqueue(stored.streams, {"run_id": run_id, **policy})
    claimed = res.progress.advance(run_id, stored, depth=depth)
    if claimed and not stored.last:
        fan_out.apply_async(kwargs={**args, "cursor": stored.next_cursor})
    return {
        "run_id": run_id,
        "enqueued": len(stored.streams),
        "cursor": stored.next_cursor,
        "done": stored.last,
    }


def _progress_lost(res: _Resources, args: dict[str, Any]) -> dict[str, Any]:
    run_id = args["run_id"]
    error = (
        f"the progress of run {run_id} disappeared from Redis (expired, or Redis "
        "restarted without persistence) while paging; start a new run. Compactions "
        "already done are unaffected."
    )
    res.progress.create(run_id, args)
    res.progress.fail(run_id, error)
    return {"run_id": run_id, "error": error}


def _enqueue(streams: Iterable[tuple[str, str]], kwargs: dict[str, Any]) -> None:
    """Send one compact_stream message per candidate, as fast as the broker allows.

    On Redis the messages go out in pipelines (kombu's ``Producer.batch``); a failed
    pipeline raises, and the page is sent again by the fan-out's retry (a stream
    enqueued twice is compacted once). Celery's own per-message costs are cut where it
    lets us: the queue is declared with the first message only, and the argument
    reprs shown by monitoring tools are built here (Celery's generic ``saferepr`` was
    a fifth of the fan-out's time).
    """
    kwargsrepr = _short_repr(kwargs)
    declare: list[Any] | None = None  # Celery's default: declare the routed queue
    send: Any = compact_stream.apply_async  # the stubs predate these documented options
    with app.producer_or_acquire() as producer, producer.batch(FANOUT_PUBLISH_BATCH):
        for args in streams:
            send(
                args=args,
                kwargs=kwargs,
                producer=producer,
                declare=declare,
                argsrepr=_short_repr(args),
                kwargsrepr=kwargsrepr,
            )
            declare = []


def _short_repr(value: object, limit: int = 1024) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_id_for(task_id: str | None) -> str:
    if not task_id:
        return uuid.uuid4().hex
    try:
        return uuid.UUID(task_id).hex
    except ValueError:
        return hashlib.sha256(task_id.encode()).hexdigest()[:32]


def _check_run_args(min_events: Any, stream_types: Any, max_streams: Any) -> None:
    if isinstance(min_events, bool) or not isinstance(min_events, int) or min_events < 1:
        raise InvalidPolicyError(f"min_events must be an int >= 1, got {min_events!r}")
    if stream_types is not None and (
        not isinstance(stream_types, list | tuple)
        or not all(isinstance(t, str) for t in stream_types)
    ):
        raise InvalidPolicyError(f"stream_types must be a list of strings, got {stream_types!r}")
    if max_streams is not None and (
        isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 0
    ):
        raise InvalidPolicyError(f"max_streams must be an int >= 0, got {max_streams!r}")


def queue_depth(queue: str) -> int:
    """Messages waiting in ``queue`` on the broker (0 if it does not exist yet)."""
    try:
        with app.connection_for_read() as conn:
            channel: Any = conn.default_channel
            declared = channel.queue_declare(queue=queue, passive=True)
            return int(declared.message_count)
    except ChannelError:
        return 0  # not declared yet
