"""Real services for the fleet tests: redis-server processes and celery workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import redis

REPO = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on a fixed port that tests may stop and restart; with a
    ``password``, it refuses clients that do not give it."""

    def __init__(self, port: int, workdir: Path, password: str | None = None) -> None:
        self.port = port
        self.workdir = workdir
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    *(["--requirepass", self.password] if self.password else []),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        except FileNotFoundError as exc:
            raise RuntimeError(
                "redis-server is not installed: the fleet tests start their own Redis. "
                "Install it (Debian: apt-get install redis-server)."
            ) from exc
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise RuntimeError(
                            f"redis-server on port {self.port} did not start"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def flush(self) -> None:
        redis.Redis(port=self.port).flushall()


#: Worker options of the tests: no gossip, mingle or heartbeat traffic between workers.
QUIET_WORKER = ("--without-gossip", "--without-mingle", "--without-heartbeat")


class Worker:
    """A real `celery -A eskit_tasks worker` (prefork) in its own process group."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        logdir: Path,
        concurrency: int = 2,
        options: tuple[str, ...] = QUIET_WORKER,
        loglevel: str = "INFO",
    ):
        self.name = name
        self.env = env
        self.log = logdir / f"worker-{name}.log"
        self.concurrency = concurrency
        self.options = options
        self.loglevel = loglevel
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Self:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    CELERY,
                    "-A",
                    "eskit_tasks",
                    "worker",
                    "--pool=prefork",
                    f"--concurrency={self.concurrency}",
                    "-n",
                    f"{self.name}@%h",
                    *self.options,
                    f"--loglevel={self.loglevel}",
                ],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while " ready." not in self.text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited at start:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready:\n{self.text()[-3000:]}")
            time.sleep(0.1)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill9(self) -> None:
        """kill -9 the worker and its children at once (a machine or container dying)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def worker_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(overrides)
    return env
