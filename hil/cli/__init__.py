"""The ``hil`` command line: one typer app; each area adds its commands in its own module.

:func:`main` is the one place that maps outcomes to exit codes: bad input is one line and
exit 2; SIGINT, SIGTERM and SIGHUP stop every command in order (outputs off from the
host, files flushed) and exit 130, 143 or 129 with one line saying what was interrupted
and how to resume (see docs/safety.md).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape

from hil import interrupts
from hil.errors import ConfigError, HilError

app = typer.Typer(
    name="hil",
    help="analog-hil: characterize, calibrate and train on resistive crossbar chips.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


class _Resume:
    hint: Callable[[], str] | None = None  # what to do after an interruption, asked then


_resume = _Resume()


def set_resume_hint(hint: Callable[[], str]) -> None:
    """What the interruption line tells the user to do next, asked when the stop comes
    (e.g. whether the run has a checkpoint to --resume yet)."""
    _resume.hint = hint


def error_line(message: str) -> None:
    """One line on stderr; the message is printed as is (never read as Rich markup)."""
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


# Command modules register themselves on `app` when imported (lazy heavy imports inside).
from hil.cli import (  # noqa: E402,F401
    calibration_cmds,
    chip_cmds,
    demo_cmds,
    sweep_cmds,
    train_cmds,
    validate_cmds,
)


def _command(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), "")


def _stopped(signum: int, command: str) -> None:
    exc = interrupts.Interrupted(signum)
    what = f"hil {command}".strip()
    hint = _resume.hint() if _resume.hint else "nothing was left half-done; rerun the command"
    err_console.print(escape(f"interrupted by {exc.name}: {what} stopped, outputs off; "
                             f"{hint}"), highlight=False, soft_wrap=True)
    sys.exit(exc.exit_code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script: bad input is one line on stderr and exit code 2;
    a stop signal is one line and exit 128 + its number."""
    previous = interrupts.install()
    _resume.hint = None
    try:
        _run(argv, _command(argv))
    finally:
        interrupts.restore(previous)


def _run(argv: list[str] | None, command: str) -> None:
    try:
        code = app(args=argv, standalone_mode=False)
    except KeyboardInterrupt as exc:
        _stopped(getattr(exc, "signum", None) or interrupts.received() or signal.SIGINT, command)
    except SystemExit:
        raise
    except BaseException as exc:
        if interrupts.received() is not None:  # an error while stopping: the stop wins
            _stopped(interrupts.received(), command)
        _fail(exc)
    if interrupts.received() is not None or code == 130:  # typer: KeyboardInterrupt -> 130
        _stopped(interrupts.received() or signal.SIGINT, command)
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(exc: BaseException) -> None:
    if isinstance(exc, (ConfigError, HilError)):
        error_line(str(exc))
        sys.exit(2)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        error_line(f"{where}{exc.strerror or exc}")
        sys.exit(2)
    if isinstance(exc, typer.Abort):
        err_console.print("aborted")
        sys.exit(130)
    # usage errors of the click layer (typer may bundle its own copy of click)
    if callable(getattr(exc, "show", None)) and hasattr(exc, "exit_code"):
        exc.show()
        sys.exit(2)
    raise exc
