"""The fleet's Celery tasks: ``compact_stream`` (one stream) and ``fan_out`` (a run).

Both are thin: ``compact_stream`` wires settings, a Redis lock and the SQL stores into
a :class:`~eskit_tasks.compactor.Compactor`; ``fan_out`` pages candidate streams and
enqueues one ``compact_stream`` each. Either may be delivered more than once (late
acknowledgement, redelivery after a crash or visibility timeout); each delivery is
harmless:

* a ``compact_stream`` whose result is already stored ignores itself;
* a copy that finds the stream locked by *another* task retries later (``locked`` when
  its retries run out); one that finds it locked by its *own* id (a redelivered copy of
  a task still running, or of one whose worker died) retries after the lock's TTL and
  never stores a result over the copy that worked;
* a fan-out page is claimed by moving the run's cursor atomically; a duplicate page
  finds the cursor moved and stops.
"""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from typing import Any

import redis
from celery import Task, states
from celery.exceptions import Ignore, MaxRetriesExceededError
from celery.utils.log import get_task_logger
from kombu.exceptions import ChannelError, OperationalError
from redis.exceptions import RedisError

from eskit_tasks.celery_app import app
from eskit_tasks.compactor import Compactor
from eskit_tasks.constants import LOCKED_RETRY_MAX_S
from eskit_tasks.errors import ConfigurationError, EskitError, InvalidPolicyError
from eskit_tasks.locks import StreamLock
from eskit_tasks.policy import CompactionPolicy
from eskit_tasks.progress import RunProgressStore, check_run_id
from eskit_tasks.redact import mask_url
from eskit_tasks.registry import get_registration, import_decider_modules
from eskit_tasks.result import CompactionResult, Outcome
from eskit_tasks.settings import EskitSettings, get_settings
from eskit_tasks.stores.sql import SqlEventStore, SqlSnapshotStore

log = get_task_logger("eskit_tasks")


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


@app.task(bind=True, name="eskit_tasks.compact_stream")
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
    if _already_finished(self):
        raise Ignore()
    settings = get_settings()
    import_decider_modules(settings.decider_module_list)
    res = resources()
    result = _compact_locked(self, settings, res, stream_type, stream_id, policy)
    if run_id is not None:
        _report(res, run_id, result)
    log.info(
        "compaction stream=%s/%s outcome=%s head=%s snapshot=%s deleted=%s retained=%s "
        "bytes=%s duration_ms=%s compaction_id=%s run_id=%s",
        stream_type,
        stream_id,
        result.outcome.value,
        result.head_version,
        result.snapshot_version,
        result.events_deleted,
        result.events_retained,
        result.bytes_reclaimed,
        result.duration_ms,
        result.compaction_id,
        run_id,
    )
    return result.model_dump(mode="json")


def _compact_locked(
    task: Any,
    settings: EskitSettings,
    res: _Resources,
    stream_type: str,
    stream_id: str,
    policy: dict[str, Any],
) -> CompactionResult:
    compaction_id = str(uuid.uuid4())

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
        return early(Outcome.FAILED, str(exc), type(exc).__name__)

    owner = task.request.id or compaction_id
    lock = StreamLock(res.redis, stream_type, stream_id, ttl=settings.lock_ttl, owner=owner)
    try:
        acquired = lock.acquire()
        holder = None if acquired else lock.holder()
    except RedisError as exc:
        _retry_later(task, settings, _backoff(settings, task.request.retries))
        return early(
            Outcome.FAILED,
            f"Redis for locks unreachable at {mask_url(settings.redis_url)}: {exc}",
            type(exc).__name__,
        )
    if not acquired:
        if holder == owner:
            # A redelivered copy of this very task: the first copy is still running, or
            # died and its lock has not expired yet. Look again once it has.
            _retry_later(task, settings, settings.lock_ttl + 1, unlimited=True)
            raise Ignore()
        _retry_later(task, settings, _backoff(settings, task.request.retries))
        return early(
            Outcome.LOCKED,
            f"{stream_type}/{stream_id} is locked by task {holder}; gave up after "
            f"{settings.locked_max_retries} retries",
            "LockedError",
        )
    try:
        result = Compactor(
            store=res.store,
            snapshot_store=res.snapshots,
            decider=registration.decider,
            state_type=registration.state_type,
            policy=parsed,
            guard=lock.check,
        ).compact(stream_type, stream_id)
    finally:
        lock.release()
    if result.outcome == Outcome.FAILED and result.error_type == "DatabaseUnavailableError":
        _retry_later(task, settings, _backoff(settings, task.request.retries))
    return result


def _retry_later(
    task: Any, settings: EskitSettings, countdown: float, *, unlimited: bool = False
) -> None:
    """Re-send this task after ``countdown`` and end this delivery without storing a
    state (``Ignore``), so no result of another copy is overwritten. Returns only when
    the retries are used up."""
    limit = None if unlimited else settings.locked_max_retries
    try:
        task.retry(countdown=countdown, max_retries=limit, throw=False)
    except MaxRetriesExceededError:
        return
    raise Ignore()


def _backoff(settings: EskitSettings, retries: int) -> float:
    base = settings.locked_retry_base * (2**retries)
    jitter = random.uniform(0.8, 1.2)  # noqa: S311 -- spreading retries, not security
    return float(min(base, LOCKED_RETRY_MAX_S) * jitter)


def _already_finished(task: Any) -> bool:
    """True when a result is already stored for this task id (a redelivered copy)."""
    task_id = task.request.id
    if not task_id:
        return False
    try:
        return task.AsyncResult(task_id).state in states.READY_STATES
    except Exception:  # the backend being down must not stop the compaction
        return False


def _report(res: _Resources, run_id: str, result: CompactionResult) -> None:
    try:
        res.progress.report(check_run_id(run_id), result)
    except (RedisError, EskitError) as exc:
        log.warning("could not record progress of run %s: %s", run_id, exc)


# -- fan_out ----------------------------------------------------------------------------


@app.task(bind=True, name="eskit_tasks.fan_out")
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
    """
    settings = get_settings()
    res = resources()
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
        policy = policy_kwargs(retain_last, retain_younger_than, dry_run)
        _check_run_args(min_events, stream_types, max_streams)
    except EskitError as exc:
        res.progress.create(run_id, args)
        res.progress.fail(run_id, str(exc))
        return {"run_id": run_id, "error": str(exc)}
    res.progress.create(run_id, args)
    if res.progress.cursor(run_id) != cursor:
        return {"run_id": run_id, "duplicate_page": cursor}

    depth = queue_depth(settings.compaction_queue)
    if depth >= settings.fanout_high_water:
        res.progress.note_depth(run_id, depth)
        fan_out.apply_async(kwargs={**args, "cursor": cursor}, countdown=settings.fanout_backoff)
        return {"run_id": run_id, "waiting": depth}

    progress = res.progress.get(run_id)
    found_so_far = 0 if progress is None else progress.candidates
    budget = None if max_streams is None else max_streams - found_so_far
    limit = min(settings.fanout_page_size, settings.fanout_high_water - depth)
    if budget is not None:
        limit = min(limit, budget)
    page = (
        []
        if limit <= 0
        else res.store.candidates(
            after=cursor,
            limit=limit,
            min_live_events=max(min_events, retain_last + 1),
            stream_types=stream_types,
        )
    )
    with app.producer_or_acquire() as producer:
        for c in page:
            compact_stream.apply_async(
                args=(c.stream_type, c.stream_id),
                kwargs={"run_id": run_id, **policy},
                producer=producer,
            )
    new_cursor = page[-1].key if page else cursor
    finished = len(page) < limit or (budget is not None and len(page) >= budget)
    if (
        res.progress.advance(
            run_id, expected=cursor, new=new_cursor, found=len(page), done=finished, depth=depth
        )
        and not finished
    ):
        fan_out.apply_async(kwargs={**args, "cursor": new_cursor})
    return {"run_id": run_id, "enqueued": len(page), "cursor": new_cursor, "done": finished}


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
    except (ChannelError, OperationalError):
        return 0
