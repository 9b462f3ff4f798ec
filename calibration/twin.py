"""``twin://PATH``: the emulator built from a calibration file.

``devices`` (URL parameter) says where an allocated tile's devices come from:

- ``exact`` (default): the measured devices themselves. The tile takes the calibration
  tile of the same name (its shape must match), else the first not yet used calibration
  tile of the same shape (file order); otherwise allocation fails and says which option
  would give the tile.
- ``population``: tiles of any shape, each device a whole calibrated device drawn at
  random (with replacement) from every tile of the file: family, dw_min, bounds, gamma,
  asymmetry, tables, c2c and read noise travel together, so their correlations survive.
- ``fitted-distribution``: tiles of any shape from a Gaussian copula fitted per family
  to the devices' parameters (rank correlations kept, marginals the measured ones with
  linear tails in normal-score space), so devices can lie between and beyond the
  measured ones; devices fitted as ``tabulated`` or stuck are drawn whole, at their rate.

Draws are seeded by ``seed`` and the tile name. Devices use their fitted q+-, dw_min,
bounds, c2c and read noise; devices whose trace had no steps are stuck. Other URL
parameters: ``c2c`` (override the relative c2c of all devices), ``read_noise`` (one std
for all devices, weight units; default each device's fitted read noise), ``init``
('sympoint' or a number: the devices' initial state), ``io``, ``device`` (cpu / cuda).
"""

from __future__ import annotations

import numpy as np
import torch

from calibration.calibfile import Calibration, TileCalibration, load_calibration
from calibration.fit import FAMILIES, GAMMA_LIMITS
from hil.errors import BackendError, BackendURLError, ConfigError
from hil.response import RESPONSE_CLASSES, MixedResponse
from hil.url import BackendURL
from sim_backend import DeviceArray, SimBackend, SimConfig

DEVICE_MODES = ("exact", "population", "fitted-distribution")
#: per-device quantities a fitted distribution draws, by family (log: sampled as logs)
COPULA_PARAMS = ("dw_min", "tau_min", "span", "gamma", "asym", "c2c", "read_noise")
LOG_PARAMS = {"dw_min", "span"}  # c2c, read noise: linear (fits may put some at 0)
MIN_COPULA_DEVICES = 8  # a family with fewer devices is drawn whole, like tabulated ones


def devices_from_calibration(tc: TileCalibration, c2c: float | None = None,
                             init: float | None = None, device: str = "cpu",
                             read_noise: float | None = None) -> DeviceArray:
    """A DeviceArray whose devices are the fitted devices of one calibration tile.

    ``read_noise`` None: each device reads with its own fitted read noise.
    """
    v = tc.values
    ok = v["family_index"] >= 0
    response = tc.response(torch.float32).to(device)
    families = np.unique(v["family_index"][ok])
    if isinstance(response, MixedResponse) and families.size == 1 and families[0] < 3:
        # one parametric family: its own response runs the emulator's fused kernels
        response = response.members[int(families[0])]

    def t(a: np.ndarray, fill: float) -> torch.Tensor:
        return torch.as_tensor(np.where(ok & np.isfinite(a), a, fill), dtype=torch.float32,
                               device=device)

    noise = t(v["c2c"], 0.0) if c2c is None else float(c2c)
    sym = t(v["symmetric_point"], 0.0)
    w0 = sym if init is None else torch.full_like(sym, float(init))
    w0 = torch.minimum(torch.maximum(w0, response.tau_min.float()), response.tau_max.float())
    stuck = torch.as_tensor(~ok, device=device)
    rn = (t(v["read_noise"], 0.0).clamp_min(0) if read_noise is None
          else torch.full_like(sym, float(read_noise)))
    return DeviceArray(response=response, dw_min=t(v["dw_min"], 0.0),
                       stuck=stuck if bool(stuck.any()) else None, c2c=noise, w0=w0,
                       read_noise=rn)


class TileMatcher:
    """Maps allocated tile names to calibration tiles (by name, else by shape in file order)."""

    HINT = ("; add devices=population to the twin URL to draw devices of any tile shape "
            "from the calibrated population")

    def __init__(self, cal: Calibration):
        self.cal = cal
        self.used: set[str] = set()

    def match(self, name: str, rows: int, cols: int) -> TileCalibration:
        tiles = self.cal.tiles
        if name in tiles:
            tc = tiles[name]
            if tc.shape != (rows, cols):
                raise BackendError(f"calibration tile {name!r} is {tc.shape[0]}x{tc.shape[1]}, "
                                   f"asked for {rows}x{cols}{self.HINT}", tile=name,
                                   op="allocate")
        else:
            free = [tc for n, tc in tiles.items() if n not in self.used
                    and tc.shape == (rows, cols)]
            if not free:
                raise BackendError(f"no unused calibration tile of shape {rows}x{cols} in "
                                   f"{self.cal.path}{self.HINT}", tile=name, op="allocate")
            tc = free[0]
        self.used.add(tc.name)
        return tc


class DevicePool:
    """Every device of a calibration as one flat population of whole parameter vectors."""

    def __init__(self, cal: Calibration):
        tiles = list(cal.tiles.values())
        grids = {tc.families["tabulated"]["w_grid"].shape[-1] for tc in tiles}
        if len(grids) != 1:
            raise ConfigError(str(cal.path), "families/tabulated/w_grid",
                              f"tiles have tables of different sizes {sorted(grids)}; a "
                              "population needs one size")
        keys = set.intersection(*(set(tc.values) for tc in tiles))
        self.values = {k: np.concatenate([tc.values[k].reshape(-1) for tc in tiles])
                       for k in sorted(keys)}
        fams = set.intersection(*(set(tc.families) for tc in tiles))
        self.families = {
            f: {k: np.concatenate([tc.families[f][k].reshape(-1, *tc.families[f][k].shape[2:])
                                   for tc in tiles])
                for k in tiles[0].families[f]}
            for f in sorted(fams)}
        self.weight_scale = float(np.median([tc.weight_scale for tc in tiles]))
        self.source = str(cal.path)

    @property
    def size(self) -> int:
        return int(self.values["family_index"].shape[0])

    def take(self, name: str, idx: np.ndarray) -> TileCalibration:
        """A tile [rows, cols] whose device (i, j) is pool device ``idx[i, j]``."""
        shape = idx.shape
        values = {k: v[idx] for k, v in self.values.items()}
        families = {f: {k: v[idx] for k, v in p.items()} for f, p in self.families.items()}
        return TileCalibration(name=name, shape=(int(shape[0]), int(shape[1])), values=values,
                               families=families, weight_scale=self.weight_scale)


def _rng(gen: torch.Generator) -> np.random.Generator:
    """A numpy generator drawn from the tile's torch generator (seed and tile name)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
    return np.random.default_rng(seed)


def resample_tile(pool: DevicePool, name: str, rows: int, cols: int,
                  rng: np.random.Generator) -> TileCalibration:
    """Bootstrap: every device a whole calibrated device drawn with replacement."""
    return pool.take(name, rng.integers(0, pool.size, size=(rows, cols)))


def _ndtri(p: np.ndarray) -> np.ndarray:
    return torch.special.ndtri(torch.as_tensor(p, dtype=torch.float64)).numpy()


class GaussianCopula:
    """Joint distribution of one family's per-device parameters: Gaussian copula over the
    normal scores of their ranks; marginals are the measured quantiles, interpolated in
    normal-score space and continued linearly beyond the extreme devices."""

    def __init__(self, data: np.ndarray):
        n, k = data.shape
        self.sorted = np.sort(data, 0)
        self.z = _ndtri((np.arange(n) + 0.5) / n)  # normal score of each order statistic
        ranks = np.argsort(np.argsort(data, 0), 0)
        scores = self.z[ranks]
        corr = np.corrcoef(scores, rowvar=False) if n > 2 else np.eye(k)
        corr = np.nan_to_num(np.atleast_2d(corr), nan=0.0)
        np.fill_diagonal(corr, 1.0)
        w, v = np.linalg.eigh(corr)  # nearest positive semi-definite, then Cholesky
        corr = (v * np.clip(w, 1e-6, None)) @ v.T
        d = np.sqrt(np.diag(corr))
        self.chol = np.linalg.cholesky(corr / np.outer(d, d))
        # tail slopes: from the outer tenth of the devices on each side
        m = max(2, n // 10)
        dz = self.z[m - 1] - self.z[0] if n > 1 else 1.0
        self.slope_lo = (self.sorted[m - 1] - self.sorted[0]) / max(dz, 1e-12)
        self.slope_hi = (self.sorted[-1] - self.sorted[-m]) / max(dz, 1e-12)

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal((count, self.chol.shape[0])) @ self.chol.T
        out = np.empty_like(z)
        for j in range(z.shape[1]):
            col = self.sorted[:, j]
            out[:, j] = np.interp(z[:, j], self.z, col)
            lo, hi = z[:, j] < self.z[0], z[:, j] > self.z[-1]
            out[lo, j] = col[0] + self.slope_lo[j] * (z[lo, j] - self.z[0])
            out[hi, j] = col[-1] + self.slope_hi[j] * (z[hi, j] - self.z[-1])
        return out


class FittedDistribution:
    """Per-family Gaussian copulas over the calibrated devices; tabulated and stuck
    devices (and those of families with fewer than MIN_COPULA_DEVICES) are drawn whole
    from the pool at their measured rates."""

    def __init__(self, pool: DevicePool):
        self.pool = pool
        fam = pool.values["family_index"].astype(int)
        self.rates = np.array([np.mean(fam == j) for j in range(len(FAMILIES))]
                              + [np.mean(fam < 0)])
        self.copulas: dict[int, GaussianCopula] = {}
        self.whole = {j: np.nonzero(fam == j)[0] for j in (FAMILIES.index("tabulated"), -1)}
        for j, f in enumerate(FAMILIES[:3]):
            sel = fam == j
            if sel.sum() >= MIN_COPULA_DEVICES:
                self.copulas[j] = GaussianCopula(self._params(f, sel))
            elif sel.any():  # too few to fit a joint distribution: drawn whole
                self.whole[j] = np.nonzero(sel)[0]

    def _params(self, family: str, sel: np.ndarray) -> np.ndarray:
        p = self.pool.families[family]
        v = self.pool.values
        cols = {"dw_min": v["dw_min"], "tau_min": p["tau_min"],
                "span": p["tau_max"] - p["tau_min"], "gamma": p["gamma"], "asym": p["asym"],
                "c2c": v["c2c"], "read_noise": v["read_noise"]}
        out = []
        for k in COPULA_PARAMS:
            a = np.nan_to_num(cols[k][sel].astype(np.float64), nan=0.0)
            if k in LOG_PARAMS:
                a = np.log(np.maximum(a, 1e-12))
            elif k == "gamma" and family == "power":
                a = np.log(np.maximum(a, 1e-12))
            out.append(a)
        return np.stack(out, 1)

    def tile(self, name: str, rows: int, cols: int, rng: np.random.Generator) -> TileCalibration:
        count = rows * cols
        choice = rng.choice(len(self.rates), size=count, p=self.rates / self.rates.sum())
        choice = np.where(choice == len(FAMILIES), -1, choice)
        # start from whole pool devices (tables, provenance fields), then overwrite the
        # parametric ones with copula draws
        base = rng.integers(0, self.pool.size, size=count)
        for j, members in self.whole.items():
            sel = choice == j
            if sel.any():
                base[sel] = members[rng.integers(0, members.size, size=int(sel.sum()))]
        tc = self.pool.take(name, base.reshape(rows, cols))
        v = {k: a.reshape(-1).copy() for k, a in tc.values.items()}
        fams = {f: {k: a.reshape(count, *a.shape[2:]).copy() for k, a in p.items()}
                for f, p in tc.families.items()}
        for j, cop in self.copulas.items():
            sel = np.nonzero(choice == j)[0]
            if sel.size == 0:
                continue
            fam = FAMILIES[j]
            s = cop.sample(sel.size, rng)
            d = dict(zip(COPULA_PARAMS, s.T, strict=True))
            for k in LOG_PARAMS:
                d[k] = np.exp(d[k])
            if fam == "power":
                d["gamma"] = np.exp(d["gamma"])
            if fam != "linear":
                d["gamma"] = np.clip(d["gamma"], *GAMMA_LIMITS[fam])
            else:
                d["gamma"] = np.ones_like(d["gamma"])
            d["asym"] = np.clip(d["asym"], -0.999, 0.999)
            d["c2c"], d["read_noise"] = np.maximum(d["c2c"], 0), np.maximum(d["read_noise"], 0)
            tmax = d["tau_min"] + d["span"]
            for f in fams:  # every member gets sane values; the family index picks one
                if f == "tabulated":
                    continue
                fams[f]["tau_min"][sel], fams[f]["tau_max"][sel] = d["tau_min"], tmax
                fams[f]["gamma"][sel] = d["gamma"] if f == fam else 1.0
                fams[f]["asym"][sel] = d["asym"]
                fams[f]["dw_min"][sel] = d["dw_min"]
            v["family_index"][sel] = j
            v["tau_min"][sel], v["tau_max"][sel] = d["tau_min"], tmax
            for k in ("dw_min", "gamma", "asym", "c2c", "read_noise"):
                v[k][sel] = d[k]
            resp = RESPONSE_CLASSES[fam](
                tau_min=torch.as_tensor(d["tau_min"]), tau_max=torch.as_tensor(tmax),
                gamma=torch.as_tensor(d["gamma"]), asym=torch.as_tensor(d["asym"]))
            v["symmetric_point"][sel] = resp.symmetric_point().numpy()
        v["family_index"] = np.where(choice < 0, -1, v["family_index"])
        shape = (rows, cols)
        return TileCalibration(
            name=name, shape=shape, values={k: a.reshape(shape) for k, a in v.items()},
            families={f: {k: a.reshape(*shape, *a.shape[1:]) for k, a in p.items()}
                      for f, p in fams.items()},
            weight_scale=tc.weight_scale)


def open_twin(url: BackendURL) -> SimBackend:
    """Factory behind ``twin://PATH?devices=..&seed=..&c2c=..&read_noise=..&init=..``."""
    if not url.location:
        raise BackendURLError(f"backend URL {url.url!r}: twin needs a calibration file path")
    cal = load_calibration(url.location)
    mode = url.get_str("devices", "exact", choices=DEVICE_MODES)
    seed = url.get_int("seed", 0, lo=0)
    c2c = url.get_float("c2c", None, lo=0.0, hi=10.0)
    init_raw = url.get_str("init", "sympoint")
    try:
        init = None if init_raw == "sympoint" else float(init_raw)
    except ValueError:
        raise BackendURLError(f"backend URL {url.url!r}: init={init_raw!r} must be 'sympoint' "
                              "or a number") from None
    device = url.get_str("device", "cpu", choices=("cpu", "cuda"))
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendURLError(f"backend URL {url.url!r}: device=cuda but CUDA is not available")
    read_noise = url.get_float("read_noise", None, lo=0.0)
    all_dw = np.concatenate([tc.values["dw_min"].ravel() for tc in cal.tiles.values()])
    dw_nominal = float(np.nanmedian(all_dw)) if np.isfinite(all_dw).any() else 1e-3
    config = SimConfig(dw_min=dw_nominal, read_noise=read_noise or 0.0, seed=seed,
                       device=device, io=url.get_str("io", "ideal", choices=("paper", "ideal")))
    if mode == "exact":
        matcher = TileMatcher(cal)

        def source(name: str, rows: int, cols: int, gen: torch.Generator) -> TileCalibration:
            return matcher.match(name, rows, cols)
    elif mode == "population":
        pool = DevicePool(cal)

        def source(name: str, rows: int, cols: int, gen: torch.Generator) -> TileCalibration:
            return resample_tile(pool, name, rows, cols, _rng(gen))
    else:
        dist = FittedDistribution(DevicePool(cal))

        def source(name: str, rows: int, cols: int, gen: torch.Generator) -> TileCalibration:
            return dist.tile(name, rows, cols, _rng(gen))

    def population(name: str, rows: int, cols: int, gen: torch.Generator) -> DeviceArray:
        return devices_from_calibration(source(name, rows, cols, gen), c2c, init, device,
                                        read_noise)

    return SimBackend(url.url, config, population=population)
