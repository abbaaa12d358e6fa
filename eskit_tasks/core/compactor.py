"""The Compactor: plan, replay, snapshot, verify, delete — for one stream at a time.

Pure orchestration over the two ports; no Celery, no Redis. The order of the steps
is the safety argument:

1. plan     head H and compaction point P from the store; cut C from the policy.
2. fence    take a new fencing token (not in dry-run): older compactions are now stale.
3. replay   newest verified snapshot (at P) + events P+1..C, streamed and contiguous;
            encode the state at C and prove the encoding round-trips; go on to H.
4. store    write the snapshot at C, unverified (readers ignore it), under the token.
5. verify   read it back, check its hash, decode it, and replay C+1..H on it: it must
            equal the full replay at H.
6. archive  (optional) write the events to delete to the trash bin, durably.
7. delete   one transaction that re-checks the token, the snapshot, the consumers'
            checkpoints and the row count.

The cut never passes the lowest checkpoint of the consumers reading the stream type
(planned in step 1, checked again in step 7).

Any failure before step 6 commits leaves every event in place.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from eskit_tasks.core.loading import codec_for, fold_measured, open_snapshot
from eskit_tasks.core.settlement import NotCommittedError, committed_fields, settle
from eskit_tasks.domain.codec import StateCodec, state_hash
from eskit_tasks.domain.compare import first_difference
from eskit_tasks.domain.decider import Decider
from eskit_tasks.domain.events import label_of
from eskit_tasks.domain.policy import CompactionPolicy, plan_cut
from eskit_tasks.domain.result import CompactionResult, HeldBack, Outcome
from eskit_tasks.domain.schema import Upcaster
from eskit_tasks.errors import (
    ConfigurationError,
    DeletionMismatchError,
    EskitError,
    FencedError,
    HeldBackError,
    InvalidPolicyError,
    SnapshotCodecError,
    SnapshotSchemaError,
    StreamIntegrityError,
    VersionGapError,
)
from eskit_tasks.ports import (
    Archive,
    ArchiveRef,
    CompactionRecord,
    DeletionPlan,
    EventStore,
    Snapshot,
    SnapshotStore,
    StreamInfo,
)

S = TypeVar("S")
log = logging.getLogger("eskit_tasks")


#: Longest compaction id the audit log holds.
MAX_COMPACTION_ID = 36


class _VerificationFailed(Exception):
    """The snapshot does not rebuild the replayed state; carries what differed."""


class _Committed(Exception):
    """The audit log already holds this compaction: it committed in an earlier attempt."""

    def __init__(self, record: CompactionRecord) -> None:
        super().__init__(record.compaction_id)
        self.record = record


@dataclass
class _Plan:
    head: int
    compacted_through: int
    cut: int
    token: int | None


# Outcomes after which the snapshot written by this compaction must stay.
_KEEPS_SNAPSHOT = (Outcome.COMPACTED,)


@dataclass
class _RunState:
    """What one compaction has done so far, for cleaning up after a failure."""

    token: int | None = None
    snapshot_saved: bool = False
    run_id: str | None = None


@dataclass(frozen=True)
class Preview:
    """Where a stream stands and the cut a compaction would make now (see
    :meth:`Compactor.preview`)."""

    head_version: int
    compacted_through: int
    through_version: int
    held_back_by: HeldBack | None


class Compactor(Generic[S]):
    """Compacts streams of one type under one policy.

    ``compact`` never raises for a problem with the stream or the database: it returns
    a :class:`CompactionResult` whose ``outcome`` says what happened, and deletes
    nothing unless the outcome is ``compacted``.

    Args:
        store: The event store.
        snapshot_store: The snapshot store in the same database.
        decider: Folds the stream's events into a state.
        state_type: Any type pydantic can serialise; snapshots are JSON through it.
        policy: Retention rules; the default deletes everything up to the head.
        clock: Returns "now" (timezone-aware) for the age rule. By default the store's
            clock — on PostgreSQL the database's, the one that stamped the events.
        guard: Called before the snapshot is written and before the delete; raising
            (e.g. :class:`~eskit_tasks.errors.FencedError` when a lock was lost) stops the
            compaction there. The database's fencing stays the last word.
        state_version: The state schema's version, recorded in every snapshot (default:
            ``decider.state_version``, else none).
        upcasters: Upgrades of snapshots of older schemas (default:
            ``decider.upcasters``); see :class:`~eskit_tasks.domain.codec.StateCodec`.
        archive: The trash bin (:class:`~eskit_tasks.ports.Archive`, e.g.
            :class:`~eskit_tasks.stores.archive.LocalArchive`): the events to delete are
            written there durably before the delete commits, so that
            :func:`~eskit_tasks.restore` can put them back. None: no copy is kept.

    Raises:
        InvalidPolicyError: ``policy`` is not a CompactionPolicy.
        SnapshotCodecError: pydantic cannot handle ``state_type``.
        ConfigurationError: ``state_version`` or ``upcasters`` are malformed.
    """

    def __init__(
        self,
        *,
        store: EventStore,
        snapshot_store: SnapshotStore,
        decider: Decider[S],
        state_type: type[S] | Any,
        policy: CompactionPolicy | None = None,
        clock: Callable[[], datetime] | None = None,
        guard: Callable[[], None] | None = None,
        state_version: int | None = None,
        upcasters: Mapping[int | str, Upcaster] | None = None,
        archive: Archive | None = None,
    ) -> None:
        if policy is None:
            policy = CompactionPolicy()
        if not isinstance(policy, CompactionPolicy):
            raise InvalidPolicyError(f"policy must be a CompactionPolicy, got {policy!r}")
        self.store = store
        self.snapshot_store = snapshot_store
        self.decider = decider
        self.codec: StateCodec[S] = codec_for(decider, state_type, state_version, upcasters)
        self.policy = policy
        self._clock = clock
        self._guard = guard
        self.archive = archive

    def compact(
        self,
        stream_type: str,
        stream_id: str,
        *,
        compaction_id: str | None = None,
        run_id: str | None = None,
    ) -> CompactionResult:
        """Compact one stream under the policy; see the module docstring for the steps.

        Args:
            stream_type: The stream's type.
            stream_id: The stream's id.
            compaction_id: The id of this compaction in the audit log (at most 36
                characters; a fresh uuid4 by default). Give the same id to a retry of a
                compaction whose outcome is unknown (the process died, the database was
                cut off): if the earlier attempt committed, the retry reports that
                deletion (``recovered``) instead of compacting again.
            run_id: The run this compaction belongs to, recorded in the audit log.

        Raises:
            ConfigurationError: ``compaction_id`` is not a string of 1 to 36 characters.
        """
        started = time.perf_counter()
        _check_compaction_id(compaction_id)
        fields: dict[str, Any] = {
            "stream_type": stream_type,
            "stream_id": stream_id,
            "compaction_id": compaction_id or str(uuid.uuid4()),
        }
        run = _RunState(run_id=run_id)
        try:
            plan = self._plan(stream_type, stream_id, fields, settle=compaction_id is not None)
            if plan is not None:
                run.token = plan.token
                self._run(stream_type, stream_id, plan, fields, run)
        except _Committed as done:
            fields.update(committed_fields(done.record))
        except HeldBackError as exc:  # a consumer registered or moved back meanwhile
            fields.update(
                outcome=Outcome.NOTHING_TO_COMPACT,
                held_back_by=HeldBack(consumer=exc.consumer, position=exc.position),
                events_deleted=0,
                bytes_reclaimed=0,
                archive_uri=None,
            )
        except FencedError as exc:
            self._failed(fields, Outcome.FENCED, exc)
        except _VerificationFailed as exc:
            self._failed(fields, Outcome.VERIFICATION_FAILED, exc)
        except StreamIntegrityError as exc:
            lost = self._lost_fence(stream_type, stream_id, run.token)
            self._failed(fields, Outcome.FENCED if lost else Outcome.FAILED, exc)
        except Exception as exc:  # a bug in a decider or codec must not kill a fleet worker
            self._failed(fields, Outcome.FAILED, exc)
        if run.snapshot_saved and fields["outcome"] not in _KEEPS_SNAPSHOT:
            self._discard(stream_type, stream_id, fields, run.token)
        if fields["outcome"] == Outcome.NOTHING_TO_COMPACT:
            fields.update(snapshot_version=None, state_hash=None)
            fields["events_retained"] = fields["head_version"] - fields["compacted_through_before"]
        fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return CompactionResult(**fields)

    @staticmethod
    def _failed(fields: dict[str, Any], outcome: Outcome, exc: BaseException) -> None:
        message = str(exc)
        if not isinstance(exc, EskitError | _VerificationFailed):
            message = f"{fields['stream_type']}/{fields['stream_id']}: {type(exc).__name__}: {exc}"
        fields.update(
            outcome=outcome,
            error=message,
            error_type=type(exc).__name__ if not isinstance(exc, _VerificationFailed) else None,
            events_deleted=0,
            bytes_reclaimed=0,
        )

    # -- steps -------------------------------------------------------------------------

    def _plan(
        self, stream_type: str, stream_id: str, fields: dict[str, Any], *, settle: bool
    ) -> _Plan | None:
        info = self.store.stream_info(stream_type, stream_id)
        if settle:  # a given id may have committed in an earlier attempt: report that one
            self._check_committed(stream_type, stream_id, fields["compaction_id"])
        cut, held = (None, None) if info is None else self._cut(stream_type, stream_id, info)
        if info is None or cut is None:
            fields.update(
                outcome=Outcome.NOTHING_TO_COMPACT,
                head_version=0 if info is None else info.head_version,
                compacted_through_before=0 if info is None else info.compacted_through,
                held_back_by=held,
            )
            return None
        token = None
        if not self.policy.dry_run:
            fenced = self.store.acquire_fence(stream_type, stream_id)
            if fenced is None:
                raise FencedError(f"{label_of(stream_type, stream_id)}: the stream disappeared")
            if settle and fenced.compacted_through != info.compacted_through:
                # A delete committed between our first look and the fence (or was
                # committing, and the fence waited for it): it may be an earlier attempt
                # of this very compaction.
                self._check_committed(stream_type, stream_id, fields["compaction_id"])
            moved = (fenced.head_version, fenced.compacted_through) != (
                info.head_version,
                info.compacted_through,
            )
            info, token = fenced, fenced.fence_token
            if moved:  # an append or a delete came between: plan the cut again
                cut, held = self._cut(stream_type, stream_id, info)
        # Otherwise the first cut stands: the consumers' checkpoints it was lowered to
        # are read again, and enforced, inside the delete transaction.
        fields.update(
            head_version=info.head_version,
            compacted_through_before=info.compacted_through,
            held_back_by=held,
        )
        if cut is None:
            fields.update(outcome=Outcome.NOTHING_TO_COMPACT)
            return None
        return _Plan(info.head_version, info.compacted_through, cut, token)

    def preview(self, stream_type: str, stream_id: str) -> Preview | None:
        """The cut a compaction under the policy would make now (the consumers' hold
        included), read-only and without replaying anything; None when there is nothing
        to compact. What ``eskit-tasks plan`` stores without ``--verify``."""
        info = self.store.stream_info(stream_type, stream_id)
        if info is None:
            return None
        cut, held = self._cut(stream_type, stream_id, info)
        if cut is None:
            return None
        return Preview(info.head_version, info.compacted_through, cut, held)

    def _check_committed(self, stream_type: str, stream_id: str, compaction_id: str) -> None:
        record = self.store.find_compaction(compaction_id)
        if record is None:
            return
        if (record.stream_type, record.stream_id) != (stream_type, stream_id):
            raise ConfigurationError(
                f"{label_of(stream_type, stream_id)}: compaction id {compaction_id!r} is "
                f"already used by a compaction of {label_of(record.stream_type, record.stream_id)}"
                "; give each compaction its own id"
            )
        raise _Committed(record)

    def _cut(
        self, stream_type: str, stream_id: str, info: StreamInfo
    ) -> tuple[int | None, HeldBack | None]:
        """The cut the policy allows, lowered to what the consumers reading the stream
        have read (None: nothing to delete), and the consumer that lowered it."""
        wanted = self._policy_cut(stream_type, stream_id, info)
        if wanted is None:
            return None, None
        cut, held = self.store.deletable_through(stream_type, stream_id, wanted)
        return (cut if cut > info.compacted_through else None), held

    def _policy_cut(self, stream_type: str, stream_id: str, info: StreamInfo) -> int | None:
        newest_old_enough = None
        if self.policy.retain_younger_than is not None:
            now = self._clock() if self._clock is not None else self.store.now()
            cutoff = now - self.policy.retain_younger_than
            young = self.store.oldest_version_after(stream_type, stream_id, cutoff)
            newest_old_enough = info.head_version if young is None else young - 1
        return plan_cut(
            head=info.head_version,
            compacted_through=info.compacted_through,
            retain_last=self.policy.retain_last,
            newest_old_enough=newest_old_enough,
            through_version=self.policy.through_version,
        )

    def _run(
        self,
        stream_type: str,
        stream_id: str,
        plan: _Plan,
        fields: dict[str, Any],
        run: _RunState,
    ) -> None:
        label = label_of(stream_type, stream_id)
        c, head, p = plan.cut, plan.head, plan.compacted_through
        fields.update(snapshot_version=c, events_retained=head - c)

        # Replay: base (verified snapshot at P) + P+1..C, then the state at C must
        # survive its own encoding, then on to H.
        state = self._base_state(stream_type, stream_id, p)
        state, doomed_bytes = self._fold(stream_type, stream_id, state, p, c)
        encoded = self._verifying(self.codec.encode, state)
        digest = state_hash(encoded)
        fields.update(state_hash=digest)
        at_cut = self._verifying(self.codec.decode, encoded)
        difference = first_difference(state, at_cut)
        if difference is not None:
            raise _VerificationFailed(
                f"{label}: the state at version {c} does not survive a round trip through "
                f"{self.codec.type_name}: {difference}. Nothing deleted; see "
                "docs/snapshots.md, 'Supported states', to make it round-trip"
            )
        full, _ = self._fold(stream_type, stream_id, state, c, head)

        if plan.token is None:  # dry run: verify in memory, write nothing
            self._verify_tail(stream_type, stream_id, at_cut, full, c, head)
            fields.update(
                outcome=Outcome.DRY_RUN, events_deleted=c - p, bytes_reclaimed=doomed_bytes
            )
            return

        self._checkpoint()
        run.snapshot_saved = True
        self.snapshot_store.save(
            stream_type,
            stream_id,
            Snapshot(
                c,
                encoded,
                digest,
                False,
                datetime.now(UTC),
                self.codec.marker.fingerprint,
                self.codec.marker.version,
            ),
            fence_token=plan.token,
        )
        try:
            decoded = self._read_back(stream_type, stream_id, c, digest, at_cut)
            self._verify_tail(stream_type, stream_id, decoded, full, c, head)
        except _VerificationFailed as exc:
            # A worker paused after its write may find its snapshot gone: a newer
            # compaction took the stream over and removed it. That is fencing, not a
            # snapshot that does not verify.
            if self._lost_fence(stream_type, stream_id, plan.token):
                raise FencedError(
                    f"{exc}: a newer compaction took the stream over meanwhile (fencing "
                    f"token {plan.token} is stale); nothing deleted"
                ) from exc
            raise

        self._checkpoint()
        archived = None
        if self.archive is not None:
            archived = self.archive.write(
                compaction_id=fields["compaction_id"],
                fence_token=plan.token,
                stream_type=stream_type,
                stream_id=stream_id,
                events=self.store.export(stream_type, stream_id, p + 1, c),
            )
            try:
                self._checkpoint()
            except BaseException:  # the lock lost or the time budget spent: no delete
                self._discard_entry(archived)
                raise
        deletion = DeletionPlan(
            stream_type=stream_type,
            stream_id=stream_id,
            fence_token=plan.token,
            compacted_through_before=p,
            through_version=c,
            head_version=head,
            expected_deleted=c - p,
            state_hash=digest,
            bytes_reclaimed=doomed_bytes,
            compaction_id=fields["compaction_id"],
            archive=archived,
            run_id=run.run_id,
        )
        try:
            deleted = self.store.commit_compaction(deletion)
        except (FencedError, DeletionMismatchError, HeldBackError):
            if archived is not None:  # refused before anything changed: no deletion to keep
                self._discard_entry(archived)
            raise
        except Exception as exc:  # the delete's outcome is unknown: the audit log knows
            raise _Committed(self._settle(deletion, exc, run)) from exc
        fields.update(
            outcome=Outcome.COMPACTED,
            events_deleted=deleted,
            bytes_reclaimed=doomed_bytes,
            archive_uri=None if archived is None else archived.uri,
        )

    def _discard_entry(self, archived: ArchiveRef) -> None:
        """Remove the archive entry of a delete that was refused (its events are still in
        the store); one that cannot be removed is left for ``purge`` to clear. Nothing
        here may replace the refusal being reported."""
        assert self.archive is not None
        try:
            self.archive.discard(archived)
        except Exception as exc:
            log.warning(
                "archive entry %s of a refused delete is left behind: %s", archived.uri, exc
            )

    def _settle(self, deletion: DeletionPlan, error: Exception, run: _RunState) -> CompactionRecord:
        """After the delete raised: the audit row if it committed after all; otherwise
        ``error`` again, with the new fencing token taken to settle it now this run's."""
        try:
            return settle(self.store, deletion, error)
        except NotCommittedError as not_committed:
            run.token = not_committed.fence_token
        raise error

    def _read_back(self, stream_type: str, stream_id: str, c: int, digest: str, at_cut: S) -> S:
        """Read the snapshot just written, check its bytes and decode it: it must be
        the state at the cut."""
        label = label_of(stream_type, stream_id)
        stored = self.snapshot_store.read(stream_type, stream_id, c)
        if stored is None or stored.state_hash != digest or state_hash(stored.state) != digest:
            raise _VerificationFailed(
                f"{label}: the snapshot read back at version {c} is "
                f"{'missing' if stored is None else 'not the bytes written'}"
            )
        # Decoded exactly as every reader will (strictly, under the marker it was written
        # with), so a snapshot that readers would refuse is never verified.
        try:
            decoded: S = self.codec.decode_snapshot(
                stored.state, stored.marker, stream_type=stream_type, stream_id=stream_id, version=c
            )
        except SnapshotSchemaError as exc:
            raise _VerificationFailed(
                f"{label}: the snapshot read back at version {c} would not load: {exc}"
            ) from exc
        difference = first_difference(at_cut, decoded)
        if difference is not None:
            raise _VerificationFailed(
                f"{label}: the snapshot read back at version {c} decodes to a different "
                f"state: {difference}"
            )
        return decoded

    def _checkpoint(self) -> None:
        if self._guard is not None:
            self._guard()

    @staticmethod
    def _verifying(step: Callable[[Any], Any], value: Any) -> Any:
        """Run an encode/decode step of the snapshot; a codec error fails verification."""
        try:
            return step(value)
        except SnapshotCodecError as exc:
            raise _VerificationFailed(str(exc)) from exc

    def _base_state(self, stream_type: str, stream_id: str, compacted_through: int) -> S:
        snap = self.snapshot_store.latest(stream_type, stream_id)
        found = 0 if snap is None else snap.version
        if found != compacted_through:
            raise VersionGapError(
                f"{label_of(stream_type, stream_id)}: compacted through {compacted_through} "
                f"but the newest verified snapshot is at {found or 'none'}; refusing to replay",
                stream_type=stream_type,
                stream_id=stream_id,
                version=compacted_through,
            )
        if snap is None:
            return self.decider.initial_state()
        return open_snapshot(self.codec, snap, stream_type, stream_id)

    def _fold(
        self, stream_type: str, stream_id: str, state: S, after: int, through: int
    ) -> tuple[S, int]:
        """Fold versions after+1..through into ``state``; return it and their stored bytes."""
        if through == after:
            return state, 0
        events = self.store.read(stream_type, stream_id, from_version=after + 1, to_version=through)
        state, last, stored = fold_measured(
            self.decider, state, events, after=after, stream_type=stream_type, stream_id=stream_id
        )
        if last != through:
            raise VersionGapError(
                f"{label_of(stream_type, stream_id)}: expected events up to version "
                f"{through}, the stream ends at {last}",
                stream_type=stream_type,
                stream_id=stream_id,
                version=last + 1,
            )
        return state, stored

    def _verify_tail(
        self, stream_type: str, stream_id: str, snapshot_state: S, full: S, c: int, head: int
    ) -> None:
        rebuilt, _ = self._fold(stream_type, stream_id, snapshot_state, c, head)
        difference = first_difference(full, rebuilt)
        if difference is not None:
            raise _VerificationFailed(
                f"{label_of(stream_type, stream_id)}: snapshot at {c} + events {c + 1}..{head} "
                f"is not the full replay at {head}: {difference}"
            )

    # -- failure handling --------------------------------------------------------------

    def _lost_fence(self, stream_type: str, stream_id: str, token: int | None) -> bool:
        """After a replay error: was it caused by a newer compaction deleting under us?"""
        if token is None:
            return False
        try:
            info = self.store.stream_info(stream_type, stream_id)
        except EskitError:
            return False
        return info is not None and info.fence_token != token

    def _discard(
        self, stream_type: str, stream_id: str, fields: dict[str, Any], token: int | None
    ) -> None:
        if token is None or fields.get("snapshot_version") is None:
            return
        # Best effort: unverified snapshots are invisible to readers and replaced next time.
        with contextlib.suppress(Exception):
            self.snapshot_store.discard(
                stream_type, stream_id, fields["snapshot_version"], fence_token=token
            )


def _check_compaction_id(compaction_id: object) -> None:
    if compaction_id is None:
        return
    if not isinstance(compaction_id, str) or not 0 < len(compaction_id) <= MAX_COMPACTION_ID:
        raise ConfigurationError(
            f"compaction_id must be a string of 1 to {MAX_COMPACTION_ID} characters, "
            f"got {compaction_id!r}"
        )
