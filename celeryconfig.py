"""Celery configuration for an eskit-tasks fleet — the operators' file.

The app reads it with ``config_from_object`` (``ESKIT_CELERY_CONFIG`` names another
module). It starts from the packaged defaults, ``eskit_tasks.fleet.celeryconfig``,
where every setting is explained; most of them follow the environment through
``eskit_tasks.fleet.settings`` (CELERY_BROKER_URL, CELERY_RESULT_BACKEND,
ESKIT_DATABASE_URL, ESKIT_REDIS_URL, ESKIT_* timings and queues). Override anything
else below: a name assigned here replaces the default.
"""

from __future__ import annotations

from eskit_tasks.fleet.celeryconfig import *  # noqa: F403 -- the packaged defaults

# Examples (uncomment to use):
#
# from celery.schedules import crontab
# beat_schedule = {
#     "eskit-nightly-compaction": {
#         "task": "eskit_tasks.fan_out",
#         "schedule": crontab(minute="30", hour="2"),
#         "kwargs": {"min_events": 1000, "retain_last": 100},
#     },
# }
# worker_send_task_events = True  # task events from the start, without Flower asking
