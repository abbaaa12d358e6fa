"""The hot read path: one stream's events, on the driver's own cursor.

SQLAlchemy's result processing costs about a third of a compaction's time here; this
query is the only place that skips it. The stream's key is looked up first, so the event
query is a plain range scan of the primary key in order (never a join, never a sort),
and the timestamp comes as integer microseconds (PostgreSQL) or text (SQLite): events
appended together share one timestamp, so each distinct value is converted once.

Rows are fetched ``page_size`` at a time from one statement (one consistent view), so
memory is bounded by the page size whatever the length of the stream.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg.types.numeric import Int8BinaryLoader
from sqlalchemy.engine import Connection, Engine

from eskit_tasks.domain.events import RecordedEvent, label_of
from eskit_tasks.domain.fold import Evolve
from eskit_tasks.stores._rules import ReadRow, decode_events, fold_pages
from eskit_tasks.stores.engine import reading

_PK_SQL = "SELECT pk FROM eskit_streams WHERE stream_type = {p} AND stream_id = {p}"
# NULLIF: empty metadata (most events') arrives as NULL, which the driver does not turn
# into a string per row.
_READ_SQL = (
    "SELECT version, type, data, NULLIF(metadata, '{{}}'), {ts}, position FROM eskit_events "
    "WHERE stream_pk = {p} AND version >= {p}{upper} ORDER BY version"
)
# One page of the whole store in position order (a keyset page: each page is its own
# statement, so a follower holds no transaction open between pages).
_READ_ALL_SQL = (
    "SELECT s.stream_type, s.stream_id, e.version, e.type, e.data, e.metadata, {ts}, "
    "e.position FROM eskit_events e JOIN eskit_streams s ON s.pk = e.stream_pk "
    "WHERE e.position > {p} ORDER BY e.position LIMIT {p}"
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


class StreamRead(Iterator[RecordedEvent]):
    """One read of a stream: iterate it for events one by one, or let :meth:`fold` fold
    them a page at a time (what every replay does: the fast path).

    One SELECT, in one transaction, serves the whole read. PostgreSQL: a server-side
    cursor in binary format, whose next page is fetched in a second thread while this
    one is folded (psycopg waits for the server without the GIL; at most
    ``PREFETCH_PAGES`` pages wait). SQLite: ``fetchmany`` on a plain cursor (WAL keeps
    the statement's snapshot). A read is used once, either way.

    Raises:
        EventDecodeError: a payload is not valid JSON (names stream and version).
    """

    def __init__(
        self,
        engine: Engine,
        stream_type: str,
        stream_id: str,
        from_version: int,
        to_version: int | None,
        page_size: int,
    ) -> None:
        self._engine = engine
        self._stream = (stream_type, stream_id)
        self._range = (from_version, to_version)
        self._page_size = page_size
        self._events: Generator[RecordedEvent, None, None] | None = None
        self._used = False

    def __iter__(self) -> StreamRead:
        return self

    def __next__(self) -> RecordedEvent:
        if self._events is None:
            # The generator must not refer to this object: a cycle would keep an
            # abandoned read's connection out of the pool until the next collection.
            self._events = _decoded(*self._stream, self._pages())
        return next(self._events)

    def close(self) -> None:
        """Stop an unfinished iteration: closes the cursor and ends the transaction."""
        if self._events is not None:
            self._events.close()

    def fold(self, evolve: Evolve, state: Any, after: int) -> tuple[Any, int, int]:
        """Fold the events into ``state``; see :class:`~eskit_tasks.domain.fold.FoldsItself`."""
        with self._pages() as (pages, to_datetime):
            return fold_pages(*self._stream, pages, to_datetime, evolve, state, after)

    def _pages(self) -> contextlib.AbstractContextManager[_Pages]:
        if self._used:
            raise RuntimeError("a stream read is used once; call read() again")
        self._used = True
        return _open_pages(self._engine, *self._stream, *self._range, self._page_size)


#: A read's pages of stored rows, and how their raw timestamps become datetimes.
_Pages = tuple[Iterator[list[ReadRow]], Callable[[Any], datetime]]


def _decoded(
    stream_type: str, stream_id: str, opened: contextlib.AbstractContextManager[_Pages]
) -> Generator[RecordedEvent, None, None]:
    with opened as (pages, to_datetime):
        yield from decode_events(
            stream_type, stream_id, itertools.chain.from_iterable(pages), to_datetime
        )


@contextlib.contextmanager
def _open_pages(
    engine: Engine,
    stream_type: str,
    stream_id: str,
    from_version: int,
    to_version: int | None,
    page_size: int,
) -> Iterator[_Pages]:
    with (
        reading(engine, f"read {label_of(stream_type, stream_id)}") as conn,
        conn.begin(),
    ):
        pg = conn.dialect.name == "postgresql"
        pages = _pages(conn, pg, stream_type, stream_id, from_version, to_version, page_size)
        # closing(): an abandoned read closes its cursor before the connection goes.
        with contextlib.closing(pages):
            if not pg:
                yield pages, _text_to_datetime
                return
            with prefetched(pages, PREFETCH_PAGES) as ahead:
                yield ahead, _pg_micros_to_datetime


#: Pages a PostgreSQL read fetches ahead of the fold (memory: this many pages more).
PREFETCH_PAGES = 2

_END: list[ReadRow] = []


@contextlib.contextmanager
def prefetched(pages: Iterator[list[ReadRow]], depth: int) -> Iterator[Iterator[list[ReadRow]]]:
    """``pages``, fetched by a second thread up to ``depth`` pages ahead of the consumer.

    The fetching thread alone touches ``pages`` until it has stopped: on leaving, the
    consumer tells it to stop, drains what it queued and waits for it (at most the page
    it is fetching), so the caller may close the cursor and the connection afterwards.
    An error of the fetching thread is raised in the consumer, at the page it stopped.
    """
    ready: queue.Queue[list[ReadRow] | BaseException] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def fetch() -> None:
        try:
            for page in pages:
                ready.put(page)
                if stop.is_set():
                    return
            ready.put(_END)
        except BaseException as exc:  # handed to the consumer with its traceback
            ready.put(exc)

    def consume() -> Iterator[list[ReadRow]]:
        while True:
            page = ready.get()
            if isinstance(page, BaseException):
                raise page
            if page is _END:
                return
            yield page

    fetcher = threading.Thread(target=fetch, name="eskit-read-ahead", daemon=True)
    fetcher.start()
    try:
        yield consume()
    finally:
        stop.set()
        while fetcher.is_alive():
            with contextlib.suppress(queue.Empty):
                while True:
                    ready.get_nowait()
            fetcher.join(0.01)


def read_all_events(
    engine: Engine, after_position: int, limit: int | None, page_size: int
) -> Iterator[RecordedEvent]:
    """Yield live events of every stream above ``after_position`` in position order, at
    most ``limit``, a page per statement (memory bounded by ``page_size``).

    Positions become visible in order (:mod:`.positions`), so a page never ends before
    an event that commits later with a lower position.
    """
    left = limit
    while left is None or left > 0:
        take = page_size if left is None else min(page_size, left)
        with reading(engine, "read the store in position order") as conn:
            pg = conn.dialect.name == "postgresql"
            driver = conn.connection.driver_connection
            assert driver is not None
            ts = _PG_MICROS.replace("recorded_at", "e.recorded_at") if pg else "e.recorded_at"
            sql = _READ_ALL_SQL.format(p="%s" if pg else "?", ts=ts)
            rows = driver.execute(sql, (after_position, take)).fetchall()
        to_datetime = _micros_to_datetime if pg else _text_to_datetime
        for (stream_type, stream_id), run in itertools.groupby(rows, _stream_of):
            yield from decode_events(stream_type, stream_id, (r[2:] for r in run), to_datetime)
        if len(rows) < take:
            return
        after_position = rows[-1][-1]
        if left is not None:
            left -= len(rows)


def _stream_of(row: tuple[Any, ...]) -> tuple[str, str]:
    return row[0], row[1]


def _micros_to_datetime(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def _pg_micros_to_datetime(micros: int) -> datetime:
    """A PostgreSQL ``timestamptz`` as stored: microseconds since 2000-01-01 UTC."""
    return _PG_EPOCH + timedelta(microseconds=micros)


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
) -> Generator[list[ReadRow], None, None]:
    """Pages of (version, type, data, metadata, raw timestamp) rows in version order."""
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
    sql = _READ_SQL.format(p=mark, upper=upper, ts="recorded_at")
    if pg:
        # Binary rows: integers arrive as integers, and the timestamp as the integer it
        # is stored as (microseconds since 2000), converted once per distinct value.
        with driver.cursor(name=f"eskit_read_{id(params):x}", binary=True) as cur:
            cur.adapters.register_loader("timestamptz", Int8BinaryLoader)
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
