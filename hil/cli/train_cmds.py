"""CLI commands of this area, registered on the shared app (heavy imports stay inside commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli import app


@app.command("train")
def train(
    config: Annotated[Path, typer.Argument(help="YAML run configuration")],
    backend: Annotated[str | None, typer.Option(help="backend URL (overrides config)")] = None,
    out: Annotated[Path | None, typer.Option(
        help="run directory (default: the config's out_dir or runs/NAME)")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's checkpoint")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    dry_run: Annotated[bool, typer.Option(
        help="print the modelled instrument time of the run and stop")] = False,
) -> None:
    """Train a model on any backend as CONFIG says; metrics to run.h5, curves.png, checkpoints."""
    from rich.console import Console

    from hil.backend import open_backend
    from hil.cli.calibration_cmds import format_seconds
    from hil.config import load_config, parse_config
    from hil.errors import BackendURLError, ConfigError
    from hil.runs import CURVES, RUN_FILE, estimate_train_seconds, train_run

    cfg = load_config(config)
    if backend is not None:
        cfg = parse_config({**cfg.model_dump(), "backend": backend}, str(config))
    console = Console()
    seconds = None
    if cfg.backend:
        try:
            be = open_backend(cfg.backend)
        except BackendURLError as exc:
            raise ConfigError(str(config), "backend", str(exc)) from None
        with be:
            seconds = estimate_train_seconds(cfg, be)
    if seconds is not None:
        console.print(f"modelled instrument time: {format_seconds(seconds)} (one step on the "
                      "simulated station, times the run's steps)", highlight=False)
    elif dry_run:
        console.print("this backend has no instrument time to model", highlight=False)
    if dry_run:
        return
    result = train_run(cfg, out, config_path=str(config), resume=resume, backend_url=backend,
                       console=console, progress=not quiet)
    acc = result.final_accuracy
    tail = f", final test accuracy {100 * acc:.2f}%" if acc is not None else ""
    console.print(f"done: {result.global_step} steps{tail}; {result.out_dir / RUN_FILE}, "
                  f"{result.out_dir / CURVES}", highlight=False)
