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
    force: Annotated[bool, typer.Option(
        help="resume although the config differs from the run's")] = False,
    reprogram: Annotated[bool, typer.Option(
        help="on resume, write the checkpoint's weights back to the chip's devices")] = False,
    take_over: Annotated[bool, typer.Option(
        help="take the chip from the host that holds it (that host's next call fails)")]
        = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    dry_run: Annotated[bool, typer.Option(
        help="print the modelled instrument time of the run and stop")] = False,
) -> None:
    """Train a model on any backend as CONFIG says; metrics to run.h5, curves.png, checkpoints."""
    from rich.console import Console

    from hil.backend import open_backend
    from hil.cli import set_resume_hint
    from hil.cli.calibration_cmds import format_seconds
    from hil.config import load_config, parse_config
    from hil.errors import BackendURLError, ConfigError
    from hil.runs import CHECKPOINT, CURVES, RUN_FILE, estimate_train_seconds, run_dir, train_run
    from hil.url import with_param

    if (force or reprogram) and not resume:
        raise ConfigError("<command line>", "--force/--reprogram", "only with --resume")
    cfg = load_config(config)
    if take_over:
        backend = with_param(backend or cfg.backend, "take_over", "1")
    out_dir = run_dir(cfg, out)
    rerun = f"hil train {config} --out {out_dir}"
    set_resume_hint(lambda: f"resume with: {rerun} --resume"
                    if (out_dir / CHECKPOINT).exists()
                    else f"nothing to resume yet; rerun: {rerun}")
    job = cfg if backend is None else parse_config({**cfg.model_dump(), "backend": backend},
                                                   str(config))
    console = Console()
    seconds = None
    if job.algorithm.name != "digital":
        try:
            be = open_backend(job.backend)
        except BackendURLError as exc:
            raise ConfigError(str(config), "backend", str(exc)) from None
        with be:
            seconds = estimate_train_seconds(job, be)
    if seconds is not None:
        console.print(f"modelled instrument time: {format_seconds(seconds)} (one step on the "
                      "simulated station, times the run's steps)", highlight=False)
    elif dry_run:
        console.print("this backend has no instrument time to model", highlight=False)
    if dry_run:
        return
    result = train_run(cfg, out, config_path=str(config), resume=resume, backend_url=backend,
                       console=console, progress=not quiet, force=force, reprogram=reprogram)
    acc = result.final_accuracy
    tail = f", final test accuracy {100 * acc:.2f}%" if acc is not None else ""
    console.print(f"done: {result.global_step} steps{tail}; {result.out_dir / RUN_FILE}, "
                  f"{result.out_dir / CURVES}", highlight=False, markup=False)
