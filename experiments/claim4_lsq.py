"""PAPER.md claim 4 on the paper's least-squares toy: gamma = 0 versus gamma = 0.4 under asymmetry.

f(W) = 1/2 ||A W - b||^2 with A (rows x D) ~ N(0, 1), W* ~ 0.5 N(0, 1), b = A W*; linear
response tau = 3.5, dw_min = 1e-4, amplitude asymmetry c (sim:// asym=c, symmetric point
c * tau), W written to 1, P at 0, Residual Learning (or RLv2) through hil.algorithms.
Noisy gradients (--noise): 'gauss' adds N(0, sigma^2) to each entry of the exact gradient
(the noise model of PAPER.md claims 1-3); 'rows' uses a random minibatch of rows scaled to
an unbiased estimate (no noise at W*, since b = A W* exactly). Every tile row is one
independent replica (its own noise and rounding) of the same problem instance.

Predicted biased point (gauss): P is stationary at 0 only where E[g] F(0) = -E|g| G(0),
i.e. H (W_bar - W*) = c E|g| with H = A^T A; solved by fixed-point iteration with the
folded-normal mean of g. For 'rows' the noise vanishes at W*, so the prediction is W*;
with --zero-shift-cycles (P read against a reference at its symmetric point) it is W*.

    .venv/bin/python experiments/claim4_lsq.py --out out/claim4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hil import open_backend
from hil.algorithms import ResidualLearning, ResidualLearningV2
from hil.program import program

ALGORITHMS = {"rl": ResidualLearning, "rlv2": ResidualLearningV2}
TAIL = 100  # last steps averaged for the stationary (bias) estimate
PROGRAM_ITERS = 2000  # write-verify rounds (64 pulses each): enough for |w| up to tau here


def problem(seed: int, rows: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rows x dim) ~ N(0, 1) and W* ~ 0.5 N(0, 1), float64, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    w_star = 0.5 * torch.randn(dim, generator=gen, dtype=torch.float64)
    return a, w_star


def folded_mean(mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """E|mu + sigma xi| for xi ~ N(0, 1)."""
    if sigma == 0:
        return mu.abs()
    z = mu / sigma
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return sigma * 2 * pdf + mu * torch.erf(z / math.sqrt(2))


def predicted_point(a: torch.Tensor, w_star: torch.Tensor, c: float, sigma: float,
                    noise: str, shifted: bool = False, iters: int = 200) -> torch.Tensor:
    """W_bar where H (W_bar - W*) = c E|g(W_bar)| (P stationary at 0; see module doc);
    W* when P is zero-shifted (G(0) = 0)."""
    if noise == "rows" or c == 0 or sigma == 0 or shifted:
        return w_star.clone()
    h = a.T @ a
    e = torch.zeros_like(w_star)
    for _ in range(iters):
        e = c * torch.linalg.solve(h, folded_mean(h @ e, sigma))
    return w_star + e


def fix_reference(alg: ResidualLearning) -> None:
    """Write-verify the zero-shift reference to P's settled value to convergence.

    The algorithms' own zero-shift setup runs write-verify with at most 100 rounds of
    64 pulses, which at dw_min = 1e-4 cannot reach a symmetric point beyond about 0.7
    (c = 0.3 puts it at 1.05); here the rounds continue until every device is within
    dw_min.
    """
    result = program(alg.tiles["P_ref"], alg.read("P"), max_iter=PROGRAM_ITERS)
    if result.fraction_converged < 1:
        raise RuntimeError("zero-shift reference did not converge")


def gradient(a: torch.Tensor, w_star: torch.Tensor, w_bar: torch.Tensor, noise: str,
             sigma: float, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Noisy gradient of f at each replica's W_bar (replicas x D), float32."""
    w = w_bar.to(torch.float64)
    e = w - w_star
    if noise == "gauss":
        g = e @ (a.T @ a) + sigma * torch.randn(w.shape, generator=gen, dtype=torch.float64)
    else:
        n = a.shape[0]
        idx = torch.stack([torch.randperm(n, generator=gen)[:batch] for _ in range(w.shape[0])])
        ab = a[idx]  # replicas x batch x D
        resid = torch.einsum("rbd,rd->rb", ab, e)
        g = (n / batch) * torch.einsum("rbd,rb->rd", ab, resid)
    return g.to(torch.float32)


def run_one(args: argparse.Namespace, a: torch.Tensor, w_star: torch.Tensor, c: float,
            gamma: float, sigma: float, seed: int) -> dict:
    """One (c, gamma, sigma, seed) cell: the error curve and the final and tail errors."""
    url = f"sim://?model=linear&tau={args.tau}&dw_min={args.dw_min}&asym={c}&seed={seed}"
    d = a.shape[1]
    shape = (args.replicas, d)
    t0 = time.perf_counter()
    with open_backend(url) as be:
        shift = {"zero_shift": True, "zero_shift_cycles": args.zero_shift_cycles} \
            if args.zero_shift_cycles else {}
        alg = ALGORITHMS[args.algorithm](be, shape, lr=args.lr, transfer_lr=args.transfer_lr,
                                         gamma=gamma, seed=seed + 7, **shift)
        if args.zero_shift_cycles:  # finish the reference write-verify (see fix_reference)
            fix_reference(alg)
        if alg.program_weights(torch.full(shape, args.w0), max_iter=PROGRAM_ITERS) < 1:
            raise RuntimeError(f"W did not reach w0 = {args.w0} by write-verify")
        gen = torch.Generator().manual_seed(seed + 11)
        curve, tail, p_tail = [], [], []
        for k in range(args.steps):
            w_bar = alg.weight()
            err = ((w_bar.to(torch.float64) - w_star) ** 2).sum(1) / d
            curve.append(float(err.mean()))
            if k >= args.steps - TAIL:
                tail.append(w_bar.to(torch.float64))
                p_tail.append(alg.read_p().to(torch.float64))
            alg.step(gradient(a, w_star, w_bar, args.noise, sigma, args.batch, gen))
        w_end = alg.weight().to(torch.float64)
    pred = predicted_point(a, w_star, c, sigma, args.noise, bool(args.zero_shift_cycles))
    mean_tail = torch.stack(tail).mean(0)  # replicas x D
    return {
        "c": c, "gamma": gamma, "sigma": sigma, "seed": seed,
        "final_err": float((((w_end - w_star) ** 2).sum(1) / d).mean()),
        "tail_bias": float((((mean_tail - w_star) ** 2).sum(1) / d).mean()),
        "tail_to_pred": float((((mean_tail - pred) ** 2).sum(1) / d).mean()),
        "pred_bias": float(((pred - w_star) ** 2).sum() / d),
        "p_tail_mean": float(torch.stack(p_tail).mean()),
        "seconds": time.perf_counter() - t0,
        "curve": curve,
    }


def summarize(cells: list[dict], key: str) -> tuple[float, float]:
    """Mean and standard deviation over seeds of ``key``."""
    v = torch.tensor([x[key] for x in cells], dtype=torch.float64)
    return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0


def table(results: list[dict], sigmas: list[float], cs: list[float],
          gammas: list[float]) -> str:
    """Markdown table: one row per (sigma, c), final and tail errors per gamma."""
    head = "| sigma | c | predicted bias |" + "".join(
        f" final err g={g} | tail bias g={g} | tail to pred g={g} |" for g in gammas)
    lines = [head, "|---|---|---|" + "---|---|---|" * len(gammas)]
    for s in sigmas:
        for c in cs:
            row = [r for r in results if r["sigma"] == s and r["c"] == c]
            pred = summarize(row, "pred_bias")[0]
            line = f"| {s:g} | {c:g} | {pred:.2e} |"
            for g in gammas:
                cell = [r for r in row if r["gamma"] == g]
                for key in ("final_err", "tail_bias", "tail_to_pred"):
                    m, sd = summarize(cell, key)
                    line += f" {m:.2e} +- {sd:.1e} |"
            lines.append(line)
    return "\n".join(lines)


def plot(results: list[dict], sigmas: list[float], cs: list[float], gammas: list[float],
         noise: str, path: Path) -> None:
    """Error curves, one panel per sigma, colour per c, line style per gamma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sigmas), figsize=(5 * len(sigmas), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, s in zip(axes[0], sigmas, strict=True):
        for i, c in enumerate(cs):
            for j, g in enumerate(gammas):
                curves = torch.tensor([r["curve"] for r in results
                                       if r["sigma"] == s and r["c"] == c and r["gamma"] == g])
                ax.semilogy(curves.mean(0).numpy(), color=colors[i % len(colors)],
                            linestyle=styles[j % len(styles)], label=f"c={c:g}, gamma={g:g}")
        ax.set_title(f"sigma = {s:g}" if noise == "gauss" else "minibatch rows, b = A W*")
        ax.set_xlabel("iteration")
        ax.set_ylabel("||W_bar - W*||^2 / D")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cs", type=floats, default=floats("0,0.1,0.2,0.3"), help="asymmetries c")
    p.add_argument("--gammas", type=floats, default=floats("0,0.4"))
    p.add_argument("--sigmas", type=floats, default=floats("0,10,30"),
                   help="gradient noise std per entry ('gauss')")
    p.add_argument("--noise", choices=("gauss", "rows"), default="gauss")
    p.add_argument("--batch", type=int, default=10, help="rows per minibatch ('rows')")
    p.add_argument("--algorithm", choices=tuple(ALGORITHMS), default="rl")
    p.add_argument("--seeds", type=int, default=3, help="problem instances (A, W*)")
    p.add_argument("--replicas", type=int, default=8, help="independent runs per instance")
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--tau", type=float, default=3.5)
    p.add_argument("--dw-min", type=float, default=1e-4)
    p.add_argument("--w0", type=float, default=1.0, help="initial W")
    p.add_argument("--lr", type=float, default=None,
                   help="P rate alpha; default 1/L with L = rows (1 + sqrt(dim/rows))^2")
    p.add_argument("--transfer-lr", type=float, default=None, help="beta; default alpha")
    p.add_argument("--zero-shift-cycles", type=int, default=0,
                   help="zero-shift P with this many up/down pulse pairs (0: off)")
    p.add_argument("--out", type=Path, default=Path("out/claim4"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.lr is None:
        args.lr = 1.0 / (args.rows * (1 + math.sqrt(args.dim / args.rows)) ** 2)
    if args.transfer_lr is None:
        args.transfer_lr = args.lr
    if args.noise == "rows":
        args.sigmas = [0.0]  # the noise comes from the minibatch; sigma is unused
    console = Console()
    console.print(f"alpha = {args.lr:.3e}, beta = {args.transfer_lr:.3e}, noise = {args.noise}")
    args.out.mkdir(parents=True, exist_ok=True)
    cells = [(s, c, g, seed) for s in args.sigmas for c in args.cs for g in args.gammas
             for seed in range(args.seeds)]
    results = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("claim 4", total=len(cells))
        for s, c, g, seed in cells:
            bar.update(task, description=f"sigma={s:g} c={c:g} gamma={g:g} seed={seed}")
            a, w_star = problem(seed, args.rows, args.dim)
            results.append(run_one(args, a, w_star, c, g, s, seed))
            bar.advance(task)
    md = table(results, args.sigmas, args.cs, args.gammas)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps(
        {"settings": settings,
         "cells": [{k: v for k, v in r.items() if k != "curve"} for r in results]}, indent=1))
    (args.out / "claim4.md").write_text(md + "\n")
    plot(results, args.sigmas, args.cs, args.gammas, args.noise, args.out / "claim4.png")
    console.print(md)
    console.print("mean +- std over seeds (instances); each value is the mean over "
                  f"{args.replicas} replicas; tail = last {TAIL} steps")


if __name__ == "__main__":
    main()
