"""The HDF5 measurement file: per tile and protocol, reads appended block by block.

Layout: ``/tiles/<tile>/<protocol>/states`` float32 [T, rows, cols] (chunked, resizable,
NaN fill so a row never written reads as NaN) and ``.../pulses`` int32 [T - 1] (signed
pulses applied between consecutive reads). Root attributes: backend URL, package
version, protocol parameters (JSON), ``complete``. Flushed after every block.

The file is written as ``NAME.partial.h5`` beside its final path and renamed into place
only when the measurement is complete: an existing measurement is never overwritten by
a run that does not finish, and a stopped or crashed run leaves its blocks readable in the
partial file (``complete`` false; fitting it needs ``--allow-partial``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import h5py
import numpy as np

from hil.errors import ConfigError

PROTOCOLS = ("sweep", "sympoint", "read_noise")


def package_version() -> str:
    try:
        return version("analog-hil")
    except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        return "unknown"


def partial_path(path: Path) -> Path:
    """Where a measurement is written until it is complete."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix or '.h5'}")


class MeasurementWriter:
    """Appends read blocks to a measurement file; a crash loses at most the block in flight.
    Written to :func:`partial_path` and renamed to ``path`` when closed complete."""

    def __init__(self, path: Path, backend_url: str, protocol: dict[str, object]):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.file = h5py.File(self.partial, "w")
        self.file.attrs.update({
            "kind": "analog-hil measurement", "backend_url": backend_url,
            "package_version": package_version(), "protocol": json.dumps(protocol),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "complete": False,
        })
        self.file.flush()

    def _datasets(self, tile: str, protocol: str, shape: tuple[int, int]) -> tuple[h5py.Dataset,
                                                                                   h5py.Dataset]:
        grp = self.file.require_group(f"tiles/{tile}/{protocol}")
        grp.parent.attrs.update({"rows": shape[0], "cols": shape[1]})
        if "states" not in grp:
            chunk_t = max(1, min(256, (1 << 20) // max(1, shape[0] * shape[1])))
            grp.create_dataset("states", shape=(0, *shape), maxshape=(None, *shape),
                               dtype="f4", chunks=(chunk_t, *shape), fillvalue=np.nan)
            grp.create_dataset("pulses", shape=(0,), maxshape=(None,), dtype="i4",
                               chunks=(4096,))
        return grp["states"], grp["pulses"]

    def append(self, tile: str, protocol: str, states: np.ndarray, pulses: np.ndarray) -> None:
        """Append reads [B, rows, cols] and the signed pulses before each of them [B].

        The very first read of a protocol has no pulse before it; pass a leading 0.
        """
        st, pu = self._datasets(tile, protocol, tuple(states.shape[1:]))
        t0 = st.shape[0]
        first = 1 if t0 == 0 else 0
        st.resize(t0 + states.shape[0], axis=0)
        st[t0:] = states.astype(np.float32)
        p = np.asarray(pulses, dtype=np.int32)[first:]
        p0 = pu.shape[0]
        pu.resize(p0 + p.shape[0], axis=0)
        pu[p0:] = p
        self.file.flush()

    def close(self, complete: bool = True) -> None:
        if self.file.id.valid:
            self.file.attrs["complete"] = bool(complete)
            self.file.close()
            if complete:
                os.replace(self.partial, self.path)

    def __enter__(self) -> MeasurementWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(complete=exc_type is None)


@dataclass
class Measurement:
    """Everything read back from a measurement file."""

    path: Path
    attrs: dict[str, object]
    protocol: dict[str, object]
    tiles: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def shape(self, tile: str) -> tuple[int, int]:
        st, _ = next(iter(self.tiles[tile].values()))
        return int(st.shape[1]), int(st.shape[2])


def open_hdf5(path: Path) -> h5py.File:
    """Open an HDF5 file for reading; missing or unreadable (truncated) is one ConfigError."""
    if not path.is_file():
        raise ConfigError(str(path), "file", "no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ConfigError(str(path), "file",
                          f"not a readable HDF5 file (truncated or corrupt?): {exc}") from None


def _check_datasets(path: Path, where: str, states: np.ndarray, pulses: np.ndarray) -> None:
    """states: float [T, rows, cols]; pulses: integer [T - 1] (or fewer, cut short)."""
    if states.dtype.kind != "f" or states.ndim != 3 or 0 in states.shape[1:]:
        raise ConfigError(str(path), f"{where}/states",
                          f"must be a float array (reads, rows, cols), got {states.dtype} "
                          f"{tuple(states.shape)}")
    if np.isinf(states).any():  # NaN marks a read never written; inf is no reading
        t, r, c = np.argwhere(np.isinf(states))[0]
        raise ConfigError(str(path), f"{where}/states",
                          f"infinite value at read {t}, device ({r}, {c})")
    if pulses.dtype.kind not in "iu" or pulses.ndim != 1:
        raise ConfigError(str(path), f"{where}/pulses",
                          f"must be an integer array (reads - 1,), got {pulses.dtype} "
                          f"{tuple(pulses.shape)}")


def load_measurement(path: Path) -> Measurement:
    """Read a measurement file; a truncated or foreign file is one ConfigError."""
    path = Path(path)
    with open_hdf5(path) as f:
        if f.attrs.get("kind") != "analog-hil measurement" or "tiles" not in f:
            raise ConfigError(str(path), "kind", "not an analog-hil measurement file")
        try:
            protocol = json.loads(f.attrs.get("protocol", "{}"))
        except json.JSONDecodeError:
            raise ConfigError(str(path), "protocol", "attribute is not valid JSON") from None
        m = Measurement(path=path, attrs=dict(f.attrs), protocol=protocol)
        for name, grp in f["tiles"].items():
            m.tiles[name] = {}
            if not isinstance(grp, h5py.Group):
                raise ConfigError(str(path), f"tiles/{name}", "must be a group of protocols")
            for proto, g in grp.items():
                if not isinstance(g, h5py.Group):
                    raise ConfigError(str(path), f"tiles/{name}/{proto}",
                                      "must be a group with states and pulses")
                try:
                    st, pu = g["states"][()], g["pulses"][()]
                except (KeyError, OSError) as exc:
                    raise ConfigError(str(path), f"tiles/{name}/{proto}",
                                      f"unreadable dataset: {exc}") from None
                _check_datasets(path, f"tiles/{name}/{proto}", st, pu)
                n = min(st.shape[0], pu.shape[0] + 1)  # a block cut short: keep what pairs up
                m.tiles[name][proto] = (st[:n], pu[: max(n - 1, 0)])
            shapes = {st.shape[1:] for st, _ in m.tiles[name].values()}
            if len(shapes) > 1:
                raise ConfigError(str(path), f"tiles/{name}",
                                  f"protocols disagree on the tile shape: {sorted(shapes)}")
    if not m.tiles:
        raise ConfigError(str(path), "tiles", "the file holds no tile")
    return m
