"""PNG report of a calibration file: fitted q+- over the measured steps, maps, histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from calibration.calibfile import Calibration, TileCalibration  # noqa: E402

FAMILY_COLORS = {"linear": "tab:blue", "power": "tab:orange", "exp": "tab:green",
                 "tabulated": "tab:purple", "none": "tab:gray"}


def _sample_devices(tc: TileCalibration, n: int) -> list[tuple[int, int]]:
    """Devices spread over the array, preferring one of each selected family."""
    model = tc.model
    picks: list[tuple[int, int]] = []
    for fam in ("linear", "power", "exp", "tabulated"):
        idx = np.argwhere(model == fam)
        if len(idx):
            picks.append(tuple(int(v) for v in idx[len(idx) // 2]))
    flat = np.argwhere(model != "none")
    for k in np.linspace(0, len(flat) - 1, num=max(n, 1)).astype(int) if len(flat) else []:
        p = tuple(int(v) for v in flat[k])
        if p not in picks:
            picks.append(p)
    return picks[:n]


def plot_steps(tc: TileCalibration, out: Path, n: int = 6) -> Path:
    """Measured mean step against w with the fitted dw_min * q+- for sample devices."""
    devices = _sample_devices(tc, n)
    cols = min(3, max(1, len(devices)))
    rows = max(1, -(-len(devices) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(max(7.0, 4.2 * cols), 3.3 * rows + 0.6),
                             squeeze=False)
    resp = tc.response(torch.float64)
    for ax, (i, j) in zip(axes.flat, devices, strict=False):
        x, y, cnt = (tc.bins[k][i, j] for k in ("x", "y", "n"))
        err = np.sqrt(tc.bins["var"][i, j])
        dw = tc.values["dw_min"][i, j]
        for d, label, color in ((0, "potentiation", "tab:red"), (1, "depression", "tab:blue")):
            m = cnt[d] > 0
            ax.errorbar(x[d][m], np.abs(y[d][m]), yerr=err[d][m], fmt="o", ms=3, color=color,
                        alpha=0.7, label=f"measured {label}")
        lo, hi = tc.values["tau_min"][i, j], tc.values["tau_max"][i, j]
        xs = x[cnt > 0]
        w = np.linspace(min(lo, xs.min()), max(hi, xs.max()), 200)
        grid = torch.as_tensor(np.broadcast_to(w[:, None, None], (200, *tc.shape)).copy())
        qp = resp.q_plus(grid)[:, i, j].numpy() * dw
        qm = resp.q_minus(grid)[:, i, j].numpy() * dw
        ax.plot(w, qp, color="tab:red", lw=1.5, label="fit dw_min·q+")
        ax.plot(w, qm, color="tab:blue", lw=1.5, label="fit dw_min·q−")
        ax.axvline(tc.values["symmetric_point"][i, j], color="k", ls=":", lw=1,
                   label="symmetric point")
        ax.set_title(f"device ({i}, {j}): {tc.model[i, j]}, R²={tc.values['r2'][i, j]:.3f}",
                     fontsize=9)
        ax.set_xlabel("w (state before the pulse)")
        ax.set_ylabel("|step| per pulse")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(devices):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5 if cols > 1 else 3, fontsize=8,
               frameon=False)
    fig.suptitle(f"tile {tc.name}: measured step against w with the fitted q±")
    fig.tight_layout(rect=(0, 0.1 if cols > 1 else 0.16, 1, 0.95))
    path = out / f"{tc.name}_steps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_maps(tc: TileCalibration, out: Path) -> Path:
    """Maps over the array of tau_min, tau_max, symmetric point, dw_min, c2c and family."""
    v = tc.values
    panels = [("tau_min", v["tau_min"], "viridis"), ("tau_max", v["tau_max"], "viridis"),
              ("symmetric point", v["symmetric_point"], "coolwarm"),
              ("dw_min", v["dw_min"], "magma"), ("c2c (relative)", v["c2c"], "magma")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, (title, data, cmap) in zip(axes.flat, panels, strict=False):
        finite = data[np.isfinite(data)]
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0, 1))
        im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("column")
        ax.set_ylabel("row")
        fig.colorbar(im, ax=ax, shrink=0.8)
    ax = axes.flat[5]
    idx = v["family_index"].astype(int)
    names = ["linear", "power", "exp", "tabulated", "none"]
    from matplotlib.colors import ListedColormap
    cmap = ListedColormap([FAMILY_COLORS[n] for n in names])
    ax.imshow(np.where(idx < 0, 4, idx), cmap=cmap, vmin=-0.5, vmax=4.5,
              interpolation="nearest")
    ax.set_title("selected family")
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=FAMILY_COLORS[n], label=n) for n in names],
              loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.suptitle(f"tile {tc.name}: per-device maps ({tc.shape[0]}×{tc.shape[1]})")
    fig.tight_layout()
    path = out / f"{tc.name}_maps.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_histograms(tc: TileCalibration, out: Path) -> Path:
    """Histograms of the per-device parameters and the goodness of fit."""
    v = tc.values
    panels = [("dw_min", v["dw_min"]), ("tau_min", v["tau_min"]), ("tau_max", v["tau_max"]),
              ("gamma", v["gamma"]), ("asym", v["asym"]),
              ("symmetric point", v["symmetric_point"]), ("c2c (relative)", v["c2c"]),
              ("R² of the fitted q±", v["r2"])]
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    for ax, (title, data) in zip(axes.flat, panels, strict=True):
        finite = data[np.isfinite(data)].ravel()
        if finite.size:
            lo, hi = np.percentile(finite, [0.5, 99.5])
            ax.hist(np.clip(finite, lo, hi), bins=40, color="tab:blue", alpha=0.8)
            ax.axvline(np.median(finite), color="k", ls="--", lw=1,
                       label=f"median {np.median(finite):.4g}")
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("devices")
        ax.grid(alpha=0.3)
    fig.suptitle(f"tile {tc.name}: distributions over {int(np.isfinite(v['dw_min']).sum())} "
                 "fitted devices")
    fig.tight_layout()
    path = out / f"{tc.name}_histograms.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(cal: Calibration, out: Path, n_devices: int = 6) -> list[Path]:
    """All PNGs for every tile of a calibration; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for tc in cal.tiles.values():
        paths.append(plot_steps(tc, out, n_devices))
        if tc.shape[0] * tc.shape[1] > 1:
            paths.append(plot_maps(tc, out))
        paths.append(plot_histograms(tc, out))
    return paths
