"""The fleet's two Celery tasks of the default app, under their historical import path:
``from eskit_tasks.tasks import compact_stream, fan_out``.

They are defined in :mod:`eskit_tasks.fleet.compact_task` and
:mod:`eskit_tasks.fleet.fan_out` and registered by
:func:`eskit_tasks.fleet.app.create_app`; names and message formats are unchanged
(``eskit_tasks.compact_stream``, ``eskit_tasks.fan_out``).
"""

from __future__ import annotations

from typing import Any

from celery import Task

from eskit_tasks.fleet.app import app
from eskit_tasks.fleet.constants import COMPACT_STREAM_TASK, FAN_OUT_TASK

compact_stream: Task[Any, Any] = app.tasks[COMPACT_STREAM_TASK]
fan_out: Task[Any, Any] = app.tasks[FAN_OUT_TASK]

__all__ = ["compact_stream", "fan_out"]
