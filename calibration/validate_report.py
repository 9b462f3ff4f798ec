"""Figures and the markdown report of ``hil validate`` (see calibration/validate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from calibration.validate import Divergence, Tolerances, ValidationResult

Maps = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figures(out: Path, metric: str, chip: np.ndarray, twins: np.ndarray, maps: Maps,
                  z: np.ndarray, divergences: list[Divergence]) -> dict[str, Path]:
    """curves.png (the chip's curve over the twin's band), prediction_map.png (rms z of
    each device's one-step-ahead prediction, diverged devices marked),
    prediction_hist.png (z over all devices and steps against the standard normal)."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    scale = 100.0 if metric == "test_acc" else 1.0
    epochs = np.arange(1, chip.shape[0] + 1)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.fill_between(epochs, scale * twins.min(0), scale * twins.max(0), alpha=0.3,
                    color="tab:blue", label=f"twin, {twins.shape[0]} seeds (min-max)")
    ax.plot(epochs, scale * twins.mean(0), color="tab:blue", lw=1)
    ax.plot(epochs, scale * chip, "o-", color="tab:red", lw=1.5, ms=3, label="chip")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy (%)" if metric == "test_acc" else "test loss")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    paths["curves"] = out / "curves.png"
    fig.savefig(paths["curves"], dpi=110)
    plt.close(fig)

    names = list(maps)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 0.8, 3.2),
                             squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rms = maps[name]["noise"][0]
        im = ax.imshow(rms, cmap="magma", vmin=0, vmax=max(3.0, float(np.nanmax(rms))
                                                            if np.isfinite(rms).any() else 3.0))
        bad = [(d.row, d.col) for d in divergences if d.tile == name and d.row >= 0]
        if bad:
            r, c = zip(*bad, strict=True)
            ax.scatter(c, r, marker="x", color="cyan", s=14, lw=1)
        ax.set_title(f"{name}: rms z", fontsize=9)
        ax.set_xlabel("col")
        ax.set_ylabel("row")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    paths["map"] = out / "prediction_map.png"
    fig.savefig(paths["map"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    zf = z[np.isfinite(z)]
    lim = 6.0
    ax.hist(np.clip(zf, -lim, lim), bins=60, range=(-lim, lim), density=True,
            color="tab:gray", label="chip vs twin prediction")
    g = np.linspace(-lim, lim, 200)
    ax.plot(g, np.exp(-g ** 2 / 2) / np.sqrt(2 * np.pi), color="tab:blue",
            label="calibrated c2c noise: N(0, 1)")
    ax.set_yscale("log")
    ax.set_ylim(1e-5, 1)
    ax.set_xlabel("z = (read - predicted) / sigma  (clipped to +-6)")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    paths["hist"] = out / "prediction_hist.png"
    fig.savefig(paths["hist"], dpi=110)
    plt.close(fig)
    return paths


def write_markdown(path: Path, res: ValidationResult, chip_url: str, calib: Path, kind: str,
                   tol: Tolerances, z_crit: float, figs: dict[str, Path], maps: Maps) -> None:
    """report.md: the verdict, the checks, per-tile medians of each quantity, and the
    diverged devices (most significant first)."""
    lines = [f"# Validation: {'PASS' if res.passed else 'FAIL'}", "", f"**{res.verdict}**", "",
             f"- chip: `{chip_url}`", f"- twin: `{calib}` ({kind} devices)",
             f"- devices: {res.devices}; per-device bound |z| > {z_crit:.2f} (alpha "
             f"{tol.alpha} over all devices and quantities) and beyond tolerance "
             f"(step {tol.step_tol}, drift {tol.drift_tol} dw_min/step, noise rms z "
             f"{tol.noise_tol}); {tol.replicas} twin replicas per step", "",
             "## Learning curves", "", f"![curves]({figs['curves'].name})", "",
             f"Final {res.metric}: chip {res.chip_final:.4g}, twin interval "
             f"[{res.interval[0]:.4g}, {res.interval[1]:.4g}].", "",
             "## One-step-ahead prediction", "",
             f"![map]({figs['map'].name}) ![hist]({figs['hist'].name})", "",
             "| tile | quantity | median value | median z | diverged |",
             "| --- | --- | --- | --- | --- |"]
    for name, q in res.pooled.items():
        for qname, (value, z) in q.items():
            bad = any(d.tile == name and d.quantity == qname for d in res.divergences)
            lines.append(f"| {name} | {qname} (pooled) | {value:.4g} | {z:.3g} | "
                         f"{'tile' if bad else 0} |")
    for name, q in maps.items():
        for qname, (value, z) in q.items():
            n_bad = sum(d.tile == name and d.quantity == qname for d in res.divergences)
            v = value[np.isfinite(value)]
            zz = z[np.isfinite(z)]
            lines.append(f"| {name} | {qname} | {np.median(v) if v.size else float('nan'):.4g}"
                         f" | {np.median(zz) if zz.size else float('nan'):.3g} | {n_bad} |")
    lines += ["", "Quantities: `step_up` / `step_down` observed over predicted change of the "
              "steps that moved a device (1 under the twin), `drift` the relaxation towards "
              "w = 0 of unmoved devices per step in dw_min (0), `noise` the rms z of moved "
              "devices (1); pooled over the tile, `step_out` / `step_in` the ratio of the "
              "steps away from / towards w = 0 (1; dw_min moves both, gamma moves them "
              "apart).", ""]
    if res.divergences:
        lines += ["## Diverged devices and tiles", "", "| where | quantity | value | z |",
                  "| --- | --- | --- | --- |"]
        for d in res.divergences[:200]:
            lines.append(f"| {d.where} | {d.quantity} | {d.value:.4g} | {d.z:.1f} |")
        if len(res.divergences) > 200:
            lines.append(f"\n... and {len(res.divergences) - 200} more (validate.h5).")
    path.write_text("\n".join(lines) + "\n")
