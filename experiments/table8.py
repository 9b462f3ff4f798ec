"""Reproduce the pattern of PAPER.md Table 8 on digits (or MNIST with --mnist DIR).

Digital SGD, Analog SGD, Tiki-Taka and RLv2 for power responses gamma_res in
{0.5, 1, 2} and the exponential response, tau = 0.6, dw_min = 1e-3, each run through
hil.runs.train_run (the code path of ``hil train``). Prints a markdown table and
writes it to OUT/table8.md, with every run's directory (run.h5, curves.png) under OUT.

    .venv/bin/python experiments/table8.py --epochs 30 --out out/table8
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console

from hil.config import parse_config
from hil.runs import train_run

HERE = Path(__file__).resolve().parent
RESPONSES = {"power 0.5": ("power", 0.5), "power 1": ("power", 1.0),
             "power 2": ("power", 2.0), "exp 1": ("exp", 1.0)}
ALGORITHMS = ("analog_sgd", "tiki_taka", "rlv2")
LABELS = {"analog_sgd": "Analog SGD", "tiki_taka": "Tiki-Taka", "rlv2": "RLv2"}


def cell_config(base: dict, algorithm: str, response: tuple[str, float] | None,
                tau: float, args: argparse.Namespace) -> dict:
    cfg = copy.deepcopy(base)
    cfg["train"]["epochs"] = args.epochs
    cfg["algorithm"]["name"] = algorithm
    if args.update:
        cfg["algorithm"]["update"] = args.update
    if algorithm == "digital":
        cfg["algorithm"]["lr"] = 0.1
    if response is not None:
        family, gamma = response
        cfg["backend"] = (f"sim://?model={family}&gamma={gamma}&tau={tau}&dw_min=1e-3"
                          f"&seed={cfg['seed']}")
    if args.mnist:
        cfg["data"] = {"name": "mnist", "path": str(args.mnist)}
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=HERE / "table8_digits.yaml")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--tau", type=float, default=0.6)
    p.add_argument("--mnist", type=Path, default=None, help="directory of the MNIST IDX files")
    p.add_argument("--responses", default=",".join(RESPONSES),
                   help="comma-separated subset of: " + ", ".join(RESPONSES))
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help="comma-separated subset of: " + ", ".join(ALGORITHMS)
                   + "; 'digital' alone runs only the digital SGD baseline")
    p.add_argument("--seed", type=int, default=None,
                   help="override the config's seed (init, data split and order, emulator)")
    p.add_argument("--update", choices=("auto", "outer", "pulse"), default=None,
                   help="override the config's gradient update path")
    p.add_argument("--out", type=Path, default=Path("out/table8"))
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    base = yaml.safe_load(args.config.read_text())
    if args.seed is not None:
        base["seed"] = args.seed
    algs = [a for a in args.algorithms.split(",") if a and a != "digital"]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def run(key: str, cfg: dict) -> float:
        if key in results:
            return results[key]["acc"]
        out = args.out / key.replace(" ", "_")
        t0 = time.perf_counter()
        res = train_run(parse_config(cfg, str(args.config)), out, console=console,
                        progress=False)
        results[key] = {"acc": 100 * res.final_accuracy, "seconds": time.perf_counter() - t0,
                        "backend": cfg["backend"], "algorithm": cfg["algorithm"]}
        results_path.write_text(json.dumps(results, indent=1))
        console.print(f"[bold]{key}[/bold]: {results[key]['acc']:.2f}%")
        return results[key]["acc"]

    digital = run("digital", cell_config(base, "digital", None, args.tau, args))
    rows = []
    for label in args.responses.split(",") if algs else []:
        accs = {a: run(f"{a} {label}", cell_config(base, a, RESPONSES[label], args.tau, args))
                for a in algs}
        rows.append((label, accs))
    lines = [f"| response (tau={args.tau}) | digital SGD |"
             + "".join(f" {LABELS[a]} |" for a in algs),
             "|---|---|" + "---|" * len(algs)]
    for label, accs in rows:
        lines.append(f"| {label} | {digital:.2f} |"
                     + "".join(f" {accs[a]:.2f} |" for a in algs))
    if not rows:
        lines.append(f"| - | {digital:.2f} |")
    table = "\n".join(lines)
    (args.out / "table8.md").write_text(table + "\n")
    console.print(table)


if __name__ == "__main__":
    main()
