"""Single-stream compaction throughput against two honest baselines.

"lean": the database driver alone, as a hand-written job would do it: one server-side
cursor (PostgreSQL) or cursor (SQLite) over ``version, data`` only, ``fetchmany`` pages
of the same size as ours, orjson, a two-field event, the same trivial fold, one
``DELETE``, one transaction. No project types, no other columns, nothing checked.
"pipelined": the same loop with the next page fetched in a second thread while this one
is folded (the driver waits for the server without holding the GIL).

Ours: ``Compactor.compact`` with ``retain_last=0`` (read every column a decider is
promised, fence, snapshot, read back, verify, fenced delete with its checks, audit row).
The three sides run back to back on identical copies of the stream in the same database
and process, in an order that rotates from round to round; each figure is the median
(and range) of the per-round ratios.
"""

from __future__ import annotations

import gc
import queue
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import orjson
import psycopg

from bench.deciders import Sum
from eskit_tasks import (
    CompactionPolicy,
    Compactor,
    NewEvent,
    SqlEventStore,
    SqlSnapshotStore,
)
from eskit_tasks.stores.sql import DEFAULT_PAGE_SIZE
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


class LeanEvent(NamedTuple):
    """The lean loops' event: the two fields the fold reads, nothing else."""

    version: int
    data: dict[str, Any]


#: Rows per fetch of the lean loops: the same page as ours (SqlEventStore's default).
LEAN_PAGE = DEFAULT_PAGE_SIZE

_LEAN_SQL = "SELECT version, data FROM eskit_events WHERE stream_pk = {p} ORDER BY version"
_LEAN_DELETE = "DELETE FROM eskit_events WHERE stream_pk = {p}"


def _fold_pages(pages: Iterator[list[Any]]) -> dict[str, int]:
    """The lean fold: (version, data) rows decoded with orjson into a two-field event and
    folded with the same decider; nothing checked, nothing measured."""
    decider, loads, event = Sum(), orjson.loads, LeanEvent
    evolve = decider.evolve
    state = decider.initial_state()
    for rows in pages:
        for version, data in rows:
            state = evolve(state, event(version, loads(data)))  # type: ignore[arg-type]
    return state


def _sequential(cur: Any) -> Iterator[list[Any]]:
    while rows := cur.fetchmany(LEAN_PAGE):
        yield rows


def _pipelined(cur: Any) -> Iterator[list[Any]]:
    """The same pages, fetched one ahead in a second thread: the driver waits for the
    network and the server without holding the GIL, so the next page arrives while this
    one is folded."""
    pages: queue.Queue[list[Any] | BaseException] = queue.Queue(maxsize=2)

    def fetch() -> None:
        try:
            while rows := cur.fetchmany(LEAN_PAGE):
                pages.put(rows)
            pages.put([])
        except BaseException as exc:  # handed to the folding thread
            pages.put(exc)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    while True:
        item = pages.get()
        if isinstance(item, BaseException):
            raise item
        if not item:
            break
        yield item
    thread.join()


def lean_postgres(url: str, pk: int, pipelined: bool = False) -> tuple[int, dict[str, int]]:
    """The lean raw loop on psycopg: a server-side cursor over ``version, data``, the
    fold, one DELETE, one transaction."""
    pages = _pipelined if pipelined else _sequential
    with psycopg.connect(libpq_url(url)) as conn, conn.transaction():
        with conn.cursor(name="lean_bench") as cur:
            cur.execute(_LEAN_SQL.format(p="%s"), (pk,))
            state = _fold_pages(pages(cur))
        deleted = conn.execute(_LEAN_DELETE.format(p="%s"), (pk,)).rowcount
    return deleted, state


def lean_sqlite(path: str, pk: int, pipelined: bool = False) -> tuple[int, dict[str, int]]:
    """The same loop on the ``sqlite3`` module, in one write transaction."""
    pages = _pipelined if pipelined else _sequential
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("BEGIN IMMEDIATE")
        cur = conn.execute(_LEAN_SQL.format(p="?"), (pk,))
        state = _fold_pages(pages(cur))
        deleted = conn.execute(_LEAN_DELETE.format(p="?"), (pk,)).rowcount
        conn.execute("COMMIT")
    finally:
        conn.close()
    return deleted, state


def compact_ours(store: SqlEventStore, stream_id: str) -> int:
    """Ours: one ``Compactor.compact`` of the whole stream; the events it deleted."""
    result = Compactor(
        store=store,
        snapshot_store=SqlSnapshotStore(store.engine, create_tables=False),
        decider=Sum(),
        state_type=dict,
        policy=CompactionPolicy(retain_last=0),
    ).compact("bench", stream_id)
    if result.outcome != "compacted":
        raise RuntimeError(f"compaction did not succeed: {result}")
    return result.events_deleted


def compacted_state(store: SqlEventStore, stream_id: str) -> dict[str, int]:
    """The state in the snapshot a compaction left (read after the clock stopped)."""
    snap = SqlSnapshotStore(store.engine, create_tables=False).latest("bench", stream_id)
    assert snap is not None
    state: dict[str, int] = orjson.loads(snap.state)
    return state


def ours(store: SqlEventStore, stream_id: str) -> tuple[int, dict[str, int]]:
    """:func:`compact_ours`, and the state its snapshot holds."""
    return compact_ours(store, stream_id), compacted_state(store, stream_id)


def _run_once(store: SqlEventStore, side: str, stream_id: str) -> int:
    """One side on its copy of the stream (the part that is timed): events deleted."""
    if side == "ours":
        return compact_ours(store, stream_id)
    pk = _stream_pk(store, stream_id)
    pipelined = side == "pipelined"
    if store.engine.dialect.name == "postgresql":
        deleted, state = lean_postgres(store.engine.url.render_as_string(False), pk, pipelined)
    else:
        deleted, state = lean_sqlite(str(store.engine.url.database), pk, pipelined)
    _LEAN_STATES[stream_id] = state
    return deleted


#: The states the lean loops folded, by stream, compared with ours after each round.
_LEAN_STATES: dict[str, dict[str, int]] = {}


SIDES = ("lean", "pipelined", "ours")


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 3),
        "min": round(ordered[0], 3),
        "max": round(ordered[-1], 3),
    }


def measure_size(store: SqlEventStore, events: int, rounds: int) -> dict[str, Any]:
    """``rounds`` back-to-back rounds of the three sides on identical copies of one
    stream of ``events`` events; the order of the sides rotates from round to round."""
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for r in range(rounds):
        ids = {side: f"{side}-{events}-{r}-{time.time_ns()}" for side in SIDES}
        for side in SIDES:
            seed(store, ids[side], events)
        for side in SIDES[r % 3 :] + SIDES[: r % 3]:
            gc.collect()
            started = time.perf_counter()
            deleted = _run_once(store, side, ids[side])
            times[side].append(time.perf_counter() - started)
            if deleted != events:
                raise RuntimeError(f"{side} deleted {deleted} of {events} events")
        states = {side: _LEAN_STATES.pop(ids[side]) for side in SIDES if side != "ours"}
        states["ours"] = compacted_state(store, ids["ours"])
        if len({str(sorted(state.items())) for state in states.values()}) != 1:
            raise RuntimeError(f"the sides folded different states: {states}")
    return {
        "events": events,
        "rounds": rounds,
        "events_per_s": {side: round(events / statistics.median(times[side])) for side in SIDES},
        # Per round: the baseline's time over ours (above 1: ours is faster).
        "vs_lean": _spread([t / o for t, o in zip(times["lean"], times["ours"], strict=True)]),
        "vs_pipelined": _spread(
            [t / o for t, o in zip(times["pipelined"], times["ours"], strict=True)]
        ),
    }


def measure(url: str, sizes: tuple[int, ...], rounds: int = 5) -> dict[str, Any]:
    """Ours against the lean and the pipelined loops on ``url`` at each size; the
    headline ratios are the lowest medians over the sizes."""
    store = SqlEventStore.from_url(url)
    try:
        results = [measure_size(store, events, rounds) for events in sizes]
    finally:
        store.engine.dispose()
    return {
        "backend": store.engine.dialect.name,
        "sizes": results,
        "ratio": min(r["vs_lean"]["median"] for r in results),
        "ratio_pipelined": min(r["vs_pipelined"]["median"] for r in results),
    }
