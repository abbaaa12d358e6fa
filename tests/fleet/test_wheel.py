"""A wheel install starts a worker with the packaged Celery defaults and no file of its own.

The wheel is built from this checkout and installed into a scratch directory; the worker
runs from another scratch directory with only that install and the dependencies on its
path — not this checkout, whose root ``celeryconfig.py`` would otherwise be found — and
with ESKIT_CELERY_CONFIG unset, as on a fresh server.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from eskit_tasks import SqlEventStore, SqlSnapshotStore, load_state
from eskit_tasks.demo import Account, AccountState, seed
from eskit_tasks.tasks import compact_stream

REPO = Path(__file__).resolve().parents[2]

#: Runs celery with the standard library, the dependencies of this environment and the
#: installed wheel only: ``-S`` skips site-packages, whose editable-install ``.pth``
#: would put this checkout on the path; the directory is added back without its .pth.
BOOT = """
import importlib.util, sys
wheel, deps = sys.argv[1], sys.argv[2]
sys.path[:0] = [wheel]
sys.path.append(deps)  # without processing its .pth files
import eskit_tasks
print("eskit_tasks from", eskit_tasks.__file__, flush=True)
print("celeryconfig importable:", importlib.util.find_spec("celeryconfig") is not None, flush=True)
sys.argv = ["celery", *sys.argv[3:]]
from celery.__main__ import main
main()
"""


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    [wheel] = out.glob("eskit_tasks-*.whl")
    target = out / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "-t", str(target), wheel],
        check=True,
        timeout=300,
        capture_output=True,
    )
    assert not (target / "celeryconfig.py").exists(), "the wheel must not ship a root module"
    return target


@pytest.fixture
def worker_from_wheel(
    wheel_install: Path, redis_servers, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path, Path]]:
    del redis_servers  # started for the broker URLs the environment names
    database = tmp_path / "events.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.pop("ESKIT_CELERY_CONFIG")  # a fresh server sets none
    env.update(
        ESKIT_DATABASE_URL=f"sqlite:///{database}",
        ESKIT_DECIDER_MODULES="eskit_tasks.demo",
        ESKIT_METRICS_PORT="",
    )
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    log = tmp_path / "worker.log"
    deps = sysconfig.get_paths()["purelib"]
    argv = [sys.executable, "-S", "-c", BOOT, str(wheel_install), deps]
    argv += ["-A", "eskit_tasks", "worker", "-P", "solo", "-n", "wheel@%h", "--without-gossip"]
    argv += ["--without-mingle", "-l", "INFO"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, cwd=run_dir, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield proc, database, log, wheel_install
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = log.read_text(errors="replace")
        if text in got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"the worker exited with {proc.returncode}:\n{got[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")


def test_a_worker_installed_from_the_wheel_starts_and_compacts(worker_from_wheel):
    proc, database, log, wheel = worker_from_wheel
    text = _wait_for(log, " ready.", proc, timeout=90)
    assert f"eskit_tasks from {wheel / 'eskit_tasks' / '__init__.py'}" in text
    assert "celeryconfig importable: False" in text
    assert "compaction" in text and "fanout" in text, text  # the packaged queues

    store = SqlEventStore.from_url(f"sqlite:///{database}")
    head = seed(store, "acct-wheel", 120, random.Random(5))
    result = compact_stream.delay("account", "acct-wheel", retain_last=10).get(timeout=60)

    assert result["outcome"] == "compacted", log.read_text()[-4000:]
    assert result["events_deleted"] == head - 10
    snapshots = SqlSnapshotStore(store.engine, create_tables=False)
    state, version = load_state(store, snapshots, Account(), AccountState, "account", "acct-wheel")
    assert version == head and isinstance(state, AccountState)
    store.engine.dispose()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()[-4000:]
