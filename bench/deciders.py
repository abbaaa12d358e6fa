"""The trivial decider every benchmark folds with (both sides of each comparison).

Workers import it through ``ESKIT_DECIDER_MODULES=bench.deciders``; ``compact-all
--local`` through ``--decider-module bench.deciders``. It registers one decider under
every stream type the benchmarks seed.
"""

from __future__ import annotations

from typing import Any

from eskit_tasks import NewEvent, RecordedEvent, register_decider

#: Stream types seeded by bench.fleet (one per side and round, so each run picks only
#: its own copy of the data) and by bench.fanout.
FLEET_ROUNDS_MAX = 10
STREAM_TYPES = (
    *(
        f"{side}{r}"
        for side in ("bench_fleet", "bench_split", "bench_local")
        for r in range(FLEET_ROUNDS_MAX)
    ),
    "bench_fanout",
)


class Sum:
    """Counts the events and sums their amounts."""

    def initial_state(self) -> dict[str, int]:
        return {"n": 0, "total": 0}

    def evolve(self, state: dict[str, int], event: RecordedEvent) -> dict[str, int]:
        state["n"] += 1
        state["total"] += event.data["amount"]
        return state

    def decide(self, command: Any, state: dict[str, int]) -> list[NewEvent]:
        return []


for _type in STREAM_TYPES:
    register_decider(_type, Sum(), dict)
