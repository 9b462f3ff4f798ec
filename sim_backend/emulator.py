"""The vectorized crossbar emulator: tiles of devices as torch tensors (CPU or CUDA)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from hil.backend import Backend, Capabilities, Tile
from hil.errors import BackendError
from sim_backend import native
from sim_backend.config import SimConfig
from sim_backend.devices import DeviceArray, sample_devices, tile_generator
from sim_backend.kernels import (
    FusedParams,
    Variant,
    device_hash,
    get_kernel,
    hash_uniform,
    operand,
    output_normals,
    pulse_normal,
)

PopulationFactory = Callable[[str, int, int, torch.Generator], DeviceArray]
COMPILE_MIN_DEVICES = 262144  # engine=auto compiles kernels of tiles this large (512x512) and up
PULSE_UNROLL = 8  # pulses per fused pass when |n| > 1
SINGLE_PASS_PULSES = 1  # engine=auto: pulse() calls with |n| up to this on tiles from
# COMPILE_MIN_DEVICES on take the compiled torch kernel (one pass at the memory roofline;
# measured 26% of it for the native kernel, whose per-group set-up dominates there)
TRAIN_UNROLL = 4  # pulses per sample per fused pass of the device-major outer_update
SAMPLE_UNROLLS = (1, 2, 4, 8, 16, 24, 32)  # compiled unroll buckets of the sample-major one
NOISY_MAX_UNROLL = 8  # largest unroll bucket of noisy sample kernels
SAMPLE_LEVELS: tuple[int, ...] = ()  # sample-major: pulse counts past which a pass
# covers only the devices with pulses left (gathered); off: measured slower under load
_COMPILE_BROKEN = False


def _resolution(bound: float, bits: int) -> float:
    """The level spacing of a converter with 2^bits - 1 levels spanning +-bound."""
    return 2 * bound / (2**bits - 2)


def _quantize(x: torch.Tensor, bound: float, res: float) -> torch.Tensor:
    """Clip to +-bound and round to the converter's levels ``res`` apart (half to even)."""
    return torch.round(x.clamp(-bound, bound) / res) * res


class SimTile(Tile):
    """An emulated tile: weights w [rows, cols] moved by pulses through per-device responses."""

    def __init__(self, backend: SimBackend, name: str, devices: DeviceArray,
                 gen: torch.Generator):
        rows, cols = devices.w0.shape
        super().__init__(backend, name, rows, cols, backend.config.dw_min)
        self.devices = devices
        self.gen = gen
        self.w = devices.w0.clone().contiguous()  # updated in place by pulse/outer_update
        self.cfg = backend.config

    # -- the contract ---------------------------------------------------------------
    def read(self) -> torch.Tensor:
        self.backend._check_open("read", self.name)
        return self._with_read_noise(self.w)

    def _pulse(self, n: torch.Tensor) -> None:
        self.backend._check_open("pulse", self.name)
        apply_pulses(self.w, n, self.devices, self.gen, engine=self.cfg.engine, out=self.w)

    def read_columns(self, cols: slice) -> torch.Tensor:
        self.backend._check_open("read", self.name)
        first, width = self.column_range(cols)
        return self._with_read_noise(self.w[:, first:first + width], first)

    def _with_read_noise(self, w: torch.Tensor, first: int = 0) -> torch.Tensor:
        """A copy of (a view of columns ``first``.. of) the weights as a read returns it:
        plus the read noise (per device where the population has its own, e.g. a twin)."""
        per_device = self.devices.read_noise
        if per_device is not None:
            noise = torch.randn(w.shape, generator=self.gen, device=w.device)
            return w + per_device[:, first:first + w.shape[1]] * noise
        if self.cfg.read_noise > 0:
            noise = torch.randn(w.shape, generator=self.gen, device=w.device)
            return w + self.cfg.read_noise * noise
        return w.clone()

    def pulse_columns(self, n: torch.Tensor, cols: slice) -> None:
        """The native kernel pulses the column range in place (the same draws and noise
        streams as the zero-padded map through :meth:`pulse`); other engines pad."""
        self.backend._check_open("pulse", self.name)
        first, width = self.column_range(cols)
        n, biggest = self._checked_pulses(n, (self.shape[0], width))
        fp = self.devices.fused()
        if fp is None or not _use_native(self.cfg.engine, self.w):
            super().pulse_columns(n, cols)
            return
        if biggest == 0:
            return  # as apply_pulses: no pulse, no draw
        noisy, key = _noise_key(self.devices, fp, self.gen)
        native.pulse_trains(self.w.view(-1), fp, key, noisy, counts=n, shape=self.shape,
                            columns=(first, width))

    def mvm(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        self.backend._check_open("mvm", self.name)
        return self._periphery_mvm([(self.w, 1.0)], x, transpose)

    def _periphery_mvm(self, terms: list[tuple[torch.Tensor, float]], x: torch.Tensor,
                       transpose: bool) -> torch.Tensor:
        """x through the periphery: DAC, the array sum_k c_k w_k (``terms``, arrays of this
        tile's shape), output noise from this tile's generator, ADC."""
        x = x.to(self.w.device, torch.float32)
        squeeze = x.dim() == 1
        x = x.reshape(1, -1) if squeeze else x
        n_in, n_out = self.shape[::-1] if not transpose else self.shape
        if x.shape[-1] != n_in:
            raise BackendError(f"mvm input has {x.shape[-1]} features, tile takes {n_in}",
                               tile=self.name, op="mvm")
        c = self.cfg
        if c.io == "ideal":
            y = x @ operand(terms, transpose)
            return y.reshape(-1) if squeeze else y
        in_res = _resolution(c.inp_bound, c.inp_bits)
        out_res = _resolution(c.out_bound, c.out_bits)
        # the output noise: counter-hash normals under one key from the tile generator
        key = _call_keys(self.gen, 1)[0] if c.out_noise > 0 else None
        if _use_native(c.engine, self.w):  # the whole MVM in one call, noise drawn there
            y = native.mvm(x, terms, transpose, key, c.out_noise, c.inp_bound, in_res,
                           c.out_bound, out_res)
        else:
            noise = None if key is None else output_normals(
                _key_tensor(key, x.device), (x.shape[0], n_out), x.device)
            # noise management: scale each input vector to the DAC range, undo after the ADC
            scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / c.inp_bound
            y = _quantize(x / scale, c.inp_bound, in_res) @ operand(terms, transpose)
            if noise is not None:
                y = y + c.out_noise * noise
            y = _quantize(y, c.out_bound, out_res) * scale
        return y.reshape(-1) if squeeze else y

    def outer_update(self, x: torch.Tensor, d: torch.Tensor, lr: float) -> None:
        self.backend._check_open("outer_update", self.name)
        x, d = self.check_update(x.to(self.w.device), d.to(self.w.device), lr)
        bl = self.cfg.train_length
        fp = self.devices.fused()
        if fp is not None and _use_native(self.cfg.engine, self.w):
            # one call: probabilities, packed fire masks (no counts tensor), pulses; the
            # keys of pulse_train_counts and then the noise key, in one draw (the same
            # numbers as drawn one after the other)
            keys = _call_keys(self.gen, 3 if fp.noisy else 2)
            native.outer_update(self.w, fp, x, d, lr, self.dw_min, bl, keys[:2], fp.noisy,
                                keys[2] if fp.noisy else 0)
            return
        counts = pulse_train_counts(x, d, lr, self.dw_min, bl, self.gen,
                                    dtype=torch.int8 if bl <= 127 else torch.int32)
        # samples in order, as the hardware would apply them
        apply_pulse_trains(self.w, counts, self.devices, self.gen, engine=self.cfg.engine)


def _fire_probabilities(x: torch.Tensor, d: torch.Tensor, lr: float, dw_min: float,
                        train_length: int, gen: torch.Generator
                        ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                                   tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per side (columns, rows): the firing probability per slot [B, n], the sign [B, n]
    and the key of the side's draws (one from the tile generator per call and side).

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
    kx, kd = (_key_tensor(k, x.device) for k in _call_keys(gen, 2))
    return (px, torch.sign(x), kx), (pd, torch.sign(d) * (1.0 if lr >= 0 else -1.0), kd)


def _fire_masks(p: torch.Tensor, key: torch.Tensor, train_length: int) -> torch.Tensor:
    """Fire masks [B, bl, n]: line j fires in slot t of sample b where
    hash_uniform(key, (b bl + t) n + j) < p[b, j]."""
    b, n = p.shape
    u = hash_uniform(key, b * train_length * n, p.device).view(b, train_length, n)
    return u < p.unsqueeze(1)


def pulse_train_counts(x: torch.Tensor, d: torch.Tensor, lr: float, dw_min: float,
                       train_length: int, gen: torch.Generator,
                       dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Signed coincidence counts [B, rows, cols] of the pulse trains of :func:`_fire_masks`.

    ``dtype`` int8 is exact for train lengths up to 127 and saves memory.
    """
    (px, sx, kx), (pd, sd, kd) = _fire_probabilities(x, d, lr, dw_min, train_length, gen)
    sx = torch.where(_fire_masks(px, kx, train_length), sx.unsqueeze(1), 0.0)
    sd = torch.where(_fire_masks(pd, kd, train_length), sd.unsqueeze(1), 0.0)
    # sums of at most bl products of 0/+-1: exact integers in float32
    return torch.bmm(sd.transpose(1, 2), sx).to(dtype)


def _is_noisy(dev: DeviceArray) -> bool:
    c2c = dev.c2c
    return bool((c2c > 0).any()) if isinstance(c2c, torch.Tensor) else float(c2c) > 0


def _noise_key(dev: DeviceArray, fp: FusedParams | None, gen: torch.Generator
               ) -> tuple[bool, int]:
    """Whether the devices have c2c noise and the call key of its counters (0 if not);
    ``fp``: the devices' fused coefficients, if any (they know whether)."""
    noisy = fp.noisy if fp is not None else _is_noisy(dev)
    return noisy, (_call_keys(gen, 1)[0] if noisy else 0)


def _call_keys(gen: torch.Generator, n: int) -> list[int]:
    """n keys (int32 range) for one call, drawn from the tile generator (they seed the
    counter hashes of the pulse trains and of the pulse noise); one draw, no tensor ops."""
    return torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, device=gen.device,
                         dtype=torch.int64).tolist()


def _key_tensor(key: int, device: torch.device | str) -> torch.Tensor:
    """A key as the 0-d int32 tensor the torch kernels take (a traced input, not a constant)."""
    return torch.tensor(key, dtype=torch.int32, device=device)


def _use_native(engine: str, w: torch.Tensor, kmax: int | None = None) -> bool:
    """The native kernel runs CPU tiles under engine 'native', and 'auto' where it builds,
    except single-pass pulse() calls (``kmax``) on large tiles (see SINGLE_PASS_PULSES)."""
    if w.device.type != "cpu" or engine not in ("auto", "native"):
        return False
    if (engine == "auto" and kmax is not None and kmax <= SINGLE_PASS_PULSES
            and _use_compiled(engine, w.numel())):
        return False
    if native.available():
        return True
    if engine == "native":
        raise BackendError(f"engine=native: the native pulse kernel is unavailable "
                           f"({native.unavailable_reason()})", op="pulse")
    return False


def _use_compiled(engine: str, numel: int) -> bool:
    if engine == "compiled":
        return True
    if engine == "eager":
        return False
    return numel >= COMPILE_MIN_DEVICES


def _run(kind: str, family: Variant, noisy: bool, unroll: int, compiled: bool, *args):
    """Run a fused kernel; if inductor cannot compile here, say so once and run it eagerly."""
    global _COMPILE_BROKEN
    if compiled and not _COMPILE_BROKEN:
        try:
            return get_kernel(kind, family, noisy, unroll, True)(*args)
        except Exception as exc:  # no C compiler, unsupported platform: same math, eager
            _COMPILE_BROKEN = True
            warnings.warn(f"torch.compile unavailable ({type(exc).__name__}: {exc}); "
                          "the emulator runs its kernels eagerly", RuntimeWarning, stacklevel=3)
    return get_kernel(kind, family, noisy, unroll, False)(*args)


def apply_pulses(w: torch.Tensor, n: torch.Tensor, dev: DeviceArray, gen: torch.Generator,
                 *, engine: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """|n| sequential pulses of sign(n) per device, each through the response and noise.

    Pulse k (k = 0 .. max|n| - 1) moves the devices with |n| > k by
    dw_min * q_s(w) * (1 + c2c * xi), clipped to the bounds, where xi is the
    counter-based normal of (call, device, k): one per pulse applied, none drawn for
    idle devices. Returns the new weights (written into ``out`` when given, which may
    be ``w`` itself). ``engine``: 'auto' (the native kernel on CPU, except single-pass
    calls on large tiles, see SINGLE_PASS_PULSES; else compiled kernels from
    COMPILE_MIN_DEVICES devices on), 'native', 'compiled' or 'eager'; responses other
    than linear/power/exp always take the eager generic loop.
    """
    if n.numel():
        lo, hi = torch.aminmax(n)  # one read pass, no temporary |n|
        kmax = max(-int(lo), int(hi))
    else:
        kmax = 0
    res = (w.clone() if out is None else (out.copy_(w) if out is not w else out)).contiguous()
    if kmax == 0:
        return res
    fp = dev.fused()
    noisy, key = _noise_key(dev, fp, gen)
    if fp is None:
        _generic_pulses(res, n, n.abs(), kmax, dev, noisy, _key_tensor(key, w.device))
    elif _use_native(engine, res, kmax):
        native.pulse_trains(res.view(-1), fp, key, noisy, counts=n.reshape(1, -1))
    else:
        key = _key_tensor(key, w.device)
        compiled = _use_compiled(engine, res.numel())
        unroll = (1 if kmax == 1 else PULSE_UNROLL) if compiled else kmax
        wf, nf = res.view(-1), n.reshape(-1).to(torch.int32).contiguous()
        for k0 in range(0, kmax, unroll):
            k0_t = torch.tensor(k0, dtype=torch.int32, device=w.device)
            _run("pulse", fp.variant, noisy, unroll, compiled, wf, nf, *fp.tensors(), key, k0_t)
    return res


def _generic_pulses(w: torch.Tensor, n: torch.Tensor, absn: torch.Tensor, kmax: int,
                    dev: DeviceArray, noisy: bool, key: torch.Tensor) -> None:
    """Eager pulse loop through any Response (tabulated, mixed, ...), updating w in place."""
    positive = n > 0
    signed_dw = torch.where(positive, dev.dw_min, -dev.dw_min)
    moving = absn > 0 if dev.stuck is None else (absn > 0) & ~dev.stuck
    lo, hi = dev.tau_min, dev.tau_max
    h = device_hash(key, w.numel(), w.device).view(w.shape) if noisy else None
    x = w
    for k in range(kmax):
        active = moving & (absn > k)
        step = signed_dw * dev.response.q(x, positive)
        if noisy:
            step = step * (1 + dev.c2c * pulse_normal(h, k))
        x = torch.where(active, torch.minimum(torch.maximum(x + step, lo), hi), x)
    w.copy_(x)


def apply_pulse_trains(w: torch.Tensor, counts: torch.Tensor, dev: DeviceArray,
                       gen: torch.Generator, *, engine: str = "auto",
                       method: str = "auto") -> None:
    """Apply counts [B, rows, cols] sample after sample to w in place (outer_update's core).

    Parametric families run fused kernels. ``method`` 'auto' (default): the native
    kernel on CPU where it builds (each device loops over its own pulses only; see
    sim_backend/native.py), else 'sample' without c2c noise and 'device' with it (where
    masked idle steps would each hash a normal: measured slower). 'sample': one torch
    pass over the tile per sample applies up to K_b = max |n_b| pulses per device in
    registers (see :func:`_trains_by_sample`); 'device': torch passes in which each
    device walks through its own samples' pulses (kernels.make_train_chunk). All apply
    every sample's pulses in order; 'native' and 'device' number a device's noise
    counters by its pulses in the call (0, 1, ...), 'sample' by the samples' slots. Any
    other response applies the samples one by one (generic loop).
    """
    if method not in ("auto", "sample", "device"):
        raise ValueError("apply_pulse_trains: method must be 'auto', 'sample' or 'device', "
                         f"not {method!r}")
    fp = dev.fused()
    if fp is None:
        for n in counts:
            apply_pulses(w, n, dev, gen, engine=engine, out=w)
        return
    noisy, key = _noise_key(dev, fp, gen)
    nb = counts.shape[0]
    if nb == 0:
        return
    flat = counts.reshape(nb, -1)
    if flat.dtype not in (torch.int8, torch.int32):
        flat = flat.to(torch.int32)
    if method == "auto" and _use_native(engine, w):
        native.pulse_trains(w.view(-1), fp, key, noisy, counts=flat)
        return
    compiled = _use_compiled(engine, w.numel())
    if method == "auto":
        method = "device" if noisy else "sample"
    run = _trains_by_sample if method == "sample" else _trains_by_device
    run(w.view(-1), flat, fp, noisy, _key_tensor(key, w.device), compiled)


def _sample_unroll(k: int, noisy: bool) -> int:
    """The smallest compiled unroll bucket holding k pulses (the largest for k beyond it);
    noisy kernels stop at NOISY_MAX_UNROLL (their compile time grows fast with unroll)."""
    buckets = [u for u in SAMPLE_UNROLLS if not noisy or u <= NOISY_MAX_UNROLL]
    return next((u for u in buckets if u >= k), buckets[-1])


def _trains_by_sample(wf: torch.Tensor, flat: torch.Tensor, fp, noisy: bool,
                      key: torch.Tensor, compiled: bool) -> None:
    """Sample-major: sample b's pulses k0 .. k0+U-1 for every device, in passes of U.

    K_b = max |n_b| over the tile. Passes run over the whole tile up to the first level
    L of SAMPLE_LEVELS (if any); from each level on, only the devices with |n_b| > L
    (few) are pulsed further (the kernel gathers and scatters them). Compiled kernels come in a few
    unroll buckets U (devices with |n_b| <= k stay put); eager ones use the exact U.
    Pulse k of sample b draws the noise of counter T_b + k with T_b = sum of K_b' over
    the samples before, so the layout is the same for every U and level.
    """
    lo, hi = torch.aminmax(flat, dim=1)
    kmax = torch.maximum(-lo.to(torch.int32), hi.to(torch.int32)).tolist()
    dev = wf.device
    params = fp.tensors()
    t0 = 0
    for b, kb in enumerate(kmax):
        if kb == 0:
            continue
        t0_t = torch.tensor(t0, dtype=torch.int32, device=dev)
        n, ids = flat[b], None
        k = 0
        for end in (*(lv for lv in SAMPLE_LEVELS if lv < kb), kb):
            if k > 0:  # restrict to the devices with pulses left (|n| > k)
                nk = n if ids is None else n[ids.long()]
                keep = ((nk > k) | (nk < -k)).nonzero().squeeze(1)
                ids = keep.to(torch.int32) if ids is None else ids[keep]
            while k < end:
                unroll = _sample_unroll(end - k, noisy) if compiled else end - k
                k0_t = torch.tensor(k, dtype=torch.int32, device=dev)
                _run("sample", fp.variant, noisy, unroll, compiled, wf, n, ids, *params, key,
                     t0_t, k0_t)
                k += unroll
        t0 += kb


def _trains_by_device(wf: torch.Tensor, flat: torch.Tensor, fp, noisy: bool,
                      key: torch.Tensor, compiled: bool) -> None:
    """Device-major: each device walks through its own samples' pulses in chunks of
    TRAIN_UNROLL (a gather per chunk); a device's noise counters count its pulses."""
    b = torch.full_like(wf, -1, dtype=torch.int32)
    rem = torch.zeros_like(wf, dtype=torch.int32)
    t0 = torch.zeros_like(wf, dtype=torch.int32)
    chunks = int(_run("chunks", fp.variant, False, TRAIN_UNROLL, compiled, flat))
    for _ in range(chunks):
        _run("train", fp.variant, noisy, TRAIN_UNROLL, compiled, wf, flat, b, rem,
             *fp.tensors(), key, t0)


class SimBackend(Backend):
    """``sim://``: an emulated chip whose tiles are drawn from one device population."""

    def __init__(self, url: str, config: SimConfig,
                 population: PopulationFactory | None = None):
        super().__init__(url)
        self.config = config
        self.capabilities = Capabilities(mvm=True, outer_update=True, device=config.device,
                                         snapshot=True, mvm_sum=True)
        self._population = population or (
            lambda name, rows, cols, gen: sample_devices(config, rows, cols, gen))

    def _allocate(self, name: str, rows: int, cols: int) -> SimTile:
        gen = tile_generator(self.config.seed, name, self.config.device)
        cls = SimTile
        if self.config.drift_ageing.active:  # drift / ageing: sim_backend/drift.py
            from sim_backend.drift import drifting_tile_class
            cls = drifting_tile_class(SimTile)
        return cls(self, name, self._population(name, rows, cols, gen), gen)

    def mvm_sum(self, terms: Sequence[tuple[Tile, float]], x: torch.Tensor,
                transpose: bool = False) -> torch.Tensor:
        """The weighted sum of the tiles' weights through one periphery pass (the first
        tile's output noise stream), as aihwkit reads a compound's unit cell."""
        if not terms:
            raise BackendError("mvm_sum needs at least one (tile, coefficient) term", op="mvm_sum")
        first = terms[0][0]
        for tile, _ in terms:
            if tile.backend is not self or not isinstance(tile, SimTile):
                raise BackendError("mvm_sum: tile of another backend", tile=tile.name,
                                   op="mvm_sum")
            if tile.shape != first.shape:
                raise BackendError(f"mvm_sum: tile is {tile.shape}, the first term's "
                                   f"{first.shape}", tile=tile.name, op="mvm_sum")
        self._check_open("mvm_sum", first.name)
        return first._periphery_mvm([(t.w, float(c)) for t, c in terms], x, transpose)

    def state_dict(self) -> dict[str, object]:
        """Weights and generator state of every tile (device parameters follow from the seed)."""
        return {name: {"shape": t.shape, "w": t.w.cpu().clone(), "rng": t.gen.get_state(),
                       **getattr(t, "extra_state", dict)()}
                for name, t in self._tiles.items()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        for name, entry in state.items():
            if name not in self._tiles:
                self.allocate(name, *entry["shape"])
            tile = self._tiles[name]
            w = entry["w"]
            if tuple(w.shape) != tile.shape:
                raise BackendError(f"snapshot weights have shape {tuple(w.shape)}, tile is "
                                   f"{tile.shape}", tile=name, op="load_state_dict")
            tile.w = w.to(device=tile.w.device, dtype=torch.float32).clone().contiguous()
            tile.gen.set_state(entry["rng"])
            if hasattr(tile, "load_extra_state"):
                tile.load_extra_state(entry)
