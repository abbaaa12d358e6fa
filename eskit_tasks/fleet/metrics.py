"""Prometheus metrics of a worker, opt-in with ``ESKIT_METRICS_PORT``.

With ``ESKIT_METRICS_PORT=9808`` every ``celery worker`` serves
``http://<host>:9808/metrics``; without it nothing is started, nothing listens and
recording a compaction costs one ``is None`` check (prometheus-client is not even
imported). Each worker exposes its own counts: point Prometheus at every worker and sum
across them (``sum by (outcome) (rate(eskit_compactions_total[5m]))``).

Metrics:

``eskit_compactions_total{outcome}`` (counter)
    Compaction attempts by how they ended: ``compacted``, ``dry_run``,
    ``nothing_to_compact``, ``verification_failed``, ``fenced``, ``failed``, ``locked``
    (every outcome is exported from the start, at 0). One per attempt: a task retried
    after a transient failure (database or Redis unreachable, lock lost) counts each
    attempt that ended, e.g. ``fenced`` and then ``nothing_to_compact``; a copy that
    finds the stream locked counts only when its retries are used up (``locked``).
    A task killed at its hard time limit counts as ``failed``.
``eskit_events_deleted_total`` (counter)
    Events deleted by ``compacted`` attempts. Dry runs delete nothing and add nothing.
``eskit_bytes_reclaimed_total`` (counter)
    Approximate stored size of those deleted events, in bytes.
``eskit_compaction_duration_seconds{outcome}`` (histogram)
    Time the compactor spent on one stream (replay, verify, snapshot, delete), in
    buckets from 1 ms to 1 h. Attempts that ended before compacting (``locked``, no
    decider registered, an invalid policy, Redis unreachable) are not observed.
``eskit_lock_waits_total`` (counter)
    Times a copy of a task found its stream's lock held — by another task, or by an
    earlier delivery of itself still running — so it did not compact (it retries later,
    or ends ``locked`` when its retries are used up). Many waits mean overlapping runs.

How it works: a worker is one main process and ``--concurrency`` prefork children that
run the tasks, so the counts live in prometheus-client's *multiprocess mode*. At worker
start (``worker_init``, in the main process, before it forks) this module points
``PROMETHEUS_MULTIPROC_DIR`` at ``ESKIT_METRICS_DIR`` (emptied first; by default a fresh
temporary directory, removed at shutdown), creates the metrics and starts the HTTP
server, whose ``MultiProcessCollector`` adds up the files every child writes there.
Two workers must not share one directory. A port already in use stops the worker at
start with an error naming ``ESKIT_METRICS_PORT``. The page holds counts only: no URL,
stream id or error text.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.fleet.constants import COMPACTION_DURATION_BUCKETS_S, METRICS_DIR_PREFIX

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import Counter, Histogram

    from eskit_tasks.fleet.settings import EskitSettings

log = logging.getLogger("eskit_tasks")


@dataclass(frozen=True)
class _Metrics:
    compactions: Counter
    events_deleted: Counter
    bytes_reclaimed: Counter
    duration: Histogram
    lock_waits: Counter


@dataclass
class _Server:
    url: str
    directory: Path
    owns_directory: bool
    httpd: WSGIServer
    thread: threading.Thread


# Set in the worker's main process before it forks; the children inherit both.
_metrics: _Metrics | None = None
_server: _Server | None = None


def enabled() -> bool:
    """True in a worker started with ESKIT_METRICS_PORT (main process and children)."""
    return _metrics is not None


def start_worker_metrics(settings: EskitSettings) -> int | None:
    """In the worker's main process, before it forks: prepare the multiprocess
    directory, create the metrics and serve them. Does nothing without
    ``settings.metrics_port``. Returns the port served.

    Raises:
        ConfigurationError: the directory is not usable or the port cannot be bound.
    """
    global _metrics, _server
    port = settings.metrics_port
    if port is None:
        return None
    if _server is not None:
        return port
    directory, owns = _prepare_directory(settings.metrics_dir)
    # prometheus-client reads this variable in every process that writes metrics; the
    # children inherit it. Its value class is chosen when prometheus_client is first
    # imported, so choose it again now that the variable is set.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    from prometheus_client import CollectorRegistry, start_http_server, values
    from prometheus_client.multiprocess import MultiProcessCollector

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    try:
        httpd, thread = start_http_server(port, settings.metrics_address, registry=registry)
    except OSError as exc:
        if owns:
            shutil.rmtree(directory, ignore_errors=True)
        raise ConfigurationError(
            f"cannot serve metrics on {settings.metrics_address}:{port} "
            f"(ESKIT_METRICS_PORT / ESKIT_METRICS_ADDRESS): {exc}. Give each worker on "
            "one host its own port, or unset ESKIT_METRICS_PORT."
        ) from exc
    _metrics = _create_metrics()
    url = f"http://{settings.metrics_address}:{port}/metrics"
    _server = _Server(url, directory, owns, httpd, thread)
    return port


def describe() -> str | None:
    """Where this worker serves its metrics, for its start-up log; None when off."""
    if _server is None:
        return None
    return f"metrics on {_server.url} (children write to {_server.directory})"


def _prepare_directory(configured: str | None) -> tuple[Path, bool]:
    try:
        if configured is None:
            return Path(tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)), True
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # counts of an earlier run of this worker
            stale.unlink(missing_ok=True)
        return path, False
    except OSError as exc:
        raise ConfigurationError(
            f"cannot prepare the metrics directory (ESKIT_METRICS_DIR): {exc}"
        ) from exc


def _create_metrics() -> _Metrics:
    from prometheus_client import Counter, Histogram

    outcomes = [o.value for o in Outcome]
    metrics = _Metrics(
        compactions=Counter(
            "eskit_compactions",
            "Compaction attempts by outcome.",
            ["outcome"],
            registry=None,
        ),
        events_deleted=Counter(
            "eskit_events_deleted", "Events deleted by compactions.", registry=None
        ),
        bytes_reclaimed=Counter(
            "eskit_bytes_reclaimed",
            "Approximate stored bytes of the events deleted by compactions.",
            registry=None,
        ),
        duration=Histogram(
            "eskit_compaction_duration_seconds",
            "Time the compactor spent on one stream, by outcome.",
            ["outcome"],
            buckets=COMPACTION_DURATION_BUCKETS_S,
            registry=None,
        ),
        lock_waits=Counter(
            "eskit_lock_waits",
            "Times a task found its stream locked and retried later.",
            registry=None,
        ),
    )
    for outcome in outcomes:  # export every outcome from the start, at 0
        metrics.compactions.labels(outcome)
    return metrics


def child_started() -> None:
    """In a prefork child: close its inherited copy of the listening socket, so only the
    main process holds the port."""
    if _server is not None:
        _server.httpd.socket.close()


def child_exited(pid: int | None) -> None:
    """In a prefork child as it exits: let prometheus-client drop its live values."""
    if _server is None or pid is None:
        return
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, str(_server.directory))  # type: ignore[no-untyped-call]
    except OSError as exc:
        log.warning("eskit-tasks: could not mark metrics of process %s dead: %s", pid, exc)


def stop_worker_metrics() -> None:
    """In the main process at worker shutdown: stop serving and remove the temporary
    directory (a configured ESKIT_METRICS_DIR is kept, and emptied at the next start)."""
    global _metrics, _server
    server, _server, _metrics = _server, None, None
    if server is None:
        return
    server.httpd.shutdown()
    server.httpd.server_close()
    server.thread.join(timeout=5)
    if server.owns_directory:
        shutil.rmtree(server.directory, ignore_errors=True)


def record_compaction(result: CompactionResult, *, timed: bool) -> None:
    """Count one compaction attempt that ended with ``result``; ``timed`` when the
    compactor ran (its ``duration_ms`` is then observed). Never raises."""
    metrics = _metrics
    if metrics is None:
        return
    try:
        outcome = result.outcome.value
        metrics.compactions.labels(outcome).inc()
        if result.outcome is Outcome.COMPACTED:
            metrics.events_deleted.inc(result.events_deleted)
            metrics.bytes_reclaimed.inc(result.bytes_reclaimed)
        if timed:
            metrics.duration.labels(outcome).observe(result.duration_ms / 1000)
    except Exception as exc:  # metrics must never turn a compaction into a failure
        log.warning("eskit-tasks: could not record metrics: %s", exc)


def record_lock_wait() -> None:
    """Count a copy that found its stream locked and will retry. Never raises."""
    metrics = _metrics
    if metrics is None:
        return
    try:
        metrics.lock_waits.inc()
    except Exception as exc:
        log.warning("eskit-tasks: could not record metrics: %s", exc)
