"""The end of a run: giving back the space of what it deleted (ESKIT_RECLAIM=auto).

A run that deleted events ends with one finishing step, whoever ran it: the
``eskit_tasks.finish_run`` task in a fleet (sent by the worker whose report, or the
fan-out whose last page, completed the run; see ``_COMPLETE`` in progress.py), or the
end of ``compact-all --local``. The step reclaims the event store if streams of its own
types deleted events, and each registered application that deleted some (a
pyeventsourcing application on PostgreSQL: the library turned autovacuum off), once per
run instead of after each stream. Sizes are measured before and after; a failure is
recorded in the run's summary and never undoes or hides a compaction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery import Task
from sqlalchemy.engine import Engine

from eskit_tasks.core.registry import get_source, import_decider_modules
from eskit_tasks.domain.redact import mask_url
from eskit_tasks.domain.space import ReclaimReport
from eskit_tasks.errors import EskitError
from eskit_tasks.fleet import metrics
from eskit_tasks.fleet.progress import RunProgress, check_run_id
from eskit_tasks.fleet.resources import Resources, resources_of
from eskit_tasks.stores import sql_runs
from eskit_tasks.stores.reclaim import reclaim, store_tables

log = logging.getLogger("eskit_tasks.reclaim")


def reclaim_after_run(engine: Engine | None, deleted_by_type: Mapping[str, int]) -> dict[str, Any]:
    """Reclaim what a run deleted; return what was measured, as JSON.

    Args:
        engine: The event store's engine (None: a store without one, kept in memory).
        deleted_by_type: Events the run deleted per stream type.

    Returns:
        ``{"store": report, "applications": {name: report}}``: a report is a
        :class:`~eskit_tasks.domain.space.ReclaimReport` as JSON, ``{"error": ...}`` if
        that step failed, or None (an application on SQLite, never vacuumed); ``store``
        is None when no stream of the store's own types lost events.
    """
    store_types = [t for t, n in deleted_by_type.items() if n > 0 and get_source(t) is None]
    sources = sorted(t for t, n in deleted_by_type.items() if n > 0 and get_source(t) is not None)
    answer: dict[str, Any] = {"store": None, "applications": {}}
    if store_types and engine is not None:
        answer["store"] = _attempt("the event store", lambda: reclaim(engine, store_tables(engine)))
    for name in sources:
        source = get_source(name)
        if source is not None:
            answer["applications"][name] = _attempt(
                f"application {name}", lambda s=source: s.reclaim()
            )
    return answer


def _attempt(what: str, step: Any) -> dict[str, Any] | None:
    try:
        report: ReclaimReport | None = step()
    except Exception as exc:  # the deletions stand; say what failed and go on
        error = mask_url(f"reclaiming the space of {what} failed: {type(exc).__name__}: {exc}")
        log.warning("%s (run `eskit-tasks reclaim` later)", error)
        return {"error": error}
    if report is None:
        return None
    log.info(
        "reclaimed %s: %s, %d bytes smaller, %s bytes more reusable, in %.1fs",
        what,
        report.mode,
        report.shrunk_bytes,
        report.reusable_bytes,
        report.duration_s,
    )
    return report.as_json()


def finish_run(self: Task[Any, Any], /, run_id: str) -> dict[str, Any] | None:
    """The finishing step of a fleet run whose candidates have all reported: reclaim
    the space of what it deleted (ESKIT_RECLAIM=auto, not a dry run), record the run's
    end in the database, then mark it finished. Idempotent: a copy that finds the run
    finished does nothing, and one copy at a time does the step (it claims it in Redis
    for ESKIT_TASK_TIME_LIMIT; its own retries go on), so one reclaim is measured and
    recorded. Redis or the database unreachable: retried with backoff."""
    res = resources_of(self.app)
    run_id = check_run_id(run_id)
    progress = res.progress.get(run_id)
    if progress is None or progress.finished_at is not None:
        return None
    if not res.progress.claim_finish(
        run_id, self.request.id or "", ttl=int(res.settings.task_time_limit)
    ):
        return None  # another copy is finishing it
    engine = getattr(res.store, "engine", None)
    answer: dict[str, Any] | None = None
    if (
        res.settings.reclaim == "auto"
        and not progress.policy.get("dry_run")
        and any(n > 0 for n in progress.deleted_by_type.values())
    ):
        try:
            import_decider_modules(res.settings.decider_module_list)
            answer = reclaim_after_run(engine, progress.deleted_by_type)
        except Exception as exc:  # the run still ends, saying what went wrong
            answer = {"error": mask_url(f"the run's finishing step failed: {exc}")}
            log.warning("run %s: %s", run_id, answer["error"])
    if engine is not None:
        _record_end(engine, progress, answer)
    if res.progress.finish(run_id, answer):  # the first copy to end it counts it
        metrics.record_run_finished(error=False)
    return answer


def record_run_start(res: Resources, run_id: str, args: Mapping[str, Any]) -> None:
    """Record a fleet run's start in the database (idempotent), when the store has one."""
    engine = getattr(res.store, "engine", None)
    if engine is not None:
        skip = ("run_id", "trigger", "sources", "plan_id")
        policy = {k: v for k, v in args.items() if k not in skip}
        sql_runs.record_start(
            engine,
            run_id,
            str(args.get("trigger") or "beat"),
            policy,
            plan_id=args.get("plan_id"),
        )


def fail_run(res: Resources, run_id: str, error: str) -> None:
    """Stop a run with an error: in its progress (``run.wait()`` returns) and in its
    record in the database (best effort: the progress says it either way)."""
    if res.progress.fail(run_id, error):  # counted once in eskit_runs_finished_total
        metrics.record_run_finished(error=True)
    engine = getattr(res.store, "engine", None)
    progress = res.progress.get(run_id)
    if engine is not None and progress is not None:
        _record_end(engine, progress, None)


def _record_end(engine: Engine, progress: RunProgress, reclaim: dict[str, Any] | None) -> None:
    """Record the run's end; a database that cannot take it is logged, never stops the
    run from ending (its progress in Redis has the same totals)."""
    try:
        sql_runs.record_end(
            engine,
            progress.run_id,
            candidates=progress.candidates,
            done=progress.done,
            outcomes=progress.outcomes,
            events_deleted=progress.events_deleted,
            reclaim=reclaim,
            error=progress.error,
            policy=progress.policy,
        )
    except EskitError as exc:  # a database down, or tables of an older revision
        log.warning("run %s: could not record its end in the database: %s", progress.run_id, exc)
