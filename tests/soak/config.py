"""What a soak run does: its size, its timings and the fleet settings its workers get."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eskit_tasks.testing.services import postgres_admin_url

#: Seconds a stream lock lives without renewal; a paused worker is stopped longer than this.
LOCK_TTL_S = 3.0
#: Redelivery of the messages of a killed worker takes this long (Redis visibility timeout).
VISIBILITY_TIMEOUT_S = 30.0

#: Fleet settings of the workers and of this process's Celery client. Short timings, so
#: that a killed worker's tasks come back and a lost lock expires within a short run.
FLEET_ENV: dict[str, str] = {
    # tests.fleet_deciders and the soak's strictly compared kinds (tests/soak/kinds.py).
    "ESKIT_DECIDER_MODULES": "tests.soak.fleet_deciders",
    "ESKIT_CELERY_CONFIG": "celeryconfig",
    "ESKIT_LOCK_TTL": str(LOCK_TTL_S),
    "ESKIT_TASK_SOFT_TIME_LIMIT": "20",
    "ESKIT_TASK_TIME_LIMIT": "25",
    "ESKIT_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT_S),
    "ESKIT_RESTORE_INTERVAL": "1",
    "ESKIT_LOCKED_RETRY_BASE": "0.5",
    "ESKIT_LOCKED_MAX_RETRIES": "6",
    "ESKIT_FANOUT_BACKOFF": "0.5",
    # Several pages per run (the duplicated fan-out and Redis restarts meet paging) and
    # some back-pressure when runs overlap.
    "ESKIT_FANOUT_PAGE_SIZE": "50",
    "ESKIT_FANOUT_HIGH_WATER": "400",
    "ESKIT_RUN_TTL": "7200",
    # Streams of type "slow" fold at this many seconds per event: a compaction of one
    # takes long enough for a kill -9 or a pause to land in the middle of it.
    "ESKIT_TEST_SLOW_S": "0.01",
}


@dataclass
class SoakConfig:
    """One soak run. ``seconds`` is the workload; start-up and the quiesce come on top."""

    seconds: float = 600.0
    #: Seeds the stream sizes, the workload's choices, the policies and the fault
    #: schedule (thread interleavings are not reproducible). None: a random seed.
    seed: int | None = None
    ledger_streams: int = 300
    slow_streams: int = 20
    #: Streams of each strictly compared kind: ``recent`` (an insertion-ordered dict),
    #: ``agenda`` (a ZoneInfo datetime in a model), ``ticket`` (enums in a model).
    strict_streams: int = 20
    writers: int = 3
    readers: int = 2
    workers: int = 3
    worker_concurrency: int = 2
    #: Seconds between fan-outs (uniform in this range).
    fanout_every: tuple[float, float] = (2.0, 5.0)
    #: No new fan-out while this many runs are still going (the fleet would fall ever
    #: further behind, and the quiesce would have to drain it all).
    max_running_runs: int = 6
    #: Seconds between the end of one fault and the start of the next.
    fault_gap: tuple[float, float] = (2.0, 6.0)
    #: The projection (tests/soak/consumers.py): events per read_all page; it follows
    #: the store for a while (seconds, uniform in ``projection_follow``), then reads
    #: nothing for a while (``projection_pause``) and catches up, and so on.
    projection_page: int = 200
    projection_follow: tuple[float, float] = (3.0, 10.0)
    projection_pause: tuple[float, float] = (2.0, 8.0)
    #: Seconds between two restores of a compacted stream, and at most how many.
    restore_every: tuple[float, float] = (3.0, 8.0)
    max_restores: int = 30
    #: The pyeventsourcing application (tests/soak/esapp.py): its aggregates, the most
    #: seconds between two of its writer's saves, the seconds between two stale copies
    #: taken and the most waiting at once, and its follower's follow and pause times.
    app_aggregates: int = 20
    #: Seconds between two runs over its purses only (one at a time).
    app_fanout_every: tuple[float, float] = (3.0, 6.0)
    app_pace: float = 0.05
    app_stale_every: float = 1.0
    app_stale_pending: int = 8
    app_follow: tuple[float, float] = (3.0, 10.0)
    app_pause: tuple[float, float] = (2.0, 8.0)
    #: Seconds between two checks of the database during the run.
    check_every: float = 5.0
    #: Seconds between progress lines on stdout (0: none).
    progress_every: float = 15.0
    #: Upper bound on each wait of the quiesce phase.
    drain_timeout: float = VISIBILITY_TIMEOUT_S + 150.0
    #: Admin URL of the PostgreSQL server where the soak creates (and drops) its database.
    admin_url: str = field(default_factory=postgres_admin_url)
    #: Where logs go; None: a temporary directory, removed after a clean run.
    workdir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["workdir"] = None if self.workdir is None else str(self.workdir)
        data["fanout_every"] = list(self.fanout_every)
        data["fault_gap"] = list(self.fault_gap)
        for name in (
            "projection_follow",
            "projection_pause",
            "restore_every",
            "app_fanout_every",
            "app_follow",
            "app_pause",
        ):
            data[name] = list(data[name])
        data.pop("admin_url")  # may hold a password
        return data
