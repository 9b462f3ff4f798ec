"""hil characterize / hil train against a station print the modelled instrument time before
starting; --dry-run prints only that and writes nothing."""

from __future__ import annotations

import yaml

from hil.cli import main

STATION = "station://keysight-b2900-b2200?sim=sim://?model=power&seed=2"


def test_characterize_dry_run_prints_the_instrument_time(tmp_path, capsys):
    out = tmp_path / "m.h5"
    main(["characterize", "--backend", STATION, "--out", str(out), "--rows", "4", "--cols",
          "4", "--pulses", "100", "--cycles", "1", "--dry-run"])
    text = capsys.readouterr().out
    assert "modelled instrument time" in text
    assert not out.exists()
    main(["characterize", "--backend", "sim://", "--out", str(out), "--rows", "2", "--cols",
          "2", "--dry-run"])
    assert "no instrument time" in capsys.readouterr().out
    assert not out.exists()


def test_characterize_on_a_station_prints_then_measures(tmp_path, capsys):
    out = tmp_path / "m.h5"
    main(["characterize", "--backend", STATION, "--out", str(out), "--rows", "2", "--cols",
          "2", "--pulses", "4", "--cycles", "1", "--sympoint-pairs", "2", "--noise-reads",
          "2", "--quiet"])
    text = capsys.readouterr().out
    assert text.index("modelled instrument time") < text.index("measurement written")
    assert out.exists()


def test_train_dry_run_on_a_station(tmp_path, capsys):
    cfg = {"name": "tiny-station", "seed": 1, "backend": STATION,
           "model": {"hidden": [], "activation": "tanh"},
           "data": {"name": "least_squares", "n_inputs": 6, "n_outputs": 3,
                    "limit_train": 40, "limit_test": 10},
           "algorithm": {"name": "rlv2", "lr": 0.1, "transfer_lr": 0.2},
           "train": {"epochs": 2, "batch_size": 10}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["train", str(path), "--dry-run", "--out", str(tmp_path / "run")])
    text = capsys.readouterr().out
    assert "modelled instrument time" in text
    assert not (tmp_path / "run").exists()
