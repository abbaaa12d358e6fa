"""The public surface: exactly what __all__ lists, and the error tree."""

from __future__ import annotations

import inspect

import eskit_tasks
from eskit_tasks import errors

CONTRACT = {
    # named by issue [1/5]; acceptance checks outside this repo import these
    "SqlEventStore",
    "SqlSnapshotStore",
    "NewEvent",
    "RecordedEvent",
    "Decider",
    "Compactor",
    "CompactionPolicy",
    "CompactionResult",
    "load_state",
    "EskitError",
    "ConcurrencyError",
    # named by issue [2/5]
    "compact_all",
    "register_decider",
}


def test_all_is_exactly_the_public_surface():
    public = {
        name
        for name, value in vars(eskit_tasks).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name not in ("Any", "app")
    }
    lazy = set(eskit_tasks._LAZY) - {"app"}
    assert set(eskit_tasks.__all__) == public | lazy
    assert len(eskit_tasks.__all__) == len(set(eskit_tasks.__all__))
    for name in lazy:
        assert getattr(eskit_tasks, name) is not None


def test_celery_finds_the_app_as_eskit_tasks_app():
    from celery import Celery

    assert isinstance(eskit_tasks.app, Celery)
    assert eskit_tasks.app.main == "eskit_tasks"


def test_contract_names_are_exported():
    assert set(eskit_tasks.__all__) >= CONTRACT


def test_every_error_derives_from_eskit_error_and_is_exported():
    classes = [
        v
        for v in vars(errors).values()
        if inspect.isclass(v) and issubclass(v, Exception) and v.__module__ == errors.__name__
    ]
    assert len(classes) > 10
    for cls in classes:
        assert issubclass(cls, eskit_tasks.EskitError)
        assert cls.__name__ in eskit_tasks.__all__
        assert cls.__doc__ and cls.__doc__.startswith("Raised"), cls


def test_invalid_policy_is_a_value_error():
    assert issubclass(eskit_tasks.InvalidPolicyError, ValueError)
