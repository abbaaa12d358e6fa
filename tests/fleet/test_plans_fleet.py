"""Plan then apply through real workers, PostgreSQL and redis-servers (issue 14), with
streams appended between the plan and the apply: each planned stream is compacted
through its planned version and no further; an unplanned stream is left alone."""

from __future__ import annotations

import json

from eskit_tasks.cli import Exit, main
from eskit_tasks.fleet.runs import apply_plan
from tests.fleet.conftest import Fleet


def test_apply_through_the_fleet_never_goes_past_the_plan(fleet: Fleet, capsys):
    for n in range(4):
        fleet.seed("ledger", f"p-{n}", 30)
    fleet.worker("w1", ESKIT_DECIDER_MODULES="tests.fleet_deciders")
    url = fleet.store.engine.url.render_as_string(hide_password=False)
    code = main(
        [
            "plan", "--database", url,
            "--retain-last", "10", "--decider-module", "tests.fleet_deciders", "--json",
        ]
    )  # fmt: skip
    plan = json.loads(capsys.readouterr().out)
    assert code == Exit.OK and plan["totals"]["streams"] == 4
    for n in range(4):
        fleet.seed("ledger", f"p-{n}", 15)  # each grows to 45 after planning
    fleet.seed("ledger", "unplanned", 30)

    run = apply_plan(plan["plan_id"], database=url)
    final = run.wait(timeout=120)
    assert final.outcomes == {"compacted": 4}, fleet.worker_logs()
    for n in range(4):
        assert fleet.live_versions("ledger", f"p-{n}") == list(range(21, 46))
    assert fleet.live_versions("ledger", "unplanned") == list(range(1, 31))
    assert {r.through_version for r in fleet.store.compaction_log(run_id=run.run_id)} == {20}
    fleet.assert_nothing_lost()
