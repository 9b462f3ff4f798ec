"""Value-level bad input: non-finite URL parameters and config values, YAML duplicate keys
and bools where numbers belong, broken measurement and calibration files; each one line
naming the file (or URL) and the field, exit code 2, nothing half-written."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
import yaml

from calibration.calibfile import load_calibration
from calibration.measfile import load_measurement
from calibration.protocols import SweepProtocol
from calibration.workflow import run_characterize, run_fit
from drivers.profile import load_profile
from hil.backend import check_finite, open_backend
from hil.cli import main
from hil.config import load_config, load_yaml
from hil.errors import BackendURLError, ConfigError, NonFiniteError
from hil.url import BackendURL

CONFIG = {
    "name": "tiny", "seed": 1, "backend": "sim://?seed=3",
    "model": {"hidden": [4], "activation": "tanh"},
    "data": {"name": "digits", "limit_train": 20, "limit_test": 20},
    "algorithm": {"name": "analog_sgd", "lr": 0.1},
    "train": {"epochs": 1, "batch_size": 10},
}


def cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# -- URL parameters ------------------------------------------------------------------------
@pytest.mark.parametrize("param", ["tau_max=inf", "tau_min=-inf", "read_noise=inf",
                                   "dw_min=inf", "init=inf", "init=nan", "inp_bound=inf",
                                   "out_bound=inf", "out_noise=inf", "tau=inf",
                                   "tau_max=1e999", "c2c=nan"])
def test_non_finite_url_parameters_are_refused(param):
    with pytest.raises(BackendURLError, match="finite"):
        open_backend(f"sim://?{param}")


def test_get_float_allows_inf_only_when_asked():
    url = BackendURL.parse("x://?a=inf&b=-Infinity&c=nan")
    with pytest.raises(BackendURLError, match="a='inf' must be a finite number"):
        url.get_float("a")
    assert url.get_float("b", allow_inf=True) == -float("inf")
    with pytest.raises(BackendURLError):
        url.get_float("c", allow_inf=True)


def test_non_finite_driver_url_parameter_is_refused():
    with pytest.raises(BackendURLError, match="timeout"):
        open_backend("visa://TCPIP0::127.0.0.1::1::SOCKET?timeout=inf")


def test_train_with_an_infinite_url_parameter_is_one_line_exit_2(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "out"
    assert cli(["train", str(cfg), "--out", str(out), "--quiet",
                "--backend", "sim://?tau_max=inf"]) == 2
    assert "tau_max" in one_error_line(capsys)
    assert not out.exists()


# -- run configs ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, field", [
    ("algorithm: {name: analog_sgd, lr: .inf}", "algorithm.lr"),
    ("algorithm: {name: rlv2, lr: 0.1, transfer_lr: .nan}", "algorithm.transfer_lr"),
    ("algorithm: {name: rlv2, lr: 0.1, gamma: .inf}", "algorithm.gamma"),
    ("algorithm: {name: analog_sgd, lr: 0.1, max_pulses: 2.5}", "algorithm.max_pulses"),
    ("algorithm: {name: analog_sgd, lr: 0.1, max_pulses: true}", "algorithm.max_pulses"),
    ("train: {epochs: 1, lr_decay: .nan}", "train.lr_decay"),
    ("train: {epochs: true}", "train.epochs"),
    ("seed: true", "seed"),
    ("seed: 1.5", "seed"),
    ("seed: 99999999999999999999", "seed"),
    ("data: {name: digits, test_fraction: .nan}", "data.test_fraction"),
    ("model: {hidden: [4, true]}", "model.hidden.1"),
    ("algorithm: {name: analog_sgd, zero_shift: 1}", "algorithm.zero_shift"),
    ("seed: 1\nseed: 2", "duplicate key 'seed'"),
    ("algorithm:\n  name: rlv2\n  lr: 0.1\n  lr: 10.0", "duplicate key 'lr'"),
])
def test_bad_config_values_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, text,
                                                                 field):
    path = tmp_path / "run.yaml"
    base = {k: v for k, v in CONFIG.items() if k not in yaml.safe_load(text)}
    path.write_text(yaml.safe_dump(base) + text + "\n")
    out = tmp_path / "out"
    assert cli(["train", str(path), "--out", str(out), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert str(path) in err and field in err, err
    assert not out.exists()


def test_duplicate_key_names_the_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\ntrain:\n  epochs: 1\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"line 4.*duplicate key 'epochs' \(first on line 3\)"):
        load_config(path)
    assert load_yaml("a: 1\nb: {a: 2}\n") == {"a": 1, "b": {"a": 2}}  # other mappings: fine
    assert load_yaml("base: &b {x: 1}\nderived: {<<: *b, x: 2}\n")["derived"] == {"x": 2}


def test_config_that_is_not_utf8_is_one_config_error(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="bin.yaml"):
        load_config(path)


# -- station profiles ----------------------------------------------------------------------
@pytest.mark.parametrize("old, new, field", [
    ("max_pulses_per_command: 1024", "max_pulses_per_command: true",
     "limits.max_pulses_per_command"),
    ("max_amplitude_v: 2.0", "max_amplitude_v: .inf", "limits.max_amplitude_v"),
    ("width_s: 1.0e-6, compliance_a: 1.0e-4}\n  depress",
     "width_s: .nan, compliance_a: 1.0e-4}\n  depress", "pulses.potentiate.width_s"),
    ("allowed_rows: [0, 1023]", "allowed_rows: [0, 1023]\n  allowed_rows: [0, 1]", "line"),
    ("allowed_cols: [0, 1023]", "allowed_cols: [true, 1023]", "limits.allowed_cols"),
])
def test_bad_profile_values_are_refused(tmp_path, old, new, field):
    text = open(load_profile.__globals__["profile_path"]("virtual")).read()
    assert old in text
    path = tmp_path / "p.yaml"
    path.write_text(text.replace(old, new))
    with pytest.raises(ConfigError) as exc:
        load_profile(str(path))
    assert field in str(exc.value) and "\n" not in str(exc.value)


# -- measurement and calibration files -----------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small measurement and its calibration (fitted once for the module)."""
    d = tmp_path_factory.mktemp("cal")
    proto = SweepProtocol(pulses=40, cycles=1, read_every=1, sympoint_pairs=10, noise_reads=4)
    run_characterize("sim://?model=power&dw_min=0.02&c2c=0.05&seed=1", d / "m.h5",
                     {"cal": (2, 3)}, proto)
    run_fit(d / "c.h5", meas=d / "m.h5")
    return d / "m.h5", d / "c.h5"


def edited(src, dst, edit):
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        edit(f)
    return dst


def replace(group, name, data):
    del group[name]
    group[name] = data


@pytest.mark.parametrize("edit, field", [
    (lambda f: replace(f["tiles/cal/sweep"], "states", f["tiles/cal/sweep/states"][:, 0]),
     "tiles/cal/sweep/states"),
    (lambda f: replace(f["tiles/cal/sweep"], "states",
                       f["tiles/cal/sweep/states"][()].astype("S8")), "tiles/cal/sweep/states"),
    (lambda f: replace(f["tiles/cal/sweep"], "states",
                       f["tiles/cal/sweep/states"][()][..., None]), "tiles/cal/sweep/states"),
    (lambda f: f["tiles/cal/sweep/states"].__setitem__((3, 1, 2), np.inf),
     "tiles/cal/sweep/states"),
    (lambda f: replace(f["tiles/cal/sweep"], "pulses",
                       f["tiles/cal/sweep/pulses"][()].astype("f8")), "tiles/cal/sweep/pulses"),
    (lambda f: replace(f["tiles/cal/sympoint"], "states",
                       f["tiles/cal/sympoint/states"][:, :, :2]), "tiles/cal"),
])
def test_broken_measurement_is_one_line_exit_2(tmp_path, capsys, files, edit, field):
    meas = edited(files[0], tmp_path / "bad.h5", edit)
    with pytest.raises(ConfigError, match=field):
        load_measurement(meas)
    out = tmp_path / "calib.h5"
    assert cli(["fit", str(meas), "--out", str(out)]) == 2
    assert "bad.h5" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]


def _set(name, index, value):
    def edit(f):
        ds = f[f"tiles/cal/{name}"]
        data = ds[()]
        data[index] = value
        ds[...] = data
    return edit


@pytest.mark.parametrize("edit, field", [
    (_set("family_index", (0, 0), 9), "family_index"),
    (_set("family_index", (1, 2), -5), "family_index"),
    (lambda f: replace(f["tiles/cal"], "family_index",
                       f["tiles/cal/family_index"][()].astype("f4")), "family_index"),
    (_set("dw_min", (0, 1), np.nan), "dw_min"),
    (_set("dw_min", (Ellipsis,), np.nan), "dw_min"),
    (_set("dw_min", (1, 1), -0.02), "dw_min"),
    (_set("dw_min", (1, 1), 0.0), "dw_min"),
    (_set("dw_min", (0, 0), np.inf), "dw_min"),
    (lambda f: replace(f["tiles/cal"], "dw_min", np.full((3, 2), 0.02)), "dw_min"),
    (lambda f: replace(f["tiles/cal"], "dw_min", np.full((2, 3, 1), 0.02)), "dw_min"),
    (_set("tau_max", (0, 0), np.nan), "tau_max"),
    (lambda f: f["tiles/cal"].attrs.__setitem__("weight_scale", np.nan), "weight_scale"),
    (lambda f: replace(f["tiles/cal"], "G_ref", np.full((2, 3), np.inf)), "G_ref"),
    (lambda f: f.attrs.__setitem__("tile_order", "{not json"), "tile_order"),
])
def test_broken_calibration_is_one_line_exit_2(tmp_path, capsys, files, edit, field):
    cal = edited(files[1], tmp_path / "bad.h5", edit)
    with pytest.raises(ConfigError, match=field):
        load_calibration(cal)
    report = tmp_path / "report"
    assert cli(["report", str(cal), "--out", str(report)]) == 2
    assert field in one_error_line(capsys)
    assert cli(["zero-shift", "--backend", "sim://", "--calib", str(cal), "--pairs", "10",
                "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "bad.h5" in err and "nan%" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]


def test_calibration_without_any_fitted_device_cannot_zero_shift(tmp_path, capsys, files):
    def unfitted(f):
        g = f["tiles/cal"]
        g["family_index"][...] = -1
        g["dw_min"][...] = np.nan
    cal = edited(files[1], tmp_path / "none.h5", unfitted)
    load_calibration(cal)  # a valid file: no device had steps
    assert cli(["zero-shift", "--backend", "sim://", "--calib", str(cal), "--pairs", "10",
                "--quiet"]) == 2
    assert "no device" in one_error_line(capsys)


def test_good_files_still_load(files):
    assert load_measurement(files[0]).shape("cal") == (2, 3)
    assert load_calibration(files[1]).tiles["cal"].shape == (2, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "inf-inf"])
def test_check_finite_finds_one_bad_element_in_a_large_tensor(dtype, bad):
    """check_finite's one-reduction fast path: a single NaN or inf anywhere is refused, also
    where infinities of both signs cancel in the sum (it gives NaN)."""
    t = torch.zeros(200_003, dtype=dtype)
    if bad == "inf-inf":
        t[5], t[-7] = float("inf"), -float("inf")
    else:
        t[123_457] = bad
    with pytest.raises(NonFiniteError):
        check_finite(t, "gradient")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_check_finite_passes_finite_values_whose_sum_overflows(dtype):
    """Finite values whose sum overflows are finite: the fast path falls back to checking
    every element instead of refusing them."""
    big = torch.finfo(dtype).max / 2
    check_finite(torch.full((1000,), big, dtype=dtype), "gradient")
