"""The ``eskit_tasks.fan_out`` task: a run, one bounded page of candidates at a time.

Each page enqueues one ``compact_stream`` per candidate and re-sends the fan-out for
the next page, so memory stays bounded by one page whatever the number of candidates.
A page is fixed in the run's progress before any of its messages is sent, and the run's
cursor moves atomically after it: a copy of a page (a retry, a redelivery, the same
fan-out sent twice) sends the stored streams or finds the cursor moved and stops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from celery import Celery, Task
from celery.exceptions import MaxRetriesExceededError
from kombu import exceptions as kombu_errors
from kombu.exceptions import ChannelError
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from eskit_tasks.core.candidates import run_page
from eskit_tasks.core.registry import StreamSource, get_source, sources_for
from eskit_tasks.domain.redact import mask_url
from eskit_tasks.domain.result import CompactionResult
from eskit_tasks.domain.window import parse_window
from eskit_tasks.errors import ConfigurationError, DatabaseUnavailableError, EskitError
from eskit_tasks.fleet import metrics
from eskit_tasks.fleet.batch import batches
from eskit_tasks.fleet.compact_task import pause_poll
from eskit_tasks.fleet.constants import (
    COMPACT_BATCH_TASK,
    COMPACT_STREAM_TASK,
    FANOUT_PUBLISH_BATCH,
    WINDOW_POLL_MAX_S,
)
from eskit_tasks.fleet.finish import fail_run, record_run_start
from eskit_tasks.fleet.messages import check_run_args, policy_kwargs, run_id_for, short_repr
from eskit_tasks.fleet.observability import report_to_run, send_finish
from eskit_tasks.fleet.progress import Advanced, Page, check_run_id
from eskit_tasks.fleet.publish import PageTemplate, template_applies
from eskit_tasks.fleet.redelivery import backoff
from eskit_tasks.fleet.resources import Resources, resources_of
from eskit_tasks.stores.sql_plans import applicable_plan, plan_caps, plan_page

#: A failed pipeline of a page's messages (kombu>=5.7; its stubs do not know it yet).
BatchPublishError: type[Exception] = kombu_errors.BatchPublishError  # type: ignore[attr-defined]
#: Errors after which a fan-out page is tried again later (with backoff).
FANOUT_RETRIED_ERRORS = (
    RedisError,
    KombuOperationalError,
    BatchPublishError,
    DatabaseUnavailableError,
)


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
    sources: list[str] | None = None,
    trigger: str | None = None,
    plan_id: str | None = None,
) -> dict[str, Any]:
    """Enqueue one compact_stream per candidate stream, a page at a time.

    Candidates are streams with at least ``min_events`` events since their last
    compaction (and more than ``retain_last``), of ``stream_types`` if given, at most
    ``max_streams`` per run. While the compaction queue holds ``ESKIT_FANOUT_HIGH_WATER``
    messages or more, the fan-out waits and looks again; it re-sends itself for each
    next page, so memory stays bounded by one page whatever the number of candidates.
    If the database, Redis or the broker is unreachable it retries with backoff; if that
    keeps failing, the run is marked failed (``run.wait()`` returns with its error).

    After the event store's streams come those of the registered applications
    (``register_application``): the first page fixes which (``sources``, by name) and the
    next pages page exactly those, so a registration that changes mid-run neither shifts
    the cursor nor adds a source; one no longer registered fails the run, as does one
    that cannot be paged.

    With ``plan_id`` (``eskit-tasks apply``) the run pages the plan's streams instead,
    in plan order, each compacted at most through its planned version.
    """
    if run_id is None:  # started by beat: derive the id from the task, so a redelivered
        run_id = run_id_for(self.request.id)  # first page continues the same run
    run_id = check_run_id(run_id)
    args = {
        "run_id": run_id,
        "min_events": min_events,
        "stream_types": stream_types,
        "max_streams": max_streams,
        "retain_last": retain_last,
        "retain_younger_than": retain_younger_than,
        "dry_run": dry_run,
        "sources": sources,
        "trigger": trigger or "beat",
        "plan_id": plan_id,
    }
    res = resources_of(self.app)
    try:
        return fan_out_page(self, res, args, cursor)
    except FANOUT_RETRIED_ERRORS as exc:
        try:
            raise self.retry(exc=exc, countdown=backoff(res.settings, self.request.retries))
        # Out of retries, retry(exc=...) raises exc itself, not MaxRetriesExceededError.
        except (MaxRetriesExceededError, *FANOUT_RETRIED_ERRORS):
            with contextlib.suppress(RedisError):
                fail_run(res, run_id, mask_url(f"fan-out gave up: {exc}"))
            raise


def fan_out_page(
    task: Task[Any, Any], res: Resources, args: dict[str, Any], cursor: int
) -> dict[str, Any]:
    """Send the page of the run ``args`` that starts after ``cursor``; re-send the
    fan-out for the next page. Returns what it did (its task result)."""
    settings, app = res.settings, task.app
    run_id = args["run_id"]
    stopped = _start_page(res, args, cursor)
    if stopped is not None:
        return stopped
    if res.progress.cursor(run_id) != cursor:
        return _page_seen_again(task, res, args, cursor)
    held = _held_by_operator(task, res, args, cursor)
    if held is not None:
        return held
    policy = policy_kwargs(args["retain_last"], args["retain_younger_than"], args["dry_run"])

    depth = queue_depth(app, settings.compaction_queue)
    if depth >= settings.fanout_high_water:
        res.progress.note_depth(run_id, depth)
        task.apply_async(kwargs={**args, "cursor": cursor}, countdown=settings.fanout_backoff)
        return {"run_id": run_id, "waiting": depth}

    budget = None
    if args["max_streams"] is not None:  # what the run may still take
        progress = res.progress.get(run_id)
        budget = args["max_streams"] - (0 if progress is None else progress.candidates)
    limit = min(settings.fanout_page_size, settings.fanout_high_water - depth)
    if budget is not None:
        limit = min(limit, budget)
    try:
        page, new_cursor, exhausted, caps, sizes = _read_page(res, args, cursor, limit)
    except FANOUT_RETRIED_ERRORS:
        raise
    except EskitError as exc:  # an application that cannot be paged: say so, stop
        error = mask_url(f"fan-out stopped: {exc}")
        fail_run(res, run_id, error)
        return {"run_id": run_id, "error": error}
    finished = exhausted or (budget is not None and len(page) >= budget)
    # Fix the page before sending anything: a copy of this page (a retry, the same
    # fan-out sent twice) sends the stored streams, not its own reading.
    stored = res.progress.store_page(run_id, Page(cursor, new_cursor, finished, tuple(page)))
    if stored is None:
        if not res.progress.exists(run_id):
            return _progress_lost(res, args)
        return {"run_id": run_id, "duplicate_page": cursor}
    if args.get("plan_id") is not None:  # the caps of the streams stored, not just read
        caps = plan_caps(res.store.engine, args["plan_id"], stored.streams)  # type: ignore[attr-defined]
        stored = _only_planned(task, res, run_id, stored, caps)
    enqueue(
        app,
        stored.streams,
        {"run_id": run_id, **policy},
        caps,
        sizes=sizes,
        batch_events=settings.batch_events,
    )
    advanced = res.progress.advance(
        run_id, stored, depth=depth, task_id=task.request.id or "", sources=args["sources"]
    )
    _after_advance(app, run_id, stored, advanced)
    if advanced.claimed and not stored.last:
        task.apply_async(kwargs={**args, "cursor": stored.next_cursor})
    return {
        "run_id": run_id,
        "enqueued": len(stored.streams),
        "cursor": stored.next_cursor,
        "done": stored.last,
    }


def _read_page(
    res: Resources, args: dict[str, Any], cursor: int, limit: int
) -> tuple[
    list[tuple[str, str]], int, bool, dict[tuple[str, str], int], dict[tuple[str, str], int]
]:
    """The streams of the page after ``cursor``, the next cursor, whether the run has
    examined everything, each planned stream's cap (a plan's ``through_version``) and
    each stream's live events as read (none for a plan: its streams go alone).

    A run pages the event store's streams, then those of the applications it started
    with; a plan's run pages the plan (its cursor: the position in the plan)."""
    settings = res.settings
    plan_id = args.get("plan_id")
    if plan_id is not None:
        engine = getattr(res.store, "engine", None)
        if engine is None:
            raise ConfigurationError("plans need the SQL event store (ESKIT_DATABASE_URL)")
        rows = plan_page(engine, plan_id, after=cursor, limit=limit)
        caps = {(p.stream_type, p.stream_id): p.through_version for _, p in rows}
        next_cursor = rows[-1][0] if rows else cursor
        return list(caps), next_cursor, len(rows) < limit, caps, {}
    if args.get("sources") is None:
        args["sources"] = [name for name, _ in sources_for(args["stream_types"])]
    sources = [_source(name) for name in args["sources"]]
    page, new_cursor, exhausted = run_page(
        res.store,
        sources,
        cursor=cursor,
        limit=limit,
        page_size=settings.fanout_page_size,
        min_live_events=max(args["min_events"], args["retain_last"] + 1),
        stream_types=args["stream_types"],
        skip=None if res.quarantine is None else res.quarantine.held,
    )
    sizes = {(c.stream_type, c.stream_id): c.live_events for c in page}
    return list(sizes), new_cursor, exhausted, {}, sizes


def _only_planned(
    task: Task[Any, Any],
    res: Resources,
    run_id: str,
    page: Page,
    caps: Mapping[tuple[str, str], int],
) -> Page:
    """A plan's run sends no stream without its planned cut (it would be compacted as
    far as the policy allows): one the plan does not hold is not sent, and reported
    failed to the run, which can then finish."""
    for stream_type, stream_id in page.streams:
        if (stream_type, stream_id) not in caps:
            report_to_run(
                res,
                run_id,
                CompactionResult.failed(
                    stream_type,
                    stream_id,
                    f"{stream_type}/{stream_id} is not in the run's plan; not compacted",
                    compaction_id="-",
                ),
                task.app,
            )
    kept = tuple(s for s in page.streams if s in caps)
    return Page(page.cursor, page.next_cursor, page.last, kept)


def _start_page(res: Resources, args: dict[str, Any], cursor: int) -> dict[str, Any] | None:
    """Check the run's arguments and make sure its progress exists (and, on the first
    page, its record in the database); what the page returns if it must stop here."""
    run_id = args["run_id"]
    try:
        policy_kwargs(args["retain_last"], args["retain_younger_than"], args["dry_run"])
        check_run_args(args["min_events"], args["stream_types"], args["max_streams"])
    except EskitError as exc:
        res.progress.create(run_id, args)
        record_run_start(res, run_id, args)
        fail_run(res, run_id, str(exc))
        return {"run_id": run_id, "error": str(exc)}
    if cursor != 0 and not res.progress.exists(run_id):
        return _progress_lost(res, args)
    res.progress.create(run_id, args, finish=True)
    if cursor == 0:
        record_run_start(res, run_id, args)
        if args.get("plan_id") is not None:
            try:  # the workers' database holds the plan, unexpired
                applicable_plan(res.store.engine, args["plan_id"])  # type: ignore[attr-defined]
            except ConfigurationError as exc:
                fail_run(res, run_id, str(exc))
                return {"run_id": run_id, "error": str(exc)}
    return None


def _held_by_operator(
    task: Task[Any, Any], res: Resources, args: dict[str, Any], cursor: int
) -> dict[str, Any] | None:
    """A paused run's page enqueues nothing and looks again later; a cancelled run's
    fan-out ends here (the run completes once the tasks already sent report); a
    scheduled run outside the maintenance window (ESKIT_WINDOW) waits for it."""
    run_id = args["run_id"]
    state = res.progress.state(run_id)
    if state == "paused":
        task.apply_async(kwargs={**args, "cursor": cursor}, countdown=pause_poll(res.settings))
        return {"run_id": run_id, "paused": cursor}
    if state == "cancelled":
        # A page stored (its streams counted as candidates) but not sent — its publish
        # failed, or its worker died — is sent now: its tasks end cancelled at once and
        # report, so the run can complete.
        stored = res.progress.store_page(run_id, Page(cursor, cursor, True, ()))
        if stored is not None and stored.streams:
            policy = policy_kwargs(args["retain_last"], args["retain_younger_than"], False)
            caps = None
            if args.get("plan_id") is not None:  # never uncapped, even to be cancelled
                engine = res.store.engine  # type: ignore[attr-defined]
                caps = plan_caps(engine, args["plan_id"], stored.streams)
            enqueue(task.app, stored.streams, {"run_id": run_id, **policy}, caps)
        if res.progress.stop_fanout(run_id):
            send_finish(task.app, run_id)
        return {"run_id": run_id, "cancelled": cursor}
    window = parse_window(res.settings.window)
    if window is not None and args.get("trigger") == "beat":
        wait = window.opens_in(datetime.now(UTC))
        if wait > 0:
            # Looks again at most every WINDOW_POLL_MAX_S: a countdown longer than the
            # Redis broker's visibility timeout would be delivered twice.
            countdown = min(wait, WINDOW_POLL_MAX_S, res.settings.visibility_timeout / 4)
            task.apply_async(kwargs={**args, "cursor": cursor}, countdown=countdown)
            return {"run_id": run_id, "waiting_for_window": str(window), "seconds": wait}
    return None


def _after_advance(app: Celery, run_id: str, page: Page, advanced: Advanced) -> None:
    """Count the run's start (its first page) and end, once each; send its finishing
    step if every stream reported before its last page was counted."""
    if advanced.claimed and page.cursor == 0:
        metrics.record_run_started()
    if advanced.finished:  # nothing to reclaim: the last page ended the run
        metrics.record_run_finished(error=False)
    if advanced.complete:
        send_finish(app, run_id)


def _page_seen_again(
    task: Task[Any, Any], res: Resources, args: dict[str, Any], cursor: int
) -> dict[str, Any]:
    """A page whose cursor the run has moved past. If this very message moved it (its
    redelivery after the worker died, or its retry after a failed send), the next page
    may never have been sent: send it again (a copy too many stops at the cursor check).
    Any other copy is a duplicate and stops, after making sure a complete run is ended
    (the copy that completed it may have died before sending its end)."""
    run_id = args["run_id"]
    unsent = res.progress.unsent_next_page(run_id, task.request.id, cursor)
    if unsent is not None:
        next_cursor, sources = unsent
        task.apply_async(kwargs={**args, "sources": sources, "cursor": next_cursor})
        return {"run_id": run_id, "resent_page": next_cursor}
    if res.progress.needs_finish(run_id):
        send_finish(task.app, run_id)
    return {"run_id": run_id, "duplicate_page": cursor}


def _source(name: str) -> StreamSource:
    found = get_source(name)
    if found is None:
        raise ConfigurationError(
            f"application {name} is in this run but not registered in this worker: give "
            "every worker the same ESKIT_DECIDER_MODULES"
        )
    return found


def _progress_lost(res: Resources, args: dict[str, Any]) -> dict[str, Any]:
    run_id = args["run_id"]
    error = (
        f"the progress of run {run_id} disappeared from Redis (expired, or Redis "
        "restarted without persistence) while paging; start a new run. Compactions "
        "already done are unaffected."
    )
    res.progress.create(run_id, args)
    fail_run(res, run_id, error)
    return {"run_id": run_id, "error": error}


def enqueue(
    app: Celery,
    streams: Iterable[tuple[str, str]],
    kwargs: dict[str, Any],
    caps: Mapping[tuple[str, str], int] | None = None,
    *,
    sizes: Mapping[tuple[str, str], int] | None = None,
    batch_events: int = 0,
) -> None:
    """Send the messages of a page of candidates, as fast as the broker allows: one
    compact_stream per stream, or — for streams whose live events ``sizes`` knows, with
    ``batch_events`` > 0 — one compact_batch per batch of small streams (see
    :func:`eskit_tasks.fleet.batch.batches`). A stream in ``caps`` is compacted at most
    through that version (a plan's cut).

    On Redis the messages go out in pipelines (kombu's ``Producer.batch``); a failed
    pipeline raises, and the page is sent again by the fan-out's retry (a stream
    enqueued twice is compacted once). Celery builds the page's first message and the
    others are made from it (:mod:`eskit_tasks.fleet.publish`), unless the
    configuration makes Celery build each message differently: then Celery sends each.
    """
    messages = list(batches(streams, sizes or {}, caps, batch_events))
    singles: list[tuple[str, str]] = [m for m in messages if not isinstance(m, list)]
    groups = [m for m in messages if isinstance(m, list)]
    task = app.tasks[COMPACT_STREAM_TASK]
    kwargsrepr = short_repr(kwargs)
    declare: list[Any] | None = None  # Celery's default: declare the routed queue
    send: Any = task.apply_async  # stubs predate these options
    send_batch: Any = app.tasks[COMPACT_BATCH_TASK].apply_async
    with app.producer_or_acquire() as producer, producer.batch(FANOUT_PUBLISH_BATCH):
        # A batch message carries up to 50 streams: Celery may build each one itself.
        for group in groups:
            body = [m.as_message() for m in group]
            send_batch(
                args=(body,),
                kwargs=kwargs,
                producer=producer,
                declare=declare,
                argsrepr=short_repr((body,)),
                kwargsrepr=kwargsrepr,
            )
            declare = []
        if not singles:
            return
        if template_applies(app, task):
            template = PageTemplate(app, producer, singles[0], kwargs)
            template.publish(producer, singles, kwargs, caps)
            return
        for args in singles:
            cap = None if caps is None else caps.get((args[0], args[1]))
            these = kwargs if cap is None else {**kwargs, "through_version": cap}
            send(
                args=args,
                kwargs=these,
                producer=producer,
                declare=declare,
                argsrepr=short_repr(args),
                kwargsrepr=kwargsrepr if cap is None else short_repr(these),
            )
            declare = []


def queue_depth(app: Celery, queue: str) -> int:
    """Messages waiting in ``queue`` on the app's broker (0 if it does not exist yet).

    A queue of the app's ``task_queues`` is declared as Celery declares it before
    publishing (the answer carries its depth), on a pooled connection; any other is
    looked up passively on a connection of its own (a failed passive declare may close
    the channel)."""
    entity = app.amqp.queues.get(queue)
    if entity is not None:
        with app.producer_or_acquire() as producer:
            answer: Any = entity.bind(producer.channel).queue_declare()  # stubs: a name
            return int(answer.message_count)
    try:
        with app.connection_for_read() as conn:
            channel: Any = conn.default_channel
            declared = channel.queue_declare(queue=queue, passive=True)
            return int(declared.message_count)
    except ChannelError:
        return 0  # not declared yet
