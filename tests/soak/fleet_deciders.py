"""Deciders the soak's workers import (ESKIT_DECIDER_MODULES, tests/soak/config.py).

The fleet tests' deciders (tests.fleet_deciders: ``ledger``, ``slow``, ``lossy``), the
soak's strictly compared kinds (tests/soak/kinds.py: ``recent``, ``agenda``, ``ticket``),
and, when ESKIT_SOAK_APP_ENV holds its environment (JSON), the pyeventsourcing
application ``SoakBank`` with its follower ``SoakAudit`` (tests/soak/esapp.py).
"""

from __future__ import annotations

import json
import os

import tests.fleet_deciders  # noqa: F401  (registers ledger, slow and lossy)
from eskit_tasks import register_decider
from tests.soak.esapp import ENV_VAR
from tests.soak.kinds import FOLDERS, STRICT_KINDS

for _kind in STRICT_KINDS:
    _decider, _state_type = FOLDERS[_kind]
    register_decider(_kind, _decider, _state_type)

if os.environ.get(ENV_VAR):
    from eskit_tasks.eventsourcing import register_application

    register_application(
        "tests.soak.esapp:SoakBank",
        env=json.loads(os.environ[ENV_VAR]),
        followers=["tests.soak.esapp:SoakAudit"],
    )
