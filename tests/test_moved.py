"""The old flat module paths still import, as the modules at their new paths.

An operator's ``celeryconfig.py`` written for the flat layout (``from
eskit_tasks.settings import get_settings``) must still start a worker after an upgrade.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eskit_tasks._moved import MOVED


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_an_old_path_is_the_new_module_with_a_warning(
    old: str, new: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__ is not None and module.__spec__.name == new  # its own spec kept


def test_a_path_that_never_existed_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("eskit_tasks.no_such_module")


#: The head of the operators' celeryconfig.py as the flat layout shipped it.
FLAT_LAYOUT_CONFIG = """
from celery.schedules import crontab
from kombu import Queue

from eskit_tasks.settings import get_settings

_s = get_settings()
broker_url = _s.broker_url
result_backend = _s.result_backend
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_acks_late = True
worker_prefetch_multiplier = 7
task_queues = (Queue(_s.compaction_queue), Queue(_s.fanout_queue))
beat_schedule = {
    "nightly": {
        "task": "eskit_tasks.fan_out",
        "schedule": crontab(minute="0", hour="3"),
        "kwargs": _s.nightly_policy_kwargs,
    }
}
"""


def test_an_operators_config_for_the_flat_layout_still_builds_the_app(tmp_path: Path):
    (tmp_path / "celeryconfig.py").write_text(FLAT_LAYOUT_CONFIG)
    script = textwrap.dedent(
        """
        from eskit_tasks.fleet.app import app
        assert app.conf.worker_prefetch_multiplier == 7, app.conf.worker_prefetch_multiplier
        assert "eskit_tasks.compact_stream" in app.tasks
        print("ok")
        """
    )
    env = {**os.environ, "ESKIT_CELERY_CONFIG": "celeryconfig"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.strip() == "ok", done.stderr
