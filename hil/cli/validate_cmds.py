"""``hil validate``: the same job on the chip and on its twin, one verdict (heavy imports
stay inside the command; the logic is calibration/validate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli import app


@app.command("validate")
def validate_cmd(
    config: Annotated[Path, typer.Argument(help="YAML run configuration (as hil train)")],
    chip: Annotated[str, typer.Option(help="backend URL of the chip")],
    twin: Annotated[Path, typer.Option(help="the chip's calibration file (HDF5)")],
    seeds: Annotated[int, typer.Option(min=2, help="twin runs (noise seeds)")] = 4,
    out: Annotated[Path, typer.Option(help="directory for report, figures, HDF5")] = Path(
        "validate"),
    replicas: Annotated[int, typer.Option(min=2, help="twin replicas per predicted step")] = 8,
    alpha: Annotated[float, typer.Option(min=1e-9, max=0.5, help="family-wise false-alarm "
                                         "rate of the per-device tests")] = 0.01,
    step_tol: Annotated[float, typer.Option(min=0.0, help="tolerated |observed/predicted "
                                            "step - 1| of a device")] = 0.2,
    tile_step_tol: Annotated[float, typer.Option(min=0.0, help="tolerated |observed/"
                                                 "predicted step - 1| pooled over a tile")
                             ] = 0.03,
    drift_tol: Annotated[float, typer.Option(min=0.0, help="tolerated relaxation per step "
                                             "of idle devices, in dw_min")] = 0.05,
    noise_tol: Annotated[float, typer.Option(min=0.0, help="tolerated rms z of moved "
                                             "devices")] = 2.0,
    max_diverged: Annotated[float, typer.Option(min=0.0, max=1.0, help="fraction of devices "
                                                "that may diverge and still PASS (at least "
                                                "one; 0: none)")] = 0.01,
    twin_options: Annotated[str, typer.Option(
        help="more twin:// URL parameters, e.g. 'io=paper' where the chip's MVMs have "
             "that periphery")] = "",
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Is the chip's run within what its twin predicts? Exit 0 on PASS, 1 on FAIL."""
    from rich.console import Console

    from calibration.validate import Tolerances, validate
    from hil.config import load_config

    cfg = load_config(config)
    console = Console()
    tol = Tolerances(alpha=alpha, step_tol=step_tol, tile_step_tol=tile_step_tol,
                     drift_tol=drift_tol, noise_tol=noise_tol, replicas=replicas,
                     max_diverged=max_diverged, twin_options=twin_options)
    res = validate(cfg, chip, twin, out, seeds=seeds, config_path=str(config), tol=tol,
                   console=console, progress=not quiet)
    console.print(res.verdict, highlight=False, style="bold green" if res.passed else "bold red")
    console.print(f"report: {out / 'report.md'}; data: {out / 'validate.h5'}", highlight=False)
    if not res.passed:
        raise typer.Exit(1)
