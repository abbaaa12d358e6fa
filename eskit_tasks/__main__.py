"""``python -m eskit_tasks``: the same as the ``eskit-tasks`` command."""

from eskit_tasks.cli import run

run()
