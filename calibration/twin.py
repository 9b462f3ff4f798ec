"""``twin://PATH``: the emulator built from a calibration file, device by device.

Each allocated tile takes a calibration tile: the one of the same name (its shape must
match), else the first not yet used calibration tile of the same shape (file order);
otherwise allocation fails. Devices use their fitted q+-, dw_min, bounds and c2c; devices
whose trace had no steps are stuck. URL parameters: ``seed`` (noise stream),
``c2c`` (override the fitted relative c2c for all devices), ``read_noise`` (std, weight
units; default the median fitted read noise), ``init`` ('sympoint' or a number: the
devices' initial state), ``device`` (cpu / cuda).
"""

from __future__ import annotations

import numpy as np
import torch

from calibration.calibfile import Calibration, TileCalibration, load_calibration
from hil.errors import BackendError, BackendURLError
from hil.url import BackendURL
from sim_backend import DeviceArray, SimBackend, SimConfig


def devices_from_calibration(tc: TileCalibration, c2c: float | None = None,
                             init: float | None = None, device: str = "cpu") -> DeviceArray:
    """A DeviceArray whose devices are the fitted devices of one calibration tile."""
    v = tc.values
    ok = v["family_index"] >= 0
    response = tc.response(torch.float32).to(device)

    def t(a: np.ndarray, fill: float) -> torch.Tensor:
        return torch.as_tensor(np.where(ok & np.isfinite(a), a, fill), dtype=torch.float32,
                               device=device)

    noise = t(v["c2c"], 0.0) if c2c is None else float(c2c)
    sym = t(v["symmetric_point"], 0.0)
    w0 = sym if init is None else torch.full_like(sym, float(init))
    w0 = torch.minimum(torch.maximum(w0, response.tau_min.float()), response.tau_max.float())
    stuck = torch.as_tensor(~ok, device=device)
    return DeviceArray(response=response, dw_min=t(v["dw_min"], 0.0),
                       stuck=stuck if bool(stuck.any()) else None, c2c=noise, w0=w0)


class TileMatcher:
    """Maps allocated tile names to calibration tiles (by name, else by shape in file order)."""

    def __init__(self, cal: Calibration):
        self.cal = cal
        self.used: set[str] = set()

    def match(self, name: str, rows: int, cols: int) -> TileCalibration:
        tiles = self.cal.tiles
        if name in tiles:
            tc = tiles[name]
            if tc.shape != (rows, cols):
                raise BackendError(f"calibration tile {name!r} is {tc.shape[0]}x{tc.shape[1]}, "
                                   f"asked for {rows}x{cols}", tile=name, op="allocate")
        else:
            free = [tc for n, tc in tiles.items() if n not in self.used
                    and tc.shape == (rows, cols)]
            if not free:
                raise BackendError(f"no unused calibration tile of shape {rows}x{cols} in "
                                   f"{self.cal.path}", tile=name, op="allocate")
            tc = free[0]
        self.used.add(tc.name)
        return tc


def open_twin(url: BackendURL) -> SimBackend:
    """Factory behind ``twin://PATH?seed=..&c2c=..&read_noise=..&init=..``."""
    if not url.location:
        raise BackendURLError(f"backend URL {url.url!r}: twin needs a calibration file path")
    cal = load_calibration(url.location)
    seed = url.get_int("seed", 0, lo=0)
    c2c = url.get_float("c2c", None, lo=0.0, hi=10.0)
    init_raw = url.get_str("init", "sympoint")
    try:
        init = None if init_raw == "sympoint" else float(init_raw)
    except ValueError:
        raise BackendURLError(f"backend URL {url.url!r}: init={init_raw!r} must be 'sympoint' "
                              "or a number") from None
    device = url.get_str("device", "cpu", choices=("cpu", "cuda"))
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendURLError(f"backend URL {url.url!r}: device=cuda but CUDA is not available")
    all_rn = np.concatenate([tc.values["read_noise"].ravel() for tc in cal.tiles.values()])
    all_dw = np.concatenate([tc.values["dw_min"].ravel() for tc in cal.tiles.values()])
    rn_default = float(np.nanmedian(all_rn)) if np.isfinite(all_rn).any() else 0.0
    read_noise = url.get_float("read_noise", rn_default, lo=0.0)
    dw_nominal = float(np.nanmedian(all_dw)) if np.isfinite(all_dw).any() else 1e-3
    config = SimConfig(dw_min=dw_nominal, read_noise=read_noise, seed=seed, device=device,
                       io=url.get_str("io", "ideal", choices=("paper", "ideal")))
    matcher = TileMatcher(cal)

    def population(name: str, rows: int, cols: int, gen: torch.Generator) -> DeviceArray:
        return devices_from_calibration(matcher.match(name, rows, cols), c2c, init, device)

    return SimBackend(url.url, config, population=population)
