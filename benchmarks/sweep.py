"""``hil sweep`` on Ray against the same cells one after another, on this machine.

16 small cells (digits, 64-32-10 tanh FCN, RLv2 on ``sim://``, 2 epochs of the 1438
training samples, seeds 0..15). Serial: :func:`hil.sweep.cell.run_cell` for each cell in
this process (the code a Ray task runs, warm: imports paid once). Ray: a local instance on
``--cpus`` cores, the cells through :func:`hil.sweep.runner.run_sweep` (what ``hil sweep``
does). Prints the wall times and their ratio, the cores in use (busy cell-seconds per wall
second), Ray's start-up time and its overhead per cell: (Ray wall x cores - the cells' own
seconds) / cells, and the round trip of an empty Ray task.

    .venv/bin/python benchmarks/sweep.py [--cpus N] [--cells 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hil.sweep.cell import run_cell
from hil.sweep.runner import OBJECT_STORE, run_sweep
from hil.sweep.spec import parse_sweep

BASE = {
    "name": "bench", "seed": 0,
    "backend": "sim://?model=power&gamma=0.5&tau=0.6&dw_min=1e-3&c2c=0.1&seed=0",
    "model": {"hidden": [32], "activation": "tanh"},
    "data": {"name": "digits"},
    "algorithm": {"name": "rlv2", "lr": 0.2, "transfer_lr": 0.1, "gamma": 0.1},
    "train": {"epochs": 2, "batch_size": 10},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                   help="cores of the local Ray instance")
    p.add_argument("--cells", type=int, default=16)
    args = p.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="hilsweepbench"))
    ray_tmp = tempfile.mkdtemp(prefix="hr", dir="/tmp")  # short: Ray's socket paths
    try:
        sweep = parse_sweep({"name": "bench", "base": BASE,
                             "seeds": list(range(args.cells))}, work / "bench.yaml")
        threads = torch.get_num_threads()
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        serial = [run_cell("train", c.config, str(work / "serial" / c.id), 1)
                  for c in sweep.cells]
        t_serial = time.perf_counter() - t0
        torch.set_num_threads(threads)
        assert all(r["status"] == "done" for r in serial), serial

        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", _temp_dir=ray_tmp, object_store_memory=OBJECT_STORE)
        t_init = time.perf_counter() - t0
        try:
            outcome = run_sweep(sweep, work / "ray", progress=False)
            t_ray = outcome.seconds
            noop = ray.remote(lambda: None)
            ray.get([noop.remote() for _ in range(20)])  # workers warm
            t0 = time.perf_counter()
            for _ in range(50):
                ray.get(noop.remote())
            t_task = (time.perf_counter() - t0) / 50
        finally:
            ray.shutdown()
        rows = outcome.rows
        assert all(r["status"] == "done" for r in rows), rows
        same = all(a["final_acc"] == b["final_acc"] for a, b in zip(serial, rows, strict=True))
        cell_s = sum(r["seconds"] for r in rows)
        serial_s = sum(r["seconds"] for r in serial)
        load_after = os.getloadavg()[0]
        print(f"{args.cells} cells (digits 1438 samples x 2 epochs, 64-32-10 RLv2), "
              f"{os.cpu_count()} CPUs, Ray {ray.__version__} on {args.cpus} cores, "
              f"1-min load average before/after {load_before:.1f}/{load_after:.1f}")
        print(f"one after another (one process, warm): {t_serial:7.1f} s "
              f"({serial_s / args.cells:.2f} s per cell)")
        print(f"Ray sweep (cells submitted -> table): {t_ray:7.1f} s; Ray start {t_init:.1f} s")
        print(f"ratio serial / Ray: {t_serial / t_ray:.2f} (with Ray's start: "
              f"{t_serial / (t_ray + t_init):.2f})")
        print(f"cores in use during the Ray sweep: {cell_s / t_ray:.2f} of {args.cpus} "
              f"(cell-seconds {cell_s:.1f} / wall {t_ray:.1f})")
        print(f"Ray overhead per cell: {(t_ray * args.cpus - cell_s) / args.cells:.2f} s "
              f"of core time ((wall x cores - cell-seconds) / cells); a cell in Ray took "
              f"{cell_s / args.cells:.2f} s vs {serial_s / args.cells:.2f} s in the serial "
              f"process; an empty task's round trip {1000 * t_task:.1f} ms")
        print(f"final accuracies identical serial vs Ray: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
