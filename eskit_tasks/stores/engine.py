"""Engine set-up: what differs between PostgreSQL and SQLite below the statements.

* :func:`create_engine`: URL normalisation, connect and pool options per dialect,
  SQLite's pragmas and explicit transactions;
* :func:`write_transaction`: a transaction that takes the write lock up front
  (``BEGIN IMMEDIATE`` on SQLite; row locks, with bounded waits, on PostgreSQL);
* :func:`reading` / :func:`writing`: a connection or a write transaction whose driver
  errors come out as :mod:`eskit_tasks.errors` (:mod:`.driver_errors`);
* :func:`clock_expression`, :func:`insert_ignoring_conflicts`: the two statements'
  pieces that are spelled per dialect.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url

from eskit_tasks.domain import redact
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.stores.driver_errors import mask_url, note_origin, secrets_of, translate_errors

#: Seconds SQLite waits for another connection's write lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 30
#: auto_vacuum of the SQLite files eskit-tasks creates: INCREMENTAL (see stores/reclaim.py).
SQLITE_AUTO_VACUUM = 2
#: Seconds to wait for a PostgreSQL connection before reporting it unreachable.
PG_CONNECT_TIMEOUT_S = 10
#: PostgreSQL, inside eskit's write transactions: give up waiting for a row lock after this.
#: A worker paused while holding a stream's row lock cannot block appends for longer.
PG_LOCK_TIMEOUT = "30s"
#: PostgreSQL, inside write transactions: a client that stalls mid-transaction is cut off.
PG_IDLE_IN_TRANSACTION_TIMEOUT = "60s"
#: The drivers eskit-tasks is tested with.
SUPPORTED_DRIVERS = ("postgresql+psycopg", "sqlite", "sqlite+pysqlite")
#: Connection option that makes the next transaction on SQLite start as BEGIN IMMEDIATE.
_WRITE_OPTION = "eskit_write"


def normalise_url(url: str | URL) -> URL:
    """Parse ``url`` and pick psycopg 3 for a bare ``postgresql://`` or ``postgres://``.

    Raises:
        ConfigurationError: not a URL, or not PostgreSQL/SQLite (message masked).
    """
    try:
        parsed = make_url(url)
        port = parsed.port  # parsing the port validates it
    except (exc.ArgumentError, ValueError) as e:
        raise ConfigurationError(
            f"not a database URL: {redact.mask_url(str(url))!r} ({redact.mask_url(str(e))})"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in ("postgresql", "sqlite") or parsed.drivername not in SUPPORTED_DRIVERS:
        raise ConfigurationError(
            f"unsupported database driver {parsed.drivername!r} in {mask_url(parsed)}: "
            "use sqlite:///path.db or postgresql+psycopg://user:password@host:port/db"
        )
    del port
    return parsed


def create_engine(url: str | URL, *, origin: str | None = None, **kwargs: Any) -> Engine:
    """Create an engine configured for eskit-tasks' transaction discipline.

    Args:
        url: The database URL.
        origin: Where the URL came from (``ESKIT_DATABASE_URL``, ``--database``): an
            unreachable database is reported with it.
        kwargs: SQLAlchemy engine options.

    Raises:
        ConfigurationError: the URL or an engine option is invalid (message masked).
    """
    engine = _create_engine(normalise_url(url), **kwargs)
    note_origin(engine, origin)
    return engine


def _create_engine(parsed: URL, **kwargs: Any) -> Engine:
    try:
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(parsed, **kwargs)
        connect_args = dict(kwargs.pop("connect_args", {}))
        if "connect_timeout" not in parsed.query:
            connect_args.setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
        if "options" not in parsed.query:
            # Sessions in UTC: timestamps come back with a zero offset, no conversion.
            connect_args.setdefault("options", "-c TimeZone=UTC")
        # pre_ping: a worker whose connection was terminated (failover,
        # pg_terminate_backend) reconnects instead of failing its next compaction.
        kwargs.setdefault("pool_pre_ping", True)
        return sa.create_engine(parsed, connect_args=connect_args, **kwargs)
    except (exc.ArgumentError, exc.NoSuchModuleError, ImportError, TypeError, ValueError) as e:
        raise ConfigurationError(
            f"cannot create a database engine for {mask_url(parsed)}: "
            f"{redact.scrub(str(e), secrets_of(parsed))}"
        ) from None


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
            # A new file can then be shrunk by `PRAGMA incremental_vacuum` after a run
            # (stores/reclaim.py); on a file that has tables already this takes effect
            # at its next VACUUM (`eskit-tasks reclaim --full`). Before the WAL switch,
            # which writes the file's header.
            cur.execute(f"PRAGMA auto_vacuum={SQLITE_AUTO_VACUUM}")
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
def write_transaction(engine: Engine, *, durable: bool = True) -> Iterator[Connection]:
    """Yield a connection inside a transaction that commits on success, rolls back on error.

    SQLite: ``BEGIN IMMEDIATE``. PostgreSQL: bounded waits for row locks and for a stalled
    client, so a paused worker cannot hold a stream's row lock indefinitely.

    ``durable=False``: the commit returns before its WAL is flushed to disk, which saves
    a disk flush (PostgreSQL: ``synchronous_commit = off``; SQLite in WAL mode:
    ``synchronous=NORMAL``). Only for a write that something durable must confirm later: a
    crash may undo it, and WAL is flushed in order, so the next durable commit makes it
    durable too (an unverified snapshot, which only the delete transaction makes count).
    """
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.execution_options(**{_WRITE_OPTION: True})
            if not durable:
                with _sqlite_synchronous_normal(conn), conn.begin():
                    yield conn
                return
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql(
                    f"SET LOCAL lock_timeout = '{PG_LOCK_TIMEOUT}'; "
                    f"SET LOCAL idle_in_transaction_session_timeout = "
                    f"'{PG_IDLE_IN_TRANSACTION_TIMEOUT}'"
                    + ("" if durable else "; SET LOCAL synchronous_commit = off")
                )
            yield conn


@contextmanager
def _sqlite_synchronous_normal(conn: Connection) -> Iterator[None]:
    """SQLite's ``durable=False``: in WAL mode ``synchronous=NORMAL`` commits without a
    sync, and the next commit under the connection's own setting syncs the WAL up to
    and including this one. The setting is restored before the connection goes back."""
    driver = conn.connection.driver_connection  # outside SQLAlchemy's transaction
    assert driver is not None
    (was,) = driver.execute("PRAGMA synchronous").fetchone()
    driver.execute("PRAGMA synchronous=NORMAL")
    try:
        yield
    finally:
        driver.execute(f"PRAGMA synchronous={int(was)}")


@contextmanager
def reading(engine: Engine, action: str) -> Iterator[Connection]:
    """A connection for reads; driver errors leave it as eskit errors naming ``action``."""
    with translate_errors(engine, action), engine.connect() as conn:
        yield conn


@contextmanager
def writing(engine: Engine, action: str, *, durable: bool = True) -> Iterator[Connection]:
    """A :func:`write_transaction`; driver errors leave it as eskit errors naming ``action``."""
    with translate_errors(engine, action), write_transaction(engine, durable=durable) as conn:
        yield conn


def clock_expression(engine: Engine) -> Any:
    """What stamps ``recorded_at``: the database's clock on PostgreSQL (one clock for every
    worker host), the local clock on SQLite (the database is a local file)."""
    if engine.dialect.name == "postgresql":
        return sa.func.now()
    return datetime.now(UTC)


def insert_ignoring_conflicts(engine: Engine, table: sa.Table) -> Any:
    """Return an INSERT that does nothing when a unique constraint would be violated."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()
