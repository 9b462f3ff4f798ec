"""Digits accuracy here and in IBM aihwkit for the same method on the same devices (issue 6).

The FCN 64-256-128-10 (sigmoid, log-softmax + NLL, no bias) trains on sklearn's digits
(hil.data.load_digits: the split `hil train` uses) with the paper's MNIST settings (batch
10, lr 0.05, lr x0.5 halfway), from the same initial weights and in the same sample order
on both sides, with Analog SGD and Tiki-Taka on devices both simulators implement alike
(soft bounds, power gamma 0.5; tau 0.6, dw_min 1e-3) behind the paper's periphery. The
mapping is benchmarks/vs_aihwkit.py's (docs/aihwkit.md). Needs aihwkit; never in make test:

    .peers/venv/bin/python benchmarks/aihwkit_accuracy.py [--epochs 30] [--seeds 3] \\
        [--act sigmoid|tanh] [--transfer-read as-mapped|exact|noisy|mvm] \\
        [--transfer-write counts|pulse_train] [--chop-form sample|step] \\
        [--lr 0.05] [--transfer-lr 0.1] [--out FILE.json]

Prints one markdown row per method and device: test accuracy here and in aihwkit after
the last epoch and over the last 5 (mean +- sd over seeds), their differences +- standard
error (paired by seed). --out keeps every run's per-epoch curve and lets a rerun resume
(e.g. with more seeds). Exit code 1 when a final-epoch mean difference exceeds 1 point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_aihwkit import FCN, METHODS, DeviceSpec, our_layer, peer_rpu_config, require_aihwkit  # noqa: E402

import hil  # noqa: E402
from hil.data import Dataset, load_digits  # noqa: E402

ACC_TOL = 1.0  # accuracy points
SIZES = [(64, 256), (256, 128), (128, 10)]  # (in, out) per layer
DEVICES = {
    "soft bounds": DeviceSpec("linear"),
    "power gamma=0.5": DeviceSpec("power", gamma=0.5),
}
LABELS = {"sgd": "Analog SGD", "tt": "Tiki-Taka", "cttv2": "c-TTv2", "agad": "AGAD",
          "mp": "mixed precision"}
READS_P = ("tt", "cttv2", "agad")  # the methods that read P in a transfer (--transfer-read)
TRANSFER_READS = {  # Tiki-Taka's read of P: (aihwkit transfer_forward, sim:// read_noise,
    # hil transfer_read)
    "as-mapped": ("periphery", 0.0, "exact"),  # one-hot MVM there, exact tile read here
    "exact": ("perfect", 0.0, "exact"),  # both exact
    "noisy": ("periphery", 0.06, "exact"),  # both add the periphery's output noise 0.06
    "mvm": ("periphery", 0.0, "mvm"),  # both: one-hot MVM through the same periphery
}
ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh}


@dataclass(frozen=True)
class Setting:
    """What every run of one invocation shares."""

    epochs: int = 30
    lr: float = 0.05
    batch: int = 10
    lr_decay: float = 0.5  # applied once, at epochs // 2 (the paper: x0.5 every 15 of 30)
    act: str = "sigmoid"
    c2c: float = 0.0
    train_limit: int = 0  # 0: all 1438 training images
    transfer_read: str = "as-mapped"  # how Tiki-Taka reads P; see TRANSFER_READS
    transfer_write: str = "counts"  # how Tiki-Taka writes W here: counts or pulse_train
    # c-TTv2 / AGAD here: 'sample' (P updated sample by sample, one column transferred
    # after each: aihwkit's order) or 'step' (the batch's update, then 10 columns); the
    # dataclass default is 'step' so that result files from before the option read as such
    chop_form: str = "step"
    transfer_lr: float = 0.0  # > 0: every two-tile method's transfer_lr, on both sides


def initial_weights(seed: int, tau: float) -> list[torch.Tensor]:
    """torch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), clipped to +-tau."""
    gen = torch.Generator().manual_seed(seed)
    return [((torch.rand(o, i, generator=gen) * 2 - 1) / math.sqrt(i)).clamp(-tau, tau)
            for i, o in SIZES]


StepFn = Callable[[float], None]  # one update with the lr scaled by the argument


def method_of(key: str, chop_form: str = "sample"):
    """The benchmark's method for ``key``: the chopped ones transfer one column a sample,
    aihwkit's default units, so that their chopper periods fit the run: here either in
    aihwkit's order (``chop_form='sample'``: each sample's update of P, then its column)
    or the batch's whole update followed by its 10 columns ('step')."""
    if key not in ("cttv2", "agad"):
        return METHODS[key]
    return METHODS[f"{key}-ps" if chop_form == "sample" else f"{key}-b10"]


def configured(key: str, s: Setting):
    """The method of ``key`` with this invocation's options: the transfer's read and write
    (here only: aihwkit's side takes them from TRANSFER_READS), the chopped ones' form,
    and ``transfer_lr`` (both sides alike)."""
    method = method_of(key, s.chop_form)
    if key == "tt":
        method = replace(method, transfer_write=s.transfer_write)
    if key in READS_P:
        method = replace(method, transfer_read=TRANSFER_READS[s.transfer_read][2])
    if s.transfer_lr > 0 and key != "sgd":
        method = replace(method, transfer_lr=s.transfer_lr)
    return method


def build_here(spec: DeviceSpec, key: str, inits: list[torch.Tensor], s: Setting, seed: int
               ) -> tuple[FCN, StepFn, Callable[[], None]]:
    """The FCN over hil.layers.AnalogLinear on sim://, updated by outer_update."""
    noise = TRANSFER_READS[s.transfer_read][1]
    backend = hil.open_backend(spec.sim_url(seed=seed) + (f"&read_noise={noise}" if noise else ""))
    method = configured(key, s)
    layers = [our_layer(backend, spec, method, o, i, s.lr, f"fc{k}", seed=seed, init=w)
              for k, ((i, o), w) in enumerate(zip(SIZES, inits, strict=True))]

    def step(scale: float) -> None:
        for layer in layers:
            layer.analog_step(lr_scale=scale)
    return FCN(layers, act=ACTS[s.act]), step, backend.close


def build_peer(spec: DeviceSpec, key: str, inits: list[torch.Tensor], s: Setting, seed: int
               ) -> tuple[FCN, StepFn, Callable[[], None]]:
    """The same FCN over aihwkit's AnalogLinear with its AnalogSGD."""
    from aihwkit.nn import AnalogLinear as PeerLinear
    from aihwkit.optim import AnalogSGD

    torch.manual_seed(seed)
    cfg = peer_rpu_config(spec, configured(key, s))
    if key in READS_P and TRANSFER_READS[s.transfer_read][0] == "perfect":
        from aihwkit.simulator.configs import IOParameters

        cfg.device.transfer_forward = IOParameters(is_perfect=True)
    layers = [PeerLinear(i, o, bias=False, rpu_config=cfg) for i, o in SIZES]
    for layer, w in zip(layers, inits, strict=True):
        layer.set_weights(w)  # compounds: W gets w, P stays 0 (as here); mixed prec.: chi 0
    net = FCN(layers, act=ACTS[s.act])
    base = s.lr * spec.peer_lr_scale
    opt = AnalogSGD(net.parameters(), lr=base)
    opt.regroup_param_groups(net)

    def step(scale: float) -> None:
        for group in opt.param_groups:
            group["lr"] = base * scale
        opt.step()
    return net, step, lambda: None


def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (net(x).argmax(1) == y).float().mean().item()


def train(side: str, spec: DeviceSpec, key: str, seed: int, s: Setting, data: Dataset,
          on_epoch: Callable[[], None]) -> list[float]:
    """Test accuracy (%) after each epoch of one run on ``side`` ('here' or 'aihwkit')."""
    build = build_here if side == "here" else build_peer
    net, step, close = build(spec, key, initial_weights(seed, spec.tau), s, seed)
    n = s.train_limit or data.x_train.shape[0]
    xtr, ytr = data.x_train[:n], data.y_train[:n]
    order = torch.Generator().manual_seed(seed + 1)
    curve = []
    try:
        for epoch in range(s.epochs):
            scale = s.lr_decay if epoch >= s.epochs // 2 and s.epochs > 1 else 1.0
            for idx in torch.randperm(n, generator=order).split(s.batch):
                for p in net.parameters():
                    p.grad = None
                torch.nn.functional.nll_loss(net(xtr[idx]), ytr[idx]).backward()
                step(scale)
            curve.append(accuracy(net, data.x_test, data.y_test))
            on_epoch()
    finally:
        close()
    return curve


def run_key(key: str, device: str, seed: int, side: str) -> str:
    return f"{key}|{device}|{seed}|{side}"


def save(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


LAST = 5  # epochs averaged for the smoother statistic


def _paired(runs: dict[str, dict], key: str, dev: str, seeds: list[int], last: int
            ) -> tuple[list[float], list[float]]:
    """Per-seed accuracy (mean of the last ``last`` epochs) here and in aihwkit, paired."""
    here, peer = [], []
    for seed in seeds:
        a, b = run_key(key, dev, seed, "here"), run_key(key, dev, seed, "aihwkit")
        if a in runs and b in runs:
            here.append(statistics.fmean(runs[a]["curve"][-last:]))
            peer.append(statistics.fmean(runs[b]["curve"][-last:]))
    return here, peer


def _mean_sd(v: list[float]) -> str:
    return f"{statistics.fmean(v):.2f} +- {statistics.stdev(v) if len(v) > 1 else math.nan:.2f}"


def _diff(here: list[float], peer: list[float]) -> tuple[float, str]:
    d = [a - b for a, b in zip(here, peer, strict=True)]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return statistics.fmean(d), f"{statistics.fmean(d):+.2f} +- {se:.2f}"


def table(runs: dict[str, dict], keys: list[str], devices: list[str], seeds: list[int]
          ) -> tuple[list[str], bool]:
    """Markdown rows per method and device, and whether every final-epoch mean difference
    is within ACC_TOL. Accuracies: mean +- sd over seeds; differences: mean +- SE."""
    head = ["method", "device", "seeds", "final: here (%)", "final: aihwkit (%)",
            "final: difference", f"last {LAST}: here (%)", f"last {LAST}: aihwkit (%)",
            f"last {LAST}: difference", f"final within {ACC_TOL:g}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ok = True
    for key in keys:
        for dev in devices:
            here, peer = _paired(runs, key, dev, seeds, 1)
            if not here:
                continue
            here5, peer5 = _paired(runs, key, dev, seeds, LAST)
            mean, diff = _diff(here, peer)
            good = abs(mean) <= ACC_TOL
            ok &= good
            lines.append(f"| {LABELS[key]} | {dev} | {len(here)} | {_mean_sd(here)} | "
                         f"{_mean_sd(peer)} | {diff} | {_mean_sd(here5)} | {_mean_sd(peer5)} | "
                         f"{_diff(here5, peer5)[1]} | {'yes' if good else 'NO'} |")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="sgd,tt",
                    help=f"comma list of: {', '.join(LABELS)}")
    ap.add_argument("--devices", default=",".join(DEVICES),
                    help=f"comma list of: {', '.join(DEVICES)}")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--act", default="sigmoid", choices=sorted(ACTS))
    ap.add_argument("--c2c", type=float, default=0.0, help="c2c here = dw_min_std there")
    ap.add_argument("--transfer-read", default="as-mapped", choices=list(TRANSFER_READS),
                    help="Tiki-Taka's read of P: as-mapped (aihwkit through its periphery, "
                    "sim exact), exact (both), noisy (both with output noise 0.06), mvm "
                    "(both through the periphery: a one-hot MVM here too)")
    ap.add_argument("--transfer-write", default="counts", choices=["counts", "pulse_train"],
                    help="Tiki-Taka's write of W here: stochastically rounded counts (the "
                    "paper's form) or a pulse train through outer_update (aihwkit's form)")
    ap.add_argument("--chop-form", default="sample", choices=["sample", "step"],
                    help="c-TTv2 / AGAD here: sample (P updated sample by sample, one column "
                    "transferred after each, aihwkit's order) or step (the batch's update, "
                    "then its 10 columns; the form before transfer_unit existed)")
    ap.add_argument("--transfer-lr", type=float, default=0.0,
                    help="> 0: the transfer_lr of every method that has one, on both sides "
                    "(default: the method's, 0.1; mixed precision 1)")
    ap.add_argument("--train-limit", type=int, default=0, help="first N training images only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON of every run's per-epoch test accuracy; reruns resume from it")
    args = ap.parse_args(argv)
    keys = [k for k in args.methods.split(",") if k]
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    for k in keys:
        if k not in LABELS:
            ap.error(f"--methods: unknown method {k!r} ({', '.join(LABELS)})")
    for d in devices:
        if d not in DEVICES:
            ap.error(f"--devices: unknown device {d!r} ({', '.join(DEVICES)})")
    require_aihwkit()
    import aihwkit
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    torch.set_num_threads(args.threads)
    s = Setting(epochs=args.epochs, lr=args.lr, act=args.act, c2c=args.c2c,
                train_limit=args.train_limit, transfer_read=args.transfer_read,
                transfer_write=args.transfer_write, chop_form=args.chop_form,
                transfer_lr=args.transfer_lr)
    data = load_digits(test_fraction=0.2, seed=0)
    seeds = list(range(args.seeds))
    runs: dict[str, dict] = {}
    if args.out is not None and args.out.exists():
        old = json.loads(args.out.read_text())
        if {**asdict(Setting()), **old.get("setting", {})} == asdict(s):
            runs = old["runs"]
    jobs = [(k, d, seed, side) for seed in seeds for k in keys for d in devices
            for side in ("here", "aihwkit") if run_key(k, d, seed, side) not in runs]
    load = os.getloadavg()
    print(f"aihwkit {aihwkit.__version__}, torch {torch.__version__}, {args.threads} thread(s), "
          f"load average {load[0]:.1f} at start; digits {data.x_train.shape[0]} train / "
          f"{data.x_test.shape[0]} test; {s}", flush=True)
    if len(runs):
        print(f"resuming: {len(runs)} runs read from {args.out}", flush=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("digits", total=len(jobs) * s.epochs)
        for k, d, seed, side in jobs:
            bar.update(task, description=f"{LABELS[k]}, {d}, seed {seed}, {side}")
            spec = replace(DEVICES[d], c2c=s.c2c)
            t0 = time.perf_counter()
            curve = train(side, spec, k, seed, s, data, lambda: bar.advance(task))
            runs[run_key(k, d, seed, side)] = {"curve": curve, "seconds": time.perf_counter() - t0}
            bar.console.print(f"{LABELS[k]}, {d}, seed {seed}, {side}: {curve[-1]:.2f}% "
                              f"({time.perf_counter() - t0:.0f} s; per epoch "
                              f"{' '.join(f'{a:.0f}' for a in curve)})")
            if args.out is not None:
                save(args.out, {"setting": asdict(s), "runs": runs})
    lines, ok = table(runs, keys, devices, seeds)
    print("\n".join(lines))
    load = os.getloadavg()
    print(f"\ntest accuracy on {data.x_test.shape[0]} images after the last epoch (final) and "
          f"averaged over the last {LAST} epochs, mean +- sd over seeds; difference = here - "
          "aihwkit, mean +- its standard error over seeds (paired: same initial weights and "
          f"sample order); load average {load[0]:.1f} at the end")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
