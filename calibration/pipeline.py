"""From a measurement file (or a CSV) to tile calibrations: the steps behind ``hil fit``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration.calibfile import TileCalibration, tile_calibration
from calibration.csvimport import load_csv_traces
from calibration.fit import fit_traces
from calibration.measfile import Measurement, load_measurement
from calibration.protocols import settled_value
from hil.errors import ConfigError


def fit_measurement(meas: Measurement, **fit_kw: object) -> list[TileCalibration]:
    """Fit the sweep of every tile; add the measured read noise and searched symmetric point."""
    out = []
    for name, protos in meas.tiles.items():
        if "sweep" not in protos:
            raise ConfigError(str(meas.path), f"tiles/{name}/sweep", "no sweep was measured")
        states, pulses = protos["sweep"]
        rows, cols = states.shape[1:]
        if states.shape[0] < 3:
            raise ConfigError(str(meas.path), f"tiles/{name}/sweep", "the trace has no steps")
        try:
            res = fit_traces(states.reshape(states.shape[0], -1).astype(np.float64), pulses,
                             **fit_kw)
        except ConfigError as exc:
            raise ConfigError(str(meas.path), f"tiles/{name}/sweep", str(exc)) from None
        extra = {}
        if "read_noise" in protos and protos["read_noise"][0].shape[0] >= 2:
            extra["read_noise_measured"] = np.nanstd(protos["read_noise"][0], axis=0, ddof=1)
        if "sympoint" in protos and protos["sympoint"][0].shape[0] >= 4:
            extra["symmetric_point_searched"] = settled_value(protos["sympoint"][0])
        out.append(tile_calibration(name, (rows, cols), res, extra))
    return out


def fit_file(path: Path, allow_partial: bool = False,
             **fit_kw: object) -> tuple[list[TileCalibration], dict[str, object]]:
    """Fit a measurement file; returns the tiles and the provenance to store. A partial
    measurement (a run that stopped before its end) is refused unless ``allow_partial``."""
    meas = load_measurement(path)
    if not meas.attrs.get("complete", False) and not allow_partial:
        raise ConfigError(str(path), "complete", "a partial measurement (the run stopped "
                          "before its end); fit it anyway with --allow-partial")
    prov = {"source": str(path), "source_kind": "measurement",
            "backend_url": meas.attrs.get("backend_url"), "protocol": meas.protocol,
            "measurement_complete": bool(meas.attrs.get("complete", False)),
            "measurement_package_version": meas.attrs.get("package_version"),
            "fit": {k: v for k, v in fit_kw.items()}}
    return fit_measurement(meas, **fit_kw), prov


CSV_DEFAULTS = {"bins": 8, "window": 32}


def fit_csv(path: Path, tile: str = "csv", **fit_kw: object) -> tuple[list[TileCalibration],
                                                                       dict[str, object]]:
    """Fit a published pulse-response CSV as a 1x1 tile.

    One long, noisy trace: fewer state bins and a longer window of reads to locate each
    step than for array sweeps (``CSV_DEFAULTS``), unless given.
    """
    fit_kw = {**CSV_DEFAULTS, **fit_kw}
    states, directions = load_csv_traces(path)
    try:
        res = fit_traces(states, directions, **fit_kw)
    except ConfigError as exc:
        raise ConfigError(str(path), "data", str(exc)) from None
    prov = {"source": str(path), "source_kind": "csv", "fit": dict(fit_kw)}
    return [tile_calibration(tile, (1, 1), res)], prov
