"""hil validate end to end on visa:// to the virtual chip: characterize --config -> fit ->
twin -> validate passes on the unchanged chip and fails, naming devices and quantities,
on the same chip with drift switched on or after ageing."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest

from calibration.validate import Tolerances, job_tiles, validate
from drivers.virtual_chip import VirtualChip
from hil.cli import main
from hil.config import load_config

pytestmark = [pytest.mark.slow,  # whole training jobs on a virtual chip (seconds each)
              pytest.mark.usefixtures("one_torch_thread")]

CHIP = ("sim://?model=power&gamma=0.5&tau=0.6&dw_min=0.01&d2d=0.2&c2c=0.1&read_noise=0.001"
        "&seed=4")
JOB = Path(__file__).parents[1] / "experiments" / "validate_small.yaml"
FAST = Tolerances(replicas=6)
FASTER = Tolerances(replicas=4)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The job's tiles characterized under their names on a virtual chip, and fitted; the
    chip keeps running (and keeps its tiles) for the module."""
    tmp = tmp_path_factory.mktemp("validate")
    with VirtualChip(CHIP) as chip:
        main(["characterize", "--backend", chip.url, "--config", str(JOB), "--out",
              str(tmp / "meas.h5"), "--pulses", "200", "--sympoint-pairs", "50", "--quiet"])
        main(["fit", str(tmp / "meas.h5"), "--out", str(tmp / "calib.h5")])
        yield JOB, tmp / "calib.h5", chip


def test_characterize_config_uses_the_jobs_tile_names(calibrated):
    job, calib, _ = calibrated
    tiles = job_tiles(load_config(job))
    assert tiles == {"0.W": (8, 16), "0.P": (8, 16)}
    with h5py.File(calib) as f:
        assert sorted(f["tiles"]) == sorted(tiles)


def test_unchanged_chip_passes(calibrated, tmp_path):
    job, calib, chip = calibrated  # the job trains on the very tiles characterized
    res = validate(load_config(job), chip.url, calib, tmp_path / "v", seeds=3, tol=FAST,
                   progress=False)
    assert res.passed, res.verdict
    assert " of 256 devices diverged (tolerated 2)" in res.verdict
    for name in ("report.md", "curves.png", "prediction_map.png", "prediction_hist.png"):
        assert (tmp_path / "v" / name).stat().st_size > 0
    with h5py.File(tmp_path / "v" / "validate.h5") as f:
        assert bool(f.attrs["passed"])
        assert f["curves/twin"].shape == (3, 3)
        noise = f["tiles/0.W/noise/value"][:]
        # the calibrated c2c noise explains the chip's steps: rms z about 1
        assert 0.6 < float(abs(noise[noise == noise]).mean()) < 1.5
        assert f["divergences"].shape == (0,), [tuple(d) for d in f["divergences"][:]]


def test_chip_with_drift_fails_naming_drift(calibrated, tmp_path):
    job, calib, _ = calibrated
    with VirtualChip(CHIP + "&drift=0.05") as chip:
        res = validate(load_config(job), chip.url, calib, tmp_path / "v", seeds=2, tol=FASTER,
                       progress=False)
    assert not res.passed and res.verdict.startswith("FAIL")
    assert res.counts["drift"] > 10, res.verdict
    report = (tmp_path / "v" / "report.md").read_text()
    assert "| drift |" in report and "0.W[" in report


def test_aged_chip_fails_naming_step_sizes_exit_1(calibrated, tmp_path, capsys):
    job, calib, _ = calibrated
    out = tmp_path / "v"
    with VirtualChip(CHIP + "&age_dw=0.1&aged=1e6") as chip:  # dw_min 10% larger
        with pytest.raises(SystemExit) as e:
            main(["validate", str(job), "--chip", chip.url, "--twin", str(calib), "--seeds",
                  "2", "--replicas", "4", "--out", str(out), "--quiet"])
    assert e.value.code == 1
    assert "FAIL" in capsys.readouterr().out
    with h5py.File(out / "validate.h5") as f:
        assert not bool(f.attrs["passed"])
        div = f["divergences"][:]
        tiles = {(d["tile"].decode(), d["quantity"].decode()) for d in div if d["row"] < 0}
        assert ("0.W", "step_out") in tiles or ("0.P", "step_out") in tiles, tiles
        assert not any(d["quantity"].decode() == "drift" for d in div)
    assert "step_out" in (out / "report.md").read_text()


def test_cli_bad_input_is_one_line_exit_2(calibrated, tmp_path, capsys):
    job, calib, _ = calibrated
    for args, field in ((["--twin", str(tmp_path / "none.h5")], "--twin"),
                        (["--twin", str(calib), "--seeds", "1"], "seeds")):
        with pytest.raises(SystemExit) as e:
            main(["validate", str(job), "--chip", CHIP, "--out", str(tmp_path / "o"), *args])
        assert e.value.code == 2
        assert field in capsys.readouterr().err
    assert not (tmp_path / "o" / "validate.h5").exists()
