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
    COMPACTING,
    emit_json,
    emit_result_line,
    emit_summary_line,
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
