"""The ``eskit_tasks.compact_batch`` task: several small streams in one message.

With small streams a task's own costs — the broker's delivery and acknowledgement, the
pool's dispatch, the result backend's write — are as large as the compaction. The
fan-out therefore puts streams with few live events together (``ESKIT_BATCH_EVENTS``
events per message at most, see :func:`batches`), and one worker compacts them one
after the other.

The stream stays the unit of everything else. The fan-out gives each stream of a batch
a task id of its own, carried in the message, and each stream runs exactly as a
``compact_stream`` task of that id would (:func:`~eskit_tasks.fleet.compact_task.
compact_copy`): its own lock, fencing, compaction id, done key, audit row, log line,
metrics and report to the run. So:

* a stream that fails (or needs attention) is reported as such; the others go on;
* a stream that must be retried (its lock held by another task, the database or Redis
  unreachable) is handed to a ``compact_stream`` task of its own task id, with its
  retries; its result then comes from that task;
* a batch delivered again (its worker died, the visibility timeout) runs each stream's
  copy again under the same task id: a stream already claimed is skipped (and counted),
  one whose first copy still holds the lock waits for it, and no stream is counted
  twice;
* a paused run, or a throttle that keeps a stream waiting, re-sends the streams not yet
  started as a new batch (same task ids) for later; so does a batch that has used half
  of its soft time limit, or whose stream reached it.

The batch's own result is ``{"results": {task id: CompactionResult}, "sent_again":
[task ids]}``; it ends in FAILURE (``CompactionNeedsAttention``, carrying that) when a
stream's outcome needs attention, so Flower shows it failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from redis.exceptions import RedisError

from eskit_tasks.errors import CompactionNeedsAttention
from eskit_tasks.fleet.compact_task import compact_copy
from eskit_tasks.fleet.constants import (
    BATCH_MAX_STREAMS,
    COMPACT_BATCH_TASK,
    COMPACT_STREAM_TASK,
    DONE_PREFIX,
)
from eskit_tasks.fleet.messages import short_repr
from eskit_tasks.fleet.redelivery import TaskCopy, backoff, follows_an_attempt
from eskit_tasks.fleet.resources import Resources, resources_of


@dataclass(frozen=True)
class Member:
    """One stream of a batch: its type and id, its task id, and its cap (a plan's
    ``through_version``, or None)."""

    stream_type: str
    stream_id: str
    task_id: str
    through_version: int | None = None

    def as_message(self) -> list[Any]:
        return [self.stream_type, self.stream_id, self.task_id, self.through_version]


def members_of(streams: Any) -> list[Member]:
    """The members a batch message names.

    Raises:
        TypeError: a hand-made message whose streams are not
            ``[type, id, task id, through_version or null]`` lists.
    """
    if not isinstance(streams, list | tuple):
        raise TypeError(f"compact_batch takes a list of streams, got {type(streams).__name__}")
    found: list[Member] = []
    for entry in streams:
        ok = isinstance(entry, list | tuple) and len(entry) == 4
        if ok:
            stream_type, stream_id, task_id, cap = entry
            ok = all(isinstance(v, str) for v in (stream_type, stream_id, task_id)) and (
                cap is None or (isinstance(cap, int) and not isinstance(cap, bool))
            )
        if not ok:
            raise TypeError(
                "compact_batch takes streams as [type, id, task id, through_version or "
                f"null], got {short_repr(entry, 200)}"
            )
        found.append(Member(stream_type, stream_id, task_id, cap))
    return found


def sent_again_key(task_id: str) -> str:
    """Redis key saying a batch's stream was handed to a task of its own (hashed)."""
    return f"{DONE_PREFIX}sent:{hashlib.sha256(task_id.encode()).hexdigest()[:32]}"


class _SentAgain(Ignore):
    """This stream is handed to a ``compact_stream`` task of its own (a retry)."""


class _WaitLater(Ignore):
    """This stream, and the batch's streams after it, wait ``countdown`` seconds."""

    def __init__(self, countdown: float) -> None:
        super().__init__()
        self.countdown = countdown


log = logging.getLogger("eskit_tasks")


def _store_member(batch: Task[Any, Any], task_id: str, result: dict[str, Any]) -> None:
    """Store a stream's result in the result backend under the stream's own task id, as a
    ``compact_stream`` of that id would have: a later copy of that task id whose claim is
    gone (Redis restarted without persistence) finds it there and does not compact again
    (:func:`~eskit_tasks.fleet.redelivery.already_finished`); ``compaction_result(task
    id)`` reads it. A backend that cannot take it costs only that safety net."""
    try:
        if _needs_attention(result):
            said = f"{result.get('outcome')} {result.get('stream_type')}/{result.get('stream_id')}"
            batch.backend.mark_as_failure(task_id, CompactionNeedsAttention(said, result))
        else:
            batch.backend.mark_as_done(task_id, result)
    except Exception as exc:
        log.warning("the result of task %s was not stored in the result backend: %s", task_id, exc)


class MemberCopy(TaskCopy):
    """One stream of a batch, run as a copy of its own task id."""

    def __init__(
        self, batch: Task[Any, Any], res: Resources, run_id: str | None, member: Member
    ) -> None:
        super().__init__(batch, res, run_id, task_id=member.task_id)
        self.member = member

    @property
    def follows_attempt(self) -> bool:
        # A batch delivered again, or a batch re-sent after one of its streams' retries.
        return follows_an_attempt(self.task.request)

    def retry_later(self, countdown: float | None = None, *, unlimited: bool = False) -> None:
        """Hand the stream to a ``compact_stream`` task of its own task id (its first
        retry), so the batch goes on; returns (no retry) only when retries are off."""
        if not unlimited and self.settings.locked_max_retries <= 0:
            return
        if countdown is None:
            countdown = backoff(self.settings, 0)
        m = self.member
        kwargs: dict[str, Any] = {**(self.task.request.kwargs or {}), "run_id": self.run_id}
        kwargs.pop("streams", None)
        if m.through_version is not None:
            kwargs["through_version"] = m.through_version
        # A batch that dies later leaves this stream to that task (see failures.py).
        with contextlib.suppress(RedisError):
            self.res.redis.set(
                sent_again_key(m.task_id), "1", ex=int(self.settings.visibility_timeout * 2)
            )
        self.task.app.tasks[COMPACT_STREAM_TASK].apply_async(
            args=(m.stream_type, m.stream_id),
            kwargs=kwargs,
            task_id=m.task_id,
            countdown=countdown,
            retries=1,
            argsrepr=short_repr((m.stream_type, m.stream_id)),
        )
        raise _SentAgain()

    def wait_later(self, countdown: float) -> None:
        raise _WaitLater(countdown)


def compact_batch(
    self: Task[Any, Any], /, streams: list[list[Any]], run_id: str | None = None, **policy: Any
) -> dict[str, Any]:
    """Compact each stream of ``streams`` (see the module's docstring) in turn.

    Args:
        streams: ``[stream type, stream id, task id, through_version or None]`` each.
        run_id: The fleet run the streams belong to, for progress.
        **policy: ``retain_last``, ``retain_younger_than`` (seconds), ``dry_run``.

    Raises:
        CompactionNeedsAttention: a stream's outcome needs attention; the exception
            carries the batch's result (the task is stored as FAILURE).
    """
    members = members_of(streams)
    res = resources_of(self.app)
    results: dict[str, dict[str, Any]] = {}
    sent_again: list[str] = []
    began = time.monotonic()
    for n, member in enumerate(members):
        if n and time.monotonic() - began > res.settings.task_soft_time_limit / 2:
            _send_rest(self, members[n:], run_id, policy, countdown=0)  # leave time to spare
            sent_again += [m.task_id for m in members[n:]]
            break
        these = dict(policy)
        if member.through_version is not None:
            these["through_version"] = member.through_version
        copy = MemberCopy(self, res, run_id, member)
        try:
            results[member.task_id] = compact_copy(
                copy, member.stream_type, member.stream_id, these
            )
            _store_member(self, member.task_id, results[member.task_id])
        except CompactionNeedsAttention as exc:
            results[member.task_id] = exc.result
            _store_member(self, member.task_id, exc.result)
            if exc.result.get("error_type") == SoftTimeLimitExceeded.__name__:
                rest = members[n + 1 :]  # the hard limit is near: the rest go later
                if rest:
                    _send_rest(self, rest, run_id, policy, countdown=0)
                    sent_again += [m.task_id for m in rest]
                break
        except _WaitLater as wait:
            _send_rest(self, members[n:], run_id, policy, countdown=wait.countdown)
            sent_again += [m.task_id for m in members[n:]]
            break
        except _SentAgain:
            sent_again.append(member.task_id)
        except Ignore:
            pass  # another copy of this stream's task owns its result (counted)
    answer = {"results": results, "sent_again": sent_again}
    attention = [r for r in results.values() if _needs_attention(r)]
    if attention:
        said = ", ".join(f"{r['outcome']} {r['stream_type']}/{r['stream_id']}" for r in attention)
        raise CompactionNeedsAttention(f"{len(attention)} of {len(members)}: {said}", answer)
    return answer


def _needs_attention(result: Mapping[str, Any]) -> bool:
    from eskit_tasks.domain.result import Outcome

    return Outcome(result["outcome"]).needs_attention


def _send_rest(
    task: Task[Any, Any],
    members: list[Member],
    run_id: str | None,
    policy: dict[str, Any],
    *,
    countdown: float,
) -> None:
    """Re-send ``members`` as a batch of their own (their task ids kept) for later."""
    body = [m.as_message() for m in members]
    send: Any = task.app.tasks[COMPACT_BATCH_TASK].apply_async  # stubs lack argsrepr
    send(
        args=(body,),
        kwargs={"run_id": run_id, **policy},
        countdown=countdown,
        argsrepr=short_repr((body,)),
    )


def batches(
    streams: Iterable[tuple[str, str]],
    sizes: Mapping[tuple[str, str], int],
    caps: Mapping[tuple[str, str], int] | None,
    max_events: int,
) -> Iterator[tuple[str, str] | list[Member]]:
    """The messages of a page, in page order: a stream alone, or a batch of streams whose
    live events (``sizes``) are known and add up to at most ``max_events``, at most
    :data:`BATCH_MAX_STREAMS` of them. A stream of unknown size, or of more events, goes
    alone; ``max_events`` 0 sends every stream alone."""
    current: list[Member] = []
    events = 0

    def flush() -> Iterator[tuple[str, str] | list[Member]]:
        if len(current) == 1:  # a batch of one is a stream alone
            yield (current[0].stream_type, current[0].stream_id)
        elif current:
            yield list(current)

    for stream in streams:
        size = sizes.get(stream)
        if max_events <= 0 or size is None or size > max_events // 2:
            yield stream
            continue
        if current and (events + size > max_events or len(current) >= BATCH_MAX_STREAMS):
            yield from flush()
            current, events = [], 0
        cap = None if caps is None else caps.get(stream)
        current.append(Member(stream[0], stream[1], str(uuid.uuid4()), cap))
        events += size
    yield from flush()
