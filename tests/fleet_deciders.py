"""Deciders the fleet tests' workers import (ESKIT_DECIDER_MODULES=tests.fleet_deciders).

* ``ledger``: the plain Ledger (dict state).
* ``slow``: the Ledger, sleeping ESKIT_TEST_SLOW_S per event and leaving a marker file
  ``<ESKIT_TEST_MARKERS>/<stream id>.<pid>`` when it starts folding, so a test knows
  which process is compacting which stream (to kill or pause exactly that one).
* ``lossy``: a state whose codec does not round-trip (sets become lists).
* ``brittle``: the Ledger, whose ``evolve`` raises while ESKIT_TEST_BROKEN=1 (a decider
  bug that a later deployment fixes).
* anything else (e.g. ``ghost``) has no decider.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from eskit_tasks import RecordedEvent, register_decider
from eskit_tasks.testing.deciders import Ledger, LossyTagger


class SlowLedger(Ledger):
    def evolve(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        if state["count"] == 0 or event.version == 1:
            markers = os.environ.get("ESKIT_TEST_MARKERS")
            if markers:
                stream = event.metadata.get("stream", "unknown")
                Path(markers, f"{stream}.{os.getpid()}").touch()
        time.sleep(float(os.environ.get("ESKIT_TEST_SLOW_S", "0.001")))
        return super().evolve(state, event)


class BrittleLedger(Ledger):
    def evolve(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        if os.environ.get("ESKIT_TEST_BROKEN") == "1":
            raise RuntimeError("a bug in this deployment's decider")
        return super().evolve(state, event)


register_decider("ledger", Ledger(), dict)
register_decider("brittle", BrittleLedger(), dict)
register_decider("slow", SlowLedger(), dict)
register_decider("lossy", LossyTagger(), dict)
