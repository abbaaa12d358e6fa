"""The worker's message consumer: Celery's, guarded against malformed task messages."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer
from vine import promise

log = logging.getLogger("eskit_tasks")


class GuardedConsumer(Consumer):
    """Celery's consumer, rejecting malformed task messages instead of dying on them.

    Celery's handler of incoming task messages indexes their headers and decoded body
    before checking their shapes: a JSON body such as ``42``, ``null``, ``""`` or a list
    of two items, or a ``task``/``id``/``timelimit`` header of the wrong type, raises in
    the worker's main process, which stops ("Unrecoverable error") and leaves the message
    for the next worker to die on. Such messages are rejected (dropped, logged) here.
    """

    def create_task_handler(self, promise: Any = promise) -> Callable[[Any], None]:
        handle: Callable[[Any], None] = super().create_task_handler(promise)

        def on_task_received(message: Any) -> None:
            problem = malformed_task_message(message)
            if problem is None:
                handle(message)
                return
            log.error("eskit-tasks: rejected a malformed task message: %s", problem)
            message.reject_log_error(log, self.connection_errors)  # type: ignore[attr-defined]

        return on_task_received


def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def malformed_task_message(message: Any) -> str | None:
    """What is wrong with a protocol 2 task message, None if Celery may handle it (also
    when it is not a task message or cannot be decoded: Celery rejects those itself)."""
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return None
    if not isinstance(headers["task"], str) or not isinstance(headers.get("id"), str):
        return "the task and id headers must be strings"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple) and len(limits) == 2 and all(map(_number_or_none, limits))
    ):
        return "the timelimit header must be [soft, hard] seconds"
    try:
        body = message.payload
    except Exception:  # untrusted content type or undecodable: Celery rejects it
        return None
    if not (
        isinstance(body, list | tuple)
        and len(body) == 3
        and isinstance(body[0], list | tuple)
        and isinstance(body[1], dict)
        and (body[2] is None or isinstance(body[2], dict))
    ):
        return "the body must be a JSON list [args, kwargs, embed]"
    return None
