"""hil validate on a simulated instrument station (Keysight B2900 SMU + B2200A switch
matrix): characterize --config -> fit -> validate passes on the unchanged chip and fails,
naming drift, on the same chip with drift switched on after calibration."""

from __future__ import annotations

import pytest
import yaml

from calibration.validate import Tolerances, validate
from hil.cli import main
from hil.config import parse_config

pytestmark = pytest.mark.slow  # every read routes each device through the switch matrix

CHIP = ("sim://?model=power&gamma=0.5&tau=0.6&dw_min=0.01&d2d=0.2&c2c=0.1&read_noise=0.001"
        "&seed=4")
STATION = "station://keysight-b2900-b2200?sim="
JOB = {"name": "validate-station", "seed": 0,
       "model": {"hidden": [], "activation": "tanh"},
       "data": {"name": "least_squares", "n_inputs": 8, "n_outputs": 8, "limit_train": 128},
       "algorithm": {"name": "analog_sgd", "lr": 0.05, "update": "pulse", "io": "digital"},
       "train": {"epochs": 2, "batch_size": 16}}


def test_validate_on_a_station(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    main(["characterize", "--backend", STATION + CHIP, "--config", str(job), "--out",
          str(tmp_path / "m.h5"), "--pulses", "60", "--sympoint-pairs", "20",
          "--noise-reads", "10", "--quiet"])
    main(["fit", str(tmp_path / "m.h5"), "--out", str(tmp_path / "c.h5")])
    cfg = parse_config(JOB)
    tol = Tolerances(replicas=4)
    ok = validate(cfg, STATION + CHIP, tmp_path / "c.h5", tmp_path / "ok", seeds=2, tol=tol,
                  progress=False)
    assert ok.passed, ok.verdict
    drifting = validate(cfg, STATION + CHIP + "&drift=0.05", tmp_path / "c.h5",
                        tmp_path / "drift", seeds=2, tol=tol, progress=False)
    assert not drifting.passed
    assert drifting.counts["drift"] >= 5, drifting.verdict
    assert "| drift |" in (tmp_path / "drift" / "report.md").read_text()
