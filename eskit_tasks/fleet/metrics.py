"""Prometheus metrics of a worker and of beat, opt-in with ``ESKIT_METRICS_PORT``.

With ``ESKIT_METRICS_PORT=9808`` every ``celery worker`` serves
``http://<host>:9808/metrics``, and so does ``celery beat`` (its own metrics, below);
without it nothing is started, nothing listens and recording a compaction costs one
``is None`` check (prometheus-client is not even imported). Each worker exposes its own
counts: point Prometheus at every worker and sum across them
(``sum by (outcome) (rate(eskit_compactions_total[5m]))``).

Every metric about a stream carries ``stream_type``: the stream's type if it is
registered in the worker (``register_decider``, ``register_application``, through
ESKIT_DECIDER_MODULES), else ``other``. Stream types come from task messages, which
anyone who can write to the broker can make up; only registered ones become label
values, so the number of series stays bounded by the registrations (a type registered
under the name ``other`` shares that label).

Metrics of a worker:

``eskit_compactions_total{outcome,stream_type}`` (counter)
    Compaction attempts by how they ended: ``compacted``, ``dry_run``,
    ``nothing_to_compact``, ``verification_failed``, ``fenced``, ``failed``, ``locked``
    (every outcome is exported from the start, at 0). One per attempt: a task retried
    after a transient failure (database or Redis unreachable, lock lost) counts each
    attempt that ended, e.g. ``fenced`` and then ``nothing_to_compact``; a copy that
    finds the stream locked counts only when its retries are used up (``locked``).
    A task killed at its hard time limit counts as ``failed``.
``eskit_events_deleted_total{stream_type}`` (counter)
    Events deleted by ``compacted`` attempts. Dry runs delete nothing and add nothing.
``eskit_bytes_reclaimed_total{stream_type}`` (counter)
    Approximate stored size of those deleted events, in bytes.
``eskit_compaction_duration_seconds{outcome,stream_type}`` (histogram)
    Time the compactor spent on one stream (replay, verify, snapshot, delete), in
    buckets from 1 ms to 1 h. Attempts that ended before compacting (``locked``, no
    decider registered, an invalid policy, Redis unreachable) are not observed.
``eskit_lock_waits_total{stream_type}`` (counter)
    Times a copy of a task found its stream's lock held — by another task, or by an
    earlier delivery of itself still running — so it did not compact (it retries later,
    or ends ``locked`` when its retries are used up). Many waits mean overlapping runs.
``eskit_runs_started_total`` (counter)
    Fleet runs whose fan-out sent its first page, counted by the worker that sent it
    (once per run, whatever the redeliveries).
``eskit_runs_finished_total{result}`` (counter)
    Fleet runs that ended, counted once by the worker that ended them: ``complete``
    (every candidate reported, and the finishing step that reclaims space done) or
    ``error`` (stopped: the fan-out gave up, an invalid policy, progress lost). Runs in
    progress across the fleet: ``sum(eskit_runs_started_total) -
    sum(eskit_runs_finished_total)`` over a window all workers were up for (counters
    restart at 0 with their worker; a run that fails before its first page counts only
    as finished).

Metrics of ``celery beat`` (computed from its scheduler at each scrape, one series per
schedule entry, e.g. ``eskit-nightly-compaction``):

``eskit_beat_last_run_timestamp_seconds{entry}`` (gauge)
    When beat last sent the entry's task (Unix time); absent until it first has.
``eskit_beat_next_run_timestamp_seconds{entry}`` (gauge)
    When the entry is next due. In the past by more than a few seconds: beat is stuck
    (its scheduler loop does not run); no series at all: beat is down (``up == 0``).

A beat embedded in a worker (``celery worker -B``) serves nothing of its own (the
worker holds the port); run ``celery beat`` on its own for these.

How it works: a worker is one main process and ``--concurrency`` prefork children that
run the tasks, so the counts live in prometheus-client's *multiprocess mode*. At worker
start (``worker_init``, in the main process, before it forks) this module points
``PROMETHEUS_MULTIPROC_DIR`` at ``ESKIT_METRICS_DIR`` (emptied first; by default a fresh
temporary directory, removed at shutdown), creates the metrics and starts the HTTP
server, whose ``MultiProcessCollector`` adds up the files every child writes there.
Two workers must not share one directory. A port already in use stops the worker (or
beat) at start with an error naming ``ESKIT_METRICS_PORT``. The page holds counts only:
no URL, stream id or error text.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eskit_tasks.core.registry import registered_sources, registered_types
from eskit_tasks.domain.result import CompactionResult, Outcome
from eskit_tasks.errors import ConfigurationError
from eskit_tasks.fleet.constants import COMPACTION_DURATION_BUCKETS_S, METRICS_DIR_PREFIX

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import Counter, Histogram
    from prometheus_client.core import Metric

    from eskit_tasks.fleet.settings import EskitSettings

log = logging.getLogger("eskit_tasks")

#: The ``stream_type`` label of a stream whose type is not registered in the worker.
OTHER_STREAM_TYPE = "other"
#: The values of ``eskit_runs_finished_total``'s ``result`` label.
RUN_RESULTS = ("complete", "error")
#: The values of ``eskit_runs``' ``state`` label.
RUN_STATES = ("running", "finished", "failed")


@dataclass(frozen=True)
class _Metrics:
    compactions: Counter
    events_deleted: Counter
    bytes_reclaimed: Counter
    duration: Histogram
    lock_waits: Counter
    runs_started: Counter
    runs_finished: Counter


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
# Set in a `celery beat` process.
_beat_server: _Server | None = None


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
    registry.register(QuarantineCollector(settings.database_url))
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


def stream_type_label(stream_type: str) -> str:
    """The ``stream_type`` label of a stream: its type if registered in this process,
    else ``other`` (label values stay bounded by the registrations)."""
    if stream_type in registered_types() or stream_type in registered_sources():
        return stream_type
    return OTHER_STREAM_TYPE


def stream_type_labels() -> list[str]:
    """Every value the ``stream_type`` label can take in this process now."""
    return sorted({*registered_types(), *registered_sources(), OTHER_STREAM_TYPE})


def _create_metrics() -> _Metrics:
    from prometheus_client import Counter, Histogram

    by_type = ["stream_type"]
    metrics = _Metrics(
        compactions=Counter(
            "eskit_compactions",
            "Compaction attempts by outcome and stream type.",
            ["outcome", *by_type],
            registry=None,
        ),
        events_deleted=Counter(
            "eskit_events_deleted", "Events deleted by compactions.", by_type, registry=None
        ),
        bytes_reclaimed=Counter(
            "eskit_bytes_reclaimed",
            "Approximate stored bytes of the events deleted by compactions.",
            by_type,
            registry=None,
        ),
        duration=Histogram(
            "eskit_compaction_duration_seconds",
            "Time the compactor spent on one stream, by outcome and stream type.",
            ["outcome", *by_type],
            buckets=COMPACTION_DURATION_BUCKETS_S,
            registry=None,
        ),
        lock_waits=Counter(
            "eskit_lock_waits",
            "Times a task found its stream locked and retried later.",
            by_type,
            registry=None,
        ),
        runs_started=Counter(
            "eskit_runs_started",
            "Fleet runs whose fan-out sent its first page.",
            registry=None,
        ),
        runs_finished=Counter(
            "eskit_runs_finished",
            "Fleet runs that ended: complete, or stopped by an error.",
            ["result"],
            registry=None,
        ),
    )
    # Export every series from the start, at 0: the deciders are imported by now
    # (worker_init, before this), so the registered stream types are known.
    for stream_type in stream_type_labels():
        for outcome in Outcome:
            metrics.compactions.labels(outcome.value, stream_type)
        metrics.events_deleted.labels(stream_type)
        metrics.bytes_reclaimed.labels(stream_type)
        metrics.lock_waits.labels(stream_type)
    for result in RUN_RESULTS:
        metrics.runs_finished.labels(result)
    return metrics


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name a worker or beat serves, with its label names: what a
    dashboard or an alert can query (tests check docs/grafana-dashboard.json with it)."""
    from dataclasses import fields

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    found: dict[str, frozenset[str]] = {}
    made = _create_metrics()
    for field in fields(made):
        metric = getattr(made, field.name)
        labels = frozenset(metric._labelnames)
        for suffix in suffixes[metric._type]:
            found[metric._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    for family in BeatCollector(None).collect():  # no scheduler: the families, no samples
        found[family.name] = frozenset({"entry"})
    for family in QuarantineCollector(None).collect():
        found[family.name] = frozenset(
            {"state"} if family.name == "eskit_runs" else {"stream_type"}
        )
    return found


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
        stream_type = stream_type_label(result.stream_type)
        metrics.compactions.labels(outcome, stream_type).inc()
        if result.outcome is Outcome.COMPACTED:
            metrics.events_deleted.labels(stream_type).inc(result.events_deleted)
            metrics.bytes_reclaimed.labels(stream_type).inc(result.bytes_reclaimed)
        if timed:
            metrics.duration.labels(outcome, stream_type).observe(result.duration_ms / 1000)
    except Exception as exc:  # metrics must never turn a compaction into a failure
        log.warning("eskit-tasks: could not record metrics: %s", exc)


def record_lock_wait(stream_type: str) -> None:
    """Count a copy that found its stream locked and will retry. Never raises."""
    metrics = _metrics
    if metrics is None:
        return
    try:
        metrics.lock_waits.labels(stream_type_label(stream_type)).inc()
    except Exception as exc:
        log.warning("eskit-tasks: could not record metrics: %s", exc)


def record_run_started() -> None:
    """Count a run whose fan-out sent its first page (once per run). Never raises."""
    metrics = _metrics
    if metrics is None:
        return
    try:
        metrics.runs_started.inc()
    except Exception as exc:
        log.warning("eskit-tasks: could not record metrics: %s", exc)


def record_run_finished(*, error: bool) -> None:
    """Count a run that ended (once per run): complete, or stopped by an ``error``.
    Never raises."""
    metrics = _metrics
    if metrics is None:
        return
    try:
        metrics.runs_finished.labels(RUN_RESULTS[1] if error else RUN_RESULTS[0]).inc()
    except Exception as exc:
        log.warning("eskit-tasks: could not record metrics: %s", exc)


# -- celery beat ----------------------------------------------------------------------


def start_beat_metrics(settings: EskitSettings, service: Any) -> int | None:
    """In a ``celery beat`` process (``beat_init``): serve the schedule's health, read
    from ``service.scheduler`` at each scrape. Does nothing without
    ``settings.metrics_port``, or in a beat embedded in a worker that serves metrics
    (``worker -B``: the port is the worker's). Returns the port served.

    Raises:
        ConfigurationError: the port cannot be bound.
    """
    global _beat_server
    port = settings.metrics_port
    if port is None or _beat_server is not None:
        return None if port is None else port
    if _server is not None:
        log.warning(
            "eskit-tasks: beat embedded in a worker (-B) serves no metrics of its own; "
            "run `celery beat` as its own process for eskit_beat_* metrics"
        )
        return None
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(BeatCollector(service))
    try:
        httpd, thread = start_http_server(port, settings.metrics_address, registry=registry)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve beat metrics on {settings.metrics_address}:{port} "
            f"(ESKIT_METRICS_PORT / ESKIT_METRICS_ADDRESS): {exc}. Give beat its own "
            "port, or unset ESKIT_METRICS_PORT for it."
        ) from exc
    url = f"http://{settings.metrics_address}:{port}/metrics"
    _beat_server = _Server(url, Path(), False, httpd, thread)
    log.info("eskit-tasks: beat metrics on %s", url)
    return port


def stop_beat_metrics() -> None:
    """Stop serving beat's metrics (tests; a beat process just exits)."""
    global _beat_server
    server, _beat_server = _beat_server, None
    if server is not None:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=5)


class QuarantineCollector:
    """Gauges read from the database at each scrape (two small queries in the worker's
    main process; every worker reports the same fleet-wide figures, so take ``max``
    across workers, not ``sum``): quarantined streams per stream type (types not
    registered in the worker counted under ``other``), and runs per state from the
    record of runs (``running``: started and not ended in the last week). A database that
    cannot answer leaves them out of that scrape (and is logged)."""

    def __init__(self, database_url: str | None) -> None:
        self._url = database_url
        self._quarantine: Any = None

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "eskit_quarantined_streams",
            "Streams quarantined after failing compactions in a row, by stream type.",
            labels=["stream_type"],
        )
        runs = GaugeMetricFamily(
            "eskit_runs",
            "Runs recorded in the database by state: running (started in the last week, "
            "not ended), finished and failed in the last day.",
            labels=["state"],
        )
        if self._url is None:
            yield family
            yield runs
            return
        try:
            counts = self._counts()
            states = self._run_states()
        except Exception as exc:  # a scrape must answer even if the database cannot
            log.warning("eskit-tasks: could not read the database for metrics: %s", exc)
            return
        for state in RUN_STATES:
            runs.add_metric([state], states.get(state, 0))
        by_label = dict.fromkeys(stream_type_labels(), 0)
        for stream_type, n in counts.items():
            label = stream_type_label(stream_type)
            by_label[label] = by_label.get(label, 0) + n
        for label, n in sorted(by_label.items()):
            family.add_metric([label], n)
        yield family
        yield runs

    def _run_states(self) -> dict[str, int]:
        from eskit_tasks.stores.sql_runs import run_counts

        self._counts()  # makes the engine on first use
        counts: dict[str, int] = run_counts(self._quarantine.engine)
        return counts

    def _counts(self) -> dict[str, int]:
        if self._quarantine is None:
            from eskit_tasks.stores.engine import create_engine
            from eskit_tasks.stores.sql_quarantine import SqlQuarantine

            assert self._url is not None
            self._quarantine = SqlQuarantine(create_engine(self._url))
        counts: dict[str, int] = self._quarantine.counts_by_type()
        return counts


class BeatCollector:
    """The schedule's health, from a beat ``Service``'s scheduler at each scrape: when
    each entry last ran and when it is next due. An entry that cannot be read is left
    out (and logged); a scrape never fails because of one."""

    def __init__(self, service: Any) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        last = GaugeMetricFamily(
            "eskit_beat_last_run_timestamp_seconds",
            "When beat last sent the schedule entry's task (Unix time).",
            labels=["entry"],
        )
        upcoming = GaugeMetricFamily(
            "eskit_beat_next_run_timestamp_seconds",
            "When the schedule entry is next due (Unix time); in the past: beat is stuck.",
            labels=["entry"],
        )
        try:
            entries = (
                [] if self._service is None else sorted(self._service.scheduler.schedule.items())
            )
        except Exception as exc:  # a scrape must answer even if the scheduler cannot
            log.warning("eskit-tasks: could not read beat's schedule: %s", exc)
            entries = []
        now = time.time()
        for name, entry in entries:
            try:
                due_in = entry.schedule.remaining_estimate(entry.last_run_at)
                upcoming.add_metric([str(name)], now + due_in.total_seconds())
                if entry.total_run_count > 0:  # before its first run: the time beat started
                    ran = entry.last_run_at
                    ran = ran if ran.tzinfo is not None else ran.replace(tzinfo=UTC)
                    last.add_metric([str(name)], ran.timestamp())
            except Exception as exc:
                log.warning("eskit-tasks: could not read beat entry %s: %s", name, exc)
        yield last
        yield upcoming
