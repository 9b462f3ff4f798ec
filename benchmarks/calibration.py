"""Benchmark: fit all response families to 65,536 devices x 1,000 pulses (target <= 60 s).

Synthetic traces from a mixed power / exponential population (d2d 0.3, c2c 0.1) are
generated first (not timed); then fit_traces runs on all devices at once and the script
prints the fit time, its ratio to the 60 s target and the recovery accuracy.

    .venv/bin/python benchmarks/calibration.py [--devices 65536] [--pulses 1000]

Also prints the process CPU time of the unbinned step pass (``calibration.fit._step_pass``)
against the whole fit, so its cost is a ratio measured in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# this script's name shadows the calibration package when run as a script: drop its folder
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import calibration.fit as fit_module  # noqa: E402
from calibration import fit_traces  # noqa: E402
from hil.response import ExpResponse, MixedResponse, PowerResponse  # noqa: E402

TARGET_S = 60.0


def traces(devices: int, pulses: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reads before and after each of `pulses` pulses: 2 cycles of pulses/4 up, pulses/4 down."""
    g = torch.Generator().manual_seed(seed)

    def spread() -> torch.Tensor:
        return torch.randn(devices, generator=g)

    dw = 0.02 * (1 + 0.3 * spread()).clamp_min(0.05)
    tmax, tmin = 1 + 0.3 * spread(), -1 + 0.3 * spread()
    tmax = torch.maximum(tmax, tmin + 0.1)
    asym = (0.3 * spread()).clamp(-0.95, 0.95)
    fam = (torch.rand(devices, generator=g) < 0.5).long()
    two = torch.full((devices,), 2.0)
    resp = MixedResponse([PowerResponse(tmin, tmax, two, asym), ExpResponse(tmin, tmax, two,
                                                                             asym)], fam)
    quarter = pulses // 4
    dirs = np.array(([1] * quarter + [-1] * quarter) * 2)
    w = torch.zeros(devices)
    out = np.empty((len(dirs) + 1, devices), dtype=np.float32)
    out[0] = w.numpy()
    for k, d in enumerate(dirs):
        q = resp.q_plus(w) if d > 0 else -resp.q_minus(w)
        w = (w + dw * q * (1 + 0.1 * torch.randn(devices, generator=g))).clamp(tmin, tmax)
        out[k + 1] = w.numpy()
    truth = {"dw_min": dw.numpy(), "tau_min": tmin.numpy(), "tau_max": tmax.numpy(),
             "family": np.where(fam.numpy() == 0, "power", "exp")}
    return out, dirs, truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=65_536)
    ap.add_argument("--pulses", type=int, default=1_000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    states, dirs, truth = traces(args.devices, args.pulses)
    print(f"generated {args.devices} devices x {len(dirs)} pulses in "
          f"{time.perf_counter() - t0:.1f} s (not timed); torch threads "
          f"{torch.get_num_threads()}")
    step_cpu = [0.0]
    step_pass = fit_module._step_pass

    def timed_step_pass(*a, **k):  # the step pass's share of the fit, one run
        c = time.process_time()
        try:
            return step_pass(*a, **k)
        finally:
            step_cpu[0] += time.process_time() - c

    fit_module._step_pass = timed_step_pass
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit_traces(states, dirs)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    fit_module._step_pass = step_pass

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.nanmedian(np.abs(a - b) / np.abs(b)))

    print(f"fit (linear, power, exp, tabulated + selection): {elapsed:.1f} s, "
          f"{args.devices / elapsed:,.0f} devices/s, ratio to the {TARGET_S:.0f} s target "
          f"{elapsed / TARGET_S:.2f} ({'PASS' if elapsed <= TARGET_S else 'FAIL'}); "
          f"process CPU time {cpu:.1f} s (wall on a busy machine exceeds it)")
    print(f"unbinned step pass: {step_cpu[0]:.1f} s of the {cpu:.1f} s process CPU time "
          f"(the fit takes {cpu / max(cpu - step_cpu[0], 1e-9):.2f}x the time it would "
          f"without it)")
    print(f"median relative error: dw_min {rel(res.dw_min, truth['dw_min']):.4f}, tau_min "
          f"{rel(res.tau_min, truth['tau_min']):.4f}, tau_max "
          f"{rel(res.tau_max, truth['tau_max']):.4f}, gamma {rel(res.gamma, 2.0):.4f}; "
          f"right family {np.mean(res.model == truth['family']):.3f}")


if __name__ == "__main__":
    main()
