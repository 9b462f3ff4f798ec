"""``hil sweep`` on a local Ray instance (2 CPUs, tiny cells): a 2x2x2 grid matches the same
cells run one by one with ``hil train`` bit for bit; a worker killed mid-cell is retried from
the cell's checkpoint to the same result; an interrupted sweep resumed runs only the missing
cells; a bad sweep file is one line, exit 2, with nothing started.

One Ray instance (module fixture) serves the in-process tests; it starts and stops itself
and leaves no process behind."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from hil.cli import main
from hil.runs import CHECKPOINT, RUN_FILE
from hil.runstore import read_metrics
from hil.sweep import load_sweep
from hil.sweep.cell import CELL_CONFIG, CELL_LOG, CELL_RESULT, KILL_ENV
from hil.sweep.runner import CELLS, LOCK, OBJECT_STORE, STATE, run_sweep

ray = pytest.importorskip("ray", reason="the [sweep] extra (Ray) is not installed")

BASE = {
    "name": "tiny", "seed": 0,
    "backend": "sim://?model=power&gamma=0.5&tau=0.6&dw_min=1e-3&c2c=0.1&seed=0",
    "model": {"hidden": [8], "activation": "tanh"},
    "data": {"name": "digits", "limit_train": 60, "limit_test": 60},
    "algorithm": {"name": "rlv2", "lr": 0.2, "transfer_lr": 0.1, "gamma": 0.1},
    "train": {"epochs": 1, "batch_size": 10, "checkpoint_every": 2},
}
KILL_DIR = "kill-after-9-steps"  # cells under a directory of this name: fault injection
GRID = {"name": "grid", "base": BASE, "seeds": [0, 1],
        "grid": {"algorithm.name": ["tiki_taka", "rlv2"], "backend.gamma": [0.5, 2]}}


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def descendants(root: int) -> set[int]:
    """Pids of the live processes below ``root`` (Ray's GCS, raylet, workers, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def wait_gone(pids: set[int], seconds: float = 15) -> set[int]:
    """The pids still alive (zombies count as gone) after waiting up to ``seconds``."""
    def alive() -> set[int]:
        left = set()
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                left.add(pid)
        return left

    deadline = time.monotonic() + seconds
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive()


@pytest.fixture
def ray_tmp():
    """A short temp dir for Ray's sockets (unix socket paths are limited to 107 bytes)."""
    temp = tempfile.mkdtemp(prefix="hilray", dir="/tmp")
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPUs for this module; shut down (no process left)."""
    temp = tempfile.mkdtemp(prefix="hilray", dir="/tmp")
    # the workers inherit the fault injection; it fires only in KILL_DIR cells
    os.environ[KILL_ENV] = f"9:{KILL_DIR}"
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", _temp_dir=temp, object_store_memory=OBJECT_STORE)
    finally:
        del os.environ[KILL_ENV]
    try:
        yield ray
    finally:
        started = descendants(os.getpid())
        ray.shutdown()
        left = wait_gone(started)
        shutil.rmtree(temp, ignore_errors=True)
        assert started and not left, f"Ray processes left behind: {left}"


def train_alone(cell_dir: Path, out: Path) -> None:
    """The cell's own config.yaml through ``hil train`` in this process, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["train", str(cell_dir / CELL_CONFIG), "--out", str(out), "--quiet"])
    finally:
        torch.set_num_threads(threads)


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a / RUN_FILE), read_metrics(b / RUN_FILE)
    assert set(ma) == set(mb)
    for key in ma:
        if key != "epoch_seconds":
            assert ma[key].tolist() == mb[key].tolist(), key
    ca = torch.load(a / CHECKPOINT, weights_only=False)
    cb = torch.load(b / CHECKPOINT, weights_only=False)
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key
    for name, tile in (ca["backend"] or {}).items():
        assert torch.equal(tile["w"], cb["backend"][name]["w"]), name


@pytest.mark.parametrize("patch,field", [
    ({"grid": {"algorithm.lrr": [0.1]}}, "grid.algorithm.lrr"),
    ({"grdi": {"seed": [1]}}, "grdi"),
    ({"grid": {"algorithm.name": []}}, "grid.algorithm.name"),
    ({"grid": {"algorithm.lr": [0.1, -1]}}, "algorithm.lr"),
    ({"zip": [{"seed": [1, 2], "algorithm.lr": [0.1]}]}, "zip[0]"),
    ({"seeds": []}, "seeds"),
    ({"base": "missing.yaml"}, "base"),
    ({"groups": [{"set": {"train.epochs": 0}}]}, "train.epochs"),
    ({"grid": {"backend.gamma": [[1, 2]]}}, "set/axes"),
    ({"grid": {"backend": ["nonsense"]}}, "backend"),
    ({"grid": {"backend.gamma": ["abc"]}}, "backend"),
    ({"grid": {"backend.gamam": [1.0]}}, "gamam"),
    ({"grid": {"backend": ["nosuch://x"]}}, "nosuch"),
])
def test_bad_sweep_file_is_one_line_exit_2_nothing_started(tmp_path, capsys, patch, field):
    path = write(tmp_path / "bad.yaml", {**GRID, **patch})
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(path), "--out", str(out), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and field in err, err
    assert not out.exists()
    assert not ray.is_initialized()


def test_cells_declare_cpus_and_a_gpu_where_the_url_says_cuda(tmp_path):
    spec = {**GRID, "seeds": None, "grid": {"backend.device": ["cpu", "cuda"]},
            "resources": {"cpus": 2}}
    sweep = load_sweep(write(tmp_path / "gpu.yaml", spec))  # no CUDA here: checked on its node
    assert sweep.cpus == 2
    assert [c.gpus for c in sweep.cells] == [0.0, 1.0]
    assert "device=cuda" in sweep.cells[1].config["backend"]
    sweep = load_sweep(write(tmp_path / "gpu.yaml", {**spec, "resources": {"gpus": 0.5}}))
    assert [c.gpus for c in sweep.cells] == [0.5, 0.5]


def test_existing_sweep_needs_resume_and_resume_needs_the_same_cells(tmp_path, capsys):
    path = write(tmp_path / "grid.yaml", GRID)
    out = tmp_path / "out"
    out.mkdir()
    (out / STATE).write_text(json.dumps({"cells": {}, "results": {}}))
    for args in ([], ["--resume"]):
        with pytest.raises(SystemExit) as exc:
            main(["sweep", str(path), "--out", str(out), "--quiet", *args])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
    assert "--resume" in err or "differs" in err
    assert sorted(p.name for p in out.iterdir()) == [STATE]


def test_without_ray_one_line_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    path = write(tmp_path / "grid.yaml", GRID)
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'analog-hil[sweep]'" in err, err
    assert not (tmp_path / "out").exists()


def test_grid_matches_hil_train_cell_by_cell(tmp_path, local_ray):
    sweep = load_sweep(write(tmp_path / "grid.yaml", GRID))
    assert len(sweep.cells) == 8
    outcome = run_sweep(sweep, tmp_path / "out", progress=False)
    assert sorted(outcome.ran) == sorted(c.id for c in sweep.cells)
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["status"] == "done" for r in rows)
    assert {(r["seed"], r["algorithm.name"], r["backend.gamma"]) for r in rows} == {
        (s, a, g) for s in ("0", "1") for a in ("tiki_taka", "rlv2") for g in ("0.5", "2")}
    assert all(r["node"] and r["steps"] == "6" for r in rows)
    assert (tmp_path / "out" / "results.md").read_text().count("| done |") == 8
    assert "+-" in (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "acc_vs_backend_gamma.png").stat().st_size > 0
    for row in rows:
        cell_dir = tmp_path / "out" / CELLS / row["cell"]
        alone = tmp_path / "alone" / row["cell"]
        train_alone(cell_dir, alone)
        assert_same_run(cell_dir, alone)
        acc = read_metrics(alone / RUN_FILE)["test_acc"]
        assert float(row["final_acc"]) == float(acc[-1])
        assert float(row["best_acc"]) == float(max(acc))
    # seeds differ: the cells are not all one run
    assert len({r["final_acc"] + r["seed"] for r in rows}) > 1


def test_killed_worker_is_retried_from_its_checkpoint(tmp_path, local_ray):
    # 2 epochs of 6 steps, checkpoints every 2 steps; the worker kills itself after step 9
    # (SIGKILL, first attempt only: see local_ray); Ray retries the cell, which resumes
    base = {**BASE, "train": {**BASE["train"], "epochs": 2}}
    spec = {"name": "kill", "base": base, "grid": {"algorithm.name": ["rlv2", "tiki_taka"]},
            "max_retries": 2}
    sweep = load_sweep(write(tmp_path / "kill.yaml", spec))
    outcome = run_sweep(sweep, tmp_path / KILL_DIR, progress=False)
    for row in outcome.rows:
        assert row["status"] == "done", row
        assert row["resumed"] is True and row["steps"] == 12
        cell_dir = tmp_path / KILL_DIR / CELLS / row["cell"]
        assert (cell_dir / ".fault_injected").exists()
        log = (cell_dir / CELL_LOG).read_text()
        assert log.count("epoch 1:") == 1 and log.count("epoch 2:") == 1  # not from zero
        alone = tmp_path / "alone" / row["cell"]
        train_alone(cell_dir, alone)
        assert_same_run(cell_dir, alone)


def test_a_failing_cell_is_reported_and_the_others_finish(tmp_path, local_ray, capsys):
    spec = {"name": "fail", "base": BASE,
            "grid": {"backend": [BASE["backend"], "twin:///no/such/calib.h5"]}}
    sweep_file = write(tmp_path / "fail.yaml", spec)
    sweep = load_sweep(sweep_file)
    outcome = run_sweep(sweep, tmp_path / "out", progress=False)
    done, failed = outcome.rows
    assert done["status"] == "done"
    assert failed["status"] == "failed" and "calib.h5" in failed["error"]
    assert "\n" not in failed["error"]
    assert "calib.h5" in (tmp_path / "out" / "results.md").read_text()


def test_calibration_sweep_one_job_per_backend(tmp_path, local_ray):
    spec = {"name": "cal", "job": "calibrate",
            "base": {"rows": 2, "cols": 3, "pulses": 40, "cycles": 1, "sympoint_pairs": 20,
                     "noise_reads": 5},
            "grid": {"backend": ["sim://?model=power&gamma=0.5&tau=0.6&dw_min=0.01&seed=1",
                                 "sim://?model=exp&gamma=1&tau=0.6&dw_min=0.01&seed=1"]}}
    sweep = load_sweep(write(tmp_path / "cal.yaml", spec))
    outcome = run_sweep(sweep, tmp_path / "out", progress=False)
    for row in outcome.rows:
        assert row["status"] == "done", row
        assert (tmp_path / "out" / CELLS / row["cell"] / "calib.h5").exists()
        assert 0.001 < row["median_dw_min"] < 0.1
    assert "median_gamma" in (tmp_path / "out" / "results.csv").read_text()


def test_interrupted_sweep_resumed_runs_only_the_missing_cells(tmp_path, local_ray, ray_tmp):
    # 4 cells one at a time in a `hil sweep` of its own, stopped by SIGTERM once the first
    # is done (SIGTERM, SIGHUP and Ctrl-C take one path: cells cancelled, Ray shut down)
    spec = {"name": "stop", "base": {**BASE, "train": {**BASE["train"], "epochs": 2}},
            "seeds": [0, 1], "grid": {"algorithm.name": ["rlv2", "tiki_taka"]}}
    sweep_file = write(tmp_path / "stop.yaml", spec)
    out = tmp_path / "out"
    argv = ["sweep", str(sweep_file), "--out", str(out), "--num-cpus", "2", "--max-parallel",
            "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-c", f"from hil.cli import main; main({argv!r})"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_TMPDIR": ray_tmp},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            state = json.loads((out / STATE).read_text()) if (out / STATE).exists() else {}
            if state.get("results"):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read().decode()
        started = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    said = proc.stdout.read().decode()
    assert proc.returncode == 130 and "rerun with --resume" in said, said
    assert started and not wait_gone(started), "the stopped sweep left processes behind"
    recorded = json.loads((out / STATE).read_text())["results"]
    # done: recorded by the sweep, or finished in its worker as the sweep was stopping
    finished = {p.name for p in (out / CELLS).iterdir() if (p / CELL_RESULT).exists()
                and json.loads((p / CELL_RESULT).read_text())["status"] == "done"}
    assert set(recorded) <= finished and 1 <= len(finished) < 4
    stamps = {k: (out / CELLS / k / CELL_RESULT).stat().st_mtime_ns for k in finished}
    sweep = load_sweep(sweep_file)
    outcome = run_sweep(sweep, out, resume=True, progress=False)
    assert set(outcome.ran) == {c.id for c in sweep.cells} - finished
    assert all(r["status"] == "done" for r in outcome.rows)
    assert {k: (out / CELLS / k / CELL_RESULT).stat().st_mtime_ns for k in finished} == stamps
    for row in outcome.rows:  # resumed or not, every cell is the run `hil train` gives
        train_alone(out / CELLS / row["cell"], tmp_path / "alone" / row["cell"])
        assert_same_run(out / CELLS / row["cell"], tmp_path / "alone" / row["cell"])


def test_a_second_sweep_on_the_same_out_is_refused(tmp_path, local_ray, capsys):
    path = write(tmp_path / "grid.yaml", {**GRID, "seeds": None})
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK, "a") as held:  # what a running `hil sweep` holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as exc:
            main(["sweep", str(path), "--out", str(out), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another hil sweep is running" in err, err
    assert not (out / STATE).exists() and not (out / CELLS).exists()
