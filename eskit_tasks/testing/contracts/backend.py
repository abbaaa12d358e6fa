"""What the contract suites run against: the value of the ``stores`` fixture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

import pytest

from eskit_tasks.ports import EventStore, SnapshotStore
from eskit_tasks.testing import damage


def _missing(hook: str) -> Callable[..., None]:
    """The stand-in for a damage hook the fixture does not give: it skips the test."""

    def skip(*_args: object) -> None:
        pytest.skip(f"the stores fixture gives no {hook} hook (see Stores)")

    return skip


@dataclass
class Stores:
    """A backend under test: its two ports, and ways to damage its stored rows on purpose.

    The hooks change the rows behind the adapter's back, as an operator's mistake or a
    broken disk would; the tests that need one are skipped where it is not given.
    :meth:`bundled` fills them in for eskit-tasks' own stores
    (:mod:`eskit_tasks.testing.damage`).

    Args:
        events: The event store under test.
        snapshots: The snapshot store of the same database.
        corrupt_event: ``(stream_type, stream_id, version, raw)``: replace the event's
            stored payload text with ``raw``.
        remove_event: ``(stream_type, stream_id, version)``: delete the event.
        set_recorded_at: ``(stream_type, stream_id, version, moment)``: rewrite the
            event's timestamp.
        tamper_snapshot: ``(stream_type, stream_id, version, state)``: rewrite the stored
            snapshot's state bytes, its stored hash left alone.
        remove_snapshot: ``(stream_type, stream_id, version)``: delete the snapshot.
        url: The database's URL, where it has one.
    """

    events: EventStore
    snapshots: SnapshotStore
    corrupt_event: Callable[[str, str, int, str], None] = field(default=_missing("corrupt_event"))
    remove_event: Callable[[str, str, int], None] = field(default=_missing("remove_event"))
    set_recorded_at: Callable[[str, str, int, datetime], None] = field(
        default=_missing("set_recorded_at")
    )
    tamper_snapshot: Callable[[str, str, int, bytes], None] = field(
        default=_missing("tamper_snapshot")
    )
    remove_snapshot: Callable[[str, str, int], None] = field(default=_missing("remove_snapshot"))
    url: str | None = None

    @classmethod
    def bundled(
        cls, events: EventStore, snapshots: SnapshotStore, url: str | None = None
    ) -> Stores:
        """eskit-tasks' own stores (memory or SQL), with :mod:`eskit_tasks.testing.damage`
        as the hooks."""
        return cls(
            events,
            snapshots,
            corrupt_event=partial(damage.corrupt_event, events),
            remove_event=partial(damage.remove_event, events),
            set_recorded_at=partial(damage.set_recorded_at, events),
            tamper_snapshot=partial(damage.tamper_snapshot, events),
            remove_snapshot=partial(damage.remove_snapshot, events),
            url=url,
        )
