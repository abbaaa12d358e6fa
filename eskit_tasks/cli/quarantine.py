"""``eskit-tasks quarantine``: the streams whose compactions keep failing, which candidates
and fan-outs skip until their backoff ends (see eskit_tasks.domain.quarantine)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from eskit_tasks.cli.options import Database, Exit, JsonOut, app, open_store
from eskit_tasks.cli.render import emit_json, err, out
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.fleet.settings import get_settings
from eskit_tasks.stores.sql_quarantine import SqlQuarantine

quarantine_app = typer.Typer(
    help="Streams whose compactions keep failing: list them, release them.",
    no_args_is_help=True,
)
app.add_typer(quarantine_app, name="quarantine")


def _quarantine(database: str | None, *, read_only: bool) -> SqlQuarantine:
    store = open_store(database, read_only=read_only)
    return SqlQuarantine(store.engine, get_settings().quarantine_rules)


@quarantine_app.command("list")
def list_quarantine(
    database: Database = None,
    failing: Annotated[
        bool,
        typer.Option("--failing", help="Also streams with failures below the threshold."),
    ] = False,
    json_: JsonOut = False,
) -> None:
    """The quarantined streams, longest failing first: failures in a row, the last
    error, and when each is tried again. Read-only."""
    quarantine = _quarantine(database, read_only=True)
    try:
        found = quarantine.entries(quarantined_only=not failing)
    finally:
        quarantine.engine.dispose()
    if json_:
        emit_json([{**asdict(e), "quarantined": e.quarantined} for e in found])
        return
    now = datetime.now(UTC)
    table = Table(title=f"{len(found)} streams {'failing' if failing else 'quarantined'}")
    for name in ("stream", "failures", "last outcome", "retried", "last error"):
        table.add_column(name, overflow="fold")
    for e in found:
        retried = "-" if e.retry_after is None else e.retry_after.strftime("%Y-%m-%d %H:%M")
        if e.retry_after is not None and e.retry_after <= now:
            retried = "next run"
        table.add_row(
            f"{e.stream_type}/{e.stream_id}",
            str(e.failures),
            e.last_outcome,
            retried,
            (e.last_error or "")[:300],
        )
    out.print(table)
    if found and not failing:
        out.print(
            "fix the cause, then `eskit-tasks quarantine release TYPE ID` (or --all) to "
            "retry now; a stream that compacts is released by itself",
            highlight=False,
        )


@quarantine_app.command("release")
def release(
    stream_type: Annotated[str | None, typer.Argument(help="The stream's type.")] = None,
    stream_id: Annotated[str | None, typer.Argument(help="The stream's id.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Release every stream.")] = False,
    database: Database = None,
    json_: JsonOut = False,
) -> None:
    """Forget a stream's failures so the next run compacts it again (or --all). Exit 1
    if the stream was not quarantined."""
    if all_ == (stream_type is not None):
        raise ConfigurationError("give TYPE ID, or --all, to quarantine release")
    if stream_type is not None and stream_id is None:
        raise ConfigurationError("quarantine release needs TYPE and ID (or --all)")
    quarantine = _quarantine(database, read_only=False)
    try:
        if all_:
            released = quarantine.release_all()
            if json_:
                emit_json({"released": released})
            else:
                out.print(f"released {released} streams from quarantine")
            return
        assert stream_type is not None
        assert stream_id is not None
        done = quarantine.release(stream_type, stream_id)
    finally:
        quarantine.engine.dispose()
    if json_:
        emit_json({"stream_type": stream_type, "stream_id": stream_id, "released": done})
    elif done:
        out.print(f"released {stream_type}/{stream_id}; the next run compacts it again")
    else:
        err.print(f"error: {stream_type}/{stream_id} is not in quarantine")
    if not done:
        raise typer.Exit(Exit.ERROR)
