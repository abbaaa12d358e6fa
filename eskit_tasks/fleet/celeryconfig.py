"""The packaged Celery defaults of an eskit-tasks fleet.

:func:`celery_config` turns :class:`~eskit_tasks.fleet.settings.EskitSettings` into
Celery settings, each explained below. As a module (``config_from_object``) it holds
those settings for the environment's ``EskitSettings``: a worker installed from a wheel
starts with them alone. The operators' ``celeryconfig.py`` imports them and overrides
what it needs (see the repo root's file).
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab
from kombu import Queue

from eskit_tasks.fleet.constants import (
    COMPACT_BATCH_TASK,
    COMPACT_STREAM_TASK,
    FAN_OUT_TASK,
    FINISH_RUN_TASK,
)
from eskit_tasks.fleet.settings import EskitSettings, get_settings


def celery_config(s: EskitSettings) -> dict[str, Any]:
    """The Celery settings of a fleet with settings ``s``."""
    minute, hour, day, month, weekday = s.nightly_cron.split()
    return {
        # -- where ------------------------------------------------------------------
        "broker_url": s.broker_url,
        "result_backend": s.result_backend,
        # -- serialisation: JSON only -------------------------------------------------
        # Pickle would let anyone who can write to the broker run code on every worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # -- long tasks on a Redis broker ---------------------------------------------
        # Acknowledge a message only after the compaction finished, so a worker that
        # dies mid-compaction does not lose the task: it is delivered again (compaction
        # is idempotent)...
        "task_acks_late": True,
        # ...also when the worker child is killed (OOM, kill -9): requeue, not fail.
        "task_reject_on_worker_lost": True,
        # Take one message at a time: a long compaction must not hold others hostage in
        # its prefetch buffer while idle workers wait.
        "worker_prefetch_multiplier": 1,
        # The soft limit raises inside the task so it can stop cleanly (nothing is
        # deleted until the final transaction); the hard limit kills the child. Both
        # stay below the visibility timeout, or Redis would hand a healthy running task
        # to a second worker. RabbitMQ instead closes a channel whose message stays
        # unacknowledged longer than its consumer_timeout (30 min by default): raise it
        # above ESKIT_TASK_TIME_LIMIT in rabbitmq.conf (consumer_timeout = 3600000) when
        # compactions may run that long.
        "task_soft_time_limit": s.task_soft_time_limit,
        "task_time_limit": s.task_time_limit,
        # Redis has no real acknowledgements: an unacked message becomes visible again
        # after the visibility timeout, found by a sweep every ESKIT_RESTORE_INTERVAL
        # seconds (kombu's default sweeps only every ~100 s). This is how the task of a
        # worker killed with -9 is redelivered.
        "broker_transport_options": {
            "visibility_timeout": s.visibility_timeout,
            "unacked_restore_interval": s.restore_interval,
            "unacked_restore_throttle": 1,
        },
        # The result backend on Redis uses the same option for its pub/sub bookkeeping.
        "result_backend_transport_options": {"visibility_timeout": s.visibility_timeout},
        # If the worker loses the broker connection, stop running tasks whose message
        # will be redelivered anyway, instead of finishing them twice.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Retry connecting to the broker at start-up (containers start in any order).
        "broker_connection_retry_on_startup": True,
        # -- queues and routing -------------------------------------------------------
        # A dedicated queue keeps compactions apart from other work on the same broker;
        # the fan-out has its own so paging continues while the compaction queue is full.
        "task_queues": (Queue(s.compaction_queue), Queue(s.fanout_queue)),
        "task_default_queue": s.compaction_queue,
        "task_routes": {
            COMPACT_STREAM_TASK: {"queue": s.compaction_queue},
            COMPACT_BATCH_TASK: {"queue": s.compaction_queue},
            FAN_OUT_TASK: {"queue": s.fanout_queue},
            # The end of a run (reclaiming space) must not wait behind a full queue.
            FINISH_RUN_TASK: {"queue": s.fanout_queue},
        },
        # -- results ------------------------------------------------------------------
        # No STARTED state: it would cost a result-backend write per task, and what a
        # shell wants to know lives in the run's progress (run.progress()) and in
        # Flower's events.
        "task_track_started": False,
        # Keep results a week.
        "result_expires": 7 * 24 * 3600,
        # Record task args in the backend so a result can be traced back to its stream.
        "result_extended": True,
        # -- events (off until a monitor asks) ----------------------------------------
        # Task events cost the worker a broker round trip per event, three per task:
        # with small streams that was close to half of a worker's main process. Flower
        # turns them on by itself (it sends `enable_events` to every worker every few
        # seconds), and `celery -A eskit_tasks control enable_events` does it by hand;
        # they stay on until the worker restarts. Set True to have them from the start.
        "worker_send_task_events": False,
        # No "task-sent" event per published message either: the fan-out publishes
        # thousands of tasks a second and that second Redis round trip per task was a
        # third of its time.
        "task_send_sent_event": False,
        # -- schedule (celery beat) ---------------------------------------------------
        # One nightly fan-out. Change the time with ESKIT_NIGHTLY_CRON ("minute hour day
        # month weekday", UTC) and the policy with ESKIT_NIGHTLY_POLICY (JSON), or set
        # beat_schedule in your celeryconfig.py.
        "timezone": "UTC",
        "beat_schedule": {
            "eskit-nightly-compaction": {
                "task": FAN_OUT_TASK,
                "schedule": crontab(
                    minute=minute,
                    hour=hour,
                    day_of_month=day,
                    month_of_year=month,
                    day_of_week=weekday,
                ),
                "kwargs": s.nightly_policy_kwargs,
            },
        },
        # -- single beat (optional) ---------------------------------------------------
        # Two `celery beat` processes would enqueue every run twice (harmless — locks
        # and fencing make the copies no-ops — but wasteful). With the `redbeat` extra
        # (`pip install 'eskit-tasks[redbeat]'`) run `celery -A eskit_tasks beat -S
        # redbeat.RedBeatScheduler`: only the beat holding this Redis lock schedules.
        "redbeat_redis_url": s.redis_url,
        "redbeat_lock_key": "eskit:redbeat:lock",
    }


# The settings as module attributes, for config_from_object and `from ... import *`.
_config = celery_config(get_settings())
globals().update(_config)
__all__ = sorted(_config)
