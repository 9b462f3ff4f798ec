"""How often does ``hil validate`` cry wolf, and what is the smallest change it sees?

For each chip seed s (a power-response population on ``sim://``): characterize the job's
tiles (``hil characterize --config``'s code), fit, then validate

- the unchanged chip (the false-alarm rate over ``--seeds`` chips), and, on the first
  ``--detect-seeds`` chips,
- the same chip aged: dw_min or gamma changed by a relative amount (``age_dw`` /
  ``age_gamma`` with ``aged=age_n``: the change has happened before the job starts).

Results go to OUT/results.jsonl (one line per validation; a rerun skips what is there)
and a summary table to stdout. The job is experiments/validate_small.yaml.

    nice -n 10 .venv/bin/python experiments/validate_study.py --out runs/validate_study
    (in parallel parts: --first-seed 10 --seeds 10 --detect-seeds 0, ...; same OUT)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from rich.console import Console

from calibration.protocols import SweepProtocol
from calibration.validate import Tolerances, job_tiles, validate
from calibration.workflow import run_characterize, run_fit
from hil.config import load_config

CHIP = "sim://?model=power&gamma=0.5&tau=0.6&dw_min=0.01&d2d=0.2&c2c=0.1&read_noise=0.001"
JOB = Path(__file__).with_name("validate_small.yaml")
DW_CHANGES = (0.02, 0.05, 0.1)
GAMMA_CHANGES = (0.4, 0.8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/validate_study"))
    ap.add_argument("--seeds", type=int, default=20, help="unchanged chips (0: none)")
    ap.add_argument("--first-seed", type=int, default=0, help="first chip seed")
    ap.add_argument("--detect-seeds", type=int, default=1)
    ap.add_argument("--twin-seeds", type=int, default=3)
    ap.add_argument("--dw", type=float, nargs="*", default=list(DW_CHANGES),
                    help="relative dw_min changes of the detection runs")
    ap.add_argument("--gamma", type=float, nargs="*", default=list(GAMMA_CHANGES),
                    help="relative gamma changes of the detection runs")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    done = {json.loads(line)["key"] for line in log.read_text().splitlines()} \
        if log.exists() else set()
    cfg = load_config(JOB)
    tiles = job_tiles(cfg, str(JOB))
    quiet = Console(quiet=True)
    proto = SweepProtocol(pulses=100, cycles=2, sympoint_pairs=50, noise_reads=20)
    tol = Tolerances()

    def run(key: str, chip: str, calib: Path) -> None:
        if key in done:
            return
        target = out / key
        shutil.rmtree(target, ignore_errors=True)
        res = validate(cfg, chip, calib, target, seeds=args.twin_seeds, config_path=str(JOB),
                       tol=tol, console=quiet, progress=False)
        row = {"key": key, "chip": chip, "passed": res.passed, "verdict": res.verdict,
               "counts": res.counts,
               "pooled": {t: {q: v[0] for q, v in p.items()} for t, p in res.pooled.items()}}
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        shutil.rmtree(target / "chip", ignore_errors=True)  # keep report, figures, HDF5
        for k in range(args.twin_seeds):
            shutil.rmtree(target / f"twin-{k}", ignore_errors=True)
        print(f"{key}: {res.verdict}", flush=True)

    def calibrated(s: int) -> tuple[str, Path]:
        chip = f"{CHIP}&seed={s}"
        calib = out / f"calib-{s}.h5"
        if not calib.exists():
            run_characterize(chip, out / f"meas-{s}.h5", tiles, proto)
            run_fit(calib, meas=out / f"meas-{s}.h5")
        return chip, calib

    for s in range(args.first_seed, args.first_seed + args.seeds):  # false alarms first
        run(f"unchanged-{s}", *calibrated(s))
    for s in range(args.detect_seeds):
        chip, calib = calibrated(s)
        for c in args.dw:
            run(f"dw{c:+g}-{s}", f"{chip}&age_dw={c}&aged=1e6", calib)
        for c in args.gamma:
            run(f"gamma{c:+g}-{s}", f"{chip}&age_gamma={c}&aged=1e6", calib)
    summarize(log)


def summarize(log: Path) -> None:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["key"].rsplit("-", 1)[0], []).append(r)
    print("| chip | validations | FAIL | pooled step_out / step_in (mean over chips) |")
    print("| --- | --- | --- | --- |")
    for name, rs in groups.items():
        fails = sum(not r["passed"] for r in rs)
        po = [v["step_out"] for r in rs for v in r["pooled"].values()]
        pi = [v["step_in"] for r in rs for v in r["pooled"].values()]
        print(f"| {name} | {len(rs)} | {fails} | {sum(po) / len(po):.3f} / "
              f"{sum(pi) / len(pi):.3f} |")


if __name__ == "__main__":
    main()
