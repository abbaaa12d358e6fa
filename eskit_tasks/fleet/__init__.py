"""The fleet: compaction on Celery workers; the only package that imports celery, redis
and kombu.

* :mod:`~eskit_tasks.fleet.app` — ``create_app`` and the default app that
  ``celery -A eskit_tasks`` finds; :mod:`~eskit_tasks.fleet.celeryconfig` — the packaged
  Celery defaults; :mod:`~eskit_tasks.fleet.settings` — ``ESKIT_*`` settings;
  :mod:`~eskit_tasks.fleet.constants` — names and default figures;
* :mod:`~eskit_tasks.fleet.resources` — the store, snapshot store and Redis client of a
  process, built from the settings or given (a test's SQLite file and fakeredis);
* the two tasks: :mod:`~eskit_tasks.fleet.compact_task` (one stream under a
  :mod:`~eskit_tasks.fleet.locks` lock) and :mod:`~eskit_tasks.fleet.fan_out` (pages of
  candidates, published in batches, with back-pressure);
* :mod:`~eskit_tasks.fleet.redelivery` — how copies of one task stay harmless: shared
  compaction ids, result claims, which failures are retried;
* :mod:`~eskit_tasks.fleet.messages` — task arguments: policy serialisation and checks;
* :mod:`~eskit_tasks.fleet.progress` and :mod:`~eskit_tasks.fleet.runs` — a run's
  counters in Redis; ``compact_all`` and ``CompactionRun``;
* :mod:`~eskit_tasks.fleet.observability` (JSON log lines, run reports),
  :mod:`~eskit_tasks.fleet.failures` (the result of a task that died),
  :mod:`~eskit_tasks.fleet.metrics` (Prometheus), :mod:`~eskit_tasks.fleet.consumer`
  (a worker that survives malformed messages).
"""

# Celery's top-level module replaces itself while it is first imported, and a second
# thread importing it at that moment finds it half made ("cannot import name 'Celery'").
# Imported here, under this package's import lock, it is complete before any other
# thread gets past ``import eskit_tasks.fleet``.
import celery as _celery  # noqa: F401
