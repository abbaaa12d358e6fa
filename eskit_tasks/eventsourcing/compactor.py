"""Compacting a pyeventsourcing application's aggregates in place: :class:`ApplicationCompactor`.

For one aggregate, at head H with compaction point P (0: never compacted):

1. **plan** (reading only) count the live events P+1..H on the server (contiguous, or
   a gap is reported): C is the policy's cut, at most H - max(retain_last, 1) (the
   head event is never deleted), lowered to the newest event every follower has
   processed (``held_back_by`` names the one that limited it; a follower that
   processed nothing holds everything); nothing to do writes nothing;
2. **fence** take a new fencing token for the stream ``(app.name, str(id))`` in the
   eskit side tables of the application's database (not in a dry run); the plan
   stands unless the compaction point moved meanwhile (then it is made again);
3. **replay** through the library: the snapshot at P (or nothing) and events P+1..H,
   each read once and decoded once by the application's mapper (transcodings,
   compression, cipher: the application's own), its age rule applied on the way (C
   lowered to the version before the first event too young); at C the snapshot is
   taken the library's way (``Aggregate.Snapshot.take``), encoded by the mapper,
   decoded back and compared with the replayed aggregate by eskit's strict comparison
   (types, dict order, time zones: a tuple that comes back a list fails); replaying
   C+1..H on the decoded snapshot must then give exactly the full replay at H;
4. **commit** one transaction: the stream's row locked and its token checked, the
   snapshot at C written (older snapshots of the aggregate removed) and read back
   byte for byte, events P+1..C deleted (exactly C - P rows, else rolled back), the
   compaction point moved (what the guard reads) and the audit row written;
5. **vacuum** (PostgreSQL) the events table once enough rows were deleted: the library
   creates it with autovacuum effectively off.

The guard (:mod:`.guard`) is installed before the first delete.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from eskit_tasks.domain.compare import first_difference
from eskit_tasks.domain.policy import CompactionPolicy, plan_cut
from eskit_tasks.domain.result import CompactionResult, HeldBack, Outcome
from eskit_tasks.domain.space import ReclaimReport
from eskit_tasks.errors import (
    ConfigurationError,
    DeletionMismatchError,
    EventDecodeError,
    EvolveError,
    FencedError,
    HeldBackError,
    StreamIntegrityError,
    VersionGapError,
)
from eskit_tasks.eventsourcing import bookkeeping, guard
from eskit_tasks.eventsourcing.state import state_of, unkept
from eskit_tasks.eventsourcing.target import Target, target_of
from eskit_tasks.ports import Candidate
from eskit_tasks.stores import migrate
from eskit_tasks.stores.engine import reading, writing
from eskit_tasks.stores.reclaim import reclaim
from eskit_tasks.stores.schema import compaction_log, stream_row, streams

log = logging.getLogger("eskit_tasks")

#: Rows deleted (by one compactor) between two VACUUMs of a PostgreSQL events table.
VACUUM_AFTER = 50_000
#: Events read per query while replaying.
_PAGE = 1_000
_MAX_COMPACTION_ID = 36
#: A page of candidates examines at most its size x this many aggregates.
_SCAN_FACTOR = 20


class _VerificationFailed(Exception):
    """The snapshot would not give back the replayed aggregate."""


@dataclass(frozen=True)
class _Plan:
    """What the compaction of one aggregate will do."""

    stream_id: str
    stored_id: Any
    compacted_through: int
    head: int
    cut: int
    token: int | None  # None: a dry run
    held_back_by: HeldBack | None
    cut_notification: int = 0  # the notification id of the event at the cut (the replay's)
    #: Events recorded after this are too young to delete (None: no age rule); the
    #: replay lowers ``cut`` to the version before the first such event.
    age_cutoff: datetime | None = None


class ApplicationCompactor:
    """Compacts the aggregates of a pyeventsourcing application in its own database.

    Args:
        app: An ``eventsourcing.application.Application`` on PostgreSQL or SQLite, with
            snapshotting enabled.
        policy: What to keep; ``retain_last`` below 1 counts as 1 (the head event is
            never deleted). ``retain_younger_than`` ages events by their timestamps.
        followers: The applications that follow this one (``ProcessApplication`` and
            the like): events a follower has not processed are never deleted.
        vacuum_after: Rows deleted between two ``VACUUM`` of the events table on
            PostgreSQL (0: never on its own; call :meth:`vacuum`).
        guard: Called before each write (the fencing token, the delete); raising there
            stops the compaction before it (the fleet checks its lock with it).

    Raises:
        ConfigurationError: ``app`` cannot be compacted (see
            :func:`~eskit_tasks.eventsourcing.target.target_of`), or a follower has no
            tracking recorder. Nothing is written.
    """

    def __init__(
        self,
        app: Any,
        *,
        policy: CompactionPolicy | None = None,
        followers: Iterable[Any] = (),
        vacuum_after: int = VACUUM_AFTER,
        guard: Callable[[], None] | None = None,
    ) -> None:
        self.target: Target = target_of(app)
        self.policy = policy if policy is not None else CompactionPolicy()
        if not isinstance(self.policy, CompactionPolicy):
            raise ConfigurationError(f"policy must be a CompactionPolicy, got {policy!r}")
        self.followers = tuple(followers)
        for follower in self.followers:
            if not callable(getattr(getattr(follower, "recorder", None), "max_tracking_id", None)):
                raise ConfigurationError(
                    f"follower {follower!r} of application {self.target.name} has no tracking "
                    "recorder (recorder.max_tracking_id): give the ProcessApplication instances "
                    "that follow it"
                )
        self.vacuum_after = vacuum_after
        self._guard = guard
        self._ready = [False]  # side tables and guard checked (shared by copies)
        self._since_vacuum = [0]  # rows deleted since the last VACUUM (shared by copies)

    @property
    def app(self) -> Any:
        """The application."""
        return self.target.app

    @property
    def stream_type(self) -> str:
        """The stream type of the application's aggregates: its name."""
        return str(self.target.name)

    def close(self) -> None:
        """Release eskit-tasks' connections to the application's database."""
        self.target.engine.dispose()

    def with_policy(
        self, policy: CompactionPolicy, *, guard: Callable[[], None] | None = None
    ) -> ApplicationCompactor:
        """A compactor sharing this one's application, connections and VACUUM count,
        under another policy and guard (the fleet makes one per task)."""
        if not isinstance(policy, CompactionPolicy):
            raise ConfigurationError(f"policy must be a CompactionPolicy, got {policy!r}")
        other = copy.copy(self)
        other.policy, other._guard = policy, guard
        return other

    # -- compaction ---------------------------------------------------------------------

    def compact(
        self, aggregate_id: Any, *, compaction_id: str | None = None, run_id: str | None = None
    ) -> CompactionResult:
        """Compact one aggregate under the policy (see the module docstring); ``run_id``
        (the run it belongs to) is recorded in the audit log.

        Returns a result for every outcome; a bad aggregate (a gap, an event that cannot
        be decoded or applied, a lossy snapshot) deletes nothing.

        Raises:
            ConfigurationError: ``aggregate_id`` is not an id of this application, or
                ``compaction_id`` is not a string of 1 to 36 characters.
        """
        started = time.perf_counter()
        stream_id = self.target.stream_id(aggregate_id)
        if compaction_id is not None and (
            not isinstance(compaction_id, str) or not 0 < len(compaction_id) <= _MAX_COMPACTION_ID
        ):
            raise ConfigurationError(
                f"compaction_id must be a string of 1 to {_MAX_COMPACTION_ID} characters, "
                f"got {compaction_id!r}"
            )
        fields: dict[str, Any] = {
            "stream_type": self.stream_type,
            "stream_id": stream_id,
            "compaction_id": compaction_id or str(uuid.uuid4()),
        }
        token: list[int] = []  # the fencing token taken, once taken
        try:
            self._compact(
                aggregate_id, fields, token, settle=compaction_id is not None, run_id=run_id
            )
        except FencedError as exc:
            self._failed(fields, Outcome.FENCED, exc)
        except HeldBackError as exc:  # a follower went back while this compaction ran
            fields.update(
                outcome=Outcome.NOTHING_TO_COMPACT,
                held_back_by=HeldBack(consumer=exc.consumer, position=exc.position),
                events_deleted=0,
                bytes_reclaimed=0,
                snapshot_version=None,
                state_hash=None,
            )
        except _VerificationFailed as exc:
            self._failed(fields, Outcome.VERIFICATION_FAILED, exc)
        except StreamIntegrityError as exc:  # or a newer compaction deleted under the replay
            lost = bool(token) and bookkeeping.token_of(self.target, stream_id) != token[0]
            self._failed(fields, Outcome.FENCED if lost else Outcome.FAILED, exc)
        except Exception as exc:  # a bug in an aggregate must not kill a fleet worker
            self._failed(fields, Outcome.FAILED, exc)
        fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if fields["outcome"] == Outcome.COMPACTED and not fields.get("recovered"):
            self._since_vacuum[0] += fields["events_deleted"]
            if self.vacuum_after and self._since_vacuum[0] >= self.vacuum_after:
                self._vacuum_quietly()
        return CompactionResult(**fields)

    def _check_guard(self) -> None:
        if self._guard is not None:
            self._guard()

    def _vacuum_quietly(self) -> None:
        """VACUUM after a compaction that committed: its failure is logged, never
        reported as the compaction's (the deletion stands)."""
        try:
            self.vacuum()
        except Exception as exc:
            log.warning(
                "VACUUM of %s failed (run compactor.vacuum() later): %s", self.target.events, exc
            )

    def _failed(self, fields: dict[str, Any], outcome: Outcome, exc: BaseException) -> None:
        failed = CompactionResult.failed(
            fields["stream_type"],
            fields["stream_id"],
            exc,
            compaction_id=fields["compaction_id"],
            outcome=outcome,
        )
        fields.update(outcome=outcome, error=failed.error, error_type=failed.error_type)
        fields.update(events_deleted=0, bytes_reclaimed=0)

    def _compact(
        self,
        aggregate_id: Any,
        fields: dict[str, Any],
        token: list[int],
        *,
        settle: bool,
        run_id: str | None,
    ) -> None:
        dry_run = self.policy.dry_run
        if settle and not dry_run:
            done = bookkeeping.logged(self.target, fields["compaction_id"], fields["stream_id"])
            if done is not None:  # a retry of a compaction that committed: report it
                fields.update(done, outcome=Outcome.COMPACTED, recovered=True)
                return
        # Read only, first: a typo'd id or a stream with nothing to do changes nothing.
        plan = self._plan(
            aggregate_id, fields["stream_id"], bookkeeping.point(self.target, fields["stream_id"])
        )
        if not dry_run and plan.cut > plan.compacted_through:
            self._check_guard()
            self._prepare()
            point, taken = bookkeeping.fence(self.target, fields["stream_id"])
            token.append(taken)
            if point == plan.compacted_through:
                # Nothing but a compaction (which moves the point) deletes events, and
                # none can commit now without this token: the events the plan read are
                # still there. Followers may only have moved on (the cut stays on the
                # safe side; a reset is caught in the delete transaction).
                plan = dataclasses.replace(plan, token=taken)
            else:
                plan = self._plan(aggregate_id, fields["stream_id"], point, taken)
        snapshot = digest = None
        if plan.cut > plan.compacted_through:
            plan, snapshot, digest = self._replay_and_verify(plan)
        fields.update(
            head_version=plan.head,
            compacted_through_before=plan.compacted_through,
            held_back_by=plan.held_back_by,
            events_retained=plan.head - plan.compacted_through,
        )
        if snapshot is None or digest is None:  # or the age rule found nothing old enough
            fields.update(outcome=Outcome.NOTHING_TO_COMPACT)
            return
        fields.update(
            snapshot_version=plan.cut,
            state_hash=digest,
            events_retained=plan.head - plan.cut,
        )
        if plan.token is None:
            doomed = self._doomed_bytes(plan)
            fields.update(
                outcome=Outcome.DRY_RUN,
                events_deleted=plan.cut - plan.compacted_through,
                bytes_reclaimed=doomed,
            )
            return
        self._check_guard()
        deleted, reclaimed = self._commit(plan, snapshot, digest, fields["compaction_id"], run_id)
        fields.update(outcome=Outcome.COMPACTED, events_deleted=deleted, bytes_reclaimed=reclaimed)

    # -- plan ---------------------------------------------------------------------------

    def _plan(
        self, aggregate_id: Any, stream_id: str, compacted_through: int, token: int | None = None
    ) -> _Plan:
        """The cut, from the aggregate's live events after ``compacted_through`` (a plan
        without ``token`` writes nothing: a dry run, or the look before fencing). With an
        age rule the cut is an upper bound the replay lowers (it decodes the events)."""
        target = self.target
        stored_id = target.stored_id(aggregate_id)
        label = f"{target.name}/{stream_id}"
        after = {"id": stored_id, "after": compacted_through}
        with self._reading("read the aggregate's events") as conn:
            live, head = conn.execute(
                sa.text(
                    f"SELECT count(*), max(originator_version) FROM {target.events} "
                    "WHERE originator_id = :id AND originator_version > :after"
                ),
                after,
            ).one()
        if not live:
            raise StreamIntegrityError(
                f"{label}: there is no such aggregate"
                if compacted_through == 0
                else f"{label}: its head event is missing (compacted through "
                f"{compacted_through}, no event after it); nothing was deleted",
                stream_type=target.name,
                stream_id=stream_id,
                version=compacted_through,
            )
        head = int(head)
        if head - compacted_through != live:  # versions are unique: then one is missing
            raise self._gap(stored_id, label, compacted_through)
        cutoff = self.policy.age_cutoff(datetime.now(UTC))
        cut = plan_cut(
            head=head,
            compacted_through=compacted_through,
            retain_last=max(self.policy.retain_last, 1),
            # The replay finds the first event too young; nothing to do (and nothing to
            # write) if it is the first one.
            newest_old_enough=None
            if cutoff is None
            else self._newest_old_enough(stored_id, compacted_through, head, cutoff),
            through_version=self.policy.through_version,
        )
        cut = cut or 0
        held: HeldBack | None = None
        reader = self._slowest_follower()
        if reader is not None and cut > compacted_through:
            with self._reading("read the aggregate's events") as conn:
                unread = conn.execute(
                    sa.text(
                        f"SELECT min(originator_version) FROM {target.events} "
                        "WHERE originator_id = :id AND originator_version > :after "
                        f"AND originator_version <= :cut AND {target.notification_id} > :seen"
                    ),
                    {**after, "cut": cut, "seen": reader.position},
                ).scalar_one()
            if unread is not None:
                cut, held = int(unread) - 1, reader
        return _Plan(
            stream_id, stored_id, compacted_through, head, cut, token, held, age_cutoff=cutoff
        )

    def _gap(self, stored_id: Any, label: str, after: int) -> Exception:
        """The error for a stream whose live versions after ``after`` are not contiguous:
        the first missing version."""
        target = self.target
        expected = after + 1
        with self._reading("read the aggregate's events") as conn:
            for (version,) in conn.execute(
                sa.text(
                    f"SELECT originator_version FROM {target.events} "
                    "WHERE originator_id = :id AND originator_version > :after "
                    "ORDER BY originator_version"
                ),
                {"id": stored_id, "after": after},
            ):
                if version != expected:
                    break
                expected += 1
            else:
                return StreamIntegrityError(
                    f"{label}: the events changed while they were read; nothing was deleted",
                    stream_type=target.name,
                    stream_id=label.partition("/")[2],
                    version=after,
                )
        return VersionGapError(
            f"{label}: version {expected} is missing (found {version} after "
            f"{expected - 1}); nothing was deleted",
            stream_type=target.name,
            stream_id=label.partition("/")[2],
            version=expected,
        )

    def _newest_old_enough(
        self, stored_id: Any, after: int, head: int, cutoff: datetime
    ) -> int | None:
        """``after`` if the first live event is younger than ``cutoff`` (nothing to do),
        else ``head``: the replay finds the first one that is (it decodes them all)."""
        with closing(self._events(stored_id, after, after + 1)) as events:
            for _, event in events:
                return after if self._young(event, cutoff) else head
        return head

    def _young(self, event: Any, cutoff: datetime) -> bool:
        """Whether ``event`` was recorded after ``cutoff`` (too young to delete)."""
        moment = getattr(event, "timestamp", None)
        if not isinstance(moment, datetime):
            raise ConfigurationError(
                f"{self.stream_type}: event {type(event).__name__} has no timestamp to "
                "age it by; compact this application without retain_younger_than"
            )
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment > cutoff

    def _slowest_follower(self) -> HeldBack | None:
        """The follower that has processed the fewest of this application's events."""
        slowest: HeldBack | None = None
        for follower in self.followers:
            position = follower.recorder.max_tracking_id(self.stream_type)
            name = str(getattr(follower, "name", type(follower).__name__))
            held = HeldBack(consumer=name, position=int(position or 0))
            if slowest is None or held.position < slowest.position:
                slowest = held
        return slowest

    # -- replay -------------------------------------------------------------------------

    def _events(
        self, stored_id: Any, after: int, through: int
    ) -> Generator[tuple[int, Any], None, None]:
        """The aggregate's events after ``after`` through ``through``, each with its
        notification id, decoded by the application's mapper, a page at a time."""
        from eventsourcing.persistence import StoredEvent

        target = self.target
        to_domain_event = target.app.mapper.to_domain_event
        originator_id = target.from_stored(stored_id)
        label = f"{target.name}/{originator_id}"
        with self._reading("read the aggregate's events") as conn:
            for rows in self._pages(conn, stored_id, after, through):
                for version, notification_id, topic, state in rows:
                    stored = StoredEvent(
                        originator_id=originator_id,
                        originator_version=version,
                        topic=topic,
                        state=bytes(state),
                    )
                    try:
                        event = to_domain_event(stored)
                    except Exception as exc:
                        raise EventDecodeError(
                            f"{label}: event {version} ({topic}) cannot be decoded by the "
                            f"application's mapper ({type(exc).__name__}: {exc}); check its "
                            "transcodings, compressor and cipher key; nothing was deleted",
                            stream_type=target.name,
                            stream_id=str(originator_id),
                            version=version,
                        ) from exc
                    yield notification_id, event

    def _pages(
        self, conn: Connection, stored_id: Any, after: int, through: int
    ) -> Generator[list[tuple[Any, ...]], None, None]:
        """Pages of (version, notification id, topic, state) rows, in version order, on
        the driver's own cursor (SQLAlchemy's row processing cost a fifth of a replay).

        PostgreSQL: one statement on a server-side cursor. The library's tables have no
        statistics (autovacuum is off), so a page per statement is planned as a sort of
        every event after the page's start: 50,000 events cost 50 such sorts.
        SQLite: a page per statement, by the primary key; no read stays open meanwhile.
        """
        target = self.target
        driver: Any = conn.connection.driver_connection
        columns = f"originator_version, {target.notification_id}, topic, state"
        if target.dialect == "postgresql":
            with driver.cursor(name=f"eskit_replay_{uuid.uuid4().hex}") as cursor:
                cursor.execute(
                    f"SELECT {columns} FROM {target.events} WHERE originator_id = %s "
                    "AND originator_version > %s AND originator_version <= %s "
                    "ORDER BY originator_version",
                    (stored_id, after, through),
                )
                while rows := cursor.fetchmany(_PAGE):
                    yield rows
            return
        query = (
            f"SELECT {columns} FROM {target.events} WHERE originator_id = ? "
            "AND originator_version > ? AND originator_version <= ? "
            f"ORDER BY originator_version LIMIT {_PAGE}"
        )
        while after < through:
            cursor = driver.execute(query, (stored_id, after, through))
            try:
                rows = cursor.fetchall()
            finally:
                cursor.close()
            if not rows:
                return
            yield rows
            after = rows[-1][0]

    def _replay_and_verify(self, plan: _Plan) -> tuple[_Plan, Any, str | None]:
        """Replay to the head, take and check the snapshot at the cut; return the plan
        (its cut lowered by the age rule, its notification id at the cut), the
        snapshot's stored form and the sha256 of its bytes (None, None: the age rule
        left nothing to compact). Each event is decoded once."""
        target = self.target
        label = f"{target.name}/{plan.stream_id}"
        aggregate = self._snapshot_at(plan) if plan.compacted_through else None
        snapshot = digest = rebuilt = None
        cut, held, cutoff = plan.cut, plan.held_back_by, plan.age_cutoff
        previous = version = 0  # the notification id and version of the event before
        events = self._events(plan.stored_id, plan.compacted_through, plan.head)
        with closing(events):  # its connection goes back to the pool, whatever happens
            for notification_id, event in events:
                if not callable(getattr(event, "mutate", None)):
                    raise ConfigurationError(
                        f"{label}: its events ({type(event).__name__}) are not aggregate events; "
                        "event-sourced logs are not compacted"
                    )
                version = event.originator_version
                if cutoff is not None and version <= cut + 1 and self._young(event, cutoff):
                    # The first event too young: the cut is the version before it, and the
                    # follower no longer the one that limits it (as the plan of
                    # min(retain_last, age, follower) would say).
                    cutoff, held = None, None
                    if version <= cut:
                        cut = version - 1
                        if cut <= plan.compacted_through:
                            return dataclasses.replace(plan, cut=cut, held_back_by=None), None, None
                        snapshot, rebuilt = self._take(label, aggregate, cut)
                        digest = hashlib.sha256(snapshot.state).hexdigest()
                        plan = dataclasses.replace(plan, cut=cut, cut_notification=previous)
                aggregate = self._apply(label, event, aggregate)
                if rebuilt is not None:
                    rebuilt = self._apply(label, event, rebuilt)
                if version == cut and snapshot is None:
                    snapshot, rebuilt = self._take(label, aggregate, cut)
                    digest = hashlib.sha256(snapshot.state).hexdigest()
                    plan = dataclasses.replace(plan, cut_notification=notification_id)
                previous = notification_id
        if snapshot is None or digest is None or rebuilt is None or version != plan.head:
            raise StreamIntegrityError(
                f"{label}: the events changed while they were read",
                stream_type=target.name,
                stream_id=plan.stream_id,
                version=plan.cut,
            )
        difference = first_difference(state_of(aggregate), state_of(rebuilt))
        if difference is not None:
            raise _VerificationFailed(
                f"{label}: versions {plan.cut + 1}..{plan.head} replayed on the snapshot at "
                f"{plan.cut} do not give the aggregate a full replay gives: {difference}; "
                "nothing was deleted"
            )
        return dataclasses.replace(plan, held_back_by=held), snapshot, digest

    def _take(self, label: str, aggregate: Any, version: int) -> tuple[Any, Any]:
        """The library's snapshot of ``aggregate``, encoded by the application's mapper,
        and the aggregate that snapshot decodes to, checked to be indistinguishable."""
        mapper = self.target.app.mapper
        snapshot_class = (
            getattr(type(aggregate), "Snapshot", None) or self.target.app.snapshot_class
        )
        if snapshot_class is None or not callable(getattr(snapshot_class, "take", None)):
            raise ConfigurationError(
                f"{label}: {type(aggregate).__name__} cannot be snapshotted (no Snapshot "
                "class); only aggregates are compacted"
            )
        lost = unkept(aggregate)
        if lost is not None:
            raise _VerificationFailed(
                f"{label}: the snapshot at version {version} could not give back the "
                f"aggregate: {lost}; nothing was deleted"
            )
        try:
            stored = mapper.to_stored_event(snapshot_class.take(aggregate))
            rebuilt = mapper.to_domain_event(stored).mutate(None)
        except Exception as exc:
            raise _VerificationFailed(
                f"{label}: the snapshot at version {version} cannot be encoded and decoded by "
                f"the application's mapper ({type(exc).__name__}: {exc}); nothing was deleted"
            ) from exc
        difference = first_difference(state_of(aggregate), state_of(rebuilt))
        if difference is not None:
            raise _VerificationFailed(
                f"{label}: the snapshot at version {version} would not give back the "
                f"aggregate the events give: {difference} (the application's transcoder "
                "does not keep this state exactly: register a transcoding, or keep the "
                "state in types JSON keeps); nothing was deleted"
            )
        return stored, rebuilt

    def _apply(self, label: str, event: Any, aggregate: Any) -> Any:
        try:
            return event.mutate(aggregate)
        except Exception as exc:
            raise EvolveError(
                f"{label}: event {event.originator_version} ({type(event).__name__}) cannot "
                f"be applied ({type(exc).__name__}: {exc}); nothing was deleted",
                stream_type=self.stream_type,
                stream_id=label.partition("/")[2],
                version=int(event.originator_version),
            ) from exc

    def _snapshot_at(self, plan: _Plan) -> Any:
        """The aggregate from the snapshot of the previous compaction (at P)."""
        from eventsourcing.persistence import StoredEvent

        target = self.target
        label = f"{target.name}/{plan.stream_id}"
        with self._reading("read the aggregate's snapshot") as conn:
            row = conn.execute(
                sa.text(
                    f"SELECT topic, state FROM {target.snapshots} "
                    "WHERE originator_id = :id AND originator_version = :version"
                ),
                {"id": plan.stored_id, "version": plan.compacted_through},
            ).first()
        if row is None:
            raise StreamIntegrityError(
                f"{label}: the snapshot at its compaction point {plan.compacted_through} is "
                "missing (its events before it are gone); nothing was deleted",
                stream_type=target.name,
                stream_id=plan.stream_id,
                version=plan.compacted_through,
            )
        stored = StoredEvent(
            originator_id=target.from_stored(plan.stored_id),
            originator_version=plan.compacted_through,
            topic=row[0],
            state=bytes(row[1]),
        )
        try:
            return target.app.mapper.to_domain_event(stored).mutate(None)
        except Exception as exc:
            raise EventDecodeError(
                f"{label}: the snapshot at {plan.compacted_through} cannot be decoded "
                f"({type(exc).__name__}: {exc}); nothing was deleted",
                stream_type=target.name,
                stream_id=plan.stream_id,
                version=plan.compacted_through,
            ) from exc

    # -- commit -------------------------------------------------------------------------

    def _commit(
        self, plan: _Plan, snapshot: Any, digest: str, compaction_id: str, run_id: str | None
    ) -> tuple[int, int]:
        target = self.target
        label = f"{target.name}/{plan.stream_id}"
        id_ = {"id": plan.stored_id}
        with self._writing(f"compact {label}") as conn:
            if not guard.installed_in(conn, target):
                self._ready[0] = False  # installed again before the next compaction
                raise FencedError(
                    f"{label}: the stale-writer guard was removed from {target.events} "
                    "meanwhile; nothing was deleted (the next compaction installs it again)"
                )
            pk, info = stream_row(conn, target.name, plan.stream_id, lock=True)
            if pk is None or info is None or info.fence_token != plan.token:
                raise FencedError(
                    f"{label}: a newer compaction took the aggregate over (fencing token "
                    f"{plan.token} is stale); nothing was deleted"
                )
            if info.compacted_through != plan.compacted_through:
                raise FencedError(
                    f"{label}: its compaction point moved from {plan.compacted_through} to "
                    f"{info.compacted_through}; nothing was deleted"
                )
            # The followers again (a follower reset meanwhile reads from the start): the
            # gate holds in the delete transaction, as eskit's own consumers' does.
            reader = self._slowest_follower()
            if reader is not None and reader.position < plan.cut_notification:
                raise HeldBackError(
                    f"{label}: follower {reader.consumer} is at notification "
                    f"{reader.position}, below version {plan.cut}'s "
                    f"{plan.cut_notification}; nothing was deleted",
                    consumer=reader.consumer,
                    position=reader.position,
                )
            conn.execute(
                sa.text(
                    f"DELETE FROM {target.snapshots} WHERE originator_id = :id "
                    "AND originator_version <= :cut"
                ),
                {**id_, "cut": plan.cut},
            )
            conn.execute(
                sa.text(
                    f"INSERT INTO {target.snapshots} (originator_id, originator_version, "
                    "topic, state) VALUES (:id, :version, :topic, :state)"
                ),
                {**id_, "version": plan.cut, "topic": snapshot.topic, "state": snapshot.state},
            )
            back = conn.execute(
                sa.text(
                    f"SELECT state FROM {target.snapshots} WHERE originator_id = :id "
                    "AND originator_version = :version"
                ),
                {**id_, "version": plan.cut},
            ).scalar_one_or_none()
            if back is None or hashlib.sha256(bytes(back)).hexdigest() != digest:
                raise DeletionMismatchError(
                    f"{label}: the snapshot read back at {plan.cut} is not the one written; "
                    "nothing was deleted"
                )
            deleted, reclaimed = self._delete_events(conn, plan)
            expected = plan.cut - plan.compacted_through
            if deleted != expected:
                raise DeletionMismatchError(
                    f"{label}: deleting versions {plan.compacted_through + 1}..{plan.cut} "
                    f"would delete {deleted} events, not {expected}; nothing was deleted"
                )
            conn.execute(
                sa.update(streams)
                .where(streams.c.pk == pk)
                # head_version: the compaction point too. The library keeps the head;
                # an eskit store sharing the database never sees live events here.
                .values(compacted_through=plan.cut, head_version=plan.cut)
            )
            conn.execute(
                compaction_log.insert().values(
                    compaction_id=compaction_id,
                    stream_pk=pk,
                    stream_type=target.name,
                    stream_id=plan.stream_id,
                    from_version=plan.compacted_through + 1,
                    through_version=plan.cut,
                    snapshot_version=plan.cut,
                    head_version=plan.head,
                    state_hash=digest,
                    events_deleted=deleted,
                    bytes_reclaimed=reclaimed,
                    fence_token=plan.token,
                    compacted_at=datetime.now(UTC),
                    run_id=run_id,
                )
            )
        return deleted, reclaimed

    def _delete_events(self, conn: Connection, plan: _Plan) -> tuple[int, int]:
        """Delete events P+1..C; return how many rows went and their stored bytes."""
        target = self.target
        params = {"id": plan.stored_id, "after": plan.compacted_through, "cut": plan.cut}
        delete = (
            f"DELETE FROM {target.events} WHERE originator_id = :id "
            "AND originator_version > :after AND originator_version <= :cut"
        )
        if target.dialect == "postgresql":  # counted and summed there: one row comes back
            deleted, reclaimed = conn.execute(
                sa.text(
                    f"WITH gone AS ({delete} RETURNING octet_length(state) AS size) "
                    "SELECT count(*), coalesce(sum(size), 0) FROM gone"
                ),
                params,
            ).one()
            return int(deleted), int(reclaimed)
        sizes = conn.execute(sa.text(f"{delete} RETURNING length(state)"), params).all()
        return len(sizes), sum(int(size or 0) for (size,) in sizes)

    def _doomed_bytes(self, plan: _Plan) -> int:
        target = self.target
        size = "octet_length(state)" if target.dialect == "postgresql" else "length(state)"
        with self._reading("measure the aggregate's events") as conn:
            total = conn.execute(
                sa.text(
                    f"SELECT coalesce(sum({size}), 0) FROM {target.events} "
                    "WHERE originator_id = :id AND originator_version > :after "
                    "AND originator_version <= :cut"
                ),
                {"id": plan.stored_id, "after": plan.compacted_through, "cut": plan.cut},
            ).scalar_one()
        return int(total)

    # -- side tables, fencing, the audit log ----------------------------------------------

    def _prepare(self) -> None:
        """The eskit side tables at this code's revision, and the guard, before the first
        write (once per compactor)."""
        if self._ready[0] and guard.installed(self.target):
            return
        found = migrate.status(self.target.engine)
        if found.state == "empty":
            migrate.upgrade(self.target.engine)
        else:
            migrate.require_current(self.target.engine)
        if not guard.installed(self.target):
            guard.install(self.target)
        self._ready[0] = True

    # -- candidates, maintenance --------------------------------------------------------

    def candidates(self, *, min_events: int = 1, page_size: int = 500) -> Iterator[Candidate]:
        """The aggregates with at least ``min_events`` live events, in id order, a page of
        ``page_size`` at a time (keyset-paged, each page examining at most 20 x
        ``page_size`` aggregates: memory and query time stay flat however many there are).

        Raises:
            ConfigurationError: ``min_events`` or ``page_size`` below 1.
        """
        _check_count("min_events", min_events)
        _check_count("page_size", page_size)
        after: Any = None
        count = 0
        while True:
            rows, until = self._page(after, page_size, min_events, page_size * _SCAN_FACTOR)
            for stored, live in rows:
                count += 1
                yield self._candidate(stored, live, count)
            if len(rows) == page_size:
                after = rows[-1][0]
            elif until is not None:
                after = until
            else:
                return

    def candidate_page(
        self, *, after: int, limit: int, min_live_events: int
    ) -> tuple[list[Candidate], int | None]:
        """One page for the fleet's fan-out: at most ``limit`` aggregates with at least
        ``min_live_events`` events whose key (``UUID.int + 1``) is above ``after``, and the
        key the next page starts after (None: the last page).

        Raises:
            ConfigurationError: the application's ids are text (the fleet pages by UUID).
        """
        target = self.target
        if not target.uuid_ids:
            raise ConfigurationError(
                f"application {target.name} keeps text aggregate ids "
                "(ORIGINATOR_ID_TYPE=text): fleet runs page aggregates by UUID; compact it "
                "with ApplicationCompactor.candidates() and compact() instead"
            )
        lower = None if after <= 0 else target.stored_id(uuid.UUID(int=after - 1))
        rows, until = self._page(lower, limit, min_live_events, max(limit, 1) * _SCAN_FACTOR)
        page = [self._candidate(stored, live, 0) for stored, live in rows]
        if rows and len(rows) == limit:
            return page, page[-1].key
        return page, None if until is None else self._candidate(until, 0, 0).key

    def _page(
        self, after: Any, limit: int, min_events: int, scan: int
    ) -> tuple[list[tuple[Any, int]], Any]:
        """The aggregates with ``min_events`` events among the next ``scan`` ids after the
        stored id ``after`` (None: from the start), at most ``limit``; and the last id
        examined (None: none is left after this page)."""
        target = self.target
        above = "" if after is None else "WHERE originator_id > :after "
        params: dict[str, Any] = {"scan": scan - 1, "limit": limit, "min": min_events}
        if after is not None:
            params["after"] = after
        with self._reading("list the application's aggregates") as conn:
            until = conn.execute(
                sa.text(
                    f"SELECT originator_id FROM {target.events} {above}"
                    "GROUP BY originator_id ORDER BY originator_id LIMIT 1 OFFSET :scan"
                ),
                params,
            ).scalar_one_or_none()
            within = above + ("" if until is None else ("AND " if above else "WHERE "))
            if until is not None:
                within += "originator_id <= :until "
                params["until"] = until
            rows = conn.execute(
                sa.text(
                    f"SELECT originator_id, count(*) FROM {target.events} {within}"
                    "GROUP BY originator_id HAVING count(*) >= :min "
                    "ORDER BY originator_id LIMIT :limit"
                ),
                params,
            ).all()
        return [(stored, int(live)) for stored, live in rows], until

    def _candidate(self, stored: Any, live: int, count: int) -> Candidate:
        aggregate_id = self.target.from_stored(stored)
        key = aggregate_id.int + 1 if isinstance(aggregate_id, uuid.UUID) else count
        return Candidate(
            key=key, stream_type=self.stream_type, stream_id=str(aggregate_id), live_events=live
        )

    def vacuum(self) -> bool:
        """``VACUUM`` the events table on PostgreSQL, where the library turned autovacuum
        off; True if it ran. Never on SQLite: a VACUUM there may renumber the rowids the
        application uses as notification ids."""
        return self.reclaim() is not None

    def reclaim(self, *, full: bool = False) -> ReclaimReport | None:
        """``VACUUM (ANALYZE)`` the events and snapshots tables on PostgreSQL (``full``:
        ``VACUUM FULL``, under an exclusive lock), measuring their size before and after;
        None on SQLite, where it is never done (a VACUUM there may renumber the rowids
        the application uses as notification ids; freed pages are reused anyway)."""
        self._since_vacuum[0] = 0
        target = self.target
        if target.dialect != "postgresql":
            return None
        return reclaim(target.engine, [target.events, target.snapshots], full=full)

    def remove_guard(self) -> None:
        """Drop the stale-writer guard from the application's events table (see
        :mod:`eskit_tasks.eventsourcing.guard`). Do it only once nothing compacts this
        application any more: a stale writer is no longer refused."""
        guard.remove(self.target)
        self._ready[0] = False

    # -- transactions -------------------------------------------------------------------

    def _reading(self, action: str) -> AbstractContextManager[Connection]:
        return reading(self.target.engine, action)

    def _writing(self, action: str) -> AbstractContextManager[Connection]:
        return writing(self.target.engine, action)


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, got {value!r}")
