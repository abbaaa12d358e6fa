"""The clients a fleet process works with, built from the settings it is given.

A :class:`Resources` holds the event store, the snapshot store, the Redis client (locks,
result claims) and the run-progress store of one process. Each is made on first use from
:class:`~eskit_tasks.fleet.settings.EskitSettings`, or given ready-made, so a test can
build a fleet in-process with an SQLite file and fakeredis instead of resetting caches::

    resources = Resources(settings, redis=fakeredis.FakeRedis())
    app = create_app(settings, config={"broker_url": "memory://"}, resources=resources)

:class:`PerProcess` hands each process its own: a prefork child never reuses the
connections it inherited from its parent (ready-made resources are refused there).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import redis
from sqlalchemy.engine import Engine

from eskit_tasks.errors import ConfigurationError
from eskit_tasks.fleet.progress import RunProgressStore
from eskit_tasks.fleet.settings import EskitSettings
from eskit_tasks.fleet.task_start import TaskStart
from eskit_tasks.ports import Archive, EventStore, SnapshotStore
from eskit_tasks.stores.sql import SqlEventStore, SqlSnapshotStore
from eskit_tasks.stores.sql_quarantine import SqlQuarantine


class Resources:
    """Database and Redis clients of one process, made on first use unless given.

    Args:
        settings: Where the database and Redis are, and the run TTL.
        store: The event store (default: ``SqlEventStore`` at ``settings.database_url``).
        snapshots: The snapshot store (default: SQL, in the event store's database).
        redis: The client for locks, result claims and run progress (default:
            ``settings.redis_url`` with short socket timeouts).
        archive: The trash bin (default: ``settings.archive_url``'s directory, none
            when it is unset).
    """

    def __init__(
        self,
        settings: EskitSettings,
        *,
        store: EventStore | None = None,
        snapshots: SnapshotStore | None = None,
        redis: redis.Redis | None = None,
        archive: Archive | None = None,
    ) -> None:
        self.settings = settings
        self._archive = archive
        self._store = store
        self._snapshots = snapshots
        self._redis = redis
        self._progress: RunProgressStore | None = None
        self._task_start: TaskStart | None = None
        self._quarantine: SqlQuarantine | None = None

    @property
    def store(self) -> EventStore:
        if self._store is None:
            self._store = SqlEventStore.from_url(
                self.settings.database_url, origin="ESKIT_DATABASE_URL"
            )
        return self._store

    @property
    def snapshots(self) -> SnapshotStore:
        if self._snapshots is None:
            store = self.store
            if not isinstance(store, SqlEventStore):
                raise TypeError("give Resources a snapshot store along with a non-SQL event store")
            self._snapshots = SqlSnapshotStore(store.engine, create_tables=False)
        return self._snapshots

    @property
    def archive(self) -> Archive | None:
        if self._archive is None and self.settings.archive_url:
            from eskit_tasks.stores.archive import archive_from_url

            self._archive = archive_from_url(self.settings.archive_url)
        return self._archive

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self.settings.redis_url,
                socket_timeout=10,
                socket_connect_timeout=5,
                health_check_interval=30,
            )
        return self._redis

    @property
    def quarantine(self) -> SqlQuarantine | None:
        """The streams whose compactions keep failing (None: a store without a
        database, kept in memory, has no quarantine)."""
        engine = getattr(self.store, "engine", None)
        if self._quarantine is None and isinstance(engine, Engine):
            self._quarantine = SqlQuarantine(engine, self.settings.quarantine_rules)
        return self._quarantine

    @property
    def progress(self) -> RunProgressStore:
        if self._progress is None:
            self._progress = RunProgressStore(self.redis, ttl=self.settings.run_ttl)
        return self._progress

    @property
    def task_start(self) -> TaskStart:
        """The one Redis call that starts a compaction (see fleet/task_start.py)."""
        if self._task_start is None:
            self._task_start = TaskStart(self.redis)
        return self._task_start


class PerProcess:
    """One :class:`Resources` per process id, made by ``factory`` on first use there.

    Or, with :meth:`given`, one ready-made instance for the process that made it (an
    in-process worker): a forked process asking for it gets a ConfigurationError rather
    than the parent's connections.
    """

    def __init__(self, factory: Callable[[], Resources] | None) -> None:
        self._factory = factory
        self._pid: int | None = None
        self._current: Resources | None = None

    @classmethod
    def given(cls, resources: Resources) -> PerProcess:
        """Hand out ``resources`` in this process only."""
        made = cls(None)
        made._current, made._pid = resources, os.getpid()
        return made

    def get(self) -> Resources:
        pid = os.getpid()
        if self._current is None or self._pid != pid:
            if self._factory is None:
                raise ConfigurationError(
                    f"process {pid} was forked from process {self._pid}, whose app was given "
                    "ready-made Resources: their database and Redis connections cannot be "
                    "shared with a forked worker. Give create_app a factory instead "
                    "(resources=lambda: Resources(settings, ...)), or run the worker with "
                    "the solo or threads pool"
                )
            self._current, self._pid = self._factory(), pid
        return self._current


def resources_of(app: object) -> Resources:
    """The resources of this process for a Celery app made by ``create_app``.

    Raises:
        ConfigurationError: the app was not made by ``eskit_tasks.fleet.app.create_app``.
    """
    per_process = getattr(app, "eskit_resources", None)
    if not isinstance(per_process, PerProcess):
        raise ConfigurationError(
            f"the Celery app {app!r} was not made by eskit_tasks.fleet.app.create_app: "
            "it has no eskit-tasks resources"
        )
    return per_process.get()
