"""Single-stream compaction throughput against the raw-driver limit.

Baseline ("raw"): the database driver alone reads the stream's payloads in large
batches, decodes them with orjson, folds them with the same trivial decider, and
deletes the rows with one DELETE, in one transaction. Ours: ``Compactor.compact`` with
``retain_last=0`` on an identical copy of the stream. Both run on the same database in
the same process, alternating, so machine noise hits both alike.
"""

from __future__ import annotations

import gc
import sqlite3
import time
from typing import Any

import orjson
import psycopg

from bench.deciders import Sum
from eskit_tasks import (
    CompactionPolicy,
    Compactor,
    NewEvent,
    RecordedEvent,
    SqlEventStore,
    SqlSnapshotStore,
)
from eskit_tasks.testing.services import libpq_url

PAYLOAD_PAD = "x" * 60  # with the other fields: about 100 bytes of JSON per event


def seed(store: SqlEventStore, stream_id: str, n: int, batch: int = 10_000) -> None:
    head = 0
    while head < n:
        size = min(batch, n - head)
        events = [
            NewEvent("Deposited", {"amount": head + i, "currency": "EUR", "memo": PAYLOAD_PAD})
            for i in range(1, size + 1)
        ]
        head = store.append("bench", stream_id, events, expected_version=head)


def _stream_pk(store: SqlEventStore, stream_id: str) -> int:
    import sqlalchemy as sa

    from eskit_tasks.stores.schema import streams

    with store.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(streams.c.pk).where(
                    streams.c.stream_type == "bench", streams.c.stream_id == stream_id
                )
            ).scalar_one()
        )


def _raw_fold(cur: Any) -> dict[str, int]:
    """The baselines' fold: (version, type, data) rows from a driver cursor, decoded with
    orjson and folded with the same decider, in large batches."""
    decider, loads = Sum(), orjson.loads
    state = decider.initial_state()
    while rows := cur.fetchmany(10_000):
        for version, type_, data in rows:
            state = decider.evolve(
                state,
                RecordedEvent(version, type_, loads(data), {}, None),  # type: ignore[arg-type]
            )
    return state


def raw_postgres(url: str, pk: int) -> tuple[int, dict[str, int]]:
    with psycopg.connect(libpq_url(url)) as conn, conn.transaction():
        with conn.cursor(name="raw_bench") as cur:
            cur.execute(
                "SELECT version, type, data FROM eskit_events WHERE stream_pk = %s "
                "ORDER BY version",
                (pk,),
            )
            state = _raw_fold(cur)
        deleted = conn.execute("DELETE FROM eskit_events WHERE stream_pk = %s", (pk,)).rowcount
    return deleted, state


def raw_sqlite(path: str, pk: int) -> tuple[int, dict[str, int]]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        cur = conn.execute(
            "SELECT version, type, data FROM eskit_events WHERE stream_pk = ? ORDER BY version",
            (pk,),
        )
        state = _raw_fold(cur)
        deleted = conn.execute("DELETE FROM eskit_events WHERE stream_pk = ?", (pk,)).rowcount
        conn.execute("COMMIT")
    finally:
        conn.close()
    return deleted, state


def ours(store: SqlEventStore, stream_id: str) -> tuple[int, dict[str, int]]:
    snapshots = SqlSnapshotStore(store.engine, create_tables=False)
    result = Compactor(
        store=store,
        snapshot_store=snapshots,
        decider=Sum(),
        state_type=dict,
        policy=CompactionPolicy(retain_last=0),
    ).compact("bench", stream_id)
    if result.outcome != "compacted":
        raise RuntimeError(f"compaction did not succeed: {result}")
    snap = snapshots.latest("bench", stream_id)
    assert snap is not None
    return result.events_deleted, orjson.loads(snap.state)


def measure(url: str, events: int, rounds: int = 5) -> dict[str, Any]:
    """Events/s of raw and ours on ``url`` (best of ``rounds``), and the median ratio of
    ``rounds`` back-to-back pairs."""
    store = SqlEventStore.from_url(url)
    backend = store.engine.dialect.name
    raw_times, our_times = [], []
    for r in range(rounds):
        raw_id, our_id = f"raw-{r}-{time.time_ns()}", f"ours-{r}-{time.time_ns()}"
        seed(store, raw_id, events)
        seed(store, our_id, events)
        pk = _stream_pk(store, raw_id)
        gc.collect()
        t = time.perf_counter()
        if backend == "postgresql":
            deleted, raw_state = raw_postgres(url, pk)
        else:
            deleted, raw_state = raw_sqlite(str(store.engine.url.database), pk)
        raw_times.append(time.perf_counter() - t)
        assert deleted == events, deleted
        gc.collect()
        t = time.perf_counter()
        deleted, our_state = ours(store, our_id)
        our_times.append(time.perf_counter() - t)
        if deleted != events or our_state != raw_state:
            raise RuntimeError(f"results differ: {deleted} {our_state} vs {raw_state}")
    store.engine.dispose()
    raw_rate, our_rate = events / min(raw_times), events / min(our_times)
    # Each round runs raw then ours back to back; the median of the per-round ratios
    # is robust to load that comes and goes on a shared machine.
    pair_ratios = sorted(r / o for r, o in zip(raw_times, our_times, strict=True))
    return {
        "backend": backend,
        "events": events,
        "rounds": rounds,
        "raw_events_per_s": round(raw_rate),
        "ours_events_per_s": round(our_rate),
        "ratio": round(pair_ratios[len(pair_ratios) // 2], 3),
        "ratio_range": [round(pair_ratios[0], 3), round(pair_ratios[-1], 3)],
    }
