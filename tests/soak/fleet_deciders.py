"""Deciders the soak's workers import (ESKIT_DECIDER_MODULES, tests/soak/config.py).

The fleet tests' deciders (tests.fleet_deciders: ``ledger``, ``slow``, ``lossy``), and the
soak's strictly compared kinds (tests/soak/kinds.py: ``recent``, ``agenda``, ``ticket``).
"""

from __future__ import annotations

import tests.fleet_deciders  # noqa: F401  (registers ledger, slow and lossy)
from eskit_tasks import register_decider
from tests.soak.kinds import FOLDERS, STRICT_KINDS

for _kind in STRICT_KINDS:
    _decider, _state_type = FOLDERS[_kind]
    register_decider(_kind, _decider, _state_type)
