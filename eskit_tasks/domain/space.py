"""What reclaiming the space of deleted events measured (see
:mod:`eskit_tasks.stores.reclaim`): sizes read from the database, never estimates."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

#: What a reclaim did: PostgreSQL ``vacuum`` or ``full``; SQLite ``incremental``
#: (the file shrank), ``full`` (VACUUM) or ``checkpoint`` (only the WAL was truncated).
Mode = Literal["vacuum", "full", "incremental", "checkpoint"]


class TableSpace(BaseModel):
    """One table's size as measured (bytes). ``free_bytes`` and ``dead_bytes`` are None
    where the database cannot measure them (PostgreSQL without pgstattuple)."""

    table: str
    total_bytes: int
    free_bytes: int | None = None
    dead_bytes: int | None = None


class SpaceReport(BaseModel):
    """The measured size of a database's compacted tables at one moment.

    On PostgreSQL one entry per table (its heap, indexes and TOAST); on SQLite one entry
    for the whole file (``table`` is the file name) plus its WAL.
    """

    tables: list[TableSpace]

    @property
    def total_bytes(self) -> int:
        return sum(t.total_bytes for t in self.tables)

    @property
    def free_bytes(self) -> int | None:
        free = [t.free_bytes for t in self.tables]
        return None if any(f is None for f in free) else sum(f for f in free if f is not None)

    @property
    def dead_bytes(self) -> int | None:
        dead = [t.dead_bytes for t in self.tables]
        return None if any(d is None for d in dead) else sum(d for d in dead if d is not None)


class ReclaimReport(BaseModel):
    """What a reclaim did and the sizes it measured before and after.

    ``shrunk_bytes`` is how much smaller the files are (``total_bytes`` before minus
    after); ``reusable_bytes`` how much more free space the tables hold for new rows
    (None when free space is not measured). Neither is an estimate.
    """

    database: str
    backend: str
    mode: Mode
    before: SpaceReport
    after: SpaceReport
    duration_s: float
    note: str | None = None

    @property
    def shrunk_bytes(self) -> int:
        return self.before.total_bytes - self.after.total_bytes

    @property
    def reusable_bytes(self) -> int | None:
        before, after = self.before.free_bytes, self.after.free_bytes
        return None if before is None or after is None else after - before

    def as_json(self) -> dict[str, object]:
        """The report with its derived figures, for ``--json`` and run summaries."""
        return {
            **self.model_dump(mode="json"),
            "total_bytes_before": self.before.total_bytes,
            "total_bytes_after": self.after.total_bytes,
            "free_bytes_before": self.before.free_bytes,
            "free_bytes_after": self.after.free_bytes,
            "shrunk_bytes": self.shrunk_bytes,
            "reusable_bytes": self.reusable_bytes,
        }
