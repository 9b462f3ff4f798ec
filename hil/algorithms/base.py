"""Shared machinery of the analog training algorithms: tiles, pulse rounding, schedules, state.

An algorithm owns named tiles on one backend and turns desired weight changes into
integer pulses. Its randomness (stochastic rounding) comes from its own seeded CPU
generator, so the same run is bit-identical on any backend that returns the same reads.

Safety: each ``step`` is one ``Backend.step()``, the unit of the station's per-step pulse
budget (``capabilities.max_pulses_per_step``). Gradients, layer inputs and errors and the
rates must be finite (NonFiniteError, nothing sent). A step that would apply more pulses
to a device than the budget is refused before its first command (SafetyLimitError),
unless the algorithm clips by design: with ``max_pulses`` every device's count is clipped
to +-max_pulses (which must lie within the budget), and the pulses clipped away are
counted in ``clipped_pulses`` (the ``clipped_pulses`` column of a run's run.h5).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from hil.backend import Backend, Tile, check_finite, claim_tile
from hil.errors import NonFiniteError, SafetyLimitError
from hil.program import program

MAX_COUNT = 2**31 - 1  # the largest pulse count any backend takes in one command

UpdateMode = Literal["auto", "outer", "pulse"]
TransferSchedule = Literal["full", "column"]
MvmRead = Literal["tiles", "summed"]


def stochastic_round(x: torch.Tensor, gen: torch.Generator, what: str = "pulse count",
                     tile: str | None = None) -> torch.Tensor:
    """Round to floor(x) or floor(x) + 1 with probability frac(x): unbiased, int32.

    The arithmetic runs in numpy on the CPU (exact in float64, like torch's, at a
    fraction of the per-call cost for a transfer's single column); the draws come from
    ``gen``. A NaN or inf is refused (NonFiniteError), and so is a count no backend could
    take in one command (|x| >= 2^31: SafetyLimitError), never wrapped to int32."""
    xs = x.detach().to("cpu", torch.float64).numpy()
    if xs.size:
        peak = float(np.abs(xs).max())  # NaN propagates
        if not peak < MAX_COUNT:
            if not np.isfinite(xs).all():
                raise NonFiniteError(f"{what} is not finite (NaN or inf)", tile=tile,
                                     op="step")
            raise SafetyLimitError(f"{what} of {peak:.3g} pulses is beyond any pulse "
                                   "command", tile=tile, op="step")
    u = torch.rand(xs.shape, generator=gen, dtype=torch.float64).numpy()
    lo = np.floor(xs)
    return torch.from_numpy((lo + (u < xs - lo)).astype(np.int32))


def _whole(cols: slice | None) -> bool:
    """Whether a column selection means the whole tile (None or ``slice(None)``)."""
    return cols is None or cols == slice(None)


class AnalogAlgorithm(ABC):
    """Base class: tiles named ``{prefix}.{role}``, pulse helpers, an update path, state.

    Subclasses set ``roles`` (the tiles they allocate) and implement ``weight`` and
    ``_apply``. ``step(grad)`` takes the gradient of the loss at ``weight()``; with
    ``x`` and ``d`` (layer input and output gradient) and a backend that declares
    ``outer_update``, the gradient tile is updated by the backend's stochastic
    pulse-train rank-1 update instead of pulse counts from the dense gradient.
    """

    roles: ClassVar[tuple[str, ...]] = ("W",)
    gamma: float = 0.0
    mvm_read: MvmRead = "tiles"  # how mvm() reads several terms (see _TwoTile)

    def __init__(
        self,
        backend: Backend,
        shape: tuple[int, int],
        lr: float,
        *,
        prefix: str = "layer",
        seed: int = 0,
        update: UpdateMode = "auto",
        max_pulses: int | None = None,
    ):
        if update not in ("auto", "outer", "pulse"):
            raise ValueError(f"update must be 'auto', 'outer' or 'pulse', got {update!r}")
        if update == "outer" and not backend.capabilities.outer_update:
            raise ValueError("update='outer' but the backend declares no outer_update")
        check_finite(float(lr), "learning rate lr", op="algorithm")
        budget = backend.capabilities.max_pulses_per_step
        if max_pulses is not None:
            if int(max_pulses) != max_pulses or not 1 <= max_pulses <= MAX_COUNT:
                raise ValueError(f"max_pulses must be an integer in [1, {MAX_COUNT}], "
                                 f"got {max_pulses!r}")
            if budget is not None and max_pulses > budget:
                raise ValueError(f"max_pulses={max_pulses} exceeds the station's "
                                 f"max_pulses_per_step={budget}")
        self.backend = backend
        self.shape = (int(shape[0]), int(shape[1]))
        self.lr = float(lr)
        self.prefix = prefix
        self.update = update
        self.max_pulses = None if max_pulses is None else int(max_pulses)
        self.clipped_pulses = 0  # pulses dropped by the max_pulses clip, over the run
        self.step_count = 0
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(int(seed))
        self.tiles: dict[str, Tile] = {
            role: claim_tile(backend, f"{prefix}.{role}", self.shape, exclusive=True)
            for role in self.roles
        }

    # -- reading ---------------------------------------------------------------------
    def read(self, role: str, cols: slice | None = None) -> torch.Tensor:
        """The weights of one tile (role), or of its columns ``cols``, as float32 on the CPU."""
        tile = self.tiles[role]
        w = tile.read() if _whole(cols) else tile.read_columns(cols)
        return w.detach().to("cpu", torch.float32)

    @abstractmethod
    def weight(self) -> torch.Tensor:
        """The weight the forward pass uses, read from the backend."""

    def mvm_terms(self) -> list[tuple[Tile, float]]:
        """(tile, coefficient) pairs whose weighted sum is ``weight()`` (for analog MVM)."""
        return [(self.tiles["W"], 1.0)]

    def mvm(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Analog MVM with ``weight()``: each term's tile through its own periphery, the
        outputs added digitally ('tiles'), or the weighted sum read as one array
        (``mvm_read='summed'``, ``backend.mvm_sum``)."""
        terms = self.mvm_terms()
        if len(terms) > 1 and self.mvm_read == "summed":
            return self.backend.mvm_sum(terms, v, transpose)
        out = None
        for tile, coeff in terms:
            y = tile.mvm(v, transpose=transpose)
            y = y if coeff == 1.0 else coeff * y
            out = y if out is None else out + y
        return out

    # -- writing ---------------------------------------------------------------------
    def pulse_delta(self, tile: Tile, delta: torch.Tensor, cols: slice | None = None
                    ) -> torch.Tensor:
        """Apply a desired change as stochastically rounded pulse counts; return the counts.
        With ``cols``, ``delta`` holds those columns only (the others get no pulse).
        With ``max_pulses`` the desired counts are clipped to +-max_pulses first and the
        clipped part is added to ``clipped_pulses``."""
        n = self.count_map(tile, delta)
        self.pulse_counts(tile, n, cols)
        return n

    def count_map(self, tile: Tile, delta: torch.Tensor) -> torch.Tensor:
        """The stochastically rounded pulse counts of a desired change (clipped to
        ``max_pulses``, see :meth:`pulse_delta`); nothing is sent."""
        want = delta / tile.dw_min
        if self.max_pulses is not None:
            check_finite(want, "desired change", tile=tile.name, op="step")
            excess = float((want.abs() - self.max_pulses).clamp_min(0).sum())
            if excess:
                self.clipped_pulses += round(excess)
                want = want.clamp(-self.max_pulses, self.max_pulses)
        return stochastic_round(want, self.gen, "pulse count", tile.name)

    def pulse_counts(self, tile: Tile, n: torch.Tensor, cols: slice | None = None) -> None:
        """Apply signed pulse counts (of the columns ``cols`` only, if given), split into
        commands within the backend's limit; counts beyond the per-step budget are refused
        before the first command (SafetyLimitError)."""
        def send(part: torch.Tensor) -> None:
            if _whole(cols):
                tile.pulse(part)
            else:
                tile.pulse_columns(part, cols)

        caps = self.backend.capabilities
        limit, budget = caps.max_pulses_per_command, caps.max_pulses_per_step
        if n.dtype == torch.int32 and limit >= MAX_COUNT and budget is None:
            send(n)  # no split, no budget: the tile's check only
            return
        lo, hi = (int(v) for v in torch.aminmax(n))
        if lo == 0 and hi == 0:
            return
        if budget is not None and max(-lo, hi) > budget:
            raise SafetyLimitError(f"a step of {max(-lo, hi)} pulses on one device exceeds "
                                   f"the station's max_pulses_per_step={budget} (set "
                                   "max_pulses to clip instead)", tile=tile.name, op="step")
        if -lo <= limit and hi <= limit:  # the usual case: one command, no copy
            send(n if n.dtype == torch.int32 else n.to(torch.int32))
            return
        rest = n.to(torch.int64)
        while bool(rest.any()):
            part = rest.clamp(-limit, limit)
            send(part.to(torch.int32))
            rest = rest - part

    def fits_one_command(self, n: torch.Tensor) -> bool:
        """Whether the counts ``n`` go out as one command within the backend's per-command
        limit and per-step budget (what :meth:`pulse_counts` would send unsplit)."""
        caps = self.backend.capabilities
        most = int(n.abs().max()) if n.numel() else 0
        return most <= caps.max_pulses_per_command and (
            caps.max_pulses_per_step is None or most <= caps.max_pulses_per_step)

    def use_outer(self, x: torch.Tensor | None, d: torch.Tensor | None) -> bool:
        """Whether this step updates through the backend's rank-1 pulse-train update."""
        if x is None or d is None or self.update == "pulse":
            return False
        return bool(self.backend.capabilities.outer_update)

    def gradient_update(self, tile: Tile, lr: float, grad: torch.Tensor | None,
                        x: torch.Tensor | None, d: torch.Tensor | None) -> None:
        """Move ``tile`` by -lr * grad, through outer_update(x, d) when that path applies."""
        if self.use_outer(x, d):
            tile.outer_update(x.detach(), d.detach(), -lr)
            return
        self.pulse_delta(tile, -lr * self.gradient(tile, grad, x, d))

    def gradient(self, tile: Tile, grad: torch.Tensor | None, x: torch.Tensor | None,
                 d: torch.Tensor | None) -> torch.Tensor:
        """The gradient as float32 [rows, cols] on the CPU: ``grad``, or d^T x."""
        if grad is None:
            if x is None or d is None:
                raise ValueError("step needs grad, or x and d")
            check_finite(x, "layer input x", tile=tile.name, op="step")
            check_finite(d, "output error d", tile=tile.name, op="step")
            grad = d.detach().reshape(-1, self.shape[0]).t().to("cpu", torch.float32) @ \
                x.detach().reshape(-1, self.shape[1]).to("cpu", torch.float32)
        grad = grad.detach().to("cpu", torch.float32).reshape(self.shape)
        check_finite(grad, "gradient", tile=tile.name, op="step")
        return grad

    def step(self, grad: torch.Tensor | None = None, *, x: torch.Tensor | None = None,
             d: torch.Tensor | None = None, lr_scale: float = 1.0) -> None:
        """One training step from the gradient at ``weight()`` (or from x and d, see class):
        one ``backend.step()``, so the station's per-step budget bounds it as a whole."""
        check_finite(float(lr_scale), "learning-rate scale", op="step")
        with self.backend.step():
            self._apply(grad, x, d, self.lr * lr_scale)
        self.step_count += 1

    @abstractmethod
    def _apply(self, grad: torch.Tensor | None, x: torch.Tensor | None,
               d: torch.Tensor | None, lr: float) -> None:
        """Turn the gradient (or x, d) into pulses on this algorithm's tiles."""

    # -- initialization --------------------------------------------------------------
    def program_weights(self, w0: torch.Tensor, tol: float | None = None,
                        max_iter: int | None = None) -> float:
        """Write-verify W to ``w0`` (e.g. a layer's initial weights); return fraction converged."""
        target = w0.detach().to(torch.float32).reshape(self.shape)
        return program(self.tiles["W"], target, tol=tol, max_iter=max_iter).fraction_converged

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """All digital state: step, rates, generator state (and subclass buffers)."""
        return {"step": self.step_count, "lr": self.lr, "gen": self.gen.get_state(),
                "clipped_pulses": self.clipped_pulses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.clipped_pulses = int(state.get("clipped_pulses", 0))
        self.lr = float(state["lr"])
        self.gen.set_state(state["gen"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.prefix!r}, shape={self.shape}, lr={self.lr})"
