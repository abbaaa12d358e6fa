"""A way back: put a compacted stream's archived events back, so that the full history
replays from version 1 again (after a decider bug is fixed, say).

Every compaction of the stream since its history last began at version 1 must have
been archived: the audit rows say where each entry is and its checksum; the entries are
read back and checked before anything is written, and the events go back in one
transaction (:meth:`~eskit_tasks.ports.EventStore.restore_events`), at their original
versions *and positions*. Original positions, because consumers that had read them
before the compaction (the gate made sure every consumer covering the stream had) must
not receive them again as new events; a consumer that registers after the restore reads
them in their original order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from eskit_tasks.domain.events import label_of
from eskit_tasks.errors import RestoreError
from eskit_tasks.ports import Archive, ArchivedEvent, CompactionRecord, EventStore

#: Audit rows read per stream when gathering its archives.
_MAX_COMPACTIONS = 100_000


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What a restore put back.

    Args:
        stream_type: The stream's type.
        stream_id: The stream's id.
        events_restored: Events put back (versions 1..this).
        compactions: The compactions undone, oldest first (their audit rows are marked
            restored).
        head_version: The stream's head, unchanged.
    """

    stream_type: str
    stream_id: str
    events_restored: int
    compactions: tuple[str, ...]
    head_version: int


def archived_compactions(
    store: EventStore, stream_type: str, stream_id: str
) -> tuple[list[CompactionRecord], int]:
    """The compactions a restore undoes (oldest first, together versions
    1..compaction point) and the compaction point.

    Raises:
        RestoreError: the stream does not exist or was never compacted, or a compaction
            in the chain was not archived (its events cannot come back).
    """
    label = label_of(stream_type, stream_id)
    info = store.stream_info(stream_type, stream_id)
    if info is None:
        raise RestoreError(f"restore {label}: no such stream; nothing changed")
    if info.compacted_through == 0:
        raise RestoreError(
            f"restore {label}: the stream holds its whole history (never compacted, or "
            "restored already); nothing to restore"
        )
    rows = store.compaction_log(stream_type, stream_id, limit=_MAX_COMPACTIONS)
    live = sorted((r for r in rows if r.restored_at is None), key=lambda r: r.from_version)
    chain, expected = [], 1
    for record in live:
        if record.from_version != expected or record.through_version > info.compacted_through:
            break
        if record.archive is None:
            raise RestoreError(
                f"restore {label}: compaction {record.compaction_id} deleted versions "
                f"{record.from_version}..{record.through_version} without an archive; they "
                "cannot be put back (configure an archive before compacting); nothing changed"
            )
        chain.append(record)
        expected = record.through_version + 1
    if expected != info.compacted_through + 1:
        raise RestoreError(
            f"restore {label}: the audit log accounts for versions 1..{expected - 1} of the "
            f"1..{info.compacted_through} compacted; nothing changed"
        )
    return chain, info.compacted_through


def restore(
    store: EventStore, stream_type: str, stream_id: str, *, archive: Archive
) -> RestoreResult:
    """Put back every event the stream's compactions deleted, from ``archive``.

    Afterwards the stream replays from version 1 (its snapshots are dropped), its head
    version is unchanged, a compaction in flight is fenced, and the audit rows are
    marked restored; compacting it again (with a fixed decider) works as before.

    Raises:
        RestoreError: nothing to restore, an entry not archived, missing or altered, the
            stream compacted again meanwhile, or a version or position taken. Nothing
            was changed.
        ArchiveError: an entry cannot be read back or fails its checksum (nothing changed).
    """
    chain, through = archived_compactions(store, stream_type, stream_id)
    label = label_of(stream_type, stream_id)
    refs = [r.archive for r in chain if r.archive is not None]

    def events() -> Iterator[ArchivedEvent]:
        for record, ref in zip(chain, refs, strict=True):
            expected = record.from_version
            for event in archive.read(ref):
                if event.version != expected or event.version > record.through_version:
                    raise RestoreError(
                        f"restore {label}: the archive of compaction {record.compaction_id} "
                        f"({ref.uri}) holds version {event.version} where "
                        f"{expected} was expected; nothing changed"
                    )
                expected += 1
                yield event

    restored = store.restore_events(
        stream_type,
        stream_id,
        events(),
        compacted_through=through,
        compaction_ids=[r.compaction_id for r in chain],
    )
    head = store.head_version(stream_type, stream_id)
    return RestoreResult(
        stream_type, stream_id, restored, tuple(r.compaction_id for r in chain), head
    )
