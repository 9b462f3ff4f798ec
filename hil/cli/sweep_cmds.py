"""CLI commands of this area, registered on the shared app (heavy imports stay inside commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hil.cli import app


@app.command("sweep")
def sweep_cmd(
    sweep_file: Annotated[Path, typer.Argument(help="YAML sweep file")],
    out: Annotated[Path | None, typer.Option(
        help="sweep directory (default: sweeps/NAME)")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster: 'ray://HOST:10001' or 'auto' (default: start Ray on this machine)",
    )] = None,
    resume: Annotated[bool, typer.Option(
        help="run only the cells of the sweep in --out that are not done")] = False,
    max_parallel: Annotated[int | None, typer.Option(
        min=1, help="at most this many cells at once (default: as Ray's resources allow)")] = None,
    num_cpus: Annotated[int | None, typer.Option(
        min=1, help="local Ray only: cores it may use (default: all)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Run every cell of SWEEP_FILE as a Ray task (same code as `hil train`), each in its own
    directory; then a results table (markdown, CSV), a summary over seeds and plots."""
    from rich.console import Console

    from hil.sweep.runner import import_ray, run_sweep
    from hil.sweep.spec import load_sweep

    sweep = load_sweep(sweep_file)
    import_ray()
    out = out or Path("sweeps") / sweep.name
    console = Console()
    outcome = run_sweep(sweep, out, address=address, resume=resume, max_parallel=max_parallel,
                        num_cpus=num_cpus, console=console, progress=not quiet)
    done = sum(1 for r in outcome.rows if r.get("status") == "done")
    failed = [r for r in outcome.rows if r.get("status") == "failed"]
    console.print(f"{done}/{len(outcome.rows)} cells done ({len(outcome.ran)} run now, "
                  f"{outcome.seconds:.1f} s), {len(failed)} failed; "
                  f"{outcome.out / 'results.md'}, {outcome.out / 'results.csv'}",
                  highlight=False)
    if failed:
        raise typer.Exit(1)
