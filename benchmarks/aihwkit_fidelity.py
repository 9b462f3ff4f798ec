"""Fidelity against IBM aihwkit: the same devices give the same trajectories and update
statistics here and there (the mapping of docs/aihwkit.md).

    .peers/venv/bin/python benchmarks/aihwkit_fidelity.py [--part all|traj|stats]

1. Pulse-response trajectories of matched noiseless devices (sim populations built from
   aihwkit's own per-device hidden parameters): max |difference| / (tau_max - tau_min).
2. Mean and variance of the change per device of one stochastic pulse-train update,
   repeated from the same state: per-device z-scores (difference / standard error).
Digits accuracy of the FCN with Analog SGD and Tiki-Taka in both is
benchmarks/aihwkit_accuracy.py. Needs aihwkit (`pip install -e .[peers]`); never part of
make test. Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_aihwkit import (  # noqa: E402
    DeviceSpec,
    peer_device,
    peer_update,
    require_aihwkit,
)

import hil  # noqa: E402
from hil.response import LinearResponse, PowerResponse  # noqa: E402
from sim_backend import DeviceArray, SimBackend, SimConfig  # noqa: E402

TRAJ_TOL = 1e-6  # max |w_here - w_aihwkit| / (tau_max - tau_min)
Z_TOL = 3.0  # standard errors


# -- 1. trajectories -----------------------------------------------------------------------
def peer_tile(spec: DeviceSpec, rows: int, cols: int, update=None, seed: int = 1):
    """A bare aihwkit analog tile (no periphery on the update) for ``spec`` devices."""
    from aihwkit.simulator.configs import SingleRPUConfig

    dev = peer_device(spec)
    dev.construction_seed = seed
    cfg = SingleRPUConfig(device=dev, update=update or peer_update(spec))
    tile = cfg.tile_class(rows, cols, cfg)
    tile.set_weights(torch.zeros(rows, cols))
    return tile


def population_from_peer(spec: DeviceSpec, hidden: dict[str, torch.Tensor]
                         ) -> Callable[[str, int, int, torch.Generator], DeviceArray]:
    """sim devices equal to aihwkit's per-device parameters (docs/aihwkit.md, Devices)."""
    tmax, tmin = hidden["max_bound"].float(), hidden["min_bound"].float()
    su, sd = hidden["dwmin_up"].float(), hidden["dwmin_down"].float()
    half = (tmax - tmin) / 2
    if spec.model == "linear":  # steps su + slope_up w = -slope_up (tmax - w), likewise down
        cu, cd = -hidden["slope_up"].float(), hidden["slope_down"].float()
        dw = half * (cu + cd) / 2
        asym = (cu - cd) / (cu + cd)
        response = LinearResponse(tau_min=tmin, tau_max=tmax, asym=asym)
    else:  # steps su ((tmax - w)/(2 half))^g: (1 +- a) dw = s 2^-g
        g = hidden["gamma_up"].float()
        if not torch.equal(g, hidden["gamma_down"].float()):
            raise ValueError("pow_up_down has no sim counterpart (one gamma per device)")
        cu, cd = su * 2.0 ** -g, sd * 2.0 ** -g
        dw = (cu + cd) / 2
        asym = (cu - cd) / (cu + cd)
        response = PowerResponse(tau_min=tmin, tau_max=tmax, gamma=g, asym=asym)

    def population(name: str, rows: int, cols: int, gen: torch.Generator) -> DeviceArray:
        return DeviceArray(response=response, dw_min=dw, stuck=None, c2c=0.0,
                           w0=torch.zeros(rows, cols))
    return population


def hidden_params(tile) -> dict[str, torch.Tensor]:
    """aihwkit's hidden per-device parameters of a SingleRPUConfig tile, by name."""
    return {k.removeprefix("hidden_"): v for k, v in tile.get_hidden_parameters().items()}


def check_trajectories(spec: DeviceSpec, rows: int = 16, cols: int = 32, n_up: int = 400,
                       n_down: int = 800) -> float:
    """Drive every device n_up pulses up, then n_down down, in both; max relative gap."""
    from aihwkit.simulator.configs import UpdateParameters

    one_pulse = UpdateParameters(desired_bl=1, fixed_bl=True, update_bl_management=False,
                                 update_management=False)
    tile = peer_tile(spec, rows, cols, update=one_pulse)
    tile.set_learning_rate(spec.peer_dw_min * 1.0001)  # p = 1 for x = d = 1: one pulse each
    hidden = hidden_params(tile)
    cfg = SimConfig(model=spec.model, tau_min=-spec.tau, tau_max=spec.tau, io="ideal",
                    engine="eager")
    be = SimBackend("sim://fidelity", cfg, population=population_from_peer(spec, hidden))
    ours = be.allocate("traj", rows, cols)
    ones_x, ones_d = torch.ones(1, cols), torch.ones(1, rows)
    span = (hidden["max_bound"] - hidden["min_bound"]).float()
    worst = 0.0
    for sign, count in ((+1, n_up), (-1, n_down)):
        n = torch.full((rows, cols), sign, dtype=torch.int32)
        for _ in range(count):
            tile.update(ones_x, -sign * ones_d)  # aihwkit: W -= lr d x^T
            ours.pulse(n)
            gap = ((tile.get_weights()[0] - ours.read()).abs() / span).max().item()
            worst = max(worst, gap)
    moved = (ours.read().abs() / span).max().item()
    if moved < 1e-3:
        raise RuntimeError("trajectory check moved no device: the pulse drive is wrong")
    return worst


# -- 2. update statistics ---------------------------------------------------------------------
def _moments(samples: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-device mean, variance and their standard errors from [R, ...] samples."""
    r = samples.shape[0]
    mean = samples.mean(0)
    dev = samples - mean
    var = dev.pow(2).sum(0) / (r - 1)
    m4 = dev.pow(4).mean(0)
    se_mean = (var / r).sqrt()
    se_var = ((m4 - var.pow(2) * (r - 3) / (r - 1)).clamp_min(0) / r).sqrt()
    return mean, var, se_mean, se_var


def check_update_stats(spec: DeviceSpec, rows: int = 16, cols: int = 16, batch: int = 2,
                       lr: float = 0.01, reps: int = 1500, seed: int = 3) -> dict[str, float]:
    """One outer_update from w = 0, repeated ``reps`` times in both: z of mean and variance."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, cols, generator=gen) * 2 - 1
    d = torch.rand(batch, rows, generator=gen) * 2 - 1
    tile = peer_tile(spec, rows, cols)
    tile.set_learning_rate(lr * spec.peer_lr_scale)
    zeros = torch.zeros(rows, cols)
    peer = torch.empty(reps, rows, cols)
    for k in range(reps):
        tile.set_weights(zeros)
        tile.update(x, d)
        peer[k] = tile.get_weights()[0]
    ours = torch.empty(reps, rows, cols)
    with hil.open_backend(spec.sim_url(seed=seed)) as be:
        t = be.allocate("stats", rows, cols)
        for k in range(reps):
            t.w.zero_()  # the emulator's state: back to w = 0 without pulses
            t.outer_update(x, d, -lr)
            ours[k] = t.read()
    ma, va, sma, sva = _moments(peer)
    mo, vo, smo, svo = _moments(ours)
    z_mean = (ma - mo).abs() / (sma.pow(2) + smo.pow(2)).sqrt().clamp_min(1e-30)
    z_var = (va - vo).abs() / (sva.pow(2) + svo.pow(2)).sqrt().clamp_min(1e-30)
    expected = (lr * d.abs().t() @ x.abs()).sum() / spec.dw_min  # expected pulses per call
    return {"pulses_per_call": expected.item(),
            "z_mean_max": z_mean.max().item(), "z_var_max": z_var.max().item(),
            "frac_mean_over_3": (z_mean > Z_TOL).float().mean().item(),
            "frac_var_over_3": (z_var > Z_TOL).float().mean().item()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=("all", "traj", "stats"))
    args = ap.parse_args(argv)
    require_aihwkit()
    ok = True
    if args.part in ("all", "traj"):
        print("## pulse-response trajectories (noiseless, d2d 0.2, 400 up then 800 down)")
        for spec in (DeviceSpec("linear", d2d=0.2), DeviceSpec("linear", asym=0.3, d2d=0.2),
                     DeviceSpec("power", gamma=0.5, d2d=0.2), DeviceSpec("power", gamma=2.0,
                                                                           d2d=0.2)):
            gap = check_trajectories(spec)
            ok &= gap <= TRAJ_TOL
            print(f"- {spec.model} gamma={spec.gamma} asym={spec.asym}: max |gap| / range = "
                  f"{gap:.2e} ({'ok' if gap <= TRAJ_TOL else 'FAIL'}, tolerance {TRAJ_TOL:g})")
    if args.part in ("all", "stats"):
        print("## pulse-train update statistics (16x16, batch 2, lr 0.01, 1500 repeats)")
        for spec in (DeviceSpec("linear"), DeviceSpec("linear", asym=0.3),
                     DeviceSpec("power", gamma=0.5), DeviceSpec("linear", c2c=0.3)):
            s = check_update_stats(spec)
            good = s["frac_mean_over_3"] <= 0.01 and s["frac_var_over_3"] <= 0.01
            ok &= good
            print(f"- {spec.model} gamma={spec.gamma} c2c={spec.c2c}: "
                  f"{s['pulses_per_call']:.0f} pulses/call; devices beyond 3 SE: mean "
                  f"{100 * s['frac_mean_over_3']:.1f}%, variance {100 * s['frac_var_over_3']:.1f}%"
                  f" (max z {s['z_mean_max']:.2f} / {s['z_var_max']:.2f}; "
                  f"{'ok' if good else 'FAIL'}: at most 1% expected beyond 3 SE)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
