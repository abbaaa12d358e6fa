"""Commands that talk to the fleet: start a run on the workers, follow it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from eskit_tasks.cli.local import compact_all_here
from eskit_tasks.cli.options import (
    ArchiveDir,
    Database,
    DeciderModules,
    DryRun,
    EventsPerSecond,
    Exit,
    JsonOut,
    MaxConcurrent,
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
    COMPACTING,
    emit_json,
    emit_result_line,
    emit_summary_line,
    err,
    out,
    print_summary,
    progress_bar,
    work_label,
)
from eskit_tasks.core.registry import check_stream_types
from eskit_tasks.errors import ConfigurationError, RunTimeoutError, UnknownStreamTypeError

if TYPE_CHECKING:
    from eskit_tasks.fleet.progress import RunProgress
    from eskit_tasks.fleet.runs import CompactionRun


@app.command("compact-all")
def compact_all_cmd(
    database: Database = None,
    min_events: MinEvents = 1,
    stream_type: StreamTypes = None,
    max_streams: MaxStreams = None,
    retain_last: RetainLast = 0,
    retain_younger_than: RetainYounger = None,
    dry_run: DryRun = False,
    local: Annotated[
        bool, typer.Option("--local", help="Compact in this process; no broker needed.")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the fleet run to its end.")] = False,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="With --wait: give up after N seconds.")
    ] = None,
    decider_module: DeciderModules = None,
    archive: ArchiveDir = None,
    max_events_per_second: EventsPerSecond = None,
    max_concurrent: MaxConcurrent = None,
    json_: JsonOut = False,
) -> None:
    """Compact every candidate stream: on the fleet (default) or in this process (--local)."""
    policy = policy_of(retain_last, retain_younger_than, dry_run)
    if local:
        compact_all_here(
            database,
            policy,
            min_events,
            stream_type,
            max_streams,
            decider_module,
            json_,
            archive=archive,
        )
        return
    if archive is not None:
        raise ConfigurationError(
            "--archive applies to --local runs; a fleet's workers archive to their own "
            "ESKIT_ARCHIVE_URL"
        )
    from eskit_tasks.fleet.runs import compact_all

    if stream_type:
        check_fleet_stream_types(database, stream_type, decider_module)
    run = compact_all(
        min_events=min_events,
        stream_types=stream_type,
        max_streams=max_streams,
        retain_last=retain_last,
        retain_younger_than=retain_younger_than,
        dry_run=dry_run,
        trigger="cli",
        max_events_per_second=max_events_per_second,
        max_concurrent=max_concurrent,
    )
    if not wait:
        if json_:
            emit_json({"run_id": run.run_id})
        else:
            out.print(f"started run {run.run_id}; follow it with: eskit-tasks status {run.run_id}")
        return
    follow(run.run_id, timeout, json_)


@app.command()
def status(
    run_id: Annotated[str, typer.Argument(help="The id compact-all printed.")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run to its end.")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout")] = None,
    json_: JsonOut = False,
) -> None:
    """Show a fleet run's progress and the streams it could not compact."""
    if wait:
        follow(run_id, timeout, json_)
        return
    from eskit_tasks.fleet.runs import CompactionRun

    summary = CompactionRun(run_id).summary()
    print_summary(summary, json_)
    if summary.failed_streams or summary.error:
        raise typer.Exit(Exit.FAILED_STREAMS)


@app.command()
def throttle(
    events_per_second: EventsPerSecond = None,
    max_concurrent: MaxConcurrent = None,
    run: Annotated[
        str | None, typer.Option("--run", help="The caps of this run instead of the fleet's.")
    ] = None,
    json_: JsonOut = False,
) -> None:
    """Show the fleet-wide caps on compactions, or set them live (0 removes a cap): events
    deleted per second and compactions at once, for every run or for one (--run)."""
    from eskit_tasks.fleet.app import resources
    from eskit_tasks.fleet.progress import check_run_id
    from eskit_tasks.fleet.throttle import caps_of, global_scope, run_scope, set_caps

    res = resources()
    settings = res.settings
    if run is not None:
        if not res.progress.exists(check_run_id(run)):
            raise ConfigurationError(f"no run {run} in Redis (unknown id, or it expired)")
        scope = run_scope(run)
    else:
        scope = global_scope(settings.max_events_per_second, settings.max_concurrent_compactions)
    set_caps(res.redis, scope, events_per_second=events_per_second, max_concurrent=max_concurrent)
    caps = caps_of(res.redis, scope)
    where = f"run {run}" if run is not None else "the fleet"
    if json_:
        emit_json({"scope": "run" if run else "global", "run_id": run, **caps})
        return
    rate, slots = caps["events_per_second"], int(caps["max_concurrent"])
    out.print(
        f"{where}: {f'{rate:,.0f} events deleted per second' if rate else 'no cap on events'}, "
        f"{f'{slots} compactions at once' if slots else 'no cap on compactions at once'} "
        f"({int(caps['running'])} running)",
        highlight=False,
    )


def _control(run_id: str, action: str, json_: bool) -> None:
    from eskit_tasks.fleet.runs import CompactionRun

    run = CompactionRun(run_id)
    done = getattr(run, action)()
    state = run.progress().state
    if json_:
        emit_json({"run_id": run_id, "action": action, "done": done, "state": state})
    elif done:
        out.print(f"run {run_id}: {state}", highlight=False)
    else:
        err.print(
            f"error: run {run_id} has ended or was cancelled already ({state}); nothing to {action}"
        )
    if not done:
        raise typer.Exit(Exit.ERROR)


@app.command()
def pause(
    run_id: Annotated[str, typer.Argument(help="The run's id.")], json_: JsonOut = False
) -> None:
    """Pause a fleet run: it enqueues nothing and its queued tasks wait (compactions
    already running finish). Exit 1 if it has ended or was cancelled."""
    _control(run_id, "pause", json_)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="The run's id.")], json_: JsonOut = False
) -> None:
    """Resume a paused fleet run. Exit 1 if it has ended or was cancelled."""
    _control(run_id, "resume", json_)


@app.command()
def cancel(
    run_id: Annotated[str, typer.Argument(help="The run's id.")], json_: JsonOut = False
) -> None:
    """Cancel a fleet run: it enqueues nothing more and its queued tasks end cancelled
    without touching the database (compactions already running finish). Exit 1 if it
    has ended already."""
    _control(run_id, "cancel", json_)


def check_fleet_stream_types(
    database: str | None, stream_types: list[str], decider_modules: list[str] | None
) -> None:
    """Refuse a ``--stream-type`` of a fleet run that nobody knows. This shell need not
    import the workers' deciders: a type with streams in the store is known; the decider
    modules (ESKIT_DECIDER_MODULES, ``--decider-module``) are imported only to look for
    a type the store has no stream of (a pyeventsourcing application's, or a typo)."""
    store = open_store(database, read_only=True)
    try:
        try:
            check_stream_types(stream_types, store, compacted_here=False)
        except UnknownStreamTypeError:
            import_deciders(decider_modules)
            check_stream_types(stream_types, store, compacted_here=False)
    finally:
        store.engine.dispose()


def run_phase(p: RunProgress) -> str:
    """What a fleet run is doing, for its progress bar."""
    if p.reclaiming:
        return "reclaiming space"
    label = work_label(bool(p.policy.get("dry_run")))
    return label if p.fanout_done else f"{label}, listing candidates"


def follow(run_id: str, timeout: float | None, json_: bool) -> None:
    """Wait for a run with a progress bar, then print its summary. ``--json``: a line per
    stream result as it is reported, then the summary line (compact-all --json)."""
    from eskit_tasks.fleet.runs import CompactionRun

    run = CompactionRun(run_id)
    lines = ResultLines(run) if json_ else None

    def show(p: RunProgress) -> None:
        progress.update(
            task,
            description=run_phase(p),
            total=p.candidates if p.fanout_done else None,
            completed=p.done,
        )
        if lines is not None:
            lines.emit()

    with progress_bar(json_) as progress:
        task = progress.add_task(COMPACTING, total=None)
        try:
            run.wait(timeout, on_progress=show)
        except RunTimeoutError as exc:
            raise RunTimeoutError(f"{exc}; it keeps running: eskit-tasks status {run_id}") from exc
        except KeyboardInterrupt:
            err.print(
                f"stopped waiting; run {run_id} goes on: follow it with eskit-tasks status "
                f"{run_id} --wait, stop it with eskit-tasks cancel {run_id}"
            )
            raise typer.Exit(Exit.INTERRUPTED) from None
    summary = run.summary()
    if lines is not None:
        lines.emit()
        emit_summary_line({**summary.model_dump(mode="json"), "results_listed": lines.listed})
    else:
        print_summary(summary, json_)
    if summary.failed_streams or summary.error:
        raise typer.Exit(Exit.FAILED_STREAMS)


class ResultLines:
    """Prints a fleet run's stream results as JSON lines, each once, as they come."""

    def __init__(self, run: CompactionRun) -> None:
        self.run, self.after, self.listed = run, "0-0", 0

    def emit(self) -> None:
        while True:
            results, self.after = self.run.results(self.after)
            for r in results:
                emit_result_line(r)
            self.listed += len(results)
            if not results:
                return
