"""The calibration part of ``hil demo``: characterize -> fit -> zero-shift -> report."""

from __future__ import annotations

import pathlib

from rich.console import Console

from calibration.protocols import SweepProtocol
from calibration.workflow import (
    print_summary,
    run_characterize,
    run_fit,
    run_report,
    run_zero_shift,
)

DEMO_ROWS, DEMO_COLS = 16, 16


def demo_calibration(console: Console, out_dir: pathlib.Path, backend_url: str) -> None:
    """Calibrate a 16x16 tile of ``backend_url`` into ``out_dir`` and print a summary table."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meas, calib = out_dir / "measurement.h5", out_dir / "calibration.h5"
    proto = SweepProtocol(pulses=200, cycles=2, sympoint_pairs=100, noise_reads=10)
    console.rule("calibration: characterize -> fit -> zero-shift -> report")
    run_characterize(backend_url, meas, {"cal": (DEMO_ROWS, DEMO_COLS)}, proto,
                     console=console, force=True)  # the tour replaces its own measurement
    cal = run_fit(calib, meas=meas, console=console)
    zs = run_zero_shift(backend_url, calib, pairs=100, console=console)
    pngs = run_report(calib, out_dir / "report")
    print_summary(console, cal, zs)
    for z in zs:
        console.print(f"zero-shift {z.tile}: reference converged {z.converged:.1%}, differential "
                      f"symmetric point residual {z.median_abs:.4g} "
                      f"({z.median_rel:.2%} of range)", highlight=False)
    console.print(f"files: {meas}, {calib}; report: {', '.join(p.name for p in pngs)}",
                  highlight=False)
