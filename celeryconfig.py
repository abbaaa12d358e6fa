"""Celery configuration for an eskit-tasks fleet — the operators' file.

Read by the app with ``config_from_object`` (``ESKIT_CELERY_CONFIG`` names another
module). Every value can be overridden from the environment through
``eskit_tasks.fleet.settings`` (CELERY_BROKER_URL, CELERY_RESULT_BACKEND, ESKIT_DATABASE_URL,
ESKIT_REDIS_URL, ESKIT_* timings); edit this file for anything else.
"""

from __future__ import annotations

from celery.schedules import crontab
from kombu import Queue

from eskit_tasks.fleet.settings import get_settings

_s = get_settings()

# -- where --------------------------------------------------------------------------
broker_url = _s.broker_url
result_backend = _s.result_backend

# -- serialisation: JSON only ---------------------------------------------------------
# Pickle would let anyone who can write to the broker run code on every worker.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# -- long tasks on a Redis broker ----------------------------------------------------
# Acknowledge a message only after the compaction finished, so a worker that dies
# mid-compaction does not lose the task: it is delivered again (compaction is idempotent).
task_acks_late = True
# ...and also when the worker child is killed (OOM, kill -9): requeue instead of failing.
task_reject_on_worker_lost = True
# Take one message at a time: a long compaction must not hold others hostage in its
# prefetch buffer while idle workers wait.
worker_prefetch_multiplier = 1
# Soft limit raises inside the task so it can stop cleanly (nothing is deleted until the
# final transaction); the hard limit kills the child. Both stay below the visibility
# timeout, or Redis would hand a healthy running task to a second worker.
task_soft_time_limit = _s.task_soft_time_limit
task_time_limit = _s.task_time_limit
# RabbitMQ instead closes a channel whose message stays unacknowledged longer than its
# consumer_timeout (30 min by default): raise it above ESKIT_TASK_TIME_LIMIT in
# rabbitmq.conf (consumer_timeout = 3600000) when compactions may run that long.
# Redis has no real acknowledgements: an unacked message becomes visible again after
# the visibility timeout, found by a sweep every ESKIT_RESTORE_INTERVAL seconds (kombu's
# default sweeps only every ~100 s). This is how the task of a worker killed with -9 is
# redelivered.
broker_transport_options = {
    "visibility_timeout": _s.visibility_timeout,
    "unacked_restore_interval": _s.restore_interval,
    "unacked_restore_throttle": 1,
}
# The result backend on Redis uses the same option for its own pub/sub bookkeeping.
result_backend_transport_options = {"visibility_timeout": _s.visibility_timeout}
# If the worker loses the broker connection, stop running tasks whose message will be
# redelivered anyway, instead of finishing them twice.
worker_cancel_long_running_tasks_on_connection_loss = True
# Retry connecting to the broker at start-up (containers start in any order).
broker_connection_retry_on_startup = True

# -- queues and routing --------------------------------------------------------------
# A dedicated queue keeps compactions apart from other work on the same broker; the
# fan-out has its own so paging continues while the compaction queue is full.
task_queues = (Queue(_s.compaction_queue), Queue(_s.fanout_queue))
task_default_queue = _s.compaction_queue
task_routes = {
    "eskit_tasks.compact_stream": {"queue": _s.compaction_queue},
    "eskit_tasks.fan_out": {"queue": _s.fanout_queue},
}

# -- results -------------------------------------------------------------------------
# No STARTED state: it would cost a result-backend write per task, and what a shell
# wants to know lives in the run's progress (run.progress()) and in Flower's events.
task_track_started = False
# Keep results a week.
result_expires = 7 * 24 * 3600
# Record task args in the backend so a result can be traced back to its stream.
result_extended = True

# -- events (off until a monitor asks) ------------------------------------------------
# Task events cost the worker a broker round trip per event, three per task: with
# small streams that was close to half of a worker's main process. Flower turns them
# on by itself (it sends `enable_events` to every worker every few seconds), and
# `celery -A eskit_tasks control enable_events` does it by hand; they stay on until
# the worker restarts. Set True to have them from the start.
worker_send_task_events = False
# No "task-sent" event per published message either: the fan-out publishes thousands
# of tasks a second and that second Redis round trip per task was a third of its time.
task_send_sent_event = False

# -- schedule (celery beat) ----------------------------------------------------------
# One nightly fan-out. Change the time with ESKIT_NIGHTLY_CRON ("minute hour day month
# weekday", UTC) and the policy with ESKIT_NIGHTLY_POLICY (JSON), or edit below.
timezone = "UTC"
_minute, _hour, _day, _month, _weekday = _s.nightly_cron.split()
beat_schedule = {
    "eskit-nightly-compaction": {
        "task": "eskit_tasks.fan_out",
        "schedule": crontab(
            minute=_minute,
            hour=_hour,
            day_of_month=_day,
            month_of_year=_month,
            day_of_week=_weekday,
        ),
        "kwargs": _s.nightly_policy_kwargs,
    },
}

# -- single beat (optional) ----------------------------------------------------------
# Two `celery beat` processes would enqueue every run twice (harmless — locks and
# fencing make the copies no-ops — but wasteful). With the `redbeat` extra
# (`pip install 'eskit-tasks[redbeat]'`) run `celery -A eskit_tasks beat -S
# redbeat.RedBeatScheduler`: only the beat holding this Redis lock schedules.
redbeat_redis_url = _s.redis_url
redbeat_lock_key = "eskit:redbeat:lock"
