"""Every calibration table reads in an 80-column terminal: nothing cut to '…'."""

from __future__ import annotations

import numpy as np
from rich.console import Console

from calibration.calibfile import load_calibration
from calibration.workflow import print_summary
from calibration.zeroshift import ZeroShiftResult
from hil.cli import main

URL = "sim://?model=power&gamma=2&dw_min=0.03&d2d=0.3&c2c=0.1&seed=4"


def _assert_fits(text: str) -> None:
    lines = text.splitlines()
    assert lines, "nothing printed"
    assert "…" not in text, text
    assert max(len(line) for line in lines) <= 80, text


def _calibrate(tmp_path, monkeypatch, capsys, tiles: int = 1):
    monkeypatch.setenv("COLUMNS", "80")
    meas, calib = tmp_path / "m.h5", tmp_path / "c.h5"
    main(["characterize", "--backend", URL, "--out", str(meas), "--rows", "4", "--cols", "4",
          "--pulses", "100", "--cycles", "1", "--sympoint-pairs", "0", "--noise-reads", "0",
          "--quiet"])
    capsys.readouterr()
    main(["fit", str(meas), "--out", str(calib)])
    return calib, capsys.readouterr().out


def test_fit_and_zero_shift_tables_fit_80_columns(tmp_path, monkeypatch, capsys):
    calib, out = _calibrate(tmp_path, monkeypatch, capsys)
    _assert_fits(out)
    for word in ("dw_min", "tau_max", "c2c", "sym. point", "R²", "power"):
        assert word in out
    main(["zero-shift", "--backend", URL, "--calib", str(calib), "--pairs", "20", "--quiet"])
    out = capsys.readouterr().out
    _assert_fits(out)
    assert "zero-shift |res|/range" in out


def test_many_tiles_wrap_into_tables_of_three(tmp_path, monkeypatch, capsys):
    calib, _ = _calibrate(tmp_path, monkeypatch, capsys)
    cal = load_calibration(calib)
    tc = cal.tiles["cal"]
    cal.tiles = {f"layer{k}.weights": tc for k in range(6)}
    zs = [ZeroShiftResult(tile=f"layer{k}.weights", converged=1.0,
                          residual=np.full(tc.shape, 0.01), range=np.full(tc.shape, 2.0))
          for k in range(6)]
    console = Console(width=80, record=True)
    print_summary(console, cal, zs)  # six tiles: two tables of three
    text = console.export_text()
    _assert_fits(text)
    assert text.count("calibration c.h5") == 2  # six tiles: two tables
    assert all(f"layer{k}.weights" in text for k in range(6))


def test_demo_pulse_response_table_fits_80_columns(tmp_path):
    from hil.cli.demo_cmds import pulse_response_sweep

    console = Console(width=80, record=True)
    pulse_response_sweep(console, tmp_path)
    text = console.export_text()
    table = text[text.index("pulse-response sweep"):text.index("saved")]
    _assert_fits(table)
