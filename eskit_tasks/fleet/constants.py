"""Redis key prefixes, queue names and default timings used by the fleet."""

from __future__ import annotations

#: Prefix of every Redis key eskit-tasks writes.
KEY_PREFIX = "eskit"
#: Per-stream lock: ``eskit:lock:<sha256 of the stream key>``; value: ``<task id>|<nonce>``.
LOCK_PREFIX = f"{KEY_PREFIX}:lock:"
#: Run progress hash: ``eskit:run:{<run id>}``.
RUN_PREFIX = f"{KEY_PREFIX}:run:"
#: "This task's result is claimed": ``eskit:done:<hash of the task id>``; the first copy
#: of a redelivered task to finish owns the result, the others store nothing.
DONE_PREFIX = f"{KEY_PREFIX}:done:"

#: Queue for compact_stream tasks.
COMPACTION_QUEUE = "compaction"
#: Queue for fan_out tasks, so paging continues while the compaction queue is full.
FANOUT_QUEUE = "compaction-fanout"

#: Seconds a stream lock lives without renewal (a dead worker's lock frees itself this fast).
LOCK_TTL_S = 60.0
#: A held lock is renewed this often, as a fraction of its TTL.
LOCK_RENEW_FRACTION = 1 / 3
#: Seconds run progress stays readable in Redis after its last update.
RUN_TTL_S = 7 * 24 * 3600
#: Failed streams remembered per run (with their errors) for the summary.
RUN_FAILED_KEEP = 1000
#: Stream results a run keeps for its followers (compact-all --wait --json): a Redis
#: stream trimmed to about this many, the newest (some 5 MB at most).
RUN_RESULTS_KEEP = 10_000

#: Soft time limit of one compaction (raises inside the task so it can stop cleanly).
TASK_SOFT_TIME_LIMIT_S = 50 * 60
#: Hard time limit: the worker child is killed.
TASK_TIME_LIMIT_S = 55 * 60
#: Redis broker visibility timeout: an unacknowledged message is redelivered after this.
#: Must exceed the hard time limit, or a slow but healthy task would run twice at once.
VISIBILITY_TIMEOUT_S = 60 * 60

#: Seconds between the Redis broker's sweeps for unacknowledged messages past the
#: visibility timeout (the messages of a worker that died).
RESTORE_INTERVAL_S = 60.0

#: Retries of a compact_stream copy that finds the lock held (or Redis unreachable).
LOCKED_MAX_RETRIES = 5
#: First retry delay in seconds; doubles each time up to LOCKED_RETRY_MAX_S.
LOCKED_RETRY_BASE_S = 5.0
LOCKED_RETRY_MAX_S = 300.0

#: Candidate streams read per fan-out page.
FANOUT_PAGE_SIZE = 1000
#: A page's task messages are sent to a Redis broker in pipelines of this many commands
#: (kombu's Producer.batch); other brokers publish them one by one.
FANOUT_PUBLISH_BATCH = 100
#: A fan-out sends streams of few live events together, one message per batch of at
#: most this many events (ESKIT_BATCH_EVENTS; a stream of more than half of it goes
#: alone; 0: every stream alone). Per-task costs are then paid once per batch.
BATCH_EVENTS = 5000
#: The most streams in one batch.
BATCH_MAX_STREAMS = 50
#: Retries of a fan-out page whose database, Redis or broker is unreachable.
FANOUT_MAX_RETRIES = 10
#: The fan-out waits while the compaction queue holds this many messages or more.
FANOUT_HIGH_WATER = 2000
#: Seconds before a fan-out that found the queue full looks again.
FANOUT_BACKOFF_S = 5.0
#: The fewest seconds between two looks of a paused run's fan-out or queued tasks.
PAUSE_POLL_MIN_S = 1.0
#: The longest a scheduled run's fan-out waits before it looks at the window again.
WINDOW_POLL_MAX_S = 600.0

#: Address the worker's metrics port binds to (ESKIT_METRICS_ADDRESS): every interface,
#: so Prometheus can scrape a worker in a container. The page holds counts only.
METRICS_ADDRESS = "0.0.0.0"  # noqa: S104 -- see above
#: Prefix of the temporary directory where a worker's prefork children write metrics.
METRICS_DIR_PREFIX = "eskit-metrics-"
#: Buckets of eskit_compaction_duration_seconds: 1 ms to 1 h, about 2.5x apart.
COMPACTION_DURATION_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
)

#: Logger of the one structured (JSON) line per compaction attempt.
COMPACTION_LOGGER = "eskit_tasks.compaction"

#: The task names: part of the message format (beat schedules and other producers send
#: them by name), never to change.
COMPACT_STREAM_TASK = "eskit_tasks.compact_stream"
#: Several small streams in one message (see eskit_tasks.fleet.batch).
COMPACT_BATCH_TASK = "eskit_tasks.compact_batch"
FAN_OUT_TASK = "eskit_tasks.fan_out"
FINISH_RUN_TASK = "eskit_tasks.finish_run"
#: Retries of a run's finishing step whose Redis or database is unreachable.
FINISH_MAX_RETRIES = 20
#: Seconds a run may stay complete-but-not-finished before run.wait() sends its
#: finishing step again (it is idempotent; the first one may have been lost).
FINISH_RESEND_S = 60.0
