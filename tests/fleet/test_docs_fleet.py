"""The manual's fleet examples run as written, against a real fleet.

tests/test_readme.py finds every ```python / ```pycon block of README.md and docs/*.md
and runs the local ones; the blocks that need a fleet (``compact_all``,
``CompactionRun``, a task's ``.delay``) run here. Their world is the one the manual
describes: a worker that lists ``eskit_tasks.demo`` in ESKIT_DECIDER_MODULES (the demo
``account`` type) and one account, ``a-1``, of 1,000 events.
"""

from __future__ import annotations

import pytest

from eskit_tasks import NewEvent
from tests.fleet.conftest import Fleet
from tests.test_readme import Example, all_examples, run_pycon

FLEET_EXAMPLES = [e for e in all_examples() if e.runner == "fleet"]


def _seed_account(fleet: Fleet, stream_id: str, events: int) -> None:
    """An opened demo account with ``events`` events in all (deposits after the first)."""
    opened = NewEvent("Opened", {"owner": stream_id})
    deposits = [NewEvent("Deposited", {"cents": 100 + n}) for n in range(events - 1)]
    fleet.store.append("account", stream_id, [opened, *deposits], expected_version=0)


def test_the_manual_has_fleet_examples():
    assert FLEET_EXAMPLES


@pytest.mark.slow
@pytest.mark.parametrize("example", FLEET_EXAMPLES, ids=lambda e: e.id)
def test_fleet_example_runs(example: Example, fleet: Fleet):
    _seed_account(fleet, "a-1", 1000)
    fleet.worker("w1", ESKIT_DECIDER_MODULES="tests.fleet_deciders,eskit_tasks.demo")
    if example.lang == "pycon":
        run_pycon(example, {"__name__": example.id})
    else:
        source = "\n" * (example.lineno - 1) + example.source
        code = compile(source, str(example.page), "exec", dont_inherit=True)
        exec(code, {"__name__": example.id})  # noqa: S102 -- our own manual
    assert fleet.store.head_version("account", "a-1") == 1000  # the head never moves
