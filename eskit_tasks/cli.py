"""The ``eskit-tasks`` command line (also ``python -m eskit_tasks``).

Exit status: 0 success; 1 an error; 2 a usage error (bad flag or value); 3 a service
(database, Redis, broker) unreachable; 4 the work ran but some streams failed.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Sequence
from enum import IntEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.exceptions import TyperException

from eskit_tasks.core.candidates import iter_candidates
from eskit_tasks.core.compactor import Compactor
from eskit_tasks.core.loading import load_state
from eskit_tasks.core.registry import get_registration, import_decider_modules
from eskit_tasks.core.verify import MAX_PROBLEMS, SnapshotReport, verify_snapshots
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.domain.redact import mask_url
from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    EskitError,
    RunTimeoutError,
)
from eskit_tasks.fleet.settings import get_settings
from eskit_tasks.ports import Candidate
from eskit_tasks.stores.sql import SqlEventStore, SqlSnapshotStore


class Exit(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    UNAVAILABLE = 3
    FAILED_STREAMS = 4


out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    name="eskit-tasks",
    help="Compact long-lived event-sourced streams: snapshot, verify, then delete.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# -- shared options ----------------------------------------------------------------------

Database = Annotated[
    str | None,
    typer.Option("--database", help="Event database URL (default: ESKIT_DATABASE_URL)."),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
RetainLast = Annotated[
    int, typer.Option("--retain-last", min=0, help="Keep the newest N events of each stream.")
]
RetainYounger = Annotated[
    str | None,
    typer.Option("--retain-younger-than", help='Keep events younger than this: "30d", "12h".'),
]
MinEvents = Annotated[
    int,
    typer.Option("--min-events", min=1, help="Only streams with at least N new events."),
]
StreamTypes = Annotated[
    list[str] | None,
    typer.Option("--stream-type", help="Only this stream type (repeatable)."),
]
MaxStreams = Annotated[
    int | None, typer.Option("--max-streams", min=0, help="At most N streams in this run.")
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Verify in memory; delete nothing.")]
DeciderModules = Annotated[
    list[str] | None,
    typer.Option(
        "--decider-module",
        help="Module that calls register_decider (repeatable; adds to ESKIT_DECIDER_MODULES).",
    ),
]


def _policy(retain_last: int, retain_younger_than: str | None, dry_run: bool) -> CompactionPolicy:
    return CompactionPolicy(
        retain_last=retain_last, retain_younger_than=retain_younger_than, dry_run=dry_run
    )


def _store(database: str | None) -> SqlEventStore:
    return SqlEventStore.from_url(database or get_settings().database_url)


def _emit_json(value: Any) -> None:
    out.print_json(json.dumps(value, default=str))


def _deciders(extra: Sequence[str] | None) -> None:
    import_decider_modules([*get_settings().decider_module_list, *(extra or [])])


# -- commands ----------------------------------------------------------------------------


@app.command("init-db")
def init_db(database: Database = None, json_: JsonOut = False) -> None:
    """Create eskit-tasks' tables in the event database (safe to run again)."""
    store = _store(database)
    where = mask_url(str(store.engine.url.render_as_string(hide_password=True)))
    if json_:
        _emit_json({"database": where, "tables": "ready"})
    else:
        out.print(f"tables ready in {where}")


@app.command()
def demo(
    database: Annotated[
        str, typer.Option("--database", help="Where to put the demo streams.")
    ] = "sqlite:///eskit-demo.db",
    streams: Annotated[int, typer.Option(min=1, help="Accounts to seed.")] = 5,
    events: Annotated[int, typer.Option(min=1, help="Events per account.")] = 20_000,
    retain_last: RetainLast = 100,
    json_: JsonOut = False,
) -> None:
    """Seed demo accounts in an embedded SQLite file, compact them, print a summary.

    Needs no broker and no server.
    """
    from eskit_tasks import demo as demo_mod

    store = _store(database)
    snapshots = SqlSnapshotStore(store.engine)
    ids = [f"acct-{n:03d}" for n in range(1, streams + 1)]
    rng = random.Random(7)  # noqa: S311 -- demo data
    with _progress(json_) as progress:
        task = progress.add_task("seeding", total=len(ids))
        for stream_id in ids:
            demo_mod.seed(store, stream_id, events, rng)
            progress.advance(task)
    decider = demo_mod.Account()
    before = {
        i: load_state(store, snapshots, decider, demo_mod.AccountState, "account", i) for i in ids
    }
    compactor = Compactor(
        store=store,
        snapshot_store=snapshots,
        decider=decider,
        state_type=demo_mod.AccountState,
        policy=CompactionPolicy(retain_last=retain_last),
    )
    started = time.perf_counter()
    results = []
    with _progress(json_) as progress:
        task = progress.add_task("compacting", total=len(ids))
        for stream_id in ids:
            results.append(compactor.compact("account", stream_id))
            progress.advance(task)
    elapsed = time.perf_counter() - started
    after = {
        i: load_state(store, snapshots, decider, demo_mod.AccountState, "account", i) for i in ids
    }
    unchanged = before == after
    _report_results(results, elapsed, json_, extra={"state_unchanged": unchanged})
    if not json_:
        out.print(f"state after compaction equals state before: {'yes' if unchanged else 'NO'}")
    if not unchanged or any(not r.ok for r in results):
        raise typer.Exit(Exit.FAILED_STREAMS)


@app.command()
def candidates(
    database: Database = None,
    min_events: MinEvents = 1,
    stream_type: StreamTypes = None,
    retain_last: RetainLast = 0,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Show at most N.")] = 50,
    json_: JsonOut = False,
) -> None:
    """List the streams a policy would pick, with their live event counts."""
    store = _store(database)
    found = list(
        iter_candidates(
            store,
            min_events=min_events,
            retain_last=retain_last,
            stream_types=stream_type,
            limit=limit,
        )
    )
    if json_:
        _emit_json(
            [
                {
                    "stream_type": c.stream_type,
                    "stream_id": c.stream_id,
                    "live_events": c.live_events,
                }
                for c in found
            ]
        )
        return
    table = Table("stream type", "stream id", "live events", title=f"{len(found)} candidates")
    for c in found:
        table.add_row(c.stream_type, c.stream_id, f"{c.live_events:,}")
    out.print(table)


@app.command()
def compact(
    stream_type: Annotated[str, typer.Argument(help="The stream's type.")],
    stream_id: Annotated[str, typer.Argument(help="The stream's id.")],
    database: Database = None,
    retain_last: RetainLast = 0,
    retain_younger_than: RetainYounger = None,
    dry_run: DryRun = False,
    decider_module: DeciderModules = None,
    json_: JsonOut = False,
) -> None:
    """Compact one stream, in this process."""
    policy = _policy(retain_last, retain_younger_than, dry_run)
    _deciders(decider_module)
    registration = get_registration(stream_type)
    store = _store(database)
    result = Compactor(
        store=store,
        snapshot_store=SqlSnapshotStore(store.engine),
        decider=registration.decider,
        state_type=registration.state_type,
        state_version=registration.state_version,
        upcasters=registration.upcasters,
        policy=policy,
    ).compact(stream_type, stream_id)
    if json_:
        _emit_json(result.model_dump(mode="json"))
    else:
        _print_result(result)
    if not result.ok:
        raise typer.Exit(Exit.FAILED_STREAMS)


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
    json_: JsonOut = False,
) -> None:
    """Compact every candidate stream: on the fleet (default) or in this process (--local)."""
    policy = _policy(retain_last, retain_younger_than, dry_run)
    if local:
        _compact_all_local(
            database, policy, min_events, stream_type, max_streams, decider_module, json_
        )
        return
    from eskit_tasks.fleet.runs import compact_all

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
            _emit_json({"run_id": run.run_id})
        else:
            out.print(f"started run {run.run_id}; follow it with: eskit-tasks status {run.run_id}")
        return
    _follow(run.run_id, timeout, json_)


@app.command()
def status(
    run_id: Annotated[str, typer.Argument(help="The id compact-all printed.")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run to its end.")] = False,
    timeout: Annotated[float | None, typer.Option("--timeout")] = None,
    json_: JsonOut = False,
) -> None:
    """Show a fleet run's progress and the streams it could not compact."""
    if wait:
        _follow(run_id, timeout, json_)
        return
    from eskit_tasks.fleet.runs import CompactionRun

    summary = CompactionRun(run_id).summary()
    _print_summary(summary, json_)
    if summary.failed_streams or summary.error:
        raise typer.Exit(Exit.FAILED_STREAMS)


@app.command()
def log(
    database: Database = None,
    stream_type: Annotated[str | None, typer.Option("--stream-type")] = None,
    stream_id: Annotated[str | None, typer.Option("--stream-id")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    json_: JsonOut = False,
) -> None:
    """Show the compaction audit log, newest first."""
    rows = _store(database).compaction_log(stream_type, stream_id, limit=limit)
    if json_:
        _emit_json([_record(r) for r in rows])
        return
    table = Table(
        "when",
        "stream",
        "versions",
        "deleted",
        "bytes",
        "head",
        "state hash",
        "compaction id",
        title=f"{len(rows)} compactions",
    )
    for r in rows:
        table.add_row(
            r.compacted_at.strftime("%Y-%m-%d %H:%M:%S"),
            f"{r.stream_type}/{r.stream_id}",
            f"{r.from_version}..{r.through_version}",
            f"{r.events_deleted:,}",
            f"{r.bytes_reclaimed:,}",
            str(r.head_version),
            r.state_hash[:12],
            r.compaction_id,
        )
    out.print(table)


@app.command("verify-snapshots")
def verify_snapshots_cmd(
    database: Database = None,
    stream_types: StreamTypes = None,
    decider_modules: DeciderModules = None,
    json_: JsonOut = False,
) -> None:
    """Check that the deciders about to be deployed can read every verified snapshot
    (hash, schema marker, upcasters, strict decode); exit 4 if any cannot. Read-only."""
    _deciders(decider_modules)
    store = _store(database)
    report = verify_snapshots(SqlSnapshotStore(store.engine), stream_types=stream_types)
    if json_:
        _emit_json(report.to_json())
    else:
        _print_snapshot_report(report)
    if not report.ok:
        raise typer.Exit(Exit.FAILED_STREAMS)


def _print_snapshot_report(report: SnapshotReport) -> None:
    table = Table(
        "stream type",
        "snapshots",
        "failed",
        "integrity",
        "schema",
        "unregistered",
        "missing",
        title=f"{report.checked:,} snapshots checked, {report.failed:,} cannot be used",
    )
    for stream_type, tally in sorted(report.by_type.items()):
        table.add_row(
            stream_type,
            f"{tally.checked:,}",
            f"{tally.failures:,}",
            *(f"{tally.failed.get(kind, 0):,}" for kind in _PROBLEM_KINDS),
        )
    out.print(table)
    for p in report.problems[:SHOWN_PROBLEMS]:
        out.print(f"{p.kind}: {p.error}", markup=False)
    if report.failed > SHOWN_PROBLEMS:
        out.print(
            f"... and {report.failed - SHOWN_PROBLEMS:,} more (--json lists up to {MAX_PROBLEMS:,})"
        )
    if report.failed:
        out.print(
            "Do not deploy until these load: register upcasters for the old schemas, or "
            "keep the old state type (see docs/snapshots.md, 'State schemas and upcasters')."
        )


#: The columns of verify-snapshots' table, one per kind of problem.
_PROBLEM_KINDS = ("integrity", "schema", "unregistered", "missing")
#: Failing snapshots printed in full by verify-snapshots (the rest are counted).
SHOWN_PROBLEMS = 20


# -- helpers -----------------------------------------------------------------------------


def _record(row: Any) -> dict[str, Any]:
    return {name: getattr(row, name) for name in row.__slots__}


def _compact_all_local(
    database: str | None,
    policy: CompactionPolicy,
    min_events: int,
    stream_types: Sequence[str] | None,
    max_streams: int | None,
    decider_module: Sequence[str] | None,
    json_: bool,
) -> None:
    _deciders(decider_module)
    store = _store(database)
    snapshots = SqlSnapshotStore(store.engine)
    compactors: dict[str, Compactor[Any] | CompactionResult] = {}
    results: list[CompactionResult] = []
    started = time.perf_counter()
    todo = iter_candidates(
        store,
        min_events=min_events,
        retain_last=policy.retain_last,
        stream_types=stream_types,
        limit=max_streams,
    )
    with _progress(json_) as progress:
        task = progress.add_task("compacting", total=None)
        for c in todo:
            results.append(_compact_one(store, snapshots, compactors, policy, c))
            progress.advance(task)
    _report_results(results, time.perf_counter() - started, json_)
    if any(not r.ok for r in results):
        raise typer.Exit(Exit.FAILED_STREAMS)


def _compact_one(
    store: SqlEventStore,
    snapshots: SqlSnapshotStore,
    compactors: dict[str, Any],
    policy: CompactionPolicy,
    c: Candidate,
) -> CompactionResult:
    if c.stream_type not in compactors:
        try:
            reg = get_registration(c.stream_type)
            compactors[c.stream_type] = Compactor(
                store=store,
                snapshot_store=snapshots,
                decider=reg.decider,
                state_type=reg.state_type,
                state_version=reg.state_version,
                upcasters=reg.upcasters,
                policy=policy,
            )
        except ConfigurationError as exc:
            compactors[c.stream_type] = exc
    found = compactors[c.stream_type]
    if isinstance(found, Compactor):
        return found.compact(c.stream_type, c.stream_id)
    return CompactionResult.failed(
        c.stream_type, c.stream_id, str(found), error_type=type(found).__name__, compaction_id="-"
    )


def _follow(run_id: str, timeout: float | None, json_: bool) -> None:
    from eskit_tasks.fleet.runs import CompactionRun

    run = CompactionRun(run_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    with _progress(json_) as progress:
        task = progress.add_task("compacting", total=None)
        while True:
            p = run.progress()
            progress.update(task, total=p.candidates if p.fanout_done else None, completed=p.done)
            if p.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise RunTimeoutError(
                    f"run {run_id} not finished after {timeout}s ({p.done} of {p.candidates} "
                    f"done); it keeps running: eskit-tasks status {run_id}"
                )
            time.sleep(0.5)
    summary = run.summary()
    _print_summary(summary, json_)
    if summary.failed_streams or summary.error:
        raise typer.Exit(Exit.FAILED_STREAMS)


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
        transient=True,
    )


def _report_results(
    results: Sequence[CompactionResult],
    elapsed: float,
    json_: bool,
    extra: dict[str, Any] | None = None,
) -> None:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome.value] = counts.get(r.outcome.value, 0) + 1
    done = [r for r in results if r.outcome == Outcome.COMPACTED]
    dry = [r for r in results if r.outcome == Outcome.DRY_RUN]
    failed = [r for r in results if not r.ok]
    totals = {
        "streams": len(results),
        "outcomes": counts,
        "events_deleted": sum(r.events_deleted for r in done),
        "bytes_reclaimed": sum(r.bytes_reclaimed for r in done),
        "dry_run_events": sum(r.events_deleted for r in dry),
        "dry_run_bytes": sum(r.bytes_reclaimed for r in dry),
        "elapsed_s": round(elapsed, 3),
        "failed_streams": [
            {
                "stream_type": r.stream_type,
                "stream_id": r.stream_id,
                "outcome": r.outcome.value,
                "error": r.error,
            }
            for r in failed
        ],
        **(extra or {}),
    }
    if json_:
        _emit_json(totals)
        return
    _summary_table(totals)


def _summary_table(t: dict[str, Any]) -> None:
    outcomes = t["outcomes"]
    table = Table(title="summary", show_header=False)
    table.add_row("streams compacted", f"{outcomes.get('compacted', 0):,}")
    if outcomes.get("dry_run"):
        table.add_row("streams verified (dry run)", f"{outcomes['dry_run']:,}")
    table.add_row("nothing to do", f"{outcomes.get('nothing_to_compact', 0):,}")
    failed = sum(outcomes.get(o, 0) for o in ("failed", "verification_failed", "fenced", "locked"))
    table.add_row("failed", f"{failed:,}")
    table.add_row("events deleted", f"{t['events_deleted']:,}")
    table.add_row("bytes reclaimed", _bytes(t["bytes_reclaimed"]))
    if t.get("dry_run_events"):
        table.add_row(
            "would delete (dry run)",
            f"{t['dry_run_events']:,} events, {_bytes(t['dry_run_bytes'])}",
        )
    table.add_row("time", f"{t['elapsed_s']:.2f}s")
    out.print(table)
    for f in t["failed_streams"]:
        out.print(f"[red]{f['outcome']}[/red] {f['stream_type']}/{f['stream_id']}: {f['error']}")


def _print_summary(summary: Any, json_: bool) -> None:
    totals = summary.model_dump(mode="json")
    if json_:
        _emit_json(totals)
        return
    state = "finished" if summary.finished else "running"
    out.print(f"run {summary.run_id}: {state}, {summary.done} of {summary.candidates} streams done")
    if summary.error:
        out.print(f"[red]run error:[/red] {summary.error}")
    totals["failed_streams"] = [f.model_dump() for f in summary.failed_streams]
    _summary_table(totals)


def _print_result(r: CompactionResult) -> None:
    colour = "green" if r.ok else "red"
    out.print(f"[{colour}]{r.outcome.value}[/{colour}] {r.stream_type}/{r.stream_id}")
    table = Table(show_header=False)
    table.add_row("head version", str(r.head_version))
    table.add_row("snapshot version", str(r.snapshot_version or "-"))
    table.add_row("events deleted", f"{r.events_deleted:,}")
    table.add_row("events retained", f"{r.events_retained:,}")
    table.add_row("bytes reclaimed", _bytes(r.bytes_reclaimed))
    table.add_row("duration", f"{r.duration_ms:.1f} ms")
    table.add_row("compaction id", r.compaction_id)
    out.print(table)
    if r.error:
        out.print(f"error: {r.error}")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


# -- entry point -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; expected errors print one line and set the exit status."""
    try:
        code = app(args=list(argv) if argv is not None else None, standalone_mode=False)
        return int(code or 0)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        return Exit.ERROR
    except TyperException as exc:  # a usage error found by the argument parser
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path.split(" ", 1)[-1] if ctx is not None else ""
        hint = f" (see: eskit-tasks {command} --help)".replace("  ", " ")
        err.print(f"error: {exc.format_message()}{hint}")
        return Exit.USAGE
    except ConfigurationError as exc:  # includes InvalidPolicyError: a bad value given
        err.print(f"error: {mask_url(str(exc))}")
        return Exit.USAGE
    except DatabaseUnavailableError as exc:
        err.print(f"error: {mask_url(str(exc))}")
        return Exit.UNAVAILABLE
    except EskitError as exc:
        err.print(f"error: {mask_url(str(exc))}")
        return Exit.ERROR
    except Exception as exc:
        if _is_unreachable(exc):
            err.print(f"error: service unreachable: {mask_url(str(exc))}")
            return Exit.UNAVAILABLE
        raise


def _is_unreachable(exc: BaseException) -> bool:
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, RedisConnectionError | RedisTimeoutError | KombuOperationalError)


def run() -> None:
    sys.exit(main())
