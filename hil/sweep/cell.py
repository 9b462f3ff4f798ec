"""One cell of a sweep, run in its own directory by the same code as ``hil train`` (or
``hil characterize`` + ``hil fit``). Nothing here knows about Ray: the runner calls
:func:`run_cell` inside a Ray task, a test or a user can call it directly.

A cell whose directory holds a checkpoint resumes from it (what a retried cell does after
its worker died); a cell that fails by its own error returns its error line instead of
raising, so the sweep records it and goes on.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

CELL_CONFIG = "config.yaml"
CELL_LOG = "cell.log"
CELL_RESULT = "cell.json"
# Test-only fault injection: "STEPS" (or "STEPS:TEXT", only cells whose directory path holds
# TEXT) makes a train cell kill its own worker process (SIGKILL) after STEPS steps, on its
# first attempt only (a marker file in the cell directory).
KILL_ENV = "HIL_SWEEP_KILL_AFTER_STEPS"
_KILLED_MARK = ".fault_injected"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _where() -> dict[str, Any]:
    return {"host": platform.node(), "pid": os.getpid()}


def run_cell(job: str, config: dict[str, Any], out_dir: str, cpus: float = 1,
             node: str | None = None) -> dict[str, Any]:
    """Run one cell into ``out_dir``; return its result row (status 'done' or 'failed')."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(cpus)))  # the CPUs this cell asked for, no more
    result: dict[str, Any] = {**_where(), "node": node, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    try:
        with open(out / CELL_LOG, "a") as log:
            if job == "train":
                result.update(_train_cell(config, out, log))
            else:
                result.update(_calibrate_cell(config, out, log))
        result["status"] = "done"
    except Exception as exc:  # the cell's own error: reported, the sweep goes on
        result["status"] = "failed"
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        with open(out / CELL_LOG, "a") as log:
            log.write(traceback.format_exc())
    result["seconds"] = time.perf_counter() - t0
    write_json(out / CELL_RESULT, result)
    return result


def _train_cell(config: dict[str, Any], out: Path, log: Any) -> dict[str, Any]:
    from rich.console import Console

    from hil.config import parse_config
    from hil.runs import CHECKPOINT, CURVES, RUN_FILE, train_run

    cfg = parse_config(config, str(out / CELL_CONFIG))
    (out / CELL_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    resume = (out / CHECKPOINT).exists()
    if not resume:  # died before its first checkpoint: nothing to keep, start clean
        for name in (RUN_FILE, CURVES):
            (out / name).unlink(missing_ok=True)
    console = Console(file=log, width=100, force_terminal=False)
    kill_after, _, only = os.environ.get(KILL_ENV, "").partition(":")
    if kill_after and only in str(out) and not (out / _KILLED_MARK).exists():
        (out / _KILLED_MARK).touch()
        train_run(cfg, out, config_path=str(out / CELL_CONFIG), resume=resume,
                  console=console, progress=False, stop_after_steps=int(kill_after))
        log.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-cell, as in a crash
    res = train_run(cfg, out, config_path=str(out / CELL_CONFIG), resume=resume,
                    console=console, progress=False)
    acc = res.metrics.get("test_acc")
    row: dict[str, Any] = {"steps": res.global_step, "resumed": resume,
                           "epochs": int(len(res.metrics.get("train_loss", [])))}
    if acc is not None and len(acc):
        row["final_acc"] = float(acc[-1])
        row["best_acc"] = float(max(acc))
    loss = res.metrics.get("test_loss")
    if loss is not None and len(loss):
        row["final_test_loss"] = float(loss[-1])
    return row


def _calibrate_cell(config: dict[str, Any], out: Path, log: Any) -> dict[str, Any]:
    import numpy as np

    from calibration.protocols import SweepProtocol  # lazily: only calibration sweeps
    from calibration.workflow import run_characterize, run_fit

    (out / CELL_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    proto = SweepProtocol(pulses=config["pulses"], cycles=config["cycles"],
                          read_every=config["read_every"],
                          sympoint_pairs=config["sympoint_pairs"],
                          noise_reads=config["noise_reads"])
    meas = out / "meas.h5"
    meas.unlink(missing_ok=True)  # a measurement is redone whole, never appended to
    run_characterize(config["backend"], meas,
                     {config["tile"]: (config["rows"], config["cols"])}, proto, console=None)
    cal = run_fit(out / "calib.h5", meas=meas, criterion=config["criterion"])
    row: dict[str, Any] = {}
    for tc in cal.tiles.values():
        v = tc.values
        row.update({f"median_{k}": float(np.nanmedian(v[k]))
                    for k in ("dw_min", "gamma", "c2c", "symmetric_point", "r2")})
        fams, counts = np.unique(tc.model, return_counts=True)
        row["families"] = " ".join(f"{f}:{c}" for f, c in zip(fams, counts, strict=True))
    log.write(json.dumps(row) + "\n")
    return row
