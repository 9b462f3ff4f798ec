"""Residual Learning (Tiki-Taka at gamma = 0), Residual Learning v2 and TTv2 (PAPER.md).

All three keep a fast tile P that takes the gradient and a slow tile W that receives
P through a transfer. The forward pass uses W_bar = W + gamma * P.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import torch

from hil.algorithms.base import AnalogAlgorithm, TransferSchedule, UpdateMode
from hil.backend import Backend, Tile, check_finite, claim_tile
from hil.program import program


def _one_hot(cols: slice, n: int) -> torch.Tensor:
    """One input vector per selected column (of n): row k is 1 at column first + k."""
    first, stop, _ = cols.indices(n)
    x = torch.zeros(stop - first, n)
    x[:, first:stop] = torch.eye(stop - first)
    return x


class _TwoTile(AnalogAlgorithm):
    """W and P tiles, the transfer schedule and optional zero-shifting of P.

    Transfer schedule: every ``transfer_every`` steps either the full array
    (``transfer='full'``) or one column, cycling through the columns
    (``transfer='column'``, Tiki-Taka's usual schedule), or ``columns_per_transfer``
    columns one after the other.

    ``transfer_unit``: what ``transfer_every`` counts. 'step' (default): steps; the whole
    batch's update of P comes first, then the transfer. 'sample': samples (the rows of
    ``step(x=, d=)``'s x and d, counted across steps; aihwkit's ``units_in_mbatch=False``):
    the batch's update of P is split into one outer update per sample, and after every
    ``transfer_every``-th sample's update the transfer follows before the next sample's,
    so a transfer reads P part-way through the batch and what it changes (a chopper's
    sign) applies to the rest of the batch. With ``transfer='column'`` and
    ``transfer_every=1`` that is aihwkit's default for its chopped compounds: one column
    after each sample. Needs x and d (``step(grad)`` is refused: a summed gradient cannot
    be split).

    Zero-shifting (``zero_shift=True``): P is driven to its own symmetric point by
    alternating up/down pulses, a reference tile ``{prefix}.P_ref`` is write-verified
    to the P values read there, and P is read as P - P_ref from then on, so the
    symmetric point of the P that the algorithm sees is 0 (G(0) = 0, PAPER.md).

    ``transfer_read``: how a transfer reads P. 'exact' (default, the paper's form): the
    tile's read (its read noise only); 'mvm': one analog MVM per column with a one-hot
    input, through the backend's periphery (DAC, ADC, output noise), as aihwkit's
    transfer_forward does.

    ``mvm_read``: how the forward and backward MVMs read W_bar = W + gamma P. 'tiles'
    (default): each tile through its own periphery, the outputs added digitally;
    'summed': the weighted sum read as one array (``backend.mvm_sum``: one output noise,
    one ADC), as aihwkit's compound devices read their unit cell.
    """

    roles = ("W", "P")

    def __init__(
        self,
        backend: Backend,
        shape: tuple[int, int],
        lr: float,
        transfer_lr: float,
        gamma: float = 0.0,
        *,
        prefix: str = "layer",
        seed: int = 0,
        update: UpdateMode = "auto",
        max_pulses: int | None = None,
        transfer_every: int = 1,
        transfer: TransferSchedule = "full",
        columns_per_transfer: int = 1,
        zero_shift: bool = False,
        zero_shift_cycles: int = 1000,
        transfer_read: str = "exact",
        mvm_read: str = "tiles",
        transfer_unit: str = "step",
    ):
        if transfer_unit not in ("step", "sample"):
            raise ValueError(f"transfer_unit must be 'step' or 'sample', got {transfer_unit!r}")
        if mvm_read not in ("tiles", "summed"):
            raise ValueError(f"mvm_read must be 'tiles' or 'summed', got {mvm_read!r}")
        if mvm_read == "summed" and not backend.capabilities.mvm_sum:
            raise ValueError("mvm_read='summed' but the backend declares no mvm_sum")
        if transfer_read not in ("exact", "mvm"):
            raise ValueError(f"transfer_read must be 'exact' or 'mvm', got {transfer_read!r}")
        if transfer_read == "mvm" and not backend.capabilities.mvm:
            raise ValueError("transfer_read='mvm' but the backend declares no mvm")
        if transfer not in ("full", "column"):
            raise ValueError(f"transfer must be 'full' or 'column', got {transfer!r}")
        if int(transfer_every) < 1:
            raise ValueError("transfer_every must be >= 1")
        if isinstance(columns_per_transfer, bool) or \
                int(columns_per_transfer) != columns_per_transfer or columns_per_transfer < 1:
            raise ValueError(f"columns_per_transfer must be an integer >= 1, "
                             f"got {columns_per_transfer!r}")
        if columns_per_transfer != 1 and transfer != "column":
            raise ValueError("columns_per_transfer applies to transfer='column'")
        check_finite(float(transfer_lr), "transfer rate transfer_lr", op="algorithm")
        check_finite(float(gamma), "mixing gamma", op="algorithm")
        super().__init__(backend, shape, lr, prefix=prefix, seed=seed, update=update,
                         max_pulses=max_pulses)
        self.transfer_lr = float(transfer_lr)
        self.gamma = float(gamma)
        self.transfer_every = int(transfer_every)
        self.transfer = transfer
        self.columns_per_transfer = int(columns_per_transfer)
        self.transfer_read = transfer_read
        self.mvm_read = mvm_read
        self.transfer_unit = transfer_unit
        self.column = 0  # next column of the 'column' schedule
        self.sample_count = 0  # samples updated so far (transfer_unit='sample')
        self.zero_shift = bool(zero_shift)
        if self.zero_shift:
            self.tiles["P_ref"] = claim_tile(backend, f"{prefix}.P_ref", self.shape,
                                             exclusive=True)
            if zero_shift_cycles:  # 0: the tiles are set up already (a resumed run)
                self._setup_zero_shift(int(zero_shift_cycles))

    def _setup_zero_shift(self, cycles: int) -> None:
        p, ref = self.tiles["P"], self.tiles["P_ref"]
        up = torch.ones(self.shape, dtype=torch.int32)
        for _ in range(cycles):  # alternating pulses settle each device at its symmetric point
            p.pulse(up)
            p.pulse(-up)
        program(ref, p.read().detach().to("cpu", torch.float32))

    def read_p(self, cols: slice | None = None) -> torch.Tensor:
        """P (or its columns ``cols``) as the algorithm sees it (minus the reference tile
        when zero-shifting)."""
        p = self.read("P", cols)
        return p - self.read("P_ref", cols) if self.zero_shift else p

    def transfer_p(self, cols: slice) -> torch.Tensor:
        """The columns ``cols`` of P as a transfer reads them (see ``transfer_read``)."""
        if self.transfer_read == "exact":
            return self.read_p(cols)
        x = _one_hot(cols, self.shape[1])
        terms = [(self.tiles["P"], 1.0)] + ([(self.tiles["P_ref"], -1.0)]
                                            if self.zero_shift else [])
        out = sum(c * t.mvm(x).detach().to("cpu", torch.float32) for t, c in terms)
        return out.t().contiguous()

    def weight(self) -> torch.Tensor:
        w = self.read("W")
        return w + self.gamma * self.read_p() if self.gamma else w

    def mvm_terms(self) -> list[tuple[Tile, float]]:
        terms = [(self.tiles["W"], 1.0)]
        if self.gamma:
            terms.append((self.tiles["P"], self.gamma))
            if self.zero_shift:
                terms.append((self.tiles["P_ref"], -self.gamma))
        return terms

    def _columns(self) -> slice:
        if self.transfer == "full":
            return slice(None)
        j = self.column
        self.column = (j + 1) % self.shape[1]
        return slice(j, j + 1)

    def _apply(self, grad, x, d, lr: float) -> None:
        if self.transfer_unit == "sample":
            self._apply_samples(x, d, lr)
            return
        self._update_and_transfer(grad, x, d, lr,
                                  (self.step_count + 1) % self.transfer_every == 0)

    def _update_and_transfer(self, grad, x, d, lr: float, transfer: bool) -> None:
        """P's update from (grad or x, d), then, if ``transfer``, the transfer."""
        grad, x, d = self._signed(grad, x, d)
        if transfer and self._fused(x, d):
            self._transfer(slice(None), self._update_read_p(grad, x, d, lr))
            return
        self.gradient_update(self.tiles["P"], lr, grad, x, d)
        if transfer:
            for _ in range(self.columns_per_transfer if self.transfer == "column" else 1):
                self._transfer(self._columns())

    def _apply_samples(self, x, d, lr: float) -> None:
        """``transfer_unit='sample'``: one update of P per sample, each followed by the
        transfer when transfer_every samples are complete (see class)."""
        if x is None or d is None:
            raise ValueError("transfer_unit='sample' needs step(x=, d=) (a summed gradient "
                             "cannot be split into samples)")
        rows, cols = self.shape
        xs, ds = x.detach().reshape(-1, cols), d.detach().reshape(-1, rows)
        if xs.shape[0] != ds.shape[0]:
            raise ValueError(f"x holds {xs.shape[0]} samples but d holds {ds.shape[0]}")
        # the whole step is checked before its first pulse, not sample by sample
        check_finite(xs, "layer input x", tile=self.tiles["P"].name, op="step")
        check_finite(ds, "output error d", tile=self.tiles["P"].name, op="step")
        for k in range(xs.shape[0]):
            self.sample_count += 1
            self._update_and_transfer(None, xs[k:k + 1], ds[k:k + 1], lr,
                                      self.sample_count % self.transfer_every == 0)

    def _signed(self, grad, x, d):
        """(grad, x, d) as P takes them (the chopped variants flip signs here)."""
        return grad, x, d

    def _fused(self, x: torch.Tensor | None, d: torch.Tensor | None) -> bool:
        """Whether this step's gradient pulses on P and the transfer's read of P can be one
        ``pulse_read`` (a full transfer reading P exactly, no reference tile, pulse counts):
        on an instrument station each device of P is then routed once for both."""
        return (self.transfer == "full" and self.transfer_read == "exact"
                and not self.zero_shift and not self.use_outer(x, d))

    def _update_read_p(self, grad, x, d, lr: float) -> torch.Tensor:
        """Pulse -lr * grad onto P, then read P: one ``pulse_read`` where the counts fit one
        command (the same counts, the same device state as pulse then read)."""
        p = self.tiles["P"]
        n = self.count_map(p, -lr * self.gradient(p, grad, x, d))
        if self.fits_one_command(n):
            return p.pulse_read([n])[0].detach().to("cpu", torch.float32)
        self.pulse_counts(p, n)
        return self.read_p()

    @abstractmethod
    def _transfer(self, cols: slice, p: torch.Tensor | None = None) -> None:
        """Move the columns ``cols`` of P into W (the variant's transfer rule); ``p``: those
        columns of P as read already (else the transfer reads them)."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "transfer_lr": self.transfer_lr, "column": self.column,
                "sample_count": self.sample_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.transfer_lr = float(state["transfer_lr"])
        self.column = int(state["column"])
        self.sample_count = int(state.get("sample_count", 0))  # older checkpoints: none


class ResidualLearning(_TwoTile):
    """P <- P - lr grad(W_bar) (pulses on P); W <- W + transfer_lr * P (pulses on W).

    gamma = 0 is Tiki-Taka. Both updates go through the device responses, as in
    PAPER.md: P' = P - a g F(P) - a|g| G(P), W' = W + b P' F(W) - b|P'| G(W).

    ``transfer_write``: 'counts' (default) writes transfer_lr * P / dw_min as
    stochastically rounded pulse counts; 'pulse_train' writes it with the backend's
    outer_update, one one-hot column input per transferred column (aihwkit's
    TransferCompound: coincidence counts of two pulse trains, at most train_length each).
    """

    def __init__(self, *args: Any, transfer_write: str = "counts", **kw: Any):
        if transfer_write not in ("counts", "pulse_train"):
            raise ValueError(f"transfer_write must be 'counts' or 'pulse_train', "
                             f"got {transfer_write!r}")
        super().__init__(*args, **kw)
        if transfer_write == "pulse_train" and not self.backend.capabilities.outer_update:
            raise ValueError("transfer_write='pulse_train' but the backend declares no "
                             "outer_update")
        self.transfer_write = transfer_write

    def _transfer(self, cols: slice, p: torch.Tensor | None = None) -> None:
        p = self.transfer_p(cols) if p is None else p
        if self.transfer_write == "counts":
            self.pulse_delta(self.tiles["W"], self.transfer_lr * p, cols=cols)
            return
        self.tiles["W"].outer_update(_one_hot(cols, self.shape[1]), p.t().contiguous(),
                                     self.transfer_lr)


class TikiTaka(ResidualLearning):
    """Residual Learning with gamma = 0 (the forward pass uses W alone)."""

    def __init__(self, backend: Backend, shape: tuple[int, int], lr: float,
                 transfer_lr: float, **kw: Any):
        kw.pop("gamma", None)
        super().__init__(backend, shape, lr, transfer_lr, 0.0, **kw)


class _Buffered(_TwoTile):
    """A digital buffer H between P and W with the threshold transfer of PAPER.md:
    where |H| >= dw_min, one pulse of sign(H) on W and H gives back sign(H) dw_min.

    The threshold transfer has aihwkit's knobs (its BufferedTransferCompound and the
    chopped compounds; docs/aihwkit.md): the threshold is ``buffer_granularity`` x the
    dw_min of the tile ``threshold_role`` names (W here, as aihwkit's
    BufferedTransferCompound's thres_scale; P for the chopped variants, as aihwkit's
    buffer_granularity); where it is crossed, n = trunc(H / threshold) pulses, at most ``max_steps``
    a device, go to W; then H gives back (1 - momentum) n threshold (``forget_buffer``
    False), or H is reset to momentum x H (``forget_buffer`` True); ``buffer_cap`` (> 0,
    with ``forget_buffer`` False) bounds |H| to buffer_cap x max_steps thresholds.
    The defaults are the paper's transfer (one pulse, H gives back what it sent)."""

    decay: bool = True
    forget_default: bool = False  # the variant's default of ``forget_buffer``
    threshold_role: str = "W"  # whose dw_min the threshold counts in

    def __init__(self, *args: Any, buffer_granularity: float = 1.0, max_steps: int = 1,
                 forget_buffer: bool | None = None, momentum: float = 0.0,
                 buffer_cap: float = 0.0, **kw: Any):
        check_finite(float(buffer_granularity), "buffer_granularity", op="algorithm")
        if not float(buffer_granularity) > 0:
            raise ValueError(f"buffer_granularity must be > 0, got {buffer_granularity!r}")
        if isinstance(max_steps, bool) or int(max_steps) != max_steps or max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
        if not 0.0 <= float(buffer_cap) < float("inf"):
            raise ValueError(f"buffer_cap must be >= 0 (0: no cap), got {buffer_cap!r}")
        super().__init__(*args, **kw)
        self.buffer_granularity = float(buffer_granularity)
        self.max_steps = int(max_steps)
        self.forget_buffer = self.forget_default if forget_buffer is None else bool(forget_buffer)
        self.momentum = float(momentum)
        self.buffer_cap = float(buffer_cap)
        # H^T [cols, rows]: a column transfer reads and writes one contiguous row of it
        self._h_t = torch.zeros(self.shape[::-1], dtype=torch.float32)

    @property
    def H(self) -> torch.Tensor:
        """The buffer H [rows, cols] (a view of the stored transpose)."""
        return self._h_t.t()

    def _buffer(self, cols: slice) -> np.ndarray:
        """The columns ``cols`` of H as a writable numpy view of H^T ([cols, rows])."""
        return self._h_t.numpy()[cols]

    def _transfer(self, cols: slice, p: torch.Tensor | None = None) -> None:
        # numpy views of the float32 CPU tensors: the same float32 arithmetic as torch's
        # at a fraction of the per-op cost on one column
        p = (self.transfer_p(cols) if p is None else p).numpy().T
        b = self.transfer_lr
        h = self._buffer(cols)
        self._threshold(h, (1 - b) * h + b * p if self.decay else h + b * p, cols)

    def _threshold(self, h: np.ndarray, h_new: np.ndarray, cols: slice,
                   write: bool = True) -> None:
        """The threshold transfer: H's columns ``cols`` (the view ``h``, [cols, rows]) take
        ``h_new`` less what fires; what fires goes to W as pulses (unless ``write`` is
        False: then H still gives it back, as aihwkit's AGAD does before its first
        chopper periods are complete)."""
        thr = self.buffer_granularity * self.tiles[self.threshold_role].dw_min
        fire = np.abs(h_new) >= thr
        if self.max_steps == 1:
            n = np.where(fire, np.sign(h_new), np.float32(0.0))
        else:
            n = np.where(fire, np.clip(np.trunc(h_new / thr), -self.max_steps,
                                       self.max_steps), np.float32(0.0)).astype(np.float32)
        if self.forget_buffer:
            h[...] = np.where(fire, h_new * np.float32(self.momentum), h_new)
        else:
            left = h_new - n * thr if self.momentum == 0.0 else \
                h_new - (1.0 - self.momentum) * n * thr
            if self.buffer_cap:
                cap = self.buffer_cap * self.max_steps * thr
                left = np.clip(left, -cap, cap)
            h[...] = left
        if write and n.any():  # at most max_steps pulses a device
            counts = torch.from_numpy(np.ascontiguousarray(n.T, dtype=np.int32))
            self.pulse_counts(self.tiles["W"], counts, cols)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "H": self.H.clone(memory_format=torch.contiguous_format)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._h_t = state["H"].to(torch.float32).t().clone(memory_format=torch.contiguous_format)


class ResidualLearningV2(_Buffered):
    """H <- (1 - b) H + b (P + eps) (eps: the read noise of P), threshold transfer to W;
    the gradient is taken at W_bar = W + gamma P."""

    decay = True


class TTv2(_Buffered):
    """Baseline TTv2: H <- H + b (P + eps) without decay, gradient taken at W."""

    decay = False

    def __init__(self, backend: Backend, shape: tuple[int, int], lr: float,
                 transfer_lr: float, **kw: Any):
        kw.pop("gamma", None)
        super().__init__(backend, shape, lr, transfer_lr, 0.0, **kw)
