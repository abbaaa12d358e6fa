"""The driver-error boundary: SQLAlchemy, psycopg and sqlite3 errors become
:mod:`eskit_tasks.errors`, naming the database with its password masked.

Nothing a driver raises leaves the SQL stores as itself: a lost or refused connection
is a :class:`~eskit_tasks.errors.DatabaseUnavailableError`, an id too long for
PostgreSQL's index a :class:`~eskit_tasks.errors.ConfigurationError`, the rest a
:class:`~eskit_tasks.errors.StoreError` — and no message carries a password or, for a
failed statement, its SQL and parameters (the payloads).
"""

from __future__ import annotations

import sqlite3
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import exc
from sqlalchemy.engine import URL, Engine

from eskit_tasks.domain import redact
from eskit_tasks.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    EskitError,
    StoreError,
)

#: Errors of the drivers themselves (the hot read path uses their cursors directly).
DRIVER_ERRORS = (psycopg.Error, sqlite3.Error)
#: A PostgreSQL btree entry holds at most about a third of an 8 kB page, after
#: compression: stream type + id up to this many bytes always fit.
PG_KEY_BYTES = 2_600
#: SQLSTATE of "index row size exceeds btree maximum" and other size limits.
_PG_PROGRAM_LIMIT_EXCEEDED = "54000"
# SQLSTATE classes that mean the connection is gone, not that the statement was wrong:
# 08 connection exception, 57P01..57P03 admin shutdown / crash shutdown / cannot connect now.
_PG_CONNECTION_STATES = ("08", "57P01", "57P02", "57P03")


#: Where an engine's URL came from (``ESKIT_DATABASE_URL``, ``--database``), for messages.
_ORIGINS: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def note_origin(engine: Engine, origin: str | None) -> None:
    """Remember that ``engine``'s URL came from ``origin`` (a setting or a flag)."""
    if origin:
        _ORIGINS[engine] = origin


def describe_database(engine: Engine) -> str:
    """``the database (ESKIT_DATABASE_URL postgresql://bob:***@db/x)``: which service,
    from which setting, where, password masked."""
    origin = _ORIGINS.get(engine)
    where = mask_url(engine.url)
    return f"the database ({origin} {where})" if origin else f"the database ({where})"


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
            f"{action}: cannot reach {describe_database(engine)}: {reason}. "
            "Check that it is running and that the URL is right."
        )
    return StoreError(f"{action} failed on {where}: {reason}")


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
