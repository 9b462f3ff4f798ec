"""A sweep's results: one table (markdown and CSV, one row per cell), a summary over seeds
(mean +- std per combination of the other axes) and plots of accuracy per axis value."""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from hil.sweep.spec import Sweep

RESULT_COLUMNS = ("status", "final_acc", "best_acc", "steps", "seconds", "node", "error")
CAL_COLUMNS = ("status", "families", "median_dw_min", "median_gamma", "median_c2c",
               "median_symmetric_point", "median_r2", "seconds", "node", "error")
ALGORITHM = "algorithm.name"


def _columns(sweep: Sweep) -> list[str]:
    return ["cell", *sweep.axes, *(RESULT_COLUMNS if sweep.job == "train" else CAL_COLUMNS)]


def _fmt(key: str, v: Any) -> str:
    if v is None or v == "":
        return ""
    if key in ("final_acc", "best_acc") and isinstance(v, float):
        return f"{100 * v:.2f}"
    if key == "seconds" and isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    heads = [c.replace("final_acc", "final acc %").replace("best_acc", "best acc %")
             for c in columns]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(c, row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summarize(sweep: Sweep, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of the done cells' final and best accuracy, per combination
    of the other axes (sample std, n - 1; 0 for one seed)."""
    others = [a for a in sweep.axes if a != "seed"]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("status") == "done" and r.get("final_acc") is not None:
            groups[tuple(str(r.get(a, "")) for a in others)].append(r)
    out = []
    for key, members in groups.items():
        s: dict[str, Any] = dict(zip(others, key, strict=True))
        s["seeds"] = len(members)
        for metric in ("final_acc", "best_acc"):
            vals = [100 * m[metric] for m in members]
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) \
                if len(vals) > 1 else 0.0
            s[metric] = f"{mean:.2f} +- {std:.2f}"
            s[metric + "_mean"], s[metric + "_std"] = mean, std
        out.append(s)
    return out


def write_report(sweep: Sweep, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """results.md, results.csv, (train sweeps) summary.md and accuracy plots, under ``out``."""
    cols = _columns(sweep)
    paths = [out / "results.md", out / "results.csv"]
    _atomic(paths[0], f"# sweep {sweep.name}\n\n" + markdown_table(cols, rows))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in cols})
    _atomic(paths[1], buf.getvalue())
    if sweep.job != "train":
        return paths
    summary = summarize(sweep, rows)
    if summary:
        scols = [a for a in sweep.axes if a != "seed"] + ["seeds", "final_acc", "best_acc"]
        text = markdown_table(scols, summary).replace("final acc %", "final acc % (mean +- std)")
        _atomic(out / "summary.md", f"# sweep {sweep.name}: over seeds\n\n"
                + text.replace("best acc %", "best acc % (mean +- std)"))
        paths.append(out / "summary.md")
        paths += plot_axes(sweep, summary, out)
    return paths


def plot_axes(sweep: Sweep, summary: list[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per axis (other than seed and algorithm): final test accuracy per value, one
    line per algorithm (and per value of the remaining axes), error bars = std over seeds.
    Cells that lack the axis (another group) are drawn as a dashed level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for group in sweep.axis_groups:
        if set(group) & {"seed", ALGORITHM}:
            continue
        axis = " / ".join(group)

        def xval(s: dict[str, Any], group: tuple[str, ...] = group) -> str:
            vals = [str(s.get(f, "")) for f in group]
            return "" if all(v == "" for v in vals) else " / ".join(vals)

        xs = list(dict.fromkeys(x for x in map(xval, summary) if x))  # sweep-file order
        if not xs:
            continue
        lines: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
        levels: dict[str, tuple[float, float]] = {}
        for s in summary:
            rest = [f"{a.split('.')[-1]}={s[a]}" for a in sweep.axes
                    if a not in ("seed", ALGORITHM, *group) and s.get(a, "") != ""]
            label = " ".join([str(s.get(ALGORITHM, "")) or "run", *rest])
            point = (s["final_acc_mean"], s["final_acc_std"])
            if xval(s) == "":
                levels[label] = point
            else:
                lines[label][xval(s)] = point
        fig, ax = plt.subplots(figsize=(6.4, 4))
        pos = {x: i for i, x in enumerate(xs)}
        for label, pts in lines.items():
            keys = list(pts)
            ax.errorbar([pos[k] for k in keys], [pts[k][0] for k in keys],
                        yerr=[pts[k][1] for k in keys], marker="o", capsize=3, label=label)
        for label, (mean, std) in levels.items():
            line = ax.axhline(mean, ls="--", lw=1, label=label)
            ax.axhspan(mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel(axis)
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"{sweep.name}: error bars = std over seeds")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"acc_vs_{'+'.join(group).replace('.', '_')}.png"
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)
        paths.append(path)
    return paths

