"""What eskit-tasks needs to know of a pyeventsourcing application's store, read from the
application itself (its recorder, datastore, table names, id type), never recomputed
from settings: :func:`target_of` and :class:`Target`.

The library keeps, per application:

* PostgreSQL: ``<schema>.<name>_events`` (``notification_id`` a ``bigserial``; every
  insert takes ``LOCK TABLE ... IN EXCLUSIVE MODE``, so ids commit in order) and
  ``<name>_snapshots``; aggregate ids as ``uuid`` (or ``text``);
* SQLite: ``stored_events`` (the notification id is the ``rowid``, without
  AUTOINCREMENT) and ``stored_snapshots``, one application per file; aggregate ids as
  32 hex digits (or text).

eskit-tasks reaches the same database through an engine of its own, built from the
datastore's connection settings, and keeps its side tables there (the eskit tables:
fencing tokens, compaction points, the audit log), created by its migrations.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import URL, Engine

from eskit_tasks.errors import ConfigurationError
from eskit_tasks.stores.engine import create_engine

_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_$]*")


@dataclass(frozen=True)
class Target:
    """A pyeventsourcing application's store, as eskit-tasks reaches it.

    Args:
        app: The application.
        name: Its name: the stream type of its aggregates in results and the audit log.
        dialect: ``"postgresql"`` or ``"sqlite"``.
        engine: eskit-tasks' own engine to the application's database.
        events: The events table, quoted (and schema-qualified on PostgreSQL).
        snapshots: The snapshots table, quoted likewise.
        events_name: The events table's bare name (what triggers are named after).
        schema: The PostgreSQL schema (None on SQLite).
        uuid_ids: Whether aggregate ids are stored as UUIDs (else as text).
    """

    app: Any
    name: str
    dialect: str
    engine: Engine
    events: str
    snapshots: str
    events_name: str
    schema: str | None
    uuid_ids: bool

    @property
    def notification_id(self) -> str:
        """The events table's notification id column (the rowid on SQLite)."""
        return "notification_id" if self.dialect == "postgresql" else "rowid"

    def stream_id(self, aggregate_id: object) -> str:
        """The stream id of an aggregate in results and the audit log: ``str(id)``.

        Raises:
            ConfigurationError: not an id of this application's kind.
        """
        return str(self.aggregate_id(aggregate_id))

    def aggregate_id(self, aggregate_id: object) -> uuid.UUID | str:
        """The id as the application gives it to its repository."""
        if not self.uuid_ids:
            if not isinstance(aggregate_id, str | uuid.UUID) or not str(aggregate_id):
                raise ConfigurationError(
                    f"application {self.name}: an aggregate id must be a non-empty string, "
                    f"got {aggregate_id!r}"
                )
            return str(aggregate_id)
        if isinstance(aggregate_id, uuid.UUID):
            return aggregate_id
        try:
            return uuid.UUID(str(aggregate_id))
        except ValueError:
            raise ConfigurationError(
                f"application {self.name}: {aggregate_id!r} is not an aggregate id (a UUID)"
            ) from None

    def stored_id(self, aggregate_id: object) -> Any:
        """The id as the events table stores it (a bind parameter)."""
        found = self.aggregate_id(aggregate_id)
        if isinstance(found, uuid.UUID) and self.dialect == "sqlite":
            return found.hex
        return found

    def from_stored(self, stored: Any) -> uuid.UUID | str:
        """An id read from the events table, as the application gives it."""
        if self.uuid_ids:
            return stored if isinstance(stored, uuid.UUID) else uuid.UUID(str(stored))
        return str(stored)


def target_of(app: object) -> Target:
    """Read the store of ``app`` and open an engine to it.

    Raises:
        ConfigurationError: ``app`` is not a pyeventsourcing application, keeps its events
            elsewhere than in PostgreSQL or a SQLite file, or has snapshotting disabled;
            the message says what to change. Nothing is written.
    """
    try:
        from eventsourcing.application import Application
    except ImportError:  # pragma: no cover - the extra is installed with the tests
        raise ConfigurationError(
            "the eventsourcing library is not installed: pip install 'eskit-tasks[eventsourcing]'"
        ) from None
    if not isinstance(app, Application):
        raise ConfigurationError(
            f"expected an eventsourcing.application.Application instance, got {app!r}"
        )
    name = app.name
    if getattr(app, "snapshots", None) is None:
        raise ConfigurationError(
            f"application {name} has snapshotting disabled: a compacted aggregate loads from "
            "its snapshot, so every process that uses the application must run with "
            "snapshotting enabled (is_snapshotting_enabled = True on the class, or "
            f"IS_SNAPSHOTTING_ENABLED=y / {name.upper()}_IS_SNAPSHOTTING_ENABLED=y); "
            "nothing was changed"
        )
    recorder: Any = app.recorder
    snapshot_store: Any = app.snapshots
    datastore = getattr(recorder, "datastore", None)
    module = type(recorder).__module__
    if module == "eventsourcing.postgres" and datastore is not None:
        if getattr(datastore, "enable_db_functions", False):
            raise ConfigurationError(
                f"application {name} runs with POSTGRES_ENABLE_DB_FUNCTIONS: its inserts "
                "then skip the table lock that keeps notification ids in commit order, so "
                "a follower's position would not say which events it has processed; run "
                "it without (the default) to compact it; nothing was changed"
            )
        engine, schema = _postgres_engine(name, datastore)
        dialect = "postgresql"
    elif module == "eventsourcing.sqlite" and datastore is not None:
        engine, schema = _sqlite_engine(name, datastore), None
        dialect = "sqlite"
    else:
        raise ConfigurationError(
            f"application {name} keeps its events with {type(recorder).__name__} "
            f"({module}); eskit-tasks compacts applications on PostgreSQL "
            "(PERSISTENCE_MODULE=eventsourcing.postgres) or SQLite "
            "(PERSISTENCE_MODULE=eventsourcing.sqlite) only; nothing was changed"
        )
    quote = engine.dialect.identifier_preparer.quote
    events_name = recorder.events_table_name
    snapshots_name = snapshot_store.recorder.events_table_name
    if schema is not None:
        events_name, snapshots_name = _bare(events_name), _bare(snapshots_name)
    prefix = "" if schema is None else f"{quote(schema)}."
    return Target(
        app=app,
        name=name,
        dialect=dialect,
        engine=engine,
        events=prefix + quote(events_name),
        snapshots=prefix + quote(snapshots_name),
        events_name=events_name,
        schema=schema,
        uuid_ids=getattr(datastore, "originator_id_type", "uuid") == "uuid",
    )


def _bare(table: str) -> str:
    """The table name without the schema the PostgreSQL recorder may prefix it with."""
    return table.rpartition(".")[2]


def _postgres_engine(name: str, datastore: Any) -> tuple[Engine, str]:
    pool = datastore.pool
    settings = dict(pool.kwargs)
    password = settings.get("password")
    get_password = getattr(pool, "get_password_func", None)
    if get_password is not None:
        password = get_password()
    url = URL.create(
        "postgresql+psycopg",
        username=settings.get("user"),
        password=password or None,
        host=settings.get("host"),
        port=int(settings["port"]) if settings.get("port") else None,
        database=settings.get("dbname"),
    )
    schema = str(datastore.schema)
    path = schema if _PLAIN_NAME.fullmatch(schema) else '"' + schema.replace('"', '""') + '"'
    options = f"-c TimeZone=UTC -c search_path={path.replace(' ', chr(92) + ' ')}"
    return create_engine(url, connect_args={"options": options}), schema


def _sqlite_engine(name: str, datastore: Any) -> Engine:
    db_name = str(datastore.pool.db_name)
    if datastore.pool.is_sqlite_memory_mode:
        raise ConfigurationError(
            f"application {name} keeps its events in an in-memory SQLite database "
            f"({db_name!r}), which no other connection can reach; use a file "
            "(SQLITE_DBNAME=/path/to/app.sqlite)"
        )
    if db_name.startswith("file:"):
        separator = "&" if "?" in db_name else "?"
        return create_engine(f"sqlite:///{db_name}{separator}uri=true")
    return create_engine(URL.create("sqlite", database=db_name))
