"""The test suite. Helpers shared with the soak and the benchmarks live in
:mod:`eskit_tasks.testing.services`; what is specific to this checkout lives here."""

from pathlib import Path

#: The repository checkout: workers started by the tests run here, with it on
#: PYTHONPATH, so that they import ``tests.fleet_deciders`` and ``celeryconfig``.
REPO = Path(__file__).resolve().parent.parent
