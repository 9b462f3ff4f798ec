"""The HDF5 run file (per-epoch metrics, config and version as attributes) and curve plots.

Metrics are chunked, resizable 1-d datasets under ``metrics/``, one row per epoch,
flushed after every epoch; a resumed run truncates rows past its checkpoint first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from hil import __version__


class RunFile:
    """Append-only per-epoch metrics of one run in ``path`` (created on first use).

    The file is opened only while a row is written, so other readers can open it
    between epochs. Each segment of a run (the first start and every resume) is recorded
    in the ``sessions`` attribute with its first row and its config; ``config`` is the
    latest segment's. ``fresh``: a new run replaces a file left without a checkpoint.
    """

    def __init__(self, path: Path, config: dict, keep_rows: int = 0, fresh: bool = False):
        self.path = Path(path)
        if fresh:
            self.path.unlink(missing_ok=True)
        with h5py.File(self.path, "a") as h5:
            h5.attrs["hil_version"] = __version__
            h5.attrs["config"] = json.dumps(config, sort_keys=True)
            sessions = json.loads(h5.attrs.get("sessions", "[]"))
            sessions.append({"start_row": keep_rows, "config": config})
            h5.attrs["sessions"] = json.dumps(sessions)
            metrics = h5.require_group("metrics")
            for ds in metrics.values():
                if ds.shape[0] > keep_rows:
                    ds.resize((keep_rows,))

    def append(self, row: dict[str, float]) -> None:
        """Append one epoch's metrics (the file is flushed and closed after each row)."""
        with h5py.File(self.path, "a") as h5:
            metrics = h5["metrics"]
            for key, value in row.items():
                if key not in metrics:
                    metrics.create_dataset(key, shape=(0,), maxshape=(None,), chunks=(256,),
                                           dtype="f8")
                ds = metrics[key]
                ds.resize((ds.shape[0] + 1,))
                ds[-1] = float(value)

    def read(self) -> dict[str, np.ndarray]:
        return read_metrics(self.path)

    def close(self) -> None:
        """Nothing stays open between rows; kept for symmetry with the caller."""


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """The metrics of a run file as numpy arrays."""
    with h5py.File(path, "r") as h5:
        return {k: np.asarray(v[()]) for k, v in h5["metrics"].items()}


def plot_curves(metrics: dict[str, np.ndarray], path: Path, title: str) -> None:
    """Training loss, test loss and test accuracy per epoch as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = metrics.get("epoch", np.arange(1, len(metrics.get("train_loss", [])) + 1))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in ("train_loss", "test_loss"):
        if key in metrics:
            ax1.plot(epochs, metrics[key], marker="o", label=key.replace("_", " "))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    if "test_acc" in metrics:
        ax2.plot(epochs, 100 * metrics["test_acc"], marker="o", color="C2")
        ax2.set_ylabel("test accuracy (%)")
    ax2.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
