"""Giving the space of deleted events back, and measuring it.

A DELETE frees nothing on disk by itself. On PostgreSQL the deleted rows stay in the
table as dead tuples until a ``VACUUM`` marks their space reusable (the table file keeps
its size); only ``VACUUM FULL`` (or ``pg_repack``) rewrites the table smaller. On SQLite
the deleted rows' pages go to the file's free list and are reused by later writes; the
file shrinks only by ``VACUUM`` or, in a database whose ``auto_vacuum`` is
``INCREMENTAL``, by ``PRAGMA incremental_vacuum``.

:func:`reclaim` does the step that fits and measures the database before and after:

* PostgreSQL: ``VACUUM (ANALYZE)`` of the given tables (``full=True``: ``VACUUM (FULL,
  ANALYZE)``, which holds an ACCESS EXCLUSIVE lock on each table while it rewrites it).
  Sizes come from ``pg_total_relation_size``; free and dead space from the
  ``pgstattuple`` extension's ``pgstattuple_approx`` when it is installed in the
  database (``CREATE EXTENSION pgstattuple``), otherwise they are left unmeasured (None)
  and the report says how to get them.
* SQLite: the WAL is checkpointed and truncated, then ``PRAGMA incremental_vacuum`` when
  the file allows it (``full=True``: ``VACUUM``, which rewrites the whole file and turns
  on incremental auto-vacuum for the next time). Sizes are page counts times page size.
"""

from __future__ import annotations

import os
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from eskit_tasks.domain.space import Mode, ReclaimReport, SpaceReport, TableSpace
from eskit_tasks.stores.driver_errors import mask_url, translate_errors
from eskit_tasks.stores.engine import SQLITE_AUTO_VACUUM
from eskit_tasks.stores.schema import events, snapshots

#: SQLite's ``auto_vacuum`` value of a file that ``incremental_vacuum`` can shrink.
SQLITE_INCREMENTAL = SQLITE_AUTO_VACUUM

PGSTATTUPLE_NOTE = (
    "free space not measured: install the pgstattuple extension in this database "
    "(CREATE EXTENSION pgstattuple) to see it"
)
FULL_LOCK_WARNING = {
    "postgresql": (
        "VACUUM FULL rewrites each table under an ACCESS EXCLUSIVE lock: appends and reads "
        "of these tables wait until it ends, and it needs free disk for a full copy. To "
        "shrink a busy table online use pg_repack instead."
    ),
    "sqlite": (
        "VACUUM rewrites the whole file: writers wait until it ends, and it needs free "
        "disk for a full copy."
    ),
}


def store_tables(engine: Engine) -> list[str]:
    """The tables of eskit's event store that compaction deletes from, as SQL names."""
    quote = engine.dialect.identifier_preparer.quote
    return [quote(events.name), quote(snapshots.name)]


def measure(engine: Engine, tables: list[str]) -> SpaceReport:
    """The measured size of ``tables`` (SQL names, quoted where needed) on PostgreSQL, or
    of the database file on SQLite."""
    with translate_errors(engine, "measure the database's size"), engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            return SpaceReport(tables=[_pg_table(conn, t) for t in tables])
        return SpaceReport(tables=[_sqlite_file(conn, engine)])


def reclaim(engine: Engine, tables: list[str], *, full: bool = False) -> ReclaimReport:
    """Give the space of deleted rows back (see the module's docstring); measure before
    and after. ``tables`` are vacuumed on PostgreSQL; SQLite works on the whole file."""
    started = time.monotonic()
    before = measure(engine, tables)
    postgres = engine.dialect.name == "postgresql"
    with translate_errors(engine, "reclaim the space of deleted events"):
        mode = _pg_vacuum(engine, tables, full) if postgres else _sqlite_reclaim(engine, full)
    after = measure(engine, tables)
    note = None
    if postgres and after.free_bytes is None:
        note = PGSTATTUPLE_NOTE
    elif mode == "checkpoint":
        note = (
            "the file keeps its size: its free pages are reused by new events; "
            "`eskit-tasks reclaim --full` rewrites it smaller and lets later runs shrink it"
        )
    return ReclaimReport(
        database=mask_url(engine.url),
        backend=engine.dialect.name,
        mode=mode,
        before=before,
        after=after,
        duration_s=round(time.monotonic() - started, 3),
        note=note,
    )


def _pg_table(conn: Connection, table: str) -> TableSpace:
    total = conn.execute(sa.text("SELECT pg_total_relation_size(:t)"), {"t": table}).scalar_one()
    has_stattuple = conn.execute(
        sa.text("SELECT count(*) FROM pg_extension WHERE extname = 'pgstattuple'")
    ).scalar_one()
    if not has_stattuple:
        return TableSpace(table=table, total_bytes=int(total))
    free, dead = conn.execute(
        sa.text(
            "SELECT approx_free_space, dead_tuple_len FROM pgstattuple_approx(CAST(:t AS regclass))"
        ),
        {"t": table},
    ).one()
    return TableSpace(
        table=table, total_bytes=int(total), free_bytes=int(free), dead_bytes=int(dead)
    )


def _pg_vacuum(engine: Engine, tables: list[str], full: bool) -> Mode:
    options = "FULL, ANALYZE" if full else "ANALYZE"
    # VACUUM cannot run inside a transaction block.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in tables:
            conn.exec_driver_sql(f"VACUUM ({options}) {table}")
    return "full" if full else "vacuum"


def _sqlite_file(conn: Connection, engine: Engine) -> TableSpace:
    page_size = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
    pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
    free = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
    path = engine.url.database or ":memory:"
    wal = f"{path}-wal"
    wal_bytes = os.path.getsize(wal) if os.path.exists(wal) else 0
    return TableSpace(
        table=os.path.basename(path),
        total_bytes=int(page_size) * int(pages) + wal_bytes,
        free_bytes=int(page_size) * int(free),
    )


def _sqlite_reclaim(engine: Engine, full: bool) -> Mode:
    # The DBAPI connection itself: VACUUM refuses to run in the transaction that
    # SQLAlchemy's connections begin (see stores/engine.py).
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if full:
            cur.execute(f"PRAGMA auto_vacuum = {SQLITE_INCREMENTAL}")
            cur.execute("VACUUM")
            mode: Mode = "full"
        elif cur.execute("PRAGMA auto_vacuum").fetchone()[0] == SQLITE_INCREMENTAL:
            # executescript steps the pragma to its end; execute() frees one page.
            driver: Any = raw.driver_connection
            driver.executescript("PRAGMA incremental_vacuum;")
            mode = "incremental"
        else:
            mode = "checkpoint"
        cur.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        cur.close()
    finally:
        raw.close()
    return mode
