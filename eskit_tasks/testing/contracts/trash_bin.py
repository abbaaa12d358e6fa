"""The trash bin: a compaction archives what it deletes before the delete commits, and
:func:`~eskit_tasks.core.restore.restore` puts it back exactly, so that a decider bug
found after a compaction can be fixed and the full history replayed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from eskit_tasks.core.compactor import Compactor
from eskit_tasks.core.loading import load_state
from eskit_tasks.core.restore import restore
from eskit_tasks.domain.events import NewEvent, RecordedEvent
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.domain.result import Outcome
from eskit_tasks.errors import ArchiveError, ConcurrencyError, RestoreError
from eskit_tasks.ports import ArchivedEvent, ArchiveRef, StreamInfo
from eskit_tasks.stores.archive import LocalArchive
from eskit_tasks.stores.memory import InMemoryEventStore, InMemorySnapshotStore
from eskit_tasks.testing.contracts.backend import Stores
from eskit_tasks.testing.contracts.helpers import Proxy, versions


class Cart:
    """A shopping cart: items added and removed."""

    def initial_state(self) -> dict[str, Any]:
        return {"items": []}

    def evolve(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        items = list(state["items"])
        if event.type == "ItemAdded":
            items.append(event.data["sku"])
        elif event.type == "ItemRemoved" and event.data["sku"] in items:
            items.remove(event.data["sku"])
        return {"items": items}

    def decide(self, command: Any, state: dict[str, Any]) -> list[NewEvent]:
        return []


class BuggyCart(Cart):
    """Deterministic, verifies against itself, and wrong: it ignores ItemRemoved."""

    def evolve(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        if event.type == "ItemRemoved":
            return state
        return super().evolve(state, event)


def cart_events(n: int) -> list[NewEvent]:
    """``n`` events: each sku added, every third one removed again (odd payloads too)."""
    found = []
    for i in range(1, n + 1):
        if i % 3 == 0:
            found.append(NewEvent("ItemRemoved", {"sku": f"sku-{i - 1}"}, {"by": "ünï"}))
        else:
            found.append(NewEvent("ItemAdded", {"sku": f"sku-{i}", "qty": 10**18 + i, "k": {}}))
    return found


def _fill(stores: Stores, stream_id: str, n: int) -> None:
    for i, event in enumerate(cart_events(n)):
        stores.events.append("cart", stream_id, [event], expected_version=i)


def _compactor(stores: Stores, archive: Any, decider: Any = None, **policy: Any) -> Compactor[Any]:
    return Compactor(
        store=stores.events,
        snapshot_store=stores.snapshots,
        decider=decider or Cart(),
        state_type=dict,
        policy=CompactionPolicy(**policy),
        archive=archive,
    )


def _replay(stores: Stores, decider: Any, stream_id: str = "c-1") -> tuple[Any, int]:
    return load_state(stores.events, stores.snapshots, decider, dict, "cart", stream_id)


def _raw(stores: Stores, stream_id: str = "c-1") -> list[tuple[Any, ...]]:
    """Everything stored about each live event, as exactly as the port gives it."""
    return [
        (e.version, e.type, e.data, e.metadata, e.recorded_at, e.position)
        for e in stores.events.export("cart", stream_id, 1, 10**9)
    ]


class TrashBinContract:
    @pytest.fixture
    def archive(self, tmp_path: Path) -> LocalArchive:
        return LocalArchive(tmp_path / "trash")

    def test_the_deleted_events_are_in_the_archive_before_they_go(
        self, stores: Stores, archive: LocalArchive
    ) -> None:
        _fill(stores, "c-1", 30)
        before = _raw(stores)
        result = _compactor(stores, archive, retain_last=5).compact("cart", "c-1")
        assert result.outcome == Outcome.COMPACTED, result.error
        [row] = stores.events.compaction_log()
        assert row.archive is not None
        assert (result.archive_uri, row.archive.events) == (row.archive_uri, 25)
        kept = [
            (e.version, e.type, e.data, e.metadata, e.recorded_at, e.position)
            for e in archive.read(row.archive)
        ]
        assert kept == before[:25]
        assert _raw(stores) == before[25:]

    def test_a_buggy_decider_is_undone_by_restore(
        self, stores: Stores, archive: LocalArchive
    ) -> None:
        """Compact with a wrong decider twice, restore, and the fixed decider's full
        replay equals that of a copy that was never compacted."""
        _fill(stores, "c-1", 40)
        control = InMemoryEventStore()
        for i, event in enumerate(cart_events(40)):
            control.append("cart", "c-1", [event], expected_version=i)
        before = _raw(stores)
        first = _compactor(stores, archive, BuggyCart(), retain_last=20).compact("cart", "c-1")
        second = _compactor(stores, archive, BuggyCart(), retain_last=4).compact("cart", "c-1")
        assert (first.events_deleted, second.events_deleted) == (20, 16)
        wrong, _ = _replay(stores, Cart())
        expected = load_state(
            control, InMemorySnapshotStore(control.engine), Cart(), dict, "cart", "c-1"
        )
        assert wrong != expected[0]  # the bug is baked into the snapshot

        done = restore(stores.events, "cart", "c-1", archive=archive)
        assert (done.events_restored, done.head_version) == (36, 40)
        assert done.compactions == (first.compaction_id, second.compaction_id)
        assert _raw(stores) == before  # versions, types, data, metadata, times, positions
        info = _info(stores)
        assert (info.head_version, info.compacted_through) == (40, 0)
        assert _replay(stores, Cart()) == expected
        assert stores.snapshots.latest("cart", "c-1") is None
        assert all(r.restored_at is not None for r in stores.events.compaction_log())

        fixed = _compactor(stores, archive, Cart(), retain_last=4).compact("cart", "c-1")
        assert (fixed.outcome, fixed.events_deleted) == (Outcome.COMPACTED, 36)
        assert _replay(stores, Cart()) == expected
        with pytest.raises(ConcurrencyError):
            stores.events.append("cart", "c-1", cart_events(1), expected_version=39)

    def test_restore_refuses_when_a_compaction_was_not_archived(
        self, stores: Stores, archive: LocalArchive
    ) -> None:
        _fill(stores, "c-1", 20)
        _compactor(stores, None, retain_last=15).compact("cart", "c-1")
        _compactor(stores, archive, retain_last=5).compact("cart", "c-1")
        before = _raw(stores)
        with pytest.raises(RestoreError, match=r"versions 1\.\.5 without an archive"):
            restore(stores.events, "cart", "c-1", archive=archive)
        assert _raw(stores) == before
        assert _info(stores).compacted_through == 15

    def test_restore_refuses_an_altered_archive_and_changes_nothing(
        self, stores: Stores, archive: LocalArchive
    ) -> None:
        _fill(stores, "c-1", 20)
        _compactor(stores, archive, retain_last=10).compact("cart", "c-1")
        _compactor(stores, archive, retain_last=2).compact("cart", "c-1")
        newest = stores.events.compaction_log()[0].archive
        assert newest is not None
        path = Path(newest.uri.removeprefix("file://"))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        before = _raw(stores)
        with pytest.raises(ArchiveError):
            restore(stores.events, "cart", "c-1", archive=archive)
        assert _raw(stores) == before
        assert _info(stores).compacted_through == 18
        assert stores.snapshots.latest("cart", "c-1") is not None

    def test_restore_needs_something_to_restore(
        self, stores: Stores, archive: LocalArchive
    ) -> None:
        with pytest.raises(RestoreError, match="no such stream"):
            restore(stores.events, "cart", "nope", archive=archive)
        _fill(stores, "c-1", 3)
        with pytest.raises(RestoreError, match="nothing to restore"):
            restore(stores.events, "cart", "c-1", archive=archive)

    def test_restore_never_overwrites_and_fences_compactions_in_flight(
        self, stores: Stores, archive: LocalArchive
    ) -> None:
        _fill(stores, "c-1", 10)
        _fill(stores, "c-2", 3)
        _compactor(stores, archive, retain_last=2).compact("cart", "c-1")
        row = stores.events.compaction_log()[0]
        assert row.archive is not None
        events = list(archive.read(row.archive))
        taken = next(iter(stores.events.read("cart", "c-2"))).position
        clash = [*events[:-1], _with_position(events[-1], taken)]
        before, token = _raw(stores), _info(stores).fence_token
        with pytest.raises(RestoreError):
            stores.events.restore_events(
                "cart", "c-1", clash, compacted_through=8, compaction_ids=[row.compaction_id]
            )
        with pytest.raises(RestoreError, match=r"expected versions 1\.\.8"):
            stores.events.restore_events(
                "cart", "c-1", events[:-1], compacted_through=8, compaction_ids=[]
            )
        with pytest.raises(RestoreError, match="compacted through 8"):
            stores.events.restore_events(
                "cart", "c-1", events, compacted_through=7, compaction_ids=[]
            )
        assert _raw(stores) == before
        assert _info(stores).fence_token == token
        restore(stores.events, "cart", "c-1", archive=archive)
        assert _info(stores).fence_token == token + 1
        assert versions(stores, "cart", "c-1") == list(range(1, 11))

    def test_a_stale_copy_of_a_compaction_leaves_the_committed_entry_alone(
        self, stores: Stores, archive: LocalArchive
    ) -> None:
        """Two copies of one compaction (a redelivered task): the stale one pauses just
        before its archive write while the fresh one runs to the end. The stale copy's
        delete is fenced, and the committed deletion's entry must still read back, so
        restore still works."""
        _fill(stores, "c-1", 10)
        fresh: list[Any] = []

        def paused_write(**kw: Any) -> ArchiveRef:
            fresh.append(
                _compactor(stores, archive, retain_last=2).compact("cart", "c-1", compaction_id="x")
            )
            return archive.write(**kw)

        stale = _compactor(stores, Proxy(archive, write=paused_write), retain_last=2).compact(
            "cart", "c-1", compaction_id="x"
        )
        assert fresh[0].outcome == Outcome.COMPACTED, fresh[0].error
        assert (stale.outcome, stale.events_deleted) != (Outcome.COMPACTED, 8)
        after = _raw(stores)
        [row] = stores.events.compaction_log()
        assert row.archive is not None
        assert len(list(archive.read(row.archive))) == 8
        assert [e.ref for e in archive.entries()] == [row.archive]  # the stale one's is gone
        done = restore(stores.events, "cart", "c-1", archive=archive)
        assert done.events_restored == 8
        assert versions(stores, "cart", "c-1") == list(range(1, 11))
        assert _raw(stores)[8:] == after

    def test_a_refused_delete_leaves_no_archive_entry(
        self, stores: Stores, archive: LocalArchive
    ) -> None:
        """The archive entry of a deletion that did not commit (here a consumer registers
        at position 0 between the archive write and the delete) is removed again."""
        _fill(stores, "c-1", 10)

        def register_then_write(**kw: Any) -> ArchiveRef:
            ref = archive.write(**kw)
            stores.events.save_checkpoint("late-reader", 0)
            return ref

        result = _compactor(stores, Proxy(archive, write=register_then_write)).compact(
            "cart", "c-1"
        )
        assert result.outcome == Outcome.NOTHING_TO_COMPACT, result.error
        assert versions(stores, "cart", "c-1") == list(range(1, 11))
        assert list(archive.entries()) == []

    def test_a_guard_that_stops_after_the_archive_write_leaves_no_entry(
        self, stores: Stores, archive: LocalArchive
    ) -> None:
        """The guard (a lost lock, a spent time budget) stops the compaction between the
        archive write and the delete: nothing deleted, and the entry removed again."""
        _fill(stores, "c-1", 10)

        def guard() -> None:
            if list(archive.entries()):
                raise TimeoutError("the time budget is spent")

        result = Compactor(
            store=stores.events,
            snapshot_store=stores.snapshots,
            decider=Cart(),
            state_type=dict,
            archive=archive,
            guard=guard,
        ).compact("cart", "c-1")
        assert (result.outcome, result.error_type) == (Outcome.FAILED, "TimeoutError")
        assert versions(stores, "cart", "c-1") == list(range(1, 11))
        assert list(archive.entries()) == []

    def test_an_archive_that_cannot_discard_does_not_change_the_outcome(
        self, stores: Stores, archive: LocalArchive
    ) -> None:
        """A refused delete is reported as refused even when its entry cannot be removed
        (the entry stays for purge; nothing was deleted)."""
        _fill(stores, "c-1", 10)

        def register_then_write(**kw: Any) -> ArchiveRef:
            ref = archive.write(**kw)
            stores.events.save_checkpoint("late-reader", 0)
            return ref

        def broken_discard(ref: ArchiveRef) -> None:
            raise OSError("read-only file system")

        flaky = Proxy(archive, write=register_then_write, discard=broken_discard)
        result = _compactor(stores, flaky).compact("cart", "c-1")
        assert result.outcome == Outcome.NOTHING_TO_COMPACT, result.error
        assert result.held_back_by is not None
        assert len(list(archive.entries())) == 1
        assert versions(stores, "cart", "c-1") == list(range(1, 11))

    def test_an_archive_that_fails_stops_the_compaction_before_the_delete(
        self, stores: Stores, archive: LocalArchive
    ) -> None:
        _fill(stores, "c-1", 10)

        def broken(**_: Any) -> ArchiveRef:
            raise ArchiveError("disk full")

        result = _compactor(stores, Proxy(archive, write=broken)).compact("cart", "c-1")
        assert (result.outcome, result.error_type) == (Outcome.FAILED, "ArchiveError")
        assert versions(stores, "cart", "c-1") == list(range(1, 11))
        assert stores.events.compaction_log() == []

    def test_an_archive_that_holds_other_events_than_the_delete_is_refused(
        self, stores: Stores, archive: LocalArchive
    ) -> None:
        _fill(stores, "c-1", 10)

        def short(**kw: Any) -> ArchiveRef:
            kw["events"] = list(kw["events"])[:-1]
            return archive.write(**kw)

        result = _compactor(stores, Proxy(archive, write=short)).compact("cart", "c-1")
        assert result.outcome == Outcome.FAILED
        assert "holds 9 events" in (result.error or "")
        assert versions(stores, "cart", "c-1") == list(range(1, 11))


def _info(stores: Stores) -> StreamInfo:
    info = stores.events.stream_info("cart", "c-1")
    assert info is not None
    return info


def _with_position(event: ArchivedEvent, position: int) -> ArchivedEvent:
    return ArchivedEvent(
        event.version, event.type, event.data, event.metadata, event.recorded_at, position
    )
