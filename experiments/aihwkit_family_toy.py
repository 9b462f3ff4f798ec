"""Where aihwkit's other algorithms settle on PAPER.md's scalar toy with asymmetric devices.

f(w) = (w - 0.5)^2 / 2 with gradient noise N(0, sigma^2), linear response, tau 1,
amplitude asymmetry 0.3 (every device's symmetric point at 0.3, not 0), dw_min 1e-2;
each of the 1 x N tile's devices is one independent replica, started at w* = 0.5. Prints
the mean of the forward weight over replicas and the last half of the run, and its bias
w - w*, for Analog SGD, TTv2, chopped TTv2, AGAD and mixed precision (chi averaged over
1 and 16 steps). The settings are those of tests/test_algorithms_aihwkit_family.py.

    .venv/bin/python experiments/aihwkit_family_toy.py [--replicas 60] [--steps 1000]
"""

from __future__ import annotations

import argparse

import torch

from hil import open_backend
from hil.algorithms import make_algorithm

W_STAR, ASYM = 0.5, 0.3
CHOP = {"transfer_lr": 0.003, "in_chop_prob": 0.02}
CASES = [  # (label, algorithm, lr, options)
    ("Analog SGD", "analog_sgd", 0.2, {}),
    ("TTv2 (P read as it is)", "ttv2", 0.2, {"transfer_lr": 0.003}),
    ("chopped TTv2", "chopped_ttv2", 0.2, CHOP),
    ("AGAD", "agad", 0.2, CHOP),
    ("mixed precision, transfer_every 1", "mixed_precision", 0.05, {}),
    ("mixed precision, transfer_every 16", "mixed_precision", 0.05, {"transfer_every": 16}),
]


def settle(name: str, lr: float, options: dict, replicas: int, steps: int,
           sigma: float = 0.5) -> float:
    """Mean forward weight over the replicas and the last half of the run."""
    url = f"sim://?model=linear&tau=1&dw_min=1e-2&asym={ASYM}&seed=1"
    with open_backend(url) as be:
        alg = make_algorithm(name, be, (1, replicas), lr=lr, seed=2, **options)
        alg.program_weights(torch.full((1, replicas), W_STAR))
        noise = torch.Generator().manual_seed(3)
        total = torch.zeros(())
        for k in range(steps):
            w = alg.weight()
            if 2 * k >= steps:
                total += w.mean()
            alg.step(w - W_STAR + sigma * torch.randn(w.shape, generator=noise))
    return float(total) / (steps - steps // 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=60)
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args(argv)
    print("| algorithm | lr | options | settles at | bias w - w* |\n|---|---|---|---|---|")
    for label, name, lr, options in CASES:
        w = settle(name, lr, options, args.replicas, args.steps)
        opts = ", ".join(f"{k} {v}" for k, v in options.items()) or "-"
        print(f"| {label} | {lr} | {opts} | {w:.3f} | {w - W_STAR:+.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
