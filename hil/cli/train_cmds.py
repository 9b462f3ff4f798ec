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
) -> None:
    """Train a model on any backend as CONFIG says; metrics to run.h5, curves.png, checkpoints."""
    from rich.console import Console

    from hil.config import load_config
    from hil.runs import CURVES, RUN_FILE, train_run

    cfg = load_config(config)
    console = Console()
    result = train_run(cfg, out, config_path=str(config), resume=resume, backend_url=backend,
                       console=console, progress=not quiet)
    acc = result.final_accuracy
    tail = f", final test accuracy {100 * acc:.2f}%" if acc is not None else ""
    console.print(f"done: {result.global_step} steps{tail}; {result.out_dir / RUN_FILE}, "
                  f"{result.out_dir / CURVES}", highlight=False)
