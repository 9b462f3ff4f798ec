"""Training runs: model and backend from a RunConfig, the epoch loop, atomic checkpoints,
``--resume`` to the same final weights, the HDF5 run file and PNG curves.

Used by ``hil train``, by ``hil sweep`` and by ``hil demo`` (hil/cli/demo_training.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from hil.backend import Backend, open_backend
from hil.config import RunConfig, parse_config
from hil.data import Dataset, least_squares, load_digits, load_mnist
from hil.errors import BackendURLError, ConfigError
from hil.outpath import check_dir
from hil.runstore import RunFile, plot_curves, read_metrics

CHECKPOINT = "checkpoint.pt"
RUN_FILE = "run.h5"
CURVES = "curves.png"
DEVICE_MISMATCH_FRACTION = 0.01  # devices allowed off the checkpoint's weights on resume


@dataclass
class RunResult:
    """What a run left behind: where, how far it got, and its per-epoch metrics."""

    out_dir: Path
    completed: bool
    global_step: int
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float | None:
        acc = self.metrics.get("test_acc")
        return float(acc[-1]) if acc is not None and len(acc) else None


def load_dataset(cfg: RunConfig, config_path: str = "<config>") -> Dataset:
    """The data set a config names (errors name the config file and field)."""
    d = cfg.data
    if d.name == "digits":
        ds = load_digits(d.test_fraction, seed=cfg.seed)
    elif d.name == "mnist":
        try:
            return load_mnist(d.path, d.limit_train, d.limit_test)
        except (OSError, ValueError) as exc:
            raise ConfigError(config_path, "data.path", str(exc)) from None
    else:
        ds = least_squares(n_inputs=d.n_inputs, n_outputs=d.n_outputs, seed=cfg.seed)
    ds.x_train, ds.y_train = ds.x_train[:d.limit_train], ds.y_train[:d.limit_train]
    ds.x_test, ds.y_test = ds.x_test[:d.limit_test], ds.y_test[:d.limit_test]
    return ds


def build_model(cfg: RunConfig, ds: Dataset) -> nn.Sequential:
    """The digital FCN (seeded init); log-softmax output for classification."""
    torch.manual_seed(cfg.seed)
    act = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}[cfg.model.activation]
    layers: list[nn.Module] = []
    width = ds.n_inputs
    for h in cfg.model.hidden:
        layers += [nn.Linear(width, h), act()]
        width = h
    layers.append(nn.Linear(width, ds.n_outputs))
    if ds.task == "classification":
        layers.append(nn.LogSoftmax(dim=-1))
    return nn.Sequential(*layers)


def make_analog(model: nn.Module, cfg: RunConfig, backend: Backend, program_init: bool) -> None:
    """Convert the model's layers in place, one seeded algorithm per layer."""
    from hil.algorithms import make_algorithm
    from hil.layers import convert_to_analog

    a = cfg.algorithm
    counter = iter(range(1_000_000))
    # a resumed run finds its tiles set up: no zero-shift settling pulses on P again
    resumed = {"zero_shift_cycles": 0} if a.zero_shift and not program_init else {}

    def factory(be: Backend, shape: tuple[int, int], prefix: str):
        return make_algorithm(
            a.name, be, shape, lr=a.lr, transfer_lr=a.transfer_lr, gamma=a.gamma,
            transfer_every=a.transfer_every, transfer=a.transfer, zero_shift=a.zero_shift,
            transfer_read=a.transfer_read, transfer_write=a.transfer_write,
            mvm_read=a.mvm_read, update=a.update,
            max_pulses=a.max_pulses, prefix=prefix,
            seed=cfg.seed * 1000 + next(counter), **resumed)

    convert_to_analog(model, backend, factory, io=a.io, program_init=program_init)


def _loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    return F.nll_loss(out, y) if task == "classification" else F.mse_loss(out, y)


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, batch: int = 1000) -> tuple[float, float | None]:
    """Test loss and accuracy (None for regression)."""
    total, correct = 0.0, 0
    n = ds.x_test.shape[0]
    for i in range(0, n, batch):
        out = model(ds.x_test[i:i + batch])
        y = ds.y_test[i:i + batch]
        total += float(_loss(out, y, ds.task)) * y.shape[0]
        if ds.task == "classification":
            correct += int((out.argmax(-1) == y).sum())
    return total / n, (correct / n if ds.task == "classification" else None)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temp file beside ``path``, then os.replace: never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A run's checkpoint, loaded with ``weights_only=True`` (tensors and plain containers
    only: a crafted file cannot run code); an unreadable one is one ConfigError."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, random bytes, foreign pickles ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(str(path), "checkpoint", f"unreadable ({first[:160]}); rerun "
                          "without --resume into another --out") from None
    need = ("config", "position", "model", "optimizer", "torch_rng")
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise ConfigError(str(path), "checkpoint", "not a hil train checkpoint")
    return state


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen)


def run_dir(cfg: RunConfig, out_dir: Path | None = None) -> Path:
    """Where a run writes: ``out_dir``, else the config's out_dir, else runs/NAME."""
    return Path(out_dir or cfg.out_dir or Path("runs") / cfg.name)


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'field: old -> new' for every value that differs (the backend URL may change: a
    resumed run may reach the same chip through another address)."""
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if name in ("backend", "out_dir"):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def train_run(cfg: RunConfig, out_dir: Path | None = None, *, config_path: str = "<config>",
              resume: bool = False, backend_url: str | None = None,
              console: Console | None = None, progress: bool = True,
              stop_after_steps: int | None = None, force: bool = False,
              reprogram: bool = False,
              wrap_backend: Callable[[Backend], Backend] | None = None,
              bar: Progress | None = None) -> RunResult:
    """Train as ``cfg`` says; checkpoint atomically (also at step 0 and at an interrupted
    step's end); with ``resume`` continue from the checkpoint in ``out_dir``: a config
    that differs from the run's is refused unless ``force``; on a backend without
    snapshots (a chip) the devices must still hold the checkpoint's weights, unless
    ``reprogram`` writes them back. ``stop_after_steps`` stops abruptly after that many
    global steps without a final checkpoint (what a kill leaves; used by tests).
    ``wrap_backend`` wraps the opened backend (``hil validate`` records each step's
    pulses). ``bar``: a started Progress of the caller's (several runs side by side) that
    gets this run's task, named after the run, instead of a bar of its own; the per-epoch
    lines and the figure (curves.png) are then the caller's."""
    console = console or Console()
    if backend_url is not None:
        cfg = parse_config({**cfg.model_dump(), "backend": backend_url}, config_path)
    out = run_dir(cfg, out_dir)
    ckpt_path = out / CHECKPOINT
    ckpt: dict[str, Any] | None = None
    if resume:
        if not ckpt_path.exists():
            raise ConfigError(str(out), "--resume", "no checkpoint to resume from")
        ckpt = load_checkpoint(ckpt_path)
        changes = config_changes(ckpt["config"], cfg.model_dump())
        if changes and not force:
            raise ConfigError(config_path, changes[0].split(":")[0],
                              f"differs from the run's config ({'; '.join(changes)}); "
                              "resume with the run's config, or pass --force")
    elif ckpt_path.exists():
        raise ConfigError(str(out), "out_dir", "already holds a run (use --resume or another "
                                               "out_dir)")
    check_dir(out, "out_dir")  # before the backend opens: nothing is pulsed for nothing
    ds = load_dataset(cfg, config_path)
    analog = cfg.algorithm.name != "digital"
    backend: Backend | None = None
    if analog:
        try:
            backend = open_backend(cfg.backend)
        except BackendURLError as exc:
            raise ConfigError(config_path, "backend", str(exc)) from None
        if wrap_backend is not None:
            backend = wrap_backend(backend)
    try:
        return _train(cfg, ds, out, backend, ckpt, console, progress, stop_after_steps,
                      reprogram, bar)
    finally:
        if backend is not None:
            backend.close()


def _run_tiles(model: nn.Module) -> dict[str, Any]:
    """The tiles the model's analog layers use, by name."""
    from hil.layers import analog_layers

    return {t.name: t for layer in analog_layers(model)
            for t in layer.algorithm.tiles.values()}


def saved_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tiles' weights a checkpoint holds: read from a chip, else an emulator's
    snapshot (so a run begun on an emulator can be reprogrammed onto a chip)."""
    if ckpt.get("devices"):
        return dict(ckpt["devices"])
    snap = ckpt.get("backend") or {}
    return {name: entry["w"] for name, entry in snap.items()
            if isinstance(entry, dict) and isinstance(entry.get("w"), torch.Tensor)}


def check_devices(model: nn.Module, saved: dict[str, torch.Tensor], out: Path,
                  reprogram: bool, console: Console) -> None:
    """A resumed run on a chip: every tile must still hold the checkpoint's read weights
    (within the read noise, measured now from two reads), else refuse in one line, or
    write them back with hil.program when ``reprogram``."""
    from hil.program import program

    tiles = _run_tiles(model)
    missing = sorted(set(tiles) - set(saved))
    if missing:
        raise ConfigError(str(out / CHECKPOINT), "devices",
                          f"holds no weights for tile {missing[0]}: not this run's backend?")
    for name, tile in tiles.items():
        target = saved[name].to(torch.float32)
        if tuple(target.shape) != tile.shape:
            raise ConfigError(str(out / CHECKPOINT), "devices",
                              f"tile {name} is {tile.shape}, checkpoint has "
                              f"{tuple(target.shape)}")
        if reprogram:
            res = program(tile, target)
            console.print(f"reprogrammed tile {name}: {res.fraction_converged:.1%} of devices "
                          f"within dw_min of the checkpoint", highlight=False)
            continue
        first, second = tile.read().cpu(), tile.read().cpu()
        noise = float((first - second).std()) / 2 ** 0.5 if first.numel() > 1 else 0.0
        tol = 6 * noise + 2 * tile.dw_min
        off = (0.5 * (first + second) - target).abs() > tol
        if float(off.float().mean()) > DEVICE_MISMATCH_FRACTION:
            raise ConfigError(
                str(out / CHECKPOINT), "devices",
                f"tile {name}: {int(off.sum())} of {off.numel()} devices no longer hold the "
                f"checkpoint's weights (beyond {tol:.3g}: read noise {noise:.3g}, dw_min "
                f"{tile.dw_min:.3g}); a reset or another chip? resume with --reprogram to "
                "write the checkpoint's weights back")


def _train(cfg: RunConfig, ds: Dataset, out: Path, backend: Backend | None,
           ckpt: dict[str, Any] | None, console: Console, progress: bool,
           stop_after_steps: int | None, reprogram: bool = False,
           outer_bar: Progress | None = None) -> RunResult:
    from hil import interrupts
    from hil.optim import AnalogOptimizer

    model = build_model(cfg, ds)
    a = cfg.algorithm
    if backend is not None:
        make_analog(model, cfg, backend, program_init=ckpt is None)
        opt: Any = AnalogOptimizer(model, a.digital_lr or a.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=a.lr)
    pos = {"epoch": 0, "batch": 0, "global_step": 0, "loss_sum": 0.0, "loss_n": 0}
    snapshot = backend is not None and backend.capabilities.snapshot
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if backend is not None:
            if snapshot and ckpt.get("backend") is not None:
                backend.load_state_dict(ckpt["backend"])
            else:  # a chip, or an emulator resuming a run that began on a chip
                check_devices(model, saved_weights(ckpt), out, reprogram, console)
        torch.set_rng_state(ckpt["torch_rng"])
        pos = dict(ckpt["position"])
    out.mkdir(parents=True, exist_ok=True)
    config = cfg.model_dump()

    def checkpoint() -> None:
        devices = None
        if backend is not None and not snapshot:  # a chip keeps its state: record what it holds
            devices = {name: t.read().detach().to("cpu", torch.float32).clone()
                       for name, t in _run_tiles(model).items()}
        save_checkpoint(out / CHECKPOINT, {
            "config": config, "position": dict(pos), "model": model.state_dict(),
            "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
            "backend": backend.state_dict() if snapshot else None, "devices": devices,
        })

    if ckpt is None:
        checkpoint()  # step 0: a run that fails on its first step can be resumed
    run = RunFile(out / RUN_FILE, config, keep_rows=pos["epoch"], fresh=ckpt is None)

    t = cfg.train
    n = ds.x_train.shape[0]
    steps_per_epoch = (n + t.batch_size - 1) // t.batch_size
    bar = outer_bar or Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
        console=console, disable=not progress, transient=False)
    name = f"{cfg.name} " if outer_bar is not None else ""
    completed = True
    boundary = True  # the devices, model and position agree (a checkpoint may be written)
    try:
        with bar if outer_bar is None else contextlib.nullcontext():
            # one task over the whole run (steps), so its elapsed time is the run's
            task = bar.add_task(f"{name}train", total=steps_per_epoch * t.epochs,
                                loss=float("nan"))
            while pos["epoch"] < t.epochs:
                epoch = pos["epoch"]
                scale = t.lr_decay ** (epoch // t.decay_period)
                if isinstance(opt, AnalogOptimizer):
                    opt.set_lr_scale(scale)
                else:
                    for g in opt.param_groups:
                        g["lr"] = a.lr * scale
                order = _epoch_order(cfg.seed, epoch, n)
                bar.update(task, description=f"{name}epoch {epoch + 1}/{t.epochs}",
                           completed=epoch * steps_per_epoch + pos["batch"])
                t0 = time.perf_counter()
                while pos["batch"] < steps_per_epoch:
                    boundary = False
                    with interrupts.deferred():  # a stop signal ends the step first
                        idx = order[pos["batch"] * t.batch_size:
                                    (pos["batch"] + 1) * t.batch_size]
                        opt.zero_grad()
                        loss = _loss(model(ds.x_train[idx]), ds.y_train[idx], ds.task)
                        loss.backward()
                        opt.step()
                        pos["batch"] += 1
                        pos["global_step"] += 1
                        pos["loss_sum"] += float(loss.detach()) * idx.shape[0]
                        pos["loss_n"] += idx.shape[0]
                        bar.update(task, advance=1, loss=pos["loss_sum"] / pos["loss_n"])
                        if stop_after_steps is not None and \
                                pos["global_step"] >= stop_after_steps:
                            completed = False
                            return RunResult(out, False, pos["global_step"], run.read())
                        if t.checkpoint_every and pos["global_step"] % t.checkpoint_every == 0:
                            checkpoint()
                        boundary = True
                boundary = False
                with interrupts.deferred():
                    test_loss, test_acc = evaluate(model, ds)
                    row = {"epoch": epoch + 1,
                           "train_loss": pos["loss_sum"] / max(pos["loss_n"], 1),
                           "test_loss": test_loss, "lr_scale": scale,
                           "epoch_seconds": time.perf_counter() - t0}
                    if test_acc is not None:
                        row["test_acc"] = test_acc
                    if isinstance(opt, AnalogOptimizer):  # pulses the max_pulses clip dropped
                        row["clipped_pulses"] = opt.clipped_pulses
                    run.append(row)
                    pos.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_n=0)
                    checkpoint()
                    boundary = True
                if outer_bar is None:
                    acc = f", test accuracy {100 * test_acc:.2f}%" if test_acc is not None \
                        else ""
                    console.print(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, "
                                  f"test loss {test_loss:.4f}{acc}", highlight=False)
    except KeyboardInterrupt:
        completed = False
        if boundary:  # stopped between steps: the checkpoint is exactly where it stopped
            checkpoint()
        raise
    finally:
        run.close()
        if completed:
            metrics = read_metrics(out / RUN_FILE)
            if len(metrics.get("train_loss", [])) and outer_bar is None:
                plot_curves(metrics, out / CURVES, f"{cfg.name}: {a.name}")
    return RunResult(out, True, pos["global_step"], read_metrics(out / RUN_FILE))


def estimate_train_seconds(cfg: RunConfig, backend: Backend) -> float | None:
    """Instrument seconds the whole run would take on ``backend`` (None: no instrument time):
    one training step measured on the backend's simulated twin, times the run's steps (the
    initial write-verify of the weights is not included)."""
    from hil.optim import AnalogOptimizer

    t = cfg.train
    ds: Dataset | None = None  # loaded only where the backend runs the step (a station)

    def one_step(twin: Backend) -> None:
        nonlocal ds
        if ds is None:
            ds = load_dataset(cfg)
        model = build_model(cfg, ds)
        make_analog(model, cfg, twin, program_init=False)
        opt = AnalogOptimizer(model, cfg.algorithm.digital_lr or cfg.algorithm.lr)
        idx = torch.arange(min(t.batch_size, ds.x_train.shape[0]))
        opt.zero_grad()
        _loss(model(ds.x_train[idx]), ds.y_train[idx], ds.task).backward()
        opt.step()

    per_step = backend.estimate_seconds(one_step)
    if per_step is None or ds is None:
        return None
    return per_step * t.epochs * ((ds.x_train.shape[0] + t.batch_size - 1) // t.batch_size)
