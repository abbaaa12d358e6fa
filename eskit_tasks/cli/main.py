"""The entry point: run a command, turn expected errors into one line and an exit status."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.exceptions import TyperException

# Importing the command modules registers their commands on the app.
from eskit_tasks.cli import consumers as _consumer_commands
from eskit_tasks.cli import fleet as _fleet_commands
from eskit_tasks.cli import local as _local_commands
from eskit_tasks.cli import plans as _plan_commands
from eskit_tasks.cli import quarantine as _quarantine_commands
from eskit_tasks.cli.options import Exit, app
from eskit_tasks.cli.render import err
from eskit_tasks.domain.redact import mask_url
from eskit_tasks.errors import ConfigurationError, EskitError, ServiceUnavailableError

COMMAND_MODULES = (
    _local_commands,
    _fleet_commands,
    _consumer_commands,
    _quarantine_commands,
    _plan_commands,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; expected errors print one line and set the exit status."""
    try:
        code = app(args=list(argv) if argv is not None else None, standalone_mode=False)
        return int(code or 0)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        return Exit.ERROR
    except TyperException as exc:  # a usage error found by the argument parser
        hint = " ".join(["eskit-tasks", *subcommands(getattr(exc, "ctx", None)), "--help"])
        err.print(f"error: {exc.format_message()} (see: {hint})")
        return Exit.USAGE
    except ConfigurationError as exc:  # includes InvalidPolicyError: a bad value given
        err.print(f"error: {mask_url(str(exc))}")
        return Exit.USAGE
    except ServiceUnavailableError as exc:  # the database, the broker, a Redis: named
        err.print(f"error: {mask_url(str(exc))}")
        return Exit.UNAVAILABLE
    except EskitError as exc:
        err.print(f"error: {mask_url(str(exc))}")
        return Exit.ERROR
    except Exception as exc:
        from eskit_tasks.fleet import services  # a client failed outside services.reaching

        if services.unreachable(exc):
            err.print(
                f"error: cannot reach a service of the fleet: {services.reason(exc)}. Check "
                "CELERY_BROKER_URL, ESKIT_REDIS_URL and CELERY_RESULT_BACKEND."
            )
            return Exit.UNAVAILABLE
        raise


def subcommands(ctx: Any) -> list[str]:
    """The command names a usage error was found under (``ctx``: the parser's context,
    of typer's vendored click), without the program's own name: that is ``__main__.py``
    or ``-c`` when the CLI does not run as the console script."""
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    return [n for n in names if n]


def run() -> None:
    """The ``eskit-tasks`` console script."""
    sys.exit(main())
