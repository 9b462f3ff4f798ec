"""Fused per-pulse kernels of the emulator: one memory pass applies several pulses to every device.

The parametric families (linear, power, exp) are reduced to per-device coefficients so
one pulse of polarity s is a short formula (see :class:`FusedParams`). The same Python
functions run eagerly or through ``torch.compile`` (inductor: C++ loops on the CPU,
Triton on CUDA); the math is identical, the compiled results differ from eager ones only
by float rounding of pow/exp/log (a few ulp).

Cycle-to-cycle noise comes from a counter-based generator: the normal of pulse t of
device i is a hash of (call key, i, t), so no random number is stored or drawn for idle
devices, a device's noise does not depend on what the other devices do, and results are
bit-identical run to run. The call key is drawn from the tile's torch.Generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hil.response import ExpResponse, LinearResponse, PowerResponse

Tensor = torch.Tensor
Variant = tuple[str, float | None]  # (family, uniform power gamma or None)
FUSED_TYPES = {LinearResponse: "linear", PowerResponse: "power", ExpResponse: "exp"}
_GOLDEN = -1640531527  # 0x9E3779B9 as int32
_TWO_PI = 2.0 * math.pi
_HALF_PI = 0.5 * math.pi
_OUTPUT_SALT = 0x2545F491  # separates an MVM's output-noise stream from the pulse streams


def _mix(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (xor-shift / multiply, 'lowbias32') on int32 tensors."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * -2073254261  # 0x846CA68B
    return x ^ ((x >> 16) & 0xFFFF)


def device_hash(key: Tensor, numel: int, device: torch.device) -> Tensor:
    """Per-device stream id for one call: mix(i ^ key) for device i (int32 [numel])."""
    idx = torch.arange(numel, dtype=torch.int32, device=device)
    return _mix(idx ^ key)


def pulse_normal(h: Tensor, t: Tensor | int) -> Tensor:
    """The standard normal of pulse t of the devices with stream ids h: Box-Muller on the
    24-bit uniforms of pulse pair t // 2, its cosine for even t and its sine for odd t (one
    pair of draws serves two pulses)."""
    a = _mix(h + (t >> 1) * _GOLDEN)
    b = _mix(a ^ 0x5BD1E995)
    u1 = (((a >> 8) & 0xFFFFFF).to(torch.float32) + 1.0) * (1.0 / 16777216.0)
    u2 = ((b >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / 16777216.0)
    # sin(a) = cos(a - pi/2): one transcendental per element for either half
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2 - (t & 1) * _HALF_PI)


def operand(terms: list[tuple[Tensor, float]], transpose: bool) -> Tensor:
    """The right-hand matrix of an MVM x @ (.) over the weighted sum sum_k c_k w_k of the
    terms: its transpose for the forward MVM, the sum itself for the backward one."""
    w = terms[0][0] if terms[0][1] == 1.0 else terms[0][1] * terms[0][0]
    for wk, ck in terms[1:]:
        w = torch.add(w, wk, alpha=ck)
    return w if transpose else w.t()


def output_normals(key: Tensor, shape: tuple[int, int], device: torch.device) -> Tensor:
    """The output noise of one MVM call under ``key``: standard normals [B, n_out], that of
    output e = b n_out + i being pulse_normal(mix(key ^ salt), e) (the native kernel draws
    the same in registers, so no noise tensor is made or passed there)."""
    n = shape[0] * shape[1]
    t = torch.arange(n, dtype=torch.int64, device=device).to(torch.int32)
    return pulse_normal(_mix(key ^ _OUTPUT_SALT), t).view(shape)


def hash_uniform(key: Tensor, numel: int, device: torch.device) -> Tensor:
    """Uniforms in [0, 1) (24-bit) of the counters 0 .. numel-1 under ``key``: the
    coincidence pulse trains' draws, the same in the native kernel (no generator state
    to stream through, so the native kernel draws them in registers)."""
    idx = torch.arange(numel, dtype=torch.int64, device=device).to(torch.int32)
    a = _mix(_mix(idx ^ key) + 0x68E31DA4)
    return ((a >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / 16777216.0)


@dataclass
class FusedParams:
    """Per-device coefficients (flat float32 [numel]) of a parametric family.

    One pulse moves w by +kp * h(tau_max - w) or -km * h(w - tau_min), clipped to
    [tau_min, tau_max], with h(v) = v (linear), v^g (power), expm1(g v) (exp). The
    amplitude asymmetry, dw_min, the half range, 1/expm1(gamma) and stuck devices
    (kp = km = 0) are folded into kp and km.
    """

    family: str
    kp: Tensor
    km: Tensor
    tmin: Tensor
    tmax: Tensor
    g: Tensor | None  # power: gamma; exp: gamma / half range; linear or uniform gamma: None
    c2c: Tensor  # 0-d or [numel]
    gamma: float | None = None  # power with one gamma for all devices: a kernel constant
    noisy: bool = False  # any device with c2c > 0 (decided once, not per call)
    uniform: bool = False  # kp, km, tmin, tmax (and g) the same for every device (no d2d)

    @property
    def variant(self) -> Variant:
        """What selects the kernel code: the family and, for power, a uniform gamma."""
        return self.family, self.gamma

    def tensors(self) -> tuple[Tensor, ...]:
        g = self.tmin if self.g is None else self.g  # unused by linear, keeps one signature
        return self.kp, self.km, self.tmin, self.tmax, g, self.c2c

    @property
    def bytes_per_device(self) -> int:
        """Bytes one noiseless pass streams per device: w read+write, n, the coefficients."""
        per = [] if self.uniform else [
            t for t in (self.kp, self.km, self.tmin, self.tmax, self.g) if t is not None]
        if self.c2c.dim():
            per.append(self.c2c)
        return 4 + 4 + 4 + sum(t.element_size() for t in per)


def fused_params(dev) -> FusedParams | None:
    """Coefficients of a DeviceArray whose response is linear/power/exp, else None."""
    family = FUSED_TYPES.get(type(dev.response))
    if family is None:
        return None
    r = dev.response
    shape = dev.w0.shape
    f64 = torch.float64

    def full(x: Tensor) -> Tensor:
        return x.to(f64).expand(shape)

    tmin, tmax = full(r.tau_min), full(r.tau_max)
    a, g = full(r.asym), full(r.gamma)
    inv_s = 2.0 / (tmax - tmin)
    dw = full(dev.dw_min)
    cp, cm = dw * (1 + a), dw * (1 - a)
    gamma = None
    if family == "linear":
        cp, cm, gg = cp * inv_s, cm * inv_s, None
    elif family == "power":
        scale = inv_s.pow(g)
        cp, cm, gg = cp * scale, cm * scale, g
        if g.numel() and bool((g == g.reshape(-1)[0]).all()):
            gamma, gg = float(g.reshape(-1)[0]), None
    else:
        g = torch.where(g.abs() < 1e-6, torch.full_like(g, 1e-6), g)
        scale = 1.0 / torch.expm1(g)
        cp, cm, gg = cp * scale, cm * scale, g * inv_s
    if dev.stuck is not None:
        cp = torch.where(dev.stuck, 0.0, cp)
        cm = torch.where(dev.stuck, 0.0, cm)
    f32 = torch.float32

    def flat(x: Tensor) -> Tensor:
        return x.to(f32).reshape(-1).contiguous()

    c2c = dev.c2c
    c2c_t = (flat(torch.as_tensor(c2c).expand(shape)) if isinstance(c2c, Tensor) and c2c.dim()
             else torch.tensor(float(c2c), dtype=f32, device=dev.w0.device))
    coeffs = [flat(t) for t in (cp, cm, tmin, tmax)] + ([] if gg is None else [flat(gg)])
    uniform = all(bool((t == t[0]).all()) for t in coeffs if t.numel())
    return FusedParams(family, *coeffs[:4], coeffs[4] if gg is not None else None, c2c_t,
                       gamma, bool((c2c_t > 0).any()), uniform)


def _power(v: Tensor, g: Tensor, gamma: float | None) -> Tensor:
    """v^g for v >= 0: exact shortcuts for common constant exponents, else exp2(g log2 v)
    (about twice as fast as pow in inductor's vectorized C++)."""
    if gamma == 0.5:
        return torch.sqrt(v)
    if gamma == 1.0:
        return v
    if gamma == 2.0:
        return v * v
    return torch.exp2((g if gamma is None else gamma) * torch.log2(v))


def _signed_step(variant: Variant, w: Tensor, pos: Tensor, kp: Tensor,
                 km: Tensor, tmin: Tensor, tmax: Tensor, g: Tensor) -> Tensor:
    """The noiseless signed step of one pulse (see FusedParams)."""
    family, gamma = variant
    v = torch.where(pos, tmax - w, w - tmin).clamp_min(0.0)
    if family == "power":
        h = _power(v, g, gamma)
    elif family == "exp":
        h = torch.expm1(g * v)
    else:
        h = v
    return torch.where(pos, kp, -km) * h


def _unrolled_pulses(variant: Variant, noisy: bool, unroll: int, x: Tensor, pos: Tensor,
                     remaining: Tensor, kp: Tensor, km: Tensor, tmin: Tensor, tmax: Tensor,
                     g: Tensor, c2c: Tensor, h: Tensor | None, t0: Tensor) -> Tensor:
    """Up to ``unroll`` pulses in registers: pulse j moves the devices with remaining > j,
    clipped to the bounds, with the c2c normal of noise counter t0 + j."""
    for j in range(unroll):
        step = _signed_step(variant, x, pos, kp, km, tmin, tmax, g)
        if noisy:
            step = step * (1.0 + c2c * pulse_normal(h, t0 + j))
        x = torch.where(remaining > j, torch.clamp(x + step, tmin, tmax), x)
    return x


def make_pulse_chunk(family: Variant, noisy: bool, unroll: int) -> Callable[..., None]:
    """Kernel applying pulses k0 .. k0+unroll-1 of n (devices with |n| > k) to w in place."""

    def pulse_chunk(w: Tensor, n: Tensor, kp: Tensor, km: Tensor, tmin: Tensor, tmax: Tensor,
                    g: Tensor, c2c: Tensor, key: Tensor, k0: Tensor) -> None:
        absn = n.abs()
        pos = n > 0
        h = device_hash(key, w.shape[0], w.device) if noisy else None
        x = _unrolled_pulses(family, noisy, unroll, w, pos, absn - k0, kp, km, tmin, tmax,
                             g, c2c, h, k0)
        w.copy_(x)

    return pulse_chunk


def make_sample_chunk(family: Variant, noisy: bool, unroll: int) -> Callable[..., None]:
    """Kernel applying pulses k0 .. k0+unroll-1 of one sample's counts n to w in place.

    Like the pulse kernel, but pulse k of the sample draws the noise of counter t0 + k, so
    the samples of one outer_update (t0 = pulse slots used by the samples before) never
    share a noise counter. ``ids`` (int32, or None for all) restricts the pass to those
    devices (gathered, pulsed, scattered back in one kernel).
    """

    def sample_chunk(w: Tensor, n: Tensor, ids: Tensor | None, kp: Tensor, km: Tensor,
                     tmin: Tensor, tmax: Tensor, g: Tensor, c2c: Tensor, key: Tensor,
                     t0: Tensor, k0: Tensor) -> None:
        if ids is not None:  # the devices ids only: gather, pulse, scatter back
            sel = ids.long()
            n = n[sel]
            kp, km, tmin, tmax, g, c2c = (t[sel] if t.dim() else t
                                          for t in (kp, km, tmin, tmax, g, c2c))
            x = w[sel]
        else:
            x = w
        absn = n.to(torch.int32).abs()
        pos = n > 0
        h = None
        if noisy:
            h = device_hash(key, w.shape[0], w.device) if ids is None else _mix(ids ^ key)
        x = _unrolled_pulses(family, noisy, unroll, x, pos, absn - k0, kp, km, tmin, tmax,
                             g, c2c, h, t0 + k0)
        if ids is None:
            w.copy_(x)
        else:
            w.index_copy_(0, sel, x)

    return sample_chunk


def make_train_chunk(family: Variant, noisy: bool, unroll: int) -> Callable[..., None]:
    """Kernel running one chunk of the per-device pulse sequence of a batch of counts.

    counts [B, numel] holds each sample's signed pulse count. Per device the state
    (b, rem) says which sample is being applied and how many of its pulses remain. A
    chunk first moves each device whose sample is finished (rem = 0) on to its next
    sample (one gather per chunk, not per pulse), then applies up to ``unroll`` pulses
    of the current sample. So sample b's pulses all land before sample b+1's, and a
    device is through after sum_b ceil(max(|n_b|, 1) / unroll) chunks. ``t0`` [numel]
    counts each device's pulses so far (updated in place): its noise counters run
    0, 1, 2, ... over the call, as in the native kernel.
    """

    def train_chunk(w: Tensor, counts: Tensor, b: Tensor, rem: Tensor, kp: Tensor, km: Tensor,
                    tmin: Tensor, tmax: Tensor, g: Tensor, c2c: Tensor, key: Tensor,
                    t0: Tensor) -> None:
        nb = counts.shape[0]
        adv = rem == 0
        bb = torch.where(adv, b + 1, b)
        cur = counts.gather(0, bb.clamp(0, nb - 1).unsqueeze(0)).squeeze(0).to(torch.int32)
        rr = torch.where(adv, torch.where(bb < nb, cur.abs(), 0), rem)
        pos = cur > 0
        h = device_hash(key, w.shape[0], w.device) if noisy else None
        x = _unrolled_pulses(family, noisy, unroll, w, pos, rr, kp, km, tmin, tmax, g, c2c, h,
                             t0)
        t0.add_(rr.clamp_max(unroll))
        rr = (rr - unroll).clamp_min(0)
        w.copy_(x)
        b.copy_(bb)
        rem.copy_(rr)

    return train_chunk


def make_chunk_count(unroll: int) -> Callable[[Tensor], Tensor]:
    """Chunks of ``unroll`` pulses the train kernel needs: max over devices of
    sum_b ceil(max(|n_b|, 1) / unroll), in one pass over counts [B, numel]."""

    def chunk_count(counts: Tensor) -> Tensor:
        per = (counts.to(torch.int32).abs().clamp_min(1) + (unroll - 1)) // unroll
        return per.sum(0).max()

    return chunk_count


_COMPILED: dict[tuple, Callable] = {}


def get_kernel(kind: str, family: Variant, noisy: bool, unroll: int, compiled: bool
               ) -> Callable:
    """The 'pulse', 'sample' (one sample of a batch), 'train' (batch sequence) or 'chunks'
    (train chunk count) kernel, eager or torch.compile'd (cached)."""
    def make() -> Callable:
        if kind == "chunks":
            return make_chunk_count(unroll)
        maker = {"pulse": make_pulse_chunk, "sample": make_sample_chunk,
                 "train": make_train_chunk}[kind]
        return maker(family, noisy, unroll)

    if not compiled:
        return make()
    key = (kind, family, noisy, unroll) if kind != "chunks" else (kind, unroll)
    fn = _COMPILED.get(key)
    if fn is None:
        # all variants of one kernel share a code object, whose compiled graphs dynamo caps
        # at recompile_limit (8 by default): past it the kernel silently runs eagerly
        dyn = torch._dynamo.config
        dyn.recompile_limit = max(dyn.recompile_limit, 64)
        # indices are clamped in the kernel, so inductor's per-gather bounds check is redundant
        fn = torch.compile(make(), dynamic=True, fullgraph=True,
                           options={"assert_indirect_indexing": False})
        _COMPILED[key] = fn
    return fn
