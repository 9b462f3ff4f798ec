"""CLI commands of this area, registered on the shared app (heavy imports stay inside commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli import app


def format_seconds(seconds: float) -> str:
    """'2 h 05 min', '3 min 12 s' or '4.2 s'."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


@app.command("characterize")
def characterize_cmd(
    backend: Annotated[str, typer.Option(help="backend URL, e.g. 'sim://?model=power'")],
    out: Annotated[Path, typer.Option(help="measurement file to write (HDF5)")],
    tile: Annotated[str, typer.Option(help="tile to characterize")] = "cal",
    rows: Annotated[int, typer.Option(min=1)] = 16,
    cols: Annotated[int, typer.Option(min=1)] = 16,
    pulses: Annotated[int, typer.Option(min=1, help="pulses per direction")] = 400,
    cycles: Annotated[int, typer.Option(min=1, help="up/down cycles")] = 2,
    read_every: Annotated[int, typer.Option(min=1, help="pulses between reads")] = 1,
    sympoint_pairs: Annotated[int, typer.Option(min=0, help="alternating search pairs")] = 200,
    noise_reads: Annotated[int, typer.Option(min=0, help="repeated reads")] = 20,
    config: Annotated[Path | None, typer.Option(
        help="characterize every tile this run configuration allocates, under the job's "
             "tile names (instead of --tile/--rows/--cols)")] = None,
    force: Annotated[bool, typer.Option(
        help="replace an existing --out file (once the new measurement is complete)")] = False,
    take_over: Annotated[bool, typer.Option(
        help="take the chip from the host that holds it (that host's next call fails)")]
        = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    dry_run: Annotated[bool, typer.Option(
        help="print the modelled instrument time of the job and stop")] = False,
) -> None:
    """Measure sweeps, the symmetric-point search and read noise into an HDF5 file.

    On an instrument station the modelled instrument time is printed before starting."""
    from rich.console import Console

    from calibration.measfile import partial_path
    from calibration.protocols import SweepProtocol
    from calibration.workflow import run_characterize
    from hil.cli import set_resume_hint
    from hil.errors import ConfigError
    from hil.url import with_param

    try:
        proto = SweepProtocol(pulses=pulses, cycles=cycles, read_every=read_every,
                              sympoint_pairs=sympoint_pairs, noise_reads=noise_reads)
    except ValueError as exc:
        raise ConfigError("<command line>", "protocol", str(exc)) from None
    tiles = {tile: (rows, cols)}
    if config is not None:
        from calibration.validate import job_tiles
        from hil.config import load_config

        tiles = job_tiles(load_config(config), str(config))
    if take_over:
        backend = with_param(backend, "take_over", "1")
    part = partial_path(out)
    set_resume_hint(lambda: (f"{out} untouched; the blocks measured so far are in {part} "
                             "(fit them with --allow-partial), or rerun the command")
                    if part.exists() else f"{out} untouched; rerun the command")
    console = Console()
    from calibration.workflow import estimate_characterize

    seconds = estimate_characterize(backend, tiles, proto)
    if seconds is not None:
        console.print(f"modelled instrument time: {format_seconds(seconds)}", highlight=False)
    elif dry_run:
        console.print("this backend has no instrument time to model", highlight=False)
    if dry_run:
        return
    path = run_characterize(backend, out, tiles, proto, console=None if quiet else console,
                            force=force)
    console.print(f"measurement written to {path}", highlight=False, markup=False)


@app.command("fit")
def fit_cmd(
    meas: Annotated[Path | None, typer.Argument(help="measurement file (HDF5)")] = None,
    out: Annotated[Path, typer.Option(help="calibration file to write")] = Path("calib.h5"),
    csv: Annotated[Path | None, typer.Option(help="fit a pulse-response CSV instead")] = None,
    bins: Annotated[int | None, typer.Option(min=4, help="state bins per direction")] = None,
    window: Annotated[int | None, typer.Option(min=1, help="reads that locate a step")] = None,
    criterion: Annotated[str, typer.Option(help="bic or aic")] = "bic",
    allow_partial: Annotated[bool, typer.Option(
        help="fit a partial measurement (one that stopped before its end)")] = False,
) -> None:
    """Fit every device's response (all families, model selection) into a calibration file."""
    from rich.console import Console

    from calibration.workflow import print_summary, run_fit
    from hil.errors import ConfigError

    if criterion not in ("bic", "aic"):
        raise ConfigError("<command line>", "--criterion", "must be 'bic' or 'aic'")
    console = Console()
    cal = run_fit(out, meas=meas, csv=csv, bins=bins, window=window, criterion=criterion,
                  console=console, allow_partial=allow_partial)
    print_summary(console, cal)
    console.print(f"calibration written to {out}", highlight=False, markup=False)


@app.command("zero-shift")
def zero_shift_cmd(
    backend: Annotated[str, typer.Option(help="backend URL of the calibrated chip")],
    calib: Annotated[Path, typer.Option(help="calibration file")],
    pairs: Annotated[int, typer.Option(min=10, help="alternating pairs of the check")] = 200,
    take_over: Annotated[bool, typer.Option(
        help="take the chip from the host that holds it (that host's next call fails)")]
        = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Program reference tiles to the symmetric points; report the differential residual."""
    from rich.console import Console

    from calibration.calibfile import load_calibration
    from calibration.workflow import print_summary, run_zero_shift
    from hil.url import with_param

    if take_over:
        backend = with_param(backend, "take_over", "1")

    console = Console()
    zs = run_zero_shift(backend, calib, pairs, console=None if quiet else console)
    print_summary(console, load_calibration(calib), zs)
    for z in zs:
        console.print(f"tile {z.tile}: reference converged {z.converged:.1%}, residual "
                      f"median |w - w_ref| = {z.median_abs:.4g} ({z.median_rel:.2%} of range)",
                      highlight=False)


@app.command("report")
def report_cmd(
    calib: Annotated[Path, typer.Argument(help="calibration file")],
    out: Annotated[Path, typer.Option(help="directory for the PNGs")] = Path("report"),
) -> None:
    """Write PNGs: fitted q+- over measured steps, maps over the array, histograms."""
    from rich.console import Console

    from calibration.workflow import run_report

    paths = run_report(calib, out)
    Console().print("\n".join(str(p) for p in paths), highlight=False, markup=False)
