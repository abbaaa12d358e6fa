"""The :class:`~eskit_tasks.ports.EventStore` contract: appends and optimistic concurrency,
reads, payload encoding, odd ids, fencing and the delete transaction driven directly."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, computed_field

from eskit_tasks.domain.codec import state_hash
from eskit_tasks.domain.events import NewEvent
from eskit_tasks.errors import (
    ConcurrencyError,
    ConfigurationError,
    DeletionMismatchError,
    EventDecodeError,
    FencedError,
    StoreError,
)
from eskit_tasks.ports import DeletionPlan, Snapshot
from eskit_tasks.testing.contracts.backend import Stores
from eskit_tasks.testing.contracts.helpers import ODD_IDS, versions
from eskit_tasks.testing.deciders import deposits


@dataclass
class Priced:
    price: float


class Level(Enum):
    LOW = 1.0
    INFINITE = float("inf")


class PricedModel(BaseModel):
    price: float


class RatioModel(BaseModel):
    """A computed field is stored too: its NaN must be caught."""

    total: float = 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ratio(self) -> float:
        return self.total / self.total if self.total else float("nan")


class PricedExtras(BaseModel):
    model_config = ConfigDict(extra="allow")
    price: float


class EventStoreContract:
    def test_append_returns_new_head_and_read_gives_events_oldest_first(
        self, stores: Stores
    ) -> None:
        before = datetime.now(UTC)
        assert stores.events.append("account", "a-1", deposits(5, 7), expected_version=0) == 2
        assert (
            stores.events.append(
                "account",
                "a-1",
                [NewEvent(type="Withdrawn", data={"amount": 3}, metadata={"user": "u1"})],
                expected_version=2,
            )
            == 3
        )
        read = list(stores.events.read("account", "a-1"))
        assert [(e.version, e.type, e.data) for e in read] == [
            (1, "Deposited", {"amount": 5}),
            (2, "Deposited", {"amount": 7}),
            (3, "Withdrawn", {"amount": 3}),
        ]
        assert read[2].metadata == {"user": "u1"}
        assert read[0].metadata == {}
        for e in read:
            assert e.recorded_at.tzinfo is not None
            assert e.recorded_at.utcoffset() == timedelta(0)
            assert before - timedelta(seconds=1) <= e.recorded_at <= datetime.now(UTC)
            assert e.stored_bytes > 0

    def test_head_version_is_zero_for_unknown_stream(self, stores: Stores) -> None:
        assert stores.events.head_version("account", "nobody") == 0
        assert list(stores.events.read("account", "nobody")) == []
        assert stores.events.stream_info("account", "nobody") is None

    def test_read_is_lazy_iterator_not_list(self, stores: Stores) -> None:
        stores.events.append("account", "a-1", deposits(1, 2, 3), expected_version=0)
        it = stores.events.read("account", "a-1")
        assert iter(it) is it
        assert next(it).version == 1

    def test_read_range_is_inclusive(self, stores: Stores) -> None:
        stores.events.append("account", "a-1", deposits(*range(10)), expected_version=0)
        assert versions(stores, "account", "a-1", from_version=4, to_version=6) == [4, 5, 6]
        assert versions(stores, "account", "a-1", from_version=9) == [9, 10]
        assert versions(stores, "account", "a-1", from_version=11) == []

    @pytest.mark.parametrize("expected", [0, 1, 3])
    def test_wrong_expected_version_raises_concurrency_error(
        self, stores: Stores, expected: int
    ) -> None:
        stores.events.append("account", "a-1", deposits(1, 2), expected_version=0)
        with pytest.raises(ConcurrencyError, match="head is 2"):
            stores.events.append("account", "a-1", deposits(3), expected_version=expected)
        assert stores.events.head_version("account", "a-1") == 2
        assert versions(stores, "account", "a-1") == [1, 2]

    def test_appending_to_missing_stream_with_nonzero_version_fails(self, stores: Stores) -> None:
        with pytest.raises(ConcurrencyError):
            stores.events.append("account", "a-1", deposits(1), expected_version=1)
        assert stores.events.head_version("account", "a-1") == 0

    def test_empty_append_checks_version_and_writes_nothing(self, stores: Stores) -> None:
        assert stores.events.append("account", "a-1", [], expected_version=0) == 0
        assert stores.events.stream_info("account", "a-1") is None
        stores.events.append("account", "a-1", deposits(1), expected_version=0)
        assert stores.events.append("account", "a-1", [], expected_version=1) == 1
        with pytest.raises(ConcurrencyError):
            stores.events.append("account", "a-1", [], expected_version=0)

    @pytest.mark.parametrize("bad", [-1, True, 1.0, "1", None])
    def test_invalid_expected_version_is_rejected_before_io(self, stores: Stores, bad: Any) -> None:
        with pytest.raises(ConfigurationError, match="expected_version"):
            stores.events.append("account", "a-1", deposits(1), expected_version=bad)
        assert stores.events.head_version("account", "a-1") == 0

    def test_unserialisable_payload_writes_nothing(self, stores: Stores) -> None:
        batch = [*deposits(1), NewEvent(type="Bad", data={"when": object()})]
        with pytest.raises(ConfigurationError, match=r"event 2 .*not JSON-serialisable"):
            stores.events.append("account", "a-1", batch, expected_version=0)
        assert stores.events.head_version("account", "a-1") == 0
        assert list(stores.events.read("account", "a-1")) == []

    @pytest.mark.parametrize(
        ("bad", "path"),
        [
            (float("nan"), r"\$\['v'\]"),
            (float("inf"), r"\$\['v'\]"),
            ([1.0, float("-inf")], r"\$\['v'\]\[1\]"),
            # Inside a dataclass, an enum and a pydantic model orjson would write null.
            ({"at": Priced(float("nan"))}, r"\$\['v'\]\['at'\]\.price"),
            ((Priced(1.0), Level.INFINITE), r"\$\['v'\]\[1\]"),
            ([{"m": PricedModel(price=float("inf"))}], r"\$\['v'\]\[0\]\['m'\]\.price"),
            (RatioModel(), r"\$\['v'\]\.ratio"),
            ({"m": PricedExtras(price=1.0, tip=float("nan"))}, r"\$\['v'\]\['m'\]\.tip"),
        ],
    )
    def test_non_finite_numbers_are_refused_not_stored_as_null(
        self, stores: Stores, bad: Any, path: str
    ) -> None:
        for where in ("data", "metadata"):
            event = NewEvent(type="X", **{where: {"v": bad}})
            with pytest.raises(ConfigurationError, match=rf"{path} is NaN or Infinity"):
                stores.events.append("account", "a-1", [*deposits(1), event], expected_version=0)
            assert stores.events.head_version("account", "a-1") == 0
        stores.events.append(
            "account", "a-1", [NewEvent(type="X", data={"v": None})], expected_version=0
        )

    def test_dataclasses_enums_and_models_in_payloads_are_stored_as_json(
        self, stores: Stores
    ) -> None:
        data = {"p": Priced(2.5), "level": Level.LOW, "m": PricedModel(price=1.0)}
        stores.events.append("account", "a-1", [NewEvent("X", data)], expected_version=0)
        [event] = stores.events.read("account", "a-1")
        assert event.data == {"p": {"price": 2.5}, "level": 1.0, "m": {"price": 1.0}}

    def test_concurrent_appends_with_same_expected_version_one_wins(self, stores: Stores) -> None:
        stores.events.append("account", "a-1", deposits(1), expected_version=0)
        barrier = threading.Barrier(4)
        outcomes: list[str] = []

        def writer(n: int) -> None:
            barrier.wait()
            try:
                stores.events.append("account", "a-1", deposits(n), expected_version=1)
                outcomes.append("ok")
            except ConcurrencyError:
                outcomes.append("conflict")

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcomes) == ["conflict", "conflict", "conflict", "ok"]
        assert versions(stores, "account", "a-1") == [1, 2]

    def test_concurrent_creates_one_wins(self, stores: Stores) -> None:
        barrier = threading.Barrier(3)
        outcomes: list[str] = []

        def writer() -> None:
            barrier.wait()
            try:
                stores.events.append("account", "new", deposits(1), expected_version=0)
                outcomes.append("ok")
            except ConcurrencyError:
                outcomes.append("conflict")

        threads = [threading.Thread(target=writer) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcomes) == ["conflict", "conflict", "ok"]
        assert stores.events.head_version("account", "new") == 1

    @pytest.mark.parametrize("stream_id", ODD_IDS)
    def test_ids_are_data(self, stores: Stores, stream_id: str) -> None:
        stores.events.append("account", stream_id, deposits(1, 2), expected_version=0)
        stores.events.append("account", stream_id + "x", deposits(9), expected_version=0)
        stores.events.append("acc'ount%", stream_id, deposits(8), expected_version=0)
        assert [e.data["amount"] for e in stores.events.read("account", stream_id)] == [1, 2]
        assert stores.events.head_version("account", stream_id) == 2
        assert stores.events.head_version("acc'ount%", stream_id) == 1

    def test_prefix_sharing_ids_and_types_are_separate_streams(self, stores: Stores) -> None:
        stores.events.append("account", "a-1", deposits(1), expected_version=0)
        stores.events.append("account", "a-10", deposits(2, 2), expected_version=0)
        stores.events.append("accounts", "a-1", deposits(3, 3, 3), expected_version=0)
        assert stores.events.head_version("account", "a-1") == 1
        assert stores.events.head_version("account", "a-10") == 2
        assert stores.events.head_version("accounts", "a-1") == 3

    def test_undecodable_payload_raises_naming_stream_and_version(self, stores: Stores) -> None:
        stores.events.append("account", "a-1", deposits(1, 2, 3), expected_version=0)
        stores.corrupt_event("account", "a-1", 2, "{not json")
        it = stores.events.read("account", "a-1")
        assert next(it).version == 1
        with pytest.raises(EventDecodeError, match="account/a-1 version 2") as info:
            next(it)
        assert info.value.version == 2

    def test_oldest_version_after_cutoff(self, stores: Stores) -> None:
        stores.events.append("account", "a-1", deposits(1, 2), expected_version=0)
        now = stores.events.now()
        assert stores.events.oldest_version_after("account", "a-1", now + timedelta(days=1)) is None
        assert stores.events.oldest_version_after("account", "a-1", now - timedelta(days=1)) == 1
        assert stores.events.oldest_version_after("account", "zz", now - timedelta(days=1)) is None

    def test_store_clock_is_the_clock_that_stamps_events(self, stores: Stores) -> None:
        before = stores.events.now()
        stores.events.append("account", "a-1", deposits(1), expected_version=0)
        after = stores.events.now()
        [event] = stores.events.read("account", "a-1")
        assert before.utcoffset() is not None
        assert before - timedelta(seconds=1) <= event.recorded_at <= after + timedelta(seconds=1)

    def test_naive_cutoff_is_a_configuration_error(self, stores: Stores) -> None:
        stores.events.append("account", "a-1", deposits(1), expected_version=0)
        with pytest.raises(ConfigurationError, match="timezone-aware"):
            stores.events.oldest_version_after("account", "a-1", datetime.now())

    def test_expected_version_beyond_64_bits_is_rejected(self, stores: Stores) -> None:
        with pytest.raises(ConfigurationError, match="expected_version"):
            stores.events.append("account", "a-1", deposits(1), expected_version=2**63)

    def test_fence_tokens_are_monotonic_per_stream(self, stores: Stores) -> None:
        stores.events.append("account", "a-1", deposits(1), expected_version=0)
        stores.events.append("account", "a-2", deposits(1), expected_version=0)
        first = stores.events.acquire_fence("account", "a-1")
        second = stores.events.acquire_fence("account", "a-1")
        assert first is not None and second is not None
        assert second.fence_token > first.fence_token
        other = stores.events.acquire_fence("account", "a-2")
        assert other is not None and other.fence_token == 1
        assert stores.events.acquire_fence("account", "missing") is None

    # -- commit_compaction, driven directly --------------------------------------------

    def _prepare(self, stores: Stores, n: int = 5, c: int = 3) -> DeletionPlan:
        stores.events.append("account", "a-1", deposits(*range(n)), expected_version=0)
        info = stores.events.acquire_fence("account", "a-1")
        assert info is not None
        body = b'{"c":3}'
        stores.snapshots.save(
            "account",
            "a-1",
            Snapshot(c, body, state_hash(body), False, datetime.now(UTC)),
            fence_token=info.fence_token,
        )
        return DeletionPlan(
            stream_type="account",
            stream_id="a-1",
            fence_token=info.fence_token,
            compacted_through_before=0,
            through_version=c,
            head_version=n,
            expected_deleted=c,
            state_hash=state_hash(body),
            bytes_reclaimed=123,
            compaction_id="cid-1",
        )

    def test_commit_deletes_through_cut_and_keeps_head(self, stores: Stores) -> None:
        plan = self._prepare(stores)
        assert stores.events.commit_compaction(plan) == 3
        assert versions(stores, "account", "a-1") == [4, 5]
        info = stores.events.stream_info("account", "a-1")
        assert info is not None
        assert (info.head_version, info.compacted_through) == (5, 3)
        latest = stores.snapshots.latest("account", "a-1")
        assert latest is not None and latest.verified and latest.version == 3
        [row] = stores.events.compaction_log("account", "a-1")
        assert (row.from_version, row.through_version, row.events_deleted) == (1, 3, 3)
        assert (row.compaction_id, row.state_hash, row.bytes_reclaimed) == (
            "cid-1",
            plan.state_hash,
            123,
        )

    def test_commit_with_stale_token_is_fenced_and_deletes_nothing(self, stores: Stores) -> None:
        plan = self._prepare(stores)
        stores.events.acquire_fence("account", "a-1")  # a newer compaction starts
        with pytest.raises(FencedError, match="stale"):
            stores.events.commit_compaction(plan)
        assert versions(stores, "account", "a-1") == [1, 2, 3, 4, 5]
        assert stores.events.compaction_log("account", "a-1") == []

    def test_commit_without_the_snapshot_deletes_nothing(self, stores: Stores) -> None:
        plan = self._prepare(stores)
        stores.snapshots.discard("account", "a-1", 3, fence_token=plan.fence_token)
        with pytest.raises(DeletionMismatchError, match="missing"):
            stores.events.commit_compaction(plan)
        assert versions(stores, "account", "a-1") == [1, 2, 3, 4, 5]

    def test_commit_with_other_snapshot_hash_deletes_nothing(self, stores: Stores) -> None:
        plan = self._prepare(stores)
        wrong = replace(plan, state_hash="0" * 64)
        with pytest.raises(DeletionMismatchError, match="different"):
            stores.events.commit_compaction(wrong)
        assert versions(stores, "account", "a-1") == [1, 2, 3, 4, 5]

    def test_commit_with_wrong_row_count_rolls_back(self, stores: Stores) -> None:
        plan = self._prepare(stores)
        stores.remove_event("account", "a-1", 2)  # someone deleted a row behind our back
        with pytest.raises(DeletionMismatchError, match="would remove 2 events, the plan says 3"):
            stores.events.commit_compaction(plan)
        assert versions(stores, "account", "a-1") == [1, 3, 4, 5]
        info = stores.events.stream_info("account", "a-1")
        assert info is not None and info.compacted_through == 0
        assert stores.snapshots.latest("account", "a-1") is None
        assert stores.events.compaction_log() == []

    def test_commit_after_the_compaction_point_moved_is_fenced(self, stores: Stores) -> None:
        plan = self._prepare(stores)
        moved = replace(plan, compacted_through_before=2)
        with pytest.raises(FencedError, match="compacted through 0 since"):
            stores.events.commit_compaction(moved)
        assert versions(stores, "account", "a-1") == [1, 2, 3, 4, 5]

    def test_commit_beyond_the_head_is_refused(self, stores: Stores) -> None:
        plan = self._prepare(stores, n=5, c=3)
        beyond = replace(plan, through_version=6, expected_deleted=5)
        with pytest.raises(DeletionMismatchError, match="head is 5"):
            stores.events.commit_compaction(beyond)
        info = stores.events.stream_info("account", "a-1")
        assert info is not None and info.compacted_through == 0

    def test_commit_under_a_compaction_id_already_logged_deletes_nothing(
        self, stores: Stores
    ) -> None:
        """A compaction id names one deletion: a second delete under the same id (another
        stream's) is refused by the audit log, after every other check, by both store
        families in the same way; nothing of it is deleted or logged."""
        first = self._prepare(stores)
        assert stores.events.commit_compaction(first) == 3
        stores.events.append("account", "b-1", deposits(1, 2, 3), expected_version=0)
        info = stores.events.acquire_fence("account", "b-1")
        assert info is not None
        body = b'{"c":2}'
        stores.snapshots.save(
            "account",
            "b-1",
            Snapshot(2, body, state_hash(body), False, datetime.now(UTC)),
            fence_token=info.fence_token,
        )
        again = replace(
            first,
            stream_id="b-1",
            fence_token=info.fence_token,
            through_version=2,
            head_version=3,
            expected_deleted=2,
            state_hash=state_hash(body),
        )
        with pytest.raises(StoreError, match="cid-1"):
            stores.events.commit_compaction(again)
        # With a wrong hash too, the hash is what is reported (it is checked first).
        with pytest.raises(DeletionMismatchError, match="different"):
            stores.events.commit_compaction(replace(again, state_hash="0" * 64))
        assert versions(stores, "account", "b-1") == [1, 2, 3]
        assert [r.stream_id for r in stores.events.compaction_log()] == ["a-1"]

    def test_compacted_stream_keeps_head_for_optimistic_concurrency(self, stores: Stores) -> None:
        plan = self._prepare(stores, n=3, c=3)
        stores.events.commit_compaction(plan)
        assert list(stores.events.read("account", "a-1")) == []
        assert stores.events.head_version("account", "a-1") == 3
        with pytest.raises(ConcurrencyError):
            stores.events.append("account", "a-1", deposits(1), expected_version=0)
        with pytest.raises(ConcurrencyError):
            stores.events.append("account", "a-1", deposits(1), expected_version=2)
        assert stores.events.append("account", "a-1", deposits(1), expected_version=3) == 4
        assert versions(stores, "account", "a-1") == [4]

    def test_stream_types_in_use_are_those_with_a_stream_compacted_or_not(
        self, stores: Stores
    ) -> None:
        stores.events.append("ledger", "l-1", deposits(1), expected_version=0)
        stores.events.commit_compaction(self._prepare(stores, n=3, c=3))  # account: no live events
        asked = ["account", "ledger", "ledgre", "acc"]
        assert stores.events.stream_types_in_use(asked) == {"account", "ledger"}
        assert stores.events.stream_types_in_use([]) == set()
