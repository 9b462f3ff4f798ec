"""The four calibration steps as functions with progress bars: used by the CLI and the demo."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from calibration.calibfile import Calibration, load_calibration, write_calibration
from calibration.fit import torch_threads
from calibration.measfile import MeasurementWriter
from calibration.protocols import SweepProtocol, characterize
from calibration.zeroshift import ZeroShiftResult, zero_shift
from hil.backend import claim_tile, open_backend
from hil.errors import ConfigError
from hil.outpath import check_dir, check_new_file


def _progress(console: Console | None) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"
                    "/{task.total}"), TimeRemainingColumn(), console=console,
                    disable=console is None, transient=False)


def _small_ops(devices: int):
    """One torch thread for small tiles: per-pulse ops are tiny and stall on busy cores."""
    return torch_threads(1 if devices < 16384 else None)


def run_characterize(backend_url: str, out: Path,
                     tiles: dict[str, tuple[int, int]] | None = None,
                     proto: SweepProtocol | None = None,
                     console: Console | None = None, force: bool = False) -> Path:
    """Measure read noise, sweeps and the symmetric-point search of ``tiles`` (name ->
    shape; default one 16x16 tile 'cal') into a measurement file (renamed into place when
    complete; an existing one is replaced only with ``force``)."""
    proto = proto or SweepProtocol()
    tiles = tiles or {"cal": (16, 16)}
    out = check_new_file(Path(out), force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(str(out), "--out", f"cannot create its directory: {exc}") from None
    devices = sum(r * c for r, c in tiles.values())
    what = ", ".join(f"{n} {r}x{c}" for n, (r, c) in tiles.items())
    with _small_ops(devices), open_backend(backend_url) as be, \
            MeasurementWriter(out, backend_url, proto.as_dict()) as writer, \
            _progress(console) as bar:
        task = bar.add_task(f"characterize {what}", total=proto.n_reads() * len(tiles))
        characterize(be, writer, tiles, proto, advance=lambda n: bar.advance(task, n))
    return out


def estimate_characterize(backend_url: str, tiles: dict[str, tuple[int, int]],
                          proto: SweepProtocol) -> float | None:
    """Modelled instrument seconds of :func:`run_characterize` (None: no instrument time).
    Opens the backend and places the tiles; measures nothing."""
    from calibration.protocols import estimate_seconds

    total = 0.0
    with open_backend(backend_url) as be:
        for name, shape in tiles.items():
            part = estimate_seconds(claim_tile(be, name, shape), proto)
            if part is None:
                return None
            total += part
    return total


def run_fit(out: Path, meas: Path | None = None, csv: Path | None = None,
            bins: int | None = None, window: int | None = None,
            criterion: str = "bic", console: Console | None = None,
            allow_partial: bool = False) -> Calibration:
    """Fit a measurement file (or a CSV) and write the calibration file atomically."""
    from calibration.pipeline import fit_csv, fit_file

    if (meas is None) == (csv is None):
        raise ConfigError("<command line>", "input",
                          "give exactly one input: a measurement file or --csv FILE")
    check_dir(Path(out).parent)
    if Path(out).is_dir():
        raise ConfigError(str(out), "--out", "is a directory; give a file name")
    kw: dict[str, object] = {"criterion": criterion}
    if bins is not None:
        kw["bins"] = bins
    if window is not None:
        kw["window"] = window
    if console:
        console.print(f"fitting {meas or csv} ...", highlight=False, markup=False)
    if csv is not None:
        tiles, prov = fit_csv(Path(csv), **kw)
    else:
        tiles, prov = fit_file(Path(meas), allow_partial=allow_partial, **kw)
        if not prov["measurement_complete"] and console:
            console.print(f"warning: {meas} is a partial measurement (fitted as asked with "
                          "--allow-partial)", highlight=False, markup=False)
    write_calibration(Path(out), tiles, prov)
    return load_calibration(out)


def run_zero_shift(backend_url: str, calib: Path, pairs: int = 200,
                   console: Console | None = None) -> list[ZeroShiftResult]:
    """Program the reference tiles to the symmetric points and measure the residual."""
    cal = load_calibration(calib)
    devices = sum(t.shape[0] * t.shape[1] for t in cal.tiles.values())
    with _small_ops(devices), open_backend(backend_url) as be, _progress(console) as bar:
        total = sum(1 + 2 * pairs // 50 * 50 for _ in cal.tiles)
        task = bar.add_task("zero-shift", total=total)
        return zero_shift(be, cal, pairs=pairs, advance=lambda n: bar.advance(task, n))


def run_report(calib: Path, out: Path) -> list[Path]:
    """Write the PNG report of a calibration file."""
    from calibration.report import write_report

    cal = load_calibration(calib)
    return write_report(cal, check_dir(Path(out)))


SUMMARY_ROWS = (("dw_min", "dw_min"), ("tau_min", "tau_min"), ("tau_max", "tau_max"),
                ("gamma", "gamma"), ("c2c", "c2c"), ("sym. point", "symmetric_point"),
                ("R²", "r2"))
TILES_PER_TABLE = 3  # a quantity column and three tiles fit 80 columns


def summary_tables(cal: Calibration, zs: list[ZeroShiftResult] | None = None) -> list[Table]:
    """Medians per tile of the fitted parameters (and the zero-shift residual): a row per
    quantity and a column per tile (at most three tiles a table; longer names fold), so it
    reads in 80 columns."""
    by_tile = {z.tile: z for z in zs or []}
    names = list(cal.tiles)
    tables = []
    for first in range(0, len(names), TILES_PER_TABLE):
        chunk = names[first:first + TILES_PER_TABLE]
        table = Table(title=f"calibration {cal.path.name} (medians over devices)")
        table.add_column("quantity", justify="left")
        for name in chunk:
            table.add_column(name, justify="right", overflow="fold")
        rows: list[list[str]] = [["devices"], ["families"]]
        rows += [[label] for label, _ in SUMMARY_ROWS]
        if zs:
            rows.append(["zero-shift |res|/range"])
        for name in chunk:
            tc = cal.tiles[name]
            v = tc.values
            fams, counts = np.unique(tc.model, return_counts=True)
            order = np.argsort(-counts, kind="stable")
            rows[0].append(str(tc.shape[0] * tc.shape[1]))
            rows[1].append("\n".join(f"{fams[i]} {counts[i]}" for i in order))
            for row, (_, key) in zip(rows[2:], SUMMARY_ROWS, strict=False):
                row.append(f"{np.nanmedian(v[key]):.4g}")
            if zs:
                z = by_tile.get(name)
                rows[-1].append(f"{z.median_rel:.2%}" if z else "-")
        for row in rows:
            table.add_row(*row)
        tables.append(table)
    return tables


def print_summary(console: Console, cal: Calibration,
                  zs: list[ZeroShiftResult] | None = None) -> None:
    """Print :func:`summary_tables` to ``console``."""
    for table in summary_tables(cal, zs):
        console.print(table)


def check_writable(out: Path) -> None:
    """Fail early (before measuring) if ``out`` cannot be written."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent)
    os.close(fd)
    os.unlink(tmp)
