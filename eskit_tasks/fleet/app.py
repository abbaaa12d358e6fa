"""The Celery application: ``celery -A eskit_tasks worker`` / ``beat`` find it here."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from logging.handlers import WatchedFileHandler
from typing import Any

from celery import Celery, signals
from celery.worker.consumer import Consumer
from vine import promise

from eskit_tasks.core.registry import import_decider_modules
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.fleet import metrics
from eskit_tasks.fleet.constants import COMPACTION_LOGGER
from eskit_tasks.fleet.settings import get_settings

log = logging.getLogger("eskit_tasks")


def create_app() -> Celery:
    """Build the app from the config module named by ESKIT_CELERY_CONFIG.

    Raises:
        ConfigurationError: the config module cannot be imported.
    """
    name = get_settings().celery_config
    try:
        importlib.import_module(name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import the Celery config module {name!r} ({exc}). Run from the "
            "directory that holds celeryconfig.py, put it on PYTHONPATH, or set "
            "ESKIT_CELERY_CONFIG to your own module."
        ) from exc
    celery = Celery("eskit_tasks", include=["eskit_tasks.tasks"])
    celery.config_from_object(name)
    # Not left to the config module: a worker must never die on a malformed message.
    celery.conf.worker_consumer = "eskit_tasks.fleet.app:GuardedConsumer"
    return celery


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


app = create_app()


def _fatal_at_start(receiver: Callable[..., None]) -> Callable[..., None]:
    """Stop the worker when ``receiver`` raises ConfigurationError. Celery logs and
    ignores exceptions of signal handlers (before the worker's logging is even set up),
    so a worker would otherwise start without what it was configured for."""

    @functools.wraps(receiver)
    def run(**kwargs: Any) -> None:
        try:
            receiver(**kwargs)
        except ConfigurationError as exc:
            raise SystemExit(f"eskit-tasks: the worker cannot start: {exc}") from exc

    return run


@signals.worker_init.connect
@_fatal_at_start
def _import_deciders_at_start(**_: Any) -> None:
    """Import ESKIT_DECIDER_MODULES in the main worker process, before it forks, so a bad
    module name stops the worker at start-up instead of failing every task."""
    modules = get_settings().decider_module_list
    import_decider_modules(modules)
    log.info("eskit-tasks: deciders imported from %s", ", ".join(modules) or "(none)")


@signals.worker_init.connect
@_fatal_at_start
def _start_metrics(**_: Any) -> None:
    """With ESKIT_METRICS_PORT, serve Prometheus metrics from the main worker process; set
    up before it forks, so its children write where the server reads (see metrics.py)."""
    metrics.start_worker_metrics(get_settings())


@signals.worker_ready.connect
def _announce_metrics(**_: Any) -> None:
    """Log where metrics are served (worker_init runs before the worker's logging)."""
    where = metrics.describe()
    if where is not None:
        log.info("eskit-tasks: %s", where)


@signals.worker_process_init.connect
def _metrics_in_child(**_: Any) -> None:
    metrics.child_started()


@signals.worker_process_shutdown.connect
def _metrics_child_exit(pid: int | None = None, **_: Any) -> None:
    metrics.child_exited(pid)


@signals.worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    metrics.stop_worker_metrics()


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC), ``level``, ``logger``, then the fields
    the record carries in ``eskit_fields`` (or its ``message``)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "eskit_fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


@signals.after_setup_logger.connect
def _compaction_log_as_json_lines(logfile: Any = None, **_: Any) -> None:
    """In a worker, write the one-line-per-compaction records as bare JSON lines (no
    "[time: LEVEL/process]" prefix) to where the worker logs (stderr or --logfile), so a
    log shipper can parse each of those lines whole. Elsewhere (the CLI, your own logging
    set-up) the record propagates as usual; its message is the same JSON object."""
    target = logging.getLogger(COMPACTION_LOGGER)
    for old in [h for h in target.handlers if isinstance(h.formatter, JsonLineFormatter)]:
        target.removeHandler(old)
        old.close()
    handler: logging.Handler
    if logfile is None:
        handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
    elif hasattr(logfile, "write"):
        handler = logging.StreamHandler(logfile)
    else:
        handler = WatchedFileHandler(logfile, encoding="utf-8")
    handler.setFormatter(JsonLineFormatter())
    target.addHandler(handler)
    target.propagate = False
