"""Test helpers shipped with the package (the top layer: it may import every other one).

* :mod:`eskit_tasks.testing.services` — scratch PostgreSQL databases, private
  ``redis-server`` processes and real ``celery worker`` processes, for tests, the soak
  and the benchmarks alike.
"""
