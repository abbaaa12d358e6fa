"""What the snapshot's guards cost a load: ``load_state`` against a plain load.

A stream with a large state (a dict of ``keys`` entries, folded from one event per key)
is compacted, then one event appended. Ours: ``load_state`` — read the verified
snapshot, sha256 its bytes against the stored hash, check its schema marker, decode it
strictly (pydantic, then encode again and compare with the stored bytes), fold the
tail. Baseline ("plain"): the same snapshot read and the same tail fold, with the
snapshot decoded by one pydantic ``validate_json`` and nothing checked — what a load
costs without the guards. Both alternate on the same database, several rounds.

The sha256 alone is timed on the same bytes, so its share of a load is reported too.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from typing import Any

from pydantic import TypeAdapter

from eskit_tasks import (
    CompactionPolicy,
    Compactor,
    NewEvent,
    RecordedEvent,
    SqlEventStore,
    SqlSnapshotStore,
    load_state,
)
from eskit_tasks.core.loading import fold

ROUNDS = 7


class Index:
    """Keeps the newest version of each key: the state grows with the stream."""

    def initial_state(self) -> dict[str, int]:
        return {}

    def evolve(self, state: dict[str, int], event: RecordedEvent) -> dict[str, int]:
        state[event.data["key"]] = event.version
        return state

    def decide(self, command: Any, state: dict[str, int]) -> list[NewEvent]:
        return []


def _plain_load(store: SqlEventStore, snaps: SqlSnapshotStore, adapter: TypeAdapter[Any]) -> Any:
    snap = snaps.latest("index", "big")
    assert snap is not None
    state = adapter.validate_json(snap.state)
    events = store.read("index", "big", from_version=snap.version + 1)
    state, _ = fold(
        Index(), state, events, after=snap.version, stream_type="index", stream_id="big"
    )
    return state


def measure(url: str, keys: int) -> dict[str, Any]:
    store = SqlEventStore.from_url(url)
    snaps = SqlSnapshotStore(store.engine)
    head = 0
    while head < keys:
        size = min(10_000, keys - head)
        batch = [NewEvent("Put", {"key": f"customer-{head + i:08d}"}) for i in range(size)]
        head = store.append("index", "big", batch, expected_version=head)
    result = Compactor(
        store=store,
        snapshot_store=snaps,
        decider=Index(),
        state_type=dict,
        policy=CompactionPolicy(),
    ).compact("index", "big")
    assert result.outcome == "compacted", result.error
    store.append("index", "big", [NewEvent("Put", {"key": "late"})], expected_version=head)
    snap = snaps.latest("index", "big")
    assert snap is not None
    adapter: TypeAdapter[Any] = TypeAdapter(dict)

    ours_s, plain_s, hash_s = [], [], []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        state, _version = load_state(store, snaps, Index(), dict, "index", "big")
        ours_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        plain = _plain_load(store, snaps, adapter)
        plain_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        hashlib.sha256(snap.state).hexdigest()
        hash_s.append(time.perf_counter() - started)
        assert state == plain
        assert len(state) == keys + 1
    store.engine.dispose()
    ours, baseline, sha = (statistics.median(x) for x in (ours_s, plain_s, hash_s))
    ratios = sorted(p / o for p, o in zip(plain_s, ours_s, strict=True))
    return {
        "what": f"load_state of a {len(snap.state) / 1e6:.2f} MB snapshot + 1 event",
        "summary": (
            f"{ours * 1000:.1f} vs {baseline * 1000:.1f} ms (plain load); "
            f"sha256 {sha * 1000:.2f} ms = {sha / ours:.0%} of ours"
        ),
        "snapshot_bytes": len(snap.state),
        "ours_ms": round(ours * 1000, 2),
        "plain_ms": round(baseline * 1000, 2),
        "sha256_ms": round(sha * 1000, 3),
        "sha256_share": round(sha / ours, 3),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)],
        "rounds": ROUNDS,
    }
