"""The tile of an instrument driver: its pulse counts go to the station interlock as given."""

from __future__ import annotations

import torch

from hil.backend import Tile


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
