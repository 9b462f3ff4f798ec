"""For tests that signal a child process: the child's signal dispositions are set here,
not inherited (``make test &`` and nohup start the suite with SIGINT or SIGHUP ignored,
and an ignored signal stays ignored across exec)."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def default_signals() -> None:
    """preexec_fn: the stop signals at their defaults in the child (Python then turns
    SIGINT into KeyboardInterrupt as usual)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
