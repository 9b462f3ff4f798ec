"""Per-device response fitting side by side: ours (``calibration.fit_traces``) and aihwkit's
``aihwkit.utils.fitting.fit_measurements`` (lmfit, Powell, the device simulated in the
loop) on the same emulated traces with known parameters.

Traces: soft-bounds (``linear``) and power-law (gamma 2) devices from the emulator
(``calibration.synthetic``: d2d 0.3, c2c 0.1, dw_min 0.02 on bounds near -1 / +1, one read
per pulse, cycles x (pulses up, pulses down)). Ours fits every device at once (one call
for all of them); aihwkit fits one device per call, so it runs on the first ``--subset``
devices of each family (``--subset 16,12``: 16 soft-bounds, 12 power-law). Prints, per
family and fitter, the median relative error of dw_min, tau_min, tau_max, gamma (power)
and the asymmetry (absolute error), the symmetric point's error relative to the device's
range, and the time per device.

    .peers/venv/bin/python benchmarks/aihwkit_fitting.py [--devices 256] [--subset 16]
        [--cache aihwkit_fits.json]

``--cache``: aihwkit's per-device fits are stored in (and reused from) this JSON file,
keyed by family, seed, trace length and device index (the traces are seeded, so the
same key is the same trace): a rerun after a change to ours fits only devices not yet
in the cache.

Needs aihwkit (1.2.0) and lmfit in the peers venv (docs/aihwkit.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

# this script's folder holds calibration.py, which shadows the package: drop the folder
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from calibration import fit_traces  # noqa: E402
from calibration.synthetic import sweep_population  # noqa: E402
from hil.response import make_response  # noqa: E402


def aihwkit_fit(family: str, states: np.ndarray, directions: np.ndarray) -> dict[str, float]:
    """One device through fit_measurements; the result in the paper's (sim's) parameters."""
    from aihwkit.simulator.configs.devices import PowStepDevice, SoftBoundsDevice
    from aihwkit.utils.fitting import fit_measurements

    pulses = np.append(directions, 0).astype(np.float32)  # its last pulse is not applied
    lo, hi = float(states.min()), float(states.max())
    span = hi - lo
    # aihwkit needs 0 inside [w_min, w_max]
    params = {"dw_min": (0.02, 1e-4, 1.0), "up_down": (0.0, -0.95, 0.95),
              "w_min": (lo - 0.05 * span, lo - 1.0 * span, min(lo + 0.3 * span, -1e-3)),
              "w_max": (hi + 0.05 * span, max(hi - 0.3 * span, 1e-3), hi + 1.0 * span)}
    if family == "power":
        device = PowStepDevice(w_min=-1.0, w_max=1.0)
        params["pow_gamma"] = (1.0, 0.05, 5.0)
    else:
        device = SoftBoundsDevice(w_min=-1.0, w_max=1.0)
    res, _, _ = fit_measurements(params, pulses, states.astype(np.float32), device,
                                 suppress_device_noise=True, max_pulses=1, method="powell")
    v = res.params.valuesdict()
    u = v["up_down"]
    scale_up, scale_down = v["dw_min"] * (1 + min(u, 0)), v["dw_min"] * (1 - max(u, 0))
    w_min, w_max = v["w_min"], v["w_max"]
    if family == "power":
        gamma = v["pow_gamma"]
        # step up scale_up ((w_max - w) / range)^gamma = dw (1 + a) ((w_max - w) / s)^gamma
        dw = 0.5 * (scale_up + scale_down) / 2**gamma
        asym = (scale_up - scale_down) / (scale_up + scale_down)
    else:
        gamma = 1.0
        s = 0.5 * (w_max - w_min)
        kp, km = scale_up / w_max, scale_down / abs(w_min)
        dw, asym = 0.5 * s * (kp + km), (kp - km) / (kp + km)
    return {k: float(v) for k, v in (("dw_min", dw), ("tau_min", w_min), ("tau_max", w_max),
                                       ("gamma", gamma), ("asym", asym))}


def symmetric_points(family: str, p: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in p.items()}
    resp = make_response(family, tau_min=t["tau_min"], tau_max=t["tau_max"],
                         gamma=t["gamma"], asym=t["asym"].clamp(-0.999, 0.999))
    return resp.symmetric_point().numpy()


def errors(family: str, est: dict[str, np.ndarray], sw, idx: np.ndarray) -> dict[str, float]:
    def rel(name: str) -> float:
        truth = getattr(sw, name)[idx]
        return float(np.median(np.abs(est[name] - truth) / np.abs(truth)))

    out = {k: rel(k) for k in ("dw_min", "tau_min", "tau_max")}
    if family == "power":
        out["gamma"] = rel("gamma")
    out["asym (abs)"] = float(np.median(np.abs(est["asym"] - sw.asym[idx])))
    rng = sw.tau_max[idx] - sw.tau_min[idx]
    out["sym. point / range"] = float(np.median(
        np.abs(symmetric_points(family, est) - sw.symmetric_point[idx]) / rng))
    return out


def _load(path: str | None) -> dict:
    if path and Path(path).exists():
        return json.loads(Path(path).read_text())
    return {}


def _save(path: str | None, cache: dict) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=256, help="devices per family")
    ap.add_argument("--subset", default="16",
                    help="devices per family for aihwkit: N, or N_SOFT,N_POWER")
    ap.add_argument("--pulses", type=int, default=400)
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--cache", help="JSON file of aihwkit's fits, reused by later runs")
    args = ap.parse_args()
    subsets = [int(v) for v in args.subset.split(",")]
    subsets = subsets * 2 if len(subsets) == 1 else subsets
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for k, family in enumerate(("linear", "power")):
        sw = sweep_population([family] * args.devices, gamma=2.0, d2d=0.3, c2c=0.1,
                              pulses=args.pulses, cycles=args.cycles, seed=10 + k)
        t0 = time.perf_counter()
        res = fit_traces(sw.states, sw.directions, families=(family, "tabulated"))
        ours_t = (time.perf_counter() - t0) / args.devices
        ours = {"dw_min": res.dw_min, "tau_min": res.tau_min, "tau_max": res.tau_max,
                "gamma": res.gamma, "asym": res.asym}
        sub = np.arange(min(subsets[k], args.devices))
        cache = _load(args.cache)
        fits, times = [], []
        for i in sub:
            key = f"{family}/seed{10 + k}/{args.cycles}x{args.pulses}/d2d0.3/c2c0.1/{i}"
            if key not in cache:
                t1 = time.perf_counter()
                fit = aihwkit_fit(family, sw.states[:, i], sw.directions)
                cache[key] = {"fit": fit, "seconds": time.perf_counter() - t1}
                _save(args.cache, cache)
            fits.append(cache[key]["fit"])
            times.append(cache[key]["seconds"])
        kit_t = float(np.mean(times))
        kit = {name: np.array([f[name] for f in fits]) for name in fits[0]}
        ours_sub = {name: v[sub] for name, v in ours.items()}
        e_all = errors(family, ours, sw, np.arange(args.devices))
        e_sub = errors(family, ours_sub, sw, sub)
        e_kit = errors(family, kit, sw, sub)
        print(f"\n{family}: {args.devices} devices, {args.cycles} x ({args.pulses} up, "
              f"{args.pulses} down), d2d 0.3, c2c 0.1; aihwkit on the first {len(sub)}")
        print(f"{'median error':<20}{'ours, all':>12}{'ours, subset':>14}{'aihwkit':>10}"
              f"{'ratio':>8}")
        for name in e_kit:
            ratio = e_kit[name] / max(e_sub[name], 1e-12)
            print(f"{name:<20}{e_all[name]:>12.4f}{e_sub[name]:>14.4f}{e_kit[name]:>10.4f}"
                  f"{ratio:>8.1f}")
        print(f"{'time per device':<20}{ours_t * 1e3:>10.2f}ms{'':>14}{kit_t:>9.2f}s"
              f"{kit_t / ours_t:>8.0f}x")


if __name__ == "__main__":
    main()
