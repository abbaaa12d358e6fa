"""What a compaction on the two ports must guarantee: the head kept, the cut, replay,
verification, the delete transaction, fencing, dry runs, isolation, idempotence,
``load_state`` unchanged, bad input refused."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import pytest

from eskit_tasks.core.compactor import Compactor
from eskit_tasks.domain.codec import StateCodec
from eskit_tasks.domain.events import NewEvent, RecordedEvent
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.errors import ConcurrencyError, InvalidPolicyError
from eskit_tasks.ports import DeletionPlan, Snapshot
from eskit_tasks.testing.contracts.backend import Stores
from eskit_tasks.testing.contracts.helpers import (
    ODD_IDS,
    Proxy,
    error_of,
    info_of,
    seed,
    state_of,
    untouched,
    versions,
)
from eskit_tasks.testing.deciders import (
    CountingLedger,
    Ledger,
    LedgerModel,
    LossyTagger,
    ModelLedger,
    MutatingLedger,
    ReorderingLedger,
    deposits,
    ledger_fold,
)


def compactor(
    stores: Stores, decider: Any = None, state_type: Any = dict, **policy: Any
) -> Compactor[Any]:
    return Compactor(
        store=stores.events,
        snapshot_store=stores.snapshots,
        decider=decider or Ledger(),
        state_type=state_type,
        policy=CompactionPolicy(**policy),
    )


class CompactorContract:
    # 1. head version preserved --------------------------------------------------------

    def test_full_compaction_keeps_head_and_optimistic_concurrency(self, stores: Stores) -> None:
        amounts = list(range(1, 21))
        seed(stores, amounts)
        result = compactor(stores).compact("account", "a-1")
        assert result.outcome == Outcome.COMPACTED, result.error
        assert (result.head_version, result.snapshot_version, result.events_deleted) == (20, 20, 20)
        assert versions(stores, "account", "a-1") == []
        assert stores.events.head_version("account", "a-1") == 20
        assert state_of(stores) == (ledger_fold(amounts), 20)
        for stale in (0, 19):
            with pytest.raises(ConcurrencyError):
                stores.events.append("account", "a-1", deposits(1), expected_version=stale)
        assert stores.events.append("account", "a-1", deposits(21), expected_version=20) == 21
        assert state_of(stores) == (ledger_fold([*amounts, 21]), 21)

    # 2. the cut -----------------------------------------------------------------------

    def test_retain_last_keeps_the_newest_events(self, stores: Stores) -> None:
        seed(stores, list(range(10)))
        result = compactor(stores, retain_last=3).compact("account", "a-1")
        assert result.outcome == Outcome.COMPACTED, result.error
        assert (result.snapshot_version, result.events_deleted, result.events_retained) == (7, 7, 3)
        assert versions(stores, "account", "a-1") == [8, 9, 10]

    def test_retain_last_covering_the_stream_is_nothing_to_compact(self, stores: Stores) -> None:
        seed(stores, [1, 2, 3])
        token_before = info_of(stores).fence_token
        result = compactor(stores, retain_last=3).compact("account", "a-1")
        assert result.outcome == Outcome.NOTHING_TO_COMPACT
        assert result.head_version == 3
        untouched(stores, 3)
        assert info_of(stores).fence_token == token_before

    def test_age_rule_cuts_at_newest_event_old_enough(self, stores: Stores) -> None:
        seed(stores, [1, 2, 3])
        old = list(stores.events.read("account", "a-1"))[-1].recorded_at
        seed(stores, [4, 5])
        young = list(stores.events.read("account", "a-1"))[-1].recorded_at
        assert young > old
        middle = old + (young - old) / 2
        c = Compactor(
            store=stores.events,
            snapshot_store=stores.snapshots,
            decider=Ledger(),
            state_type=dict,
            policy=CompactionPolicy(retain_younger_than=timedelta(days=30)),
            clock=lambda: middle + timedelta(days=30),
        )
        result = c.compact("account", "a-1")
        assert result.outcome == Outcome.COMPACTED, result.error
        assert result.snapshot_version == 3
        assert versions(stores, "account", "a-1") == [4, 5]

    def test_cut_is_the_minimum_of_both_rules(self, stores: Stores) -> None:
        seed(stores, list(range(10)))
        now = datetime.now(UTC)
        by_count = Compactor(
            store=stores.events,
            snapshot_store=stores.snapshots,
            decider=Ledger(),
            state_type=dict,
            policy=CompactionPolicy(retain_last=4, retain_younger_than=timedelta(hours=1)),
            clock=lambda: now + timedelta(hours=2),  # every event is old enough
        )
        assert by_count.compact("account", "a-1").snapshot_version == 6

    def test_no_event_old_enough_is_nothing_to_compact(self, stores: Stores) -> None:
        seed(stores, list(range(5)))
        result = compactor(stores, retain_younger_than=timedelta(days=1)).compact("account", "a-1")
        assert result.outcome == Outcome.NOTHING_TO_COMPACT
        untouched(stores, 5)

    def test_age_rule_keeps_old_looking_events_after_a_young_one(self, stores: Stores) -> None:
        """Clock skew: version 5 carries an old timestamp but comes after young version 4.
        The cut stops before the first young event, so nothing young is deleted."""
        seed(stores, list(range(6)))
        now = stores.events.now()
        for version, age in [(1, 10), (2, 9), (3, 8), (4, 0), (5, 7), (6, 6)]:
            stores.set_recorded_at("account", "a-1", version, now - timedelta(days=age))
        result = compactor(stores, retain_younger_than="2d").compact("account", "a-1")
        assert result.outcome == Outcome.COMPACTED, result.error
        assert result.snapshot_version == 3
        assert versions(stores, "account", "a-1") == [4, 5, 6]

    # 3. replay ------------------------------------------------------------------------

    def test_second_compaction_replays_from_the_snapshot_only(self, stores: Stores) -> None:
        seed(stores, list(range(10)))
        assert compactor(stores).compact("account", "a-1").outcome == Outcome.COMPACTED
        seed(stores, [100, 200])
        reads: list[tuple[int, int | None]] = []

        def read(
            stream_type: str,
            stream_id: str,
            *,
            from_version: int = 1,
            to_version: int | None = None,
        ) -> Iterator[RecordedEvent]:
            reads.append((from_version, to_version))
            return stores.events.read(
                stream_type, stream_id, from_version=from_version, to_version=to_version
            )

        spy = Proxy(stores.events, read=read)
        result = Compactor(
            store=spy, snapshot_store=stores.snapshots, decider=Ledger(), state_type=dict
        ).compact("account", "a-1")
        assert result.outcome == Outcome.COMPACTED, result.error
        assert min(lo for lo, _ in reads) == 11
        assert state_of(stores) == (ledger_fold([*range(10), 100, 200]), 12)

    def test_replay_streams_events_instead_of_loading_the_stream(self, stores: Stores) -> None:
        seed(stores, list(range(50)))
        pulled = 0
        pulled_at_evolve: list[int] = []

        def read(stream_type: str, stream_id: str, **kw: Any) -> Iterator[RecordedEvent]:
            nonlocal pulled
            for event in stores.events.read(stream_type, stream_id, **kw):
                pulled += 1
                yield event

        class Watching(Ledger):
            def evolve(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
                pulled_at_evolve.append(pulled)
                return super().evolve(state, event)

        spy = Proxy(stores.events, read=read)
        result = Compactor(
            store=spy, snapshot_store=stores.snapshots, decider=Watching(), state_type=dict
        ).compact("account", "a-1")
        assert result.outcome == Outcome.COMPACTED
        # Each event is folded as soon as it is read: never more than one read ahead.
        assert max(p - i for i, p in enumerate(pulled_at_evolve[:50], start=1)) == 0

    @pytest.mark.parametrize(
        ("damage", "message"),
        [
            ("gap", r"account/a-1: expected version 4, found 5"),
            ("undecodable", r"account/a-1 version 4: stored payload is not valid JSON"),
            ("evolve", r"account/a-1 version 4 \(Boom\): evolve raised RuntimeError"),
        ],
    )
    def test_bad_stream_fails_naming_version_and_changes_nothing(
        self, stores: Stores, damage: str, message: str
    ) -> None:
        if damage == "evolve":
            seed(stores, [1, 2, 3])
            stores.events.append("account", "a-1", [NewEvent(type="Boom")], expected_version=3)
            seed(stores, [5, 6])
        else:
            seed(stores, [1, 2, 3, 4, 5, 6])
        if damage == "gap":
            stores.remove_event("account", "a-1", 4)
        before = versions(stores, "account", "a-1")
        if damage == "undecodable":
            stores.corrupt_event("account", "a-1", 4, '{"amount": ')
        result = compactor(stores).compact("account", "a-1")
        if damage == "undecodable":  # repair it, to read the stream back
            stores.corrupt_event("account", "a-1", 4, '{"amount": 4}')
        assert result.outcome == Outcome.FAILED
        assert result.error is not None
        assert re.search(message, result.error), result.error
        assert versions(stores, "account", "a-1") == before
        assert stores.snapshots.latest("account", "a-1") is None
        assert stores.snapshots.read("account", "a-1", 6) is None
        assert stores.events.compaction_log() == []

    def test_missing_verified_snapshot_at_the_compaction_point_fails(self, stores: Stores) -> None:
        seed(stores, list(range(6)))
        assert compactor(stores, retain_last=2).compact("account", "a-1").outcome == "compacted"
        seed(stores, [6, 7])
        hidden = Proxy(stores.snapshots, latest=lambda stream_type, stream_id: None)
        result = Compactor(
            store=stores.events, snapshot_store=hidden, decider=Ledger(), state_type=dict
        ).compact("account", "a-1")
        assert result.outcome == Outcome.FAILED
        assert "compacted through 4 but the newest verified snapshot is at none" in error_of(result)
        assert versions(stores, "account", "a-1") == [5, 6, 7, 8]

    def test_missing_head_event_fails(self, stores: Stores) -> None:
        seed(stores, list(range(6)))
        stores.remove_event("account", "a-1", 6)
        result = compactor(stores, retain_last=2).compact("account", "a-1")
        assert result.outcome == Outcome.FAILED
        assert "expected events up to version 6, the stream ends at 5" in error_of(result)
        assert versions(stores, "account", "a-1") == [1, 2, 3, 4, 5]

    def test_undecodable_base_snapshot_fails_without_deleting(self, stores: Stores) -> None:
        seed(stores, [1, 2, 3, 4])
        assert compactor(stores, retain_last=1).compact("account", "a-1").outcome == "compacted"
        seed(stores, [5, 6])
        # The state type changed in a way the stored snapshot cannot be decoded as.
        result = compactor(stores, Ledger(), list).compact("account", "a-1")
        assert result.outcome == Outcome.FAILED
        assert result.error_type == "SnapshotSchemaError"
        assert "written for another state schema" in error_of(result)
        assert versions(stores, "account", "a-1") == [4, 5, 6]

    # 4. verification ------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("decider", "state_type"),
        [(Ledger(), dict), (MutatingLedger(), dict), (ModelLedger(), LedgerModel)],
        ids=["dict", "mutating", "pydantic-model"],
    )
    def test_state_hash_is_sha256_of_the_stored_snapshot(
        self, stores: Stores, decider: Any, state_type: Any
    ) -> None:
        seed(stores, [3, 4, 5, 6])
        result = compactor(stores, decider, state_type, retain_last=1).compact("account", "a-1")
        assert result.outcome == Outcome.COMPACTED, result.error
        stored = stores.snapshots.latest("account", "a-1")
        assert stored is not None and stored.verified and stored.version == 3
        assert result.state_hash == hashlib.sha256(stored.state).hexdigest()
        expected = {"total": 12, "count": 3, "last": 3}
        # The stored bytes keep the state's own key order (the fold's, the model's fields).
        assert stored.state == json.dumps(expected, separators=(",", ":")).encode()
        snap_state = StateCodec(state_type).decode(stored.state)
        assert snap_state == (expected if state_type is dict else LedgerModel(**expected))
        state, version = state_of(stores, decider=decider, state_type=state_type)
        assert version == 4
        assert state == (
            ledger_fold([3, 4, 5, 6])
            if state_type is dict
            else LedgerModel(**ledger_fold([3, 4, 5, 6]))
        )

    def test_lossy_codec_is_verification_failed_and_deletes_nothing(self, stores: Stores) -> None:
        stores.events.append(
            "account",
            "a-1",
            [NewEvent(type="Tagged", data={"tag": t}) for t in "abc"],
            expected_version=0,
        )
        result = compactor(stores, LossyTagger(), dict).compact("account", "a-1")
        assert result.outcome == Outcome.VERIFICATION_FAILED
        assert "round trip" in error_of(result) and "'tags'" in error_of(result)
        assert (result.events_deleted, result.bytes_reclaimed) == (0, 0)
        untouched(stores, 3)

    def test_nondeterministic_evolve_fails_tail_verification(self, stores: Stores) -> None:
        seed(stores, list(range(6)))
        result = compactor(stores, CountingLedger(), dict, retain_last=2).compact("account", "a-1")
        assert result.outcome == Outcome.VERIFICATION_FAILED
        assert "snapshot at 4 + events 5..6 is not the full replay at 6" in error_of(result)
        assert "'calls'" in error_of(result)
        untouched(stores, 6)

    def test_a_tail_replay_equal_but_in_another_key_order_fails_verification(
        self, stores: Stores
    ) -> None:
        seed(stores, list(range(6)))
        result = compactor(stores, ReorderingLedger(), dict, retain_last=2).compact(
            "account", "a-1"
        )
        assert result.outcome == Outcome.VERIFICATION_FAILED
        assert "is not the full replay at 6" in error_of(result) and "key order" in error_of(result)
        untouched(stores, 6)

    @pytest.mark.parametrize("damage", ["bytes", "hash"])
    def test_snapshot_that_reads_back_different_is_not_trusted(
        self, stores: Stores, damage: str
    ) -> None:
        seed(stores, list(range(5)))

        def read(stream_type: str, stream_id: str, version: int) -> Snapshot | None:
            snap = stores.snapshots.read(stream_type, stream_id, version)
            return (
                None
                if snap is None
                else type(snap)(
                    snap.version,
                    snap.state.replace(b"10", b"11") if damage == "bytes" else snap.state,
                    snap.state_hash if damage == "bytes" else "0" * 64,
                    False,
                    snap.created_at,
                )
            )

        spy = Proxy(stores.snapshots, read=read)
        result = Compactor(
            store=stores.events, snapshot_store=spy, decider=Ledger(), state_type=dict
        ).compact("account", "a-1")
        assert result.outcome == Outcome.VERIFICATION_FAILED
        assert "not the bytes written" in error_of(result)
        untouched(stores, 5)

    # 5. the delete transaction --------------------------------------------------------

    def test_audit_row_describes_the_deletion(self, stores: Stores) -> None:
        seed(stores, list(range(8)))
        first = compactor(stores, retain_last=3).compact("account", "a-1")
        seed(stores, [1, 1])
        second = compactor(stores, retain_last=1).compact("account", "a-1")
        newest, oldest = stores.events.compaction_log("account", "a-1")
        assert (oldest.compaction_id, oldest.from_version, oldest.through_version) == (
            first.compaction_id,
            1,
            5,
        )
        assert (oldest.events_deleted, oldest.head_version, oldest.state_hash) == (
            5,
            8,
            first.state_hash,
        )
        assert oldest.bytes_reclaimed == first.bytes_reclaimed > 0
        assert (newest.from_version, newest.through_version, newest.snapshot_version) == (6, 9, 9)
        assert (newest.events_deleted, newest.compaction_id) == (4, second.compaction_id)
        assert newest.compacted_at >= oldest.compacted_at

    def test_row_count_mismatch_rolls_back_to_failed(self, stores: Stores) -> None:
        seed(stores, list(range(6)))
        tokens: list[int] = []

        def save(stream_type: str, stream_id: str, snapshot: Snapshot, *, fence_token: int) -> None:
            tokens.append(fence_token)
            stores.snapshots.save(stream_type, stream_id, snapshot, fence_token=fence_token)
            stores.remove_event(stream_type, stream_id, 2)  # rows vanish behind our back

        spy = Proxy(stores.snapshots, save=save)
        result = Compactor(
            store=stores.events, snapshot_store=spy, decider=Ledger(), state_type=dict
        ).compact("account", "a-1")
        assert result.outcome == Outcome.FAILED
        assert "would remove 5 events, the plan says 6" in error_of(result)
        assert versions(stores, "account", "a-1") == [1, 3, 4, 5, 6]
        assert stores.snapshots.latest("account", "a-1") is None
        info = info_of(stores)
        # Refused before anything changed: no further fence was taken to settle it.
        assert (info.compacted_through, info.fence_token) == (0, tokens[0])

    # 6. fencing -----------------------------------------------------------------------

    def test_compaction_overtaken_before_snapshot_write_is_fenced(self, stores: Stores) -> None:
        seed(stores, list(range(10)))
        rival: list[CompactionResult] = []

        def save(stream_type: str, stream_id: str, snapshot: Snapshot, *, fence_token: int) -> None:
            # This worker pauses here; meanwhile another one compacts the stream fully.
            rival.append(compactor(stores).compact(stream_type, stream_id))
            stores.snapshots.save(stream_type, stream_id, snapshot, fence_token=fence_token)

        slow = Compactor(
            store=stores.events,
            snapshot_store=Proxy(stores.snapshots, save=save),
            decider=Ledger(),
            state_type=dict,
            policy=CompactionPolicy(retain_last=2),
        )
        result = slow.compact("account", "a-1")
        assert rival[0].outcome == Outcome.COMPACTED
        assert result.outcome == Outcome.FENCED
        assert "stale" in error_of(result)
        latest = stores.snapshots.latest("account", "a-1")
        assert latest is not None and latest.version == 10, "the newer snapshot stays"
        assert [r.compaction_id for r in stores.events.compaction_log("account", "a-1")] == [
            rival[0].compaction_id
        ]
        assert state_of(stores) == (ledger_fold(list(range(10))), 10)

    def test_compaction_overtaken_between_snapshot_write_and_read_back_is_fenced(
        self, stores: Stores
    ) -> None:
        """The soak's paused worker: it wrote its snapshot, then a rival compacted the
        stream further and removed that snapshot. Reading back finds it missing: the
        outcome is fenced (a stale worker), not verification_failed, and nothing of the
        rival's work is undone."""
        seed(stores, list(range(10)))
        rival: list[CompactionResult] = []

        def read(stream_type: str, stream_id: str, version: int) -> Snapshot | None:
            if not rival:
                seed(stores, [5, 5])
                rival.append(compactor(stores).compact(stream_type, stream_id))
            return stores.snapshots.read(stream_type, stream_id, version)

        slow = Compactor(
            store=stores.events,
            snapshot_store=Proxy(stores.snapshots, read=read),
            decider=Ledger(),
            state_type=dict,
            policy=CompactionPolicy(retain_last=2),
        )
        result = slow.compact("account", "a-1")
        assert rival[0].outcome == Outcome.COMPACTED
        assert result.outcome == Outcome.FENCED, result.error
        assert "missing" in error_of(result) and "stale" in error_of(result)
        assert result.events_deleted == 0
        assert [r.compaction_id for r in stores.events.compaction_log("account", "a-1")] == [
            rival[0].compaction_id
        ]
        latest = stores.snapshots.latest("account", "a-1")
        assert latest is not None and latest.version == 12
        assert state_of(stores) == (ledger_fold([*range(10), 5, 5]), 12)

    def test_a_snapshot_missing_on_read_back_without_a_rival_is_verification_failed(
        self, stores: Stores
    ) -> None:
        """No newer compaction, yet the snapshot is not there: that is a store that does
        not keep what it was given, and stays verification_failed."""
        seed(stores, list(range(5)))
        spy = Proxy(stores.snapshots, read=lambda stream_type, stream_id, version: None)
        result = Compactor(
            store=stores.events, snapshot_store=spy, decider=Ledger(), state_type=dict
        ).compact("account", "a-1")
        assert result.outcome == Outcome.VERIFICATION_FAILED, result.error
        assert "missing" in error_of(result)
        untouched(stores, 5)

    def test_compaction_overtaken_before_delete_is_fenced(self, stores: Stores) -> None:
        seed(stores, list(range(10)))
        rival: list[CompactionResult] = []
        rival_token: list[int] = []

        def commit_compaction(plan: DeletionPlan) -> int:
            rival.append(compactor(stores, retain_last=5).compact("account", "a-1"))
            rival_token.append(info_of(stores).fence_token)
            return stores.events.commit_compaction(plan)

        slow = Compactor(
            store=Proxy(stores.events, commit_compaction=commit_compaction),
            snapshot_store=stores.snapshots,
            decider=Ledger(),
            state_type=dict,
        )
        result = slow.compact("account", "a-1")
        assert rival[0].outcome == Outcome.COMPACTED
        assert result.outcome == Outcome.FENCED
        # A refused delete changed nothing: no new fence is taken from the rival.
        assert info_of(stores).fence_token == rival_token[0]
        assert versions(stores, "account", "a-1") == [6, 7, 8, 9, 10]
        assert len(stores.events.compaction_log("account", "a-1")) == 1
        assert state_of(stores) == (ledger_fold(list(range(10))), 10)

    def test_events_deleted_under_a_running_replay_is_fenced_not_failed(
        self, stores: Stores
    ) -> None:
        seed(stores, list(range(10)))
        rival: list[CompactionResult] = []

        def read(
            stream_type: str,
            stream_id: str,
            *,
            from_version: int = 1,
            to_version: int | None = None,
        ) -> Iterator[RecordedEvent]:
            if from_version > 1 and not rival:  # second segment: the rival deletes it first
                rival.append(compactor(stores).compact(stream_type, stream_id))
            return stores.events.read(
                stream_type, stream_id, from_version=from_version, to_version=to_version
            )

        slow = Compactor(
            store=Proxy(stores.events, read=read),
            snapshot_store=stores.snapshots,
            decider=Ledger(),
            state_type=dict,
            policy=CompactionPolicy(retain_last=3),
        )
        result = slow.compact("account", "a-1")
        assert rival[0].outcome == Outcome.COMPACTED
        assert result.outcome == Outcome.FENCED, result.error

    def test_a_stream_gone_when_the_fence_is_taken_is_fenced(self, stores: Stores) -> None:
        seed(stores, [1, 2])
        gone = Proxy(stores.events, acquire_fence=lambda stream_type, stream_id: None)
        result = Compactor(
            store=gone, snapshot_store=stores.snapshots, decider=Ledger(), state_type=dict
        ).compact("account", "a-1")
        assert result.outcome == Outcome.FENCED and "disappeared" in error_of(result)
        untouched(stores, 2)

    # 7. dry run -----------------------------------------------------------------------

    def test_dry_run_reports_what_would_go_and_writes_nothing(self, stores: Stores) -> None:
        seed(stores, list(range(12)))
        token = info_of(stores).fence_token
        result = compactor(stores, retain_last=2, dry_run=True).compact("account", "a-1")
        assert result.outcome == Outcome.DRY_RUN, result.error
        assert (result.snapshot_version, result.events_deleted, result.events_retained) == (
            10,
            10,
            2,
        )
        assert result.bytes_reclaimed > 10 * len('{"amount":1}')
        assert result.state_hash is not None
        untouched(stores, 12)
        assert info_of(stores).fence_token == token
        real = compactor(stores, retain_last=2).compact("account", "a-1")
        assert (real.events_deleted, real.bytes_reclaimed, real.state_hash) == (
            result.events_deleted,
            result.bytes_reclaimed,
            result.state_hash,
        )

    def test_dry_run_verifies_the_tail_too(self, stores: Stores) -> None:
        seed(stores, list(range(6)))
        result = compactor(stores, CountingLedger(), dict, retain_last=2, dry_run=True).compact(
            "account", "a-1"
        )
        assert result.outcome == Outcome.VERIFICATION_FAILED
        assert (result.events_deleted, result.bytes_reclaimed) == (0, 0)

    def test_dry_run_still_detects_a_lossy_codec(self, stores: Stores) -> None:
        stores.events.append(
            "account", "a-1", [NewEvent(type="Tagged", data={"tag": "x"})], expected_version=0
        )
        result = compactor(stores, LossyTagger(), dict, dry_run=True).compact("account", "a-1")
        assert result.outcome == Outcome.VERIFICATION_FAILED

    # 8. isolation ---------------------------------------------------------------------

    def test_only_the_one_stream_is_touched(self, stores: Stores) -> None:
        neighbours = [
            ("account", "a-10"),
            ("account", "a_1"),
            ("account", "a-"),
            ("accounts", "a-1"),
            ("Account", "a-1"),
            ("account", "A-1"),
        ]
        for stream_type, stream_id in neighbours:
            stores.events.append(stream_type, stream_id, deposits(1, 2, 3), expected_version=0)
        seed(stores, [5, 5, 5])
        assert compactor(stores).compact("account", "a-1").outcome == Outcome.COMPACTED
        for stream_type, stream_id in neighbours:
            assert versions(stores, stream_type, stream_id) == [1, 2, 3]
            assert stores.snapshots.latest(stream_type, stream_id) is None
            assert stores.events.compaction_log(stream_type, stream_id) == []

    @pytest.mark.parametrize("stream_id", ODD_IDS)
    def test_odd_ids_compact_like_any_other(self, stores: Stores, stream_id: str) -> None:
        seed(stores, [1, 2, 3, 4], stream_id=stream_id)
        seed(stores, [7], stream_id=stream_id + "%")
        result = compactor(stores, retain_last=1).compact("account", stream_id)
        assert result.outcome == Outcome.COMPACTED, result.error
        assert result.stream_id == stream_id
        assert versions(stores, "account", stream_id) == [4]
        assert versions(stores, "account", stream_id + "%") == [1]
        assert state_of(stores, stream_id) == (ledger_fold([1, 2, 3, 4]), 4)
        [row] = stores.events.compaction_log("account", stream_id)
        assert row.stream_id == stream_id

    # 9. idempotence -------------------------------------------------------------------

    def test_compacting_again_without_new_events_is_nothing_to_compact(
        self, stores: Stores
    ) -> None:
        seed(stores, list(range(5)))
        assert compactor(stores, retain_last=1).compact("account", "a-1").outcome == "compacted"
        again = compactor(stores, retain_last=1).compact("account", "a-1")
        assert again.outcome == Outcome.NOTHING_TO_COMPACT
        assert (again.head_version, again.compacted_through_before) == (5, 4)
        assert len(stores.events.compaction_log("account", "a-1")) == 1

    # 10. load_state -------------------------------------------------------------------

    def test_load_state_is_the_same_before_and_after(self, stores: Stores) -> None:
        amounts = [5, -2, 7, 1, 1, 9]
        seed(stores, amounts)
        before = state_of(stores)
        assert before == (ledger_fold(amounts), 6)
        compactor(stores, retain_last=2).compact("account", "a-1")
        assert state_of(stores) == before
        assert state_of(stores, "nobody") == (Ledger().initial_state(), 0)

    def test_load_state_ignores_unverified_snapshots(self, stores: Stores) -> None:
        seed(stores, [1, 2, 3])

        class Crash(BaseException):
            """The process dies: no cleanup code runs."""

        def commit_compaction(plan: DeletionPlan) -> NoReturn:
            raise Crash

        with pytest.raises(Crash):
            Compactor(
                store=Proxy(stores.events, commit_compaction=commit_compaction),
                snapshot_store=stores.snapshots,
                decider=Ledger(),
                state_type=dict,
            ).compact("account", "a-1")
        leftover = stores.snapshots.read("account", "a-1", 3)
        assert leftover is not None and not leftover.verified
        assert stores.snapshots.latest("account", "a-1") is None
        assert state_of(stores) == (ledger_fold([1, 2, 3]), 3)
        # and the next compaction replaces it and completes
        assert compactor(stores).compact("account", "a-1").outcome == Outcome.COMPACTED
        assert state_of(stores) == (ledger_fold([1, 2, 3]), 3)

    def test_failure_after_the_snapshot_write_removes_the_snapshot(self, stores: Stores) -> None:
        seed(stores, [1, 2, 3])

        def commit_compaction(plan: DeletionPlan) -> NoReturn:
            raise RuntimeError("database said no")

        result = Compactor(
            store=Proxy(stores.events, commit_compaction=commit_compaction),
            snapshot_store=stores.snapshots,
            decider=Ledger(),
            state_type=dict,
        ).compact("account", "a-1")
        assert (result.outcome, result.error_type) == (Outcome.FAILED, "RuntimeError")
        assert "database said no" in error_of(result)
        assert (result.events_deleted, result.bytes_reclaimed) == (0, 0)
        untouched(stores, 3)

    # 11. bad input --------------------------------------------------------------------

    @pytest.mark.parametrize(
        "bad",
        [
            {"retain_last": -1},
            {"retain_last": "many"},
            {"retain_younger_than": timedelta(seconds=-1)},
            {"dry_run": "perhaps"},
            {"dry_run": 1},
            {"retain_last": True},
            {"retain_last": 2.5},
            {"retain_younger_than": "soon"},
            {"keep": 3},
        ],
    )
    def test_invalid_policy_is_a_value_error_before_any_io(self, stores: Stores, bad: Any) -> None:
        seed(stores, [1, 2])
        with pytest.raises(ValueError, match="invalid compaction policy") as info:
            compactor(stores, **bad)
        assert isinstance(info.value, InvalidPolicyError)
        untouched(stores, 2)

    def test_policy_must_be_a_policy(self, stores: Stores) -> None:
        with pytest.raises(InvalidPolicyError):
            Compactor(
                store=stores.events,
                snapshot_store=stores.snapshots,
                decider=Ledger(),
                state_type=dict,
                policy={"retain_last": 1},  # type: ignore[arg-type]
            )

    def test_unknown_stream_is_nothing_to_compact_with_head_zero(self, stores: Stores) -> None:
        result = compactor(stores).compact("account", "nobody")
        assert (result.outcome, result.head_version) == (Outcome.NOTHING_TO_COMPACT, 0)
        assert stores.events.stream_info("account", "nobody") is None

    def test_result_round_trips_as_json(self, stores: Stores) -> None:
        seed(stores, [1, 2])
        result = compactor(stores).compact("account", "a-1")
        again = CompactionResult.model_validate_json(result.model_dump_json())
        assert again == result
        assert result.duration_ms > 0
        assert len(result.compaction_id) == 36
