"""Emulated pulse-response sweeps of devices with known parameters (tests, benchmarks, docs).

Devices are drawn as the emulator draws a population (relative spread ``d2d`` of dw_min
and both bounds, absolute spread of the asymmetry), of one or several families, and
driven through ``cycles`` x (``pulses`` up, ``pulses`` down) by the emulator's own pulse
kernel (``apply_pulses``: dw_min q(w) (1 + c2c xi), clipped to the bounds), with a read
after every pulse (plus ``read_noise`` per read). Besides the parametric families,
``tabulated`` devices follow no family: soft bounds with a ripple along the range (as
devices whose switching changes mechanism part way), the case the table is for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hil.response import MixedResponse, TabulatedResponse, make_response
from sim_backend import DeviceArray, apply_pulses

PARAMETRIC = ("linear", "power", "exp")
KINDS = (*PARAMETRIC, "tabulated")  # what generated a device's steps
RIPPLE = 0.25  # relative amplitude of a tabulated device's ripple


@dataclass
class SyntheticSweep:
    """Reads [T, D], pulse directions [T - 1] and the true per-device parameters."""

    states: np.ndarray
    directions: np.ndarray
    family: np.ndarray  # str per device
    dw_min: np.ndarray
    tau_min: np.ndarray
    tau_max: np.ndarray
    gamma: np.ndarray
    asym: np.ndarray
    c2c: np.ndarray
    symmetric_point: np.ndarray
    response: MixedResponse


def sweep_population(families: list[str] | np.ndarray, *, dw_min: float | np.ndarray = 0.02,
                     tau: float = 1.0, gamma: float | np.ndarray = 2.0, asym: float = 0.0,
                     d2d: float = 0.3, c2c: float | np.ndarray = 0.1, read_noise: float = 0.0,
                     pulses: int = 400, cycles: int = 2, seed: int = 0) -> SyntheticSweep:
    """One device per entry of ``families`` (from :data:`KINDS`); scalars or per-device
    arrays for dw_min, gamma and c2c (dw_min and the bounds get the relative spread
    ``d2d`` on top)."""
    fam = np.asarray(families, dtype=object)
    n = fam.shape[0]
    g = torch.Generator().manual_seed(seed)

    def spread() -> torch.Tensor:
        return torch.randn(n, generator=g, dtype=torch.float64)

    def per_device(v: float | np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy())

    dw = per_device(dw_min) * (1 + d2d * spread()).clamp_min(0.05)
    tmax = tau * (1 + d2d * spread())
    tmin = -tau * (1 + d2d * spread())
    tmax = torch.maximum(tmax, tmin + 0.05 * tau)
    a = (asym + d2d * spread()).clamp(-0.95, 0.95)
    gam = per_device(gamma)
    idx = torch.as_tensor([KINDS.index(f) for f in fam])
    members = [make_response(f, tau_min=tmin, tau_max=tmax,
                             gamma=torch.ones_like(gam) if f == "linear" else gam, asym=a)
               for f in PARAMETRIC]
    # ripple phases from a generator of their own: the pulse noise stays as it was
    g_phase = torch.Generator().manual_seed(seed + 1)
    phase = 2 * torch.pi * torch.rand((2, n), generator=g_phase, dtype=torch.float64)
    members.append(_rippled(tmin, tmax, a, phase))
    resp = MixedResponse(members, idx)
    c = per_device(c2c)
    dev = DeviceArray(response=resp, dw_min=dw, stuck=None, c2c=c, w0=torch.zeros(n,
                                                                                  dtype=torch.float64))
    w = dev.w0.clone()
    reads = [w.clone()]
    dirs = []
    for _ in range(cycles):
        for sign in (1, -1):
            step = torch.full((n,), sign, dtype=torch.int32)
            for _ in range(pulses):
                w = apply_pulses(w, step, dev, g, engine="eager")
                reads.append(w.clone())
                dirs.append(sign)
    states = torch.stack(reads)
    if read_noise > 0:
        states = states + read_noise * torch.randn(states.shape, generator=g,
                                                   dtype=torch.float64)
    gam_true = torch.where(idx == 0, torch.ones_like(gam), gam)
    gam_true = torch.where(idx == KINDS.index("tabulated"), torch.nan, gam_true)
    return SyntheticSweep(states=states.numpy(), directions=np.array(dirs), family=fam,
                          dw_min=dw.numpy(), tau_min=tmin.numpy(), tau_max=tmax.numpy(),
                          gamma=gam_true.numpy(), asym=a.numpy(), c2c=c.numpy(),
                          symmetric_point=resp.symmetric_point().numpy(), response=resp)


def _rippled(tmin: torch.Tensor, tmax: torch.Tensor, asym: torch.Tensor,
             phase: torch.Tensor, points: int = 65) -> TabulatedResponse:
    """Soft bounds times 1 + RIPPLE sin(3 pi t + phase) (t = 0 .. 1 across the range):
    a response of no parametric family, one and a half ripples over the range."""
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    w = tmin.unsqueeze(1) + (tmax - tmin).unsqueeze(1) * t
    ripple = [1 + RIPPLE * torch.sin(3 * torch.pi * t + p.unsqueeze(1)) for p in phase]
    qp = (1 + asym).unsqueeze(1) * 2 * (1 - t) * ripple[0]
    qm = (1 - asym).unsqueeze(1) * 2 * t * ripple[1]
    return TabulatedResponse(w, qp, qm, tau_min=tmin, tau_max=tmax)


def mixed_population(devices: int, seed: int = 0,
                     kinds: tuple[str, ...] = PARAMETRIC) -> tuple[np.ndarray, np.ndarray]:
    """Model selection's test population: ``devices`` per kind; power gamma in 0.3-0.7
    (30 %) or 1.5-3, exp gamma 1.5-4. Returns the kind and gamma per device (power with
    gamma near 1 and exp near 0 are the linear family, which no fit can tell apart, so
    they are left out of the truth)."""
    rng = np.random.default_rng(seed)
    fam = np.repeat(np.array(kinds, dtype=object), devices)
    low = rng.random(fam.size) < 0.3
    gamma = np.where(fam == "power", np.where(low, rng.uniform(0.3, 0.7, fam.size),
                                              rng.uniform(1.5, 3.0, fam.size)),
                     rng.uniform(1.5, 4.0, fam.size))
    return fam, gamma
