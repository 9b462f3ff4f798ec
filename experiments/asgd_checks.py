"""Checks that Analog SGD at chance on digits is physics, not a bug (RESULTS.md).

1. Write-verify of a layer-sized initial weight (256 x 64, uniform +-1/8, torch's init
   bound for 64 inputs) onto power 0.5 / power 2 / exponential responses at tau = 0.6.
2. Analog SGD on a near-ideal device (linear, tau = 100, dw_min = 1e-4) against digital
   SGD, same lr 0.1, no decay, EPOCHS epochs of the Table 8 digits setup: the train
   losses should agree (same sign and scale of the pulse path).

    .venv/bin/python experiments/asgd_checks.py --epochs 6 --out out/asgd_checks
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from rich.console import Console

from hil import open_backend
from hil.algorithms import AnalogSGD
from hil.config import parse_config
from hil.runs import train_run

HERE = Path(__file__).resolve().parent
IDEAL = "sim://?model=linear&tau=100&dw_min=1e-4&seed=0"


def check_init(console: Console) -> None:
    gen = torch.Generator().manual_seed(0)
    w0 = (torch.rand(256, 64, generator=gen) * 2 - 1) / 8
    for family, gamma in (("power", 0.5), ("power", 2.0), ("exp", 1.0)):
        with open_backend(f"sim://?model={family}&gamma={gamma}&tau=0.6&dw_min=1e-3&seed=0") as be:
            alg = AnalogSGD(be, (256, 64), lr=0.05)
            frac = alg.program_weights(w0)
            err = float((alg.read("W") - w0).abs().max())
        console.print(f"init {family} {gamma}: converged {100 * frac:.1f}%, max error {err:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--out", type=Path, default=Path("out/asgd_checks"))
    args = p.parse_args()
    torch.set_num_threads(1)
    console = Console()
    check_init(console)
    base = yaml.safe_load((HERE / "table8_digits.yaml").read_text())
    losses = {}
    for name in ("digital", "analog_sgd"):
        cfg = dict(base, backend=IDEAL)
        cfg["algorithm"] = dict(base["algorithm"], name=name, lr=0.1, update="pulse")
        cfg["train"] = dict(base["train"], epochs=args.epochs, decay_every=10_000)
        res = train_run(parse_config(cfg, "asgd_checks"), args.out / name, console=console,
                        progress=False)
        losses[name] = [f"{x:.4f}" for x in res.metrics["train_loss"]]
    for name, row in losses.items():
        console.print(f"{name} train loss per epoch: {' '.join(row)}", highlight=False)


if __name__ == "__main__":
    main()
