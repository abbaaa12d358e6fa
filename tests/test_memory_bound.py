"""The SQL store streams a long stream instead of buffering it, on SQLite and PostgreSQL.

A stream of N events of ~200-byte payloads is read with ``page_size=200``. tracemalloc
measures the peak Python memory of

* the baseline: ``list(store.read(...))``, which must hold every event at once;
* iterating ``store.read(...)`` to the end, dropping each event;
* ``Compactor.compact`` with ``retain_last=0``, which folds the whole stream into a
  three-number Ledger state and deletes it.

The two streamed peaks must stay a small fraction of the baseline. A read loop that
fetched every row before yielding the first one (``result.all()``) would push them up
to the order of the baseline.
"""

from __future__ import annotations

import gc
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from eskit_tasks import (
    CompactionPolicy,
    Compactor,
    NewEvent,
    Outcome,
    SqlEventStore,
    SqlSnapshotStore,
    load_state,
)
from eskit_tasks.testing.deciders import Ledger

EVENTS = 25_000
PAGE_SIZE = 200
#: Events per append while seeding (one transaction each).
BATCH = 5_000
#: A streamed peak must stay below this fraction of the baseline's.
MAX_FRACTION = 1 / 5
STREAM_TYPE = "memory-bound"
#: ~200 bytes of JSON per event.
MEMO = "m" * 180


def _seed(store: SqlEventStore, stream_id: str) -> None:
    for start in range(0, EVENTS, BATCH):
        batch = [
            NewEvent(type="Deposited", data={"amount": 1, "memo": MEMO})
            for _ in range(start, start + BATCH)
        ]
        store.append(STREAM_TYPE, stream_id, batch, expected_version=start)


def _peak(action: Callable[[], Any]) -> int:
    """Peak bytes of Python memory allocated while ``action`` runs (and still alive at
    the peak)."""
    gc.collect()
    tracemalloc.start()
    try:
        action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        pg: str = request.getfixturevalue("postgres_url")
        return pg
    return f"sqlite:///{tmp_path / 'memory.db'}"


@pytest.fixture
def store(url: str) -> Iterator[SqlEventStore]:
    store = SqlEventStore.from_url(url, page_size=PAGE_SIZE)
    yield store
    store.engine.dispose()


@pytest.mark.slow  # a measurement over a long stream, not logic: not in make test-fast
@pytest.mark.timeout(60)
def test_reading_and_compacting_a_long_stream_stream_in_pages(store: SqlEventStore):
    # A unique stream: the PostgreSQL database is shared by the whole session.
    stream_id = f"long-{uuid.uuid4().hex}"
    _seed(store, stream_id)
    snapshots = SqlSnapshotStore(store.engine)
    # Warm up: compile and cache the queries, fill the connection pool.
    assert len(list(store.read(STREAM_TYPE, stream_id, to_version=10))) == 10

    def materialise() -> None:
        events = list(store.read(STREAM_TYPE, stream_id))
        assert len(events) == EVENTS
        assert events[-1].version == EVENTS

    def stream() -> None:
        count = last = 0
        for event in store.read(STREAM_TYPE, stream_id):
            count += 1
            last = event.version
        assert (count, last) == (EVENTS, EVENTS)

    results = []

    def compact() -> None:
        results.append(
            Compactor(
                store=store,
                snapshot_store=snapshots,
                decider=Ledger(),
                state_type=dict,
                policy=CompactionPolicy(retain_last=0),
            ).compact(STREAM_TYPE, stream_id)
        )

    baseline = _peak(materialise)
    streamed = _peak(stream)
    compacting = _peak(compact)  # last: it deletes the stream's events

    (result,) = results
    assert result.outcome is Outcome.COMPACTED, result
    assert result.events_deleted == EVENTS
    assert list(store.read(STREAM_TYPE, stream_id)) == []
    state, version = load_state(store, snapshots, Ledger(), dict, STREAM_TYPE, stream_id)
    assert (state, version) == ({"total": EVENTS, "count": EVENTS, "last": EVENTS}, EVENTS)

    peaks = f"baseline {baseline:,} B, streamed read {streamed:,} B, compaction {compacting:,} B"
    # The baseline really holds the stream: at least the payload bytes themselves.
    assert baseline > EVENTS * len(MEMO), peaks
    assert streamed < baseline * MAX_FRACTION, peaks
    assert compacting < baseline * MAX_FRACTION, peaks
