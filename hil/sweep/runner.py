"""Run a sweep's cells as Ray tasks: locally (Ray started on this machine's cores) or on an
existing cluster (``--address ray://HOST:10001`` or ``auto``).

Ray does the scheduling, placement and retries: each cell is one task declaring its CPUs
(and a GPU where its backend URL says ``device=cuda``), with ``max_retries`` for a worker
that dies (the retry resumes from the cell's last checkpoint) and no retry for the cell's
own errors. ``--max-parallel`` caps the tasks in flight with ``ray.wait``. The driver keeps
the sweep's state in OUT/sweep.json (rewritten atomically as cells finish), so a killed
``hil sweep`` rerun with ``--resume`` submits only the cells that are not done.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from hil.errors import ConfigError, HilError
from hil.sweep.cell import CELL_RESULT, KILL_ENV, run_cell, write_json
from hil.sweep.spec import Sweep

STATE = "sweep.json"
LOCK = "sweep.lock"
CELLS = "cells"
OBJECT_STORE = 256 * 1024**2  # bytes, local Ray
INSTALL_HINT = ("hil sweep needs Ray: pip install 'analog-hil[sweep]' "
                "(or: pip install 'ray[client]')")


class RayMissing(HilError):
    """Ray is not installed (``hil sweep`` says how to install it)."""


@dataclass
class SweepOutcome:
    """Where the sweep wrote, its cells' rows (one per cell), and the cells run this time."""

    out: Path
    rows: list[dict[str, Any]]
    ran: list[str]
    seconds: float


class RayUnavailable(HilError):
    """Ray could not be started here or the cluster could not be reached."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayMissing(INSTALL_HINT) from None
    return ray


def _remote_cell(job: str, config: dict[str, Any], out_dir: str, cpus: float) -> dict[str, Any]:
    """The body of a cell's Ray task: which node it is on, then the plain cell."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    return run_cell(job, config, out_dir, cpus, node=f"{socket.gethostname()}:{node[:8]}")


def _state(sweep: Sweep, out: Path) -> dict[str, Any]:
    return {"sweep": str(sweep.path), "name": sweep.name, "job": sweep.job,
            "axes": sweep.axes,
            "cells": {c.id: {"index": c.index, "digest": c.digest, "values": c.values}
                      for c in sweep.cells},
            "results": {}}


def prepare_out(sweep: Sweep, out: Path, resume: bool) -> dict[str, Any]:
    """Check OUT against the sweep (a resumed sweep must be the same cells) and return the
    state, with the results of finished cells found there."""
    path = out / STATE
    if out.exists() and not out.is_dir():
        raise ConfigError(str(out), "--out", "is a file, not a directory")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(parent, os.W_OK):
        raise ConfigError(str(out), "--out", f"{parent} is not writable")
    if path.exists() and not resume:
        raise ConfigError(str(out), "--out", "already holds a sweep (use --resume or another "
                                            "--out)")
    if not resume:
        return _state(sweep, out)
    if not path.exists():
        raise ConfigError(str(out), "--resume", "no sweep to resume here")
    import json

    try:
        old = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(str(path), "<file>", f"unreadable sweep state: {exc}") from None
    new = _state(sweep, out)
    if {k: v["digest"] for k, v in old["cells"].items()} != \
            {k: v["digest"] for k, v in new["cells"].items()}:
        raise ConfigError(str(sweep.path), "<cells>", f"differs from the sweep in {out} "
                          "(same file and values needed to resume; use another --out)")
    new["results"] = {k: r for k, r in old.get("results", {}).items()
                      if r.get("status") == "done"}
    for cell in sweep.cells:  # done in its directory after the driver stopped recording
        if cell.id in new["results"]:
            continue
        f = out / CELLS / cell.id / CELL_RESULT
        if f.exists():
            try:
                r = json.loads(f.read_text())
            except ValueError:
                continue
            if r.get("status") == "done":
                new["results"][cell.id] = r
    return new


def init_ray(address: str | None, num_cpus: int | None = None) -> Any:
    """Connect to ``address`` (a cluster; default: $RAY_ADDRESS) or start Ray locally on
    this machine's cores."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    kw: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
    address = address or os.environ.get("RAY_ADDRESS")  # Ray's own convention
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            # cells return small rows: a small object store spares the machine's memory
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     object_store_memory=OBJECT_STORE, **kw)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise RayUnavailable(f"cannot start or reach {where}: {_ray_error_line(exc)}") from None
    return ray


def run_sweep(sweep: Sweep, out: Path, *, address: str | None = None, resume: bool = False,
              max_parallel: int | None = None, num_cpus: int | None = None,
              console: Console | None = None, progress: bool = True) -> SweepOutcome:
    """Run every cell not yet done; write the state, the results table and the plots."""
    from hil.sweep.report import write_report

    console = console or Console()
    out = Path(out).resolve()
    state = prepare_out(sweep, out, resume)
    todo = [c for c in sweep.cells if c.id not in state["results"]]
    if not todo:  # a finished sweep resumed: only the report is written again
        rows = table_rows(sweep, state)
        write_report(sweep, rows, out)
        return SweepOutcome(out, rows, [], 0.0)
    ray = import_ray()
    started_here = not ray.is_initialized()
    opts: dict[str, Any] = {"max_retries": sweep.max_retries, "retry_exceptions": False}
    if os.environ.get(KILL_ENV):  # test-only fault injection reaches the workers
        opts["runtime_env"] = {"env_vars": {KILL_ENV: os.environ[KILL_ENV]}}
    task = ray.remote(**opts)(_remote_cell)
    t0 = time.perf_counter()
    ran: list[str] = []
    pending: dict[Any, Any] = {}
    queue = list(todo)
    limit = max_parallel or len(queue)
    failed = 0
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("running {task.fields[running]}, failed {task.fields[failed]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   console=console, disable=not progress, transient=False)
    lock = None
    handlers: dict[int, Any] = {}
    init_ray(address, num_cpus)  # before anything is written: no Ray, nothing started
    try:
        handlers = _stop_on_signals()  # after ray.init, which installs its own SIGTERM one
        lock = _lock(out)
        (out / CELLS).mkdir(parents=True, exist_ok=True)
        write_json(out / STATE, state)
        with bar:
            ptask = bar.add_task(f"sweep {sweep.name}", total=len(sweep.cells),
                                 completed=len(state["results"]), running=0, failed=failed)
            while queue or pending:
                while queue and len(pending) < limit:
                    cell = queue.pop(0)
                    ref = task.options(num_cpus=sweep.cpus, num_gpus=cell.gpus).remote(
                        sweep.job, cell.config, str(out / CELLS / cell.id), sweep.cpus)
                    pending[ref] = cell
                bar.update(ptask, running=len(pending))
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in done:
                    cell = pending.pop(ref)
                    try:
                        row = ray.get(ref)
                    except Exception as exc:  # the worker died more than max_retries times
                        row = {"status": "failed", "error": _ray_error_line(exc)}
                    state["results"][cell.id] = row
                    ran.append(cell.id)
                    if row.get("status") != "done":
                        failed += 1
                        console.print(f"[red]cell {cell.id} failed:[/red] "
                                      f"{escape(str(row.get('error')))}", highlight=False)
                    write_json(out / STATE, state)
                    bar.update(ptask, advance=1, failed=failed, running=len(pending))
    except KeyboardInterrupt:
        console.print(f"interrupted: {len(state['results'])}/{len(sweep.cells)} cells done; "
                      f"rerun with --resume --out {out} to run the others", highlight=False)
        raise
    finally:
        if started_here:  # a local Ray ends with the sweep: its shutdown stops the workers
            ray.shutdown()  # (no force-cancel first: a cell finishing as it is cancelled
            # can crash Ray's core worker, "Tried to complete task that was not pending")
        else:  # a cluster outlives the sweep: its cells are cancelled
            for ref in pending:
                ray.cancel(ref, force=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if lock is not None:
            lock.close()
    rows = table_rows(sweep, state)
    write_report(sweep, rows, out)
    return SweepOutcome(out, rows, ran, time.perf_counter() - t0)


def _lock(out: Path) -> Any:
    """Hold OUT/sweep.lock (flock) while the sweep runs: two ``hil sweep`` on one --out
    would run the same cells into the same directories."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ConfigError(str(out), "--out", "another hil sweep is running on it") from None
    return f


def _stop_on_signals() -> dict[int, Any]:
    """SIGTERM and SIGHUP stop the sweep like Ctrl-C (cells cancelled, a local Ray shut
    down, the state kept for --resume); returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}


def _ray_error_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {first}"[:300]


def table_rows(sweep: Sweep, state: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per cell, in sweep order: id, every axis value, then the cell's result."""
    rows = []
    for cell in sweep.cells:
        res = state["results"].get(cell.id, {"status": "not run"})
        row: dict[str, Any] = {"cell": cell.id}
        for name in sweep.axes:
            row[name] = cell.values.get(name, "")
        row.update(res)
        rows.append(row)
    return rows
