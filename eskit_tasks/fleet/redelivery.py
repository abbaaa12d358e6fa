"""How the copies of one ``compact_stream`` task id stay harmless to each other.

A task may be delivered more than once (late acknowledgement, redelivery after a crash
or a visibility timeout). Every copy of a task id shares its compaction id (so a copy
that runs after a crash finds the deletion its predecessor committed), and the first copy
to finish claims the task's result in Redis; later copies store nothing over it. The
claim holds the owner's result, and any copy that finds the task claimed counts that
result in the run: an owner killed between its claim and its count (``kill -9``) leaves
the stream counted all the same by the copy redelivered after it, and only the owner's
outcome is ever counted (the run counts each stream once).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import states
from celery.exceptions import Ignore, MaxRetriesExceededError
from redis.exceptions import RedisError

from eskit_tasks.domain.result import CompactionResult
from eskit_tasks.errors import DatabaseUnavailableError, EskitError, LockLostError, TimeBudgetError
from eskit_tasks.fleet.constants import DONE_PREFIX, LOCKED_RETRY_MAX_S
from eskit_tasks.fleet.locks import StreamLock
from eskit_tasks.fleet.observability import report_to_run
from eskit_tasks.fleet.resources import Resources
from eskit_tasks.fleet.settings import EskitSettings
from eskit_tasks.fleet.task_start import Started

#: Failures worth another try: the database or Redis was unreachable, or the lock was
#: lost (Redis blipped) — the stream itself is fine. A delete whose outcome is still
#: unknown (CommitOutcomeUnknownError, a DatabaseUnavailableError) is settled by the
#: retry, which carries the same compaction id.
TRANSIENT_ERRORS: tuple[type[EskitError], ...] = (DatabaseUnavailableError, LockLostError)


def _with_subclasses(classes: tuple[type[EskitError], ...]) -> frozenset[str]:
    found: set[str] = set()
    todo = list(classes)
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return frozenset(found)


_TRANSIENT_NAMES = _with_subclasses(TRANSIENT_ERRORS)


def is_transient(result: CompactionResult) -> bool:
    """True when a result's error is one of :data:`TRANSIENT_ERRORS` (or a subclass).
    A result carries its error's class name only, so the names are derived from the
    classes here, once: renaming a class cannot silently stop its retries."""
    return result.error_type in _TRANSIENT_NAMES


#: Namespace of the compaction ids derived from task ids.
_COMPACTION_IDS = uuid.UUID("5d0c3f7e-8f3a-4c2e-9b1d-6a7e2f0c4b19")


def compaction_id_for(task_id: str) -> str:
    """The compaction id of a task: the same for every retry and redelivery of that task
    id, so a copy that runs after a crash finds the deletion its predecessor committed
    and reports it instead of "nothing to compact"."""
    return str(uuid.uuid5(_COMPACTION_IDS, task_id))


def done_key(task_id: str) -> str:
    """Redis key claiming the result of a task id (hashed: task ids are data)."""
    return DONE_PREFIX + hashlib.sha256(task_id.encode()).hexdigest()[:32]


def backoff(settings: EskitSettings, retries: int) -> float:
    """Doubling delays with jitter, capped well below the visibility timeout (a delayed
    message waits unacknowledged in a worker; past the timeout Redis would redeliver it)."""
    cap = min(LOCKED_RETRY_MAX_S, settings.visibility_timeout / 3)
    base = settings.locked_retry_base * (2**retries)
    jitter = random.uniform(0.8, 1.2)  # noqa: S311 -- spreading retries, not security
    return float(min(base, cap) * jitter)


def follows_an_attempt(request: Any) -> bool:
    """True for a copy that follows an earlier attempt of its task id: a retry, or a
    message the broker delivered again."""
    redelivered = bool((getattr(request, "delivery_info", None) or {}).get("redelivered"))
    return bool(getattr(request, "retries", 0) or redelivered)


def already_finished(
    task: Any, res: Resources, run_id: str | None, task_id: str | None = None
) -> bool:
    """True when a copy of this task id (default: the task's own) already finished; the
    result it claimed is counted in the run, in case it died before counting it. Reads
    the done key, then — only when there is none — the result backend (a claim expires
    after twice the visibility timeout, a stored result after ``result_expires``).

    Every copy asks this first, flagged as a redelivery or not: a copy of a page sent
    again is not flagged, and a claim does not outlive a restart of a Redis that keeps
    nothing on disk, while the result backend still holds the result (a batched
    stream's too: :mod:`eskit_tasks.fleet.batch` stores it under the stream's task id)."""
    task_id = task_id or task.request.id
    if not task_id:
        return False
    try:
        claim = res.redis.get(done_key(task_id))
    except RedisError:
        claim = None
    if claim is not None:
        stored = _claim_of(claim)[1]
        if run_id is not None and stored is not None:
            report_to_run(res, run_id, stored, task.app)
        return True
    try:
        return task.AsyncResult(task_id).state in states.READY_STATES
    except Exception:  # the backend being down must not stop the compaction
        return False


def claimed_result(res: Resources, task_id: str) -> CompactionResult | None:
    """The result a copy of ``task_id`` claimed (None: none claimed, or unreadable).

    Raises:
        redis.exceptions.RedisError: Redis is unreachable.
    """
    found = res.redis.get(done_key(task_id))
    return None if found is None else _claim_of(found)[1]


class TaskCopy:
    """One delivery of a compact_stream task, and how it coordinates with other copies
    of the same task id (redeliveries) through a "result claimed" key in Redis."""

    def __init__(
        self, task: Any, res: Resources, run_id: str | None, task_id: str | None = None
    ) -> None:
        self.task = task
        self.run_id = run_id
        self.res = res
        self.settings = res.settings
        self.task_id: str = task_id or task.request.id or uuid.uuid4().hex
        self.compaction_id = compaction_id_for(self.task_id)
        self.token = uuid.uuid4().hex
        self.deadline = time.monotonic() + self.settings.task_soft_time_limit * 0.9
        #: Whether this copy has counted the task's result in the run.
        self.counted = False
        #: Whether this copy owns the task's result, once it has claimed it.
        self._owned: bool | None = None

    def retry_later(self, countdown: float | None = None, *, unlimited: bool = False) -> None:
        """Re-send this task after ``countdown`` (default: the backoff for its retries so
        far) and end this delivery without storing a state (``Ignore``), so no other
        copy's result is overwritten. Returns only when the retries are used up."""
        if countdown is None:
            countdown = backoff(self.settings, self.task.request.retries)
        limit = None if unlimited else self.settings.locked_max_retries
        try:
            self.task.retry(countdown=countdown, max_retries=limit, throw=False)
        except MaxRetriesExceededError:
            return
        raise Ignore()

    def wait_later(self, countdown: float) -> None:
        """Re-send this task after ``countdown`` without spending one of its retries (a
        paused run, the throttle: waits that say nothing about the stream), and end this
        delivery without storing a state."""
        request = self.task.request
        self.task.signature_from_request(
            request, countdown=countdown, retries=request.retries
        ).apply_async()
        raise Ignore()

    def claim_result(self, result: CompactionResult) -> bool:
        """Claim the task's result with ``result`` (the first copy to finish owns it), then
        count the owner's result in the run; True if this copy owns it and may store it.
        Without Redis it cannot coordinate and stores (the database stays safe).
        Claiming again gives the first answer (the claim is this copy's, or not, for
        good) without asking Redis."""
        if self._owned is not None:
            return self._owned
        key = done_key(self.task_id)
        ttl = int(self.settings.visibility_timeout * 2)
        claim = json.dumps({"owner": self.token, "result": result.model_dump(mode="json")})
        owner: str | None = self.token
        counted: CompactionResult | None = result
        try:
            if not self.res.redis.set(key, claim, nx=True, ex=ttl):
                found = self.res.redis.get(key)
                owner, counted = (None, None) if found is None else _claim_of(found)
        except RedisError:
            owner, counted = self.token, result
        owned = owner == self.token
        self._count(result if owned else counted)
        self._owned = owned
        return owned

    @property
    def follows_attempt(self) -> bool:
        """This copy follows an earlier attempt of its task id (see follows_an_attempt)."""
        return follows_an_attempt(self.task.request)

    def already_finished(self) -> bool:
        """See :func:`already_finished` (asked by every copy before it starts)."""
        return already_finished(self.task, self.res, self.run_id, self.task_id)

    def start(self, lock: StreamLock, *, gates: bool) -> Started:
        """The one Redis call that starts this copy's compaction (see task_start.py)."""
        return self.res.task_start.ask(
            lock, done_key(self.task_id), self.run_id, self.settings, gates=gates
        )

    def finished_elsewhere(self, claim: str) -> None:
        """Another copy of this task finished and claimed ``claim``: count its result in
        the run (in case it died before counting it)."""
        self._count(_claim_of(claim)[1])

    def finished_by_other(self) -> bool:
        """True if another copy of this task finished and claimed the result; its result
        is counted in the run (in case it died before counting it)."""
        try:
            found = self.res.redis.get(done_key(self.task_id))
        except RedisError:
            return False
        if found is None:
            return False
        owner, stored = _claim_of(found)
        if owner == self.token:
            return False
        self._count(stored)
        return True

    def _count(self, result: CompactionResult | None) -> None:
        if self.run_id is not None and result is not None and not self.counted:
            report_to_run(self.res, self.run_id, result, self.task.app)
            self.counted = True

    def guard(self, lock: StreamLock) -> Callable[[], None]:
        """The check the compactor runs before each write: the lock is still ours and the
        task is not about to reach its soft time limit."""

        def check() -> None:
            lock.check()
            if time.monotonic() > self.deadline:
                raise TimeBudgetError(
                    "stopped before writing: the task is near its soft time limit "
                    f"({self.settings.task_soft_time_limit:.0f}s, ESKIT_TASK_SOFT_TIME_LIMIT)"
                )

        return check


def _claim_of(value: bytes | str) -> tuple[str, CompactionResult | None]:
    """The owner and the result of a claim (a bare owner token: a claim made before
    claims held their result, or a result that cannot be read)."""
    text = value.decode() if isinstance(value, bytes) else value
    try:
        claim = json.loads(text)
        return str(claim["owner"]), CompactionResult.model_validate(claim["result"])
    except (ValueError, KeyError, TypeError):
        return text, None
