"""The vectorized crossbar emulator: tiles of devices as torch tensors (CPU or CUDA)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hil.backend import Backend, Capabilities, Tile
from hil.errors import BackendError
from sim_backend.config import SimConfig
from sim_backend.devices import DeviceArray, sample_devices, tile_generator

PopulationFactory = Callable[[str, int, int, torch.Generator], DeviceArray]


def _quantize(x: torch.Tensor, bound: float, bits: int) -> torch.Tensor:
    """Clip to +-bound and round to the 2^bits - 1 levels of a converter spanning it."""
    res = 2 * bound / (2**bits - 2)
    return torch.round(x.clamp(-bound, bound) / res) * res


class SimTile(Tile):
    """An emulated tile: weights w [rows, cols] moved by pulses through per-device responses."""

    def __init__(self, backend: SimBackend, name: str, devices: DeviceArray,
                 gen: torch.Generator):
        rows, cols = devices.w0.shape
        super().__init__(backend, name, rows, cols, backend.config.dw_min)
        self.devices = devices
        self.gen = gen
        self.w = devices.w0.clone()
        self.cfg = backend.config

    # -- the contract ---------------------------------------------------------------
    def read(self) -> torch.Tensor:
        self.backend._check_open("read", self.name)
        if self.cfg.read_noise > 0:
            noise = torch.randn(self.shape, generator=self.gen, device=self.w.device)
            return self.w + self.cfg.read_noise * noise
        return self.w.clone()

    def _pulse(self, n: torch.Tensor) -> None:
        self.backend._check_open("pulse", self.name)
        self.w = apply_pulses(self.w, n, self.devices, self.gen)

    def mvm(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        self.backend._check_open("mvm", self.name)
        w = self.w.t() if transpose else self.w
        x = x.to(self.w.device, torch.float32)
        squeeze = x.dim() == 1
        x = x.reshape(1, -1) if squeeze else x
        if x.shape[-1] != w.shape[1]:
            raise BackendError(f"mvm input has {x.shape[-1]} features, tile takes {w.shape[1]}",
                               tile=self.name, op="mvm")
        if self.cfg.io == "ideal":
            y = x @ w.t()
        else:
            c = self.cfg
            # noise management: scale each input vector to the DAC range, undo after the ADC
            scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / c.inp_bound
            xq = _quantize(x / scale, c.inp_bound, c.inp_bits)
            y = xq @ w.t()
            if c.out_noise > 0:
                y = y + c.out_noise * torch.randn(y.shape, generator=self.gen, device=y.device)
            y = _quantize(y, c.out_bound, c.out_bits) * scale
        return y.reshape(-1) if squeeze else y

    def outer_update(self, x: torch.Tensor, d: torch.Tensor, lr: float) -> None:
        self.backend._check_open("outer_update", self.name)
        x = x.to(self.w.device, torch.float32).reshape(-1, self.shape[1])
        d = d.to(self.w.device, torch.float32).reshape(-1, self.shape[0])
        if x.shape[0] != d.shape[0]:
            raise BackendError("outer_update: x and d have different batch sizes",
                               tile=self.name, op="outer_update")
        counts = pulse_train_counts(x, d, lr, self.dw_min, self.cfg.train_length, self.gen)
        for n in counts:  # samples in order, as the hardware would apply them
            self.w = apply_pulses(self.w, n, self.devices, self.gen)


def pulse_train_counts(x: torch.Tensor, d: torch.Tensor, lr: float, dw_min: float,
                       train_length: int, gen: torch.Generator) -> torch.Tensor:
    """Signed coincidence counts [B, rows, cols] of stochastic row/column pulse trains.

    Column j fires with probability px_j = cx|x_j|, row i with pd_i = cd|d_i| in each
    of ``train_length`` slots; a device pulses where both fire, with sign
    sign(lr d_i x_j). cx, cd balance the two sides (update management) so that the
    expected count is |lr d_i x_j| / dw_min while neither probability exceeds 1
    unless the desired change exceeds the train length.
    """
    bl = int(train_length)
    xa, da = x.abs(), d.abs()
    xmax = xa.amax(dim=1, keepdim=True).clamp_min(1e-30)
    dmax = da.amax(dim=1, keepdim=True).clamp_min(1e-30)
    k = abs(lr) / (dw_min * bl)
    px = (torch.sqrt(k * dmax / xmax) * xa).clamp(max=1.0)
    pd = (torch.sqrt(k * xmax / dmax) * da).clamp(max=1.0)
    b = x.shape[0]
    fx = torch.rand((b, bl, x.shape[1]), generator=gen, device=x.device) < px.unsqueeze(1)
    fd = torch.rand((b, bl, d.shape[1]), generator=gen, device=d.device) < pd.unsqueeze(1)
    sx = torch.where(fx, torch.sign(x).unsqueeze(1), 0.0)
    sd = torch.where(fd, torch.sign(d).unsqueeze(1), 0.0) * (1.0 if lr >= 0 else -1.0)
    return torch.bmm(sd.transpose(1, 2), sx).round().to(torch.int32)


def apply_pulses(w: torch.Tensor, n: torch.Tensor, dev: DeviceArray,
                 gen: torch.Generator) -> torch.Tensor:
    """|n| sequential pulses of sign(n) per device, each through the response and noise.

    Pulse k (k = 0 .. max|n| - 1) moves the devices with |n| > k by
    dw_min * q_s(w) * (1 + c2c * xi), clipped to the bounds; one normal xi is drawn
    per pulse actually applied, nothing for idle devices.
    """
    absn = n.abs()
    kmax = int(absn.max()) if n.numel() else 0
    if kmax == 0:
        return w
    positive = n > 0
    signed_dw = torch.where(positive, dev.dw_min, -dev.dw_min)
    moving = absn > 0 if dev.stuck is None else (absn > 0) & ~dev.stuck
    c2c = dev.c2c
    noisy = isinstance(c2c, torch.Tensor) or c2c > 0
    lo, hi = dev.tau_min, dev.tau_max
    for k in range(kmax):
        active = moving if k == 0 else moving & (absn > k)
        step = signed_dw * dev.response.q(w, positive)
        if noisy:
            idx = active.nonzero(as_tuple=True)
            xi = torch.zeros_like(w)
            xi[idx] = torch.randn(idx[0].numel(), generator=gen, device=w.device)
            step = step * (1 + c2c * xi)
        w = torch.where(active, torch.minimum(torch.maximum(w + step, lo), hi), w)
    return w


class SimBackend(Backend):
    """``sim://``: an emulated chip whose tiles are drawn from one device population."""

    def __init__(self, url: str, config: SimConfig,
                 population: PopulationFactory | None = None):
        super().__init__(url)
        self.config = config
        self.capabilities = Capabilities(mvm=True, outer_update=True, device=config.device,
                                         snapshot=True)
        self._population = population or (
            lambda name, rows, cols, gen: sample_devices(config, rows, cols, gen))

    def _allocate(self, name: str, rows: int, cols: int) -> SimTile:
        gen = tile_generator(self.config.seed, name, self.config.device)
        return SimTile(self, name, self._population(name, rows, cols, gen), gen)

    def state_dict(self) -> dict[str, object]:
        """Weights and generator state of every tile (device parameters follow from the seed)."""
        return {name: {"shape": t.shape, "w": t.w.cpu().clone(), "rng": t.gen.get_state()}
                for name, t in self._tiles.items()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        for name, entry in state.items():
            if name not in self._tiles:
                self.allocate(name, *entry["shape"])
            tile = self._tiles[name]
            tile.w = entry["w"].to(tile.w.device).clone()
            tile.gen.set_state(entry["rng"])
