"""Where a sweep's analog weights ended: per cell, the mean |W| / tau over every W tile and the
fraction of W devices within 10 % of a bound (|W| > 0.9 tau), read from each cell's final
checkpoint (the emulator's snapshot). Tiki-Taka's W integrating a biased P drifts to the
bounds; Analog SGD's implicit penalty keeps W near the symmetric point (PAPER.md claim 1).

    .venv/bin/python experiments/weights_at_bounds.py out/cnn3 [--tile-kind W]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import parse_qsl

import torch


def tau_of(backend_url: str) -> float:
    """The bound tau of a sim:// URL (its default, 1.0, where the URL gives none)."""
    query = dict(parse_qsl(backend_url.partition("?")[2]))
    return float(query.get("tau", 1.0))


def cell_stats(cell: Path, kind: str) -> tuple[float, float] | None:
    """(mean |W| / tau, fraction with |W| > 0.9 tau) over the cell's ``kind`` tiles."""
    ckpt_path = cell / "checkpoint.pt"
    if not ckpt_path.exists():
        return None
    ckpt = torch.load(ckpt_path, weights_only=True)
    snap = ckpt.get("backend") or {}
    tau = tau_of(ckpt["config"]["backend"])
    ws = [entry["w"].abs().flatten() / tau for name, entry in snap.items()
          if name.endswith("." + kind) and isinstance(entry, dict) and "w" in entry]
    if not ws:
        return None
    w = torch.cat(ws)
    return float(w.mean()), float((w > 0.9).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--tile-kind", default="W", help="tile name suffix (W or P)")
    args = ap.parse_args(argv)
    cells = sorted((args.sweep_dir / "cells").glob("c*"))
    if not cells:
        print(f"{args.sweep_dir}: no cells", file=sys.stderr)
        return 2
    print(f"| cell | final acc % | mean abs {args.tile_kind} / tau | "
          f"fraction abs {args.tile_kind} > 0.9 tau |\n|---|---|---|---|")
    for cell in cells:
        stats = cell_stats(cell, args.tile_kind)
        if stats is None:
            continue
        info = json.loads((cell / "cell.json").read_text()) if (cell / "cell.json").exists() \
            else {}
        acc = info.get("final_acc")
        acc_s = f"{100 * acc:.2f}" if acc is not None else "-"
        print(f"| {cell.name} | {acc_s} | {stats[0]:.3f} | {stats[1]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
