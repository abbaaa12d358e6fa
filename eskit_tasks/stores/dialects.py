"""Everything that differs between PostgreSQL and SQLite, and the driver-error boundary.

* engine creation: URL normalisation, SQLite pragmas and explicit transactions;
* ``write_transaction``: a transaction that takes the write lock up front
  (``BEGIN IMMEDIATE`` on SQLite; row locks do the job on PostgreSQL);
* ``insert_ignoring_conflicts``: ``INSERT ... ON CONFLICT DO NOTHING`` per dialect;
* ``translate_errors``: turns driver errors into :mod:`eskit_tasks.errors`, with
  passwords masked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url

from eskit_tasks.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    EskitError,
    StoreError,
)

#: Seconds SQLite waits for another connection's write lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 30
#: Seconds to wait for a PostgreSQL connection before reporting it unreachable.
PG_CONNECT_TIMEOUT_S = 10
#: Connection option that makes the next transaction on SQLite start as BEGIN IMMEDIATE.
_WRITE_OPTION = "eskit_write"

# SQLSTATE classes that mean the connection is gone, not that the statement was wrong:
# 08 connection exception, 57P01..57P03 admin shutdown / crash shutdown / cannot connect now.
_PG_CONNECTION_STATES = ("08", "57P01", "57P02", "57P03")


def normalise_url(url: str | URL) -> URL:
    """Parse ``url`` and pick psycopg 3 for a bare ``postgresql://`` or ``postgres://``."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError as e:
        raise ConfigurationError(f"not a database URL: {mask_text(str(url))!r} ({e})") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise ConfigurationError(
            f"unsupported database {parsed.get_backend_name()!r} in "
            f"{mask_url(parsed)}: use sqlite:///path.db or postgresql+psycopg://..."
        )
    return parsed


def mask_url(url: str | URL) -> str:
    """Render a URL with its password replaced by ``***``."""
    return make_url(url).render_as_string(hide_password=True)


def mask_text(text: str) -> str:
    """Best effort for a string that may be a malformed URL: hide what follows ``user:``."""
    head, sep, tail = text.partition("://")
    if not sep or "@" not in tail:
        return text
    creds, at, rest = tail.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{head}{sep}{user}:***{at}{rest}" if ":" in creds else text


def create_engine(url: str | URL, **kwargs: Any) -> Engine:
    """Create an engine configured for eskit-tasks' transaction discipline."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, **kwargs)
    connect_args = dict(kwargs.pop("connect_args", {}))
    if "connect_timeout" not in parsed.query:
        connect_args.setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
    # pre_ping: a worker whose connection was terminated (failover, pg_terminate_backend)
    # reconnects instead of failing its next compaction.
    kwargs.setdefault("pool_pre_ping", True)
    return sa.create_engine(parsed, connect_args=connect_args, **kwargs)


def _sqlite_engine(url: URL, **kwargs: Any) -> Engine:
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
    engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
    in_memory = url.database in (None, "", ":memory:")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy (below) decide when transactions begin, instead of pysqlite's
        # implicit BEGIN before DML, which breaks SAVEPOINT and read consistency.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if not in_memory:
            # WAL: readers keep a consistent view while a compaction deletes.
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A write transaction takes the write lock at BEGIN, so two writers queue on the
        # busy timeout instead of deadlocking when both upgrade from a read lock.
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """Yield a connection inside a transaction that commits on success, rolls back on error."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.execution_options(**{_WRITE_OPTION: True})
        with conn.begin():
            yield conn


def insert_ignoring_conflicts(engine: Engine, table: sa.Table) -> Any:
    """Return an INSERT that does nothing when a unique constraint would be violated."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


@contextmanager
def translate_errors(engine: Engine, action: str) -> Iterator[None]:
    """Re-raise driver errors as eskit errors naming the database, password masked.

    Args:
        engine: The engine the block uses (for its URL).
        action: What was being done, e.g. ``"append to account/a-1"``.
    """
    try:
        yield
    except EskitError:
        raise
    except exc.DBAPIError as e:
        where = mask_url(engine.url)
        reason = _scrub(str(e.orig).strip().splitlines()[0] if str(e.orig).strip() else "", engine)
        if _is_connection_error(e):
            raise DatabaseUnavailableError(
                f"{action}: cannot reach the database at {where}: {reason}. "
                "Check that it is running and that the URL is right."
            ) from e
        raise StoreError(f"{action} failed on {where}: {reason}") from e
    except exc.SQLAlchemyError as e:
        where = mask_url(engine.url)
        raise StoreError(f"{action} failed on {where}: {_scrub(str(e), engine)}") from e


def _is_connection_error(e: exc.DBAPIError) -> bool:
    if e.connection_invalidated:
        return True
    if not isinstance(e, exc.OperationalError | exc.InterfaceError):
        return False
    state = getattr(e.orig, "sqlstate", None)
    if state is None:
        # psycopg reports a failed connect without SQLSTATE; SQLite's only
        # "unavailable" case is a file it cannot open. Everything else (locked, ...) is not.
        text = str(e.orig).lower()
        return "sqlite" not in type(e.orig).__module__ or "unable to open" in text
    return any(str(state).startswith(prefix) for prefix in _PG_CONNECTION_STATES)


def _scrub(message: str, engine: Engine) -> str:
    password = engine.url.password
    if password:
        message = message.replace(str(password), "***")
    return message
