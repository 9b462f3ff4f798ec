"""Side by side with IBM aihwkit: time per training step and per rank-1 update, matched configs.

Runs the sim:// emulator and aihwkit in one process on the same inputs and prints a
markdown table (configuration, time per step here, in aihwkit, ratio). Needs aihwkit
(`pip install -e .[peers]`; docs/aihwkit.md says how to build it); never part of make test:

    .peers/venv/bin/python benchmarks/vs_aihwkit.py [--reps 3] [--only sgd]

The parameter mapping between the two (docs/aihwkit.md) lives here as functions that
benchmarks/aihwkit_fidelity.py reuses.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import hil
from hil.algorithms import make_algorithm
from hil.layers import AnalogConv2d, AnalogLinear
from hil.optim import AnalogOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_times  # noqa: E402

PEER_HINT = ("benchmarks/vs_aihwkit.py needs IBM aihwkit: pip install -e .[peers] "
             "(aihwkit 1.2.0 is an sdist only: docs/aihwkit.md says how to build it)")


def require_aihwkit() -> None:
    """Exit with one clear line when aihwkit is not importable."""
    try:
        import aihwkit  # noqa: F401
    except ImportError as exc:
        print(f"{PEER_HINT}\n  ({type(exc).__name__}: {exc})", file=sys.stderr)
        raise SystemExit(2) from None


# -- the parameter mapping (docs/aihwkit.md) -----------------------------------------------
@dataclass(frozen=True)
class DeviceSpec:
    """One device population in sim:// terms (symmetric bounds +-tau)."""

    model: str = "linear"  # 'linear' (SoftBoundsDevice) or 'power' (PowStepDevice)
    tau: float = 0.6
    dw_min: float = 1e-3  # sim:// dw_min: the step at the symmetric point w = 0
    gamma: float = 1.0
    asym: float = 0.0
    c2c: float = 0.0
    d2d: float = 0.0
    train_length: int = 31
    io: str = "paper"

    def sim_url(self, seed: int = 0) -> str:
        return (f"sim://?model={self.model}&tau={self.tau}&dw_min={self.dw_min}"
                f"&gamma={self.gamma}&asym={self.asym}&c2c={self.c2c}&d2d={self.d2d}"
                f"&train_length={self.train_length}&io={self.io}&seed={seed}")

    @property
    def peer_dw_min(self) -> float:
        """aihwkit's dw_min: PowStep steps dw_min * ((tau - w) / 2 tau)^gamma, so 2^gamma more."""
        scale = 2.0 ** self.gamma if self.model == "power" else 1.0
        return self.dw_min * scale / (1.0 - abs(self.peer_up_down) / 2.0)

    @property
    def peer_lr_scale(self) -> float:
        """aihwkit's lr / ours for the same pulse counts: its probabilities use its weight
        granularity, dw_min (PowStep: dw_min 2^-gamma, the step at w = 0), not the mean step."""
        return 1.0 + abs(self.asym)

    @property
    def peer_up_down(self) -> float:
        """aihwkit's one-sided up_down u for the amplitude asymmetry a: a = u / (2 - |u|)."""
        return 2.0 * self.asym / (1.0 + abs(self.asym))


def peer_device(spec: DeviceSpec):
    """The aihwkit device config that matches ``spec`` (see docs/aihwkit.md)."""
    from aihwkit.simulator.configs import PowStepDevice, SoftBoundsDevice

    common = dict(w_min=-spec.tau, w_max=spec.tau, dw_min=spec.peer_dw_min,
                  up_down=spec.peer_up_down, dw_min_std=spec.c2c,
                  dw_min_dtod=spec.d2d, w_min_dtod=spec.d2d, w_max_dtod=spec.d2d,
                  up_down_dtod=spec.d2d, write_noise_std=0.0)
    if spec.model == "linear":
        return SoftBoundsDevice(**common)
    if spec.model == "power":
        return PowStepDevice(pow_gamma=spec.gamma, pow_gamma_dtod=0.0, pow_up_down=0.0,
                             pow_up_down_dtod=0.0, **common)
    raise ValueError(f"no aihwkit counterpart for model={spec.model!r}")


def peer_io(spec: DeviceSpec):
    """IOParameters of sim://'s periphery: 7-bit DAC, 9-bit ADC, noise 0.06, bound 12,
    abs-max noise management, no bound management (sim:// clips at the output bound)."""
    from aihwkit.simulator.configs import IOParameters
    from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType

    if spec.io == "ideal":
        return IOParameters(is_perfect=True)
    return IOParameters(inp_bound=1.0, inp_res=1 / (2**7 - 2), out_bound=12.0,
                        out_res=1 / (2**9 - 2), out_noise=0.06,
                        noise_management=NoiseManagementType.ABS_MAX,
                        bound_management=BoundManagementType.NONE)


def peer_update(spec: DeviceSpec):
    """UpdateParameters of sim://'s outer_update: fixed train length, update management on."""
    from aihwkit.simulator.configs import UpdateParameters
    from aihwkit.simulator.parameters.enums import PulseType

    return UpdateParameters(desired_bl=spec.train_length, fixed_bl=True,
                            update_bl_management=False, update_management=True,
                            pulse_type=PulseType.STOCHASTIC_COMPRESSED)


@dataclass(frozen=True)
class Method:
    """A training algorithm here and its closest aihwkit configuration."""

    name: str  # hil.algorithms name
    peer: str  # 'single', 'transfer', 'buffered' or 'chopped'
    transfer_lr: float = 0.1
    gamma: float = 0.0
    transfer_write: str = "counts"  # Tiki-Taka here: 'counts' or 'pulse_train'
    transfer_read: str = "exact"  # here: 'exact' tile reads or 'mvm' through the periphery
    mvm_read: str = "tiles"  # here: 'summed' reads W + gamma P as one array (aihwkit's form)
    options: tuple[tuple[str, Any], ...] = ()  # further keywords of the algorithm here


# -- chopped TTv2, AGAD, mixed precision (docs/aihwkit.md maps their parameters) ----------
MORE_PEERS = ("chopped-ttv2", "dynamic", "mixedprec")


def more_peer_rpu_config(spec: DeviceSpec, method: Method):
    """aihwkit's rpu_config for c-TTv2 (ChoppedTransferCompound), AGAD
    (DynamicTransferCompound) and mixed precision (MixedPrecisionCompound), with the
    options of ``method`` (in_chop_prob, in_chop_random, ...) and the transfer settings of
    the other compounds here (one column per step, absolute transfer_lr, P's rate = lr)."""
    from aihwkit.simulator.configs import (
        ChoppedTransferCompound,
        DigitalRankUpdateRPUConfig,
        DynamicTransferCompound,
        MixedPrecisionCompound,
        UnitCellRPUConfig,
    )

    io, upd, opts = peer_io(spec), peer_update(spec), dict(method.options)
    # one column after each sample there (units_in_mbatch=False): here either the same
    # (transfer_unit='sample') or k = batch columns after the step's whole update
    k, unit = opts.pop("columns_per_transfer", 1), opts.pop("transfer_unit", "step")
    per_sample = k > 1 or unit == "sample"
    if method.peer == "mixedprec":
        device = MixedPrecisionCompound(device=peer_device(spec), transfer_every=1,
                                        n_rows_per_transfer=-1, granularity=0.0,
                                        transfer_lr=method.transfer_lr, n_x_bins=0, n_d_bins=0)
        return DigitalRankUpdateRPUConfig(device=device, forward=io, backward=peer_io(spec),
                                          update=upd)
    cls = ChoppedTransferCompound if method.peer == "chopped-ttv2" else DynamicTransferCompound
    device = cls(unit_cell_devices=[peer_device(spec), peer_device(spec)], gamma=0.0,
                 transfer_every=1.0, units_in_mbatch=not per_sample, n_reads_per_transfer=1,
                 transfer_columns=True, fast_lr=1.0, scale_fast_lr=True,
                 transfer_lr=method.transfer_lr, scale_transfer_lr=False,
                 transfer_forward=peer_io(spec), **opts)
    return UnitCellRPUConfig(device=device, forward=io, backward=peer_io(spec), update=upd)


def peer_rpu_config(spec: DeviceSpec, method: Method):
    """The aihwkit rpu_config for ``method`` on ``spec`` devices."""
    from aihwkit.simulator.configs import (
        BufferedTransferCompound,
        ChoppedTransferCompound,
        SingleRPUConfig,
        TransferCompound,
        UnitCellRPUConfig,
    )

    if method.peer in MORE_PEERS:
        return more_peer_rpu_config(spec, method)
    io, upd = peer_io(spec), peer_update(spec)
    if method.peer == "single":
        return SingleRPUConfig(device=peer_device(spec), forward=io, backward=peer_io(spec),
                               update=upd)
    common = dict(unit_cell_devices=[peer_device(spec), peer_device(spec)], gamma=method.gamma,
                  transfer_every=1.0, units_in_mbatch=True, n_reads_per_transfer=1,
                  transfer_columns=True, fast_lr=1.0, scale_fast_lr=True,
                  transfer_lr=method.transfer_lr, scale_transfer_lr=False,
                  transfer_forward=peer_io(spec))
    if method.peer == "transfer":
        device = TransferCompound(transfer_update=peer_update(spec), **common)
    elif method.peer == "buffered":  # threshold transfer, one pulse per transfer (like TTv2)
        device = BufferedTransferCompound(thres_scale=1.0, step=1.0, momentum=0.0,
                                          forget_buffer=False, **common)
    elif method.peer == "chopped":
        device = ChoppedTransferCompound(**common)
    else:
        raise ValueError(f"unknown aihwkit counterpart {method.peer!r}")
    return UnitCellRPUConfig(device=device, forward=io, backward=peer_io(spec), update=upd)


# -- our side ------------------------------------------------------------------------------
def our_layer(backend: hil.Backend, spec: DeviceSpec, method: Method, rows: int, cols: int,
              lr: float, prefix: str, seed: int = 0, init: torch.Tensor | None = None
              ) -> AnalogLinear:
    """hil.layers.AnalogLinear (no bias) over the method's algorithm; ``analog_step`` updates."""
    kw = {"transfer_lr": method.transfer_lr} if method.name == "mixed_precision" else \
        {} if method.name == "analog_sgd" else dict(
        transfer_lr=method.transfer_lr, gamma=method.gamma, transfer="column")
    if method.transfer_write != "counts":
        kw["transfer_write"] = method.transfer_write
    if method.transfer_read != "exact":
        kw["transfer_read"] = method.transfer_read
    if method.mvm_read != "tiles":
        kw["mvm_read"] = method.mvm_read
    kw.update(method.options)
    alg = make_algorithm(method.name, backend, (rows, cols), lr=lr, prefix=prefix, seed=seed,
                         update="auto" if method.name == "mixed_precision" else "outer", **kw)
    if init is not None:
        for tile in alg.tiles.values():  # emulator: set weights directly (W), P stays at 0
            if tile.name.endswith(".W"):
                tile.w.copy_(init.clamp(-spec.tau, spec.tau))
    return AnalogLinear(cols, rows, alg, bias=False, io="analog")


@dataclass
class Row:
    config: str
    ours: float
    peer: float
    floor: float

    @property
    def near_floor(self) -> bool:
        return self.peer < 3 * self.floor

    def cells(self) -> list[str]:
        ratio = (f"{self.floor / self.ours:.2f}x of torch floor ({self.floor * 1e3:.2f} ms)"
                 if self.near_floor else f"{self.peer / self.ours:.2f}x")
        return [self.config, f"{self.ours * 1e3:.1f} ms", f"{self.peer * 1e3:.1f} ms", ratio]


METHODS = {
    "sgd": Method("analog_sgd", "single"),
    "tt": Method("tiki_taka", "transfer", transfer_lr=0.1),
    # aihwkit's compounds read gamma P + W as one array: mvm_read='summed' matches that
    "rlv2-buffered": Method("rlv2", "buffered", transfer_lr=0.1, gamma=0.1, mvm_read="summed"),
    "rlv2-chopped": Method("rlv2", "chopped", transfer_lr=0.1, gamma=0.1, mvm_read="summed"),
    # aihwkit's defaults of each (one pulse a transfer, the buffer forgotten after it fires),
    # one column transferred a step (as the rows above) ...
    "cttv2": Method("chopped_ttv2", "chopped-ttv2", transfer_lr=0.1,
                    options=(("in_chop_prob", 0.1), ("in_chop_random", True))),
    "agad": Method("agad", "dynamic", transfer_lr=0.1,
                   options=(("in_chop_prob", 0.1), ("in_chop_random", False),
                            ("tail_weightening", 5.0))),
    "mp": Method("mixed_precision", "mixedprec", transfer_lr=1.0),
}
# ... or one column a sample (aihwkit's default units: mat-vecs), batch 10 (aihwkit_accuracy)
METHODS["cttv2-b10"] = replace(METHODS["cttv2"], options=METHODS["cttv2"].options + (
    ("columns_per_transfer", 10),))
METHODS["agad-b10"] = replace(METHODS["agad"], options=METHODS["agad"].options + (
    ("columns_per_transfer", 10),))
# ... or, as aihwkit does it, one column after each sample's update (transfer_unit='sample')
for _key in ("cttv2", "agad"):
    METHODS[f"{_key}-ps"] = replace(METHODS[_key], options=METHODS[_key].options + (
        ("transfer_unit", "sample"),))
CASES = [  # (label, spec, method key)
    ("Analog SGD, soft bounds", DeviceSpec("linear", c2c=0.3), "sgd"),
    ("Analog SGD, power gamma=0.5", DeviceSpec("power", gamma=0.5, c2c=0.3), "sgd"),
    ("Tiki-Taka, soft bounds", DeviceSpec("linear", c2c=0.3), "tt"),
    ("RLv2 vs BufferedTransferCompound", DeviceSpec("linear", c2c=0.3), "rlv2-buffered"),
    ("RLv2 vs ChoppedTransferCompound", DeviceSpec("linear", c2c=0.3), "rlv2-chopped"),
    ("c-TTv2 vs ChoppedTransferCompound", DeviceSpec("linear", c2c=0.3), "cttv2"),
    ("AGAD vs DynamicTransferCompound", DeviceSpec("linear", c2c=0.3), "agad"),
    ("mixed precision vs MixedPrecisionCompound", DeviceSpec("linear", c2c=0.3), "mp"),
]


def uniform(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen) * 2 - 1


def initial_weights(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """torch's default Linear init range, U(-1/sqrt(cols), 1/sqrt(cols)), seeded: every
    simulator in a row starts from these weights (P at 0 in the two-tile methods)."""
    return uniform(gen, rows, cols) / math.sqrt(cols)


def bench_rank1(spec: DeviceSpec, method: Method, reps: int, n: int = 512, batch: int = 32,
                lr: float = 0.01) -> tuple[float, float, float]:
    """The dense rank-1 reference: x, d ~ U(-1, 1) [32, 512], lr 0.01 (~21 M pulses a call)."""
    from aihwkit.nn import AnalogLinear as PeerLinear

    gen = torch.Generator().manual_seed(1)
    xs = [uniform(gen, batch, n) for _ in range(reps + 1)]
    ds = [uniform(gen, batch, n) for _ in range(reps + 1)]
    peer_layer = PeerLinear(n, n, bias=False, rpu_config=peer_rpu_config(spec, method))
    tile = next(peer_layer.analog_tiles())
    tile.set_learning_rate(lr * spec.peer_lr_scale)
    w = torch.zeros(n, n)
    with hil.open_backend(spec.sim_url()) as be:
        layer = our_layer(be, spec, method, n, n, lr, "r1")
        its = [iter(zip(xs, ds, strict=True)) for _ in range(3)]
        ours, peer, floor = median_times([
            lambda: layer.algorithm.step(x=(p := next(its[0]))[0], d=p[1]),
            lambda: tile.update(*next(its[1])),
            lambda: w.sub_(lr * (p := next(its[2]))[1].t() @ p[0])], reps)
    return ours, peer, floor


def _train_steps(model: torch.nn.Module, step: Callable[[], None], xs, targets,
                 loss_fn: Callable) -> Callable[[], None]:
    it = iter(zip(xs, targets, strict=True))

    def one() -> None:
        x, t = next(it)
        for p in model.parameters():
            p.grad = None
        loss_fn(model(x), t).backward()
        step()
    return one


def bench_layer(spec: DeviceSpec, method: Method, reps: int, n: int = 512, batch: int = 32,
                lr: float = 0.01) -> tuple[float, float, float]:
    """Full step of AnalogLinear 512x512, batch 32: forward, backward (output gradient
    ~ U(-1, 1), the dense reference), pulsed update."""
    from aihwkit.nn import AnalogLinear as PeerLinear
    from aihwkit.optim import AnalogSGD

    gen = torch.Generator().manual_seed(2)
    xs = [uniform(gen, batch, n) for _ in range(reps + 1)]
    gs = [uniform(gen, batch, n) for _ in range(reps + 1)]

    def loss(y, g):  # dL/dy = g
        return (y * g).sum()

    init = initial_weights(gen, n, n)
    peer_layer = PeerLinear(n, n, bias=False, rpu_config=peer_rpu_config(spec, method))
    peer_layer.set_weights(init)
    opt = AnalogSGD(peer_layer.parameters(), lr=lr * spec.peer_lr_scale)
    opt.regroup_param_groups(peer_layer)
    digital = torch.nn.Linear(n, n, bias=False)
    digital.weight.data.copy_(init)
    dopt = torch.optim.SGD(digital.parameters(), lr=lr)
    with hil.open_backend(spec.sim_url()) as be:
        ours_layer = our_layer(be, spec, method, n, n, lr, "fc", init=init)
        ours, peer, floor = median_times([
            _train_steps(ours_layer, ours_layer.analog_step, xs, gs, loss),
            _train_steps(peer_layer, opt.step, xs, gs, loss),
            _train_steps(digital, dopt.step, xs, gs, loss)], reps)
    return ours, peer, floor


def digits_28(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-shaped inputs without a download: sklearn's 8x8 digits upsampled to 28x28, [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear").flatten(1)
    y = torch.tensor(data.target)
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


class FCN(torch.nn.Module):
    """The paper's FCN (784-256-128-10 on MNIST) with sigmoids, log-softmax output."""

    def __init__(self, layers: list[torch.nn.Module], act: Callable = torch.sigmoid):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < len(self.layers) - 1:
                x = self.act(x)
        return torch.log_softmax(x, dim=-1)


def bench_fcn(spec: DeviceSpec, method: Method, reps: int, lr: float = 0.05, batch: int = 10
              ) -> tuple[float, float, float]:
    """The paper's MNIST FCN settings: 784-256-128-10, lr 0.05, batch 10, train length 31."""
    from aihwkit.nn import AnalogLinear as PeerLinear
    from aihwkit.optim import AnalogSGD

    sizes = [(784, 256), (256, 128), (128, 10)]
    x, y = digits_28(batch * (reps + 1))
    xs, ys = list(x.split(batch)), list(y.split(batch))
    nll = torch.nn.functional.nll_loss
    gen = torch.Generator().manual_seed(3)
    inits = [initial_weights(gen, o, i) for i, o in sizes]  # the same start in all three
    cfg = peer_rpu_config(spec, method)
    peer_net = FCN([PeerLinear(i, o, bias=False, rpu_config=cfg) for i, o in sizes])
    digital = FCN([torch.nn.Linear(i, o, bias=False) for i, o in sizes])
    for peer, dig, init in zip(peer_net.layers, digital.layers, inits, strict=True):
        peer.set_weights(init)
        dig.weight.data.copy_(init)
    opt = AnalogSGD(peer_net.parameters(), lr=lr * spec.peer_lr_scale)
    opt.regroup_param_groups(peer_net)
    dopt = torch.optim.SGD(digital.parameters(), lr=lr)
    with hil.open_backend(spec.sim_url()) as be:
        layers = [our_layer(be, spec, method, o, i, lr, f"fc{k}", init=init)
                  for k, ((i, o), init) in enumerate(zip(sizes, inits, strict=True))]
        ours_net = FCN(layers)
        opt_here = AnalogOptimizer(ours_net, digital_lr=lr)  # no digital parameters here
        ours, peer, floor = median_times([
            _train_steps(ours_net, opt_here.step, xs, ys, nll),
            _train_steps(peer_net, opt.step, xs, ys, nll),
            _train_steps(digital, dopt.step, xs, ys, nll)], reps)
    return ours, peer, floor


# -- the paper's MNIST CNN (AnalogConv2d) -------------------------------------------------
CNN_CONVS = [(1, 16), (16, 32)]  # (in, out) channels, 5x5 kernels, no padding, 2x2 max-pool
CNN_FCS = [(512, 128), (128, 10)]  # (in, out) features after the 32x4x4 feature maps


def cnn_net(convs: list[torch.nn.Module], fcs: list[torch.nn.Module]) -> torch.nn.Sequential:
    """The paper's MNIST CNN around the given conv and linear layers: conv, tanh, pool, conv,
    tanh, pool, FC 512-128, tanh, FC 128-10, log-softmax."""
    act, pool = torch.nn.Tanh, torch.nn.MaxPool2d
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 28, 28)), convs[0], act(), pool(2), convs[1], act(), pool(2),
        torch.nn.Flatten(), fcs[0], act(), fcs[1], torch.nn.LogSoftmax(dim=-1))


def bench_cnn(spec: DeviceSpec, method: Method, reps: int, lr: float = 0.05, batch: int = 8
              ) -> tuple[float, float, float]:
    """The paper's MNIST CNN step (PAPER.md), batch 8, lr 0.05, on digits at 28x28: both
    convs on AnalogConv2d here and in aihwkit (its unfolded tile per conv), both FCs analog."""
    from aihwkit.nn import AnalogConv2d as PeerConv2d
    from aihwkit.nn import AnalogLinear as PeerLinear
    from aihwkit.optim import AnalogSGD

    x, y = digits_28(batch * (reps + 1))
    xs, ys = list(x.split(batch)), list(y.split(batch))
    gen = torch.Generator().manual_seed(4)
    shapes = [(o, i * 25) for i, o in CNN_CONVS] + [(o, i) for i, o in CNN_FCS]
    inits = [initial_weights(gen, rows, cols) for rows, cols in shapes]
    cfg = peer_rpu_config(spec, method)
    peer_net = cnn_net([PeerConv2d(i, o, 5, bias=False, rpu_config=cfg) for i, o in CNN_CONVS],
                       [PeerLinear(i, o, bias=False, rpu_config=cfg) for i, o in CNN_FCS])
    digital = cnn_net([torch.nn.Conv2d(i, o, 5, bias=False) for i, o in CNN_CONVS],
                      [torch.nn.Linear(i, o, bias=False) for i, o in CNN_FCS])
    peer_layers = [m for m in peer_net if isinstance(m, (PeerConv2d, PeerLinear))]
    dig_layers = [m for m in digital if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for peer, dig, init in zip(peer_layers, dig_layers, inits, strict=True):
        peer.set_weights(init.reshape(dig.weight.shape))
        dig.weight.data.copy_(init.reshape(dig.weight.shape))
    opt = AnalogSGD(peer_net.parameters(), lr=lr * spec.peer_lr_scale)
    opt.regroup_param_groups(peer_net)
    dopt = torch.optim.SGD(digital.parameters(), lr=lr)
    with hil.open_backend(spec.sim_url()) as be:
        algs = [our_layer(be, spec, method, rows, cols, lr, f"l{k}", init=init).algorithm
                for k, ((rows, cols), init) in enumerate(zip(shapes, inits, strict=True))]
        ours_net = cnn_net(
            [AnalogConv2d(i, o, 5, alg, bias=False, io="analog")
             for (i, o), alg in zip(CNN_CONVS, algs[:2], strict=True)],
            [AnalogLinear(i, o, alg, bias=False, io="analog")
             for (i, o), alg in zip(CNN_FCS, algs[2:], strict=True)])
        opt_here = AnalogOptimizer(ours_net, digital_lr=lr)  # no digital parameters here
        nll = torch.nn.functional.nll_loss
        ours, peer, floor = median_times([
            _train_steps(ours_net, opt_here.step, xs, ys, nll),
            _train_steps(peer_net, opt.step, xs, ys, nll),
            _train_steps(digital, dopt.step, xs, ys, nll)], reps)
    return ours, peer, floor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="timed steps per cell (median)")
    ap.add_argument("--only", default="", help="run only rows whose label contains this")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both simulators (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    require_aihwkit()
    import aihwkit
    from rich.progress import Progress

    benches = [("full step 512x512 b32", bench_layer), ("rank-1 update 512x512 b32", bench_rank1),
               ("MNIST FCN step (lr 0.05, b10)", bench_fcn),
               ("MNIST CNN step (AnalogConv2d, lr 0.05, b8)", bench_cnn)]
    jobs = [(f"{label}: {what}", spec, METHODS[key], fn) for what, fn in benches
            for label, spec, key in CASES if args.only.lower() in f"{label}: {what}".lower()]
    load = os.getloadavg()
    print(f"aihwkit {aihwkit.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f} / {load[1]:.1f} at start", flush=True)
    rows: list[Row] = []
    with Progress(transient=True) as bar:
        task = bar.add_task("vs aihwkit", total=len(jobs))
        for name, spec, method, fn in jobs:
            bar.update(task, description=name)
            reps = max(args.reps, 30) if fn in (bench_fcn, bench_cnn) else args.reps
            rows.append(Row(name, *fn(replace(spec), method, reps)))
            bar.console.print(" | ".join(rows[-1].cells()))
            bar.advance(task)
    head = ["configuration", "here (per step)", "aihwkit (per step)", "aihwkit / here"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} / {load[1]:.1f} at the end; ratios > 1: faster here. "
          "Where aihwkit is within 3x of a plain torch step (few pulses) the last column is "
          "the torch floor / here instead.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
