"""The demo's training comparison (hil/cli/demo_training.py) over several seeds: does the
ordering it shows (Analog SGD below Tiki-Taka and RLv2; Analog SGD's W nearer its devices'
symmetric point) hold beyond seed 0? Each seed reseeds the run (initial weights, data split,
sample order, stochastic rounding) and the device population (the sim:// URL's seed).

    nice -n 10 .venv/bin/python experiments/demo_seeds.py --seeds 0,1,2,3,4 --out out/demo_seeds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from hil.cli.demo_training import CONTENDERS, EPOCHS, LIMIT_TRAIN, compare_algorithms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--limit-train", type=int, default=LIMIT_TRAIN)
    ap.add_argument("--out", type=Path, default=Path("out/demo_seeds"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    console = Console()
    table = Table(title="hil demo's training comparison over seeds: final test accuracy % "
                        "(mean |W - w_sym|, both layers)")
    table.add_column("seed")
    for c in CONTENDERS:
        table.add_column(c.label, justify="right")
    table.add_column("ASGD lowest", justify="center")
    table.add_column("s", justify="right")
    accs = {c.algorithm: [] for c in CONTENDERS}
    for seed in seeds:
        t0 = time.perf_counter()
        outcomes = compare_algorithms(Console(quiet=True), args.out / f"seed{seed}", seed=seed,
                                      epochs=args.epochs, limit_train=args.limit_train)
        by = {o.contender.algorithm: o for o in outcomes}
        for a, o in by.items():
            accs[a].append(100 * o.final_accuracy)
        lowest = by["analog_sgd"].final_accuracy < min(by["tiki_taka"].final_accuracy,
                                                        by["rlv2"].final_accuracy)
        table.add_row(str(seed), *(f"{100 * by[c.algorithm].final_accuracy:.1f} "
                                   f"({by[c.algorithm].mean_distance():.3f})"
                                   for c in CONTENDERS),
                      "yes" if lowest else "NO", f"{time.perf_counter() - t0:.0f}")
        console.print(f"seed {seed} done", highlight=False)
    table.add_row("mean+-std", *(f"{np.mean(accs[c.algorithm]):.1f}+-"
                                 f"{np.std(accs[c.algorithm]):.1f}" for c in CONTENDERS), "", "")
    console.print(table)


if __name__ == "__main__":
    main()
