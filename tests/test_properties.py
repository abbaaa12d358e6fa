"""Property-based tests: random interleavings of appends and compactions, on every backend.

A plain Python model — the list of every amount ever appended and the compaction point
— predicts everything a backend must show after each step: the state ``load_state``
rebuilds, the head, which events are still stored, and exactly what each compaction
plans, deletes and reports.

Hypothesis runs many examples against one function-scoped ``stores`` fixture, so every
example works on a fresh stream id (uuid4) and never sees another example's data. The
``@given`` function is defined inside each test so that every backend can choose its
own number of examples (SQL round trips are far slower than the in-memory store).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from eskit_tasks import (
    CompactionPolicy,
    CompactionResult,
    Compactor,
    ConcurrencyError,
    Decider,
    Outcome,
    load_state,
)
from eskit_tasks.domain.codec import StateCodec, state_hash
from eskit_tasks.testing.deciders import (
    Ledger,
    LedgerModel,
    ModelLedger,
    MutatingLedger,
    deposits,
    ledger_fold,
)
from tests.backends import MemoryBackend, PostgresBackend, SqliteBackend, Stores

STREAM_TYPE = "prop-account"


# -- the deciders every property runs with ----------------------------------------------


@dataclass(frozen=True)
class DeciderCase:
    """A decider, the state type its snapshots decode to, and its model fold."""

    name: str
    make: Callable[[], Decider[Any]]
    state_type: Any
    expected: Callable[[list[int]], Any]

    def __repr__(self) -> str:  # what hypothesis prints in a falsifying example
        return self.name


def _model_state(amounts: list[int]) -> LedgerModel:
    return LedgerModel(**ledger_fold(amounts))


CASES = [
    DeciderCase("Ledger", Ledger, dict, ledger_fold),
    DeciderCase("MutatingLedger", MutatingLedger, dict, ledger_fold),
    DeciderCase("ModelLedger", ModelLedger, LedgerModel, _model_state),
]


# -- operations -------------------------------------------------------------------------


@dataclass(frozen=True)
class Append:
    """Append one batch of deposits at the current head."""

    amounts: tuple[int, ...]


@dataclass(frozen=True)
class Compact:
    """Compact under ``CompactionPolicy(retain_last, dry_run)``, then once more."""

    retain_last: int
    dry_run: bool


@dataclass(frozen=True)
class StaleAppend:
    """Append with a wrong expected_version (ahead of, or behind, the head)."""

    behind: bool
    by: int


amounts_st = st.lists(st.integers(-1_000, 1_000), min_size=1, max_size=20).map(tuple)
append_st = st.builds(Append, amounts_st)
compact_st = st.builds(Compact, st.integers(0, 10), st.booleans())
stale_st = st.builds(StaleAppend, st.booleans(), st.integers(1, 30))
ops_st = st.lists(st.one_of(append_st, compact_st, stale_st), min_size=1, max_size=12)
# Biased towards streams that actually get compacted more than once.
grow_then_compact_st = st.lists(st.tuples(append_st, compact_st), min_size=1, max_size=5)


# -- the model and the checks -----------------------------------------------------------


class Model:
    """What the stream must look like: every amount ever appended, and the compaction point."""

    def __init__(self, stores: Stores, case: DeciderCase) -> None:
        self.stores = stores
        self.case = case
        self.decider = case.make()
        self.codec: StateCodec[Any] = StateCodec(case.state_type)
        self.stream_id = uuid.uuid4().hex
        self.amounts: list[int] = []
        self.compacted_through = 0

    @property
    def head(self) -> int:
        return len(self.amounts)

    # -- reading the backend ---------------------------------------------------------

    def live_versions(self) -> list[int]:
        return [e.version for e in self.stores.events.read(STREAM_TYPE, self.stream_id)]

    def fence_token(self) -> int | None:
        info = self.stores.events.stream_info(STREAM_TYPE, self.stream_id)
        return None if info is None else info.fence_token

    def compactor(self, policy: CompactionPolicy) -> Compactor[Any]:
        return Compactor(
            store=self.stores.events,
            snapshot_store=self.stores.snapshots,
            decider=self.decider,
            state_type=self.case.state_type,
            policy=policy,
        )

    def expected_hash(self, version: int) -> str:
        return state_hash(self.codec.encode(self.case.expected(self.amounts[:version])))

    # -- operations ------------------------------------------------------------------

    def append(self, op: Append) -> None:
        new_head = self.stores.events.append(
            STREAM_TYPE, self.stream_id, deposits(*op.amounts), expected_version=self.head
        )
        self.amounts.extend(op.amounts)
        assert new_head == self.head

    def stale_append(self, op: StaleAppend) -> None:
        wrong = self.head + op.by if not op.behind or self.head == 0 else max(0, self.head - op.by)
        assert wrong != self.head
        with pytest.raises(ConcurrencyError):
            self.stores.events.append(
                STREAM_TYPE, self.stream_id, deposits(1), expected_version=wrong
            )

    def compact(self, op: Compact) -> CompactionResult:
        compactor = self.compactor(CompactionPolicy(retain_last=op.retain_last, dry_run=op.dry_run))
        live_before, token_before = self.live_versions(), self.fence_token()
        result = compactor.compact(STREAM_TYPE, self.stream_id)
        event(f"outcome: {result.outcome}")
        self.check_result(result, op, live_before, token_before)

        again = compactor.compact(STREAM_TYPE, self.stream_id)
        assert again.error is None, again.error
        if result.outcome is Outcome.DRY_RUN:
            # Nothing changed, so the same dry run plans exactly the same again.
            assert again.outcome is Outcome.DRY_RUN
            assert (again.snapshot_version, again.events_deleted, again.state_hash) == (
                result.snapshot_version,
                result.events_deleted,
                result.state_hash,
            )
        else:
            assert again.outcome is Outcome.NOTHING_TO_COMPACT, again
            assert again.events_deleted == 0
            assert again.compacted_through_before == self.compacted_through
        assert self.live_versions() == list(range(self.compacted_through + 1, self.head + 1))
        return result

    def check_result(
        self,
        result: CompactionResult,
        op: Compact,
        live_before: list[int],
        token_before: int | None,
    ) -> None:
        head, before = self.head, self.compacted_through
        cut = head - op.retain_last
        assert result.error is None, result.error
        assert result.head_version == head
        assert result.compacted_through_before == before

        if cut <= before:
            assert result.outcome is Outcome.NOTHING_TO_COMPACT, result
            assert result.events_deleted == 0
            assert result.snapshot_version is None
            assert self.live_versions() == live_before
            return

        assert result.outcome is (Outcome.DRY_RUN if op.dry_run else Outcome.COMPACTED), result
        assert result.snapshot_version == cut
        # The plan: exactly the live events between the old and the new compaction point.
        assert result.events_deleted == result.snapshot_version - result.compacted_through_before
        assert result.events_retained == head - cut
        assert result.state_hash == self.expected_hash(cut)

        if op.dry_run:
            assert self.live_versions() == live_before
            assert self.fence_token() == token_before
            assert self.stores.snapshots.read(STREAM_TYPE, self.stream_id, cut) is None
            return

        self.compacted_through = cut
        assert self.live_versions() == list(range(cut + 1, head + 1))
        if before:  # the snapshot the stream was compacted to before is dropped
            assert self.stores.snapshots.read(STREAM_TYPE, self.stream_id, before) is None
        assert token_before is not None
        token_after = self.fence_token()
        assert token_after is not None
        assert token_after > token_before
        [row] = self.stores.events.compaction_log(STREAM_TYPE, self.stream_id, limit=1)
        assert (row.compaction_id, row.from_version, row.through_version) == (
            result.compaction_id,
            before + 1,
            cut,
        )
        assert (row.events_deleted, row.state_hash) == (result.events_deleted, result.state_hash)

    # -- the invariant checked after every step --------------------------------------

    def check(self) -> None:
        state, version = load_state(
            self.stores.events,
            self.stores.snapshots,
            self.decider,
            self.case.state_type,
            STREAM_TYPE,
            self.stream_id,
        )
        assert version == self.head
        assert state == self.case.expected(self.amounts)
        assert self.stores.events.head_version(STREAM_TYPE, self.stream_id) == self.head
        assert self.live_versions() == list(range(self.compacted_through + 1, self.head + 1))

        info = self.stores.events.stream_info(STREAM_TYPE, self.stream_id)
        if self.head == 0:
            assert info is None
        else:
            assert info is not None
            assert (info.head_version, info.compacted_through) == (
                self.head,
                self.compacted_through,
            )

        snap = self.stores.snapshots.latest(STREAM_TYPE, self.stream_id)
        if self.compacted_through == 0:
            assert snap is None
        else:
            assert snap is not None
            assert snap.verified
            assert snap.version == self.compacted_through
            assert snap.state_hash == self.expected_hash(self.compacted_through)
            assert self.codec.decode(snap.state) == self.case.expected(
                self.amounts[: self.compacted_through]
            )

    def run(self, op: Append | Compact | StaleAppend) -> None:
        if isinstance(op, Append):
            self.append(op)
        elif isinstance(op, Compact):
            self.compact(op)
        else:
            self.stale_append(op)
        self.check()


# -- the contract -----------------------------------------------------------------------


class PropertyContract:
    """Properties every backend must satisfy; subclasses pick the backend and the budget."""

    max_examples = 40

    def settings(self) -> settings:
        return settings(
            max_examples=self.max_examples,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )

    def test_interleaved_appends_and_compactions_match_the_plain_fold(self, stores: Stores):
        """Any interleaving of appends (batches of 1..20 deposits, negative amounts too),
        compactions (retain_last 0..10, dry run or not) and appends with a stale
        expected_version, with Ledger, MutatingLedger (state mutated in place) and
        ModelLedger (pydantic state):

        * after every step ``load_state`` returns the plain fold over *all* events ever
          appended, at version = number appended; ``head_version`` is that number too;
        * a compaction does exactly what the model plans: ``nothing_to_compact`` iff
          ``head - retain_last <= compacted_through``, otherwise snapshot at
          C = head - retain_last with ``events_deleted == C - compacted_through_before``,
          ``events_retained == head - C`` and the hash of the model state at C;
        * after a real compaction the stored events are exactly C+1..head, the newest
          verified snapshot is at C and decodes to the model state at C, the previous one
          is dropped, the fencing token moved and the audit log's newest row describes it;
        * a dry run changes nothing: same live events, same token, no snapshot written;
        * compacting again right away gives ``nothing_to_compact`` (the same dry-run plan
          after a dry run) — only new events make more work;
        * an append with a stale expected_version raises ConcurrencyError and changes
          nothing, also once every event is compacted away (the head survives).
        """

        @self.settings()
        @given(case=st.sampled_from(CASES), ops=ops_st)
        def run(case: DeciderCase, ops: list[Append | Compact | StaleAppend]) -> None:
            model = Model(stores, case)
            model.check()
            for op in ops:
                model.run(op)

        run()

    def test_appending_after_each_compaction_makes_exactly_the_new_work(self, stores: Stores):
        """Rounds of (append a batch, compact, compact again): the repeat is always
        ``nothing_to_compact`` (or the same dry-run plan), and the next round's
        compaction deletes exactly the events between the previous compaction point and
        the new cut — never an event twice, never one left behind below the cut. The
        state stays the full fold throughout."""

        @self.settings()
        @given(case=st.sampled_from(CASES), rounds=grow_then_compact_st)
        def run(case: DeciderCase, rounds: list[tuple[Append, Compact]]) -> None:
            model = Model(stores, case)
            deleted = 0
            for append, compact in rounds:
                model.run(append)
                result = model.compact(compact)
                model.check()
                if result.outcome is Outcome.COMPACTED:
                    deleted += result.events_deleted
            # Every deletion is accounted for, once: the sum of the deletions is the point.
            assert deleted == model.compacted_through
            log = model.stores.events.compaction_log(STREAM_TYPE, model.stream_id, limit=1000)
            assert sum(r.events_deleted for r in log) == model.compacted_through

        run()


class TestPropertiesMemory(MemoryBackend, PropertyContract):
    max_examples = 40


class TestPropertiesSqlite(SqliteBackend, PropertyContract):
    max_examples = 20


class TestPropertiesPostgres(PostgresBackend, PropertyContract):
    max_examples = 20
