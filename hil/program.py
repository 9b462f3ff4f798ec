"""Closed-loop write-verify programming built only on Tile.read and Tile.pulse."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hil.backend import Tile, check_finite


@dataclass
class ProgramResult:
    """Outcome of write-verify: which devices reached the target and the final error."""

    converged: torch.Tensor  # bool [rows, cols]
    error: torch.Tensor  # float [rows, cols], read - target after the last read
    iterations: int
    pulses: int  # total pulses applied over all devices

    @property
    def fraction_converged(self) -> float:
        return float(self.converged.float().mean())


def program(
    tile: Tile,
    target: torch.Tensor | float,
    tol: float | None = None,
    max_iter: int | None = None,
    max_pulses: int = 64,
    mask: torch.Tensor | None = None,
) -> ProgramResult:
    """Drive every device (or those in ``mask``) to ``target`` within ``tol`` by read-pulse-read.

    Each round reads the tile, converts the remaining error into pulse counts with
    a per-device estimate of the step size (learned from the previous round, so
    devices whose response is smaller or larger than nominal are not under- or
    over-driven), and pulses only the devices still outside ``tol``. ``max_iter``
    None: 100 rounds plus twice the rounds of ``max_pulses`` nominal steps the largest
    distance needs (a fixed cap stops short when the distance is many dw_min).
    Each round is one ``backend.step()`` and one command of at most ``max_pulses`` per
    device (lowered to the backend's per-command limit and per-step budget). A non-finite
    target or tolerance is refused (NonFiniteError) before anything is sent.
    """
    tol = tile.dw_min if tol is None else float(tol)
    check_finite(tol, "programming tolerance", tile=tile.name, op="program")
    check_finite(torch.as_tensor(target, dtype=torch.float64), "programming target",
                 tile=tile.name, op="program")
    caps = tile.backend.capabilities
    max_pulses = int(min(max_pulses, caps.max_pulses_per_command,
                         caps.max_pulses_per_step or max_pulses))
    w = tile.read()
    target_t = torch.as_tensor(target, dtype=w.dtype, device=w.device).expand_as(w)
    active_mask = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.to(w.device)
    if max_iter is None:
        far = float(((target_t - w).abs() * active_mask).max()) if w.numel() else 0.0
        max_iter = 100 + 2 * math.ceil(far / (tile.dw_min * max_pulses))
    step = torch.full_like(w, tile.dw_min)  # per-device step estimate (weight per pulse)
    total = 0
    it = 0
    for it in range(1, max_iter + 1):
        err = target_t - w
        todo = active_mask & (err.abs() > tol)
        if not bool(todo.any()):
            it -= 1
            break
        n = torch.round(err / step).clamp(-max_pulses, max_pulses)
        # at least one pulse toward the target for every device outside the tolerance
        n = torch.where(todo & (n == 0), torch.sign(err), n)
        n = torch.where(todo, n, torch.zeros_like(n)).to(torch.int32)
        with tile.backend.step():
            tile.pulse(n)
        total += int(n.abs().sum())
        w_new = tile.read()
        nf = n.to(w.dtype)
        moved = (w_new - w) / torch.where(n != 0, nf, torch.ones_like(nf))
        ok = (n != 0) & (moved > 0.05 * tile.dw_min)
        # damped per-device update of the step estimate; keeps it in a sane range
        step = torch.where(ok, 0.5 * step + 0.5 * moved, step)
        step = step.clamp(0.05 * tile.dw_min, 20 * tile.dw_min)
        w = w_new
    err = w - target_t
    converged = (err.abs() <= tol) | ~active_mask
    return ProgramResult(converged=converged, error=err, iterations=it, pulses=total)
