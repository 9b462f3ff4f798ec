"""The twin reproduces its chip; zero-shifting; the CLI and the demo end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from calibration.calibfile import load_calibration, write_calibration
from calibration.demo import demo_calibration
from calibration.fit import torch_threads
from calibration.measfile import MeasurementWriter
from calibration.pipeline import fit_file
from calibration.protocols import SweepProtocol, characterize
from calibration.zeroshift import zero_shift
from hil.backend import open_backend
from hil.cli import main

CHIP = "sim://?model=power&gamma=2&dw_min=0.02&d2d=0.3&c2c=0.1&seed=5"


def calibrate(tmp_path: Path, rows: int = 16, cols: int = 16) -> Path:
    proto = SweepProtocol(pulses=400, cycles=2, sympoint_pairs=0, noise_reads=0, block=200)
    with open_backend(CHIP) as be, MeasurementWriter(tmp_path / "m.h5", CHIP,
                                                     proto.as_dict()) as w:
        characterize(be, w, {"cal": (rows, cols)}, proto)
    tiles, prov = fit_file(tmp_path / "m.h5")
    write_calibration(tmp_path / "c.h5", tiles, prov)
    return tmp_path / "c.h5"


def held_out_sequence(seed: int = 11, blocks: int = 60) -> list[int]:
    """Random signed blocks of 1..15 pulses: not the sweep the calibration saw."""
    g = np.random.default_rng(seed)
    return [int(s * n) for s, n in zip(g.choice([-1, 1], blocks), g.integers(1, 16, blocks),
                                       strict=True)]


def trajectory(tile, start: torch.Tensor, seq: list[int]) -> np.ndarray:
    tile.w = start.clone()
    out = []
    for n in seq:
        tile.pulse(torch.full(tile.shape, n, dtype=torch.int32))
        out.append(tile.read().numpy())
    return np.stack(out)


@torch_threads(1)  # tiny per-pulse ops: one thread is faster on a busy machine
def test_twin_reproduces_held_out_sequence(tmp_path):
    calib = calibrate(tmp_path)
    seq = held_out_sequence()
    with open_backend(CHIP) as chip:
        tile = chip.allocate("cal", 16, 16)
        start = tile.w.clone()
        first = trajectory(tile, start, seq)
        second = trajectory(tile, start, seq)  # same chip, same start, fresh c2c noise
    with open_backend(f"twin://{calib}?seed=3") as twin:
        ttile = twin.allocate("cal", 16, 16)
        twin_traj = trajectory(ttile, start, seq)
    rmse_repeat = float(np.sqrt(np.mean((first - second) ** 2)))
    rmse_twin = float(np.sqrt(np.mean((twin_traj - first) ** 2)))
    print(f"trajectory RMSE chip vs chip {rmse_repeat:.4g}, twin vs chip {rmse_twin:.4g}, "
          f"ratio {rmse_twin / rmse_repeat:.2f}")
    assert rmse_repeat > 0
    assert rmse_twin <= 1.5 * rmse_repeat


@torch_threads(1)
def test_zero_shift_puts_the_differential_symmetric_point_at_zero(tmp_path):
    calib = calibrate(tmp_path, 8, 8)
    cal = load_calibration(calib)
    with open_backend(CHIP) as chip:
        results = zero_shift(chip, cal, pairs=150)
        # without the reference programmed, the same check is far from zero
        ref = chip.tile("cal.ref")
        assert ref.shape == (8, 8)
    z = results[0]
    print(f"zero-shift residual: median |w - w_ref| {z.median_abs:.4g} "
          f"({z.median_rel:.2%} of range), converged {z.converged:.1%}")
    assert z.converged > 0.9
    assert z.median_rel < 0.02
    sym = cal.tiles["cal"].values["symmetric_point"]
    assert np.median(np.abs(sym)) > 3 * z.median_abs  # the shift did real work


def test_cli_pipeline_and_report(tmp_path):
    meas, calib, rep = tmp_path / "m.h5", tmp_path / "c.h5", tmp_path / "rep"
    url = "sim://?model=exp&gamma=2&dw_min=0.02&d2d=0.2&c2c=0.05&seed=1"
    main(["characterize", "--backend", url, "--out", str(meas), "--rows", "6", "--cols", "6",
          "--pulses", "150", "--cycles", "1", "--sympoint-pairs", "30", "--noise-reads", "5",
          "--quiet"])
    main(["fit", str(meas), "--out", str(calib)])
    main(["zero-shift", "--backend", url, "--calib", str(calib), "--pairs", "40", "--quiet"])
    main(["report", str(calib), "--out", str(rep)])
    names = sorted(p.name for p in rep.iterdir())
    assert names == ["cal_histograms.png", "cal_maps.png", "cal_steps.png"]
    assert all((rep / n).stat().st_size > 10_000 for n in names)
    cal = load_calibration(calib)
    assert (cal.tiles["cal"].model == "exp").mean() > 0.8
    assert cal.attrs["provenance"] and url in cal.attrs["provenance"]


def test_demo_calibration(tmp_path):
    console = Console(record=True, width=140)
    demo_calibration(console, tmp_path, "sim://?model=power&gamma=2&dw_min=0.02&d2d=0.3"
                     "&c2c=0.1&seed=2")
    text = console.export_text()
    assert "zero-shift cal" in text and "power" in text
    assert (tmp_path / "calibration.h5").is_file()
    assert len(list((tmp_path / "report").glob("*.png"))) == 3
