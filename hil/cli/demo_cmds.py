"""``hil demo``: a guided tour on the embedded emulator, run as a list of named steps.

Each step is a function ``step(console, out_dir) -> None`` whose docstring's first line
is its title; other areas append theirs to :data:`STEPS` (calibration, training, the
virtual chip). Heavy imports stay inside the steps so ``hil --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hil.cli import app

DemoStep = Callable[[Console, Path], None]

DEMO_URL = ("sim://?model=power&gamma=0.5&tau=0.6&asym=0.1&dw_min=5e-3&d2d=0.2&c2c=0.2"
            "&read_noise=0&seed=0")
SWEEP_PULSES = 500  # pulses per half cycle of the sweep (enough to reach both bounds)
SWEEP_CYCLES = 2
ALTERNATING_PAIRS = 1200


def pulse_response_sweep(console: Console, out_dir: Path) -> None:
    """Pulse-response sweep of a power-response device population on sim://"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from rich.progress import track
    from rich.table import Table

    import hil

    rows, cols = 16, 16
    console.print(f"backend [bold]{DEMO_URL}[/bold], tile 'sweep' {rows}x{cols}")
    with hil.open_backend(DEMO_URL) as be:
        tile = be.allocate("sweep", rows, cols)
        dev = tile.devices
        plan = ([1] * SWEEP_PULSES + [-1] * SWEEP_PULSES) * SWEEP_CYCLES
        plan += [1, -1] * ALTERNATING_PAIRS
        trace = [tile.read()]
        ones = torch.ones(rows, cols, dtype=torch.int32)
        for s in track(plan, description="pulsing", console=console, transient=True):
            tile.pulse(s * ones)
            trace.append(tile.read())
    w = torch.stack(trace)  # [T + 1, rows, cols]
    signs = torch.tensor(plan)
    resp = dev.response
    w_before, step = w[:-1], w[1:] - w[:-1]
    up = (signs > 0).view(-1, 1, 1).expand_as(step)
    q_true = torch.where(up, resp.q_plus(w_before), resp.q_minus(w_before))
    expected = dev.dw_min * q_true * torch.where(up, 1.0, -1.0)
    fine = (q_true > 0.1) & ~dev.stuck if dev.stuck is not None else q_true > 0.1
    rel = (step / expected)[fine] - 1  # the cycle-to-cycle noise of every step
    sweep_end = 2 * SWEEP_PULSES * SWEEP_CYCLES
    w_sweep = w[: sweep_end + 1]
    w_star = resp.symmetric_point()
    settled = w[-2 * 100:].mean(0)  # mean over the last 100 alternating pairs

    table = Table(title="pulse-response sweep: set in the URL vs measured (mean over devices)")
    for col in ("quantity", "device parameters", "measured"):
        table.add_column(col, justify="right" if col != "quantity" else "left")
    table.add_row("devices x pulses", "", f"{rows * cols} x {len(plan)}")
    table.add_row("tau_max (highest w reached)", f"{float(dev.tau_max.mean()):.4f}",
                  f"{float(w_sweep.amax(0).mean()):.4f}")
    table.add_row("tau_min (lowest w reached)", f"{float(dev.tau_min.mean()):.4f}",
                  f"{float(w_sweep.amin(0).mean()):.4f}")
    table.add_row("c2c (relative std of a step)", "0.2", f"{float(rel.std()):.4f}")
    table.add_row("symmetric point (alternating up/down)", f"{float(w_star.mean()):.4f}",
                  f"{float(settled.mean()):.4f}")
    table.add_row("  |settled - w_sym| / dw_min, median", "",
                  f"{float(((settled - w_star).abs() / dev.dw_min).median()):.2f}")
    console.print(table)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    t = torch.arange(w.shape[0])
    for k, (i, j) in enumerate([(0, 0), (3, 7), (9, 2), (12, 13)]):
        ax1.plot(t, w[:, i, j], lw=0.8, color=f"C{k}", label=f"device ({i},{j})")
    ax1.plot(t, w.mean((1, 2)), color="k", lw=1.5, label="mean of all devices")
    ax1.axvline(sweep_end, color="grey", ls=":", lw=1)
    ax1.text(sweep_end + 10, 0.52, "alternating\nup/down", fontsize=8, va="top")
    ax1.set(xlabel="pulse number", ylabel="weight w",
            title=f"{SWEEP_CYCLES} cycles of {SWEEP_PULSES} up / {SWEEP_PULSES} down pulses")
    ax1.legend(fontsize=8, loc="upper right")
    i, j = 3, 7
    wb, st, u = w_before[:sweep_end, i, j], step[:sweep_end, i, j], up[:sweep_end, i, j]
    dw = float(dev.dw_min[i, j])
    ax2.scatter(wb[u], st[u] / dw, s=6, alpha=0.5, color="C0", label="measured up step / dw_min")
    ax2.scatter(wb[~u], -st[~u] / dw, s=6, alpha=0.5, color="C3",
                label="measured down step / dw_min")
    grid = torch.linspace(float(dev.tau_min[i, j]), float(dev.tau_max[i, j]), 300)
    qp = resp.q_plus(grid.view(-1, 1, 1).expand(-1, rows, cols))[:, i, j]
    qm = resp.q_minus(grid.view(-1, 1, 1).expand(-1, rows, cols))[:, i, j]
    ax2.plot(grid, qp, color="C0", lw=2, label="true q+(w)")
    ax2.plot(grid, qm, color="C3", lw=2, label="true q-(w)")
    ax2.axvline(float(w_star[i, j]), color="k", ls="--", lw=1, label="symmetric point")
    ax2.set(xlabel="weight w before the pulse", ylabel="step / dw_min",
            title=f"device ({i},{j}): response, c2c noise 0.2")
    ax2.set_ylim(-0.05, 2.7)
    ax2.legend(fontsize=8, loc="upper center", ncols=2)
    path = out_dir / "pulse_response.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    console.print(f"saved [bold]{path}[/bold]")


CALIBRATION_URL = "sim://?model=power&gamma=2&dw_min=0.02&d2d=0.3&c2c=0.1&seed=1"


def calibration_via_virtual_chip(console: Console, out_dir: Path) -> None:
    """Calibration via the SCPI driver: characterize, fit, zero-shift, report"""
    from calibration.demo import demo_calibration
    from drivers.virtual_chip import running

    with running(CALIBRATION_URL, protocol="scpi") as url:
        console.print(f"virtual chip serving [bold]{CALIBRATION_URL}[/bold] at [bold]{url}[/bold]",
                      highlight=False)
        demo_calibration(console, out_dir / "calibration", url)


def training_comparison(console: Console, out_dir: Path) -> None:
    """Why RLv2: Analog SGD vs Tiki-Taka vs RLv2 on asymmetric devices"""
    from hil.cli.demo_training import compare_algorithms

    compare_algorithms(console, out_dir / "training")


STEPS: list[DemoStep] = [pulse_response_sweep, calibration_via_virtual_chip,
                         training_comparison]


def step_rule(k: int, n: int, step: DemoStep) -> str:
    """The rule title of step ``k`` of ``n``: its docstring's first line (it must fit an
    80-column terminal)."""
    title = (step.__doc__ or step.__name__).strip().splitlines()[0]
    return f"[bold]{k}/{n}[/bold] {title}"


def run_steps(steps: list[DemoStep], console: Console, out_dir: Path) -> None:
    """Run each step under a rule titled with its docstring's first line."""
    for k, step in enumerate(steps, start=1):
        console.rule(step_rule(k, len(steps), step))
        step(console, out_dir)


@app.command("demo")
def demo(out: Annotated[Path, typer.Option("--out", help="folder for plots and files")]
         = Path("out/demo")) -> None:
    """Tour the stack on the embedded emulator: pulse response, then the other areas' steps."""
    out.mkdir(parents=True, exist_ok=True)
    run_steps(STEPS, Console(), out)
