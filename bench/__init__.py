"""Benchmarks: ratios against a baseline measured in the same run (``make bench``).

Scratch databases, redis-servers and workers come from
:mod:`eskit_tasks.testing.services`, as in the tests and the soak.
"""

from pathlib import Path

#: The repository checkout: benchmark children and workers run here, with it on
#: PYTHONPATH, so that they import ``bench.deciders`` and ``celeryconfig``.
REPO = Path(__file__).resolve().parent.parent
