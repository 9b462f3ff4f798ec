"""Orderly stops: SIGINT, SIGTERM and SIGHUP all become :class:`Interrupted` (a
KeyboardInterrupt), so every ``with backend`` / ``finally`` path runs (outputs off from
the host, files flushed) whichever signal stopped the process.

A long loop that must stop at a consistent point (a training step) runs each step under
:func:`deferred`: a signal then only marks the stop, and the step's end raises it. A second
signal during a deferred step raises at once; signals that arrive while the stop is
already under way are ignored, so a Ctrl-C pressed twice cannot cut the outputs-off
sequence short.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}  # 128 + signum


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by ``signum`` (SIGINT, SIGTERM or SIGHUP)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + self.signum)


class _State:
    received: int | None = None  # the first stop signal
    stopping = False  # Interrupted has been raised: cleanup is running
    deferring = 0  # nesting depth of deferred()


_state = _State()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state.stopping:
        print(f"{signal.Signals(signum).name}: already stopping (outputs going off)",
              file=sys.stderr, flush=True)
        return
    if _state.deferring and _state.received is None:
        _state.received = signum  # stop at the end of this step
        return
    _state.received = _state.received or signum
    _state.stopping = True
    raise Interrupted(signum)


def install() -> dict[int, object]:
    """Turn SIGINT, SIGTERM and SIGHUP into Interrupted (main thread only); returns the
    previous handlers for :func:`restore`. A signal the process inherited as ignored
    stays ignored (``nohup`` ignores SIGHUP, a background job SIGINT: that is what their
    user asked for)."""
    reset()
    previous = {}
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if current is not signal.SIG_IGN:
            previous[sig] = current
            signal.signal(sig, _handler)
    return previous


def restore(previous: dict[int, object]) -> None:
    """Put back the handlers :func:`install` replaced (main called in-process, e.g. tests)."""
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def reset() -> None:
    _state.received, _state.stopping, _state.deferring = None, False, 0


def consume() -> None:
    """The command handled the stop as its normal end (a server): no interruption exit."""
    reset()


def received() -> int | None:
    """The stop signal received so far (None: none)."""
    return _state.received


@contextmanager
def deferred() -> Iterator[None]:
    """Run the block to its end even if a stop signal arrives; raise Interrupted after it."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
    check()


def check() -> None:
    """Raise Interrupted if a stop signal arrived during a deferred block."""
    if _state.received is not None and not _state.stopping and not _state.deferring:
        _state.stopping = True
        raise Interrupted(_state.received)
