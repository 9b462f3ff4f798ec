"""Per-device state of an emulated tile: response, step size, bounds, stuck devices, noise."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from hil.response import Response, make_response
from sim_backend.config import SimConfig
from sim_backend.kernels import FusedParams, fused_params


@dataclass
class DeviceArray:
    """Everything the emulator knows about one tile's devices (all tensors [rows, cols])."""

    response: Response
    dw_min: torch.Tensor  # per-device step size of one pulse at q = 1
    stuck: torch.Tensor | None  # bool mask of devices that never move, or None
    c2c: torch.Tensor | float  # relative cycle-to-cycle noise of each pulse step
    w0: torch.Tensor  # initial weights
    read_noise: torch.Tensor | None = None  # per-device read-noise std (None: the config's)
    _fused: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def fused(self) -> FusedParams | None:
        """Per-device kernel coefficients for linear/power/exp responses (None otherwise).

        Cached; recomputed when any source tensor is replaced or changed in place.
        """
        sources = [self.response, self.dw_min, self.stuck, self.c2c,
                   *self.response.params().values()]
        stamp = tuple((id(t), getattr(t, "_version", None)) for t in sources)
        if self._fused is None or self._fused[0] != stamp:
            self._fused = (stamp, fused_params(self))
        return self._fused[1]

    @property
    def tau_min(self) -> torch.Tensor:
        return self.response.tau_min

    @property
    def tau_max(self) -> torch.Tensor:
        return self.response.tau_max


def tile_generator(seed: int, name: str, device: str) -> torch.Generator:
    """A generator seeded from the backend seed and the tile name (order-independent)."""
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    return gen


def sample_devices(cfg: SimConfig, rows: int, cols: int, gen: torch.Generator) -> DeviceArray:
    """Draw a device population from the emulator settings (device-to-device spread d2d)."""
    dev = cfg.device

    def spread() -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen, device=dev)

    one = torch.ones(rows, cols, device=dev)
    if cfg.d2d > 0:
        dw = cfg.dw_min * (1 + cfg.d2d * spread()).clamp_min(0.05)
        tau_max = cfg.tau_max + abs(cfg.tau_max) * cfg.d2d * spread()
        tau_min = cfg.tau_min + abs(cfg.tau_min) * cfg.d2d * spread()
        width = cfg.tau_max - cfg.tau_min
        tau_max = torch.maximum(tau_max, tau_min + 0.05 * width)
        asym = (cfg.asym + cfg.d2d * spread()).clamp(-0.95, 0.95)
    else:
        dw, tau_max, tau_min, asym = (cfg.dw_min * one, cfg.tau_max * one,
                                      cfg.tau_min * one, cfg.asym * one)
    response = make_response(cfg.model, tau_min=tau_min, tau_max=tau_max,
                             gamma=cfg.gamma * one, asym=asym)
    stuck = None
    w0 = torch.minimum(torch.maximum(cfg.init * one, tau_min), tau_max)
    if cfg.stuck > 0:
        stuck = torch.rand(rows, cols, generator=gen, device=dev) < cfg.stuck
        u = torch.rand(rows, cols, generator=gen, device=dev)
        w0 = torch.where(stuck, tau_min + u * (tau_max - tau_min), w0)
    return DeviceArray(response=response, dw_min=dw, stuck=stuck, c2c=cfg.c2c, w0=w0)
