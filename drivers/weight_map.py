"""Conductance-to-weight maps read from a calibration file: w = (G - G_ref) * scale per tile."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from hil.errors import ConfigError

GROUP = "weight_map"  # /weight_map/<tile>/G_ref (scalar or [rows, cols]), /weight_map/<tile>/scale


@dataclass(frozen=True)
class TileMap:
    """The linear map of one tile: reference conductance (per device or scalar) and scale."""

    g_ref: np.ndarray  # float64, shape () or (rows, cols)
    scale: float  # weight units per conductance unit (nonzero; negative flips polarity)

    def to_weight(self, g: np.ndarray) -> np.ndarray:
        return ((g.astype(np.float64) - self.g_ref) * self.scale).astype(np.float32)


class WeightMap:
    """All tiles' maps of one calibration file (missing tiles are an error, never identity)."""

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
                    raise ConfigError(path, GROUP, "calibration file has no weight map group")
                for name, grp in f[GROUP].items():
                    for key in ("G_ref", "scale"):
                        if key not in grp:
                            raise ConfigError(path, f"{GROUP}/{name}/{key}", "missing dataset")
                    g_ref = np.asarray(grp["G_ref"][()], dtype=np.float64)
                    scale = np.asarray(grp["scale"][()], dtype=np.float64)
                    if scale.shape != () or not np.isfinite(scale) or scale == 0:
                        raise ConfigError(path, f"{GROUP}/{name}/scale",
                                          "must be one finite nonzero number")
                    if g_ref.ndim not in (0, 2) or not np.isfinite(g_ref).all():
                        raise ConfigError(path, f"{GROUP}/{name}/G_ref",
                                          "must be a finite scalar or a [rows, cols] array")
                    tiles[name] = TileMap(g_ref, float(scale))
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
    """Write a minimal weight-map file (tests and tools); temp file then rename."""
    tmp = Path(path).with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        grp = f.create_group(GROUP)
        for name, (g_ref, scale) in tiles.items():
            t = grp.create_group(name)
            t["G_ref"] = np.asarray(g_ref, dtype=np.float64)
            t["scale"] = float(scale)
    tmp.replace(path)
