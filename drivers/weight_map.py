"""Conductance-to-weight maps read from a calibration file (calibration/calibfile.py layout):
per tile ``/tiles/<tile>/G_ref`` (dataset, [rows, cols] or scalar) and the attribute
``/tiles/<tile>.weight_scale``; the map is w = (G - G_ref) / weight_scale."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from hil.errors import ConfigError

GROUP = "tiles"


@dataclass(frozen=True)
class TileMap:
    """The linear map of one tile: reference conductance (per device or scalar) and scale."""

    g_ref: np.ndarray  # float64, shape () or (rows, cols)
    weight_scale: float  # conductance units per weight unit (nonzero; negative flips polarity)

    @property
    def scale(self) -> float:
        """Weight units per conductance unit."""
        return 1.0 / self.weight_scale

    def to_weight(self, g: np.ndarray) -> np.ndarray:
        return ((g.astype(np.float64) - self.g_ref) / self.weight_scale).astype(np.float32)


class WeightMap:
    """All tiles' maps of one calibration file (a missing tile is an error, never identity)."""

    def __init__(self, path: str, tiles: dict[str, TileMap]):
        self.path = path
        self.tiles = tiles

    @classmethod
    def load(cls, path: str) -> WeightMap:
        if not Path(path).is_file():
            raise ConfigError(path, "calib", "no such calibration file")
        tiles: dict[str, TileMap] = {}
        try:
            with h5py.File(path, "r") as f:
                if GROUP not in f:
                    raise ConfigError(path, GROUP, "calibration file has no tiles group")
                for name, grp in f[GROUP].items():
                    if "G_ref" not in grp:
                        raise ConfigError(path, f"{GROUP}/{name}/G_ref", "missing dataset")
                    if "weight_scale" not in grp.attrs:
                        raise ConfigError(path, f"{GROUP}/{name}.weight_scale",
                                          "missing attribute")
                    g_ref = np.asarray(grp["G_ref"][()], dtype=np.float64)
                    scale = float(np.asarray(grp.attrs["weight_scale"], dtype=np.float64))
                    if not np.isfinite(scale) or scale == 0:
                        raise ConfigError(path, f"{GROUP}/{name}.weight_scale",
                                          "must be one finite nonzero number")
                    if g_ref.ndim not in (0, 2) or not np.isfinite(g_ref).all():
                        raise ConfigError(path, f"{GROUP}/{name}/G_ref",
                                          "must be a finite scalar or a [rows, cols] array")
                    tiles[name] = TileMap(g_ref, scale)
        except OSError as exc:
            raise ConfigError(path, "calib", f"not a readable HDF5 file ({exc})") from None
        return cls(path, tiles)

    def for_tile(self, name: str, shape: tuple[int, int]) -> TileMap:
        if name not in self.tiles:
            raise ConfigError(self.path, f"{GROUP}/{name}", "no weight map for this tile")
        tm = self.tiles[name]
        if tm.g_ref.ndim == 2 and tm.g_ref.shape != shape:
            raise ConfigError(self.path, f"{GROUP}/{name}/G_ref",
                              f"shape {tm.g_ref.shape} does not match the tile {shape}")
        return tm


def write_weight_map(path: str, tiles: dict[str, tuple[np.ndarray | float, float]]) -> None:
    """Write just the weight-map part of a calibration file, {tile: (G_ref, weight_scale)}
    (tests and tools); temp file, then rename."""
    tmp = Path(path).with_suffix(".part")
    with h5py.File(tmp, "w") as f:
        for name, (g_ref, weight_scale) in tiles.items():
            grp = f.create_group(f"{GROUP}/{name}")
            grp["G_ref"] = np.asarray(g_ref, dtype=np.float64)
            grp.attrs["weight_scale"] = float(weight_scale)
    tmp.replace(path)
