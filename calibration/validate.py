"""``hil validate``: does the chip still behave like its twin?

The same training job (``hil.runs.train_run``, the code of ``hil train``) runs on the chip
and N times on the twin built from the chip's calibration (``twin://CALIB.h5``, one noise
seed per run; a population twin draws new devices per seed). Two checks:

The twin runs start from the chip's state at the job's first step (the tiles the job
does not program, e.g. P, sit wherever the chip left them) and use the chip's nominal
dw_min (what the algorithms divide by).

1. **Learning curves**: the chip's final test accuracy (test loss for regression) against
   the twin's prediction interval mean +- t_{0.995, N-1} * sd * sqrt(1 + 1/N), widened
   to at least one test sample.
2. **One-step-ahead prediction of the chip's weights**: the chip's backend is wrapped in
   a :class:`hil.recording.RecordingBackend`; before each algorithm step every chip tile
   is read (the sync state), after it read again (the observation). M twin replicas
   (different noise seeds) are set to the sync state, replay the step's pulse calls
   (pulse / pulse_columns / outer_update, as the chip got them) and give the predicted
   mean and variance of each device's next read. Per device and step the residual
   z = (obs - mean) / sigma, sigma^2 = var_replicas + 2 rn^2 + floor^2 (rn: the twin's
   read noise of the device, read twice; floor: ``floor`` x the device's calibrated dw_min), is
   summarized by quantities whose expected values under the twin are known:

   - ``step_up`` / ``step_down``: the ratio of observed to predicted change over the
     steps that moved the device up / down (1 under the twin);
   - ``drift``: the observed change of devices no pulse moved, signed towards w = 0
     (relaxation), as a mean z (0 under the twin);
   - ``noise``: the rms z over moved devices (about 1 under the twin: the calibrated
     cycle-to-cycle noise).

   Pooled over each tile (what a uniform change of the population shows long before
   single devices do):

   - ``step_out`` / ``step_in``: the ratio of observed to predicted change over the steps
     that moved devices away from w = 0 (towards their nearer bound) / back towards it.
     A change of dw_min moves both the same way, a change of the response's shape
     (gamma) moves them apart.

   A device (a tile) diverges in a quantity when the deviation is both significant (its
   z beyond the Bonferroni bound for alpha over all devices (tiles) and quantities) and
   larger than the tolerance (``step_tol``, ``drift_tol`` in units of dw_min,
   ``noise_tol``; ``tile_step_tol`` for the pooled ratios).

The verdict passes when the final metric lies in the twin's interval, no tile diverges
and at most ``max_diverged`` of the devices do (at least one; a device the calibration
fitted badly is named in the report without failing the chip; a changed chip moves
many). Everything lands in OUT: ``validate.h5``, ``report.md``, ``curves.png``,
``prediction_map.png``, ``prediction_hist.png``, and the run directories chip/, twin-K/.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import h5py
import numpy as np
import torch
from rich.console import Console

from calibration.calibfile import load_calibration
from hil.backend import Backend, Tile, open_backend
from hil.config import RunConfig
from hil.errors import BackendURLError, ConfigError
from hil.recording import PulseCall, RecordingBackend
from hil.runs import build_model, load_dataset, make_analog, train_run
from sim_backend import SimTile

QUANTITIES = ("step_up", "step_down", "drift", "noise")
TILE_QUANTITIES = ("step_out", "step_in")


@dataclass(frozen=True)
class Tolerances:
    """How far a device may stray from its twin before it counts as diverged."""

    alpha: float = 0.01  # family-wise false-alarm rate of the per-device tests
    step_tol: float = 0.2  # |observed / predicted step - 1| of a device
    tile_step_tol: float = 0.03  # the same, pooled over a tile
    drift_tol: float = 0.05  # mean relaxation per step of an idle device, in dw_min
    noise_tol: float = 2.0  # rms z of moved devices
    floor: float = 0.05  # sigma floor, in dw_min (float rounding of a driver's weight map)
    replicas: int = 8  # twin replicas of the one-step-ahead prediction
    max_diverged: float = 0.01  # fraction of devices that may diverge (misfit devices)
    twin_options: str = ""  # more twin:// URL parameters, e.g. 'io=paper' (the periphery)


def job_tiles(cfg: RunConfig, config_path: str = "<config>") -> dict[str, tuple[int, int]]:
    """Every tile the job allocates, by name, with its shape (the job built on a probe
    emulator, nothing trained)."""
    ds = load_dataset(cfg, config_path)
    model = build_model(cfg, ds)
    if cfg.algorithm.name == "digital":
        raise ConfigError(config_path, "algorithm.name", "a digital job allocates no tiles")
    with open_backend("sim://?io=ideal&engine=eager") as be:
        make_analog(model, cfg, be, program_init=False)
        return {name: t.shape for name, t in be.tiles().items()}


def twin_url(calib: Path, tiles: dict[str, tuple[int, int]], seed: int,
             options: str = "") -> tuple[str, str]:
    """The twin's URL for one seed and its kind: 'exact' where the calibration holds every
    job tile by name and shape, else 'population' (the calibrated population twin);
    ``options``: more twin:// parameters ('io=paper', ...)."""
    cal = load_calibration(calib)
    exact = all(n in cal.tiles and cal.tiles[n].shape == s for n, s in tiles.items())
    extra = f"&{options.lstrip('&')}" if options else ""
    if exact:
        return f"twin://{calib}?seed={seed}{extra}", "exact"
    return f"twin://{calib}?devices=population&seed={seed}{extra}", "population"


class StepPredictor:
    """The one-step-ahead prediction of the chip's reads by twin replicas (see module)."""

    def __init__(self, calib: Path, tiles: dict[str, tuple[int, int]], tol: Tolerances):
        self.tol = tol
        self.tiles = tiles
        base = 100_000
        self.replicas: list[Backend] = []
        try:
            for k in range(tol.replicas):
                url, _ = twin_url(calib, tiles, base + k, tol.twin_options)
                try:
                    be = open_backend(url)
                except BackendURLError as exc:
                    raise ConfigError(str(calib), "tiles", f"no twin of the job's tiles "
                                      f"{sorted(tiles)} opens ({exc}); run hil characterize "
                                      "--config") from None
                self.replicas.append(be)
                for name, shape in tiles.items():
                    be.allocate(name, *shape)
        except BaseException:
            self.close()
            raise
        self.read_noise = {n: self._read_noise(self.replicas[0].tile(n)) for n in tiles}
        self.dw = {n: self.replicas[0].tile(n).devices.dw_min.detach().cpu().double()
                   .expand(*s).numpy().copy() for n, s in tiles.items()}
        self.chip: RecordingBackend | None = None
        self.sync: dict[str, np.ndarray] | None = None
        self.initial: dict[str, np.ndarray] | None = None
        self.prev: dict[str, np.ndarray] | None = None
        self.nominal: dict[str, float] = {}
        self.steps = 0
        self.acc = {n: _Accumulator(s) for n, s in tiles.items()}
        self.step_rms: list[float] = []
        self.z_sample: list[np.ndarray] = []

    @staticmethod
    def _read_noise(tile: Tile) -> np.ndarray:
        """The twin's read noise of each device (its own, else the tile's one value)."""
        assert isinstance(tile, SimTile)
        per_device = getattr(tile.devices, "read_noise", None)
        if per_device is not None:
            return per_device.detach().cpu().double().expand(*tile.shape).numpy().copy()
        return np.full(tile.shape, float(tile.cfg.read_noise))

    def close(self) -> None:
        for be in self.replicas:
            be.close()

    def wrap(self, backend: Backend) -> Backend:
        self.chip = RecordingBackend(backend, on_step=self._after_step,
                                     on_step_start=self._before_step)
        return self.chip

    def _read_chip(self) -> dict[str, np.ndarray]:
        assert self.chip is not None
        return {n: self.chip.inner.tile(n).read().detach().cpu().double().numpy()
                for n in self.tiles}

    def _before_step(self) -> None:
        if self.sync is None:  # the job's first step: the chip's state the twin starts from
            assert self.chip is not None
            self.sync = self._read_chip()
            self.initial = dict(self.sync)
            self.nominal = {n: self.chip.inner.tile(n).dw_min for n in self.tiles}
            for be in self.replicas:
                for n, dw in self.nominal.items():
                    be.tile(n).dw_min = dw

    def preload(self, backend: Backend) -> Backend:
        """A twin run's backend holding the job's tiles in the chip's state at its first
        step, with the chip's nominal dw_min (the job then claims these tiles)."""
        if self.initial is None:
            raise ConfigError("<chip run>", "steps", "the chip run took no step")
        for n, w in self.initial.items():
            tile = backend.allocate(n, *w.shape)
            assert isinstance(tile, SimTile)
            tile.w.copy_(torch.as_tensor(w, dtype=torch.float32))
            tile.dw_min = self.nominal[n]
        return backend

    def _after_step(self, calls: list[PulseCall]) -> None:
        obs = self._read_chip()
        assert self.sync is not None
        preds = {n: [] for n in self.tiles}
        for be in self.replicas:
            for n in self.tiles:
                tile = be.tile(n)
                assert isinstance(tile, SimTile)
                tile.w.copy_(torch.as_tensor(self.sync[n], dtype=torch.float32))
            for call in calls:
                call.replay(be.tile(call.tile))
            for n in self.tiles:
                preds[n].append(be.tile(n).w.detach().cpu().double().numpy().copy())
        zs = []
        pulsed = _pulsed(calls, self.tiles)
        for n in self.tiles:
            p = np.stack(preds[n])
            mean, var = p.mean(0), p.var(0, ddof=1)
            moved = pulsed[n]
            sigma2 = var + 2 * self.read_noise[n] ** 2 + (self.tol.floor * self.dw[n]) ** 2
            prev = self.prev[n] if self.prev is not None else np.zeros_like(mean)
            # the direction towards w = 0 from the read before the sync read: the sync
            # read's own noise would bias it (regression to the mean)
            side = np.where(np.abs(prev) > 3 * np.sqrt(sigma2), np.sign(prev), 0.0)
            z = self.acc[n].add(side, self.sync[n], obs[n], mean, sigma2, moved)
            zs.append(z.ravel())
        z_all = np.concatenate(zs)
        self.step_rms.append(float(np.sqrt(np.mean(z_all ** 2))))
        if self.steps % 4 == 0:
            self.z_sample.append(z_all.astype(np.float32))
        self.prev, self.sync = self.sync, obs
        self.steps += 1


def _pulsed(calls: list[PulseCall], tiles: dict[str, tuple[int, int]]
            ) -> dict[str, np.ndarray]:
    """Per tile, the devices a step's calls could pulse (an outer update: the devices whose
    row error and column input are both nonzero in some sample)."""
    out = {n: np.zeros(s, bool) for n, s in tiles.items()}
    for call in calls:
        m = out[call.tile]
        if call.op == "pulse":
            m |= call.args[0].numpy() != 0
        elif call.op == "pulse_columns":
            n, first, width = call.args
            m[:, first:first + width] |= n.numpy() != 0
        else:
            x, d, _ = call.args
            m |= (d.abs().sum(0).numpy() > 0)[:, None] & (x.abs().sum(0).numpy() > 0)[None, :]
    return out


@dataclass
class _Accumulator:
    """Per-device sums over steps of one tile (see the module's quantities)."""

    shape: tuple[int, int]
    sums: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k in ("up_op", "up_pp", "up_var", "dn_op", "dn_pp", "dn_var",
                  "out_op", "out_pp", "out_var", "in_op", "in_pp", "in_var", "moved_z2",
                  "moved_n", "idle_rel", "idle_rel_z", "idle_n"):
            self.sums[k] = np.zeros(self.shape)

    def add(self, side: np.ndarray, sync: np.ndarray, obs: np.ndarray, mean: np.ndarray,
            sigma2: np.ndarray, moved: np.ndarray) -> np.ndarray:
        """One step: ``side`` the sign of w (0 where unknown), ``sync`` the read the
        twin started from, ``obs`` the chip's read after the step, ``mean`` / ``sigma2``
        the prediction, ``moved`` the devices the step pulsed; returns z."""
        s = self.sums
        sigma = np.sqrt(sigma2)
        z = (obs - mean) / sigma
        dp, do = mean - sync, obs - sync
        for key, sel in (("up", moved & (dp > 0)), ("dn", moved & (dp < 0)),
                         ("out", moved & (dp * side > 0)), ("in", moved & (dp * side < 0))):
            s[f"{key}_op"] += np.where(sel, do * dp, 0)
            s[f"{key}_pp"] += np.where(sel, dp * dp, 0)
            s[f"{key}_var"] += np.where(sel, sigma2 * dp * dp, 0)
        s["moved_z2"] += np.where(moved, z * z, 0)
        s["moved_n"] += moved
        idle = ~moved & (side != 0)
        towards_zero = -side * do  # > 0: relaxed towards w = 0
        s["idle_rel"] += np.where(idle, towards_zero, 0)
        s["idle_rel_z"] += np.where(idle, towards_zero / sigma, 0)
        s["idle_n"] += idle
        return z

    def quantities(self, dw: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per quantity: (value, its z against the twin's expectation) maps; NaN where
        the device gave no evidence."""
        s = self.sums
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        with np.errstate(divide="ignore", invalid="ignore"):
            for key, name in (("up", "step_up"), ("dn", "step_down")):
                ratio = s[f"{key}_op"] / s[f"{key}_pp"]
                se = np.sqrt(s[f"{key}_var"]) / s[f"{key}_pp"]
                out[name] = (ratio, (ratio - 1) / se)
            n = s["idle_n"]
            out["drift"] = (s["idle_rel"] / n / dw, s["idle_rel_z"] / np.sqrt(n))
            m = s["moved_n"]
            rms = np.sqrt(s["moved_z2"] / m)
            # rms z of m standard normals: sd of z^2 is sqrt(2), so of the mean sqrt(2/m)
            out["noise"] = (rms, (rms ** 2 - 1) / np.sqrt(2 / m))
        return out

    def pooled(self) -> dict[str, tuple[float, float]]:
        """Tile-level (value, z) of the pooled step ratios away from / towards w = 0."""
        s = self.sums
        out = {}
        for key, name in (("out", "step_out"), ("in", "step_in")):
            pp = float(s[f"{key}_pp"].sum())
            if pp <= 0:
                out[name] = (math.nan, math.nan)
                continue
            ratio = float(s[f"{key}_op"].sum()) / pp
            out[name] = (ratio, (ratio - 1) / (math.sqrt(float(s[f"{key}_var"].sum())) / pp))
        return out


def _t_quantile(p: float, dof: int) -> float:
    """Student-t quantile by the Cornish-Fisher expansion around the normal one."""
    z = NormalDist().inv_cdf(p)
    if dof <= 0:
        return math.inf
    v = float(dof)
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


@dataclass
class Divergence:
    """One device (row, col) or a whole tile (row = col = -1) that left its twin."""

    tile: str
    row: int
    col: int
    quantity: str
    value: float
    z: float

    @property
    def where(self) -> str:
        return self.tile if self.row < 0 else f"{self.tile}[{self.row},{self.col}]"


@dataclass
class ValidationResult:
    passed: bool
    verdict: str
    metric: str
    chip_final: float
    interval: tuple[float, float]
    divergences: list[Divergence]
    devices: int
    out_dir: Path
    counts: dict[str, int]
    pooled: dict[str, dict[str, tuple[float, float]]]  # tile -> quantity -> (value, z)


def _metric(metrics: dict[str, Any]) -> tuple[str, np.ndarray]:
    if "test_acc" in metrics and len(metrics["test_acc"]):
        return "test_acc", np.asarray(metrics["test_acc"], float)
    return "test_loss", np.asarray(metrics["test_loss"], float)


def validate(cfg: RunConfig, chip_url: str, calib: Path, out: Path, *, seeds: int = 4,
             config_path: str = "<config>", tol: Tolerances | None = None,
             console: Console | None = None, progress: bool = True) -> ValidationResult:
    """Run the job on the chip (with the one-step-ahead prediction) and ``seeds`` times on
    the twin; judge, write the report, figures and ``validate.h5`` into ``out``."""
    tol = tol or Tolerances()
    console = console or Console()
    if seeds < 2:
        raise ConfigError("<command line>", "--seeds", "needs at least 2 twin runs")
    calib = Path(calib)
    if not calib.is_file():
        raise ConfigError(str(calib), "--twin", "no such calibration file")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(str(out), "--out", "is not empty (a validation writes a new "
                                             "directory)")
    tiles = job_tiles(cfg, config_path)
    _, kind = twin_url(calib, tiles, 0)
    predictor = StepPredictor(calib, tiles, tol)
    try:
        console.print(f"chip run on {chip_url} ({len(tiles)} tiles, {kind} twin, "
                      f"{tol.replicas} replicas predicting each step)", highlight=False)
        chip = train_run(cfg, out / "chip", config_path=config_path, backend_url=chip_url,
                         console=console, progress=progress, wrap_backend=predictor.wrap)
    finally:
        predictor.close()
    twins = []
    for k in range(seeds):
        url, _ = twin_url(calib, tiles, k, tol.twin_options)
        console.print(f"twin run {k + 1}/{seeds} on {url}", highlight=False)
        twins.append(train_run(cfg, out / f"twin-{k}", config_path=config_path,
                               backend_url=url, console=console, progress=progress,
                               wrap_backend=predictor.preload))
    metric, chip_curve = _metric(chip.metrics)
    twin_curves = np.stack([_metric(t.metrics)[1] for t in twins])
    finals = twin_curves[:, -1]
    mean, sd = float(finals.mean()), float(finals.std(ddof=1))
    half = _t_quantile(0.995, seeds - 1) * sd * math.sqrt(1 + 1 / seeds)
    if metric == "test_acc":
        ds = load_dataset(cfg, config_path)
        half = max(half, 1.0 / ds.x_test.shape[0])
    interval = (mean - half, mean + half)
    chip_final = float(chip_curve[-1])
    metric_ok = interval[0] <= chip_final <= interval[1]
    # per-device divergences
    n_dev = sum(r * c for r, c in tiles.values())
    z_crit = NormalDist().inv_cdf(1 - tol.alpha / (2 * n_dev * len(QUANTITIES)))
    divergences: list[Divergence] = []
    maps: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for name, acc in predictor.acc.items():
        q = acc.quantities(predictor.dw[name])
        maps[name] = q
        for qname, (value, z) in q.items():
            if qname in ("step_up", "step_down"):
                big = np.abs(value - 1) > tol.step_tol
            elif qname == "drift":
                big = np.abs(value) > tol.drift_tol
            else:
                big = value > tol.noise_tol
            bad = big & (np.abs(z) > z_crit) & np.isfinite(z)
            for r, c in zip(*np.nonzero(bad), strict=True):
                divergences.append(Divergence(name, int(r), int(c), qname,
                                              float(value[r, c]), float(z[r, c])))
    z_tile = NormalDist().inv_cdf(1 - tol.alpha / (2 * len(tiles) * len(TILE_QUANTITIES)))
    pooled = {name: acc.pooled() for name, acc in predictor.acc.items()}
    for name, q in pooled.items():
        for qname, (value, z) in q.items():
            if abs(value - 1) > tol.tile_step_tol and abs(z) > z_tile:
                divergences.append(Divergence(name, -1, -1, qname, value, z))
    divergences.sort(key=lambda d: (d.row >= 0, -abs(d.z)))
    counts = {qn: sum(d.quantity == qn for d in divergences)
              for qn in (*TILE_QUANTITIES, *QUANTITIES)}
    devs = [d for d in divergences if d.row >= 0]
    tile_divs = [d for d in divergences if d.row < 0]
    n_diverged = len({(d.tile, d.row, d.col) for d in devs})
    allowed = max(1, int(tol.max_diverged * n_dev)) if tol.max_diverged > 0 else 0
    passed = metric_ok and not tile_divs and n_diverged <= allowed
    label = "accuracy" if metric == "test_acc" else "test loss"
    fmt = (lambda v: f"{100 * v:.1f}%") if metric == "test_acc" else (lambda v: f"{v:.4g}")
    where = (f"final {label} {fmt(chip_final)} "
             f"{'in' if metric_ok else 'OUTSIDE'} the twin's [{fmt(interval[0])}, "
             f"{fmt(interval[1])}]")
    dev = f"{n_diverged} of {n_dev} devices diverged (tolerated {allowed})"
    if devs:
        parts = ", ".join(f"{k} {v}" for k, v in counts.items() if v and k in QUANTITIES)
        worst = max(devs, key=lambda d: abs(d.z))
        dev += (f": {parts}; worst {worst.where} {worst.quantity} {worst.value:.3g}, "
                f"z {worst.z:.1f}")
    if tile_divs:
        dev += "; tiles: " + ", ".join(f"{d.tile} {d.quantity} {d.value:.3f} (z {d.z:.1f})"
                                       for d in tile_divs)
    verdict = f"{'PASS' if passed else 'FAIL'}: {where}; {dev}"
    result = ValidationResult(passed, verdict, metric, chip_final, interval, divergences,
                              n_dev, out, counts, pooled)
    _write(out, result, cfg, chip_url, calib, kind, tol, z_crit, chip_curve, twin_curves,
           predictor, maps)
    return result


def _write(out: Path, res: ValidationResult, cfg: RunConfig, chip_url: str, calib: Path,
           kind: str, tol: Tolerances, z_crit: float, chip_curve: np.ndarray,
           twin_curves: np.ndarray, predictor: StepPredictor,
           maps: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> None:
    from calibration.validate_report import write_figures, write_markdown

    z_all = (np.concatenate(predictor.z_sample) if predictor.z_sample
             else np.zeros(0, np.float32))
    figs = write_figures(out, res.metric, chip_curve, twin_curves, maps, z_all,
                         res.divergences)
    write_markdown(out / "report.md", res, chip_url, calib, kind, tol, z_crit, figs, maps)
    tmp = out / "validate.h5.tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs.update(verdict=res.verdict, passed=res.passed, chip=chip_url,
                       twin=str(calib), twin_kind=kind, metric=res.metric,
                       chip_final=res.chip_final, interval=np.asarray(res.interval),
                       config=json.dumps(cfg.model_dump()), z_crit=z_crit,
                       tolerances=json.dumps(tol.__dict__))
        f["curves/chip"] = chip_curve
        f["curves/twin"] = twin_curves
        f["prediction/step_rms_z"] = np.asarray(predictor.step_rms)
        f["prediction/z_sample"] = z_all
        for name, q in maps.items():
            g = f.create_group(f"tiles/{name}")
            for qname, (value, z) in res.pooled[name].items():
                g.attrs[qname] = value
                g.attrs[f"{qname}_z"] = z
            for qname, (value, z) in q.items():
                g[f"{qname}/value"] = value
                g[f"{qname}/z"] = z
        dt = np.dtype([("tile", h5py.string_dtype()), ("row", "i4"), ("col", "i4"),
                       ("quantity", h5py.string_dtype()), ("value", "f8"), ("z", "f8")])
        f.create_dataset("divergences", data=np.array(
            [(d.tile, d.row, d.col, d.quantity, d.value, d.z) for d in res.divergences],
            dtype=dt))
    tmp.replace(out / "validate.h5")

