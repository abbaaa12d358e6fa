"""Everything that differs between PostgreSQL and SQLite, and the driver-error boundary.

* engine creation: URL normalisation, SQLite pragmas and explicit transactions;
* ``write_transaction``: a transaction that takes the write lock up front
  (``BEGIN IMMEDIATE`` on SQLite; row locks do the job on PostgreSQL);
* ``insert_ignoring_conflicts``: ``INSERT ... ON CONFLICT DO NOTHING`` per dialect;
* ``translate_errors``: turns driver errors into :mod:`eskit_tasks.errors`, with
  passwords masked.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url

from eskit_tasks.domain import redact
from eskit_tasks.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    EskitError,
    StoreError,
    TableLayoutError,
)

#: Seconds SQLite waits for another connection's write lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 30
#: Seconds to wait for a PostgreSQL connection before reporting it unreachable.
PG_CONNECT_TIMEOUT_S = 10
#: PostgreSQL, inside eskit's write transactions: give up waiting for a row lock after this.
#: A worker paused while holding a stream's row lock cannot block appends for longer.
PG_LOCK_TIMEOUT = "30s"
#: PostgreSQL, inside write transactions: a client that stalls mid-transaction is cut off.
PG_IDLE_IN_TRANSACTION_TIMEOUT = "60s"
#: The drivers eskit-tasks is tested with.
SUPPORTED_DRIVERS = ("postgresql+psycopg", "sqlite", "sqlite+pysqlite")
#: Arbitrary constant key of the advisory lock that serialises table creation.
_SCHEMA_LOCK_KEY = 0x65736B6974  # "eskit"
#: Connection option that makes the next transaction on SQLite start as BEGIN IMMEDIATE.
_WRITE_OPTION = "eskit_write"

# SQLSTATE classes that mean the connection is gone, not that the statement was wrong:
# 08 connection exception, 57P01..57P03 admin shutdown / crash shutdown / cannot connect now.
_PG_CONNECTION_STATES = ("08", "57P01", "57P02", "57P03")


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


def mask_url(url: str | URL) -> str:
    """Render a URL with its password (and any ``password=`` parameter) as ``***``."""
    if isinstance(url, str):
        return redact.mask_url(url)
    return redact.mask_url(url.render_as_string(hide_password=True))


def secrets_of(url: URL) -> list[str]:
    """The secret values a URL carries, to scrub from driver messages."""
    found = [str(url.password)] if url.password else []
    for key, value in url.query.items():
        if key.lower() in ("password", "passwd", "pwd", "sslpassword"):
            found.extend([value] if isinstance(value, str) else list(value))
    return found


def create_engine(url: str | URL, **kwargs: Any) -> Engine:
    """Create an engine configured for eskit-tasks' transaction discipline.

    Raises:
        ConfigurationError: the URL or an engine option is invalid (message masked).
    """
    parsed = normalise_url(url)
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
    """Yield a connection inside a transaction that commits on success, rolls back on error.

    SQLite: ``BEGIN IMMEDIATE``. PostgreSQL: bounded waits for row locks and for a stalled
    client, so a paused worker cannot hold a stream's row lock indefinitely.
    """
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.execution_options(**{_WRITE_OPTION: True})
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql(
                    f"SET LOCAL lock_timeout = '{PG_LOCK_TIMEOUT}'; "
                    f"SET LOCAL idle_in_transaction_session_timeout = "
                    f"'{PG_IDLE_IN_TRANSACTION_TIMEOUT}'"
                )
            yield conn


def create_tables(
    engine: Engine,
    metadata: sa.MetaData,
    layout_differences: Callable[[Connection], list[str]],
) -> None:
    """Create missing tables and check the layout of those that exist; safe when many
    workers start at once on an empty database.

    Raises:
        TableLayoutError: the tables exist with another layout (nothing was changed).
    """
    with write_transaction(engine) as conn:
        if engine.dialect.name == "postgresql":
            # Concurrent CREATE TABLE IF NOT EXISTS races on PostgreSQL's catalogs.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
        differences = layout_differences(conn)
        if differences:
            raise TableLayoutError(
                f"the eskit tables in {mask_url(engine.url)} do not have the layout this "
                f"eskit-tasks expects: {'; '.join(differences)}. The tables were not changed; "
                "upgrade them as docs/upgrading.md describes, or use a database made by "
                "this version (eskit-tasks init-db)."
            )
        metadata.create_all(conn, checkfirst=True)


# The hot read path: one stream's events, on the driver's own cursor. SQLAlchemy's
# result processing costs about a third of a compaction's time here; this query is the
# only place that skips it. The stream's key is looked up first, so the event query is
# a plain range scan of the primary key in order (never a join, never a sort), and the
# timestamp comes as integer microseconds (PostgreSQL) or text (SQLite): events appended
# together share one timestamp, so each distinct value is converted once.
_PK_SQL = "SELECT pk FROM eskit_streams WHERE stream_type = {p} AND stream_id = {p}"
_READ_SQL = (
    "SELECT version, type, data, metadata, {ts} FROM eskit_events "
    "WHERE stream_pk = {p} AND version >= {p}{upper} ORDER BY version"
)
# Microseconds since the epoch. extract() returns numeric since PostgreSQL 14, and that
# numeric arithmetic per row was a tenth of a 200,000-event compaction. date_part()
# works in float8: PostgreSQL divides the exact microsecond count by 10**6 (one correctly
# rounded step) and we multiply back (another); while |seconds| < 2**32 the two errors
# stay under half a microsecond, so the cast rounds to the exact count. That holds from
# 1833 to 2106 (|seconds| < 2**32); it is used from 1902 to 2100, the exact numeric path
# elsewhere (tests/test_sql.py compares the two).
_PG_MICROS = (
    "CASE WHEN recorded_at >= '1902-01-01 00:00:00+00' "
    "AND recorded_at < '2100-01-01 00:00:00+00' "
    "THEN (date_part('epoch', recorded_at) * 1000000)::bigint "
    "ELSE (extract(epoch FROM recorded_at) * 1000000)::bigint END"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def stream_events(
    conn: Connection,
    stream_type: str,
    stream_id: str,
    from_version: int,
    to_version: int | None,
    page_size: int,
) -> tuple[Generator[list[tuple[int, str, str, str, Any]], None, None], Callable[[Any], datetime]]:
    """Pages of (version, type, data, metadata, raw timestamp) rows of one stream in
    version order, ``page_size`` rows each, from one statement (one consistent view),
    and the function that turns a raw timestamp into an aware datetime.

    Call inside a transaction (``conn.begin()``). PostgreSQL: a server-side cursor.
    SQLite: ``fetchmany`` on a plain cursor (WAL keeps the statement's snapshot).
    """
    pg = conn.dialect.name == "postgresql"
    return _pages(conn, pg, stream_type, stream_id, from_version, to_version, page_size), (
        _micros_to_datetime if pg else _text_to_datetime
    )


def _micros_to_datetime(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def _text_to_datetime(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _pages(
    conn: Connection,
    pg: bool,
    stream_type: str,
    stream_id: str,
    from_version: int,
    to_version: int | None,
    page_size: int,
) -> Generator[list[tuple[int, str, str, str, Any]], None, None]:
    driver = conn.connection.driver_connection
    assert driver is not None
    mark = "%s" if pg else "?"
    found = driver.execute(_PK_SQL.format(p=mark), (stream_type, stream_id)).fetchone()
    if found is None:
        return
    params: list[Any] = [found[0], from_version]
    upper = ""
    if to_version is not None:
        params.append(to_version)
        upper = f" AND version <= {mark}"
    sql = _READ_SQL.format(p=mark, upper=upper, ts=_PG_MICROS if pg else "recorded_at")
    if pg:
        with driver.cursor(name=f"eskit_read_{id(params):x}") as cur:
            cur.execute(sql, params)
            while rows := cur.fetchmany(page_size):
                yield rows
        return
    cur = driver.cursor()
    try:
        cur.execute(sql, params)
        while rows := cur.fetchmany(page_size):
            yield rows
    finally:
        cur.close()


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
        raise _driver_error(engine, action, e.orig, _is_connection_error(e)) from e
    except DRIVER_ERRORS as e:  # raised by the hot read path on the driver's cursor
        raise _driver_error(engine, action, e, _is_unavailable(e)) from e
    except exc.SQLAlchemyError as e:
        # str(e) of a StatementError appends the SQL and its parameters (payloads): keep
        # only the first line, which names the problem.
        cause = getattr(e, "orig", None)
        reason = _reason(str(cause) if cause is not None else str(e), engine)
        raise StoreError(f"{action} failed on {mask_url(engine.url)}: {reason}") from e
    except UnicodeEncodeError as e:
        raise ConfigurationError(
            f"{action}: stream types, ids and payloads must be valid Unicode text "
            f"(found {e.reason} at position {e.start})"
        ) from None


def _driver_error(
    engine: Engine, action: str, orig: BaseException | None, unavailable: bool
) -> EskitError:
    """The eskit error for a driver's error (whether it came through SQLAlchemy or not)."""
    where = mask_url(engine.url)
    reason = _reason(str(orig), engine)
    if getattr(orig, "sqlstate", None) == _PG_PROGRAM_LIMIT_EXCEEDED:
        return ConfigurationError(
            f"{action}: refused by PostgreSQL: {reason}. A stream type and id must "
            f"fit one entry of its unique index: keep them under {PG_KEY_BYTES:,} bytes "
            "together (longer ones that compress well may pass); hash longer ids in "
            "your application. Nothing was written."
        )
    if unavailable:
        return DatabaseUnavailableError(
            f"{action}: cannot reach the database at {where}: {reason}. "
            "Check that it is running and that the URL is right."
        )
    return StoreError(f"{action} failed on {where}: {reason}")


#: SQLSTATE of "index row size exceeds btree maximum" and other size limits.
_PG_PROGRAM_LIMIT_EXCEEDED = "54000"
#: A PostgreSQL btree entry holds at most about a third of an 8 kB page, after
#: compression: stream type + id up to this many bytes always fit.
PG_KEY_BYTES = 2_600


def _reason(text: str, engine: Engine) -> str:
    first = text.strip().splitlines()[0] if text.strip() else "no details"
    return redact.scrub(first, secrets_of(engine.url))


def _is_connection_error(e: exc.DBAPIError) -> bool:
    if e.connection_invalidated:
        return True
    if not isinstance(e, exc.OperationalError | exc.InterfaceError):
        return False
    return e.orig is not None and _is_unavailable(e.orig)


def _is_unavailable(orig: BaseException) -> bool:
    """Is this driver error a lost or refused connection (not a bad statement)?"""
    if not isinstance(
        orig, psycopg.OperationalError | psycopg.InterfaceError | sqlite3.OperationalError
    ):
        return False
    state = getattr(orig, "sqlstate", None)
    if state is None:
        # psycopg reports a failed connect without SQLSTATE; SQLite's only
        # "unavailable" case is a file it cannot open. Everything else (locked, ...) is not.
        return not isinstance(orig, sqlite3.Error) or "unable to open" in str(orig).lower()
    return any(str(state).startswith(prefix) for prefix in _PG_CONNECTION_STATES)


#: Errors of the drivers themselves (the hot read path uses their cursors directly).
DRIVER_ERRORS = (psycopg.Error, sqlite3.Error)
