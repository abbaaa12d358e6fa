"""Consumers of the store: global positions, ``read_all``, checkpoints, and the gate
that keeps every event a consumer has not read."""

from __future__ import annotations

from typing import Any

import pytest

from eskit_tasks.core.candidates import iter_candidates
from eskit_tasks.core.compactor import Compactor
from eskit_tasks.domain.policy import CompactionPolicy
from eskit_tasks.domain.result import HeldBack, Outcome
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.testing.contracts.backend import Stores
from eskit_tasks.testing.contracts.helpers import seed, state_of, versions
from eskit_tasks.testing.deciders import Ledger, deposits, ledger_fold


def _compactor(stores: Stores, **kw: Any) -> Compactor[Any]:
    guard = kw.pop("guard", None)
    return Compactor(
        store=stores.events,
        snapshot_store=stores.snapshots,
        decider=Ledger(),
        state_type=dict,
        policy=CompactionPolicy(**kw),
        guard=guard,
    )


def _interleaved(stores: Stores) -> None:
    """a-1 and a-2 appended in turns, one event each: a-1 gets the odd positions."""
    for n in range(1, 6):
        stores.events.append("account", "a-1", deposits(n), expected_version=n - 1)
        stores.events.append("account", "a-2", deposits(10 * n), expected_version=n - 1)


def _positions(stores: Stores, stream_id: str) -> list[int]:
    return [e.position for e in stores.events.read("account", stream_id)]


class ConsumersContract:
    # positions ------------------------------------------------------------------------

    def test_positions_increase_in_commit_order_across_streams(self, stores: Stores) -> None:
        _interleaved(stores)
        one, two = _positions(stores, "a-1"), _positions(stores, "a-2")
        assert len(set(one + two)) == 10
        assert all(b > a for a, b in zip(one, two, strict=True))  # a-2's n after a-1's n
        assert all(a > b for a, b in zip(one[1:], two, strict=False))
        assert stores.events.last_position() == max(two)
        event = next(iter(stores.events.read("account", "a-2")))
        assert (event.stream_type, event.stream_id) == ("account", "a-2")

    def test_a_deleted_newest_event_does_not_give_its_position_again(self, stores: Stores) -> None:
        seed(stores, [1, 2, 3])
        top = stores.events.last_position()
        assert _compactor(stores).compact("account", "a-1").outcome == Outcome.COMPACTED
        assert versions(stores, "account", "a-1") == []
        seed(stores, [4])
        assert _positions(stores, "a-1") == [top + 1]

    # read_all -------------------------------------------------------------------------

    def test_read_all_follows_the_store_in_position_order(self, stores: Stores) -> None:
        _interleaved(stores)
        stores.events.append("other", "o-1", deposits(7), expected_version=0)
        every = list(stores.events.read_all())
        assert [e.position for e in every] == sorted(e.position for e in every)
        assert [(e.stream_type, e.stream_id, e.version) for e in every[:3]] == [
            ("account", "a-1", 1),
            ("account", "a-2", 1),
            ("account", "a-1", 2),
        ]
        assert every[-1][:3] == (1, "Deposited", {"amount": 7})
        assert every[-1].stream_type == "other"
        middle = every[4].position
        assert list(stores.events.read_all(after_position=middle)) == every[5:]
        assert list(stores.events.read_all(after_position=middle, limit=2)) == every[5:7]
        assert list(stores.events.read_all(limit=0)) == []
        assert list(stores.events.read_all(after_position=every[-1].position)) == []

    def test_read_all_skips_what_compaction_deleted(self, stores: Stores) -> None:
        _interleaved(stores)
        _compactor(stores, retain_last=2).compact("account", "a-1")
        seen = [(e.stream_id, e.version) for e in stores.events.read_all()]
        assert [v for s, v in seen if s == "a-1"] == [4, 5]
        assert [v for s, v in seen if s == "a-2"] == [1, 2, 3, 4, 5]

    def test_read_all_is_lazy(self, stores: Stores) -> None:
        for n in range(1, 2501):
            stores.events.append("account", f"a-{n}", deposits(n), expected_version=0)
        events = stores.events.read_all()
        first = next(events)
        stores.events.append("account", "late", deposits(1), expected_version=0)
        rest = list(events)
        assert first.stream_id == "a-1"
        assert len(rest) in (2499, 2500)  # the late event may come with a later page
        assert [e.position for e in rest] == sorted({e.position for e in rest})

    def test_read_all_refuses_a_bad_position(self, stores: Stores) -> None:
        with pytest.raises(ConfigurationError, match="position"):
            stores.events.read_all(after_position=-1)
        with pytest.raises(ConfigurationError, match="limit"):
            stores.events.read_all(limit=-1)

    # checkpoints ----------------------------------------------------------------------

    def test_a_checkpoint_never_moves_backwards(self, stores: Stores) -> None:
        assert stores.events.checkpoints() == {}
        stores.events.append("account", "a-1", deposits(*range(1, 10)), expected_version=0)
        assert stores.events.save_checkpoint("projection", 5) == 5
        assert stores.events.save_checkpoint("projection", 3) == 5  # ignored
        assert stores.events.save_checkpoint("projection", 9) == 9
        assert stores.events.save_checkpoint("outbox", 0, stream_types=["account"]) == 0
        assert stores.events.checkpoints() == {"outbox": 0, "projection": 9}
        listed = {c.consumer: c.stream_types for c in stores.events.consumers()}
        assert listed == {"outbox": ("account",), "projection": None}
        assert stores.events.remove_checkpoint("outbox") is True
        assert stores.events.remove_checkpoint("outbox") is False
        assert stores.events.checkpoints() == {"projection": 9}

    def test_a_scope_is_kept_until_given_again(self, stores: Stores) -> None:
        stores.events.append("account", "a-1", deposits(1, 2), expected_version=0)
        stores.events.save_checkpoint("feed", 1, stream_types=["b", "a", "a"])
        stores.events.save_checkpoint("feed", 2)
        assert [c.stream_types for c in stores.events.consumers()] == [("a", "b")]
        stores.events.save_checkpoint("feed", 1, stream_types=["c"])
        [feed] = stores.events.consumers()
        assert (feed.position, feed.stream_types) == (2, ("c",))

    @pytest.mark.parametrize(
        ("consumer", "position", "scope", "says"),
        [
            ("", 1, None, "non-empty string"),
            ("p", -1, None, "position"),
            ("p", True, None, "position"),
            ("p", "3", None, "position"),
            ("p", 1, [], "empty"),
            ("p", 1, "account", "list"),
        ],
    )
    def test_a_bad_checkpoint_is_refused(
        self, stores: Stores, consumer: Any, position: Any, scope: Any, says: str
    ) -> None:
        stores.events.append("account", "a-1", deposits(1, 2), expected_version=0)
        with pytest.raises(ConfigurationError, match=says):
            stores.events.save_checkpoint(consumer, position, stream_types=scope)
        assert stores.events.checkpoints() == {}

    def test_a_checkpoint_beyond_the_newest_position_is_refused(self, stores: Stores) -> None:
        """A consumer cannot have read what was never written: a version or a count given
        as its position would let compactions delete events it has not seen."""
        with pytest.raises(ConfigurationError, match="beyond the newest position"):
            stores.events.save_checkpoint("projection", stores.events.last_position() + 1)
        _interleaved(stores)
        last = stores.events.last_position()
        stores.events.save_checkpoint("projection", 2)
        with pytest.raises(
            ConfigurationError, match=rf"position {last + 1} is beyond .*\({last}\)"
        ):
            stores.events.save_checkpoint("projection", last + 1)
        assert stores.events.checkpoints() == {"projection": 2}
        # Up to the newest position itself.
        stores.events.save_checkpoint("projection", last)
        assert stores.events.checkpoints() == {"projection": last}

    def test_lag_counts_the_events_after_a_checkpoint(self, stores: Stores) -> None:
        _interleaved(stores)
        stores.events.append("other", "o-1", deposits(7, 8), expected_version=0)
        third = _positions(stores, "a-1")[2]
        assert stores.events.events_after(third) == 5 + 2
        assert stores.events.events_after(third, ["other"]) == 2
        assert stores.events.events_after(stores.events.last_position()) == 0

    # the gate -------------------------------------------------------------------------

    def test_a_lagging_consumer_keeps_exactly_the_events_above_its_checkpoint(
        self, stores: Stores
    ) -> None:
        _interleaved(stores)
        third = _positions(stores, "a-1")[2]
        stores.events.save_checkpoint("projection", third + 1)  # read a-2's third too
        result = _compactor(stores).compact("account", "a-1")
        assert result.outcome == Outcome.COMPACTED
        assert result.held_back_by == HeldBack(consumer="projection", position=third + 1)
        assert (result.snapshot_version, result.events_deleted) == (3, 3)
        assert versions(stores, "account", "a-1") == [4, 5]
        assert state_of(stores) == (ledger_fold([1, 2, 3, 4, 5]), 5)

    def test_a_consumer_that_read_nothing_holds_everything(self, stores: Stores) -> None:
        _interleaved(stores)
        stores.events.save_checkpoint("new-projection", 0)
        result = _compactor(stores).compact("account", "a-1")
        assert result.outcome == Outcome.NOTHING_TO_COMPACT
        assert result.held_back_by == HeldBack(consumer="new-projection", position=0)
        assert (result.snapshot_version, result.events_deleted) == (None, 0)
        assert versions(stores, "account", "a-1") == [1, 2, 3, 4, 5]
        dry = _compactor(stores, dry_run=True).compact("account", "a-1")
        assert (dry.outcome, dry.held_back_by) == (Outcome.NOTHING_TO_COMPACT, result.held_back_by)

    def test_the_lowest_checkpoint_of_the_consumers_reading_the_type_decides(
        self, stores: Stores
    ) -> None:
        _interleaved(stores)
        one = _positions(stores, "a-1")
        stores.events.save_checkpoint("fast", one[4])
        stores.events.save_checkpoint("slow", one[1])
        stores.events.save_checkpoint("elsewhere", 0, stream_types=["other"])
        result = _compactor(stores).compact("account", "a-1")
        assert result.held_back_by == HeldBack(consumer="slow", position=one[1])
        assert versions(stores, "account", "a-1") == [3, 4, 5]
        stores.events.save_checkpoint("slow", one[4])  # caught up
        again = _compactor(stores).compact("account", "a-1")
        assert (again.outcome, again.events_deleted, again.held_back_by) == (
            Outcome.COMPACTED,
            3,
            None,
        )

    def test_the_policy_still_applies_below_the_checkpoint(self, stores: Stores) -> None:
        _interleaved(stores)
        stores.events.save_checkpoint("projection", stores.events.last_position())
        result = _compactor(stores, retain_last=2).compact("account", "a-1")
        assert (result.snapshot_version, result.held_back_by) == (3, None)

    def test_a_consumer_registering_during_the_compaction_is_not_outrun(
        self, stores: Stores
    ) -> None:
        """The checkpoints are read again inside the delete transaction."""
        _interleaved(stores)
        calls = []

        def register_late() -> None:
            calls.append(1)
            if len(calls) == 2:  # after the snapshot is written, before the delete
                stores.events.save_checkpoint("late", 1)

        result = _compactor(stores, guard=register_late).compact("account", "a-1")
        assert result.outcome == Outcome.NOTHING_TO_COMPACT, result.error
        assert result.held_back_by == HeldBack(consumer="late", position=1)
        assert result.events_deleted == 0
        assert versions(stores, "account", "a-1") == [1, 2, 3, 4, 5]
        assert stores.snapshots.latest("account", "a-1") is None
        assert stores.events.compaction_log() == []
        assert state_of(stores) == (ledger_fold([1, 2, 3, 4, 5]), 5)

    def test_candidates_leave_out_streams_held_back_entirely(self, stores: Stores) -> None:
        _interleaved(stores)
        stores.events.append("other", "o-1", deposits(1), expected_version=0)
        first_of_two = _positions(stores, "a-2")[0]
        stores.events.save_checkpoint("projection", first_of_two - 1)  # a-1's first only
        stores.events.save_checkpoint("audit", 0, stream_types=["other"])
        found = [c.stream_id for c in iter_candidates(stores.events)]
        assert found == ["a-1"]
        stores.events.remove_checkpoint("audit")
        assert [c.stream_id for c in iter_candidates(stores.events)] == ["a-1"]
        stores.events.remove_checkpoint("projection")
        assert [c.stream_id for c in iter_candidates(stores.events)] == ["a-1", "a-2", "o-1"]

    def test_a_damaged_stream_stays_a_candidate_and_reports_its_gap(self, stores: Stores) -> None:
        """A stream whose oldest live event is missing (a row deleted by hand) is still
        offered when consumers exist, so its compaction says what is wrong instead of the
        stream being left out in silence."""
        _interleaved(stores)
        stores.remove_event("account", "a-1", 1)
        stores.events.save_checkpoint("projection", stores.events.last_position())
        assert "a-1" in [c.stream_id for c in iter_candidates(stores.events)]
        result = _compactor(stores).compact("account", "a-1")
        assert (result.outcome, result.error_type) == (Outcome.FAILED, "VersionGapError")
        assert versions(stores, "account", "a-1") == [2, 3, 4, 5]
