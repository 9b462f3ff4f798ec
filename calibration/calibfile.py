"""The HDF5 calibration file: per-device parameters and maps, the weight map, provenance.

Layout per tile ``/tiles/<tile>`` (attrs rows, cols, weight_scale): datasets [rows, cols]
``family_index`` (index into FAMILIES, -1: no steps), dw_min, tau_min, tau_max, gamma,
asym, symmetric_point, c2c, read_noise, r2, r2_const, chi2_red, n_steps, G_ref;
``families/<family>/<param>`` for every fitted family (tabulated: w_grid, qp, qm
[rows, cols, G]); ``bins/x, y, n, var`` [rows, cols, 2, K] for reports. The drivers'
conductance-to-weight map is w = (G - G_ref) / weight_scale, G_ref the symmetric point.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from calibration.fit import FAMILIES, FitResult
from calibration.measfile import open_hdf5, package_version
from hil.errors import ConfigError
from hil.response import (
    ExpResponse,
    LinearResponse,
    MixedResponse,
    PowerResponse,
    Response,
    TabulatedResponse,
)

PER_DEVICE = ("dw_min", "tau_min", "tau_max", "gamma", "asym", "symmetric_point", "c2c",
              "read_noise", "r2", "r2_const", "chi2_red", "n_steps")
KIND = "analog-hil calibration"


@dataclass
class TileCalibration:
    """One tile's calibration, arrays shaped [rows, cols] (tables [rows, cols, G])."""

    name: str
    shape: tuple[int, int]
    values: dict[str, np.ndarray]
    families: dict[str, dict[str, np.ndarray]]
    bins: dict[str, np.ndarray] = field(default_factory=dict)
    weight_scale: float = 1.0

    @property
    def model(self) -> np.ndarray:
        names = np.array([*FAMILIES, "none"], dtype=object)
        return names[self.values["family_index"].astype(int)]

    def response(self, dtype: torch.dtype = torch.float32) -> Response:
        """The fitted q+- of every device as one MixedResponse (devices without steps: linear)."""
        idx = self.values["family_index"].astype(np.int64)
        ok = idx >= 0

        def t(a: np.ndarray, fill: float) -> torch.Tensor:
            return torch.as_tensor(np.where(ok if a.ndim == 2 else ok[..., None], a, fill),
                                   dtype=dtype)

        members: list[Response] = []
        classes = {"linear": LinearResponse, "power": PowerResponse, "exp": ExpResponse}
        for fam, cls in classes.items():
            p = self.families.get(fam)
            if p is None:
                members.append(LinearResponse(t(np.full(self.shape, -1.0), -1.0),
                                              t(np.full(self.shape, 1.0), 1.0)))
                continue
            lo, hi = t(p["tau_min"], -1.0), t(p["tau_max"], 1.0)
            hi = torch.maximum(hi, lo + 1e-6 * (lo.abs() + 1))
            members.append(cls(tau_min=lo, tau_max=hi, gamma=t(p["gamma"], 1.0),
                               asym=t(p["asym"], 0.0).clamp(-0.999, 0.999)))
        tab = self.families["tabulated"]
        members.append(TabulatedResponse(
            t(tab["w_grid"], 0.0), t(tab["qp"], 0.0), t(tab["qm"], 0.0),
            tau_min=t(self.values["tau_min"], -1.0), tau_max=t(self.values["tau_max"], 1.0)))
        return MixedResponse(members, torch.as_tensor(np.where(ok, idx, 0)))


@dataclass
class Calibration:
    """A calibration file read back: provenance attributes and the tiles in file order."""

    path: Path
    attrs: dict[str, object]
    tiles: dict[str, TileCalibration]


def tile_calibration(name: str, shape: tuple[int, int], res: FitResult,
                     extra: dict[str, np.ndarray] | None = None,
                     weight_scale: float | None = None) -> TileCalibration:
    """Reshape a fit of rows*cols devices into a tile's calibration."""
    rows, cols = shape
    values = {k: np.asarray(getattr(res, k)).reshape(rows, cols) for k in PER_DEVICE}
    values["family_index"] = res.family_index.reshape(rows, cols).astype(np.int8)
    for k, v in (extra or {}).items():
        values[k] = np.asarray(v, dtype=np.float64).reshape(rows, cols)
    values["G_ref"] = values["symmetric_point"].copy()
    families = {f: {k: np.asarray(v).reshape(rows, cols, *np.asarray(v).shape[1:])
                    for k, v in p.items()} for f, p in res.params.items()}
    bins = {k: v.reshape(rows, cols, *v.shape[1:]) for k, v in res.bins.items()}
    if weight_scale is None:  # half the median range: weights span about [-1, 1]
        half = 0.5 * (values["tau_max"] - values["tau_min"])
        weight_scale = float(np.nanmedian(half)) if np.isfinite(half).any() else 1.0
    return TileCalibration(name=name, shape=(rows, cols), values=values, families=families,
                           bins=bins, weight_scale=weight_scale)


def write_calibration(path: Path, tiles: list[TileCalibration],
                      provenance: dict[str, object]) -> None:
    """Write atomically (temp file, then rename): a failure leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".h5.part", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"kind": KIND, "package_version": package_version(),
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "provenance": json.dumps(provenance, default=str),
                            "tile_order": json.dumps([t.name for t in tiles])})
            for tc in tiles:
                g = f.create_group(f"tiles/{tc.name}")
                g.attrs.update({"rows": tc.shape[0], "cols": tc.shape[1],
                                "weight_scale": tc.weight_scale,
                                "weight_map": "w = (G - G_ref) / weight_scale"})
                for k, v in tc.values.items():
                    g.create_dataset(k, data=v)
                for fam, p in tc.families.items():
                    for k, v in p.items():
                        g.create_dataset(f"families/{fam}/{k}", data=v)
                for k, v in tc.bins.items():
                    g.create_dataset(f"bins/{k}", data=v, compression="gzip")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_tile(path: str, where: str, shape: tuple[int, int], values: dict[str, np.ndarray],
                fams: dict[str, dict[str, np.ndarray]], scale: float) -> None:
    """The values a twin, zero-shifting, a report and the drivers rely on: every per-device
    map [rows, cols], family_index an integer index into FAMILIES (or -1), and for every
    fitted device a finite positive dw_min and finite bounds tau_min < tau_max."""
    if min(shape) < 1:
        raise ConfigError(path, f"{where}.rows/cols", f"bad tile shape {shape}")
    if not np.isfinite(scale) or scale == 0:
        raise ConfigError(path, f"{where}.weight_scale", "must be one finite nonzero number")
    for key in (*PER_DEVICE, "family_index"):
        v = np.asarray(values[key])
        if v.shape != shape or v.dtype.kind not in "iuf":
            raise ConfigError(path, f"{where}/{key}", f"must be a numeric array of the tile's "
                              f"shape {shape}, got {v.dtype} {tuple(v.shape)}")
    g_ref = np.asarray(values["G_ref"])
    if g_ref.shape not in ((), shape) or g_ref.dtype.kind not in "iuf" \
            or not np.isfinite(g_ref).all():
        raise ConfigError(path, f"{where}/G_ref", "must be a finite scalar or a finite array "
                          f"of the tile's shape {shape}")
    idx = values["family_index"]
    if idx.dtype.kind not in "iu":
        raise ConfigError(path, f"{where}/family_index", f"must be integers, got {idx.dtype}")
    bad = (idx < -1) | (idx >= len(FAMILIES))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ConfigError(path, f"{where}/family_index",
                          f"{int(idx[r, c])} at device ({r}, {c}) is not -1 (no steps) or an "
                          f"index into the {len(FAMILIES)} families {', '.join(FAMILIES)}")
    fitted = idx >= 0
    with np.errstate(invalid="ignore"):
        checks = (("dw_min", values["dw_min"] > 0, "a finite positive step"),
                  ("tau_min", np.isfinite(values["tau_min"]), "finite"),
                  ("tau_max", values["tau_max"] > values["tau_min"], "finite and > tau_min"))
    for key, ok, want in checks:
        broken = fitted & ~(ok & np.isfinite(values[key]))
        if broken.any():
            r, c = np.argwhere(broken)[0]
            raise ConfigError(path, f"{where}/{key}",
                              f"{float(values[key][r, c])} at fitted device ({r}, {c}) must be "
                              f"{want}")
    for fam, p in fams.items():
        for key, v in p.items():
            if np.asarray(v).shape[:2] != shape:
                raise ConfigError(path, f"{where}/families/{fam}/{key}",
                                  f"leading shape {tuple(np.asarray(v).shape[:2])} is not the "
                                  f"tile's {shape}")


def load_calibration(path: Path | str) -> Calibration:
    """Read a calibration file; anything missing or unreadable is one ConfigError."""
    path = Path(path)
    with open_hdf5(path) as f:
        if f.attrs.get("kind") != KIND:
            raise ConfigError(str(path), "kind", "not an analog-hil calibration file")
        try:
            order = json.loads(f.attrs.get("tile_order", "[]"))
        except (TypeError, ValueError):
            order = None
        if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
            raise ConfigError(str(path), "tile_order", "must be a JSON list of tile names")
        cal = Calibration(path=path, attrs=dict(f.attrs), tiles={})
        for name in order:
            where = f"tiles/{name}"
            try:
                g = f[where]
                shape = (int(g.attrs["rows"]), int(g.attrs["cols"]))
                values = {k: g[k][()] for k in [*PER_DEVICE, "family_index", "G_ref"]}
                values.update({k: g[k][()] for k in g if isinstance(g[k], h5py.Dataset)})
                fams = {fam: {k: d[()] for k, d in grp.items()}
                        for fam, grp in g["families"].items()}
                bins = {k: d[()] for k, d in g["bins"].items()} if "bins" in g else {}
                scale = float(g.attrs["weight_scale"])
            except (KeyError, OSError, TypeError, ValueError, AttributeError) as exc:
                raise ConfigError(str(path), where, f"missing or unreadable: {exc}") from None
            if "tabulated" not in fams:
                raise ConfigError(str(path), f"{where}/families", "no tabulated family")
            _check_tile(str(path), where, shape, values, fams, scale)
            cal.tiles[name] = TileCalibration(name, shape, values, fams, bins, scale)
    if not cal.tiles:
        raise ConfigError(str(path), "tiles", "the file holds no tile")
    return cal
