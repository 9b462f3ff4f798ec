"""Shared machinery of the analog training algorithms: tiles, pulse rounding, schedules, state.

An algorithm owns named tiles on one backend and turns desired weight changes into
integer pulses. Its randomness (stochastic rounding) comes from its own seeded CPU
generator, so the same run is bit-identical on any backend that returns the same reads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from hil.backend import Backend, Tile
from hil.program import program

UpdateMode = Literal["auto", "outer", "pulse"]
TransferSchedule = Literal["full", "column"]
MvmRead = Literal["tiles", "summed"]


def stochastic_round(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Round to floor(x) or floor(x) + 1 with probability frac(x): unbiased, int32.

    The arithmetic runs in numpy on the CPU (exact in float64, like torch's, at a
    fraction of the per-call cost for a transfer's single column); the draws come from
    ``gen``."""
    xs = x.detach().to("cpu", torch.float64).numpy()
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
        self.backend = backend
        self.shape = (int(shape[0]), int(shape[1]))
        self.lr = float(lr)
        self.prefix = prefix
        self.update = update
        self.max_pulses = max_pulses
        self.step_count = 0
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(int(seed))
        self.tiles: dict[str, Tile] = {
            role: backend.allocate(f"{prefix}.{role}", *self.shape) for role in self.roles
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
        With ``cols``, ``delta`` holds those columns only (the others get no pulse)."""
        n = stochastic_round(delta / tile.dw_min, self.gen)
        if self.max_pulses is not None:
            n = n.clamp(-self.max_pulses, self.max_pulses)
        self.pulse_counts(tile, n, cols)
        return n

    def pulse_counts(self, tile: Tile, n: torch.Tensor, cols: slice | None = None) -> None:
        """Apply signed pulse counts (of the columns ``cols`` only, if given), split into
        commands within the backend's limit."""
        def send(part: torch.Tensor) -> None:
            if _whole(cols):
                tile.pulse(part)
            else:
                tile.pulse_columns(part, cols)

        limit = self.backend.capabilities.max_pulses_per_command
        if n.dtype == torch.int32 and limit >= 2**31 - 1:  # no split: the tile's check only
            send(n)
            return
        lo, hi = (int(v) for v in torch.aminmax(n))
        if lo == 0 and hi == 0:
            return
        if -lo <= limit and hi <= limit:  # the usual case: one command, no copy
            send(n if n.dtype == torch.int32 else n.to(torch.int32))
            return
        rest = n.to(torch.int64)
        while bool(rest.any()):
            part = rest.clamp(-limit, limit)
            send(part.to(torch.int32))
            rest = rest - part

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
        if grad is None:
            if x is None or d is None:
                raise ValueError("step needs grad, or x and d")
            grad = d.detach().reshape(-1, self.shape[0]).t().to("cpu", torch.float32) @ \
                x.detach().reshape(-1, self.shape[1]).to("cpu", torch.float32)
        grad = grad.detach().to("cpu", torch.float32).reshape(self.shape)
        self.pulse_delta(tile, -lr * grad)

    def step(self, grad: torch.Tensor | None = None, *, x: torch.Tensor | None = None,
             d: torch.Tensor | None = None, lr_scale: float = 1.0) -> None:
        """One training step from the gradient at ``weight()`` (or from x and d, see class)."""
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
        return {"step": self.step_count, "lr": self.lr, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.lr = float(state["lr"])
        self.gen.set_state(state["gen"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.prefix!r}, shape={self.shape}, lr={self.lr})"
