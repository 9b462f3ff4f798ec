"""Batched per-device fitting of response families to pulse traces, with model selection.

Every device's binned mean step is fitted by weighted least squares (Levenberg-Marquardt,
all devices at once in torch) for the linear, power and exponential families; the
tabulated family is the binned means themselves. An information criterion (BIC by
default) on the chi-square of the bin means picks a family per device, in Occam's window:
the family with the fewest parameters among those within a margin of the best.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from calibration.steps import StepBins, bin_steps, noise_from_residuals, per_step
from hil.errors import ConfigError
from hil.response import (
    ExpResponse,
    LinearResponse,
    MixedResponse,
    PowerResponse,
    Response,
    TabulatedResponse,
)

Tensor = torch.Tensor
FAMILIES: tuple[str, ...] = ("linear", "power", "exp", "tabulated")
N_PARAMS = {"linear": 4, "power": 5, "exp": 5}
GAMMA_LIMITS = {"power": (0.05, 20.0), "exp": (-20.0, 20.0)}
STEP_CHUNK = 2048  # devices per batch of the unbinned final fit
OCCAM_MARGIN = 6.0  # criterion difference that counts as strong evidence for a richer family


def _shape(family: str, u: Tensor, g: Tensor) -> Tensor:
    """h(u) of a family with its free shape parameter g (log gamma for power, gamma for exp)."""
    u = u.clamp_min(0)
    if family == "linear":
        return u
    if family == "power":
        return u.pow(g.exp())
    small = g.abs() < 1e-6
    gs = torch.where(small, torch.ones_like(g), g)
    return torch.where(small, u, torch.expm1(gs * u) / torch.expm1(gs))


def _predict(family: str, p: Tensor, x: Tensor) -> Tensor:
    """Signed per-pulse step [D, 2, K] for params p [D, 5] = tmin, tmax, g, log A+, log A-."""
    tmin, tmax, g, la_p, la_m = (p[:, i].view(-1, 1) for i in range(5))
    half = 0.5 * (tmax - tmin)
    up = la_p.exp() * _shape(family, (tmax - x[:, 0]) / half, g)
    dn = -la_m.exp() * _shape(family, (x[:, 1] - tmin) / half, g)
    return torch.stack([up, dn], 1)


def _cost(family: str, p: Tensor, bins: StepBins, wt: Tensor) -> Tensor:
    r = (bins.y - _predict(family, p, bins.x)) * wt
    c = (r * r).sum((1, 2))
    bad = ~torch.isfinite(c) | (p[:, 1] - p[:, 0] <= 1e-3)
    return torch.where(bad, torch.full_like(c, float("inf")), c)


def _clamp_g(family: str, p: Tensor) -> Tensor:
    if family == "linear":
        return p
    lo, hi = GAMMA_LIMITS[family]
    if family == "power":
        lo, hi = math.log(lo), math.log(hi)
    p = p.clone()
    p[:, 2] = p[:, 2].clamp(lo, hi)
    return p


def _shape_grad(family: str, u: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """h(u), dh/du and dh/dg of a family (zero where u <= 0)."""
    pos = u > 0
    uc = u.clamp_min(1e-300)
    if family == "linear":
        h = u.clamp_min(0)
        return h, pos.to(u.dtype), torch.zeros_like(u)
    if family == "power":
        gam = g.exp()
        lu = uc.log()
        h = torch.where(pos, (gam * lu).exp(), torch.zeros_like(u))
        return h, torch.where(pos, gam * h / uc, torch.zeros_like(u)), h * lu * gam
    small = g.abs() < 1e-6
    gs = torch.where(small, torch.full_like(g, 1e-6), g)
    uu = u.clamp_min(0)
    e = torch.expm1(gs * uu)
    den = torch.expm1(gs)
    h = e / den
    hu = torch.where(pos, gs * (e + 1) / den, torch.zeros_like(u))
    hg = (uu * (e + 1) * den - e * (den + 1)) / (den * den)
    return h, hu, hg


def _jacobian(family: str, p: Tensor, bins: StepBins, wt: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted residuals [D, M] and their analytic Jacobian [D, M, 5]."""
    tmin, tmax, g, la_p, la_m = (p[:, i].view(-1, 1) for i in range(5))
    half = 0.5 * (tmax - tmin)
    u = (tmax - bins.x[:, 0]) / half
    v = (bins.x[:, 1] - tmin) / half
    hu_, hu_u, hu_g = _shape_grad(family, u, g)
    hv_, hv_v, hv_g = _shape_grad(family, v, g)
    ap, am = la_p.exp(), la_m.exp()
    pred_up, pred_dn = ap * hu_, -am * hv_
    zero = torch.zeros_like(u)
    # d pred / d (tmin, tmax, g, la+, la-) for each branch
    d_up = [ap * hu_u * u / (2 * half), ap * hu_u * (1 - u / 2) / half, ap * hu_g, pred_up, zero]
    d_dn = [am * hv_v * (1 - v / 2) / half, am * hv_v * v / (2 * half), -am * hv_g, zero, pred_dn]
    res = (bins.y - torch.stack([pred_up, pred_dn], 1)) * wt
    jac = -torch.stack([torch.stack([a, b], 1) for a, b in zip(d_up, d_dn, strict=True)], 3)
    jac = jac * wt.unsqueeze(3)
    return res.flatten(1), jac.flatten(1, 2)


def _levenberg_marquardt(family: str, p: Tensor, bins: StepBins, wt: Tensor,
                         iters: int, atol: float = 1e-12) -> Tensor:
    """Minimize the weighted squared residual of every device at once (analytic Jacobian).

    Devices drop out of the batch once a step no longer improves them (active set), so
    late iterations only touch the few devices still moving: an accepted step that gains
    at most 1e-9 of the cost plus ``atol`` (chi-square units where the weights are inverse
    standard deviations) ends a device.
    """
    free = [0, 1, 3, 4] if family == "linear" else [0, 1, 2, 3, 4]
    n_free = len(free)
    p = p.clone()
    lam = torch.full((p.shape[0],), 1e-2, dtype=p.dtype, device=p.device)
    cost = _cost(family, p, bins, wt)
    eye = torch.eye(n_free, dtype=p.dtype, device=p.device)
    active = torch.isfinite(cost).nonzero().squeeze(1)
    for _ in range(iters):
        if active.numel() == 0:
            break
        sub = StepBins(x=bins.x[active], y=bins.y[active], n=bins.n[active],
                       var=bins.var[active], n_steps=bins.n_steps[active],
                       read_noise=bins.read_noise[active], c2c=bins.c2c[active])
        w_a, p_a, lam_a, c_a = wt[active], p[active], lam[active], cost[active]
        r0, jac = _jacobian(family, p_a, sub, w_a)
        jac = torch.nan_to_num(jac[:, :, free], nan=0.0, posinf=0.0, neginf=0.0)
        r0 = torch.nan_to_num(r0, nan=0.0, posinf=0.0, neginf=0.0)
        jtj = jac.transpose(1, 2) @ jac
        jtr = (jac.transpose(1, 2) @ r0.unsqueeze(2)).squeeze(2)
        diag = torch.diagonal(jtj, dim1=1, dim2=2).clamp_min(1e-12)
        a = jtj + lam_a.view(-1, 1, 1) * torch.diag_embed(diag) + 1e-12 * eye
        delta = torch.linalg.solve(a, -jtr.unsqueeze(2)).squeeze(2)
        delta = torch.nan_to_num(delta, nan=0.0)
        trial = p_a.clone()
        trial[:, free] += delta
        trial = _clamp_g(family, trial)
        c_new = _cost(family, trial, sub, w_a)
        better = c_new < c_a
        p[active] = torch.where(better.unsqueeze(1), trial, p_a)
        cost[active] = torch.where(better, c_new, c_a)
        lam_a = torch.where(better, lam_a * 0.3, lam_a * 4).clamp(1e-9, 1e9)
        lam[active] = lam_a
        # done: an accepted step that gains almost nothing, or a step that keeps failing
        tiny = better & (c_a - c_new <= 1e-9 * c_a + atol)
        keep = ~tiny & (lam_a < 1e5)
        active = active[keep]
    return p


def _initial(bins: StepBins, wt: Tensor) -> Tensor:
    """Linear (soft-bounds) start: straight lines through each branch's bin means."""
    w2 = wt * wt
    x, y = bins.x, bins.y
    sw = w2.sum(2)
    mx = (w2 * x).sum(2) / sw.clamp_min(1e-300)
    my = (w2 * y).sum(2) / sw.clamp_min(1e-300)
    cov = (w2 * (x - mx.unsqueeze(2)) * (y - my.unsqueeze(2))).sum(2)
    vx = (w2 * (x - mx.unsqueeze(2)) ** 2).sum(2).clamp_min(1e-300)
    slope = cov / vx
    xs = torch.where(bins.n > 0, x, torch.full_like(x, float("nan")))
    xlo = torch.nan_to_num(xs, nan=float("inf")).amin((1, 2))
    xhi = torch.nan_to_num(xs, nan=float("-inf")).amax((1, 2))
    span = (xhi - xlo).clamp_min(1e-6)
    # zero crossing of each line, kept within a sane distance of the data
    tmax = torch.where(slope[:, 0] < 0, mx[:, 0] - my[:, 0] / slope[:, 0], xhi + span)
    tmin = torch.where(slope[:, 1] < 0, mx[:, 1] - my[:, 1] / slope[:, 1], xlo - span)
    tmax = torch.nan_to_num(tmax, nan=1.0).clamp(xhi - 0.1 * span, xhi + 3 * span)
    tmin = torch.nan_to_num(tmin, nan=-1.0).clamp(xlo - 3 * span, xlo + 0.1 * span)
    half = 0.5 * (tmax - tmin)
    a_p = (-slope[:, 0] * half).abs()
    a_m = (-slope[:, 1] * half).abs()
    fallback = my.abs().clamp_min(1e-12)
    a_p = torch.where(torch.isfinite(a_p) & (a_p > 0), a_p, fallback[:, 0])
    a_m = torch.where(torch.isfinite(a_m) & (a_m > 0), a_m, fallback[:, 1])
    zero = torch.zeros_like(tmin)
    return torch.stack([tmin, tmax, zero, a_p.clamp_min(1e-12).log(),
                        a_m.clamp_min(1e-12).log()], 1)


def _gamma_start(family: str, p0: Tensor, bins: StepBins, wt: Tensor) -> Tensor:
    """Best shape parameter from a small grid (amplitudes solved in closed form)."""
    grid = ([math.log(g) for g in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)] if family == "power"
            else [-2.0, -0.5, 0.5, 1.0, 2.0, 3.0, 5.0])
    best_p, best_c = p0, None
    for g in grid:
        p = p0.clone()
        p[:, 2] = g
        p[:, 3:] = 0.0
        basis = _predict(family, p, bins.x)  # unit amplitudes
        w2 = wt * wt
        num = (w2 * basis * bins.y).sum(2)
        den = (w2 * basis * basis).sum(2).clamp_min(1e-300)
        amp = (num / den).clamp_min(1e-12)
        p[:, 3:] = amp.log()
        c = _cost(family, p, bins, wt)
        if best_c is None:
            best_p, best_c = p, c
        else:
            better = c < best_c
            best_p = torch.where(better.unsqueeze(1), p, best_p)
            best_c = torch.where(better, c, best_c)
    return best_p


def _step_response(family: str, p: Tensor, x: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Fitted signed per-pulse step f and its slope df/dx at every step's state
    (x [T-1, D], up [T-1]: potentiation steps; p [D, 5])."""
    tmin, tmax, g, la_p, la_m = (p[:, i] for i in range(5))
    half = 0.5 * (tmax - tmin)
    upc = up.unsqueeze(1)
    u = torch.where(upc, (tmax - x) / half, (x - tmin) / half)
    h, hu, _ = _shape_grad(family, u, g)
    amp = torch.where(upc, la_p.exp(), -la_m.exp())
    return amp * h, -amp.abs() * hu / half


def _by_direction(up: Tensor, down: Tensor, *values: Tensor) -> list[Tensor]:
    """[T-1, D] per-step values packed as [D, 2, M] (branch 0: up steps, 1: down; zero
    padded), the layout of StepBins, so the binned fit's cost and Jacobian serve."""
    iu, idn = up.nonzero().squeeze(1), down.nonzero().squeeze(1)
    m = max(iu.numel(), idn.numel())
    out = []
    for v in values:
        o = v.new_zeros((v.shape[1], 2, m))
        o[:, 0, :iu.numel()] = v[iu].t()
        o[:, 1, :idn.numel()] = v[idn].t()
        out.append(o)
    return out


def _refine_on_steps(family: str, p: Tensor, states: Tensor, d: Tensor, c2: Tensor,
                     s2: Tensor, iters: int, rounds: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """Final fit of one family on the unbinned steps, and c2c / read noise from its residuals.

    Bins lose what the response does within a bin (the mean step of a bin is not the step
    at its mean state where q curves, and the steps near a bound, where the state is
    pinned best, share one bin), and a bin's variance from its mean step misweights steps
    of very different size. Here every step k is its own data point, y_k = f(x_k) + e_k
    with Var e_k = c^2 f_k^2 / n + s^2 (1 / n^2 + (1 / n + f'_k)^2) (see
    :func:`calibration.steps.noise_from_residuals`), weighted by its inverse variance at
    the previous round's f and noise: iteratively reweighted least squares from the binned
    fit. For states read directly (read noise small against a step): where reads are
    averaged over a window, regressing on them is biased and the binned fit stays.
    ``states`` [T, D] normalized, ``p`` [D, 5] the binned fit, ``c2``, ``s2`` [D] the
    binned noise estimates. Returns the refined p, c^2 and s^2."""
    x, y, npulse, ok = per_step(states, d)
    up, down = d > 0, d < 0
    n = npulse.unsqueeze(1)
    typical = (y.abs() * ok).sum(0) / ok.sum(0).clamp_min(1)
    floor = (1e-3 * typical) ** 2 + 1e-30
    xs, ys = _by_direction(up, down, x, y)
    f, fp = _step_response(family, p, x, up)
    for r in range(rounds):
        var = c2 * f * f / n + s2 * (1 / n ** 2 + (1 / n + fp) ** 2) + floor
        (ws,) = _by_direction(up, down, torch.where(ok, var.rsqrt(), 0.0))
        steps = StepBins(x=xs, y=ys, n=(ws > 0).to(ys.dtype), var=ws, n_steps=ok.sum(0),
                         read_noise=s2.sqrt(), c2c=c2.sqrt())
        # a chi-square gain of 0.01 moves the parameters by a tenth of their error
        p_new = _levenberg_marquardt(family, p, steps, ws, min(iters, 12), atol=1e-2)
        p = torch.where(torch.isfinite(p_new).all(1, keepdim=True), p_new, p)
        f, fp = _step_response(family, p, x, up)
        e = torch.where(ok, y - f, 0.0)
        # the noise between rounds only sets the next round's weights: one reweighting
        c2, s2 = noise_from_residuals(e, f, fp, npulse, ok, c2, s2, floor, N_PARAMS[family],
                                      rounds=2 if r == rounds - 1 else 1)
    return p, c2, s2


def _step_pass(fits: dict[str, Tensor], chi2: dict[str, Tensor], choice: Tensor,
               par_choice: Tensor, has_steps: Tensor, st: StepBins, states: Tensor, d: Tensor,
               iters: int) -> tuple[Tensor, Tensor]:
    """The selected family's parameters, and c2c and read noise, from the unbinned steps.

    Per device (where the states are the reads themselves, see :func:`_refine_on_steps`)
    the selected parametric family, and the one whose parameters are reported
    (``par_choice``) where they differ, are refined on the steps (updating ``fits`` in
    place).
    The noise comes from the residuals of the parametric family that fits the bins best
    (least chi-square, no penalty): the families are nested (linear is power at gamma 1
    and exp at gamma 0), so the most flexible family that fits leaves the noise alone, at
    the cost of one degree of freedom (counted), where a sparser selected family could
    leave misfit in its residuals that would read as noise. Devices selected as
    ``tabulated`` (no family fits) and those with averaged states keep the bins'
    estimates. Returns c^2 and s^2 [D] (normalized units)."""
    c2c_var, read_var = st.c2c ** 2, st.read_noise ** 2
    direct = has_steps if st.lagged is None else has_steps & ~st.lagged
    direct = direct & (choice != FAMILIES.index("tabulated"))
    inf = torch.full_like(c2c_var, float("inf"))
    best = torch.stack([torch.nan_to_num(chi2[f], nan=float("inf")) if f in chi2 else inf
                        for f in FAMILIES[:3]], 1).argmin(1)
    for j, fam in enumerate(FAMILIES[:3]):
        if fam not in fits:
            continue
        own, noise = ((choice == j) | (par_choice == j)) & direct, (best == j) & direct
        for idx in (own | noise).nonzero().squeeze(1).split(STEP_CHUNK):
            # float32: 40 % less time than float64 with the same medians to 4 digits (the
            # reads are float32 already; every sum runs over at most a few 1000 steps)
            p_r, c2_r, s2_r = (t.to(c2c_var.dtype) for t in _refine_on_steps(
                fam, fits[fam][idx].float(), states[:, idx].float(), d,
                c2c_var[idx].float(), read_var[idx].float(), iters))
            o, n = own[idx].unsqueeze(1), noise[idx]
            fits[fam][idx] = torch.where(o, p_r, fits[fam][idx])
            c2c_var[idx] = torch.where(n, c2_r, c2c_var[idx])
            read_var[idx] = torch.where(n, s2_r, read_var[idx])
    return c2c_var, read_var


def _occam(ic: Tensor, k: Tensor, margin: float) -> Tensor:
    """Index of the chosen family per device: the one with the fewest parameters among
    those whose criterion is within ``margin`` of the best (lowest criterion among ties).

    The families are nested (power at gamma 1 and exp at gamma 0 are linear; the table
    holds every bin mean), so a bare minimum of the criterion picks the richer family on
    noise alone whenever the data cannot tell them apart. Occam's window (Madigan and
    Raftery 1994) asks for strong evidence before leaving a simpler family: a difference
    of 6 in BIC is posterior odds of e^3, about 20 : 1 ("strong" on Kass and Raftery's scale).
    """
    ok = torch.isfinite(ic)
    best = ic.amin(1, keepdim=True)
    window = ok & (ic <= best + margin)
    k_min = torch.where(window, k, torch.full_like(k, float("inf"))).amin(1, keepdim=True)
    cand = window & (k == k_min)
    return torch.where(cand, ic, torch.full_like(ic, float("inf"))).argmin(1)


POWER_LINES = (0.3, 0.5, 2.0, 3.0)  # gammas whose linearized steps give starting bounds


def _power_bounds(bins: StepBins, wt: Tensor, gamma: float) -> Tensor:
    """Start whose bounds are where lines through |y|^(1/gamma) reach zero.

    For a power-law device the step's 1/gamma-th power falls linearly to zero at the
    bound it approaches; the linear family's zero crossings (gamma 1) land far from the
    bounds of a strongly curved device (a gamma-0.3 step barely changes until just
    before the bound), a start from which the fit does not recover. Weights follow the
    transform (delta method), with the step floored at a twentieth of a typical step.
    """
    typical = (bins.y.abs() * bins.n).sum((1, 2)) / bins.n.sum((1, 2)).clamp_min(1)
    mag = torch.maximum(bins.y.abs(), 0.05 * typical.view(-1, 1, 1))
    z = bins.y.sign() * bins.y.abs().pow(1 / gamma)
    wz = wt * gamma / mag.pow(1 / gamma - 1)
    return _initial(StepBins(x=bins.x, y=z, n=bins.n, var=bins.var, n_steps=bins.n_steps,
                             read_noise=bins.read_noise, c2c=bins.c2c), wz)


def _start(family: str, p_lin: Tensor, bins: StepBins, wt: Tensor) -> Tensor:
    """Best start of a curved family: the gamma grid of :func:`_gamma_start` from the linear
    fit's bounds and, for power, from the bounds of :func:`_power_bounds` (lowest cost)."""
    best = _gamma_start(family, p_lin, bins, wt)
    if family != "power":
        return best
    best_c = _cost(family, best, bins, wt)
    for g in POWER_LINES:
        p = _gamma_start(family, _power_bounds(bins, wt, g), bins, wt)
        c = _cost(family, p, bins, wt)
        better = c < best_c
        best = torch.where(better.unsqueeze(1), p, best)
        best_c = torch.where(better, c, best_c)
    return best


@dataclass
class FitResult:
    """Per-device fit of pulse traces; all values in the units of the states.

    ``c2c`` is relative (std of one pulse's step over its mean, like the emulator's
    ``c2c``); ``read_noise`` is absolute. ``params[family]`` holds each family's
    parameters even where another family was selected.
    """

    model: np.ndarray  # str per device ('none' where the trace has no steps)
    family_index: np.ndarray  # int per device, index into FAMILIES (-1: none)
    dw_min: np.ndarray
    tau_min: np.ndarray
    tau_max: np.ndarray
    gamma: np.ndarray
    asym: np.ndarray
    symmetric_point: np.ndarray
    c2c: np.ndarray
    read_noise: np.ndarray
    r2: np.ndarray  # R^2 of the selected q+- on the binned mean steps
    r2_const: np.ndarray  # R^2 of a constant step per direction, same data
    chi2_red: np.ndarray  # reduced chi-square of the selected family
    n_steps: np.ndarray
    ic: np.ndarray  # [D, 4] information criterion per family
    criterion: str
    params: dict[str, dict[str, np.ndarray]]  # family -> name -> [D] (tabulated: [D, K])
    bins: dict[str, np.ndarray]  # x, y, n, var [D, 2, K] in state units
    response: Response = field(repr=False)

    @property
    def n_devices(self) -> int:
        return int(self.dw_min.shape[0])

    def _eval(self, w: np.ndarray | Tensor, plus: bool) -> np.ndarray | Tensor:
        as_np = not isinstance(w, Tensor)
        wt = torch.as_tensor(np.asarray(w) if as_np else w, dtype=torch.float64)
        q = self.response.q_plus(wt) if plus else self.response.q_minus(wt)
        return q.numpy() if as_np else q.to(w.dtype)

    def q_plus(self, w: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """Fitted potentiation response per device at w [..., n_devices] (state units)."""
        return self._eval(w, True)

    def q_minus(self, w: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """Fitted depression response per device at w [..., n_devices] (state units)."""
        return self._eval(w, False)

    def step_plus(self, w: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """Expected step of one potentiation pulse: dw_min * q+(w)."""
        return self.q_plus(w) * self.dw_min

    def step_minus(self, w: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """Expected step of one depression pulse (negative): -dw_min * q-(w)."""
        return -self.q_minus(w) * self.dw_min


def _weighted_r2(y: Tensor, pred: Tensor, w: Tensor) -> Tensor:
    """R^2 over both branches of the signed bin means, around their pooled weighted mean."""
    sw = w.sum((1, 2)).clamp_min(1e-300)
    mean = (w * y).sum((1, 2)) / sw
    tot = (w * (y - mean.view(-1, 1, 1)) ** 2).sum((1, 2)).clamp_min(1e-300)
    return 1 - (w * (y - pred) ** 2).sum((1, 2)) / tot


def _tabulated(bins: StepBins, dw: Tensor, tmin: Tensor, tmax: Tensor,
               grid_size: int) -> TabulatedResponse:
    """q+- per device on a common grid over the measured states, from the bin means."""
    has = bins.n > 0
    xs = torch.where(has, bins.x, torch.full_like(bins.x, float("nan")))
    lo = torch.nan_to_num(xs, nan=float("inf")).amin((1, 2))
    hi = torch.nan_to_num(xs, nan=float("-inf")).amax((1, 2))
    hi = torch.maximum(hi, lo + 1e-9)
    t = torch.linspace(0, 1, grid_size, dtype=lo.dtype, device=lo.device)
    grid = lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * t  # [D, G]
    tables = []
    for j, sign in ((0, 1.0), (1, -1.0)):
        x = torch.where(has[:, j], bins.x[:, j], torch.full_like(bins.x[:, j], float("inf")))
        order = torch.argsort(x, 1)
        xo = x.gather(1, order)
        yo = (sign * bins.y[:, j]).gather(1, order) / dw.unsqueeze(1)
        n_has = has[:, j].sum(1)
        # empty bins are sorted last: pad them with the last measured point
        last = (n_has - 1).clamp_min(0).unsqueeze(1)
        pos = torch.arange(xo.shape[1], device=xo.device).unsqueeze(0)
        xo = torch.where(pos <= last, xo, xo.gather(1, last) + 1e-9 * (pos - last))
        yo = torch.where(pos <= last, yo, yo.gather(1, last))
        xo = torch.where(n_has.unsqueeze(1) > 0, xo, grid[:, :1] + 1e-9 * pos)
        yo = torch.where(n_has.unsqueeze(1) > 0, yo, torch.zeros_like(yo))
        table = TabulatedResponse(xo.contiguous(), yo.contiguous(), yo.contiguous())
        tables.append(table._interp(table.qp, grid.t().contiguous()).t())
    return TabulatedResponse(grid.contiguous(), tables[0].contiguous(), tables[1].contiguous(),
                             tau_min=tmin, tau_max=tmax)


def _grid_symmetric_point(tab: TabulatedResponse) -> Tensor:
    """Where q+ - q- changes sign on each device's grid (linear between grid points)."""
    diff = tab.qp - tab.qm  # [D, G], falls with w
    neg = diff <= 0
    first = torch.where(neg.any(1), neg.float().argmax(1), torch.full_like(neg[:, 0].long(),
                                                                             diff.shape[1] - 1))
    k = first.clamp(1, diff.shape[1] - 1).unsqueeze(1)
    d0, d1 = diff.gather(1, k - 1), diff.gather(1, k)
    x0, x1 = tab.w_grid.gather(1, k - 1), tab.w_grid.gather(1, k)
    frac = (d0 / (d0 - d1).where((d0 - d1) != 0, torch.ones_like(d0))).clamp(0, 1)
    sym = (x0 + frac * (x1 - x0)).squeeze(1)
    sym = torch.where(neg[:, 0], tab.w_grid[:, 0], sym)  # q- wins everywhere: lowest state
    return torch.where(neg.any(1), sym, tab.w_grid[:, -1])


def _as_tensor(a: object, name: str, ndim: int) -> Tensor:
    t = torch.as_tensor(np.asarray(a, dtype=np.float64) if not isinstance(a, Tensor) else a)
    if t.dim() == ndim - 1:
        t = t.unsqueeze(-1)
    if t.dim() != ndim:
        raise ConfigError("<traces>", name, f"expected {ndim} dimensions, got {t.dim()}")
    return t.to(torch.float64)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads (small batched ops stall on busy cores with more)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_traces(states: np.ndarray | Tensor, directions: np.ndarray | Tensor, *,
               criterion: str = "bic", bins: int = 24, window: int = 8, iters: int = 40,
               families: tuple[str, ...] = FAMILIES, grid_size: int = 32,
               margin: float = OCCAM_MARGIN, threads: int | None = None) -> FitResult:
    """Fit response families to the traces of every device at once and pick one per device.

    states [n_steps + 1, n_devices] (the read before the first pulse and after each
    pulse, any unit; NaN breaks a sequence), directions [n_steps] (+1 potentiation,
    -1 depression; +-n for n pulses between reads). Invariant to the states' unit and offset.
    ``margin``: Occam's window, how much lower a richer family's criterion must be to be
    chosen over a simpler one (0: the bare minimum).
    ``threads``: torch threads for the fit (default: 1 below 16384 devices, where the
    many small batched operations gain nothing from more).
    """
    n_dev = int(np.shape(states)[1]) if len(np.shape(states)) == 2 else 1
    with torch_threads(threads if threads is not None else (1 if n_dev < 16384 else None)):
        return _fit(states, directions, criterion=criterion, bins=bins, window=window,
                    iters=iters, families=families, grid_size=grid_size, margin=margin)


def _fit(states: np.ndarray | Tensor, directions: np.ndarray | Tensor, *, criterion: str,
         bins: int, window: int, iters: int, families: tuple[str, ...],
         grid_size: int, margin: float) -> FitResult:
    if criterion not in ("bic", "aic"):
        raise ValueError("criterion must be 'bic' or 'aic'")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    unknown = set(families) - set(FAMILIES)
    if unknown or not {"linear", "power", "exp"} & set(families):
        raise ValueError(f"families must include a parametric one from {FAMILIES}")
    s = _as_tensor(states, "states", 2)
    d = torch.as_tensor(np.asarray(directions) if not isinstance(directions, Tensor)
                        else directions).reshape(-1)
    if d.dtype.is_floating_point:
        if not bool(torch.all(torch.isfinite(d) & (d == d.round()))):
            raise ConfigError("<traces>", "directions", "must be integers (+1 / -1)")
    d = d.to(torch.int64)
    if s.shape[0] != d.shape[0] + 1:
        raise ConfigError("<traces>", "directions",
                          f"{d.shape[0]} directions for {s.shape[0]} states (need states - 1)")
    # normalize per device: offset and unit invariance
    finite = torch.isfinite(s)
    center = torch.nanmedian(torch.where(finite, s, torch.nan), 0).values
    smax = torch.where(finite, s, -torch.inf).amax(0)
    smin = torch.where(finite, s, torch.inf).amin(0)
    scale = smax - smin
    usable = torch.isfinite(scale) & (scale > 0)
    scale_safe = torch.where(usable, scale, torch.ones_like(scale))
    center = torch.where(usable, center, torch.zeros_like(center))
    sn = (s - center) / scale_safe
    st = bin_steps(sn, d, bins=bins, window=window)
    n_dev = s.shape[1]
    has_steps = usable & (st.n_steps >= 4) & ((st.n[:, 0] > 0).sum(1) >= 2) \
        & ((st.n[:, 1] > 0).sum(1) >= 2)
    if not bool(has_steps.any()):
        raise ConfigError("<traces>", "states",
                          "no trace has steps to fit (need reads that change, in both "
                          "directions, with at least 2 distinct states per direction)")
    wt = torch.where(torch.isfinite(st.var), st.var.clamp_min(1e-300).rsqrt(),
                     torch.zeros_like(st.var))
    wt = torch.where(has_steps.view(-1, 1, 1), wt, torch.zeros_like(wt))
    st.x = torch.where(st.n > 0, st.x, torch.zeros_like(st.x))
    p_lin0 = _initial(st, wt)
    fits: dict[str, Tensor] = {}
    chi2: dict[str, Tensor] = {}
    for fam in ("linear", "power", "exp"):
        if fam not in families:
            continue
        p0 = p_lin0 if fam == "linear" else _start(fam, fits.get("linear", p_lin0), st, wt)
        p = _levenberg_marquardt(fam, p0, st, wt, iters)
        fits[fam] = p
        chi2[fam] = _cost(fam, p, st, wt)
    n_eff = st.n_steps.clamp_min(2)
    penalty = 2.0 if criterion == "aic" else None
    n_bins = (st.n > 0).sum((1, 2)).to(torch.float64)
    ic = torch.full((n_dev, len(FAMILIES)), float("inf"), dtype=torch.float64)
    k_fam = torch.full_like(ic, float("inf"))
    for j, fam in enumerate(FAMILIES):
        if fam == "tabulated":
            if fam in families:
                k_fam[:, j] = n_bins
                ic[:, j] = n_bins * (penalty if penalty else n_eff.log())
            continue
        if fam in fits:
            k_fam[:, j] = N_PARAMS[fam]
            ic[:, j] = chi2[fam] + N_PARAMS[fam] * (penalty if penalty else n_eff.log())
    ic = torch.nan_to_num(ic, nan=float("inf"))
    choice = _occam(ic, k_fam, margin)
    # best parametric family gives dw_min, bounds, gamma, asym (also for tabulated devices)
    par_ic = ic.clone()
    par_ic[:, FAMILIES.index("tabulated")] = float("inf")
    par_choice = par_ic.argmin(1)
    c2c_var, read_var = _step_pass(fits, chi2, choice, par_choice, has_steps, st, sn, d,
                                    iters)

    def to_units(fam: str) -> dict[str, Tensor]:
        p = fits[fam]
        a_p, a_m = p[:, 3].exp(), p[:, 4].exp()
        g = p[:, 2].exp() if fam == "power" else (p[:, 2] if fam == "exp"
                                                  else torch.ones_like(p[:, 2]))
        asym = ((a_p - a_m) / (a_p + a_m)).clamp(-0.999, 0.999)
        return {"tau_min": center + scale_safe * p[:, 0], "tau_max": center + scale_safe * p[:, 1],
                "gamma": g, "asym": asym, "dw_min": scale_safe * 0.5 * (a_p + a_m)}

    units = {fam: to_units(fam) for fam in fits}

    def pick(name: str) -> Tensor:
        out = torch.full((n_dev,), float("nan"), dtype=torch.float64)
        for j, fam in enumerate(FAMILIES):
            if fam in units:
                out = torch.where(par_choice == j, units[fam][name], out)
        return torch.where(has_steps, out, torch.full_like(out, float("nan")))

    dw_min, tmin, tmax = pick("dw_min"), pick("tau_min"), pick("tau_max")
    classes = {"linear": LinearResponse, "power": PowerResponse, "exp": ExpResponse}
    members: list[Response] = []
    safe = {}
    for fam in ("linear", "power", "exp"):
        if fam in units:
            u = units[fam]
            lo_ = torch.where(has_steps, u["tau_min"], torch.full_like(u["tau_min"], -1.0))
            hi_ = torch.where(has_steps, u["tau_max"], torch.full_like(u["tau_max"], 1.0))
            hi_ = torch.maximum(hi_, lo_ + 1e-12 * (lo_.abs() + 1))
            safe[fam] = classes[fam](tau_min=lo_, tau_max=hi_, gamma=u["gamma"],
                                     asym=u["asym"])
        else:  # keep member indices aligned with FAMILIES
            safe[fam] = LinearResponse(tau_min=-torch.ones(n_dev, dtype=torch.float64),
                                       tau_max=torch.ones(n_dev, dtype=torch.float64))
        members.append(safe[fam])
    x_units = center.view(-1, 1, 1) + scale_safe.view(-1, 1, 1) * st.x
    y_units = scale_safe.view(-1, 1, 1) * st.y
    tab_bins = StepBins(x=x_units, y=y_units, n=st.n, var=st.var, n_steps=st.n_steps,
                        read_noise=st.read_noise, c2c=st.c2c)
    dw_safe = torch.where(torch.isfinite(dw_min) & (dw_min > 0), dw_min, torch.ones_like(dw_min))
    tmin_safe = torch.where(has_steps, tmin, torch.full_like(tmin, -1.0))
    tmax_safe = torch.where(has_steps, tmax, torch.full_like(tmax, 1.0))
    tab = _tabulated(tab_bins, dw_safe, tmin_safe, tmax_safe, grid_size)
    members.append(tab)
    response = MixedResponse(members, choice)
    # symmetric point of the selected member (tabulated: on its grid, no bisection)
    sym = _grid_symmetric_point(tab)
    for j, m in enumerate(members[:3]):
        sym = torch.where(choice == j, m.symmetric_point().expand_as(sym), sym)
    # goodness of fit of the selected family on the bin means (normalized units)
    w2 = wt * wt
    pred = torch.zeros_like(st.y)
    for j, fam in enumerate(FAMILIES):
        if fam in fits:
            pj = _predict(fam, fits[fam], st.x)
        elif fam == "tabulated":
            pj = st.y
        else:
            continue
        pred = torch.where((choice == j).view(-1, 1, 1), pj, pred)
    pred = torch.nan_to_num(pred)
    r2 = _weighted_r2(st.y, pred, w2)
    dir_mean = (w2 * st.y).sum(2, keepdim=True) / w2.sum(2, keepdim=True).clamp_min(1e-300)
    r2_const = _weighted_r2(st.y, dir_mean.expand_as(st.y), w2)
    chi = (w2 * (st.y - pred) ** 2).sum((1, 2))
    k_sel = torch.tensor([N_PARAMS.get(f, 0) for f in FAMILIES], dtype=torch.float64)[choice]
    k_sel = torch.where(choice == FAMILIES.index("tabulated"), n_bins, k_sel)
    chi2_red = chi / (n_bins - k_sel).clamp_min(1)

    def npy(t: Tensor, nan_off: bool = True) -> np.ndarray:
        a = t.detach().cpu().numpy().astype(np.float64)
        if nan_off:
            a = np.where(has_steps.numpy(), a, np.nan)
        return a

    model = np.array([FAMILIES[i] for i in choice.tolist()], dtype=object)
    model[~has_steps.numpy()] = "none"
    fam_idx = np.where(has_steps.numpy(), choice.numpy(), -1)
    params = {fam: {k: npy(v) for k, v in units[fam].items()} for fam in units}
    params["tabulated"] = {"w_grid": tab.w_grid.numpy(), "qp": tab.qp.numpy(),
                           "qm": tab.qm.numpy()}
    return FitResult(
        model=model, family_index=fam_idx, dw_min=npy(dw_min), tau_min=npy(tmin),
        tau_max=npy(tmax), gamma=npy(pick("gamma")), asym=npy(pick("asym")),
        symmetric_point=npy(sym), c2c=npy(c2c_var.sqrt()),
        read_noise=npy(read_var.sqrt() * scale_safe),
        r2=npy(r2), r2_const=npy(r2_const), chi2_red=npy(chi2_red),
        n_steps=st.n_steps.numpy().astype(np.int64), ic=ic.numpy(), criterion=criterion,
        params=params,
        bins={"x": x_units.numpy(), "y": y_units.numpy(), "n": st.n.numpy(),
              "var": (scale_safe.view(-1, 1, 1) ** 2 * st.var).numpy()},
        response=response,
    )
