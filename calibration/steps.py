"""Turn read traces into binned step statistics per device, free of errors-in-variables bias.

A step k goes from read s_k to read s_{k+1}. Regressing it on s_k itself is biased
(the read noise of s_k enters the step with the opposite sign), and on the midpoint
it is biased by the step's own c2c noise. So the state at step k is estimated from
the ``window`` reads *before* it (independent of both noises of the step), corrected
for the lag by the mean step of the bin it falls in; the variance of each bin mean
accounts for the telescoping of read noise over contiguous runs of steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class StepBins:
    """Binned steps per device, direction (0: up, 1: down) and bin; normalized units."""

    x: Tensor  # [D, 2, K] mean estimated state of the bin's steps
    y: Tensor  # [D, 2, K] mean per-pulse step (signed)
    n: Tensor  # [D, 2, K] number of steps
    var: Tensor  # [D, 2, K] variance of the bin mean y
    n_steps: Tensor  # [D] steps used
    read_noise: Tensor  # [D] read-noise std (normalized units)
    c2c: Tensor  # [D] relative cycle-to-cycle noise of one pulse


def _prefix(c: Tensor) -> Tensor:
    return torch.cat([c.new_zeros((1, *c.shape[1:])), torch.cumsum(c, 0)])


class _Binner:
    """Scatter-adds per-step values into (device, direction, bin) cells of one chunk."""

    def __init__(self, x: Tensor, ok: Tensor, direction: Tensor, bins: int):
        n_dev = x.shape[1]
        inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
        lo = torch.where(ok, x, inf).amin(0)
        hi = torch.where(ok, x, -inf).amax(0)
        width = (hi - lo).clamp_min(1e-12)
        b = ((x - lo) / width * bins).floor().clamp(0, bins - 1)
        b = torch.where(ok, b, torch.zeros_like(b)).long()
        self.bin = b
        self.dev = torch.arange(n_dev, device=x.device).unsqueeze(0)
        self.flat = (self.dev * 2 + direction) * bins + b
        self.size = n_dev * 2 * bins
        self.okf = ok.to(x.dtype)
        self.bins = bins

    def add(self, v: Tensor) -> Tensor:
        out = torch.zeros(self.size, dtype=v.dtype, device=v.device)
        return out.scatter_add_(0, self.flat.reshape(-1), (v * self.okf).reshape(-1))


def _noise(y: Tensor, ok: Tensor, npulse: Tensor, binner: _Binner) -> tuple[Tensor, ...]:
    """Bin means, read-noise variance (lag-1 covariance of residuals) and relative c2c variance.

    The within-bin variation of the mean step (slope between neighbour bins times the
    spread of states in the bin) is taken out of the residual variance before c2c.
    """
    cnt = binner.add(torch.ones_like(y))
    ybar = binner.add(y) / cnt.clamp_min(1)
    f_own = ybar[binner.flat]
    r = torch.where(ok, y - f_own, torch.zeros_like(y))
    pair = ok[:-1] & ok[1:]
    rr = r[:-1] * r[1:]
    # residuals of one bin share its mean: a same-bin pair is correlated by -v / n even
    # without read noise; add that back (v estimated by r^2 n / (n - 1))
    n_own = cnt[binner.flat]
    same = binner.flat[:-1] == binner.flat[1:]
    rr = rr + torch.where(same, r[:-1] ** 2 / (n_own[:-1] - 1).clamp_min(1), 0.0)
    rr = torch.where(pair, rr * npulse[:-1] * npulse[1:], torch.zeros_like(rr))
    read_var = (-rr.sum(0) / pair.sum(0).clamp_min(1).to(y.dtype)).clamp_min(0)
    return cnt, ybar, f_own, r, read_var


def _chunk(s: Tensor, d: Tensor, bins: int, window: int) -> tuple[Tensor, ...]:
    """Statistics of one chunk of devices: s [T, D] (NaN allowed), d [T-1] signed counts."""
    t_len, n_dev = s.shape
    n_st = t_len - 1
    valid = torch.isfinite(s)
    sf = torch.where(valid, s, torch.zeros_like(s))
    idx = torch.arange(t_len, device=s.device).unsqueeze(1)
    last_bad = torch.cummax(torch.where(valid, torch.full_like(idx, -1).expand_as(s),
                                        idx.expand_as(s)), 0).values
    run = idx - last_bad  # consecutive valid reads ending at k
    k = torch.arange(n_st, device=s.device).unsqueeze(1)
    mk = (run[:-1] - 1).clamp(0, window)
    dk = d.unsqueeze(1).expand(n_st, n_dev)
    base_ok = valid[:-1] & valid[1:] & (dk != 0)
    npulse = dk.abs().clamp_min(1).to(s.dtype)
    y = torch.where(base_ok, (sf[1:] - sf[:-1]) / npulse, torch.zeros_like(s[1:]))
    direction = (dk < 0).long()
    # pass A: states as read; is the read noise large against a step?
    s_k = sf[:-1]
    bin_a = _Binner(s_k, base_ok, direction, bins)
    _, _, _, _, read_a = _noise(y, base_ok, npulse, bin_a)
    typical = (y.abs() * base_ok).sum(0) / base_ok.sum(0).clamp_min(1)
    use_lag = read_a.sqrt() > 0.25 * typical  # [D]
    ok = base_ok & ((mk >= 1) | ~use_lag)
    if bool(use_lag.any()):
        mkf = mk.clamp_min(1).to(s.dtype)
        cs = _prefix(sf)
        start = k - mk  # first read of the window
        x_lag = (cs[:-2] - cs.gather(0, start)) / mkf  # mean of reads k - mk .. k - 1
        # lag correction weights: sum over the window's steps of their fraction of its reads
        kf = k.to(s.dtype)
        lag = []
        for c in (d.clamp_min(0).to(s.dtype), (-d).clamp_min(0).to(s.dtype)):
            p0 = _prefix(c)
            p1 = _prefix(c * torch.arange(n_st, device=s.device, dtype=s.dtype))
            s0 = p0[:-1].unsqueeze(1) - p0[start]
            s1 = p1[:-1].unsqueeze(1) - p1[start]
            lag.append(torch.where(use_lag, (s1 - (kf - 1 - mk.to(s.dtype)) * s0) / mkf, 0.0))
        x_b = torch.where(use_lag, x_lag, s_k)
    else:  # read noise negligible everywhere: the reads locate the steps
        lag = [torch.zeros_like(s_k), torch.zeros_like(s_k)]
        x_b = s_k
    binner = _Binner(x_b, ok, direction, bins)
    cnt, y1, f_own, r, read_var = _noise(y, ok, npulse, binner)
    cnt3, y13 = cnt.view(n_dev, 2, bins), y1.view(n_dev, 2, bins)
    dir_mean = (y13 * cnt3).sum(2) / cnt3.sum(2).clamp_min(1)  # [D, 2]
    fill = torch.where(cnt3 > 0, y13, dir_mean.unsqueeze(2)).reshape(-1)
    base = (binner.dev * 2) * bins + binner.bin
    x_c = x_b + lag[0] * fill[base] + lag[1] * fill[base + bins]
    sx = binner.add(x_c)
    okf = binner.okf
    # c2c: per bin, residual variance less read noise over the squared mean step; the
    # median over bins ignores the few bins where the mean step changes a lot within the bin
    rss = binner.add(r * r).view(n_dev, 2, bins)
    nbar = (npulse * okf).sum(0) / okf.sum(0).clamp_min(1)
    v_b = rss / (cnt3 - 1).clamp_min(1) - (2 * read_var / nbar**2).view(-1, 1, 1)
    c2c_b = v_b * nbar.view(-1, 1, 1) / (y13 * y13).clamp_min(1e-300)
    c2c_b = torch.where((cnt3 >= 5) & (y13 != 0), c2c_b, torch.nan)
    c2c_var = torch.nan_to_num(torch.nanmedian(c2c_b.flatten(1), 1).values, nan=0.0)
    c2c_var = c2c_var.clamp_min(0)
    # contiguous runs of steps in one (direction, bin): read noise telescopes within a run
    flat = binner.flat
    prev_same = torch.zeros_like(ok)
    prev_same[1:] = ok[:-1] & ok[1:] & (flat[:-1] == flat[1:])
    runs = binner.add((~prev_same).to(s.dtype))
    sy = binner.add(y)
    sxx = _run_slopes(sf, d, ok, prev_same, flat, binner.size, use_lag, sy, cnt)
    return (cnt, sx, sy, runs, ok.sum(0).to(s.dtype), read_var, c2c_var, sxx)


def _run_slopes(sf: Tensor, d: Tensor, ok: Tensor, prev_same: Tensor, flat: Tensor, size: int,
                use_lag: Tensor, sy: Tensor, cnt: Tensor) -> Tensor:
    """Where read noise dominates, replace each cell's mean step by the least-squares slope of
    its reads against the pulse count (one intercept per contiguous run, a common slope):
    for read noise s, the slope's variance is 12 s^2 / n^3 against 2 s^2 / n^2 for the mean.

    Updates ``sy`` in place (to slope * count) and returns the cells' sum of squares of the
    pulse position (0 for cells left as means).
    """
    n_st, n_dev = ok.shape
    if not bool(use_lag.any()):
        return torch.zeros_like(sy)
    pos = _prefix(d.abs().to(sf.dtype))  # pulses before read k
    okt, prev_t = ok.t(), prev_same.t()
    nxt = torch.zeros_like(okt)
    nxt[:, :-1] = prev_t[:, 1:]
    start = (okt & ~prev_t).reshape(-1)
    last = (okt & ~nxt).reshape(-1)
    rid = torch.cumsum(start.long(), 0) - 1
    rid = rid.clamp_min(0)
    okf = okt.reshape(-1).to(sf.dtype)
    lastf = last.to(sf.dtype)
    p0 = pos[:-1].unsqueeze(0).expand(n_dev, n_st).reshape(-1)
    p1 = pos[1:].unsqueeze(0).expand(n_dev, n_st).reshape(-1)
    s0 = sf[:-1].t().reshape(-1)
    s1 = sf[1:].t().reshape(-1)
    n_runs = int(start.sum())
    if n_runs == 0:
        return torch.zeros_like(sy)

    def acc(v: Tensor) -> Tensor:
        return torch.zeros(n_runs, dtype=sf.dtype, device=sf.device).scatter_add_(0, rid, v)

    n = acc(okf + lastf)
    sp = acc(p0 * okf + p1 * lastf)
    spp = acc(p0 * p0 * okf + p1 * p1 * lastf)
    ss = acc(s0 * okf + s1 * lastf)
    sps = acc(p0 * s0 * okf + p1 * s1 * lastf)
    sxx_r = spp - sp * sp / n.clamp_min(1)
    sxy_r = sps - sp * ss / n.clamp_min(1)
    cell = torch.zeros(n_runs, dtype=torch.long, device=sf.device)
    cell[rid[start]] = flat.t().reshape(-1)[start]
    sxx = torch.zeros(size, dtype=sf.dtype, device=sf.device).scatter_add_(0, cell, sxx_r)
    sxy = torch.zeros(size, dtype=sf.dtype, device=sf.device).scatter_add_(0, cell, sxy_r)
    lag_cell = use_lag.repeat_interleave(size // n_dev)
    use = lag_cell & (sxx > 0)
    sy.copy_(torch.where(use, sxy / sxx.clamp_min(1e-300) * cnt, sy))
    return torch.where(use, sxx, torch.zeros_like(sxx))


def bin_steps(states: Tensor, directions: Tensor, bins: int = 24, window: int = 8,
              chunk: int = 4096) -> StepBins:
    """Binned per-pulse steps of every device (states [T, D] normalized, directions [T-1])."""
    n_dev = states.shape[1]
    parts = [_chunk(states[:, i:i + chunk], directions, bins, window)
             for i in range(0, n_dev, chunk)]
    cnt, sx, sy, runs, n_ok, read_var, c2c_var, sxx = (torch.cat(p) for p in zip(*parts,
                                                                                  strict=True))
    shape = (n_dev, 2, bins)
    cnt, sx, sy, runs, sxx = (v.view(shape) for v in (cnt, sx, sy, runs, sxx))
    n = cnt
    x = sx / n.clamp_min(1)
    y = sy / n.clamp_min(1)
    npulse = directions[directions != 0].abs().to(states.dtype).mean().clamp_min(1)
    c2c_var_c = c2c_var.view(n_dev, 1, 1)
    read_c = read_var.view(n_dev, 1, 1)
    var = (c2c_var_c * y * y * n / npulse + 2 * read_c * runs / npulse**2) / n.clamp_min(1) ** 2
    # cells estimated by the least-squares slope: read-noise variance s^2 / Sxx
    var_ls = c2c_var_c * y * y / (n.clamp_min(1) * npulse) + read_c / sxx.clamp_min(1e-300)
    var = torch.where(sxx > 0, var_ls, var)
    # floor: a bin mean is never known better than 0.1 % of the device's typical step
    typical = (y.abs() * n).sum((1, 2)) / n.sum((1, 2)).clamp_min(1)
    floor = (1e-3 * typical).view(n_dev, 1, 1) ** 2 / n.clamp_min(1) + 1e-30
    var = torch.where(n > 0, var + floor, torch.full_like(var, float("inf")))
    return StepBins(x=x, y=y, n=n, var=var, n_steps=n_ok, read_noise=read_var.sqrt(),
                    c2c=c2c_var.sqrt())
