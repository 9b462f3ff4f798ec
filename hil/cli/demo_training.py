"""``hil demo``'s training step: why Residual Learning exists (PAPER.md), in about a minute.

On one asymmetric device population (power response, symmetric point w_sym well away
from 0), Analog SGD, Tiki-Taka and RLv2 train the same 64-32-10 tanh network on sklearn's
digits beside digital SGD. Analog SGD puts the gradient straight onto W, whose devices
pull every weight toward its own w_sym (the implicit penalty of claim 1); Tiki-Taka and
RLv2 put it onto P, zero-shifted so that P's symmetric point is 0, and W moves only by
transfers. The step prints a table of final accuracy and of where each algorithm's arrays
settled against their devices' w_sym, and writes one figure with the learning curves and
the distribution of W - w_sym. Analog SGD runs through the SCPI driver to a virtual chip
serving the population (the others on the same population in-process: same tile names,
same devices). All runs are seeded and go through ``hil train``'s code (run.h5 and
checkpoint per run under ``training/<algorithm>/``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from hil.config import RunConfig, parse_config
from hil.runs import CHECKPOINT, RUN_FILE, load_checkpoint, saved_weights, train_run

# The population: power response gamma 0.5 with up/down asymmetry 0.4, so
# q+ = 1.4 (1 - w/0.6)^0.5 and q- = 0.6 (1 + w/0.6)^0.5 meet at w_sym = +0.41 (69% of the
# way to tau_max), and a weight near 0 drifts up by 0.4 dw_min per pulse of either sign
# (G/F = -0.4); d2d 0.3 spreads w_sym from device to device (mean +0.34, std 0.28 at
# seed 0). The digital solution's weights spread around 0 (mean |w| 0.14 in the hidden
# layer, 0.4 in the output layer), so Analog SGD's pull toward w_sym costs accuracy
# within a minute of training, and Tiki-Taka and RLv2 (P zero-shifted) do not feel it.
POPULATION = ("sim://?model=power&gamma=0.5&tau=0.6&asym=0.4&d2d=0.3&dw_min=1e-3&c2c=0.1"
              "&seed={seed}")
HIDDEN = 32
LR = 0.2  # every algorithm's gradient rate (and digital SGD's), halved halfway
TRANSFER_LR = 0.1
RLV2_GAMMA = 0.1
EPOCHS = 12
LIMIT_TRAIN = 720  # training samples per epoch (of 1438): 72 steps of 10 per epoch
COMPARISON = "comparison.png"
SPARKS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class Contender:
    """One run of the comparison: its label, ``hil train`` algorithm name, and whether it
    goes through the SCPI driver to the virtual chip."""

    label: str
    algorithm: str
    chip: bool = False


CONTENDERS = (Contender("digital SGD", "digital"),
              Contender("Analog SGD", "analog_sgd", chip=True),
              Contender("Tiki-Taka", "tiki_taka"),
              Contender("RLv2", "rlv2"))


@dataclass
class Outcome:
    """What one contender's run left: per-epoch test accuracy, wall time, the backend it
    ran on, and w - w_sym of every device of each array, by tile name (``0.W``, ``2.P``)."""

    contender: Contender
    backend: str
    accuracy: np.ndarray
    seconds: float
    offsets: dict[str, np.ndarray]

    @property
    def final_accuracy(self) -> float:
        return float(self.accuracy[-1])

    def roles(self) -> list[str]:
        """The array roles it holds, W first (W, P)."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.offsets},
                      key=lambda r: (r != "W", r))

    def layer_offsets(self, role: str) -> list[np.ndarray]:
        """w - w_sym of the role's array in each layer, input side first."""
        names = [n for n in self.offsets if n.rsplit(".", 1)[-1] == role]
        return [self.offsets[n] for n in sorted(names, key=_layer_index)]

    def mean_distance(self, role: str = "W") -> float:
        """mean |w - w_sym| over every device of the role's arrays (all layers)."""
        return float(np.abs(np.concatenate(self.layer_offsets(role))).mean())


def _layer_index(tile: str) -> tuple[int, str]:
    head = tile.rsplit(".", 1)[0]
    return (int(head), head) if head.isdigit() else (1 << 30, head)


def population_url(seed: int) -> str:
    """The demo's device population, seeded."""
    return POPULATION.format(seed=int(seed))


def demo_config(contender: Contender, backend: str, *, seed: int, epochs: int,
                limit_train: int) -> RunConfig:
    """The ``hil train`` config of one contender (same network, data, seed and rate)."""
    algorithm: dict[str, object] = {"name": contender.algorithm, "lr": LR}
    if contender.algorithm in ("tiki_taka", "rlv2"):
        algorithm.update(transfer_lr=TRANSFER_LR, zero_shift=True)
    if contender.algorithm == "rlv2":
        algorithm["gamma"] = RLV2_GAMMA
    return parse_config({
        "name": contender.label, "seed": int(seed), "backend": backend,
        "model": {"hidden": [HIDDEN], "activation": "tanh"},
        "data": {"name": "digits", "limit_train": int(limit_train)},
        "algorithm": algorithm,
        "train": {"epochs": int(epochs), "batch_size": 10},
    }, "<demo>")


def sparkline(values: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> str:
    """One block character per value on the fixed scale [lo, hi] (so rows compare)."""
    frac = np.clip((np.asarray(values, dtype=float) - lo) / (hi - lo), 0.0, 1.0)
    return "".join(SPARKS[int(round(f * (len(SPARKS) - 1)))] for f in frac)


def symmetric_points(url: str, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Each named tile's device symmetric points on the emulator ``url`` (its devices follow
    from the URL's seed and the tile name, so they are those of every run on it)."""
    import hil

    with hil.open_backend(url) as be:
        return {name: be.allocate(name, *shape).devices.response.symmetric_point()
                .detach().to("cpu", torch.float32) for name, shape in shapes.items()}


def final_weights(contender: Contender, ckpt: dict) -> dict[str, torch.Tensor]:
    """The arrays a run ended with, by tile name (a digital run's weights under the names
    its W tiles would have: layer ``0``'s weight is ``0.W``); references left out."""
    if contender.algorithm == "digital":
        return {f"{key.removesuffix('.weight')}.W": w.to(torch.float32)
                for key, w in ckpt["model"].items() if key.endswith(".weight")}
    return {name: w.to(torch.float32) for name, w in saved_weights(ckpt).items()
            if not name.endswith(".P_ref")}


def settled_offsets(weights: dict[str, torch.Tensor], w_sym: dict[str, torch.Tensor]
                    ) -> dict[str, np.ndarray]:
    """w - w_sym of every device, by tile name."""
    return {name: (w - w_sym[name]).numpy().ravel() for name, w in weights.items()}


@contextmanager
def _backend_for(contender: Contender, population: str, console: Console) -> Iterator[str]:
    """The URL a contender trains on: the population itself, or a virtual chip serving it
    (started here, stopped when the run ends: outputs safe, as on every driver path)."""
    if not contender.chip:
        yield population
        return
    from drivers.virtual_chip import running

    with running(population, protocol="scpi") as url:
        console.print(f"{contender.label}: virtual chip serving the population at "
                      f"[bold]{url}[/bold]", highlight=False)
        yield url


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tiles of a few thousand devices: one torch thread is fastest, and far faster than
    two on a machine whose cores are busy with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compare_algorithms(console: Console, out_dir: Path, *, seed: int = 0,
                       epochs: int = EPOCHS, limit_train: int = LIMIT_TRAIN) -> list[Outcome]:
    """Train every contender on the seeded population, then print the table and write
    ``out_dir/comparison.png``; each run's files go to ``out_dir/<algorithm>/``."""
    population = population_url(seed)
    w_sym = torch.cat([w.ravel() for w in symmetric_points(
        population, {"0.W": (HIDDEN, 64), "2.W": (10, HIDDEN)}).values()])
    console.print(f"device population [bold]{population}[/bold]: power response with up/down "
                  f"asymmetry; the W devices' symmetric points w_sym: mean "
                  f"{float(w_sym.mean()):+.2f}, std {float(w_sym.std()):.2f}", highlight=False)
    console.print(f"digits 64-{HIDDEN}-10 tanh, {limit_train} training samples x {epochs} "
                  f"epochs, batch 10, lr {LR} for all (halved halfway); Tiki-Taka and RLv2 "
                  "zero-shift P", highlight=False)
    bar = Progress(TextColumn("[bold]{task.description}", table_column=Column(width=26)),
                   BarColumn(bar_width=None), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(),
                   console=console, transient=False)
    outcomes: list[Outcome] = []
    with _one_thread(), bar:
        for contender in CONTENDERS:
            out = Path(out_dir) / contender.algorithm
            for name in (RUN_FILE, CHECKPOINT):  # a rerun of the demo starts afresh
                (out / name).unlink(missing_ok=True)
            t0 = time.perf_counter()
            with _backend_for(contender, population, console) as url:
                cfg = demo_config(contender, url, seed=seed, epochs=epochs,
                                  limit_train=limit_train)
                result = train_run(cfg, out, console=console, bar=bar)
            seconds = time.perf_counter() - t0
            weights = final_weights(contender, load_checkpoint(out / CHECKPOINT))
            w_sym = symmetric_points(population, {k: tuple(v.shape) for k, v in
                                                  weights.items()})
            outcomes.append(Outcome(contender, url, np.asarray(result.metrics["test_acc"]),
                                    seconds, settled_offsets(weights, w_sym)))
    print_comparison(console, outcomes)
    path = Path(out_dir) / COMPARISON
    plot_comparison(outcomes, path)
    console.print(f"saved [bold]{path}[/bold] (learning curves; where W settled)")
    return outcomes


def print_comparison(console: Console, outcomes: list[Outcome]) -> None:
    """The table (fits 80 columns) and a summary line of the measured numbers."""
    table = Table(title="final test accuracy, and mean |w - w_sym| of each layer's array "
                        "(w_sym: each device's own symmetric point)",
                  box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    table.add_column("run")
    table.add_column("test acc", justify="right")
    table.add_column("per epoch")
    table.add_column("array")
    table.add_column("hidden", justify="right")
    table.add_column("output", justify="right")
    for o in outcomes:
        c = o.contender
        for k, role in enumerate(o.roles()):
            first = k == 0
            array = "weights" if c.algorithm == "digital" else \
                {"W": "W", "P": "P (gradient)"}.get(role, role)
            layers = [f"{np.abs(off).mean():.3f}" for off in o.layer_offsets(role)]
            table.add_row(c.label + (" (chip)" if c.chip else "") if first else "",
                          f"{100 * o.final_accuracy:.1f}%" if first else "",
                          sparkline(o.accuracy) if first else "", array,
                          layers[0], layers[-1])
    console.print(table)
    console.print("digital SGD's weights are measured against the W devices' w_sym too (where "
                  "weights lie when no device pulls them); (chip): through the SCPI driver to "
                  "the virtual chip. P takes the gradient, zero-shifted: it works at its own "
                  "w_sym, where the devices' pull vanishes.", highlight=False)
    by = {o.contender.algorithm: o for o in outcomes}
    if {"analog_sgd", "tiki_taka", "rlv2"} <= set(by):
        asgd = by["analog_sgd"]
        best = max((by["tiki_taka"], by["rlv2"]), key=lambda o: o.final_accuracy)
        gap = 100 * (best.final_accuracy - asgd.final_accuracy)
        dist = ", ".join(f"{by[a].contender.label} {by[a].mean_distance():.3f}" for a in by)
        console.print(f"[bold]{best.contender.label}[/bold] ends {gap:+.1f} points above "
                      f"Analog SGD. Mean |W - w_sym| over both layers: {dist}.",
                      highlight=False)
    console.print("wall time per run (setup included): " + ", ".join(
        f"{o.contender.label} {o.seconds:.0f} s" for o in outcomes), highlight=False)


def plot_comparison(outcomes: list[Outcome], path: Path) -> None:
    """Test accuracy per epoch of every run, and histograms of W - w_sym in the hidden and
    the output layer (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True,
                             gridspec_kw={"width_ratios": [1.2, 1, 1]})
    for k, o in enumerate(outcomes):
        c = o.contender
        style = {"color": "k", "ls": "--"} if c.algorithm == "digital" else {"color": f"C{k}"}
        epochs = np.arange(1, len(o.accuracy) + 1)
        axes[0].plot(epochs, 100 * o.accuracy, marker="o", ms=3,
                     label=c.label + (" (SCPI, virtual chip)" if c.chip else ""), **style)
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)",
                title="digits on one asymmetric device population")
    axes[0].legend(loc="lower right", fontsize=9)
    axes[0].grid(alpha=0.3)
    for ax, layer, name in ((axes[1], 0, "hidden"), (axes[2], -1, "output")):
        both = np.concatenate([o.layer_offsets("W")[layer] for o in outcomes])
        bins = np.linspace(float(np.quantile(both, 0.002)), float(np.quantile(both, 0.998)),
                           50)
        for k, o in enumerate(outcomes):
            c = o.contender
            style = {"color": "k", "ls": "--"} if c.algorithm == "digital" else \
                {"color": f"C{k}"}
            ax.hist(o.layer_offsets("W")[layer], bins=bins, histtype="step", lw=1.5,
                    density=True, label=c.label + (" weights" if c.algorithm == "digital"
                                                   else " W"), **style)
        ax.axvline(0, color="grey", lw=1, ls=":")
        ax.set(xlabel="w - w_sym (each device's own symmetric point)", ylabel="density",
               title=f"where W settled: {name} layer")
        ax.legend(fontsize=8)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
