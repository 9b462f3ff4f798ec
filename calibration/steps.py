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
    lagged: Tensor | None = None  # [D] states from the reads before a step (read noise large)


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


@dataclass
class _Local:
    """Per-step local mean step: a straight line through each bin's steps (x, y)."""

    cnt: Tensor  # [cells] steps per bin
    ybar: Tensor  # [cells] mean step
    fit: Tensor  # [T-1, D] the bin's line at each step's state
    r: Tensor  # [T-1, D] residual of each step (0 where not ok)
    v: Tensor  # [cells] residual variance (n - 2 degrees of freedom)
    u: Tensor  # [T-1, D] (x - xbar) / sqrt(Sxx) of each step in its bin (0: no line)
    lev: Tensor  # [T-1, D] leverage 1/n + u^2 of each step


def _local_lines(x: Tensor, y: Tensor, ok: Tensor, binner: _Binner) -> _Local:
    """Least-squares line of the steps against their states within each bin.

    A bin's mean step alone leaves the change of the response across the bin in the
    residuals (it reads as extra c2c, more so the larger the steps against the range);
    a line per bin removes it to first order."""
    cnt = binner.add(torch.ones_like(y))
    n = cnt.clamp_min(1)
    xbar, ybar = binner.add(x) / n, binner.add(y) / n
    dx = x - xbar[binner.flat]
    dy = y - ybar[binner.flat]
    sxx, sxy = binner.add(dx * dx), binner.add(dx * dy)
    slope = torch.where((cnt >= 3) & (sxx > 0), sxy / sxx.clamp_min(1e-300), 0.0)
    fit = ybar[binner.flat] + slope[binner.flat] * dx
    r = torch.where(ok, y - fit, torch.zeros_like(y))
    dof = (cnt - torch.where(cnt >= 3, 2.0, 1.0)).clamp_min(1)
    v = binner.add(r * r) / dof
    s_own = sxx[binner.flat]
    u = torch.where((cnt[binner.flat] >= 3) & (s_own > 0), dx / s_own.clamp_min(1e-300).sqrt(),
                    0.0)
    return _Local(cnt=cnt, ybar=ybar, fit=fit, r=r, v=v, u=u,
                  lev=1 / n[binner.flat] + u * u)


def _lag_cov(loc: _Local, ok: Tensor, npulse: Tensor, flat: Tensor, lag: int) -> Tensor:
    """Mean product of residuals ``lag`` steps apart (in pulse-count-scaled units), with
    the correlation their shared bin line gives them (-v h_ij) added back."""
    r = loc.r
    pair = ok[:-lag] & ok[lag:]
    for j in range(1, lag):
        pair = pair & ok[j:j - lag]
    rr = r[:-lag] * r[lag:]
    same = flat[:-lag] == flat[lag:]
    h = 1 / loc.cnt[flat[:-lag]].clamp_min(1) + loc.u[:-lag] * loc.u[lag:]
    rr = rr + torch.where(same, loc.v[flat[:-lag]] * h, 0.0)
    rr = torch.where(pair, rr * npulse[:-lag] * npulse[lag:], torch.zeros_like(rr))
    return rr.sum(0) / pair.sum(0).clamp_min(1).to(r.dtype)


def _noise(x: Tensor, y: Tensor, ok: Tensor, npulse: Tensor,
           binner: _Binner) -> tuple[_Local, Tensor]:
    """Local lines per bin and the read-noise variance before its c2c correction.

    Read noise makes neighbouring steps anti-correlated (-s^2 at lag 1, nothing at lag 2);
    a step's c2c noise moves the state of the next ones, which correlates them by
    g c^2 f^2 at both lags (g the local slope of the step against the state). The lag-1
    less the lag-2 covariance leaves -s^2 - g^2 c^2 f^2; returns s^2 + g^2 c^2 f^2, for
    :func:`_c2c_var` to solve."""
    loc = _local_lines(x, y, ok, binner)
    c1 = _lag_cov(loc, ok, npulse, binner.flat, 1)
    c2 = _lag_cov(loc, ok, npulse, binner.flat, 2)
    return loc, c2 - c1  # unclamped: a clamp here would bias c2c


def _trend(x: Tensor, y: Tensor, ok: Tensor,
           direction: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Step f, its slope g = df/dx and curvature f'' at each step from one least-squares
    quadratic in the state per device and direction: smooth (pooled over all of a
    direction's steps) where a bin's own line through a handful of noisy steps is not."""
    okf = ok.to(y.dtype)
    powers = torch.stack([torch.ones_like(x), x, x * x, x ** 3, x ** 4])  # [5, T-1, D]
    out_f, out_g, out_c = torch.zeros_like(y), torch.zeros_like(y), torch.zeros_like(y)
    for j in (0, 1):
        w = okf * (direction == j).to(y.dtype)
        s = (powers * w).sum(1)  # [5, D]
        t = (powers[:3] * (w * y)).sum(1)  # [3, D]
        a = torch.stack([s[i:i + 3] for i in range(3)]).permute(2, 0, 1)  # [D, 3, 3]
        a = a + 1e-9 * torch.eye(3, dtype=y.dtype, device=y.device) * (s[0].view(-1, 1, 1) + 1)
        coef = torch.linalg.solve(a, t.t().unsqueeze(2)).squeeze(2)  # [D, 3]
        coef = torch.nan_to_num(coef)
        f = coef[:, 0] + coef[:, 1] * x + coef[:, 2] * x * x
        g = coef[:, 1] + 2 * coef[:, 2] * x
        sel = direction == j
        out_f, out_g = torch.where(sel, f, out_f), torch.where(sel, g, out_g)
        out_c = torch.where(sel, 2 * coef[:, 2].expand_as(x), out_c)
    return out_f, out_g, out_c


def _c2c_var(y: Tensor, ok: Tensor, d: Tensor, npulse: Tensor, f: Tensor, slope: Tensor,
             r1: Tensor, small_read: Tensor) -> tuple[Tensor, Tensor]:
    """Relative c2c variance and read-noise variance from second differences of the steps'
    residuals about a smooth trend.

    A step's residual about the trend at its own (measured) state, e_k = y_k - f(x_k), is
    its c2c noise (the noise of earlier steps only moved the state, which f(x_k) follows),
    so residuals of different steps are independent. The second difference
    D = e_k - 2 e_(k+1) + e_(k+2) of three consecutive steps of one direction cancels what
    the trend misses (smooth in the state) to second order: E[D^2] = c^2 (f_k^2
    + 4 f_(k+1)^2 + f_(k+2)^2) / n + 20 s^2 / n^2 (read noise s). The f^2 come from
    y_k y_(k+2) (free of both noises but for the state feedback, E = f_k f_(k+2)
    (1 + g (1 + g) c^2), g = n df/dx) and the trend's ratios; the lag covariances of
    :func:`_noise` give r1 = s^2 + G c^2. The pooled sums solve for c^2 and s^2.
    Where the reads alone showed the read noise small against the steps (``small_read``),
    its share of D's variance is capped at half: large, fast-changing steps can leave
    structure in the lag covariances that would otherwise read as read noise."""
    trip = ok[:-2] & ok[1:-1] & ok[2:] & (d[:-2] == d[1:-1]).unsqueeze(1) \
        & (d[1:-1] == d[2:]).unsqueeze(1)
    n = npulse[:-2]
    e = y - f
    dd = e[:-2] - 2 * e[1:-1] + e[2:]
    tf = trip.to(y.dtype)
    a = (tf * n * dd * dd).sum(0) / 6
    k = (tf * 20 / (6 * n)).sum(0)
    # y_k y_(k+2) estimates f_k f_(k+2); the trend's ratio turns it into the mean of
    # (f_k^2 + 4 f_(k+1)^2 + f_(k+2)^2) / 6 (which differ where steps are large)
    fk, fm = f[:-2] * f[2:], (f[:-2] ** 2 + 4 * f[1:-1] ** 2 + f[2:] ** 2) / 6
    rho = torch.where(fk > 0, fm / fk.clamp_min(1e-300), 1.0).clamp(0.2, 5.0)
    b = (tf * rho * y[:-2] * y[2:]).sum(0)
    g = slope[1:-1] * n
    h = (tf * rho * g * (1 + g) * fk).sum(0)
    pair = ok[:-1] & ok[1:]
    gf2 = torch.where(pair, (slope[:-1] * f[:-1] * npulse[:-1]) ** 2, 0.0)
    g_term = gf2.sum(0) / pair.sum(0).clamp_min(1).to(y.dtype)
    r1 = torch.where(small_read, torch.minimum(r1, 0.5 * a / k.clamp_min(1e-300)), r1)
    c2 = torch.zeros_like(a)
    for _ in range(4):  # fixed point of the (nearly linear) equation in c^2
        den = (b - k * g_term - h * c2).clamp_min(0.25 * b.abs() + 1e-300)
        c2 = ((a - k * r1) / den).clamp_min(0)
    c2 = torch.where(trip.any(0) & (b > 0), torch.nan_to_num(c2, nan=0.0), 0.0)
    return c2, (r1 - g_term * c2).clamp_min(0)


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
    _, read_a = _noise(s_k, y, base_ok, npulse, bin_a)
    typical = (y.abs() * base_ok).sum(0) / base_ok.sum(0).clamp_min(1)
    use_lag = read_a.clamp_min(0).sqrt() > 0.25 * typical  # [D]
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
    cnt = binner.add(torch.ones_like(y))
    y1 = binner.add(y) / cnt.clamp_min(1)
    cnt3, y13 = cnt.view(n_dev, 2, bins), y1.view(n_dev, 2, bins)
    dir_mean = (y13 * cnt3).sum(2) / cnt3.sum(2).clamp_min(1)  # [D, 2]
    fill = torch.where(cnt3 > 0, y13, dir_mean.unsqueeze(2)).reshape(-1)
    base = (binner.dev * 2) * bins + binner.bin
    x_c = x_b + lag[0] * fill[base] + lag[1] * fill[base + bins]
    # noise from lines through the lag-corrected states (the binning stays on x_b)
    _, r1 = _noise(x_c, y, ok, npulse, binner)
    f_trend, g_trend, _ = _trend(x_c, y, ok, direction)
    c2c_var, read_var = _c2c_var(y, ok, d, npulse, f_trend, g_trend, r1, ~use_lag)
    # The cells the fit sees leave out the held steps: those that push a device from its
    # highest read further up or from its lowest further down. They measure the bound,
    # not q: a device that reaches a hard bound (power gamma < 1 does in a finite number
    # of pulses; the step overshoots and is clipped) sits there, and its hundreds of zero
    # steps from the bound state, binned with the steep approach, make a bin mean no
    # q(x) can match. With read noise one such step per extreme is left out. A device with
    # nothing else (one that jumps between its bounds in a pulse) keeps them.
    top = torch.where(valid, s, -torch.inf).amax(0)
    bottom = torch.where(valid, s, torch.inf).amin(0)
    held = ((dk > 0) & (sf[:-1] >= top)) | ((dk < 0) & (sf[:-1] <= bottom))
    fit_ok, cells = ok, binner
    if bool((held & ok).any()):
        fit_ok = ok & ~held
        cells = _Binner(x_b, fit_ok, direction, bins)
        filled = (cells.add(torch.ones_like(y)).view(n_dev, 2, bins) > 0).sum(2)
        bare = (filled < 2).any(1)
        if bool(bare.any()):
            fit_ok = torch.where(bare, ok, fit_ok)
            cells = _Binner(x_b, fit_ok, direction, bins)
    cnt = cells.add(torch.ones_like(y))
    sx = cells.add(x_c)
    # contiguous runs of steps in one (direction, bin): read noise telescopes within a run
    flat = cells.flat
    prev_same = torch.zeros_like(fit_ok)
    prev_same[1:] = fit_ok[:-1] & fit_ok[1:] & (flat[:-1] == flat[1:])
    runs = cells.add((~prev_same).to(s.dtype))
    sy = cells.add(y)
    sxx = _run_slopes(sf, d, fit_ok, prev_same, flat, cells.size, use_lag, sy, cnt)
    return (cnt, sx, sy, runs, fit_ok.sum(0).to(s.dtype), read_var, c2c_var, sxx,
            use_lag)


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
    cnt, sx, sy, runs, n_ok, read_var, c2c_var, sxx, lagged = (
        torch.cat(p) for p in zip(*parts, strict=True))
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
                    c2c=c2c_var.sqrt(), lagged=lagged)


def per_step(states: Tensor, directions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every step of every device unbinned: the state before it (the read), the per-pulse
    step, the pulses per step [T-1] and where both reads are finite (states [T, D])."""
    d = directions.reshape(-1)
    ok = torch.isfinite(states[:-1]) & torch.isfinite(states[1:]) & (d != 0).unsqueeze(1)
    npulse = d.abs().clamp_min(1).to(states.dtype)
    y = torch.where(ok, (states[1:] - states[:-1]) / npulse.unsqueeze(1), 0.0)
    return torch.where(ok, states[:-1], 0.0), y, npulse, ok


def noise_from_residuals(e: Tensor, f: Tensor, fprime: Tensor, npulse: Tensor, ok: Tensor,
                         c2: Tensor, s2: Tensor, floor: Tensor, n_params: int,
                         rounds: int = 4) -> tuple[Tensor, Tensor]:
    """Relative c2c variance c^2 and read-noise variance s^2 from each step's residual
    about the *fitted* response at its own measured state (e, f, f' = df/dx: [T-1, D]).

    The emulator's (and the model's) pulse moves the state by f(w) (1 + c xi): with the
    fitted f evaluated at each step's own state, what the response does within a bin or
    between steps is gone, however large the steps (the noise of earlier steps only
    moved the state, which f(x_k) follows). With reads x = w + eps (std s), n pulses
    per read:

        e_k = c f_k xi / sqrt(n) + eps_(k+1) / n - (1 / n + f'_k) eps_k
        E[e_k^2]         = c^2 f_k^2 / n + s^2 (1 / n^2 + (1 / n + f'_k)^2)
        E[e_k e_(k+1)]   = -s^2 (1 / n_(k+1) + f'_(k+1)) / n_k

    c^2 and s^2 are the weighted least-squares solution of these moment equations, each
    moment weighted by its inverse variance (2 sigma_k^4, sigma_k^2 sigma_(k+1)^2) at the
    current estimate (``rounds`` reweightings from ``c2``, ``s2``; ``floor`` keeps the
    weights of steps the model puts at zero finite); the residuals' degrees of freedom
    (``n_params`` fitted per device) scale the result, as the fit absorbed that much of
    the noise."""
    n = npulse.unsqueeze(1)
    okf = ok.to(e.dtype)
    a = f * f / n
    b = 1 / n ** 2 + (1 / n + fprime) ** 2
    e2 = e * e
    pair = (ok[:-1] & ok[1:]).to(e.dtype)
    lag = -(1 / n[1:] + fprime[1:]) / n[:-1]
    q = e[:-1] * e[1:]
    c2, s2 = c2.clamp_min(0), s2.clamp_min(0)
    for _ in range(rounds):
        sig = c2 * a + s2 * b + floor
        w0 = okf / (2 * sig * sig)
        w1 = pair / (sig[:-1] * sig[1:])
        a11 = (w0 * a * a).sum(0)
        a12 = (w0 * a * b).sum(0)
        a22 = (w0 * b * b).sum(0) + (w1 * lag * lag).sum(0)
        r1 = (w0 * a * e2).sum(0)
        r2 = (w0 * b * e2).sum(0) + (w1 * lag * q).sum(0)
        det = a11 * a22 - a12 * a12
        c_j = (r1 * a22 - r2 * a12) / det
        s_j = (r2 * a11 - r1 * a12) / det
        c_only = r1 / a11  # s^2 = 0
        s_only = r2 / a22  # c^2 = 0
        c2 = torch.where(s_j < 0, c_only, torch.where(c_j < 0, 0.0, c_j))
        s2 = torch.where(s_j < 0, 0.0, torch.where(c_j < 0, s_only, s_j))
        c2 = torch.nan_to_num(c2, nan=0.0, posinf=0.0).clamp_min(0)
        s2 = torch.nan_to_num(s2, nan=0.0, posinf=0.0).clamp_min(0)
    m = okf.sum(0)
    dof = m / (m - n_params).clamp_min(1)
    return c2 * dof, s2 * dof
