"""Commands that work on the event database in this process; no broker needed."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Sequence
from typing import Annotated, Any

import typer

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
    database_origin,
    import_deciders,
    open_archive,
    open_store,
    policy_of,
    sqlite_file,
)
from eskit_tasks.cli.render import (
    CandidateTally,
    RunTotals,
    emit_json,
    emit_result_line,
    err,
    out,
    print_candidates,
    print_log,
    print_reclaim,
    print_result,
    print_runs,
    print_snapshot_report,
    progress_bar,
    report_results,
    work_label,
)
from eskit_tasks.core.candidates import iter_candidates, with_old_events
from eskit_tasks.core.compactor import Compactor
from eskit_tasks.core.loading import load_state
from eskit_tasks.core.registry import (
    SourceCompactor,
    check_stream_types,
    get_registration,
    get_source,
    registered_sources,
)
from eskit_tasks.core.verify import verify_snapshots
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.domain.redact import mask_url
from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.errors import ConfigurationError, EskitError
from eskit_tasks.fleet.finish import reclaim_after_run
from eskit_tasks.fleet.progress import new_run_id
from eskit_tasks.fleet.quarantine import note_outcome
from eskit_tasks.fleet.settings import get_settings
from eskit_tasks.ports import Archive, Candidate, EventStore, SnapshotStore
from eskit_tasks.stores import migrate, sql_runs
from eskit_tasks.stores.engine import create_engine
from eskit_tasks.stores.reclaim import FULL_LOCK_WARNING, reclaim, store_tables
from eskit_tasks.stores.sql import SqlEventStore, SqlSnapshotStore
from eskit_tasks.stores.sql_quarantine import SqlQuarantine
from eskit_tasks.stores.sql_runs import recent_runs


@app.command("init-db")
def init_db(database: Database = None, json_: JsonOut = False) -> None:
    """Create eskit-tasks' tables, or upgrade them to this version's revision (safe to
    run again; workers must be stopped for an upgrade)."""
    url = database or get_settings().database_url
    engine = create_engine(url, origin=database_origin(database))
    try:
        before, after = migrate.upgrade(engine)
        where = mask_url(str(engine.url.render_as_string(hide_password=True)))
    finally:
        engine.dispose()
    if json_:
        emit_json(
            {
                "database": where,
                "tables": "ready",
                "revision": after.revision,
                "was": before.revision,
                "was_state": before.state,
            }
        )
    else:
        out.print(f"tables ready in {where}: {describe_upgrade(before, after)}")


@app.command("db-status")
def db_status(database: Database = None, json_: JsonOut = False) -> None:
    """Show the revision of the eskit tables and whether init-db must upgrade them
    (exit 2 if so). Read-only."""
    engine = create_engine(
        database or get_settings().database_url, origin=database_origin(database)
    )
    try:
        path = sqlite_file(engine.url)
        if path is not None and not path.exists():
            found = migrate.SchemaStatus("empty", None, migrate.head())
        else:
            found = migrate.status(engine)
        where = mask_url(str(engine.url.render_as_string(hide_password=True)))
    finally:
        engine.dispose()
    advice = {
        "current": "up to date",
        "empty": "not initialised: run eskit-tasks init-db",
        "unversioned": "made before migrations: run eskit-tasks init-db",
        "behind": "needs an upgrade: run eskit-tasks init-db",
        "ahead": "made by a newer eskit-tasks: upgrade eskit-tasks",
    }[found.state]
    if json_:
        emit_json(
            {
                "database": where,
                "state": found.state,
                "revision": found.revision,
                "head": found.head,
            }
        )
    else:
        out.print(
            f"{where}: revision {found.revision or '(none)'}, this eskit-tasks "
            f"{found.head}: {advice}"
        )
    if found.state == "ahead":
        raise typer.Exit(Exit.ERROR)
    if not found.ready:
        raise typer.Exit(Exit.USAGE)


def describe_upgrade(before: migrate.SchemaStatus, after: migrate.SchemaStatus) -> str:
    if before.state == "current":
        return f"revision {after.revision}, already current"
    if before.state == "empty":
        return f"created at revision {after.revision}"
    if before.state == "unversioned":
        return f"tables from before migrations upgraded to revision {after.revision}"
    return f"upgraded from revision {before.revision} to {after.revision}"


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

    store = open_store(database)
    snapshots = SqlSnapshotStore(store.engine)
    ids = [f"acct-{n:03d}" for n in range(1, streams + 1)]
    rng = random.Random(7)  # noqa: S311 -- demo data
    with progress_bar(json_) as progress:
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
    totals = RunTotals()
    with progress_bar(json_) as progress:
        task = progress.add_task("compacting", total=len(ids))
        for stream_id in ids:
            totals.add(compactor.compact("account", stream_id))
            progress.advance(task)
    elapsed = time.perf_counter() - started
    after = {
        i: load_state(store, snapshots, decider, demo_mod.AccountState, "account", i) for i in ids
    }
    unchanged = before == after
    reclaimed = reclaim_here(store, totals.deleted_by_type)
    report_results(
        totals, elapsed, json_, extra={"state_unchanged": unchanged, "reclaim": reclaimed}
    )
    if not json_:
        out.print(f"state after compaction equals state before: {'yes' if unchanged else 'NO'}")
    if not unchanged or not totals.ok:
        raise typer.Exit(Exit.FAILED_STREAMS)


@app.command()
def candidates(
    database: Database = None,
    min_events: MinEvents = 1,
    stream_type: StreamTypes = None,
    max_streams: MaxStreams = None,
    retain_last: RetainLast = 0,
    retain_younger_than: RetainYounger = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Show at most N.")] = 50,
    decider_module: DeciderModules = None,
    json_: JsonOut = False,
) -> None:
    """List the streams compact-all would compact with these flags, with their live event
    counts (those of the registered pyeventsourcing applications after the store's), and
    their total. --retain-younger-than leaves out the streams with no event old enough."""
    policy = policy_of(retain_last, retain_younger_than, dry_run=False)
    import_deciders(decider_module)
    store = open_store(database, read_only=True)
    check_stream_types(stream_type, store, compacted_here=False)
    found = with_old_events(
        store,
        iter_candidates(
            store,
            min_events=min_events,
            retain_last=retain_last,
            stream_types=stream_type,
            limit=max_streams,
            skip=SqlQuarantine(store.engine).held,
        ),
        policy,
    )
    listed: list[Candidate] = []
    tally = CandidateTally()
    try:
        for c in found:
            tally.add(c)
            if len(listed) < limit:
                listed.append(c)
    except EskitError as exc:  # a source that cannot be paged: show what was found
        print_candidates(listed, json_, tally)
        err.print(f"error: listing stopped after {tally.streams} streams: {mask_url(str(exc))}")
        raise typer.Exit(Exit.ERROR) from exc
    print_candidates(listed, json_, tally)


@app.command()
def compact(
    stream_type: Annotated[str, typer.Argument(help="The stream's type.")],
    stream_id: Annotated[str, typer.Argument(help="The stream's id.")],
    database: Database = None,
    retain_last: RetainLast = 0,
    retain_younger_than: RetainYounger = None,
    dry_run: DryRun = False,
    archive: ArchiveDir = None,
    decider_module: DeciderModules = None,
    json_: JsonOut = False,
) -> None:
    """Compact one stream, in this process."""
    policy = policy_of(retain_last, retain_younger_than, dry_run)
    import_deciders(decider_module)
    if get_source(stream_type) is None:  # an application's aggregates, or else:
        get_registration(stream_type)  # an unknown type is a usage error, not a result
    trash = open_archive(archive)
    _warn_unarchived(trash, [stream_type])
    store = open_store(database)
    result = LocalCompactors(store, SqlSnapshotStore(store.engine), policy, trash).compact(
        stream_type, stream_id
    )
    if result.outcome == Outcome.NOTHING_TO_COMPACT and result.head_version == 0:
        where = store.engine.url.render_as_string(hide_password=True)
        err.print(
            f"error: no stream {stream_type}/{stream_id} in {mask_url(where)}: check the "
            "type and id (eskit-tasks candidates lists the streams)",
            markup=False,
        )
        raise typer.Exit(Exit.FAILED_STREAMS)
    print_result(result, json_)
    if not result.ok:
        raise typer.Exit(Exit.FAILED_STREAMS)


@app.command()
def log(
    database: Database = None,
    stream_type: Annotated[str | None, typer.Option("--stream-type")] = None,
    stream_id: Annotated[str | None, typer.Option("--stream-id")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    run: Annotated[
        str | None, typer.Option("--run", help="Only the compactions of this run.")
    ] = None,
    json_: JsonOut = False,
) -> None:
    """Show the compaction audit log, newest first."""
    store = open_store(database, read_only=True)
    print_log(store.compaction_log(stream_type, stream_id, limit=limit, run_id=run), json_)


@app.command()
def runs(
    database: Database = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 20,
    json_: JsonOut = False,
) -> None:
    """List recent runs, newest first: who started each, when, its outcomes, events
    deleted and the disk space its end reclaimed (measured)."""
    store = open_store(database, read_only=True)
    try:
        found = recent_runs(store.engine, limit)
    finally:
        store.engine.dispose()
    print_runs(found, json_)


@app.command("verify-snapshots")
def verify_snapshots_cmd(
    database: Database = None,
    stream_types: StreamTypes = None,
    decider_modules: DeciderModules = None,
    json_: JsonOut = False,
) -> None:
    """Check that the deciders about to be deployed can read every verified snapshot
    (hash, schema marker, upcasters, strict decode); exit 4 if any cannot. Read-only."""
    import_deciders(decider_modules)
    store = open_store(database, read_only=True)
    snapshots = SqlSnapshotStore(store.engine, create_tables=False)
    report = verify_snapshots(snapshots, stream_types=stream_types)
    print_snapshot_report(report, json_)
    if not report.ok:
        raise typer.Exit(Exit.FAILED_STREAMS)


def _warn_unarchived(trash: Archive | None, stream_types: Sequence[str] | None) -> None:
    """Say so when an archive is given but applications' aggregates are compacted too:
    the trash bin does not cover them (their results carry no archive_uri)."""
    if trash is None:
        return
    for name in registered_sources():
        if stream_types is None or name in stream_types:
            err.print(
                f"warning: the trash bin does not cover application {name}: its deleted "
                "events are not archived"
            )


class LocalCompactors:
    """One Compactor per stream type, made from its registration on first use; a type
    without a registered decider gives each of its streams a ``failed`` result."""

    def __init__(
        self,
        store: EventStore,
        snapshots: SnapshotStore,
        policy: CompactionPolicy,
        archive: Archive | None = None,
        *,
        run_id: str | None = None,
    ):
        self.store, self.snapshots, self.policy = store, snapshots, policy
        self.archive = archive
        self.run_id = run_id
        engine = getattr(store, "engine", None)
        self.quarantine = (
            SqlQuarantine(engine, get_settings().quarantine_rules) if engine is not None else None
        )
        self._by_type: dict[str, Compactor[Any] | SourceCompactor | ConfigurationError] = {}

    def compactor_for(
        self, stream_type: str
    ) -> Compactor[Any] | SourceCompactor | ConfigurationError:
        """The compactor of ``stream_type`` (made once), or why there is none."""
        found = self._by_type.get(stream_type)
        if found is None:
            found = self._by_type[stream_type] = self._make(stream_type)
        return found

    def compact(self, stream_type: str, stream_id: str) -> CompactionResult:
        found = self.compactor_for(stream_type)
        if isinstance(found, ConfigurationError):
            return CompactionResult.failed(
                stream_type,
                stream_id,
                str(found),
                error_type=type(found).__name__,
                compaction_id="-",
            )
        if isinstance(found, Compactor):
            result = found.compact(stream_type, stream_id, run_id=self.run_id)
        else:
            result = found.compact(stream_id, run_id=self.run_id)
        note_outcome(self.quarantine, result)
        return result

    def _make(self, stream_type: str) -> Compactor[Any] | SourceCompactor | ConfigurationError:
        try:
            source = get_source(stream_type)
            if source is not None:  # a pyeventsourcing application's aggregates
                return source.compactor(self.policy)
            reg = get_registration(stream_type)
        except ConfigurationError as exc:
            return exc
        return reg.compactor(self.store, self.snapshots, self.policy, archive=self.archive)


@app.command("reclaim")
def reclaim_cmd(
    database: Database = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Rewrite the tables smaller (PostgreSQL VACUUM FULL, SQLite VACUUM): "
            "an exclusive lock while it runs.",
        ),
    ] = False,
    decider_module: DeciderModules = None,
    json_: JsonOut = False,
) -> None:
    """Give the space of deleted events back and show the measured sizes.

    PostgreSQL: VACUUM (ANALYZE) of the events and snapshots tables, which makes the
    space of deleted rows reusable (the files keep their size); --full rewrites them
    smaller under an ACCESS EXCLUSIVE lock (pg_repack does it online). Free space is
    measured when the pgstattuple extension is installed. SQLite: checkpoint the WAL
    and shrink the file where it allows (--full: VACUUM). The applications registered
    by --decider-module (pyeventsourcing on PostgreSQL) are vacuumed too.
    """
    import_deciders(decider_module)
    store = open_store(database)
    if full:
        err.print(f"warning: {FULL_LOCK_WARNING.get(store.engine.dialect.name, '')}")
    try:
        reports: dict[str, Any] = {
            "store": reclaim(store.engine, store_tables(store.engine), full=full)
        }
    finally:
        store.engine.dispose()
    for name in registered_sources():
        source = get_source(name)
        if source is not None:
            reports[f"app {name}"] = source.reclaim(full=full)
    if json_:
        emit_json({k: None if r is None else r.as_json() for k, r in reports.items()})
        return
    for name, r in reports.items():
        if r is None:
            out.print(f"{name}: not vacuumed (SQLite: freed pages are reused by new events)")
        else:
            print_reclaim(name, r)


def record_local_end(
    store: SqlEventStore,
    run_id: str,
    totals: RunTotals,
    *,
    reclaim: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """Record the end of a run made in this process (its start is recorded already)."""
    sql_runs.record_end(
        store.engine,
        run_id,
        candidates=totals.streams,
        done=totals.streams,
        outcomes=totals.outcomes,
        events_deleted=sum(totals.deleted_by_type.values()),
        reclaim=reclaim,
        error=None if error is None else mask_url(error),
    )


def record_stopped(
    store: SqlEventStore, run_id: str, totals: RunTotals, exc: BaseException
) -> None:
    """Record a local run that an exception stopped, so it is not shown running."""
    with contextlib.suppress(EskitError):
        record_local_end(store, run_id, totals, error=f"stopped: {type(exc).__name__}: {exc}")


def reclaim_here(store: SqlEventStore, deleted_by_type: dict[str, int]) -> dict[str, Any] | None:
    """The end of a run made in this process: reclaim what it deleted, unless nothing
    was deleted or ESKIT_RECLAIM=off."""
    if not deleted_by_type or get_settings().reclaim != "auto":
        return None
    return reclaim_after_run(store.engine, deleted_by_type)


def compact_all_here(
    database: str | None,
    policy: CompactionPolicy,
    min_events: int,
    stream_types: Sequence[str] | None,
    max_streams: int | None,
    decider_module: Sequence[str] | None,
    json_: bool,
    archive: str | None = None,
) -> None:
    """``compact-all --local``: walk the candidates once, compacting each in turn."""
    import_deciders(decider_module)
    trash = open_archive(archive)
    _warn_unarchived(trash, stream_types)
    store = open_store(database)
    check_stream_types(stream_types, store, compacted_here=True)
    run_id = new_run_id()
    arguments = {
        **policy.model_dump(mode="json", exclude_defaults=True),
        "min_events": min_events,
        "stream_types": None if stream_types is None else list(stream_types),
        "max_streams": max_streams,
    }
    sql_runs.record_start(store.engine, run_id, "local", arguments)
    compactors = LocalCompactors(
        store, SqlSnapshotStore(store.engine), policy, trash, run_id=run_id
    )
    totals = RunTotals()
    started = time.perf_counter()
    todo = iter_candidates(
        store,
        min_events=min_events,
        retain_last=policy.retain_last,
        stream_types=stream_types,
        limit=max_streams,
        skip=None if compactors.quarantine is None else compactors.quarantine.held,
    )
    stopped: EskitError | None = None
    with progress_bar(json_) as progress:
        task = progress.add_task(work_label(policy.dry_run), total=None)
        try:
            for c in todo:
                result = compactors.compact(c.stream_type, c.stream_id)
                totals.add(result)
                if json_:
                    emit_result_line(result)
                progress.advance(task)
        except EskitError as exc:  # a source that cannot be paged: report what was done
            stopped = exc
        except BaseException as exc:  # Ctrl-C, a bug: the run's record says it stopped
            record_stopped(store, run_id, totals, exc)
            raise
        deleted = totals.deleted_by_type
        if deleted:
            progress.update(task, description="reclaiming space")
        reclaimed = reclaim_here(store, deleted)
    record_local_end(
        store, run_id, totals, reclaim=reclaimed, error=None if stopped is None else str(stopped)
    )
    store.engine.dispose()
    report_results(
        totals,
        time.perf_counter() - started,
        json_,
        extra={"run_id": run_id, "deleted_by_type": deleted, "reclaim": reclaimed},
        json_lines=True,
    )
    if stopped is not None:
        err.print(
            f"error: the run stopped after {totals.streams} streams: {mask_url(str(stopped))}"
        )
    if stopped is not None or not totals.ok:
        raise typer.Exit(Exit.FAILED_STREAMS)
