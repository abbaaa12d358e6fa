"""The promise at its edges, on every backend.

Each test is one of the cases that broke it: a verified compaction that destroyed
information (equal is not indistinguishable), a state type that changed silently, a
snapshot changed by hand, a deletion reported as a failure. Each fails on the code
before the fix.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any, NoReturn

import pytest

from eskit_tasks.core import settlement as settlement_module
from eskit_tasks.core.compactor import Compactor
from eskit_tasks.core.loading import load_state
from eskit_tasks.domain.codec import StateCodec
from eskit_tasks.domain.events import NewEvent, RecordedEvent
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.domain.result import Outcome
from eskit_tasks.domain.schema import UNRECORDED
from eskit_tasks.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    SnapshotIntegrityError,
    SnapshotSchemaError,
)
from eskit_tasks.ports import CompactionRecord, DeletionPlan, StreamInfo
from eskit_tasks.testing.contracts.backend import Stores
from eskit_tasks.testing.contracts.helpers import (
    Proxy,
    error_of,
    seed,
    state_of,
    untouched,
    versions,
)
from eskit_tasks.testing.deciders import (
    Balances,
    BalanceV1,
    BalanceV2,
    Calendar,
    CalendarState,
    Ledger,
    RecentKeys,
    Reminder,
    Reminders,
    Renamed,
    Tagger,
    TagSet,
    Tickets,
    ledger_fold,
    pushes,
)


def compact(stores: Stores, decider: Any, state_type: Any, **kwargs: Any) -> Compactor[Any]:
    policy = CompactionPolicy(retain_last=kwargs.pop("retain_last", 0))
    return Compactor(
        store=kwargs.pop("store", stores.events),
        snapshot_store=stores.snapshots,
        decider=decider,
        state_type=state_type,
        policy=policy,
        **kwargs,
    )


def replay(decider: Any, events: list[NewEvent]) -> Any:
    """The state a decider folds from ``events`` with no store in between (the model)."""
    state = decider.initial_state()
    for version, e in enumerate(events, start=1):
        state = decider.evolve(
            state, RecordedEvent(version, e.type, e.data, e.metadata, datetime.now(UTC))
        )
    return state


class AdversarialContract:
    # 1. equal is not indistinguishable ------------------------------------------------

    def test_insertion_ordered_dict_survives_compaction_and_evicts_the_right_key(
        self, stores: Stores
    ) -> None:
        first = pushes("zeta", "alpha", "mid")  # not in sorted order
        stores.events.append("queue", "q", first, expected_version=0)
        result = compact(stores, RecentKeys(), dict).compact("queue", "q")
        assert result.outcome == Outcome.COMPACTED, result.error
        stores.events.append("queue", "q", pushes("beta"), expected_version=3)
        state, _ = load_state(stores.events, stores.snapshots, RecentKeys(), dict, "queue", "q")
        expected = replay(RecentKeys(), [*first, *pushes("beta")])
        assert (
            list(state.items())
            == list(expected.items())
            == [
                ("alpha", 2),
                ("mid", 3),
                ("beta", 4),
            ]
        )

    def test_zoneinfo_datetime_in_a_model_fails_verification_and_keeps_every_event(
        self, stores: Stores
    ) -> None:
        events = [
            NewEvent("Scheduled", {"at": "2026-01-10T09:00:00", "zone": "Europe/Berlin"}),
            NewEvent("Postponed", {"days": 1}),
        ]
        stores.events.append("reminder", "r", events, expected_version=0)
        result = compact(stores, Reminders(), Reminder).compact("reminder", "r")
        assert result.outcome == Outcome.VERIFICATION_FAILED
        assert "reminder/r" in error_of(result) and "at $.due (time zone)" in error_of(result)
        assert "ZoneInfo('Europe/Berlin')" in error_of(result) and "fixed offset" in error_of(
            result
        )
        assert versions(stores, "reminder", "r") == [1, 2]
        assert stores.snapshots.latest("reminder", "r") is None
        # Folding on from the events is still right 120 days later, across DST.
        stores.events.append(
            "reminder", "r", [NewEvent("Postponed", {"days": 120})], expected_version=2
        )
        state, _ = load_state(
            stores.events, stores.snapshots, Reminders(), Reminder, "reminder", "r"
        )
        assert state.due is not None
        offset = state.due.utcoffset()
        assert offset is not None and offset.total_seconds() == 7200

    def test_enum_in_a_plain_dict_fails_verification_so_the_stream_stays_loadable(
        self, stores: Stores
    ) -> None:
        stores.events.append(
            "ticket", "t", [NewEvent("Changed", {"status": "closed"})], expected_version=0
        )
        result = compact(stores, Tickets(), dict).compact("ticket", "t")
        assert result.outcome == Outcome.VERIFICATION_FAILED
        assert "at $['status'] (type)" in error_of(result)
        assert "(Status)" in error_of(result) and "'closed' (str)" in error_of(result)
        stores.events.append(
            "ticket", "t", [NewEvent("Changed", {"status": "open"})], expected_version=1
        )
        state, version = load_state(stores.events, stores.snapshots, Tickets(), dict, "ticket", "t")
        assert (state["history"], version) == (["OPEN", "CLOSED"], 2)

    def test_a_snapshot_that_would_decode_differently_is_caught_with_a_retained_tail_too(
        self, stores: Stores
    ) -> None:
        stores.events.append(
            "ticket", "t", [NewEvent("Changed", {"status": "closed"})] * 3, expected_version=0
        )
        result = compact(stores, Tickets(), dict, retain_last=1).compact("ticket", "t")
        assert result.outcome == Outcome.VERIFICATION_FAILED
        assert versions(stores, "ticket", "t") == [1, 2, 3]

    def test_a_set_in_a_typed_state_compacts_and_loads_whatever_its_iteration_order(
        self, stores: Stores
    ) -> None:
        # Removals and re-additions leave the set iterating in another order than a set
        # built afresh from its members (and the order differs between processes).
        kept = {290, 5, 100, 37, 64, 250}
        events = [NewEvent("Tag", {"add": n}) for n in range(300)]
        events += [NewEvent("Tag", {"remove": n}) for n in range(300) if n not in kept]
        stores.events.append("tags", "t", events, expected_version=0)
        first = compact(stores, Tagger(), TagSet).compact("tags", "t")
        assert first.outcome == Outcome.COMPACTED, first.error
        head = len(events)
        stores.events.append("tags", "t", [NewEvent("Tag", {"add": 99})], expected_version=head)
        state, version = load_state(stores.events, stores.snapshots, Tagger(), TagSet, "tags", "t")
        expected = replay(Tagger(), [*events, NewEvent("Tag", {"add": 99})])
        assert (state, version) == (expected, head + 1)
        again = compact(stores, Tagger(), TagSet).compact("tags", "t")
        assert again.outcome == Outcome.COMPACTED, again.error

    def test_datetime_keys_in_their_own_zone_fail_verification(self, stores: Stores) -> None:
        events = [NewEvent("Booked", {"at": "2026-01-10T09:00:00", "what": "dentist"})]
        stores.events.append("calendar", "c", events, expected_version=0)
        result = compact(stores, Calendar(), CalendarState).compact("calendar", "c")
        assert result.outcome == Outcome.VERIFICATION_FAILED, result
        assert "(time zone)" in error_of(result) and " key " in error_of(result)
        assert versions(stores, "calendar", "c") == [1]

    # 2. state type changes ------------------------------------------------------------

    def _compacted_v1(self, stores: Stores, **declared: Any) -> None:
        seed(stores, [5, 7], stream_type="balance")
        first = compact(stores, Balances(BalanceV1, **declared), BalanceV1, retain_last=0)
        assert first.compact("balance", "a-1").outcome == Outcome.COMPACTED
        seed(stores, [1], stream_type="balance")

    @pytest.mark.parametrize("new_type", [BalanceV2, Renamed], ids=["new-field", "renamed"])
    def test_a_changed_state_type_is_refused_not_decoded_with_defaults(
        self, stores: Stores, new_type: Any
    ) -> None:
        self._compacted_v1(stores)
        with pytest.raises(SnapshotSchemaError) as info:
            load_state(
                stores.events, stores.snapshots, Balances(new_type), new_type, "balance", "a-1"
            )
        text = str(info.value)
        assert "balance/a-1 snapshot at version 2" in text
        assert "written for another state schema" in text and "upcaster" in text
        result = compact(stores, Balances(new_type), new_type).compact("balance", "a-1")
        assert (result.outcome, result.error_type) == (Outcome.FAILED, "SnapshotSchemaError")
        assert versions(stores, "balance", "a-1") == [3]  # nothing more deleted

    def test_upcasters_by_version_are_applied_in_order_and_the_next_snapshot_is_current(
        self, stores: Stores
    ) -> None:
        self._compacted_v1(stores, state_version=1)
        v3 = Balances(
            BalanceV2,
            state_version=3,
            upcasters={
                1: lambda s: {**s, "deposits": -1},
                2: lambda s: {**s, "deposits": s["deposits"] + 3},  # v1 -> v2 -> v3
            },
        )
        state, version = load_state(
            stores.events, stores.snapshots, v3, BalanceV2, "balance", "a-1"
        )
        assert (state, version) == (BalanceV2(balance=13, deposits=3), 3)
        assert compact(stores, v3, BalanceV2).compact("balance", "a-1").outcome == "compacted"
        snap = stores.snapshots.latest("balance", "a-1")
        assert snap is not None and snap.marker == StateCodec(BalanceV2, version=3).marker
        # The new snapshot needs no upcaster any more.
        plain = Balances(BalanceV2, state_version=3)
        assert load_state(stores.events, stores.snapshots, plain, BalanceV2, "balance", "a-1")[
            0
        ] == BalanceV2(balance=13, deposits=3)

    def test_a_gap_in_the_upcaster_chain_is_refused(self, stores: Stores) -> None:
        self._compacted_v1(stores, state_version=1)
        v3 = Balances(BalanceV2, state_version=3, upcasters={2: lambda s: s})
        with pytest.raises(SnapshotSchemaError, match="no upcaster leads"):
            load_state(stores.events, stores.snapshots, v3, BalanceV2, "balance", "a-1")

    def test_an_upcaster_that_leaves_a_field_to_its_default_is_refused(
        self, stores: Stores
    ) -> None:
        self._compacted_v1(stores)
        old = StateCodec(BalanceV1).marker.fingerprint
        lazy = Balances(BalanceV2, upcasters={old: lambda s: s})
        with pytest.raises(SnapshotSchemaError, match=r"lacks \$\['deposits'\]"):
            load_state(stores.events, stores.snapshots, lazy, BalanceV2, "balance", "a-1")
        careful = Balances(BalanceV2, upcasters={old: lambda s: {**s, "deposits": 0}})
        state, _ = load_state(stores.events, stores.snapshots, careful, BalanceV2, "balance", "a-1")
        assert state == BalanceV2(balance=13, deposits=1)

    def test_same_state_version_with_another_shape_is_refused(self, stores: Stores) -> None:
        self._compacted_v1(stores, state_version=1)
        with pytest.raises(SnapshotSchemaError) as info:
            load_state(
                stores.events,
                stores.snapshots,
                Balances(BalanceV2, state_version=1),
                BalanceV2,
                "balance",
                "a-1",
            )
        assert "stored: state_version 1" in str(info.value)

    def test_an_upcaster_that_raises_is_reported_with_its_error(self, stores: Stores) -> None:
        self._compacted_v1(stores, state_version=1)
        broken = Balances(BalanceV2, state_version=2, upcasters={1: lambda s: s["nope"]})
        result = compact(stores, broken, BalanceV2).compact("balance", "a-1")
        assert result.error_type == "SnapshotSchemaError"
        assert "upcaster from state_version 1 raised KeyError" in error_of(result)

    def test_snapshots_record_their_schema_marker(self, stores: Stores) -> None:
        self._compacted_v1(stores, state_version=4)
        snap = stores.snapshots.latest("balance", "a-1")
        assert snap is not None
        assert (snap.fingerprint, snap.state_version) == (
            StateCodec(BalanceV1).marker.fingerprint,
            4,
        )
        assert snap.fingerprint != UNRECORDED

    # 3. a snapshot changed by hand ----------------------------------------------------

    def test_a_tampered_snapshot_is_refused_by_load_state_and_by_compaction(
        self, stores: Stores
    ) -> None:
        seed(stores, [1, 2, 3])
        assert compact(stores, Ledger(), dict).compact("account", "a-1").outcome == "compacted"
        seed(stores, [4])
        stores.tamper_snapshot("account", "a-1", 3, b'{"total":1000,"count":3,"last":3}')
        with pytest.raises(SnapshotIntegrityError) as info:
            state_of(stores)
        assert "account/a-1" in str(info.value) and "version 3" in str(info.value)
        assert info.value.version == 3
        result = compact(stores, Ledger(), dict).compact("account", "a-1")
        assert (result.outcome, result.error_type) == (Outcome.FAILED, "SnapshotIntegrityError")
        assert result.events_deleted == 0
        assert versions(stores, "account", "a-1") == [4]
        snap = stores.snapshots.latest("account", "a-1")
        assert snap is not None and snap.version == 3  # not replaced by a re-hashed one

    # 4. a deletion whose COMMIT reply was lost -----------------------------------------

    def test_a_lost_commit_reply_is_settled_from_the_audit_log(self, stores: Stores) -> None:
        seed(stores, list(range(1, 91)))
        real = stores.events.commit_compaction

        def commit_then_lose_the_reply(plan: DeletionPlan) -> NoReturn:
            real(plan)
            raise DatabaseUnavailableError("server closed the connection unexpectedly")

        store = Proxy(stores.events, commit_compaction=commit_then_lose_the_reply)
        result = compact(stores, Ledger(), dict, store=store, retain_last=10).compact(
            "account", "a-1"
        )
        assert (result.outcome, result.recovered, result.error) == (
            Outcome.COMPACTED,
            True,
            None,
        )
        [row] = stores.events.compaction_log("account", "a-1")
        assert (result.compaction_id, result.events_deleted) == (row.compaction_id, 80)
        assert (result.snapshot_version, result.events_retained) == (80, 10)
        assert (result.head_version, result.compacted_through_before) == (90, 0)
        assert result.state_hash == row.state_hash
        assert result.bytes_reclaimed == row.bytes_reclaimed > 0
        assert state_of(stores) == (ledger_fold(list(range(1, 91))), 90)

    def test_a_delete_that_did_not_commit_is_still_failed(self, stores: Stores) -> None:
        seed(stores, [1, 2, 3])

        def cut_off_before_commit(plan: DeletionPlan) -> NoReturn:
            raise DatabaseUnavailableError("connection refused")

        store = Proxy(stores.events, commit_compaction=cut_off_before_commit)
        result = compact(stores, Ledger(), dict, store=store).compact("account", "a-1")
        assert (result.outcome, result.error_type) == (Outcome.FAILED, "DatabaseUnavailableError")
        assert (result.events_deleted, result.recovered) == (0, False)
        untouched(stores, 3)

    def test_unknown_outcome_then_a_retry_with_the_same_id_reports_the_deletion_once(
        self, stores: Stores, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(settlement_module, "SETTLE_DELAYS_S", (0.0,))
        seed(stores, [1, 2, 3, 4])
        real = stores.events.commit_compaction
        down = itertools.count()
        committed: list[bool] = []

        def unreachable_once_committed(compaction_id: str) -> CompactionRecord | None:
            if not committed:
                return stores.events.find_compaction(compaction_id)
            next(down)
            raise DatabaseUnavailableError("database is down")

        def commit_then_go_down(plan: DeletionPlan) -> NoReturn:
            real(plan)
            committed.append(True)
            raise DatabaseUnavailableError("server closed the connection unexpectedly")

        store = Proxy(
            stores.events,
            commit_compaction=commit_then_go_down,
            find_compaction=unreachable_once_committed,
        )
        first = compact(stores, Ledger(), dict, store=store).compact(
            "account", "a-1", compaction_id="retry-me"
        )
        assert (first.outcome, first.error_type) == (Outcome.FAILED, "CommitOutcomeUnknownError")
        assert "compaction_id='retry-me'" in error_of(first) and next(down) == 2
        again = compact(stores, Ledger(), dict).compact("account", "a-1", compaction_id="retry-me")
        assert (again.outcome, again.recovered, again.events_deleted) == ("compacted", True, 4)
        assert again.compaction_id == "retry-me"
        assert len(stores.events.compaction_log("account", "a-1")) == 1
        # A third attempt reports the same deletion again; it never compacts twice.
        third = compact(stores, Ledger(), dict).compact("account", "a-1", compaction_id="retry-me")
        assert third.model_dump(exclude={"duration_ms"}) == again.model_dump(
            exclude={"duration_ms"}
        )

    def test_a_retry_whose_earlier_attempt_commits_while_it_waits_for_the_fence(
        self, stores: Stores
    ) -> None:
        # The earlier attempt's delete was committing: the retry's first look saw
        # nothing, its fence waited for that COMMIT, and the stream moved meanwhile.
        seed(stores, [1, 2, 3])
        real_fence = stores.events.acquire_fence
        earlier: list[Any] = []

        def fence_after_the_earlier_attempt_commits(
            stream_type: str, stream_id: str
        ) -> StreamInfo | None:
            if not earlier:
                earlier.append(
                    compact(stores, Ledger(), dict).compact(
                        stream_type, stream_id, compaction_id="same"
                    )
                )
            return real_fence(stream_type, stream_id)

        store = Proxy(stores.events, acquire_fence=fence_after_the_earlier_attempt_commits)
        retry = compact(stores, Ledger(), dict, store=store).compact(
            "account", "a-1", compaction_id="same"
        )
        assert (earlier[0].outcome, earlier[0].recovered) == (Outcome.COMPACTED, False)
        assert (retry.outcome, retry.recovered, retry.events_deleted) == ("compacted", True, 3)
        assert len(stores.events.compaction_log("account", "a-1")) == 1

    def test_a_compaction_id_of_another_stream_is_refused(self, stores: Stores) -> None:
        seed(stores, [1, 2], stream_id="a-1")
        seed(stores, [1, 2], stream_id="b-2")
        done = compact(stores, Ledger(), dict).compact("account", "a-1", compaction_id="x")
        assert done.outcome == "compacted"
        other = compact(stores, Ledger(), dict).compact("account", "b-2", compaction_id="x")
        assert (other.outcome, other.error_type) == (Outcome.FAILED, "ConfigurationError")
        assert versions(stores, "account", "b-2") == [1, 2]

    def test_a_compaction_id_reused_meanwhile_is_never_taken_for_this_deletion(
        self, stores: Stores
    ) -> None:
        seed(stores, list(range(1, 11)), stream_id="a-1")
        seed(stores, [1, 2, 3], stream_id="b-2")
        calls = itertools.count(1)

        def guard() -> None:  # just before a-1's delete, b-2 is compacted under a-1's id
            if next(calls) == 2:
                other = compact(stores, Ledger(), dict).compact(
                    "account", "b-2", compaction_id="shared"
                )
                assert other.outcome == Outcome.COMPACTED

        result = compact(stores, Ledger(), dict, guard=guard).compact(
            "account", "a-1", compaction_id="shared"
        )
        assert (result.outcome, result.recovered, result.events_deleted) == ("failed", False, 0)
        assert versions(stores, "account", "a-1") == list(range(1, 11))
        [row] = stores.events.compaction_log()
        assert (row.stream_id, row.compaction_id) == ("b-2", "shared")

    @pytest.mark.parametrize("bad", ["", "x" * 37, 7])
    def test_a_malformed_compaction_id_is_a_configuration_error(
        self, stores: Stores, bad: Any
    ) -> None:
        seed(stores, [1])
        with pytest.raises(ConfigurationError, match="compaction_id"):
            compact(stores, Ledger(), dict).compact("account", "a-1", compaction_id=bad)
        untouched(stores, 1)
