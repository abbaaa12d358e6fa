"""Which streams a run compacts: bounded pages of candidates, read the same way by the
fleet's fan-out and by ``compact-all --local``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from eskit_tasks.ports import Candidate, EventStore

#: A page of candidates examines at most page_size x this many stream keys, so a sparse
#: key range (few streams worth compacting) cannot make one query scan the whole table.
FANOUT_SCAN_FACTOR = 20
#: Streams per page when the caller does not say.
PAGE_SIZE = 500


def candidate_page(
    store: EventStore,
    *,
    after: int,
    limit: int,
    page_size: int,
    min_live_events: int,
    stream_types: Sequence[str] | None,
) -> tuple[list[Candidate], int]:
    """One bounded page of candidates: at most ``limit`` streams after key ``after``,
    examining at most ``page_size x FANOUT_SCAN_FACTOR`` keys; and the key the next
    page starts after."""
    until = after + page_size * FANOUT_SCAN_FACTOR
    page = (
        []
        if limit <= 0
        else store.candidates(
            after=after,
            until=until,
            limit=limit,
            min_live_events=min_live_events,
            stream_types=stream_types,
        )
    )
    return page, page[-1].key if page and len(page) == limit else until


def iter_candidates(
    store: EventStore,
    *,
    min_events: int = 1,
    retain_last: int = 0,
    stream_types: Sequence[str] | None = None,
    limit: int | None = None,
    page_size: int = PAGE_SIZE,
) -> Iterator[Candidate]:
    """Every candidate in key order, page by page (memory bounded by one page): streams
    with at least ``min_events`` live events and more than ``retain_last``, at most
    ``limit`` of them."""
    after, seen, last = 0, 0, store.max_stream_key()
    while after < last and (limit is None or seen < limit):
        page, after = candidate_page(
            store,
            after=after,
            limit=page_size if limit is None else min(page_size, limit - seen),
            page_size=page_size,
            min_live_events=max(min_events, retain_last + 1),
            stream_types=stream_types,
        )
        yield from page
        seen += len(page)
