"""Peak memory of a compaction: flat in the length of the stream.

Goal (issue 15, P2): the peak at 1,000,000 events within 1.2x of the peak at 100,000
and under 80 MB.

Each size runs in a fresh process: import everything and connect, note the resident
set size, reset the kernel's peak counter, compact, and read the peak again. The figure
is peak minus the RSS after imports, so it measures the compaction alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import REPO


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(url: str, stream_id: str) -> None:
    from bench.throughput import ours
    from eskit_tasks import SqlEventStore

    store = SqlEventStore.from_url(url)
    store.head_version("bench", stream_id)  # connect, warm the pool
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    started = time.perf_counter()
    deleted, _ = ours(store, stream_id)
    elapsed = time.perf_counter() - started
    print(
        json.dumps(
            {
                "deleted": deleted,
                "baseline_rss": baseline,
                "peak_rss": _status("VmHWM"),
                "seconds": elapsed,
            }
        )
    )


def _measure(url: str, events: int) -> dict[str, Any]:
    from bench.throughput import seed
    from eskit_tasks import SqlEventStore

    store = SqlEventStore.from_url(url)
    stream_id = f"mem-{events}-{time.time_ns()}"
    seed(store, stream_id, events)
    store.engine.dispose()
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", url, stream_id],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    if figures["deleted"] != events:
        raise RuntimeError(f"compacted {figures['deleted']} of {events} events")
    return {
        "events": events,
        "peak_mb": round((figures["peak_rss"] - figures["baseline_rss"]) / 2**20, 1),
        "seconds": round(figures["seconds"], 2),
    }


#: Runs at the small size. A read keeps a few pages alive at once (the one being folded
#: and those the read-ahead thread holds); how many at the worst instant depends on
#: timing, and a short run meets that instant less often than a long one (100,000
#: events gave 7.8 MB in one run and 10.0 MB in the next). The highest peak of three
#: small runs is compared with the single long run, which meets it every time.
SMALL_RUNS = 3


def measure(url: str, small: int, large: int) -> dict[str, Any]:
    """Peak memory compacting ``large`` events vs ``small`` events on ``url`` (the
    highest of ``SMALL_RUNS`` runs at the small size, one run at the large)."""
    lows = [_measure(url, small) for _ in range(SMALL_RUNS)]
    low = max(lows, key=lambda r: r["peak_mb"])
    high = _measure(url, large)
    ratio = high["peak_mb"] / max(low["peak_mb"], 0.1)
    return {
        "small": {**low, "runs_peak_mb": [r["peak_mb"] for r in lows]},
        "large": high,
        "ratio": round(ratio, 2),
        "goal": "large peak < 80 MB and within 1.2x of small",
        "met": high["peak_mb"] < 80 and ratio <= 1.2,
    }


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
