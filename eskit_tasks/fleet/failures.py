"""Accounting for a ``compact_stream`` task that died with an exception (a hard time
limit, a bug): it still counts in its run, so ``run.wait()`` finishes — as the deletion
it committed, if the audit log holds its compaction id (killed right after COMMIT), else
as failed — and the result backend tells the same.

:class:`~eskit_tasks.errors.CompactionNeedsAttention` is no death: the task raises it on
purpose, after its result was claimed, counted and logged, to be stored as FAILURE; it
is left alone here (counting it again would count the stream twice)."""

from __future__ import annotations

import types
import uuid
from collections import OrderedDict
from typing import Any

from celery import signals, states
from celery.utils.log import get_task_logger

from eskit_tasks.core.settlement import committed_under, recovered_result
from eskit_tasks.domain.result import CompactionResult
from eskit_tasks.errors import CompactionNeedsAttention, EskitError
from eskit_tasks.fleet.constants import COMPACT_BATCH_TASK, COMPACT_STREAM_TASK
from eskit_tasks.fleet.locks import lock_key
from eskit_tasks.fleet.observability import record, report_to_run
from eskit_tasks.fleet.redelivery import claimed_result, compaction_id_for
from eskit_tasks.fleet.resources import Resources, resources_of

log = get_task_logger("eskit_tasks")

#: Task ids whose death this process accounted for already (see _report_task_failure).
_failures_handled: OrderedDict[str, CompactionResult] = OrderedDict()
_FAILURES_REMEMBERED = 1024


@signals.task_failure.connect
def _report_task_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    name = getattr(sender, "name", None)
    if name not in (COMPACT_STREAM_TASK, COMPACT_BATCH_TASK):
        return
    if isinstance(exception, CompactionNeedsAttention):
        return  # a result, accounted for by the task itself
    kwargs = kwargs if isinstance(kwargs, dict) else {}  # a hand-made message may be
    args = list(args) if isinstance(args, list | tuple) else []  # any JSON at all
    if name == COMPACT_BATCH_TASK:
        _report_batch_failure(sender, task_id, exception, args, kwargs)
        return
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
    res = resources_of(sender.app)
    compaction_id = compaction_id_for(task_id) if task_id else str(uuid.uuid4())
    result = _committed_by(res, stream_type, stream_id, compaction_id)
    if result is None:
        died = f"task {task_id} died: {type(exception).__name__}: {exception}"
        result = CompactionResult.failed(
            stream_type,
            stream_id,
            died,
            error_type=type(exception).__name__,
            compaction_id=compaction_id,
        )
    if task_id:
        _failures_handled[task_id] = result
        while len(_failures_handled) > _FAILURES_REMEMBERED:
            _failures_handled.popitem(last=False)
    record(result, run_id, task_id)
    if run_id:
        report_to_run(res, run_id, result, sender.app)
    _store_recovered(sender, task_id, result, args, kwargs)


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


def _committed_by(
    res: Resources, stream_type: str, stream_id: str, compaction_id: str
) -> CompactionResult | None:
    """The deletion a dead task committed, from the audit log (None: none, or the
    database cannot say; the result then names the id to look up)."""
    try:
        record_ = committed_under(res.store, stream_type, stream_id, compaction_id)
    except EskitError as exc:
        log.warning("could not look up compaction %s in the audit log: %s", compaction_id, exc)
        return None
    return None if record_ is None else recovered_result(record_)


def _report_batch_failure(
    task: Any, task_id: str | None, exception: BaseException | None, args: Any, kwargs: Any
) -> None:
    """A ``compact_batch`` task that died: each of its streams is accounted for. One it
    finished counts as the result its task id claimed; one it handed to a task of its
    own is left to that task; one whose deletion committed counts as that deletion; the
    one it was compacting (its lock still held under its task id) counts as failed, as
    a ``compact_stream`` task that dies does; those it never reached are sent again, in
    a batch of their own (same task ids). Accounted once per batch and process."""
    from eskit_tasks.fleet.batch import Member, members_of, sent_again_key

    if task_id and task_id in _failures_handled:
        return  # Celery's second task_failure for one hard time limit
    try:
        members = members_of(args[0] if args else kwargs.get("streams"))
    except TypeError:
        return  # a hand-made message names no stream
    if task_id:
        _failures_handled[task_id] = CompactionResult.failed("-", "-", "batch", compaction_id="-")
        while len(_failures_handled) > _FAILURES_REMEMBERED:
            _failures_handled.popitem(last=False)
    res = resources_of(task.app)
    run_id = kwargs.get("run_id")
    unreached: list[Member] = []
    for member in members:
        try:
            if res.redis.exists(sent_again_key(member.task_id)):
                continue
            result = claimed_result(res, member.task_id)
            holder = res.redis.get(lock_key(member.stream_type, member.stream_id))
            attempted = holder is not None and _text(holder).rsplit("|", 1)[0] == member.task_id
        except Exception:  # Redis down: the audit log still says what committed
            result, attempted = None, True
        if result is None:
            compaction_id = compaction_id_for(member.task_id)
            result = _committed_by(res, member.stream_type, member.stream_id, compaction_id)
            if result is None and not attempted:
                unreached.append(member)
                continue
            if result is None:
                result = _batch_death(task_id, member, exception, compaction_id)
            record(result, run_id, member.task_id)
        if run_id:
            report_to_run(res, run_id, result, task.app)
    if unreached:
        _send_unreached(task, task_id, unreached, kwargs, exception, res, run_id)


def _batch_death(
    task_id: str | None, member: Any, exception: BaseException | None, compaction_id: str
) -> CompactionResult:
    return CompactionResult.failed(
        member.stream_type,
        member.stream_id,
        f"batch task {task_id} died compacting this stream: "
        f"{type(exception).__name__}: {exception}",
        error_type=type(exception).__name__,
        compaction_id=compaction_id,
    )


def _send_unreached(
    task: Any,
    task_id: str | None,
    members: list[Any],
    kwargs: dict[str, Any],
    exception: BaseException | None,
    res: Resources,
    run_id: str | None,
) -> None:
    """Send the streams a dead batch never reached again (their task ids kept); if
    that fails too, count them as failed so the run can finish."""
    try:
        task.app.tasks[COMPACT_BATCH_TASK].apply_async(
            args=([m.as_message() for m in members],), kwargs=kwargs
        )
    except Exception as exc:
        log.warning("could not send again the streams of dead batch %s: %s", task_id, exc)
        for member in members:
            result = _batch_death(task_id, member, exception, compaction_id_for(member.task_id))
            record(result, run_id, member.task_id)
            if run_id:
                report_to_run(res, run_id, result, task.app)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
