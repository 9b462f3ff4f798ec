"""Chopped TTv2 (aihwkit's ChoppedTransferCompound) and AGAD (its DynamicTransferCompound).

Both keep TTv2's fast tile P, digital buffer H and threshold transfer to W (``_Buffered``),
and write the gradient onto P through sign choppers: column j's input and row i's output
carry signs c_j and c_i, so P accumulates c_i c_j (-lr grad). A transfer reads P's column
and takes the chopper signs back off before it enters H. Whatever P does that is not the
gradient (its drift to the symmetric point of an asymmetric device, an offset) enters H
with the chopper's sign, which flips from period to period, and averages out; the
gradient's own contribution keeps its sign. This is what removes the asymmetry bias of
plain TTv2 without a programmed reference (zero-shifting).

AGAD (Rasch et al., "Fast and robust analog in-memory deep neural network training",
2024) goes one step further: instead of P itself, H takes P's change against a reference
that the algorithm tracks on the fly from P's own reads (the mean of the reads in the
previous chopper period), so the offset of P never enters H at all, and the chopper
periods are regular.

The formulas follow aihwkit 1.2.0's rpu_chopped_transfer_device.cpp and
rpu_dynamic_transfer_device.cpp; docs/aihwkit.md maps the parameters.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hil.algorithms.residual import _Buffered
from hil.backend import Backend


def _probability(value: float, name: str) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return v


class ChoppedTTv2(_Buffered):
    """c-TTv2: TTv2 with sign-chopped gradient accumulation on P.

    P <- P - lr (c_out c_in^T) * grad (pulses on P; through outer_update as x * c_in and
    d * c_out); at a transfer of column j: H_j <- H_j + transfer_lr c_j c_out * read(P_j),
    then the threshold transfer (``_Buffered``) to W. After the transfer of column j its
    input chopper flips with probability ``in_chop_prob`` (``in_chop_random``), or all
    columns' choppers flip together once every max(ceil(1 / in_chop_prob), 2) full
    transfer cycles (regular); after the last column each output chopper flips with
    probability ``out_chop_prob``. The gradient is taken at W (gamma = 0). Defaults are
    aihwkit's: in_chop_prob 0.1 random, out_chop_prob 0, forget_buffer True (H is reset
    after it fires), one pulse per transfer.
    """

    decay = False
    forget_default = True
    threshold_role = "P"  # aihwkit: buffer_granularity x the fast (from) device's dw_min

    def __init__(self, backend: Backend, shape: tuple[int, int], lr: float,
                 transfer_lr: float, *, in_chop_prob: float = 0.1,
                 in_chop_random: bool = True, out_chop_prob: float = 0.0, **kw: Any):
        kw.pop("gamma", None)
        self.in_chop_prob = _probability(in_chop_prob, "in_chop_prob")
        self.out_chop_prob = _probability(out_chop_prob, "out_chop_prob")
        self.in_chop_random = bool(in_chop_random)
        super().__init__(backend, shape, lr, transfer_lr, 0.0, **kw)
        rows, cols = self.shape
        self.in_chopper = np.zeros(cols, dtype=bool)  # True: the sign is -1
        self.out_chopper = np.zeros(rows, dtype=bool)
        self.transfer_count = 0  # full transfer cycles (every column once) so far

    @property
    def period(self) -> int:
        """Transfers of a column between regular chopper flips: max(ceil(1 / p), 2)."""
        p = self.in_chop_prob
        return max(math.ceil(1.0 / p), 2) if p > 0 else 2

    # -- chopped gradient ------------------------------------------------------------
    def _signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_out [rows], c_in [cols]) as float32 +-1."""
        return (torch.from_numpy(1.0 - 2.0 * self.out_chopper.astype(np.float32)),
                torch.from_numpy(1.0 - 2.0 * self.in_chopper.astype(np.float32)))

    def _signed(self, grad, x, d):
        if not (self.in_chopper.any() or self.out_chopper.any()):
            return grad, x, d
        c_out, c_in = self._signs()
        if grad is not None:
            grad = grad.detach().to("cpu", torch.float32).reshape(self.shape) * \
                (c_out[:, None] * c_in[None, :])
        if x is not None and d is not None:
            x = x.detach() * c_in.to(x.device, x.dtype)
            d = d.detach() * c_out.to(d.device, d.dtype)
        return grad, x, d

    # -- transfer --------------------------------------------------------------------
    def _chop(self, cols: slice) -> np.ndarray:
        """c_in[j] c_out[i] for the columns ``cols``, as [cols, rows] float32 (H's layout)."""
        flip = self.in_chopper[cols][:, None] != self.out_chopper[None, :]
        return np.where(flip, np.float32(-1.0), np.float32(1.0))

    def _transfer(self, cols: slice, p: torch.Tensor | None = None) -> None:
        p = (self.transfer_p(cols) if p is None else p).numpy().T
        h = self._buffer(cols)
        self._threshold(h, h + self.transfer_lr * (self._chop(cols) * p), cols)
        self._flip_choppers(cols)

    def _span(self, cols: slice) -> tuple[int, int, bool]:
        first, stop, _ = cols.indices(self.shape[1])
        return first, stop, stop == self.shape[1]

    def _flip_choppers(self, cols: slice) -> None:
        first, stop, last = self._span(cols)
        if self.in_chop_prob > 0:
            if self.in_chop_random:
                u = torch.rand(stop - first, generator=self.gen, dtype=torch.float64).numpy()
                self.in_chopper[first:stop] ^= u < self.in_chop_prob
            elif self.transfer_count % self.period + 1 == self.period:
                self.in_chopper[first:stop] ^= True
        if last:
            if self.out_chop_prob > 0:
                u = torch.rand(self.shape[0], generator=self.gen, dtype=torch.float64).numpy()
                self.out_chopper ^= u < self.out_chop_prob
            self.transfer_count += 1

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "in_chopper": torch.from_numpy(self.in_chopper.copy()),
                "out_chopper": torch.from_numpy(self.out_chopper.copy()),
                "transfer_count": self.transfer_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.in_chopper = state["in_chopper"].numpy().astype(bool).copy()
        self.out_chopper = state["out_chopper"].numpy().astype(bool).copy()
        self.transfer_count = int(state["transfer_count"])


class AGAD(ChoppedTTv2):
    """AGAD: chopped TTv2 whose buffer takes P's change against a reference tracked on the
    fly, instead of P itself (aihwkit's DynamicTransferCompound).

    Per column j, with n = max(ceil(1 / in_chop_prob), 2) transfers a chopper period:
    a running mean m_j of the reads of P_j (m <- (1 - s) m + s read, s = min(
    tail_weightening / n, 1): the tail of a period weighs more); when column j's chopper
    has just flipped, the reference r_j takes m_j (the mean over the period that ended).
    Each transfer: H_j <- H_j + transfer_lr c_j c_out (read(P_j) - r_j), then the threshold
    transfer, whose pulses reach W only after the first n full transfer cycles (the
    reference is not yet formed before). Choppers flip regularly every n cycles
    (``in_chop_random`` False, aihwkit's default) and, if ``in_chop_random``, also at
    random with probability in_chop_prob; no output choppers.
    """

    def __init__(self, backend: Backend, shape: tuple[int, int], lr: float,
                 transfer_lr: float, *, in_chop_prob: float = 0.1,
                 in_chop_random: bool = False, tail_weightening: float = 5.0, **kw: Any):
        if not float(in_chop_prob) > 0:
            raise ValueError(f"agad needs in_chop_prob > 0 (its chopper period is "
                             f"1 / in_chop_prob), got {in_chop_prob!r}")
        if kw.get("out_chop_prob", 0.0):
            raise ValueError("agad has no output choppers (out_chop_prob must be 0)")
        if not 0.0 < float(tail_weightening) < float("inf"):
            raise ValueError(f"tail_weightening must be > 0, got {tail_weightening!r}")
        super().__init__(backend, shape, lr, transfer_lr, in_chop_prob=in_chop_prob,
                         in_chop_random=in_chop_random, **kw)
        self.tail_weightening = float(tail_weightening)
        # [cols, rows] like H: the running mean of P's reads and the reference
        self._mean_t = torch.zeros(self.shape[::-1], dtype=torch.float32)
        self._ref_t = torch.zeros(self.shape[::-1], dtype=torch.float32)
        self.switched = np.zeros(self.shape[1], dtype=bool)  # chopper flipped since read

    @property
    def reference(self) -> torch.Tensor:
        """The reference r [rows, cols] that P's reads are compared with."""
        return self._ref_t.t()

    def _transfer(self, cols: slice, p: torch.Tensor | None = None) -> None:
        first, stop, last = self._span(cols)
        n = self.period
        sample = self.transfer_count % n + 1  # this cycle's place in the period
        s = np.float32(min(self.tail_weightening / n, 1.0))
        val = (self.transfer_p(cols) if p is None else p).numpy().T
        mean, ref = self._mean_t.numpy()[cols], self._ref_t.numpy()[cols]
        fresh = self.switched[first:stop]
        if fresh.any():  # a new chopper period: the last one's mean is the reference
            ref[fresh] = mean[fresh]
        self.switched[first:stop] = False
        h = self._buffer(cols)
        self._threshold(h, h + self.transfer_lr * (self._chop(cols) * (val - ref)), cols,
                        write=self.transfer_count > n)
        mean[...] = mean * (np.float32(1.0) - s) + val * s
        flip = np.full(stop - first, sample == n)
        if self.in_chop_random:
            u = torch.rand(stop - first, generator=self.gen, dtype=torch.float64).numpy()
            flip |= u < self.in_chop_prob
        self.in_chopper[first:stop] ^= flip
        self.switched[first:stop] = flip
        if last:
            self.transfer_count += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "running_mean": self._mean_t.t().contiguous(),
                "reference": self._ref_t.t().contiguous(),
                "switched": torch.from_numpy(self.switched.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._mean_t = state["running_mean"].to(torch.float32).t().contiguous()
        self._ref_t = state["reference"].to(torch.float32).t().contiguous()
        self.switched = state["switched"].numpy().astype(bool).copy()
