"""The decider registry, the fleet settings and the masking of secrets in URLs.

Settings tests build ``EskitSettings()`` directly from a cleaned environment (the test
session's conftest exports ESKIT_*/CELERY_* variables for the fleet tests; the cached
``get_settings()`` is left alone).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from eskit_tasks.core import registry
from eskit_tasks.core.registry import (
    UnknownStreamTypeError,
    get_registration,
    import_decider_modules,
    register_decider,
    registered_types,
    unregister_decider,
)
from eskit_tasks.domain.redact import MASK, mask_url
from eskit_tasks.errors import ConfigurationError, EskitError
from eskit_tasks.fleet.settings import EskitSettings
from eskit_tasks.testing.deciders import Ledger

# --- registry -----------------------------------------------------------------------------


@pytest.fixture
def stream_types() -> Iterator[list[str]]:
    """Unique stream type names for a test; each is unregistered afterwards."""
    used: list[str] = []
    yield used
    for name in used:
        unregister_decider(name)


def fresh(stream_types: list[str], label: str = "t") -> str:
    name = f"test-registry-{label}-{uuid.uuid4().hex[:8]}"
    stream_types.append(name)
    return name


class NoEvolve:
    def initial_state(self) -> dict[str, Any]:
        return {}

    def decide(self, command: Any, state: Any) -> list[Any]:
        return []


class EvolveNotCallable(NoEvolve):
    evolve = "not a method"


class Opaque:
    """A plain class: pydantic cannot serialise it."""

    def __init__(self, value: int) -> None:
        self.value = value


class StateModel(BaseModel):
    total: int = 0


@dataclass
class StateDataclass:
    total: int = 0


def test_register_then_get_returns_decider_and_state_type(stream_types):
    """A valid registration is returned as given and listed in registered_types()."""
    name = fresh(stream_types)
    decider = Ledger()
    register_decider(name, decider, dict)
    found = get_registration(name)
    assert found.decider is decider
    assert found.state_type is dict
    assert name in registered_types()


@pytest.mark.parametrize("state_type", [dict, StateModel, StateDataclass, list[int]])
def test_register_accepts_serialisable_state_types(stream_types, state_type):
    """Dicts, pydantic models, dataclasses and generic aliases are accepted."""
    name = fresh(stream_types)
    register_decider(name, Ledger(), state_type)
    assert get_registration(name).state_type is state_type


def test_registering_again_replaces_the_earlier_registration(stream_types):
    """Re-registering a type (a module reload) replaces the decider."""
    name = fresh(stream_types)
    first, second = Ledger(), Ledger()
    register_decider(name, first, dict)
    register_decider(name, second, StateModel)
    found = get_registration(name)
    assert found.decider is second
    assert found.state_type is StateModel


@pytest.mark.parametrize(
    ("decider", "missing"),
    [
        (object(), ["initial_state", "evolve", "decide"]),
        (NoEvolve(), ["evolve"]),
        (EvolveNotCallable(), ["evolve"]),
    ],
)
def test_register_rejects_an_object_lacking_decider_methods(stream_types, decider, missing):
    """An object without (callable) initial_state/evolve/decide is refused with a
    ConfigurationError that names what is missing and what a decider needs; nothing is
    registered."""
    name = fresh(stream_types)
    with pytest.raises(ConfigurationError) as info:
        register_decider(name, decider, dict)
    message = str(info.value)
    for method in missing:
        assert method in message
    assert repr(name) in message
    assert "a decider needs initial_state(), evolve(state, event) and decide(command, state)" in (
        message
    )
    assert name not in registered_types()


def test_register_rejects_a_non_string_stream_type():
    with pytest.raises(ConfigurationError, match="stream_type must be a string"):
        register_decider(42, Ledger(), dict)  # type: ignore[arg-type]


def test_register_refuses_an_unserialisable_state_type_and_keeps_the_old_one(stream_types):
    """A state type pydantic cannot serialise is refused at registration (not mid-run);
    the failed attempt neither registers a new type nor replaces an existing one."""
    new_name = fresh(stream_types, "new")
    with pytest.raises(EskitError, match="Opaque"):
        register_decider(new_name, Ledger(), Opaque)
    assert new_name not in registered_types()

    existing = fresh(stream_types, "existing")
    decider = Ledger()
    register_decider(existing, decider, dict)
    with pytest.raises(EskitError):
        register_decider(existing, Ledger(), Opaque)
    assert get_registration(existing).decider is decider


def test_register_reports_an_unserialisable_state_type_as_configuration_error(stream_types):
    """The docstring promises ConfigurationError for a state type pydantic cannot
    serialise, so callers catching configuration mistakes see it."""
    name = fresh(stream_types)
    with pytest.raises(ConfigurationError, match="Opaque"):
        register_decider(name, Ledger(), Opaque)


def test_unknown_stream_type_lists_known_types_and_names_the_setting(stream_types):
    """get_registration of an unknown type raises UnknownStreamTypeError (a
    ConfigurationError) that names the type, lists the registered types and says to add
    the module to ESKIT_DECIDER_MODULES."""
    alpha, beta = fresh(stream_types, "alpha"), fresh(stream_types, "beta")
    register_decider(alpha, Ledger(), dict)
    register_decider(beta, Ledger(), dict)
    with pytest.raises(UnknownStreamTypeError) as info:
        get_registration("test-registry-missing")
    assert isinstance(info.value, ConfigurationError)
    message = str(info.value)
    assert "'test-registry-missing'" in message
    assert repr(alpha) in message and repr(beta) in message
    assert "ESKIT_DECIDER_MODULES" in message
    assert "register_decider" in message


def test_unknown_stream_type_with_an_empty_registry_says_none(monkeypatch):
    """With nothing registered (a worker that imported no decider module) the message
    says the known types are none."""
    monkeypatch.setattr(registry, "_registry", {})
    with pytest.raises(UnknownStreamTypeError, match=r"known: none"):
        get_registration("ledger")


def test_unregister_forgets_a_type(stream_types):
    name = fresh(stream_types)
    register_decider(name, Ledger(), dict)
    unregister_decider(name)
    with pytest.raises(UnknownStreamTypeError):
        get_registration(name)
    unregister_decider(name)  # forgetting twice is harmless


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path for throwaway decider modules, removed from sys.modules
    afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("eskit_test_mod_"):
            del sys.modules[name]


def test_import_decider_modules_runs_the_modules_registrations(module_dir, stream_types):
    """Importing a listed module runs its register_decider calls."""
    name = fresh(stream_types)
    module = f"eskit_test_mod_{uuid.uuid4().hex[:8]}"
    (module_dir / f"{module}.py").write_text(
        "from eskit_tasks import register_decider\n"
        "from eskit_tasks.testing.deciders import Ledger\n"
        f"register_decider({name!r}, Ledger(), dict)\n"
    )
    import_decider_modules([module])
    assert isinstance(get_registration(name).decider, Ledger)


def test_import_decider_modules_with_a_missing_module_raises_configuration_error():
    """A module that does not exist is reported as a ConfigurationError naming it and
    ESKIT_DECIDER_MODULES, chained to the ImportError."""
    missing = f"eskit_test_mod_missing_{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigurationError) as info:
        import_decider_modules([missing])
    message = str(info.value)
    assert repr(missing) in message
    assert "ESKIT_DECIDER_MODULES" in message
    assert isinstance(info.value.__cause__, ImportError)


def test_import_decider_modules_reports_a_module_whose_own_import_fails(module_dir):
    """A module that exists but imports a missing dependency is also a ConfigurationError
    naming the module (not a bare ModuleNotFoundError for the dependency)."""
    module = f"eskit_test_mod_{uuid.uuid4().hex[:8]}"
    (module_dir / f"{module}.py").write_text("import eskit_no_such_dependency_xyz\n")
    with pytest.raises(ConfigurationError, match=module) as info:
        import_decider_modules([module])
    assert "eskit_no_such_dependency_xyz" in str(info.value)


# --- settings -----------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment without any ESKIT_*/CELERY_* variable; set what a test needs."""
    for name in list(os.environ):
        if name.startswith(("ESKIT_", "CELERY_")):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_work_on_one_machine(env):
    """Without any variable, the settings are the local defaults."""
    s = EskitSettings()
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.result_backend == "redis://127.0.0.1:6379/1"
    assert s.database_url.startswith("sqlite:///")
    assert s.decider_module_list == []
    assert s.task_soft_time_limit < s.task_time_limit < s.visibility_timeout


def test_env_variables_override_settings(env):
    """ESKIT_<FIELD> overrides each field, converted to the field's type."""
    env.setenv("ESKIT_DATABASE_URL", "postgresql+psycopg://db.internal/events")
    env.setenv("ESKIT_REDIS_URL", "redis://state.internal:6379/2")
    env.setenv("ESKIT_LOCK_TTL", "12.5")
    env.setenv("ESKIT_FANOUT_PAGE_SIZE", "7")
    env.setenv("ESKIT_RUN_TTL", "3600")
    env.setenv("ESKIT_COMPACTION_QUEUE", "compaction-eu")
    s = EskitSettings()
    assert s.database_url == "postgresql+psycopg://db.internal/events"
    assert s.redis_url == "redis://state.internal:6379/2"
    assert s.lock_ttl == 12.5
    assert s.fanout_page_size == 7
    assert s.run_ttl == 3600
    assert s.compaction_queue == "compaction-eu"


def test_celery_broker_and_result_backend_variables_are_read(env):
    """Celery's own variable names CELERY_BROKER_URL / CELERY_RESULT_BACKEND work."""
    env.setenv("CELERY_BROKER_URL", "amqp://rabbit.internal:5672//")
    env.setenv("CELERY_RESULT_BACKEND", "redis://results.internal:6379/3")
    s = EskitSettings()
    assert s.broker_url == "amqp://rabbit.internal:5672//"
    assert s.result_backend == "redis://results.internal:6379/3"


def test_eskit_prefixed_broker_and_result_backend_aliases_are_read(env):
    """ESKIT_BROKER_URL / ESKIT_RESULT_BACKEND work too when the CELERY_ names are unset."""
    env.setenv("ESKIT_BROKER_URL", "amqp://rabbit.internal:5672//")
    env.setenv("ESKIT_RESULT_BACKEND", "redis://results.internal:6379/3")
    s = EskitSettings()
    assert s.broker_url == "amqp://rabbit.internal:5672//"
    assert s.result_backend == "redis://results.internal:6379/3"


def test_invalid_number_is_refused(env):
    env.setenv("ESKIT_LOCK_TTL", "sixty")
    with pytest.raises(ValidationError, match="lock_ttl"):
        EskitSettings()


@pytest.mark.parametrize(
    ("soft", "hard", "visibility"),
    [
        ("50", "40", "60"),  # soft > hard
        ("40", "40", "60"),  # soft == hard
        ("40", "70", "60"),  # hard > visibility
        ("40", "60", "60"),  # hard == visibility
    ],
)
def test_time_limits_must_be_ordered(env, soft, hard, visibility):
    """soft limit < hard limit < visibility timeout, strictly; otherwise the error names
    the three variables, shows the values and says why (a task would run twice)."""
    env.setenv("ESKIT_TASK_SOFT_TIME_LIMIT", soft)
    env.setenv("ESKIT_TASK_TIME_LIMIT", hard)
    env.setenv("ESKIT_VISIBILITY_TIMEOUT", visibility)
    env.setenv("ESKIT_LOCK_TTL", "3")
    with pytest.raises(
        ValueError, match="ESKIT_TASK_SOFT_TIME_LIMIT < ESKIT_TASK_TIME_LIMIT < "
    ) as info:
        EskitSettings()
    message = str(info.value)
    assert "ESKIT_VISIBILITY_TIMEOUT" in message
    assert f"{float(soft)} / {float(hard)} / {float(visibility)}" in message
    assert "run twice" in message


def test_ordered_time_limits_are_accepted(env):
    env.setenv("ESKIT_TASK_SOFT_TIME_LIMIT", "40")
    env.setenv("ESKIT_TASK_TIME_LIMIT", "45")
    env.setenv("ESKIT_VISIBILITY_TIMEOUT", "60")
    env.setenv("ESKIT_LOCK_TTL", "59.9")
    s = EskitSettings()
    assert (s.task_soft_time_limit, s.task_time_limit, s.visibility_timeout) == (40, 45, 60)


@pytest.mark.parametrize("ttl", ["60", "61"])
def test_lock_ttl_must_be_below_the_visibility_timeout(env, ttl):
    """A lock living as long as the visibility timeout is refused, with a clear message."""
    env.setenv("ESKIT_TASK_SOFT_TIME_LIMIT", "40")
    env.setenv("ESKIT_TASK_TIME_LIMIT", "45")
    env.setenv("ESKIT_VISIBILITY_TIMEOUT", "60")
    env.setenv("ESKIT_LOCK_TTL", ttl)
    with pytest.raises(ValueError, match="ESKIT_LOCK_TTL must be below ESKIT_VISIBILITY_TIMEOUT"):
        EskitSettings()


SECRETS = ["dbS3cret", "stateS3cret", "brokerS3cret", "resultS3cret"]


def test_repr_and_str_mask_passwords_in_every_url(env):
    """repr() and str() of the settings (what ends up in logs) show every URL with its
    password masked — database, Redis, broker and result backend — while the values
    themselves keep the password (they are needed to connect)."""
    env.setenv("ESKIT_DATABASE_URL", "postgresql+psycopg://app:dbS3cret@db.internal:5432/ev")
    env.setenv("ESKIT_REDIS_URL", "redis://:stateS3cret@state.internal:6379/0")
    env.setenv("CELERY_BROKER_URL", "amqp://worker:brokerS3cret@rabbit.internal:5672//")
    env.setenv("CELERY_RESULT_BACKEND", "rediss://results.internal:6380/1?password=resultS3cret")
    s = EskitSettings()
    for shown in (repr(s), str(s)):
        for secret in SECRETS:
            assert secret not in shown, shown
        assert shown.count(MASK) == 4
        assert "db.internal" in shown and "rabbit.internal" in shown
    assert "dbS3cret" in s.database_url
    assert "brokerS3cret" in s.broker_url


def test_invalid_settings_error_does_not_show_a_password(env):
    """A settings error (e.g. a bad lock TTL) must not print the password of a URL that
    was also set: get_settings() puts this text into its ConfigurationError."""
    env.setenv("ESKIT_REDIS_URL", "redis://:Zq9@h")
    env.setenv("ESKIT_LOCK_TTL", "4e3")
    with pytest.raises(ValueError, match="ESKIT_LOCK_TTL") as info:
        EskitSettings()
    assert "Zq9" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", []),
        ("myapp.deciders", ["myapp.deciders"]),
        (" myapp.a , myapp.b,myapp.c ", ["myapp.a", "myapp.b", "myapp.c"]),
        ("myapp.a,, ,myapp.b,", ["myapp.a", "myapp.b"]),
    ],
)
def test_decider_module_list_splits_on_commas_and_trims(env, value, expected):
    env.setenv("ESKIT_DECIDER_MODULES", value)
    assert EskitSettings().decider_module_list == expected


@pytest.mark.parametrize("cron", ["0 3 * *", "0 3 * * * *", "", "daily"])
def test_nightly_cron_needs_five_fields(env, cron):
    """A cron expression with other than five fields is refused, naming the variable."""
    env.setenv("ESKIT_NIGHTLY_CRON", cron)
    with pytest.raises(ValueError, match="ESKIT_NIGHTLY_CRON needs five fields"):
        EskitSettings()


def test_nightly_cron_with_five_fields_is_accepted(env):
    env.setenv("ESKIT_NIGHTLY_CRON", "*/15  2 * * 1-5")
    assert EskitSettings().nightly_cron == "*/15  2 * * 1-5"


@pytest.mark.parametrize(
    ("policy", "match"),
    [("{not json", "ESKIT_NIGHTLY_POLICY is not JSON"), ("[1, 2]", "must be a JSON object")],
)
def test_nightly_policy_must_be_a_json_object(env, policy, match):
    env.setenv("ESKIT_NIGHTLY_POLICY", policy)
    with pytest.raises(ValueError, match=match):
        EskitSettings()


def test_nightly_policy_is_parsed(env):
    env.setenv("ESKIT_NIGHTLY_POLICY", '{"min_events": 5, "dry_run": true}')
    assert EskitSettings().nightly_policy_kwargs == {"min_events": 5, "dry_run": True}


# --- redact.mask_url ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:guest@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
        ("amqps://svc:p%40ss%2Fw0rd@mq.example.com/vhost", "amqps://svc:***@mq.example.com/vhost"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://default:s3cret@cache:6379/1", "redis://default:***@cache:6379/1"),
        (
            "rediss://u:s3cret@cache:6380/0?ssl_cert_reqs=none",
            "rediss://u:***@cache:6380/0?ssl_cert_reqs=none",
        ),
        ("postgresql://app:s3cret@db:5432/events", "postgresql://app:***@db:5432/events"),
        ("postgresql+psycopg://app:s3:cr:et@db/events", "postgresql+psycopg://app:***@db/events"),
        (
            "postgresql://db/events?user=app&password=s3cret",
            "postgresql://db/events?user=app&password=***",
        ),
        (
            "postgresql://db/events?password=s3cret&sslmode=require",
            "postgresql://db/events?password=***&sslmode=require",
        ),
        ("redis://cache:6379/0?password=s3cret", "redis://cache:6379/0?password=***"),
        ("postgresql://db/events?PASSWORD=s3cret", "postgresql://db/events?PASSWORD=***"),
        (
            "host=db user=app password=s3cret dbname=events",
            "host=db user=app password=*** dbname=events",
        ),
    ],
)
def test_mask_url_masks_userinfo_and_password_parameters(url, expected):
    """Passwords in ``user:password@`` and in ``password=`` parameters become ``***``;
    user, host, port, path and other parameters stay readable."""
    assert mask_url(url) == expected
    assert "s3cret" not in mask_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://cache.internal:6379/1?socket_timeout=5",
        "rediss://user@cache:6380/0",
        "amqp://rabbit.internal:5672//",
        "amqp://guest@rabbit:5672/vhost",
        "postgresql://app@db.internal:5432/events",
        "postgresql+psycopg://db.internal/events?sslmode=require",
        "sqlite:///eskit.db",
        "sqlite:////var/lib/eskit/eskit.db",
        "memory://",
        "stream acc:1 of type ledger at version 12",
    ],
)
def test_mask_url_leaves_text_without_passwords_unchanged(url):
    assert mask_url(url) == url


def test_mask_url_masks_every_url_inside_free_text():
    """URLs embedded in an error message or log line are masked wherever they appear,
    each one, without eating the surrounding text."""
    text = (
        "cannot connect to redis://:r3dis@cache:6379/0 (Connection refused); "
        "broker amqp://w:amqpPW@rabbit// is fine, "
        "db postgresql://app:pgPW@db:5432/events?sslmode=require timed out. "
        "retry with password=oldPW later"
    )
    masked = mask_url(text)
    for secret in ("r3dis", "amqpPW", "pgPW", "oldPW"):
        assert secret not in masked
    assert masked == (
        "cannot connect to redis://:***@cache:6379/0 (Connection refused); "
        "broker amqp://w:***@rabbit// is fine, "
        "db postgresql://app:***@db:5432/events?sslmode=require timed out. "
        "retry with password=*** later"
    )


def test_mask_url_is_idempotent():
    once = mask_url("amqp://u:pw@h// and redis://h/0?password=pw")
    assert mask_url(once) == once


def test_mask_url_masks_a_password_containing_a_raw_at_sign():
    """``redis://u:p@ss@host`` is accepted by redis-py (password ``p@ss``); none of the
    password may remain after masking."""
    masked = mask_url("redis://u:p@ssword@cache:6379/0")
    assert "ssword" not in masked


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("host=db password='my secret' dbname=x", "my secret"),
        ("postgresql://u@h/db?db_password=hunter2", "hunter2"),
    ],
)
def test_mask_url_hides_quoted_and_prefixed_password_parameters(text, secret):
    assert secret not in mask_url(text)
    assert MASK in mask_url(text)


def test_mask_url_leaves_an_at_sign_in_a_query_alone():
    assert mask_url("redis://h:6379/0?x=a@b") == "redis://h:6379/0?x=a@b"
