"""Response-function families q+(w), q-(w) of resistive devices, vectorized over devices.

One pulse of polarity s moves a device by dw_min * q_s(w). With the half range
s = (tau_max - tau_min) / 2 and normalized distances to the bounds
u+ = (tau_max - w) / s and u- = (w - tau_min) / s (u = 1 -+ w/tau for symmetric
bounds), every parametric family is q+ = (1 + a) h(u+), q- = (1 - a) h(u-) with
h(0) = 0, h(1) = 1 and amplitude asymmetry a:

- linear (soft bounds): h(u) = u
- power:                h(u) = u^gamma
- exp:                  h(u) = (exp(gamma u) - 1) / (exp(gamma) - 1)

The tabulated family holds measured q+/q- per device on a w grid (any shape,
non-monotonic too). F = (q- + q+)/2, G = (q- - q+)/2, the symmetric point solves
q+ = q-, the saturation ratio is sqrt(|G| / F).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

Tensor = torch.Tensor
FAMILIES: tuple[str, ...] = ("linear", "power", "exp", "tabulated")


def _t(x: float | Tensor, like: Tensor | None = None) -> Tensor:
    if isinstance(x, Tensor):
        return x
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    return torch.as_tensor(x, dtype=dtype, device=device)


class Response(ABC):
    """A response-function family with per-device parameters (broadcastable tensors)."""

    family: ClassVar[str]

    tau_min: Tensor
    tau_max: Tensor

    @abstractmethod
    def q_plus(self, w: Tensor) -> Tensor:
        """Potentiation response at w (>= 0, zero at tau_max)."""

    @abstractmethod
    def q_minus(self, w: Tensor) -> Tensor:
        """Depression response at w (>= 0, zero at tau_min)."""

    @abstractmethod
    def to(self, device: torch.device | str) -> Response:
        """The same response with its parameters on ``device``."""

    @abstractmethod
    def params(self) -> dict[str, Tensor]:
        """The parameter tensors that define this response (for calibration files)."""

    def q(self, w: Tensor, positive: Tensor) -> Tensor:
        """q+ where ``positive`` else q-."""
        return torch.where(positive, self.q_plus(w), self.q_minus(w))

    def F(self, w: Tensor) -> Tensor:  # noqa: N802 - the paper's name
        """Symmetric part (q- + q+) / 2."""
        return 0.5 * (self.q_minus(w) + self.q_plus(w))

    def G(self, w: Tensor) -> Tensor:  # noqa: N802 - the paper's name
        """Asymmetric part (q- - q+) / 2; zero at the symmetric point."""
        return 0.5 * (self.q_minus(w) - self.q_plus(w))

    def saturation(self, w: Tensor) -> Tensor:
        """Saturation ratio sqrt(|G(w)| / F(w)) (infinite where F vanishes)."""
        return torch.sqrt(self.G(w).abs() / self.F(w))

    def update(self, w: Tensor, delta: Tensor) -> Tensor:
        """Expected analog update W + delta * F(W) - |delta| * G(W) (PAPER.md), unclipped."""
        return w + delta * self.F(w) - delta.abs() * self.G(w)

    def symmetric_point(self, iters: int = 60) -> Tensor:
        """w where q+ = q-, by vectorized bisection (q+ - q- falls with w)."""
        lo = self.tau_min.expand(torch.broadcast_shapes(self.tau_min.shape, self.tau_max.shape))
        hi = self.tau_max.expand_as(lo)
        lo, hi = lo.clone().to(torch.float64), hi.clone().to(torch.float64)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            m = mid.to(self.tau_min.dtype)
            above = (self.q_plus(m) - self.q_minus(m)) > 0
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(self.tau_min.dtype)


class ParametricResponse(Response):
    """q+ = (1 + a) h(u+), q- = (1 - a) h(u-) with a family shape h (see module doc)."""

    def __init__(
        self,
        tau_min: float | Tensor = -1.0,
        tau_max: float | Tensor = 1.0,
        gamma: float | Tensor = 1.0,
        asym: float | Tensor = 0.0,
    ):
        ref = next((x for x in (tau_min, tau_max, gamma, asym) if isinstance(x, Tensor)), None)
        self.tau_min = _t(tau_min, ref)
        self.tau_max = _t(tau_max, ref)
        self.gamma = _t(gamma, ref)
        self.asym = _t(asym, ref)
        if bool(torch.any(self.tau_max <= self.tau_min)):
            raise ValueError("tau_max must exceed tau_min for every device")
        if bool(torch.any(self.asym.abs() >= 1)):
            raise ValueError("amplitude asymmetry must lie in (-1, 1)")
        self.half_range = 0.5 * (self.tau_max - self.tau_min)

    @abstractmethod
    def shape_fn(self, u: Tensor) -> Tensor:
        """h(u) for u >= 0, with h(0) = 0 and h(1) = 1."""

    def q_plus(self, w: Tensor) -> Tensor:
        u = ((self.tau_max - w) / self.half_range).clamp_min(0)
        return (1 + self.asym) * self.shape_fn(u)

    def q_minus(self, w: Tensor) -> Tensor:
        u = ((w - self.tau_min) / self.half_range).clamp_min(0)
        return (1 - self.asym) * self.shape_fn(u)

    def params(self) -> dict[str, Tensor]:
        return {"tau_min": self.tau_min, "tau_max": self.tau_max,
                "gamma": self.gamma, "asym": self.asym}

    def to(self, device: torch.device | str) -> ParametricResponse:
        return type(self)(**{k: v.to(device) for k, v in self.params().items()})


class LinearResponse(ParametricResponse):
    """Soft bounds: q+- = (1 +- a)(1 -+ w/tau). gamma is accepted for a uniform signature
    and ignored (held at 1)."""

    family = "linear"

    def __init__(self, tau_min=-1.0, tau_max=1.0, gamma=1.0, asym=0.0):
        super().__init__(tau_min, tau_max, 1.0 if not isinstance(gamma, Tensor) else
                         torch.ones_like(gamma), asym)

    def shape_fn(self, u: Tensor) -> Tensor:
        return u

    def symmetric_point(self, iters: int = 60) -> Tensor:
        cp, cm = 1 + self.asym, 1 - self.asym
        return (cp * self.tau_max + cm * self.tau_min) / (cp + cm)


class PowerResponse(ParametricResponse):
    """Power: q+- = (1 +- a)(1 -+ w/tau)^gamma."""

    family = "power"

    def shape_fn(self, u: Tensor) -> Tensor:
        return u.pow(self.gamma)

    def symmetric_point(self, iters: int = 60) -> Tensor:
        cp = (1 + self.asym).pow(1 / self.gamma)
        cm = (1 - self.asym).pow(1 / self.gamma)
        return (cp * self.tau_max + cm * self.tau_min) / (cp + cm)


class ExpResponse(ParametricResponse):
    """Exponential: q+- = (1 +- a)(exp(gamma (1 -+ w/tau)) - 1) / (exp(gamma) - 1)."""

    family = "exp"

    def shape_fn(self, u: Tensor) -> Tensor:
        g = self.gamma
        small = g.abs() < 1e-6
        g_safe = torch.where(small, torch.ones_like(g), g)
        return torch.where(small, u, torch.expm1(g_safe * u) / torch.expm1(g_safe))

    def symmetric_point(self, iters: int = 60) -> Tensor:
        """Closed form: with X = exp(gamma u-) and u+ + u- = 2, q+ = q- reads
        (1 - a) X^2 + 2a X - (1 + a) exp(2 gamma) = 0 (positive root); near gamma = 0 the
        linear formula."""
        f64 = torch.float64
        a, g = self.asym.to(f64), self.gamma.to(f64)
        lo, hi = self.tau_min.to(f64), self.tau_max.to(f64)
        small = g.abs() < 1e-4
        gs = torch.where(small, torch.ones_like(g), g)
        x = (-a + torch.sqrt(a * a + (1 - a * a) * torch.exp(2 * gs))) / (1 - a)
        u_minus = torch.where(small, 1 + a, torch.log(x) / gs)
        return (lo + 0.5 * (hi - lo) * u_minus).to(self.tau_min.dtype)


class TabulatedResponse(Response):
    """Measured responses: q+ and q- given per device on an increasing w grid [..., K].

    Between grid points q is interpolated linearly; outside it q is held at the end
    values, except that q+ is 0 at and above tau_max and q- at and below tau_min.
    """

    family = "tabulated"

    def __init__(self, w_grid: Tensor, qp: Tensor, qm: Tensor,
                 tau_min: Tensor | None = None, tau_max: Tensor | None = None):
        if w_grid.shape[-1] < 2 or w_grid.shape != qp.shape or qp.shape != qm.shape:
            raise ValueError("tabulated response needs w_grid, qp, qm of one shape [..., K>=2]")
        self.w_grid, self.qp, self.qm = w_grid, qp.clamp_min(0), qm.clamp_min(0)
        self.tau_min = w_grid[..., 0] if tau_min is None else tau_min
        self.tau_max = w_grid[..., -1] if tau_max is None else tau_max

    def _interp(self, table: Tensor, w: Tensor) -> Tensor:
        grid = self.w_grid
        shape = torch.broadcast_shapes(w.shape, grid.shape[:-1])
        g = grid.expand(*shape, grid.shape[-1]).contiguous()
        t = table.expand(*shape, grid.shape[-1]).contiguous()
        x = w.expand(shape).contiguous().unsqueeze(-1)
        k = torch.searchsorted(g, x).clamp(1, g.shape[-1] - 1)
        x0, x1 = g.gather(-1, k - 1), g.gather(-1, k)
        y0, y1 = t.gather(-1, k - 1), t.gather(-1, k)
        frac = ((x - x0) / (x1 - x0).clamp_min(1e-30)).clamp(0, 1)
        return (y0 + frac * (y1 - y0)).squeeze(-1)

    def q_plus(self, w: Tensor) -> Tensor:
        return torch.where(w >= self.tau_max, torch.zeros_like(w), self._interp(self.qp, w))

    def q_minus(self, w: Tensor) -> Tensor:
        return torch.where(w <= self.tau_min, torch.zeros_like(w), self._interp(self.qm, w))

    def params(self) -> dict[str, Tensor]:
        return {"w_grid": self.w_grid, "qp": self.qp, "qm": self.qm,
                "tau_min": self.tau_min, "tau_max": self.tau_max}

    def to(self, device: torch.device | str) -> TabulatedResponse:
        return TabulatedResponse(**{k: v.to(device) for k, v in self.params().items()})


class MixedResponse(Response):
    """Devices of different families in one array: ``family_index`` picks a member per device."""

    family = "mixed"

    def __init__(self, members: list[Response], family_index: Tensor):
        self.members = members
        self.family_index = family_index
        self.tau_min = self._pick([m.tau_min.expand_as(family_index) for m in members])
        self.tau_max = self._pick([m.tau_max.expand_as(family_index) for m in members])

    def _pick(self, values: list[Tensor]) -> Tensor:
        out = values[0]
        for k, v in enumerate(values[1:], start=1):
            out = torch.where(self.family_index == k, v, out)
        return out

    def q_plus(self, w: Tensor) -> Tensor:
        return self._pick([m.q_plus(w) for m in self.members])

    def q_minus(self, w: Tensor) -> Tensor:
        return self._pick([m.q_minus(w) for m in self.members])

    def symmetric_point(self, iters: int = 60) -> Tensor:
        return self._pick([m.symmetric_point(iters).expand_as(self.family_index)
                           for m in self.members])

    def params(self) -> dict[str, Tensor]:
        out = {"family_index": self.family_index}
        for k, m in enumerate(self.members):
            out.update({f"{k}.{m.family}.{name}": v for name, v in m.params().items()})
        return out

    def to(self, device: torch.device | str) -> MixedResponse:
        return MixedResponse([m.to(device) for m in self.members], self.family_index.to(device))


RESPONSE_CLASSES: dict[str, type[ParametricResponse]] = {
    "linear": LinearResponse,
    "power": PowerResponse,
    "exp": ExpResponse,
}


def make_response(family: str, **params: float | Tensor) -> ParametricResponse:
    """Build a parametric response by family name ('linear', 'power' or 'exp')."""
    try:
        cls = RESPONSE_CLASSES[family]
    except KeyError:
        raise ValueError(
            f"unknown response family {family!r} (one of {', '.join(RESPONSE_CLASSES)})"
        ) from None
    return cls(**params)
