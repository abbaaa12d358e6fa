"""A soak test: the fleet under a steady workload and random faults, checked against a model.

``run_soak(config)`` (harness.py) starts PostgreSQL-backed writers and readers in this
process, three real ``celery worker`` processes, two private redis-servers (broker and
results; locks and run progress), starts fan-outs every few seconds with random
policies, injects faults on a seeded schedule (kill -9 of a worker, the Redis for locks
stopped and restarted, PostgreSQL connections terminated, a worker paused past its lock's
expiry, the same fan-out started twice), then quiesces and checks every invariant
against a model of what the writers know they appended (model.py, checker.py).

A projection follows the whole store (``read_all``) with a checkpoint, pausing now and
then so that compactions must be held back by it, and must see every event exactly once;
now and then a compacted stream is restored from the workers' trash bin (consumers.py).

A pyeventsourcing application (``SoakBank``, in SQLite files of the work directory) is
compacted by the same fan-outs, its aggregates written continuously, loaded and
compared, saved stale (the guard must refuse that), and followed by a lagging
``ProcessApplication`` that must process every event exactly once (esapp.py).

Besides the Ledger, the streams include kinds whose states ``==`` forgives a lossy copy
of (kinds.py: an insertion-ordered dict, a ZoneInfo datetime in a model, enums in a
model); every observed state is compared with the model's by
``eskit_tasks.domain.compare.first_difference``, as compaction compares its own.

Run it with ``make soak MINUTES=10`` or ``python -m tests.soak --minutes 10``; the suite
runs a short one (test_soak.py).
"""
