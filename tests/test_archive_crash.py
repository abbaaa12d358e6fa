"""kill -9 between the archive write and the delete: nothing is lost, and the orphaned
archive entry is never counted as a deletion (the audit log, written in the delete
transaction, is what counts). A retry under the same compaction id takes a new fencing
token, writes its own entry beside the orphan and compacts once; restore then puts
exactly those events back; purge clears the orphan by age like any entry."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from eskit_tasks import (
    CompactionPolicy,
    Compactor,
    LocalArchive,
    Outcome,
    RestoreError,
    SqlEventStore,
    SqlSnapshotStore,
    load_state,
    restore,
)
from eskit_tasks.testing.deciders import Ledger, deposits, ledger_fold
from eskit_tasks.testing.services import scratch_database

# The child compacts with an archive and kills itself at the guard's third call: after
# the archive entry is durable, before the delete transaction begins.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from eskit_tasks import CompactionPolicy, Compactor, LocalArchive, SqlEventStore
    from eskit_tasks import SqlSnapshotStore
    from eskit_tasks.testing.deciders import Ledger

    url, trash = sys.argv[1], sys.argv[2]
    store = SqlEventStore.from_url(url)
    calls = []

    def guard():
        calls.append(1)
        if len(calls) == 3:
            assert list(LocalArchive(trash).entries()), "the entry is not there yet"
            os.kill(os.getpid(), signal.SIGKILL)

    Compactor(
        store=store, snapshot_store=SqlSnapshotStore(store.engine), decider=Ledger(),
        state_type=dict, policy=CompactionPolicy(retain_last=5), guard=guard,
        archive=LocalArchive(trash),
    ).compact("account", "a-1", compaction_id="crash-1")
    sys.exit("the compaction ended without being killed")
    """
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'events.db'}"
        return
    with scratch_database(request.getfixturevalue("postgres_url"), "eskit_crash") as made:
        yield made


@pytest.mark.slow
def test_kill_9_between_archive_and_delete_loses_nothing_and_counts_nothing(
    url: str, tmp_path: Path
):
    trash = tmp_path / "trash"
    store = SqlEventStore.from_url(url)
    snaps = SqlSnapshotStore(store.engine)
    amounts = list(range(1, 51))
    store.append("account", "a-1", deposits(*amounts), expected_version=0)
    before = [(e.version, e.position, e.recorded_at) for e in store.read("account", "a-1")]

    child = subprocess.run(
        [sys.executable, "-c", CHILD, url, str(trash)], capture_output=True, timeout=120
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()

    archive = LocalArchive(trash)
    [orphan] = archive.entries()
    assert (orphan.compaction_id, orphan.ref.events) == ("crash-1", 45)
    assert [(e.version, e.position, e.recorded_at) for e in store.read("account", "a-1")] == before
    assert store.compaction_log() == []  # nothing counted as deleted
    info = store.stream_info("account", "a-1")
    assert info is not None and info.compacted_through == 0
    with pytest.raises(RestoreError, match="nothing to restore"):
        restore(store, "account", "a-1", archive=archive)

    retry = Compactor(
        store=store,
        snapshot_store=snaps,
        decider=Ledger(),
        state_type=dict,
        policy=CompactionPolicy(retain_last=5),
        archive=archive,
    ).compact("account", "a-1", compaction_id="crash-1")
    assert (retry.outcome, retry.events_deleted, retry.recovered) == (Outcome.COMPACTED, 45, False)
    [row] = store.compaction_log()
    assert row.archive is not None
    entries = {e.fence_token: e for e in archive.entries()}
    assert set(entries) == {orphan.fence_token, orphan.fence_token + 1}
    assert entries[orphan.fence_token + 1].ref == row.archive  # the orphan is not counted

    done = restore(store, "account", "a-1", archive=archive)
    assert done.events_restored == 45
    assert [(e.version, e.position, e.recorded_at) for e in store.read("account", "a-1")] == before
    assert load_state(store, snaps, Ledger(), dict, "account", "a-1") == (ledger_fold(amounts), 50)
    store.engine.dispose()
