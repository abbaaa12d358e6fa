"""The SQL store's paged fold (issue 15): a replay folds a page of rows at a time, and
on PostgreSQL the next page is fetched by a second thread meanwhile. It must find
exactly what the event-by-event fold finds — the same state, the same gap, the same
failing version — wherever a page boundary falls, and must hand its connection back
however the fold ends."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from eskit_tasks import NewEvent, RecordedEvent, SqlEventStore
from eskit_tasks.core.loading import fold_measured
from eskit_tasks.domain.fold import FoldsItself, fold_events
from eskit_tasks.errors import EskitError, EventDecodeError, EvolveError, VersionGapError
from eskit_tasks.stores.reads import prefetched
from eskit_tasks.stores.schema import metadata
from eskit_tasks.testing.services import libpq_url

PAGE = 4
EVENTS = 11  # pages of 4, 4 and 3


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlEventStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'events.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    store = SqlEventStore.from_url(url, page_size=PAGE)
    if request.param == "postgres":
        with store.engine.begin() as conn:
            names = ", ".join(t.name for t in metadata.sorted_tables)
            conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY")
    store.append(
        "acct",
        "a",
        [
            NewEvent("Deposited", {"amount": n}, {"by": "test"} if n % 3 else {})
            for n in range(1, 7)
        ],
        expected_version=0,
    )
    store.append(  # a second transaction: a second timestamp
        "acct",
        "a",
        [NewEvent("Deposited", {"amount": n}) for n in range(7, EVENTS + 1)],
        expected_version=6,
    )
    yield store
    store.engine.dispose()


class Collect:
    """A decider that keeps every event it is given, and may fail at one version."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at

    def initial_state(self) -> list[RecordedEvent]:
        return []

    def evolve(self, state: list[RecordedEvent], event: RecordedEvent) -> list[RecordedEvent]:
        if event.version == self.fail_at:
            raise ValueError("no such account")
        return [*state, event]

    def decide(self, command: Any, state: Any) -> list[NewEvent]:
        return []


def _paged(store: SqlEventStore, decider: Collect, **kw: int) -> tuple[Any, int, int]:
    events = store.read("acct", "a", **kw)
    assert isinstance(events, FoldsItself)
    return fold_measured(
        decider, [], events, after=kw.get("from_version", 1) - 1, stream_type="acct", stream_id="a"
    )


def _one_by_one(store: SqlEventStore, decider: Collect, **kw: int) -> tuple[Any, int, int]:
    events = list(store.read("acct", "a", **kw))  # a plain list: no paged fold
    return fold_events(
        decider.evolve,
        [],
        events,
        after=kw.get("from_version", 1) - 1,
        stream_type="acct",
        stream_id="a",
    )


def _delete(store: SqlEventStore, versions: list[int]) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            sa.text("DELETE FROM eskit_events WHERE version IN :v").bindparams(
                sa.bindparam("v", expanding=True)
            ),
            {"v": versions},
        )


def _checked_out(store: SqlEventStore) -> int:
    return int(store.engine.pool.checkedout())  # type: ignore[attr-defined]


@pytest.mark.parametrize("window", [{}, {"from_version": 3}, {"from_version": 5, "to_version": 9}])
def test_the_paged_fold_gives_exactly_what_the_event_by_event_fold_gives(store, window):
    paged = _paged(store, Collect(), **window)
    assert paged == _one_by_one(store, Collect(), **window)
    state, last, stored = paged
    assert [e.version for e in state] == list(range(window.get("from_version", 1), last + 1))
    assert stored == sum(e.stored_bytes for e in state) > 0
    assert {e.metadata.get("by") for e in state} <= {"test", None}
    assert len({e.recorded_at for e in state}) in (1, 2)  # one per append transaction
    assert _checked_out(store) == 0


@pytest.mark.parametrize(
    "missing",
    [
        [1],  # the very first event
        [3],  # inside the first page
        [4],  # the last row of a page
        [5],  # the first row of the second page: the page starts late
        [9, 10],  # two inside the last page
        [EVENTS],  # the head: the fold simply ends early
    ],
)
def test_a_gap_is_reported_at_the_same_version_wherever_the_page_boundary_falls(store, missing):
    _delete(store, missing)
    if missing == [EVENTS]:
        assert _paged(store, Collect())[1] == EVENTS - 1
        return
    with pytest.raises(VersionGapError) as paged:
        _paged(store, Collect())
    with pytest.raises(VersionGapError) as plain:
        _one_by_one(store, Collect())
    assert paged.value.version == plain.value.version == missing[0]
    assert str(paged.value) == str(plain.value)
    assert _checked_out(store) == 0


@pytest.mark.parametrize("fail_at", [1, 4, 5, EVENTS])
def test_an_evolve_error_names_the_event_it_failed_on(store, fail_at):
    with pytest.raises(EvolveError) as paged:
        _paged(store, Collect(fail_at))
    with pytest.raises(EvolveError) as plain:
        _one_by_one(store, Collect(fail_at))
    assert paged.value.version == plain.value.version == fail_at
    assert str(paged.value) == str(plain.value)
    assert "(Deposited): evolve raised ValueError: no such account" in str(paged.value)
    assert _checked_out(store) == 0  # the read-ahead thread stopped, the cursor closed


@pytest.mark.parametrize("bad", [2, 5])
def test_a_payload_that_is_not_json_names_its_version(store, bad):
    with store.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE eskit_events SET data = '{oops' WHERE version = :v"), {"v": bad}
        )
    with pytest.raises(EventDecodeError) as paged:
        _paged(store, Collect())
    assert paged.value.version == bad
    assert f"acct/a version {bad}: stored payload is not valid JSON" in str(paged.value)
    assert _checked_out(store) == 0


def test_an_abandoned_iteration_hands_its_connection_back_at_once(store):
    events = store.read("acct", "a")
    assert next(events).version == 1
    assert _checked_out(store) == 1
    del events  # no reference cycle: freed now, not at the next garbage collection
    assert _checked_out(store) == 0


def test_a_read_is_used_once(store):
    events = store.read("acct", "a")
    assert isinstance(events, FoldsItself)
    assert [e.version for e in events] == list(range(1, EVENTS + 1))
    with pytest.raises(RuntimeError, match="used once"):
        events.fold(Collect().evolve, [], 0)


def test_the_read_ahead_thread_raises_its_error_in_the_reader_at_the_page_it_stopped():
    def pages() -> Iterator[list[Any]]:
        yield [(1,)]
        yield [(2,)]
        raise OSError("connection reset")

    got = []
    with pytest.raises(OSError, match="connection reset"), prefetched(pages(), depth=1) as ahead:
        got.extend(ahead)
    assert got == [[(1,)], [(2,)]]


def test_leaving_the_read_ahead_early_stops_its_thread():
    fetched = []

    def pages() -> Iterator[list[Any]]:
        for n in range(1_000):
            fetched.append(n)
            yield [(n,)]

    before = threading.active_count()
    with prefetched(pages(), depth=2) as ahead:
        assert next(ahead) == [(0,)]
    assert threading.active_count() == before
    assert len(fetched) <= 5  # the page folded, two waiting, one being put, one fetched


def test_a_connection_lost_mid_read_fails_the_fold_with_a_named_error(postgres_url):
    store = SqlEventStore.from_url(postgres_url, page_size=PAGE)
    try:
        store.append(
            "acct",
            "cut",
            [NewEvent("Deposited", {"amount": n}) for n in range(40)],
            expected_version=0,
        )

        class KillsItsReader(Collect):
            def evolve(self, state: Any, event: RecordedEvent) -> Any:
                if event.version == 2:  # the read's backend, fetching from its cursor
                    with psycopg.connect(libpq_url(postgres_url), autocommit=True) as admin:
                        admin.execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                            "AND query LIKE '%eskit_read_%'"
                        )
                return super().evolve(state, event)

        events = store.read("acct", "cut")
        with pytest.raises(EskitError) as failed:
            fold_measured(
                KillsItsReader(), [], events, after=0, stream_type="acct", stream_id="cut"
            )
        assert "read acct/cut" in str(failed.value)
        assert _checked_out(store) == 0
    finally:
        store.engine.dispose()
