"""Which streams a run compacts: bounded pages of candidates, read the same way by the
fleet's fan-out and by ``compact-all --local``: the event store's streams first, then
those of each registered source (:class:`~eskit_tasks.core.registry.StreamSource`), in
one cursor (:func:`run_page`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from eskit_tasks.core.registry import StreamSource, registered_sources, sources_for
from eskit_tasks.domain.policy import CompactionPolicy, plan_cut
from eskit_tasks.ports import Candidate, EventStore

#: A page of candidates examines at most page_size x this many stream keys, so a sparse
#: key range (few streams worth compacting) cannot make one query scan the whole table.
FANOUT_SCAN_FACTOR = 20
#: Streams per page when the caller does not say.
PAGE_SIZE = 500
#: A run's cursor is ``segment * SEGMENT + key``: segment 0 is the event store (keys are
#: its stream keys), segment k the k-th source a run covers (keys its own, below 2**129).
SEGMENT = 1 << 130

#: Which of a page's streams to leave out (quarantined ones): their (type, id) pairs.
Skip = Callable[[Sequence[Candidate]], set[tuple[str, str]]]


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


def run_page(
    store: EventStore,
    sources: Sequence[StreamSource],
    *,
    cursor: int,
    limit: int,
    page_size: int,
    min_live_events: int,
    stream_types: Sequence[str] | None,
    skip: Skip | None = None,
) -> tuple[list[Candidate], int, bool]:
    """One bounded page of a run's candidates after ``cursor``: the event store's streams
    (of ``stream_types`` that are not sources), then each of ``sources`` in turn (as
    :func:`~eskit_tasks.core.registry.sources_for` lists them for ``stream_types``),
    without the streams ``skip`` names. Returns the page, the cursor the next page
    starts after, and whether the run has examined everything."""
    page, after, done = _run_page(
        store,
        sources,
        cursor=cursor,
        limit=limit,
        page_size=page_size,
        min_live_events=min_live_events,
        stream_types=stream_types,
    )
    if skip is not None and page:
        left_out = skip(page)
        page = [c for c in page if (c.stream_type, c.stream_id) not in left_out]
    return page, after, done


def _run_page(
    store: EventStore,
    sources: Sequence[StreamSource],
    *,
    cursor: int,
    limit: int,
    page_size: int,
    min_live_events: int,
    stream_types: Sequence[str] | None,
) -> tuple[list[Candidate], int, bool]:
    segment, key = divmod(cursor, SEGMENT)
    if limit <= 0:
        return [], cursor, True
    if segment == 0:
        named = set(registered_sources())
        store_types = None if stream_types is None else [t for t in stream_types if t not in named]
        if store_types is None or store_types:
            page, after = candidate_page(
                store,
                after=key,
                limit=limit,
                page_size=page_size,
                min_live_events=min_live_events,
                stream_types=store_types,
            )
            if (page and len(page) == limit) or after < store.max_stream_key():
                return page, after, False
            return page, SEGMENT, not sources  # the store is done: the sources next
        segment, key = 1, 0
    if segment > len(sources):
        return [], cursor, True
    page, next_key = sources[segment - 1].candidate_page(
        after=key, limit=limit, min_live_events=min_live_events
    )
    if next_key is not None:
        return page, segment * SEGMENT + next_key, False
    return page, (segment + 1) * SEGMENT, segment >= len(sources)


def iter_candidates(
    store: EventStore,
    *,
    min_events: int = 1,
    retain_last: int = 0,
    stream_types: Sequence[str] | None = None,
    limit: int | None = None,
    page_size: int = PAGE_SIZE,
    skip: Skip | None = None,
) -> Iterator[Candidate]:
    """Every candidate of the store and then of the registered sources, page by page
    (memory bounded by one page): streams with at least ``min_events`` live events and
    more than ``retain_last``, at most ``limit`` of them, but those ``skip`` names."""
    sources = [source for _, source in sources_for(stream_types)]
    cursor, seen, done = 0, 0, False
    while not done and (limit is None or seen < limit):
        page, cursor, done = run_page(
            store,
            sources,
            cursor=cursor,
            limit=page_size if limit is None else min(page_size, limit - seen),
            page_size=page_size,
            min_live_events=max(min_events, retain_last + 1),
            stream_types=stream_types,
            skip=skip,
        )
        yield from page
        seen += len(page)


def with_old_events(
    store: EventStore, candidates: Iterable[Candidate], policy: CompactionPolicy
) -> Iterator[Candidate]:
    """Those of ``candidates`` whose events the policy's age rule lets a compaction
    delete now (the cut a compaction would plan, before the consumers' gate). Two indexed
    reads a stream; the streams of a registered source pass unchecked."""
    if policy.retain_younger_than is None:
        yield from candidates
        return
    cutoff = store.now() - policy.retain_younger_than
    sources = set(registered_sources())
    for c in candidates:
        if c.stream_type in sources:
            yield c
            continue
        info = store.stream_info(c.stream_type, c.stream_id)
        if info is None:  # removed since it was listed
            continue
        young = store.oldest_version_after(c.stream_type, c.stream_id, cutoff)
        cut = plan_cut(
            head=info.head_version,
            compacted_through=info.compacted_through,
            retain_last=policy.retain_last,
            newest_old_enough=info.head_version if young is None else young - 1,
        )
        if cut is not None:
            yield c
