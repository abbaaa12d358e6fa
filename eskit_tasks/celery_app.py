"""The Celery application: ``celery -A eskit_tasks worker`` / ``beat`` find it here."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from celery import Celery, signals

from eskit_tasks.errors import ConfigurationError
from eskit_tasks.registry import import_decider_modules
from eskit_tasks.settings import get_settings

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
    return celery


app = create_app()


@signals.worker_init.connect
def _import_deciders_at_start(**_: Any) -> None:
    """Import ESKIT_DECIDER_MODULES in the main worker process, before it forks, so a bad
    module name stops the worker at start-up instead of failing every task."""
    modules = get_settings().decider_module_list
    import_decider_modules(modules)
    log.info("eskit-tasks: deciders imported from %s", ", ".join(modules) or "(none)")
