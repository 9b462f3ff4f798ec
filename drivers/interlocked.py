"""What every instrument driver shares: a tile whose pulse counts go to the station
interlock as given, and a backend whose close() makes the outputs safe before it lets go."""

from __future__ import annotations

from abc import abstractmethod

import torch

from hil.backend import Backend, Tile


class InterlockedTile(Tile):
    """A driver's tile: ``pulse(n)`` hands integer counts of the tile's shape straight to
    ``_pulse``, which has the interlock admit them (per command and against what the step
    may still apply to each device) before anything is sent; anything else gets the
    contract's one-line error."""

    def pulse(self, n: torch.Tensor) -> None:
        if not isinstance(n, torch.Tensor) or n.dtype.is_floating_point or n.dtype.is_complex \
                or n.dtype == torch.bool or tuple(n.shape) != self.shape:
            self.check_pulses(n)  # the type or shape error
        self._pulse(n)


class InstrumentBackend(Backend):
    """A driver's backend: ``close()`` makes the outputs safe (confirmed), then releases the
    instrument, whatever the first step raised; safe to call twice."""

    @abstractmethod
    def make_safe(self) -> None:
        """Switch the outputs off / ground them and confirm it (best effort)."""

    @abstractmethod
    def _release(self) -> None:
        """Let go of the instrument (sessions, connections), after make_safe."""

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.make_safe()
        finally:
            self.closed = True
            self._release()
