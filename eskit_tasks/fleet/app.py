"""The Celery application: ``celery -A eskit_tasks worker`` / ``beat`` find it here.

:func:`create_app` builds an app from the settings it is given — its Celery
configuration, its tasks (``eskit_tasks.compact_stream``, ``eskit_tasks.compact_batch``,
``eskit_tasks.fan_out``, ``eskit_tasks.finish_run``)
and the resources its tasks use — so a test can build a whole fleet in-process::

    app = create_app(settings, config={"broker_url": "memory://"}, resources=resources)

``app`` is the process's default app, built from the environment on first import.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from celery import Celery, signals
from redis.exceptions import RedisError

from eskit_tasks.core.registry import import_decider_modules
from eskit_tasks.errors import (
    CompactionNeedsAttention,
    ConfigurationError,
    DatabaseUnavailableError,
    TableLayoutError,
)
from eskit_tasks.fleet import celeryconfig as packaged
from eskit_tasks.fleet import failures, metrics, observability
from eskit_tasks.fleet.batch import compact_batch
from eskit_tasks.fleet.compact_task import compact_stream
from eskit_tasks.fleet.constants import (
    COMPACT_BATCH_TASK,
    COMPACT_STREAM_TASK,
    FAN_OUT_TASK,
    FANOUT_MAX_RETRIES,
    FINISH_MAX_RETRIES,
    FINISH_RUN_TASK,
)
from eskit_tasks.fleet.fan_out import fan_out
from eskit_tasks.fleet.finish import finish_run
from eskit_tasks.fleet.resources import PerProcess, Resources
from eskit_tasks.fleet.settings import EskitSettings, get_settings
from eskit_tasks.stores.engine import create_engine
from eskit_tasks.stores.schema import ensure_schema

log = logging.getLogger("eskit_tasks")

#: Imported for their signal handlers (task failures, the workers' JSON log lines).
_SIGNAL_MODULES = (failures, observability)

#: Where Celery's settings come from when ESKIT_CELERY_CONFIG is not set and no
#: ``celeryconfig`` module can be imported (a wheel install with no file of its own).
PACKAGED_CONFIG = packaged.__name__


class FleetApp(Celery):
    """A Celery app that carries the eskit-tasks settings and per-process resources."""

    eskit_settings: EskitSettings
    eskit_resources: PerProcess


def create_app(
    settings: EskitSettings | None = None,
    *,
    config: str | Mapping[str, Any] | None = None,
    resources: Resources | Callable[[], Resources] | None = None,
) -> FleetApp:
    """Build a fleet app.

    Args:
        settings: The fleet's settings (default: from the environment).
        config: Celery's settings: a module name, or a mapping laid over the packaged
            defaults for ``settings``. Default: the module ESKIT_CELERY_CONFIG names
            (``celeryconfig``); if that variable is unset and no such module exists, the
            packaged defaults.
        resources: The clients the tasks use: ready-made ``Resources`` for workers in
            this process (an in-process test worker; a forked worker refuses them), or a
            factory called once in each process. Default: made from ``settings`` in
            each process.

    Raises:
        ConfigurationError: the config module cannot be imported.
    """
    settings = settings or get_settings()
    app = FleetApp("eskit_tasks", set_as_current=False)
    if isinstance(config, Mapping):
        app.config_from_object({**packaged.celery_config(settings), **config})
    else:
        app.config_from_object(_config_module(settings, config))
    # Not left to the config module: a worker must never die on a malformed message.
    app.conf.worker_consumer = "eskit_tasks.fleet.consumer:GuardedConsumer"
    app.eskit_settings = settings
    if isinstance(resources, Resources):
        app.eskit_resources = PerProcess.given(resources)
    else:
        app.eskit_resources = PerProcess(resources or (lambda: Resources(settings)))
    # throws: an outcome that needs attention is logged as an expected failure (one
    # INFO line, no traceback); its JSON log line already says what happened.
    app.task(
        bind=True,
        shared=False,
        name=COMPACT_STREAM_TASK,
        max_retries=None,
        throws=(CompactionNeedsAttention,),
    )(compact_stream)
    app.task(
        bind=True,
        shared=False,
        name=COMPACT_BATCH_TASK,
        max_retries=0,  # it never retries itself: a stream that must is handed off
        throws=(CompactionNeedsAttention,),
    )(compact_batch)
    app.task(bind=True, shared=False, name=FAN_OUT_TASK, max_retries=FANOUT_MAX_RETRIES)(fan_out)
    app.task(
        bind=True,
        shared=False,
        name=FINISH_RUN_TASK,
        autoretry_for=(RedisError, DatabaseUnavailableError),
        retry_backoff=True,
        retry_backoff_max=300,
        max_retries=FINISH_MAX_RETRIES,
    )(finish_run)
    return app


def _config_module(settings: EskitSettings, name: str | None) -> ModuleType:
    explicit = name is not None or "celery_config" in settings.model_fields_set
    name = name or settings.celery_config
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if not explicit and exc.name == name:
            return packaged
        raise ConfigurationError(
            f"cannot import the Celery config module {name!r} ({exc}). Run from the "
            "directory that holds celeryconfig.py, put it on PYTHONPATH, or set "
            f"ESKIT_CELERY_CONFIG to your own module (or to {PACKAGED_CONFIG} for the "
            "packaged defaults)."
        ) from exc


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


def _settings_of(sender: Any) -> EskitSettings | None:
    """The settings of the worker's app, None for a worker of another app."""
    settings = getattr(getattr(sender, "app", None), "eskit_settings", None)
    return settings if isinstance(settings, EskitSettings) else None


@signals.worker_init.connect
@_fatal_at_start
def _import_deciders_at_start(sender: Any = None, **_: Any) -> None:
    """Import ESKIT_DECIDER_MODULES in the main worker process, before it forks, so a bad
    module name stops the worker at start-up instead of failing every task."""
    settings = _settings_of(sender)
    if settings is None:
        return
    modules = settings.decider_module_list
    import_decider_modules(modules)
    log.info("eskit-tasks: deciders imported from %s", ", ".join(modules) or "(none)")


@signals.worker_init.connect
@_fatal_at_start
def _check_tables_at_start(sender: Any = None, **_: Any) -> None:
    """Refuse to start on tables this code cannot use (an older revision: run
    ``eskit-tasks init-db``; a newer one: upgrade the workers); make them on an empty
    database. An unreachable database does not stop the worker: its tasks retry."""
    settings = _settings_of(sender)
    if settings is None:
        return
    try:
        engine = create_engine(settings.database_url)
        try:
            ensure_schema(engine)
        finally:
            engine.dispose()
    except DatabaseUnavailableError as exc:
        log.warning("eskit-tasks: the event database is unreachable at start: %s", exc)
    except TableLayoutError as exc:
        raise ConfigurationError(str(exc)) from exc


@signals.worker_init.connect
@_fatal_at_start
def _check_archive_at_start(sender: Any = None, **_: Any) -> None:
    """With ESKIT_ARCHIVE_URL, refuse to start unless the trash bin is a directory this
    worker can write: otherwise every compaction would fail at its archive step."""
    settings = _settings_of(sender)
    if settings is None or not settings.archive_url:
        return
    from eskit_tasks.stores.archive import archive_from_url

    log.info("eskit-tasks: archiving deleted events to %r", archive_from_url(settings.archive_url))


@signals.worker_init.connect
@_fatal_at_start
def _start_metrics(sender: Any = None, **_: Any) -> None:
    """With ESKIT_METRICS_PORT, serve Prometheus metrics from the main worker process; set
    up before it forks, so its children write where the server reads (see metrics.py)."""
    settings = _settings_of(sender)
    if settings is not None:
        metrics.start_worker_metrics(settings)


@signals.beat_init.connect
def _start_beat_metrics(sender: Any = None, **_: Any) -> None:
    """With ESKIT_METRICS_PORT, `celery beat` serves its schedule's health (when each
    entry last ran and is next due; see metrics.py), read from its scheduler; a port
    it cannot bind stops it at start."""
    settings = _settings_of(sender)
    if settings is None:
        return
    try:
        metrics.start_beat_metrics(settings, sender)
    except ConfigurationError as exc:
        raise SystemExit(f"eskit-tasks: beat cannot start: {exc}") from exc


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


app = create_app()
app.set_current()


def resources() -> Resources:
    """The default app's resources in this process (its store, Redis, run progress)."""
    return app.eskit_resources.get()
