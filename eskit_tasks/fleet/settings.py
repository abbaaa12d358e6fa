"""Settings of the fleet: the one place that reads the environment.

Every value has a default that works on one machine (local Redis, an SQLite file);
operators override them with environment variables. ``celeryconfig.py`` turns these
into Celery settings.
"""

from __future__ import annotations

import json
from datetime import timedelta
from functools import lru_cache
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from eskit_tasks.domain.quarantine import QuarantineRules
from eskit_tasks.domain.redact import mask_url
from eskit_tasks.domain.window import parse_window
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.fleet import constants as c


class EskitSettings(BaseSettings):
    """Fleet settings, from the environment variables named beside each field."""

    # hide_input_in_errors: a validation error must not echo a URL with its password.
    model_config = SettingsConfigDict(
        env_prefix="ESKIT_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    #: ESKIT_DATABASE_URL: the event database (PostgreSQL in production).
    database_url: str = "sqlite:///eskit.db"
    #: ESKIT_REDIS_URL: locks and run progress.
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: CELERY_BROKER_URL: where tasks are queued (Redis or RabbitMQ).
    broker_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("CELERY_BROKER_URL", "ESKIT_BROKER_URL"),
    )
    #: CELERY_RESULT_BACKEND: where each task's CompactionResult is stored.
    result_backend: str = Field(
        "redis://127.0.0.1:6379/1",
        validation_alias=AliasChoices("CELERY_RESULT_BACKEND", "ESKIT_RESULT_BACKEND"),
    )
    #: ESKIT_DECIDER_MODULES: comma-separated modules that call register_decider.
    decider_modules: str = ""
    #: ESKIT_ARCHIVE_URL: the trash bin, a directory every worker can write (a path or
    #: file:// URL); compactions archive the events they delete there first. Unset: none.
    archive_url: str | None = None
    #: ESKIT_COMPACTION_QUEUE / ESKIT_FANOUT_QUEUE: queue names.
    compaction_queue: str = c.COMPACTION_QUEUE
    fanout_queue: str = c.FANOUT_QUEUE
    #: ESKIT_LOCK_TTL: seconds a stream lock lives without renewal.
    lock_ttl: float = Field(c.LOCK_TTL_S, gt=0)
    #: ESKIT_TASK_SOFT_TIME_LIMIT / ESKIT_TASK_TIME_LIMIT / ESKIT_VISIBILITY_TIMEOUT: seconds.
    task_soft_time_limit: float = Field(c.TASK_SOFT_TIME_LIMIT_S, gt=0)
    task_time_limit: float = Field(c.TASK_TIME_LIMIT_S, gt=0)
    visibility_timeout: float = Field(c.VISIBILITY_TIMEOUT_S, gt=0)
    #: ESKIT_RESTORE_INTERVAL: seconds between sweeps for messages whose worker vanished.
    restore_interval: float = Field(c.RESTORE_INTERVAL_S, gt=0)
    #: ESKIT_LOCKED_MAX_RETRIES / ESKIT_LOCKED_RETRY_BASE: a copy that finds the lock held.
    locked_max_retries: int = Field(c.LOCKED_MAX_RETRIES, ge=0)
    locked_retry_base: float = Field(c.LOCKED_RETRY_BASE_S, ge=0)
    #: ESKIT_FANOUT_PAGE_SIZE / ESKIT_FANOUT_HIGH_WATER / ESKIT_FANOUT_BACKOFF.
    fanout_page_size: int = Field(c.FANOUT_PAGE_SIZE, gt=0)
    fanout_high_water: int = Field(c.FANOUT_HIGH_WATER, gt=0)
    fanout_backoff: float = Field(c.FANOUT_BACKOFF_S, ge=0)
    #: ESKIT_BATCH_EVENTS: small streams go to the workers several to a message, at most
    #: this many live events per message (0: one message per stream).
    batch_events: int = Field(c.BATCH_EVENTS, ge=0)
    #: ESKIT_RECLAIM: ``auto`` (default): a run that deleted events ends by reclaiming
    #: their space (PostgreSQL ``VACUUM (ANALYZE)`` of the tables it deleted from; SQLite
    #: checkpoint and incremental vacuum) and reports the measured sizes; ``off``: never
    #: (run ``eskit-tasks reclaim`` yourself). See eskit_tasks.stores.reclaim.
    reclaim: Literal["auto", "off"] = "auto"
    #: ESKIT_MAX_EVENTS_PER_SECOND / ESKIT_MAX_CONCURRENT_COMPACTIONS: fleet-wide caps on
    #: events deleted per second and compactions at once (0: none); `eskit-tasks
    #: throttle` overrides them live. See eskit_tasks.fleet.throttle.
    max_events_per_second: float = Field(0.0, ge=0)
    max_concurrent_compactions: int = Field(0, ge=0)
    #: ESKIT_WINDOW: the maintenance window of scheduled (beat) runs, "HH:MM-HH:MM TZ";
    #: outside it their fan-out waits for the next window. Empty: any time.
    window: str = ""
    #: ESKIT_QUARANTINE_AFTER: compactions of a stream ending failed or
    #: verification_failed in a row that quarantine it (0: never); ESKIT_QUARANTINE_BACKOFF
    #: / ESKIT_QUARANTINE_MAX_BACKOFF: seconds of its first / longest quarantine (it
    #: doubles with each failure after). See eskit_tasks.domain.quarantine.
    quarantine_after: int = Field(3, ge=0)
    quarantine_backoff: float = Field(3600.0, gt=0)
    quarantine_max_backoff: float = Field(7 * 86400.0, gt=0)
    #: ESKIT_RUN_TTL: seconds run progress stays in Redis.
    run_ttl: int = Field(c.RUN_TTL_S, gt=0)
    #: ESKIT_CELERY_CONFIG: the module with the Celery settings.
    celery_config: str = "celeryconfig"
    #: ESKIT_NIGHTLY_CRON: when beat starts the nightly fan-out (UTC, five cron fields).
    nightly_cron: str = "0 3 * * *"
    #: ESKIT_NIGHTLY_POLICY: the nightly fan-out's policy, as JSON keyword arguments.
    nightly_policy: str = '{"min_events": 1000, "retain_last": 100}'
    #: ESKIT_METRICS_PORT: serve Prometheus metrics from each worker on this port
    #: (unset or empty: no metrics, nothing listens). See eskit_tasks.fleet.metrics.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    #: ESKIT_METRICS_ADDRESS: the address the metrics port binds to.
    metrics_address: str = c.METRICS_ADDRESS
    #: ESKIT_METRICS_DIR: where a worker's prefork children write their metrics; emptied
    #: at start, so one directory per worker (default: a fresh temporary directory).
    metrics_dir: str | None = None

    @field_validator("metrics_port", "metrics_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """``ESKIT_METRICS_PORT=`` (as compose files write an unset variable) means off."""
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _limits_are_ordered(self) -> EskitSettings:
        if not self.task_soft_time_limit < self.task_time_limit < self.visibility_timeout:
            raise ValueError(
                "need ESKIT_TASK_SOFT_TIME_LIMIT < ESKIT_TASK_TIME_LIMIT < "
                f"ESKIT_VISIBILITY_TIMEOUT, got {self.task_soft_time_limit} / "
                f"{self.task_time_limit} / {self.visibility_timeout}: a task still running "
                "when its message becomes visible again would run twice"
            )
        if self.lock_ttl >= self.visibility_timeout:
            raise ValueError("ESKIT_LOCK_TTL must be below ESKIT_VISIBILITY_TIMEOUT")
        try:
            parse_window(self.window)
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None
        if len(self.nightly_cron.split()) != 5:
            raise ValueError(f"ESKIT_NIGHTLY_CRON needs five fields, got {self.nightly_cron!r}")
        try:
            self.nightly_policy_kwargs  # noqa: B018 -- validates the JSON
        except json.JSONDecodeError as exc:
            raise ValueError(f"ESKIT_NIGHTLY_POLICY is not JSON: {exc}") from None
        return self

    @property
    def nightly_policy_kwargs(self) -> dict[str, Any]:
        value = json.loads(self.nightly_policy)
        if not isinstance(value, dict):
            raise ValueError("ESKIT_NIGHTLY_POLICY must be a JSON object")
        return value

    @property
    def quarantine_rules(self) -> QuarantineRules:
        return QuarantineRules(
            after=self.quarantine_after,
            backoff=timedelta(seconds=self.quarantine_backoff),
            max_backoff=timedelta(seconds=self.quarantine_max_backoff),
        )

    @property
    def decider_module_list(self) -> list[str]:
        return [m.strip() for m in self.decider_modules.split(",") if m.strip()]

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, mask_url(value) if isinstance(value, str) else value


@lru_cache(maxsize=1)
def get_settings() -> EskitSettings:
    """Read the settings once per process."""
    try:
        return EskitSettings()
    except ValueError as exc:
        raise ConfigurationError(f"invalid eskit-tasks settings: {exc}") from None
