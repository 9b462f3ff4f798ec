"""Zero-shifting: program each reference device to its partner's symmetric point, then check.

The pair (device tile, reference tile ``<tile>.ref``) is read differentially,
w_diff = w - w_ref. After write-verify of the reference to the calibrated symmetric
point, the alternating +1 / -1 search on the device tile must settle with w_diff = 0;
the settled w_diff is the residual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from calibration.calibfile import Calibration
from calibration.protocols import settled_value
from hil.backend import Backend, claim_tile
from hil.errors import ConfigError
from hil.program import program


@dataclass
class ZeroShiftResult:
    """Per tile: reference programming outcome and the differential symmetric-point residual."""

    tile: str
    converged: float  # fraction of reference devices within tolerance after write-verify
    residual: np.ndarray  # [rows, cols] settled w - w_ref (0 is perfect)
    range: np.ndarray  # [rows, cols] tau_max - tau_min

    @property
    def median_abs(self) -> float:
        return float(np.nanmedian(np.abs(self.residual)))

    @property
    def median_rel(self) -> float:
        """Median |residual| as a fraction of each device's range."""
        return float(np.nanmedian(np.abs(self.residual) / self.range))


def zero_shift(backend: Backend, cal: Calibration, pairs: int = 200,
               tol: float | None = None, ref_suffix: str = ".ref",
               advance: Callable[[int], None] | None = None) -> list[ZeroShiftResult]:
    """Zero-shift every calibrated tile of ``cal`` on ``backend`` and measure the residual."""
    out = []
    for name, tc in cal.tiles.items():
        rows, cols = tc.shape
        if not (tc.values["family_index"] >= 0).any():
            raise ConfigError(str(cal.path), f"tiles/{name}/family_index",
                              "no device of this tile has a fitted response: nothing to "
                              "zero-shift")
        tile = claim_tile(backend, name, (rows, cols))
        ref = claim_tile(backend, name + ref_suffix, (rows, cols))
        target = torch.as_tensor(np.nan_to_num(tc.values["symmetric_point"]),
                                 dtype=torch.float32)
        # a tolerance below half a step of the coarsest devices would never be met
        dw = np.nanquantile(tc.values["dw_min"], 0.9)
        res = program(ref, target, tol=float(tol if tol is not None else dw))
        if advance:
            advance(1)
        diffs = []
        ones = torch.ones(tile.shape, dtype=torch.int32)
        for k in range(2 * pairs):
            tile.pulse(ones if k % 2 == 0 else -ones)
            diffs.append((tile.read() - ref.read()).cpu().numpy())
            if advance and k % 50 == 49:
                advance(50)
        residual = settled_value(np.stack(diffs))
        rng = tc.values["tau_max"] - tc.values["tau_min"]
        out.append(ZeroShiftResult(tile=name, converged=res.fraction_converged,
                                   residual=residual, range=rng))
    return out
