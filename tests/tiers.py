"""The two test tiers: ``make test-fast`` (logic, no services) and ``make check`` (all).

A test belongs to the ``services`` tier — and is left out of ``pytest -m "not services"``
— when it needs something outside this process that a developer may not have running:

* PostgreSQL: it uses the ``postgres_url`` fixture, directly or through another fixture
  (the contract suites' PostgreSQL backend does);
* redis-server or real ``celery worker`` processes: it lives in tests/fleet/ or is the
  soak (tests/soak/test_soak.py);
* anything else it starts itself (a broker, the CLI's console script against a server):
  it is marked ``@pytest.mark.services`` by hand.

Everything else is the fast tier: the memory and SQLite stores, fakeredis, kombu
``memory://`` and the in-process worker of tests/test_fleet_in_process.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: Fixtures that reach a service.
SERVICE_FIXTURES = frozenset({"postgres_url"})
#: Test files and folders whose every test starts services of its own.
SERVICE_PATHS = ("fleet", "soak/test_soak.py")

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
