"""Mixed precision (aihwkit's MixedPrecisionCompound; Nandakumar et al., Front. Neurosci. 2020).

The update is accumulated digitally in a matrix chi at full precision (optionally from
inputs and errors quantized to a few levels, which keeps the digital outer product
sparse); every ``transfer_every`` steps, rows of chi are transferred to the single analog
tile W as whole pulses: n = trunc(chi / granularity) (granularity: W's dw_min unless
set), chi keeps the remainder chi - n granularity, and W gets n granularity
transfer_lr / dw_min pulses (exactly n with the defaults). Only W is analog; the forward
and backward passes read it alone.

The formulas follow aihwkit 1.2.0's rpu_mixedprec_device.cpp and
rpu_mixedprec_device_base.cpp; docs/aihwkit.md maps the parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hil.algorithms.base import MAX_COUNT, AnalogAlgorithm, UpdateMode
from hil.backend import Backend, check_finite
from hil.errors import NonFiniteError, SafetyLimitError


def _bins(value: int, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or not (value == 0 or value >= 2):
        raise ValueError(f"{name} must be 0 (no quantization) or an integer >= 2, "
                         f"got {value!r}")
    return int(value)


class MixedPrecision(AnalogAlgorithm):
    """chi <- chi - lr grad (digital, float32); every ``transfer_every`` steps the next
    ``n_rows_per_transfer`` rows of chi (all rows by default; cycling, or from a random
    row with ``random_row``) go to W as whole pulses (module docstring).

    With ``step(x=, d=)`` and ``n_x_bins`` / ``n_d_bins`` > 0, each sample's x (d) is
    quantized to the levels k w, |k| <= bins // 2, w = max|x| / (bins // 2), rounding to
    nearest, or stochastically (``stoc_round_x`` / ``stoc_round_d``), before the digital
    outer product; ``step(grad)`` accumulates the gradient as given.
    """

    roles = ("W",)

    def __init__(
        self,
        backend: Backend,
        shape: tuple[int, int],
        lr: float,
        transfer_lr: float = 1.0,
        *,
        prefix: str = "layer",
        seed: int = 0,
        update: UpdateMode = "auto",
        max_pulses: int | None = None,
        transfer_every: int = 1,
        granularity: float | None = None,
        n_rows_per_transfer: int | None = None,
        random_row: bool = False,
        n_x_bins: int = 0,
        n_d_bins: int = 0,
        stoc_round_x: bool = True,
        stoc_round_d: bool = True,
    ):
        if update == "outer":
            raise ValueError("mixed_precision accumulates the update digitally (chi): "
                             "update='outer' does not apply")
        check_finite(float(transfer_lr), "transfer rate transfer_lr", op="algorithm")
        if int(transfer_every) != transfer_every or int(transfer_every) < 1:
            raise ValueError(f"transfer_every must be an integer >= 1, got {transfer_every!r}")
        if granularity is not None and not 0.0 < float(granularity) < float("inf"):
            raise ValueError(f"granularity must be > 0, got {granularity!r}")
        if n_rows_per_transfer is not None and (int(n_rows_per_transfer) != n_rows_per_transfer
                                                or n_rows_per_transfer < 1):
            raise ValueError("n_rows_per_transfer must be an integer >= 1 (None: all rows), "
                             f"got {n_rows_per_transfer!r}")
        super().__init__(backend, shape, lr, prefix=prefix, seed=seed, update=update,
                         max_pulses=max_pulses)
        self.transfer_lr = float(transfer_lr)
        self.transfer_every = int(transfer_every)
        self.granularity = float(granularity) if granularity is not None \
            else float(self.tiles["W"].dw_min)
        self.n_rows_per_transfer = min(int(n_rows_per_transfer or self.shape[0]), self.shape[0])
        self.random_row = bool(random_row)
        self.n_x_bins = _bins(n_x_bins, "n_x_bins")
        self.n_d_bins = _bins(n_d_bins, "n_d_bins")
        self.stoc_round_x = bool(stoc_round_x)
        self.stoc_round_d = bool(stoc_round_d)
        self.chi = torch.zeros(self.shape, dtype=torch.float32)
        self.row = 0  # the next row of the cycling transfer

    def weight(self) -> torch.Tensor:
        return self.read("W")

    def _quantize(self, v: torch.Tensor, bins: int, stochastic: bool) -> torch.Tensor:
        """Each sample (row of v) on the levels k w, |k| <= bins // 2, w = max|v| / (bins // 2);
        rounding half away from zero, after uniform noise in [-1/2, 1/2) if ``stochastic``."""
        if not bins:
            return v
        half = bins // 2
        width = v.abs().amax(dim=1, keepdim=True) / half
        width = torch.where(width == 0, torch.ones_like(width), width)
        q = v / width
        if stochastic:
            q = q + (torch.rand(q.shape, generator=self.gen) - 0.5)
        q = torch.sign(q) * torch.floor(q.abs() + 0.5)
        return q.clamp(-half, half) * width

    def _apply(self, grad, x, d, lr: float) -> None:
        name = self.tiles["W"].name
        if grad is None:
            if x is None or d is None:
                raise ValueError("step needs grad, or x and d")
            check_finite(x, "layer input x", tile=name, op="step")
            check_finite(d, "output error d", tile=name, op="step")
            qx = self._quantize(x.detach().reshape(-1, self.shape[1]).to("cpu", torch.float32),
                                self.n_x_bins, self.stoc_round_x)
            qd = self._quantize(d.detach().reshape(-1, self.shape[0]).to("cpu", torch.float32),
                                self.n_d_bins, self.stoc_round_d)
            chi = torch.addmm(self.chi, qd.t(), qx, alpha=-lr)  # chi - lr d^T x, one pass
        else:
            grad = grad.detach().to("cpu", torch.float32).reshape(self.shape)
            chi = torch.add(self.chi, grad, alpha=-lr)
        # one read of the new chi checks it (finite, within a pulse command) before it is
        # kept: a refused step leaves chi as it was
        lo, hi = torch.aminmax(chi)
        peak = max(-float(lo), float(hi))  # NaN propagates through aminmax
        if not peak < MAX_COUNT * self.granularity:
            self._refuse(peak, qd.t() @ qx if grad is None else grad)
        self.chi = chi
        if (self.step_count + 1) % self.transfer_every == 0:
            self._transfer(peak)

    def _refuse(self, peak: float, grad: torch.Tensor) -> None:
        """Raise for an update that would leave chi non-finite or beyond any pulse command
        (the gradient named when it is the cause)."""
        name = self.tiles["W"].name
        check_finite(grad, "gradient", tile=name, op="step")
        if not math.isfinite(peak):
            raise NonFiniteError("digital accumulator chi would not be finite (the update "
                                 "overflows)", tile=name, op="step")
        raise SafetyLimitError(f"digital accumulator chi would reach {peak / self.granularity:.3g}"
                               " pulses, beyond any pulse command", tile=name, op="step")

    def _transfer(self, peak: float) -> None:
        """Move the next rows' whole granules of chi to W; ``peak``: max |chi| (below one
        granule nothing moves, and no pass over chi is made)."""
        rows, n = self.shape[0], self.n_rows_per_transfer
        first = self.row
        if self.random_row and n < rows:
            first = min(int(torch.rand(1, generator=self.gen, dtype=torch.float64) * rows),
                        rows - 1)
        self.row = (first + n) % rows
        if peak < self.granularity:
            return
        whole = n == rows  # every row, in whichever order: the same result
        idx = None if whole else (torch.arange(n) + first) % rows
        chi = self.chi if whole else self.chi[idx]
        # whole granules trunc(chi / granularity) (|chi| < 2^31 granules: checked in
        # _apply, so the int32 counts never wrap); chi keeps the remainder
        q = torch.div(chi, self.granularity).trunc_()
        if whole:
            self.chi.sub_(q, alpha=self.granularity)
        else:
            self.chi[idx] = chi.sub(q, alpha=self.granularity)
        ratio = self.granularity * self.transfer_lr / self.tiles["W"].dw_min
        want = q if whole else torch.zeros(self.shape).index_copy_(0, idx, q)
        if ratio == 1.0 and self.max_pulses is None:  # whole pulses already: no rounding
            self.pulse_counts(self.tiles["W"], want.to(torch.int32))  # none: nothing sent
        elif bool(q.any()):
            self.pulse_want(self.tiles["W"], want if ratio == 1.0 else want * ratio)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "chi": self.chi.clone(), "row": self.row,
                "transfer_lr": self.transfer_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.chi = state["chi"].to(torch.float32).clone()
        self.row = int(state["row"])
        self.transfer_lr = float(state["transfer_lr"])
