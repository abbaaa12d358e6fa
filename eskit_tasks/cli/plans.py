"""``eskit-tasks plan`` and ``eskit-tasks apply``: decide what a run would compact, store
it, look at it, then compact exactly that — in this process or through the fleet."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Annotated

import typer
from rich.table import Table

from eskit_tasks.cli.local import (
    LocalCompactors,
    reclaim_here,
    record_local_end,
    record_stopped,
)
from eskit_tasks.cli.options import (
    Database,
    DeciderModules,
    Exit,
    JsonOut,
    MaxStreams,
    MinEvents,
    RetainLast,
    RetainYounger,
    StreamTypes,
    app,
    import_deciders,
    open_store,
    policy_of,
)
from eskit_tasks.cli.render import (
    RunTotals,
    emit_json,
    err,
    human_bytes,
    out,
    progress_bar,
    report_results,
)
from eskit_tasks.core.candidates import iter_candidates
from eskit_tasks.core.planning import apply_policy, moved_past, plan_stream
from eskit_tasks.core.registry import get_registration, get_source
from eskit_tasks.domain.plan import PlannedStream
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.domain.result import CompactionResult
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.fleet.progress import new_run_id
from eskit_tasks.fleet.quarantine import note_outcome
from eskit_tasks.fleet.settings import get_settings
from eskit_tasks.ports import EventStore, SnapshotStore
from eskit_tasks.stores import sql_runs
from eskit_tasks.stores.sql import SqlEventStore, SqlSnapshotStore
from eskit_tasks.stores.sql_plans import (
    Plan,
    applicable_plan,
    find_plan,
    plan_page,
    plan_streams_of,
    save_plan,
)
from eskit_tasks.stores.sql_quarantine import SqlQuarantine

plan_app = typer.Typer(
    help="Decide what a run would compact and store it as a plan (plan show ID: look at "
    "one); eskit-tasks apply PLAN_ID compacts exactly that.",
)
app.add_typer(plan_app, name="plan")

#: Streams a plan prints before "... and N more" (--json has them all).
SHOWN = 20


@plan_app.callback(invoke_without_command=True)
def plan(
    ctx: typer.Context,
    database: Database = None,
    min_events: MinEvents = 1,
    stream_type: StreamTypes = None,
    max_streams: MaxStreams = None,
    retain_last: RetainLast = 0,
    retain_younger_than: RetainYounger = None,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Dry-run each stream: replay and verify its snapshot."),
    ] = False,
    expires_in: Annotated[
        float, typer.Option("--expires-in", min=1, help="Hours the plan stays applicable.")
    ] = 7 * 24,
    decider_module: DeciderModules = None,
    json_: JsonOut = False,
) -> None:
    """Plan a run: for each candidate, the version its compaction would reach now and the
    events and bytes that would go; store it and print its id. Deletes nothing."""
    if ctx.invoked_subcommand is not None:
        return
    import_deciders(decider_module)
    store = open_store(database)
    policy = policy_of(retain_last, retain_younger_than, dry_run=False)
    # A dry-run policy: what --verify and an application's streams are planned with;
    # the others only use the compactor's read-only preview.
    compactors = LocalCompactors(
        store, SqlSnapshotStore(store.engine), policy.model_copy(update={"dry_run": True})
    )
    planned: list[PlannedStream] = []
    refused: list[CompactionResult] = []
    todo = iter_candidates(
        store,
        min_events=min_events,
        retain_last=retain_last,
        stream_types=stream_type,
        limit=max_streams,
        skip=None if compactors.quarantine is None else compactors.quarantine.held,
    )
    with progress_bar(json_) as progress:
        task = progress.add_task("planning (dry run)" if verify else "planning", total=None)
        for c in todo:
            found = _plan_one(store, compactors, c.stream_type, c.stream_id, verify)
            if isinstance(found, PlannedStream):
                planned.append(found)
            elif found is not None:
                refused.append(found)
            progress.advance(task)
    age = policy.retain_younger_than
    saved = save_plan(
        store.engine,
        {
            "retain_last": policy.retain_last,
            "retain_younger_than": None if age is None else age.total_seconds(),
            "min_events": min_events,
            "stream_types": None if stream_type is None else list(stream_type),
            "max_streams": max_streams,
        },
        planned,
        verified=verify,
        lifetime=timedelta(hours=expires_in),
    )
    store.engine.dispose()
    _print_plan(saved, planned, refused, json_)


def _plan_one(
    store: EventStore,
    compactors: LocalCompactors,
    stream_type: str,
    stream_id: str,
    verify: bool,
) -> PlannedStream | CompactionResult | None:
    compactor = compactors.compactor_for(stream_type)
    if isinstance(compactor, ConfigurationError):
        return CompactionResult.failed(
            stream_type,
            stream_id,
            str(compactor),
            error_type=type(compactor).__name__,
            compaction_id="-",
        )
    found = plan_stream(store, compactor, stream_type, stream_id, verify=verify)
    if isinstance(found, CompactionResult):
        note_outcome(compactors.quarantine, found)
    return found


@plan_app.command("show")
def show(
    plan_id: Annotated[str, typer.Argument(help="The id plan printed.")],
    database: Database = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Streams to list.")] = 50,
    json_: JsonOut = False,
) -> None:
    """Show a stored plan: its policy, when it expires, its streams and their cuts."""
    store = open_store(database, read_only=True)
    try:
        found = find_plan(store.engine, plan_id)
        if found is None:
            raise ConfigurationError(f"no plan {plan_id!r} in this database")
        streams = [p for _, p in plan_page(store.engine, plan_id, after=0, limit=limit)]
    finally:
        store.engine.dispose()
    _print_plan(found, streams, [], json_)


def _print_plan(
    plan: Plan, streams: list[PlannedStream], refused: list[CompactionResult], json_: bool
) -> None:
    header = {
        "plan_id": plan.plan_id,
        "created_at": plan.created_at.isoformat(timespec="seconds"),
        "expires_at": plan.expires_at.isoformat(timespec="seconds"),
        "expired": plan.expired(),
        "verified": plan.verified,
        "policy": plan.policy,
        "totals": {"streams": plan.streams, "events": plan.events, "bytes": plan.bytes},
    }
    if json_:
        emit_json(
            {
                **header,
                "streams": [s.__dict__ for s in streams],
                "not_planned": [
                    {
                        "stream_type": r.stream_type,
                        "stream_id": r.stream_id,
                        "outcome": r.outcome.value,
                        "error": r.error,
                    }
                    for r in refused
                ],
            }
        )
        return
    table = Table(title=f"plan {plan.plan_id}")
    for name in ("stream", "head", "through", "events", "bytes (est.)"):
        table.add_column(name, overflow="fold", justify="left" if name == "stream" else "right")
    for s in streams[:SHOWN]:
        table.add_row(
            f"{s.stream_type}/{s.stream_id}",
            f"{s.head_version:,}",
            f"{s.through_version:,}",
            f"{s.events:,}",
            human_bytes(s.bytes),
        )
    out.print(table)
    if plan.streams > min(len(streams), SHOWN):
        out.print(f"... and {plan.streams - min(len(streams), SHOWN):,} more", highlight=False)
    state = "expired" if plan.expired() else f"applicable until {header['expires_at']}"
    out.print(
        f"plan {plan.plan_id}: {plan.streams:,} streams, {plan.events:,} events, "
        f"{human_bytes(plan.bytes)} (estimated); {'verified' if plan.verified else 'not verified'}"
        f"; {state}",
        highlight=False,
    )
    for r in refused:
        err.print(f"not planned: {r.stream_type}/{r.stream_id}: {r.outcome.value}: {r.error}")
    if not plan.expired():
        out.print(f"apply it with: eskit-tasks apply {plan.plan_id}", highlight=False)


@app.command()
def apply(
    plan_id: Annotated[str, typer.Argument(help="The id eskit-tasks plan printed.")],
    database: Database = None,
    local: Annotated[
        bool, typer.Option("--local", help="Compact in this process instead of the fleet.")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the fleet run to its end.")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout")] = None,
    decider_module: DeciderModules = None,
    json_: JsonOut = False,
) -> None:
    """Compact exactly the streams of a stored plan, each at most through its planned
    version, even if it grew since; a stream another compaction moved past the plan is
    skipped and reported. Refuses an expired plan."""
    if local:
        _apply_here(plan_id, database, decider_module, json_)
        return
    from eskit_tasks.cli.fleet import follow
    from eskit_tasks.fleet.runs import apply_plan

    run = apply_plan(plan_id, database=database)
    if not wait:
        if json_:
            emit_json({"run_id": run.run_id, "plan_id": plan_id})
        else:
            out.print(
                f"started run {run.run_id} for plan {plan_id}; follow it with: "
                f"eskit-tasks status {run.run_id}",
                highlight=False,
            )
        return
    try:
        follow(run.run_id, timeout, json_)
    finally:
        if not json_:
            _report_moved(plan_id, run.run_id, database)


def _report_moved(plan_id: str, run_id: str, database: str | None) -> None:
    """After a fleet apply: the planned streams of the store that the run did not
    compact because their compaction point had moved past the plan."""
    store = open_store(database, read_only=True)
    try:
        rows = store.compaction_log(run_id=run_id, limit=2**62)  # every row of the run
        compacted = {(r.stream_type, r.stream_id) for r in rows}
        moved = []
        for p in plan_streams_of(store.engine, plan_id):
            if (p.stream_type, p.stream_id) in compacted or get_source(p.stream_type):
                continue
            info = store.stream_info(p.stream_type, p.stream_id)
            if info is not None and info.compacted_through >= p.through_version:
                moved.append(p)
    finally:
        store.engine.dispose()
    for p in moved:
        out.print(
            f"skipped {p.stream_type}/{p.stream_id}: its compaction point moved past the "
            f"plan's version {p.through_version:,}",
            highlight=False,
        )


def _apply_here(
    plan_id: str, database: str | None, decider_module: list[str] | None, json_: bool
) -> None:
    import_deciders(decider_module)
    store = open_store(database)
    plan = applicable_plan(store.engine, plan_id)
    snapshots = SqlSnapshotStore(store.engine)
    quarantine = SqlQuarantine(store.engine, get_settings().quarantine_rules)
    run_id = new_run_id()
    sql_runs.record_start(store.engine, run_id, "plan", plan.policy, plan_id=plan_id)
    totals = RunTotals()
    moved: list[PlannedStream] = []
    started = time.perf_counter()
    with progress_bar(json_) as progress:
        task = progress.add_task("applying plan", total=plan.streams)
        try:
            for planned in plan_streams_of(store.engine, plan_id):
                result = _compact_planned(store, snapshots, plan, planned, run_id)
                note_outcome(quarantine, result)
                totals.add(result)
                if moved_past(planned, result):
                    moved.append(planned)
                progress.advance(task)
        except BaseException as exc:  # Ctrl-C, a bug: the run's record says it stopped
            record_stopped(store, run_id, totals, exc)
            raise
    reclaimed = reclaim_here(store, totals.deleted_by_type)
    record_local_end(store, run_id, totals, reclaim=reclaimed)
    store.engine.dispose()
    report_results(
        totals,
        time.perf_counter() - started,
        json_,
        extra={
            "run_id": run_id,
            "plan_id": plan_id,
            "moved_past_plan": [
                {"stream_type": p.stream_type, "stream_id": p.stream_id} for p in moved
            ],
            "reclaim": reclaimed,
        },
    )
    if not json_:
        for p in moved:
            out.print(
                f"skipped {p.stream_type}/{p.stream_id}: its compaction point moved past the "
                f"plan's version {p.through_version:,}",
                highlight=False,
            )
    if not totals.ok:
        raise typer.Exit(Exit.FAILED_STREAMS)


def _compact_planned(
    store: SqlEventStore,
    snapshots: SnapshotStore,
    plan: Plan,
    planned: PlannedStream,
    run_id: str,
) -> CompactionResult:
    """Compact one planned stream, capped at its planned version."""
    policy: CompactionPolicy = apply_policy(plan.policy, planned)
    try:
        source = get_source(planned.stream_type)
        if source is not None:
            return source.compactor(policy).compact(planned.stream_id, run_id=run_id)
        registration = get_registration(planned.stream_type)
    except ConfigurationError as exc:
        return CompactionResult.failed(
            planned.stream_type,
            planned.stream_id,
            str(exc),
            error_type=type(exc).__name__,
            compaction_id="-",
        )
    compactor = registration.compactor(store, snapshots, policy)
    return compactor.compact(planned.stream_type, planned.stream_id, run_id=run_id)
