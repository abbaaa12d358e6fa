"""Scratch services for tests, soaks and benchmarks: written once, used by all of them.

* :func:`scratch_database` — a PostgreSQL database of its own, created on an admin
  URL's server and dropped (``WITH (FORCE)``) afterwards; :func:`postgres_problem` says
  beforehand, in one message, why that server cannot be used and what to do about it.
* :class:`RedisServer` — a private ``redis-server`` on a port of its own, that a test
  may stop and start again (a Redis outage) and flush between tests.
* :class:`Worker` — a real ``celery -A eskit_tasks worker`` (prefork) in its own process
  group, so that it can be stopped, killed with ``-9`` or paused as a whole;
  :func:`worker_env` builds the environment it runs in.

Nothing here knows where a source checkout is: a caller whose workers import modules
of its own (``tests.fleet_deciders``, ``bench.deciders``) passes that directory as the
worker's ``root`` and ``cwd``, so the helpers work the same from an installed package.
Passwords stay in the URLs these helpers return and are masked in every message.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg
import redis
from psycopg import sql
from sqlalchemy.engine import make_url

from eskit_tasks.domain.redact import scrub

__all__ = [
    "ADMIN_URL_VARIABLE",
    "DEFAULT_ADMIN_URL",
    "START_POSTGRES",
    "free_port",
    "postgres_admin_url",
    "libpq_url",
    "postgres_problem",
    "scratch_database",
    "RedisServer",
    "CELERY",
    "QUIET_WORKER",
    "Worker",
    "worker_env",
]

#: The variable that points tests, soaks and benchmarks at a PostgreSQL server where
#: they may create databases (an admin URL, SQLAlchemy form).
ADMIN_URL_VARIABLE = "ESKIT_TEST_POSTGRES_URL"
#: The admin URL used when :data:`ADMIN_URL_VARIABLE` is not set: the local server.
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
#: How to start the local PostgreSQL of a Debian machine (quoted in the advice).
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
#: PostgreSQL truncates longer identifiers; a scratch database name must fit.
_MAX_IDENTIFIER = 63


def eventsourcing_postgres_env(url: str) -> dict[str, str]:
    """The environment of a pyeventsourcing application on the PostgreSQL database at
    SQLAlchemy ``url`` (``PERSISTENCE_MODULE`` and the ``POSTGRES_*`` settings)."""
    parsed = make_url(url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(parsed.database),
        "POSTGRES_HOST": str(parsed.host or "127.0.0.1"),
        "POSTGRES_PORT": str(parsed.port or 5432),
        "POSTGRES_USER": str(parsed.username or "postgres"),
        "POSTGRES_PASSWORD": str(parsed.password or ""),
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- PostgreSQL -----------------------------------------------------------------------


def postgres_admin_url() -> str:
    """The admin URL from ``ESKIT_TEST_POSTGRES_URL``, else :data:`DEFAULT_ADMIN_URL`."""
    return os.environ.get(ADMIN_URL_VARIABLE) or DEFAULT_ADMIN_URL


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://...``) as libpq and psycopg want it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _shown(url: str) -> str:
    """``url`` for a message: its password masked."""
    return make_url(url).render_as_string(hide_password=True)


def _said(exc: BaseException, url: str) -> str:
    """A driver error's text with the URL's password masked, should it appear in it."""
    return scrub(str(exc).strip(), [make_url(url).password])


def postgres_problem(admin_url: str, *, purpose: str = "the tests") -> str | None:
    """None if :func:`scratch_database` can work on ``admin_url``'s server, else a
    message saying which server (password masked), what is wrong and what to do.

    ``purpose`` names who needs the server in that message ("the tests", "the soak").
    """
    advice = (
        f"A real PostgreSQL is needed for {purpose}. Start the local one with\n"
        f"    {START_POSTGRES}\n"
        f"or point {ADMIN_URL_VARIABLE} at a server where you may create databases."
    )
    try:
        conn = psycopg.connect(libpq_url(admin_url), connect_timeout=5)
    except psycopg.Error as exc:
        return (
            f"PostgreSQL is not reachable at {_shown(admin_url)}: {_said(exc, admin_url)}\n{advice}"
        )
    with conn:
        row = conn.execute(
            "SELECT current_user, rolcreatedb OR rolsuper FROM pg_roles "
            "WHERE rolname = current_user"
        ).fetchone()
    if row is not None and not row[1]:
        return (
            f"PostgreSQL at {_shown(admin_url)} answers, but its role {row[0]!r} may not "
            f"create databases (it needs CREATEDB).\n{advice}"
        )
    return None


@contextmanager
def scratch_database(admin_url: str, prefix: str, *, connect_timeout: int = 5) -> Iterator[str]:
    """Create a database named ``<prefix>_<pid>_<random>`` on ``admin_url``'s server,
    yield its SQLAlchemy URL (password kept, driver ``psycopg`` unless the admin URL
    names another) and drop it ``WITH (FORCE)`` afterwards, its connections with it.

    The database is empty: callers create the tables they need. A psycopg error while
    creating or dropping it carries a note naming the database and the server
    (password masked); call :func:`postgres_problem` first for advice on a server that
    is down.
    """
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    if len(name.encode()) > _MAX_IDENTIFIER:
        raise ValueError(f"scratch database name {name!r} is longer than {_MAX_IDENTIFIER} bytes")
    _admin_execute(admin_url, sql.SQL("CREATE DATABASE {}"), name, "creating", connect_timeout)
    url = make_url(admin_url).set(database=name)
    if url.drivername == "postgresql":  # SQLAlchemy's default driver would be psycopg2
        url = url.set(drivername="postgresql+psycopg")
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        _admin_execute(
            admin_url,
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)"),
            name,
            "dropping",
            connect_timeout,
        )


def _admin_execute(
    admin_url: str, statement: sql.SQL, name: str, doing: str, connect_timeout: int
) -> None:
    """Run a CREATE/DROP DATABASE of ``name`` on a fresh autocommit admin connection
    (one per statement: a long session may outlive an idle connection)."""
    try:
        with psycopg.connect(
            libpq_url(admin_url), autocommit=True, connect_timeout=connect_timeout
        ) as conn:
            conn.execute(statement.format(sql.Identifier(name)))
    except psycopg.Error as exc:
        exc.add_note(f"while {doing} the scratch database {name!r} on {_shown(admin_url)}")
        raise


# -- Redis ----------------------------------------------------------------------------


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1:``port`` without persistence, its files
    and log in ``workdir``; it may be stopped and started again (a Redis outage). With
    a ``password`` it refuses clients that do not give it. Also a context manager:
    started on entry, stopped on exit."""

    def __init__(self, port: int, workdir: Path, password: str | None = None) -> None:
        self.port = port
        self.workdir = workdir
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        """The server's own output (kept across restarts)."""
        return self.workdir / "redis-server.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def url(self, db: int = 0) -> str:
        """``redis://`` URL of database ``db`` (without the password)."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """A client of database ``db``, with the password if there is one."""
        return redis.Redis(
            port=self.port, db=db, password=self.password, socket_connect_timeout=0.5
        )

    def start(self, timeout: float = 10) -> Self:
        """Start the server and wait until it answers PING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            "redis-server",
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *(["--requirepass", self.password] if self.password else []),
            *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
        ]
        try:
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)  # noqa: S603
        except FileNotFoundError as exc:
            raise RuntimeError(
                f"redis-server is not installed (not on PATH), so a private Redis on port "
                f"{self.port} cannot be started. Install it (Debian: apt-get install "
                "redis-server)."
            ) from exc
        client = self.client()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        self.stop()
                        raise RuntimeError(
                            f"redis-server on port {self.port} did not answer within "
                            f"{timeout:g} s; the end of its log {self.log}:\n{self._tail()}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def _tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-2000:] or "(empty)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; nothing to do if it is not running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def flush(self) -> None:
        """Empty every database of the server."""
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- celery workers -------------------------------------------------------------------

#: The ``celery`` command of this interpreter's environment.
CELERY = str(Path(sys.executable).with_name("celery"))

#: Worker options for tests: no gossip, mingle or heartbeat traffic between workers.
QUIET_WORKER = ("--without-gossip", "--without-mingle", "--without-heartbeat")


class Worker:
    """A real ``celery -A eskit_tasks worker`` (prefork) in its own process group, its
    output in ``logdir/worker-<name>.log``; ``cwd`` is its working directory (default:
    this process's)."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        logdir: Path,
        concurrency: int = 2,
        options: tuple[str, ...] = QUIET_WORKER,
        loglevel: str = "INFO",
        *,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.env = env
        self.log = logdir / f"worker-{name}.log"
        self.concurrency = concurrency
        self.options = options
        self.loglevel = loglevel
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Self:
        """Start the worker and wait until it logs `` ready.``."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            CELERY,
            *("-A", "eskit_tasks", "worker", "--pool=prefork"),
            f"--concurrency={self.concurrency}",
            *("-n", f"{self.name}@%h"),
            *self.options,
            f"--loglevel={self.loglevel}",
        ]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(  # noqa: S603 -- our own argv, no shell
                argv,
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while " ready." not in self.text():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"celery worker {self.name} exited at start (exit status "
                    f"{self.proc.returncode}); the end of {self.log}:\n{self.text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"celery worker {self.name} was not ready in {timeout:g} s (stopped it); "
                    f"the end of {self.log}:\n{self.text()[-3000:]}"
                )
            time.sleep(0.1)
        return self

    def text(self) -> str:
        """The worker's log so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill9(self) -> None:
        """kill -9 the worker and its children at once (a machine or container dying)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM to the process group (a warm shutdown), SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def worker_env(root: Path | None = None, /, **overrides: str) -> dict[str, str]:
    """This process's environment with ``overrides``, for a worker or a CLI child.

    ``root``, if given, goes first on ``PYTHONPATH``: the directory the child must
    import modules from that are not installed (a checkout's ``tests`` or ``bench``).
    """
    env = dict(os.environ)
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.update(overrides)
    return env
