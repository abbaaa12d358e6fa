"""The ``eskit-tasks`` command line (also ``python -m eskit_tasks``).

Exit status: 0 success; 1 an error; 2 a usage error (bad flag or value); 3 a service
(database, Redis, broker) unreachable; 4 the work ran but some streams failed.

    options.py   the Typer app, the exit statuses and the options commands share
    local.py     commands that work on the database in this process: init-db, demo,
                 candidates, compact, log, verify-snapshots (and compact-all --local)
    fleet.py     commands that talk to the fleet: compact-all, status
    render.py    tables, summaries, progress bars and JSON output (no work is done here)
    main.py      the entry point: runs a command and turns errors into exit statuses
"""

from eskit_tasks.cli.main import main, run
from eskit_tasks.cli.options import Exit, app

__all__ = ["Exit", "app", "main", "run"]
