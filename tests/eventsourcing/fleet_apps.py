"""The pyeventsourcing application the fleet tests' workers compact: imported through
ESKIT_DECIDER_MODULES, it registers ``Ledgers`` with the environment in
ESKIT_TEST_ES_ENV (JSON) when that is set.

``Ledger.deposit`` sleeps ESKIT_TEST_SLOW_S when a worker replays it (0 elsewhere), and
the first deposit a process replays leaves a marker ``<ESKIT_TEST_MARKERS>/<id>.<pid>``,
so a test knows which process compacts which aggregate (to kill exactly that one).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from eskit_tasks.eventsourcing import register_application


class Ledger(Aggregate):
    @event("Opened")
    def __init__(self) -> None:
        self.total = 0
        self.entries = 0

    @event("Deposited")
    def deposit(self, amount: int) -> None:
        markers = os.environ.get("ESKIT_TEST_MARKERS")
        if markers and self.entries == 0:
            Path(markers, f"{self.id}.{os.getpid()}").touch()
        time.sleep(float(os.environ.get("ESKIT_TEST_SLOW_S", "0")))
        self.total += amount
        self.entries += 1


class Ledgers(Application):
    is_snapshotting_enabled = True

    def open_with(self, amounts: list[int]) -> UUID:
        ledger = Ledger()
        for amount in amounts:
            ledger.deposit(amount)
        self.save(ledger)
        return ledger.id

    def state(self, ledger_id: UUID) -> dict[str, Any]:
        found = self.repository.get(ledger_id)
        return {"version": found.version, "total": found.total, "entries": found.entries}


if os.environ.get("ESKIT_TEST_ES_ENV"):
    register_application(Ledgers, env=json.loads(os.environ["ESKIT_TEST_ES_ENV"]))
