"""The ``hil`` command line: one typer app; each area adds its commands in its own module."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from hil.errors import ConfigError, HilError

app = typer.Typer(
    name="hil",
    help="analog-hil: characterize, calibrate and train on resistive crossbar chips.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)

# Command modules register themselves on `app` when imported (lazy heavy imports inside).
from hil.cli import (  # noqa: E402,F401
    calibration_cmds,
    chip_cmds,
    demo_cmds,
    train_cmds,
    validate_cmds,
)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script: bad input is one line on stderr and exit code 2."""
    try:
        code = app(args=argv, standalone_mode=False)  # a command's typer.Exit(code)
        if isinstance(code, int) and code:
            sys.exit(code)
    except (ConfigError, HilError, FileNotFoundError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        # usage errors of the click layer (typer may bundle its own copy of click)
        if callable(getattr(exc, "show", None)) and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(2)
        raise
