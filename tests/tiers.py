"""The two test tiers: ``make test-fast`` (logic, no services) and ``make check`` (all).

``make test-fast`` runs ``pytest -m "not services and not slow"``: it leaves out the
``slow`` tests (races between real processes, the soak's checker on a real database,
measurements over long streams, console-script processes, tests that start several
fresh interpreters) and every test of the ``services`` tier. A test belongs to the
``services`` tier when it needs something outside this process that a developer may
not have running:

* PostgreSQL: it uses the ``postgres_url`` fixture, directly or through another fixture
  (the contract suites' PostgreSQL backend does);
* redis-server or real ``celery worker`` processes: it lives in tests/fleet/ or is the
  soak (tests/soak/test_soak.py);
* anything else it starts itself (a redis-server, a PostgreSQL backend chosen by a
  fixture parameter): it is marked ``services`` by hand (``@pytest.mark.services`` or
  ``pytest.param("postgres", marks=pytest.mark.services)``).

Everything else is the fast tier: the memory and SQLite stores, fakeredis, kombu
``memory://`` and the in-process worker of tests/test_fleet_in_process.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: Fixtures that reach a service.
SERVICE_FIXTURES = frozenset({"postgres_url"})
#: Test files and folders whose every test starts services of its own.
SERVICE_PATHS = ("fleet", "soak/test_soak.py", "test_bench.py")

_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_services(item):
            item.add_marker(pytest.mark.services)


def _needs_services(item: pytest.Item) -> bool:
    if item.get_closest_marker("services") is not None:
        return True
    if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    try:
        where = item.path.relative_to(_TESTS).as_posix()
    except ValueError:
        return False
    return any(where == p or where.startswith(f"{p}/") for p in SERVICE_PATHS)
