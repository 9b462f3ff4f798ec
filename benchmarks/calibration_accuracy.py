"""Calibration accuracy on emulated devices with known parameters: model selection's
confusion matrix (true kind x chosen family) and the relative error of c2c over a grid of
dw_min / range and c2c.

    .venv/bin/python benchmarks/calibration_accuracy.py [--devices 512] [--seed 0]
        [--only selection|c2c]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# this script's folder holds calibration.py, which shadows the package: drop the folder
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from calibration import fit_traces  # noqa: E402
from calibration.fit import FAMILIES  # noqa: E402
from calibration.synthetic import (  # noqa: E402
    KINDS,
    PARAMETRIC,
    mixed_population,
    sweep_population,
)

RATIOS = (1 / 1000, 1 / 300, 1 / 100, 1 / 20)  # dw_min / range
C2C = (0.05, 0.1, 0.2, 0.5)


def confusion(devices: int, seed: int):
    """A mixed population (calibration.synthetic.mixed_population): linear, power (gamma
    0.3..0.7 or 1.5..3), exp (gamma 1.5..4) and tabulated devices (soft bounds with a
    ripple: no family), d2d 0.3, c2c 0.1, dw_min 0.02 on a range of about 2, 2 cycles of
    400 up / 400 down."""
    fam, gamma = mixed_population(devices, seed, KINDS)
    t0 = time.perf_counter()
    sw = sweep_population(fam, gamma=gamma, d2d=0.3, c2c=0.1, seed=seed)
    res = fit_traces(sw.states, sw.directions)
    print(f"model selection over {fam.size} devices ({devices} per kind; "
          f"{time.perf_counter() - t0:.0f} s)")
    header = "true \\ chosen".ljust(14) + "".join(f"{f:>11}" for f in FAMILIES) + "    right"
    print(header)
    for f in KINDS:
        sel = fam == f
        counts = [int(np.sum(res.model[sel] == g)) for g in FAMILIES]
        print(f"{f:<14}" + "".join(f"{c:>11}" for c in counts)
              + f"  {np.mean(res.model[sel] == f):7.2%}")
    par = fam != "tabulated"
    print(f"right where a parametric family generated the data: "
          f"{np.mean(res.model[par] == fam[par]):.2%}")
    return fam, gamma, res


def c2c_table(devices: int, seed: int) -> None:
    """Median fitted c2c over the true c2c, per family, dw_min / range and c2c (d2d 0.1,
    no read noise, 2 cycles of 400 up / 400 down)."""
    print(f"\nc2c: median fitted / true - 1 over {devices} devices per cell")
    print("family  dw/range " + "".join(f"  c2c {c:<5}" for c in C2C))
    worst = 0.0
    for f in PARAMETRIC:
        for ratio in RATIOS:
            row = []
            for c in C2C:
                sw = sweep_population([f] * devices, dw_min=2 * ratio, c2c=c, d2d=0.1,
                                      seed=seed)
                err = float(np.median(fit_traces(sw.states, sw.directions).c2c) / c - 1)
                row.append(err)
                worst = max(worst, abs(err))
            print(f"{f:<7} 1/{1 / ratio:<6.0f}" + "".join(f"  {e:+9.1%}" for e in row),
                  flush=True)
    print(f"largest |relative error|: {worst:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("selection", "c2c"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.only != "c2c":
        confusion(args.devices, args.seed)
    if args.only != "selection":
        c2c_table(max(args.devices // 8, 16), args.seed)


if __name__ == "__main__":
    main()
