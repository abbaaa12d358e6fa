"""The soak's own world: a fresh PostgreSQL database, two redis-servers, celery workers.

Everything is private to one soak run (own ports, own database ``eskit_soak_<pid>_...``,
own trash bin and the pyeventsourcing application's SQLite files in the work
directory), and the environment variables the Celery app and the workers read are set
here (``ESKIT_ARCHIVE_URL`` and the application's ``ESKIT_SOAK_APP_ENV`` among them),
before anything imports ``eskit_tasks.fleet.app``. The services themselves are
:mod:`eskit_tasks.testing.services`, shared with the tests and the benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from eskit_tasks.testing.services import (
    RedisServer,
    Worker,
    free_port,
    libpq_url,
    scratch_database,
    worker_env,
)
from tests import REPO
from tests.soak.config import FLEET_ENV, SoakConfig
from tests.soak.esapp import ENV_VAR, app_env


class SoakSetupError(RuntimeError):
    """The soak cannot start (PostgreSQL unreachable, redis-server missing, ...)."""


def _with_notes(exc: BaseException) -> str:
    """An exception's text and its notes (which say which database and server)."""
    return "; ".join([str(exc).strip(), *getattr(exc, "__notes__", [])])


class SoakServices:
    """The processes of one soak run and the faults that can be done to them."""

    def __init__(self, config: SoakConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.logdir = workdir / "logs"
        #: The trash bin: every worker archives what it deletes here (ESKIT_ARCHIVE_URL).
        self.archive_dir = workdir / "archive"
        self.db_url = ""
        #: The pyeventsourcing application's environment (tests/soak/esapp.py): SQLite
        #: files in the work directory, passed to the workers as JSON in ENV_VAR.
        self.app_env = app_env(workdir)
        #: Drops the database on close (scratch_database's exit).
        self._database = contextlib.ExitStack()
        self.broker = RedisServer(free_port(), workdir / "redis-broker")
        self.state = RedisServer(free_port(), workdir / "redis-state")
        self.workers: list[Worker] = []
        #: Every worker incarnation ever started (their logs are checked at the end).
        self.all_workers: list[Worker] = []
        self._incarnation: dict[int, int] = {}
        self._paused: set[int] = set()
        self._lock = threading.RLock()
        #: Checker's own connection: excluded from pg_terminate_backend.
        self._checker: psycopg.Connection[Any] | None = None
        self._checker_lock = threading.Lock()

    # -- start and stop ---------------------------------------------------------------

    def start_backends(self) -> None:
        """Database, redis-servers and the environment; then the Celery app may be imported."""
        try:
            self.db_url = self._database.enter_context(
                scratch_database(self.config.admin_url, "eskit_soak")
            )
        except psycopg.Error as exc:
            raise SoakSetupError(f"cannot create the soak's database: {_with_notes(exc)}") from exc
        try:
            self.broker.start()
            self.state.start()
        except RuntimeError as exc:
            raise SoakSetupError(str(exc)) from exc
        os.environ.update(
            {
                **FLEET_ENV,
                "CELERY_BROKER_URL": self.broker.url(0),
                "CELERY_RESULT_BACKEND": self.broker.url(1),
                "ESKIT_REDIS_URL": self.state.url(0),
                "ESKIT_DATABASE_URL": self.db_url,
                "ESKIT_TEST_MARKERS": str(self.workdir / "markers"),
                "ESKIT_ARCHIVE_URL": str(self.archive_dir),
                ENV_VAR: json.dumps(self.app_env),
            }
        )
        for name in [n for n in os.environ if n.startswith(("ESKIT_NIGHTLY", "ESKIT_METRICS"))]:
            del os.environ[name]
        (self.workdir / "markers").mkdir(parents=True, exist_ok=True)

    def start_workers(self) -> None:
        """Start the workers at once (each takes seconds to boot)."""
        self.workers = [self._new_worker(i) for i in range(self.config.workers)]
        errors: list[BaseException] = []

        def boot(worker: Worker) -> None:
            try:
                worker.start(timeout=120)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=boot, args=(w,)) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise SoakSetupError(f"a worker did not start: {errors[0]}")

    def _new_worker(self, index: int) -> Worker:
        n = self._incarnation.get(index, 0)
        self._incarnation[index] = n + 1
        name = f"w{index + 1}" if n == 0 else f"w{index + 1}-r{n}"
        worker = Worker(
            name,
            worker_env(REPO),
            self.logdir,
            concurrency=self.config.worker_concurrency,
            cwd=REPO,
        )
        self.all_workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        self.resume_all()
        threads = [threading.Thread(target=w.stop) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def close(self) -> None:
        """Stop everything this run started; drop its database (best effort, idempotent)."""
        self.resume_all()
        for worker in self.all_workers:
            with contextlib.suppress(Exception):  # one failure must not stop the rest
                worker.stop()
        if self._checker is not None:
            self._checker.close()
            self._checker = None
        self.broker.stop()
        self.state.stop()
        if self.db_url:
            try:
                self._database.close()
            except psycopg.Error as exc:  # do not hide why the run ended
                print(f"soak: could not drop its database: {_with_notes(exc)}", file=sys.stderr)
            self.db_url = ""

    # -- the checker's connection -------------------------------------------------------

    @contextmanager
    def checker_connection(self) -> Iterator[psycopg.Connection[Any]]:
        """The checker's own connection (reconnected if it broke); one user at a time."""
        with self._checker_lock:
            if self._checker is None or self._checker.closed or self._checker.broken:
                self._checker = psycopg.connect(
                    libpq_url(self.db_url), autocommit=True, connect_timeout=10
                )
            yield self._checker

    # -- faults -------------------------------------------------------------------------

    def kill9(self, index: int) -> str:
        with self._lock:
            worker = self.workers[index]
            pid = worker.proc.pid if worker.proc is not None else None
            self._paused.discard(index)
            worker.kill9()
        return f"{worker.name} (pid {pid})"

    def restart(self, index: int) -> str:
        """Start a new incarnation of worker ``index`` (its old one must be dead)."""
        worker = self._new_worker(index)
        worker.start(timeout=120)
        with self._lock:
            self.workers[index] = worker
        return worker.name

    def pause(self, index: int) -> str:
        """SIGSTOP the whole worker (main process and pool children): a frozen machine."""
        with self._lock:
            worker = self.workers[index]
            assert worker.proc is not None
            os.killpg(worker.proc.pid, signal.SIGSTOP)
            self._paused.add(index)
        return f"{worker.name} (pid {worker.proc.pid})"

    def resume(self, index: int) -> None:
        with self._lock:
            worker = self.workers[index]
            if index in self._paused and worker.proc is not None and worker.proc.poll() is None:
                os.killpg(worker.proc.pid, signal.SIGCONT)
            self._paused.discard(index)

    def resume_all(self) -> None:
        with self._lock:
            for index in list(self._paused):
                self.resume(index)

    def terminate_backends(self) -> int:
        """pg_terminate_backend every connection to the soak database except the checker's."""
        with self.checker_connection() as conn:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        return 0 if row is None else int(row[0])

    def dead_workers(self) -> list[int]:
        return [
            i for i, w in enumerate(self.workers) if w.proc is None or w.proc.poll() is not None
        ]

    def ensure_all_up(self) -> list[str]:
        """After the faults: resume paused workers, restart dead ones, start Redis if down."""
        notes = []
        self.resume_all()
        if not self.state.running:
            self.state.start()
            notes.append("the Redis for locks was down at the end of the faults; started it")
        for index in self.dead_workers():
            notes.append(f"worker {self.workers[index].name} had died; restarted it")
            self.restart(index)
        return notes

    def worker_logs(self) -> list[tuple[str, str]]:
        return [(w.name, w.text()) for w in self.all_workers]


def wait_for(check: Any, timeout: float, poll: float = 0.2) -> bool:
    """Poll ``check()`` until it is true or ``timeout`` passes; return its last verdict."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
