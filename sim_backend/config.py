"""Emulator settings, parsed from a ``sim://`` URL's query parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hil.errors import BackendURLError
from hil.response import RESPONSE_CLASSES
from hil.url import BackendURL
from sim_backend.drift import DriftAgeingConfig


@dataclass(frozen=True)
class SimConfig:
    """Device population and I/O settings of an emulated crossbar (defaults as PAPER.md)."""

    model: str = "linear"
    tau_min: float = -1.0
    tau_max: float = 1.0
    gamma: float = 1.0
    dw_min: float = 1e-3
    asym: float = 0.0  # amplitude asymmetry a: q+ scaled by 1 + a, q- by 1 - a
    d2d: float = 0.0  # relative device-to-device spread of dw_min and bounds; absolute for asym
    c2c: float = 0.0  # relative cycle-to-cycle noise of each pulse step
    read_noise: float = 0.0  # std of each read, weight units
    stuck: float = 0.0  # fraction of stuck devices
    init: float = 0.0  # initial weight (clipped to each device's bounds)
    device: str = "cpu"
    seed: int = 0
    # analog MVM periphery (aihwkit defaults used by the paper)
    inp_bits: int = 7
    out_bits: int = 9
    inp_bound: float = 1.0
    out_bound: float = 12.0
    out_noise: float = 0.06
    io: str = "paper"  # 'paper' (non-idealities above) or 'ideal' (exact MVM)
    train_length: int = 31  # pulse-train length of outer_update
    # 'auto' (native kernel on CPU, else compiled from 262144 devices on), 'native',
    # 'compiled' or 'eager'
    engine: str = "auto"
    # conductance drift and ageing (sim_backend/drift.py); off by default
    drift_ageing: DriftAgeingConfig = DriftAgeingConfig()

    @classmethod
    def from_url(cls, url: BackendURL) -> SimConfig:
        """Read every supported parameter; unknown ones are rejected by the caller's finish()."""
        d = cls()
        model = url.get_str("model", d.model, choices=tuple(RESPONSE_CLASSES))
        tau = url.get_float("tau", None, lo=1e-9)
        tau_min = url.get_float("tau_min", None)
        tau_max = url.get_float("tau_max", None)
        if tau is not None and (tau_min is not None or tau_max is not None):
            raise BackendURLError(f"backend URL {url.url!r}: give tau or tau_min/tau_max, not both")
        if tau is not None:
            tau_min, tau_max = -tau, tau
        tau_min = d.tau_min if tau_min is None else tau_min
        tau_max = d.tau_max if tau_max is None else tau_max
        if tau_max <= tau_min:
            raise BackendURLError(
                f"backend URL {url.url!r}: tau_max={tau_max} must exceed tau_min={tau_min}"
            )
        device = url.get_str("device", "auto", choices=("auto", "cpu", "cuda"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise BackendURLError(f"backend URL {url.url!r}: device=cuda but CUDA is not available")
        return cls(
            model=model,
            tau_min=tau_min,
            tau_max=tau_max,
            gamma=url.get_float("gamma", d.gamma, lo=1e-6, hi=100.0),
            dw_min=url.get_float("dw_min", d.dw_min, lo=1e-12),
            asym=url.get_float("asym", d.asym, lo=-0.99, hi=0.99),
            d2d=url.get_float("d2d", d.d2d, lo=0.0, hi=1.0),
            c2c=url.get_float("c2c", d.c2c, lo=0.0, hi=10.0),
            read_noise=url.get_float("read_noise", d.read_noise, lo=0.0),
            stuck=url.get_float("stuck", d.stuck, lo=0.0, hi=1.0),
            init=url.get_float("init", d.init),
            device=device,
            seed=url.get_int("seed", d.seed, lo=0),
            inp_bits=url.get_int("inp_bits", d.inp_bits, lo=1, hi=24),
            out_bits=url.get_int("out_bits", d.out_bits, lo=1, hi=24),
            inp_bound=url.get_float("inp_bound", d.inp_bound, lo=1e-9),
            out_bound=url.get_float("out_bound", d.out_bound, lo=1e-9),
            out_noise=url.get_float("out_noise", d.out_noise, lo=0.0),
            io=url.get_str("io", d.io, choices=("paper", "ideal")),
            train_length=url.get_int("train_length", d.train_length, lo=1, hi=10_000),
            engine=url.get_str("engine", d.engine,
                               choices=("auto", "native", "compiled", "eager")),
            drift_ageing=DriftAgeingConfig.from_url(url),
        )
