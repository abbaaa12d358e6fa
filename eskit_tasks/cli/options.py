"""The Typer app, the exit statuses and the options the commands share."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Annotated

import typer

from eskit_tasks.core.registry import import_decider_modules
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.fleet.settings import get_settings
from eskit_tasks.stores.sql import SqlEventStore


class Exit(IntEnum):
    """The command line's exit statuses."""

    OK = 0
    ERROR = 1
    USAGE = 2
    UNAVAILABLE = 3
    FAILED_STREAMS = 4


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


def policy_of(retain_last: int, retain_younger_than: str | None, dry_run: bool) -> CompactionPolicy:
    """The policy the flags describe (InvalidPolicyError, a usage error, if invalid)."""
    return CompactionPolicy(
        retain_last=retain_last, retain_younger_than=retain_younger_than, dry_run=dry_run
    )


def open_store(database: str | None) -> SqlEventStore:
    """The event store at ``--database``, else at ESKIT_DATABASE_URL."""
    return SqlEventStore.from_url(database or get_settings().database_url)


def import_deciders(extra: Sequence[str] | None) -> None:
    """Import ESKIT_DECIDER_MODULES and the ``--decider-module`` flags."""
    import_decider_modules([*get_settings().decider_module_list, *(extra or [])])
