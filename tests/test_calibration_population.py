"""The population twin: tiles of any shape drawn from a calibration, with the measured
parameter distributions and correlations; the exact twin names the option it lacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import ks_2samp, spearmanr

from calibration.calibfile import load_calibration, write_calibration
from calibration.fit import torch_threads
from calibration.measfile import MeasurementWriter
from calibration.pipeline import fit_file
from calibration.protocols import SweepProtocol, characterize
from calibration.twin import DevicePool, FittedDistribution, resample_tile
from hil.backend import open_backend
from hil.cli import main
from hil.errors import BackendError

CHIP = "sim://?model=power&gamma=2&dw_min=0.02&d2d=0.3&c2c=0.1&read_noise=0.002&seed=7"
PARAMS = ("dw_min", "tau_min", "tau_max", "gamma", "asym", "c2c", "read_noise")
EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "digits_rlv2.yaml"


@pytest.fixture(scope="module")
def calib16(tmp_path_factory) -> Path:
    """A 16x16 calibration of a power-law chip (the README's characterize + fit)."""
    tmp = tmp_path_factory.mktemp("pop")
    proto = SweepProtocol(pulses=300, cycles=2, sympoint_pairs=0, noise_reads=0, block=300)
    with torch_threads(1), open_backend(CHIP) as be, \
            MeasurementWriter(tmp / "m.h5", CHIP, proto.as_dict()) as w:
        characterize(be, w, {"cal": (16, 16)}, proto)
    tiles, prov = fit_file(tmp / "m.h5")
    write_calibration(tmp / "calib.h5", tiles, prov)
    return tmp / "calib.h5"


def _params(values: dict[str, np.ndarray]) -> np.ndarray:
    ok = values["family_index"].reshape(-1) >= 0
    return np.stack([values[k].reshape(-1)[ok] for k in PARAMS], 1)


def _check_distribution(measured: np.ndarray, sampled: np.ndarray, ks_p: float) -> None:
    """Two-sample KS per parameter; Spearman correlations within 4 standard errors."""
    for j, name in enumerate(PARAMS):
        if np.ptp(measured[:, j]) == 0:
            continue
        p = ks_2samp(measured[:, j], sampled[:, j]).pvalue
        assert p > ks_p, f"{name}: KS p = {p:.3g}"
    rho_m = spearmanr(measured).statistic
    rho_s = spearmanr(sampled).statistic
    se = 1.06 * np.sqrt(1 / (len(measured) - 3) + 1 / (len(sampled) - 3))
    ok = np.isfinite(rho_m) & np.isfinite(rho_s)
    worst = np.max(np.abs(rho_m - rho_s)[ok] / se)
    print(f"largest rank-correlation difference: {worst:.2f} standard errors")
    assert worst < 4


def test_population_tiles_match_the_calibrated_distribution(calib16):
    cal = load_calibration(calib16)
    pool = DevicePool(cal)
    measured = _params(cal.tiles["cal"].values)
    tile = resample_tile(pool, "big", 64, 64, np.random.default_rng(1))
    assert tile.shape == (64, 64)
    sampled = _params(tile.values)
    _check_distribution(measured, sampled, ks_p=0.01)
    # whole vectors: every sampled device is one calibrated device, all parameters together
    rows = {tuple(r) for r in measured.round(12)}
    assert all(tuple(r) in rows for r in sampled.round(12))


def test_fitted_distribution_matches_and_goes_beyond_the_measured_devices(calib16):
    cal = load_calibration(calib16)
    dist = FittedDistribution(DevicePool(cal))
    measured = _params(cal.tiles["cal"].values)
    tile = dist.tile("big", 64, 64, np.random.default_rng(2))
    sampled = _params(tile.values)
    _check_distribution(measured, sampled, ks_p=0.001)
    # new devices: not copies, and some outside the measured range
    rows = {tuple(r) for r in measured.round(12)}
    assert np.mean([tuple(r) in rows for r in sampled.round(12)]) < 0.5
    assert (sampled[:, 0] > measured[:, 0].max()).any()
    # every sampled device is a working device of its family
    resp = tile.response()
    assert torch.isfinite(resp.q_plus(torch.zeros(64, 64))).all()
    assert (tile.values["tau_max"] > tile.values["tau_min"]).all()


@torch_threads(1)
def test_population_twin_allocates_any_shape_seeded(calib16):
    url = f"twin://{calib16}?devices=population&seed=4"
    with open_backend(url) as a, open_backend(url) as b:
        ta, tb = a.allocate("W0", 32, 64), b.allocate("W0", 32, 64)
        assert ta.shape == (32, 64)
        assert torch.equal(ta.devices.dw_min, tb.devices.dw_min)
        other = a.allocate("W1", 32, 64)  # another tile: other devices
        assert not torch.equal(ta.devices.dw_min, other.devices.dw_min)
        # each device reads with its own fitted read noise
        rn = ta.devices.read_noise
        assert rn is not None and rn.shape == (32, 64) and float(rn.median()) > 0
    with open_backend(f"twin://{calib16}?devices=fitted-distribution") as c:
        assert c.allocate("W0", 10, 32).shape == (10, 32)


def test_exact_twin_names_the_option_that_would_give_the_tile(calib16):
    with open_backend(f"twin://{calib16}") as twin:
        with pytest.raises(BackendError, match="devices=population"):
            twin.allocate("W0", 32, 64)
        assert twin.allocate("cal", 16, 16).shape == (16, 16)  # exact replay still there
    with pytest.raises(Exception, match="devices"):
        open_backend(f"twin://{calib16}?devices=bogus")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_population_twin_trains_the_digits_network(calib16, tmp_path):
    cfg = yaml.safe_load(EXPERIMENT.read_text())
    cfg["train"]["epochs"] = 1  # shortened: the twin's mixed responses pulse eagerly
    cfg["data"] = {**cfg["data"], "limit_train": 400, "limit_test": 100}
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    main(["train", str(path), "--backend", f"twin://{calib16}?devices=population",
          "--out", str(out), "--quiet"])
    import h5py

    with h5py.File(out / "run.h5", "r") as h5:
        acc = h5["metrics"]["test_acc"][()]
    print("digits on the population twin: test accuracy per epoch", acc)
    assert acc[-1] > 0.35  # ten classes: chance is 0.1
