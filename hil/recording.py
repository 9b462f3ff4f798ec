"""A recording wrapper of any backend: every pulse the contract sends, step by step.

:class:`RecordingBackend` delegates every operation to the backend it wraps and logs each
state-changing call made inside an algorithm step (``pulse``, ``pulse_columns``,
``outer_update``) with its arguments. ``on_step_start`` runs before the outermost
``step()`` begins; when it ends, the step's log goes to ``on_step`` (validation replays it
on a twin synced to the chip). Calls outside steps (programming the initial weights) are
not logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from hil.backend import Backend, Tile


@dataclass(frozen=True)
class PulseCall:
    """One logged call: ``op`` 'pulse' (args: counts), 'pulse_columns' (counts, first,
    width) or 'outer_update' (x, d, lr) on tile ``tile``."""

    tile: str
    op: str
    args: tuple

    def replay(self, tile: Tile) -> None:
        """Send the same call to ``tile`` (of another backend)."""
        if self.op == "pulse":
            tile.pulse(self.args[0])
        elif self.op == "pulse_columns":
            n, first, width = self.args
            tile.pulse_columns(n, slice(first, first + width))
        else:
            tile.outer_update(*self.args)


StepHook = Callable[[list[PulseCall]], None]


class RecordingTile(Tile):
    """A tile of a :class:`RecordingBackend`: the inner tile's operations, logged."""

    def __init__(self, backend: RecordingBackend, inner: Tile):
        super().__init__(backend, inner.name, *inner.shape, inner.dw_min)
        self.inner = inner

    def read(self) -> torch.Tensor:
        return self.inner.read()

    def read_columns(self, cols: slice) -> torch.Tensor:
        return self.inner.read_columns(cols)

    def _pulse(self, n: torch.Tensor) -> None:
        self.inner.pulse(n)
        self.backend._log(PulseCall(self.name, "pulse", (n.detach().cpu().clone(),)))

    def pulse(self, n: torch.Tensor) -> None:
        self._pulse(n)  # the inner tile validates (its own limits, its own device)

    def pulse_columns(self, n: torch.Tensor, cols: slice) -> None:
        first, width = self.column_range(cols)
        self.inner.pulse_columns(n, cols)
        self.backend._log(PulseCall(self.name, "pulse_columns",
                                    (n.detach().cpu().clone(), first, width)))

    def mvm(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        return self.inner.mvm(x, transpose)

    def outer_update(self, x: torch.Tensor, d: torch.Tensor, lr: float) -> None:
        self.inner.outer_update(x, d, lr)
        self.backend._log(PulseCall(self.name, "outer_update",
                                    (x.detach().cpu().clone(), d.detach().cpu().clone(),
                                     float(lr))))


class RecordingBackend(Backend):
    """Wraps ``inner``: same capabilities and tiles, every pulse call of a step logged."""

    def __init__(self, inner: Backend, on_step: StepHook | None = None,
                 on_step_start: Callable[[], None] | None = None):
        super().__init__(inner.url)
        self.inner = inner
        self.capabilities = inner.capabilities
        self.on_step = on_step
        self.on_step_start = on_step_start
        self._depth = 0
        self._calls: list[PulseCall] = []
        for name, tile in inner.tiles().items():
            self._tiles[name] = RecordingTile(self, tile)

    def _allocate(self, name: str, rows: int, cols: int) -> Tile:
        return RecordingTile(self, self.inner.allocate(name, rows, cols))

    def _log(self, call: PulseCall) -> None:
        if self._depth:
            self._calls.append(call)

    @contextmanager
    def step(self) -> Iterator[None]:
        if self._depth == 0 and self.on_step_start is not None:
            self.on_step_start()
        with self.inner.step():
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
        if self._depth == 0:
            calls, self._calls = self._calls, []
            if self.on_step is not None:
                self.on_step(calls)

    def mvm_sum(self, terms: Sequence[tuple[Tile, float]], x: torch.Tensor,
                transpose: bool = False) -> torch.Tensor:
        inner = [(t.inner if isinstance(t, RecordingTile) else t, c) for t, c in terms]
        return self.inner.mvm_sum(inner, x, transpose)

    def state_dict(self) -> dict[str, object]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.inner.load_state_dict(state)
        for name, tile in self.inner.tiles().items():
            self._tiles.setdefault(name, RecordingTile(self, tile))

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            super().close()
