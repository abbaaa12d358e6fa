"""Commands for what lives beside compaction: the store's consumers, and the trash bin
(restore a stream's deleted events, purge old archive entries)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from eskit_tasks.cli.options import Database, Exit, JsonOut, app, open_archive, open_store
from eskit_tasks.cli.render import emit_json, err, out
from eskit_tasks.core.restore import restore as restore_stream
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.ports import Archive

ArchiveArg = Annotated[
    str | None,
    typer.Option("--archive", help="The trash bin directory (default: ESKIT_ARCHIVE_URL)."),
]


@app.command()
def consumers(database: Database = None, json_: JsonOut = False) -> None:
    """List the store's consumers, their checkpoints and how far behind they are.
    Read-only."""
    store = open_store(database, read_only=True)
    last = store.last_position()
    found = [(c, store.events_after(c.position, c.stream_types)) for c in store.consumers()]
    if json_:
        emit_json(
            {
                "last_position": last,
                "consumers": [
                    {
                        "consumer": c.consumer,
                        "position": c.position,
                        "stream_types": None if c.stream_types is None else list(c.stream_types),
                        "events_behind": behind,
                        "updated_at": c.updated_at.isoformat(),
                    }
                    for c, behind in found
                ],
            }
        )
        return
    table = Table(
        "consumer",
        "position",
        "stream types",
        "events behind",
        "updated",
        title=f"{len(found)} consumers; last position {last:,}",
    )
    for c, behind in found:
        table.add_row(
            c.consumer,
            f"{c.position:,}",
            "all" if c.stream_types is None else ", ".join(c.stream_types),
            f"{behind:,}",
            c.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    out.print(table)
    if found:
        out.print("compaction keeps every event above the lowest checkpoint of a stream's readers")


@app.command("remove-consumer")
def remove_consumer(
    consumer: Annotated[str, typer.Argument(help="The consumer's name.")],
    database: Database = None,
    json_: JsonOut = False,
) -> None:
    """Forget a consumer that is gone for good: compaction no longer keeps events for it.
    Exit 1 if there is no such consumer."""
    store = open_store(database)
    known = {c.consumer: c for c in store.consumers()}.get(consumer)
    removed = store.remove_checkpoint(consumer)
    if json_:
        emit_json(
            {
                "consumer": consumer,
                "removed": removed,
                "position": None if known is None else known.position,
            }
        )
    elif removed:
        at = "" if known is None else f" (it had read up to position {known.position:,})"
        out.print(f"removed consumer {consumer}{at}; compaction no longer keeps events for it")
    else:
        err.print(f"error: there is no consumer named {consumer!r}; see eskit-tasks consumers")
    if not removed:
        raise typer.Exit(Exit.ERROR)


def _required_archive(archive: str | None) -> Archive:
    found = open_archive(archive)
    if found is None:
        raise ConfigurationError("no archive given: pass --archive DIR or set ESKIT_ARCHIVE_URL")
    return found


@app.command()
def restore(
    stream_type: Annotated[str, typer.Argument(help="The stream's type.")],
    stream_id: Annotated[str, typer.Argument(help="The stream's id.")],
    archive: ArchiveArg = None,
    database: Database = None,
    json_: JsonOut = False,
) -> None:
    """Put a compacted stream's archived events back (original versions and positions);
    the stream then replays from version 1. Refuses, changing nothing, if an archive is
    missing or altered or a version is taken."""
    trash = _required_archive(archive)
    store = open_store(database)
    done = restore_stream(store, stream_type, stream_id, archive=trash)
    if json_:
        emit_json(
            {
                "stream_type": done.stream_type,
                "stream_id": done.stream_id,
                "events_restored": done.events_restored,
                "compactions": list(done.compactions),
                "head_version": done.head_version,
            }
        )
        return
    out.print(
        f"restored {done.events_restored:,} events of {stream_type}/{stream_id} "
        f"(versions 1..{done.events_restored}, head {done.head_version}) from "
        f"{len(done.compactions)} archive entr{'y' if len(done.compactions) == 1 else 'ies'}; "
        "it replays from version 1 again"
    )


@app.command("purge-archive")
def purge_archive(
    keep: Annotated[
        str, typer.Option("--keep", help='Keep entries younger than this: "30d", "12h", "2w".')
    ],
    archive: ArchiveArg = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go.")] = False,
    json_: JsonOut = False,
) -> None:
    """Remove trash bin entries older than --keep (their events can no longer be
    restored), and incomplete leftovers of interrupted writes."""
    from eskit_tasks.stores.archive import LocalArchive, parse_keep

    age = parse_keep(keep)
    trash = _required_archive(archive)
    if not isinstance(trash, LocalArchive):  # pragma: no cover - only local archives ship
        raise ConfigurationError("purge-archive works on a local archive directory")
    gone = trash.purge(older_than=datetime.now(UTC) - age, dry_run=dry_run)
    if json_:
        emit_json(
            {
                "dry_run": dry_run,
                "removed": [
                    {
                        "compaction_id": e.compaction_id,
                        "stream_type": e.stream_type,
                        "stream_id": e.stream_id,
                        "written_at": e.written_at.isoformat(),
                        "uri": e.ref.uri,
                    }
                    for e in gone
                ],
            }
        )
        return
    verb = "would remove" if dry_run else "removed"
    out.print(
        f"{verb} {len(gone)} archive entr{'y' if len(gone) == 1 else 'ies'} older than {keep}"
    )
