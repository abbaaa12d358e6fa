"""The Typer app, the exit statuses and the options the commands share."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy.engine import URL

from eskit_tasks.core.registry import import_decider_modules
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.errors import DatabaseNotReadyError
from eskit_tasks.fleet.settings import get_settings
from eskit_tasks.ports import Archive
from eskit_tasks.stores.engine import create_engine
from eskit_tasks.stores.migrate import require_current
from eskit_tasks.stores.sql import SqlEventStore


class Exit(IntEnum):
    """The command line's exit statuses."""

    OK = 0
    ERROR = 1
    USAGE = 2
    UNAVAILABLE = 3
    FAILED_STREAMS = 4
    #: Ctrl-C (128 + SIGINT, as shells report it).
    INTERRUPTED = 130


app = typer.Typer(
    name="eskit-tasks",
    help="Compact long-lived event-sourced streams: snapshot, verify, then delete.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

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
    typer.Option(
        "--retain-younger-than",
        help='Keep events younger than this: seconds ("90"), "30d", "1d12h", "2 weeks".',
    ),
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
ArchiveDir = Annotated[
    str | None,
    typer.Option(
        "--archive",
        help="Trash bin directory: deleted events are kept there first "
        "(default: ESKIT_ARCHIVE_URL; unset: none).",
    ),
]
EventsPerSecond = Annotated[
    float | None,
    typer.Option(
        "--max-events-per-second", min=0, help="Cap on events deleted per second, fleet-wide."
    ),
]
MaxConcurrent = Annotated[
    int | None,
    typer.Option("--max-concurrent", min=0, help="Cap on compactions at once, fleet-wide."),
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Verify in memory; delete nothing.")]
DeciderModules = Annotated[
    list[str] | None,
    typer.Option(
        "--decider-module",
        help="Module that calls register_decider (repeatable; adds to ESKIT_DECIDER_MODULES).",
    ),
]


def policy_of(retain_last: int, retain_younger_than: str | None, dry_run: bool) -> CompactionPolicy:
    """The policy the flags describe (InvalidPolicyError, a usage error, if invalid)."""
    return CompactionPolicy(
        retain_last=retain_last, retain_younger_than=retain_younger_than, dry_run=dry_run
    )


def open_store(database: str | None, *, read_only: bool = False) -> SqlEventStore:
    """The event store at ``--database``, else at ESKIT_DATABASE_URL.

    A read-only command's store changes nothing, tables included: it needs tables at
    this code's revision (DatabaseNotReadyError, a usage error, names init-db), and a
    SQLite file that does not exist is not created.
    """
    url = database or get_settings().database_url
    if not read_only:
        return SqlEventStore.from_url(url, origin=database_origin(database))
    store = SqlEventStore(create_engine(url, origin=database_origin(database)), create_tables=False)
    try:
        path = sqlite_file(store.engine.url)
        if path is not None and not path.exists():
            raise DatabaseNotReadyError(
                f"there is no SQLite database at {path}: not initialised: run "
                "eskit-tasks init-db (or check the path)"
            )
        require_current(store.engine)
    except BaseException:
        store.engine.dispose()
        raise
    return store


def database_origin(database: str | None) -> str:
    """Where the database URL of a command comes from, for its error messages."""
    return "--database" if database else "ESKIT_DATABASE_URL"


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def open_archive(archive: str | None) -> Archive | None:
    """The trash bin at ``--archive``, else at ESKIT_ARCHIVE_URL (None: neither is set)."""
    url = archive or get_settings().archive_url
    if not url:
        return None
    from eskit_tasks.stores.archive import archive_from_url

    return archive_from_url(url)


def import_deciders(extra: Sequence[str] | None) -> None:
    """Import ESKIT_DECIDER_MODULES and the ``--decider-module`` flags."""
    import_decider_modules(get_settings().decider_module_list)
    import_decider_modules(extra or [], source="--decider-module")
