"""Measurement and calibration files, crash safety, and bad input through the CLI (exit 2)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from calibration.calibfile import load_calibration, write_calibration
from calibration.fit import torch_threads
from calibration.measfile import MeasurementWriter, load_measurement, partial_path
from calibration.pipeline import fit_file
from calibration.protocols import SweepProtocol, characterize
from hil.backend import open_backend
from hil.cli import main
from hil.errors import BackendError, ConfigError

URL = "sim://?model=power&gamma=2&dw_min=0.02&d2d=0.2&c2c=0.05&seed=4"


@torch_threads(1)
def measure(path: Path, rows: int = 4, cols: int = 4, pulses: int = 100) -> SweepProtocol:
    proto = SweepProtocol(pulses=pulses, cycles=1, block=40, sympoint_pairs=40, noise_reads=5)
    with open_backend(URL) as be, MeasurementWriter(path, URL, proto.as_dict()) as w:
        characterize(be, w, {"t": (rows, cols)}, proto)
    return proto


def test_measurement_file_round_trip_and_fit(tmp_path):
    path = tmp_path / "m.h5"
    proto = measure(path)
    m = load_measurement(path)
    assert m.attrs["backend_url"] == URL and m.attrs["complete"]
    assert m.protocol == proto.as_dict() and m.attrs["package_version"]
    states, pulses = m.tiles["t"]["sweep"]
    assert states.shape == (2 * proto.pulses + 1, 4, 4) and pulses.shape == (2 * proto.pulses,)
    assert set(m.tiles["t"]) == {"sweep", "sympoint", "read_noise"}
    with h5py.File(path) as f:
        ds = f["tiles/t/sweep/states"]
        assert ds.chunks is not None and ds.maxshape[0] is None
    tiles, prov = fit_file(path)
    write_calibration(tmp_path / "c.h5", tiles, prov)
    cal = load_calibration(tmp_path / "c.h5")
    tc = cal.tiles["t"]
    assert tc.shape == (4, 4)
    assert np.isfinite(tc.values["dw_min"]).all()
    assert "symmetric_point_searched" in tc.values and "read_noise_measured" in tc.values
    np.testing.assert_allclose(tc.values["G_ref"], tc.values["symmetric_point"])
    # the searched symmetric point agrees with the fitted one
    err = np.abs(tc.values["symmetric_point_searched"] - tc.values["symmetric_point"])
    assert np.median(err / (tc.values["tau_max"] - tc.values["tau_min"])) < 0.03


class Crash(Exception):
    pass


def test_crash_keeps_completed_blocks_readable(tmp_path, monkeypatch):
    path = tmp_path / "m.h5"
    proto = SweepProtocol(pulses=100, cycles=1, block=40, sympoint_pairs=0, noise_reads=0)
    with open_backend(URL) as be:
        tile = be.allocate("t", 4, 4)
        calls = {"n": 0}
        original = type(tile)._pulse

        def failing(self, n):
            calls["n"] += 1
            if calls["n"] > 130:
                raise Crash("instrument lost")
            original(self, n)

        monkeypatch.setattr(type(tile), "_pulse", failing)
        with pytest.raises(Crash), MeasurementWriter(path, URL, proto.as_dict()) as w:
            characterize(be, w, {"t": (4, 4)}, proto)
    assert not path.exists()  # only a complete measurement is renamed into place
    m = load_measurement(partial_path(path))
    assert not m.attrs["complete"]
    states, pulses = m.tiles["t"]["sweep"]
    assert states.shape[0] == 120  # three blocks of 40 reads; the block in flight is lost
    assert np.isfinite(states).all() and pulses.shape == (119,)


def test_truncated_hdf5_is_a_config_error(tmp_path):
    path = tmp_path / "m.h5"
    measure(path)
    data = path.read_bytes()
    bad = tmp_path / "bad.h5"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ConfigError, match="bad.h5"):
        load_measurement(bad)


def cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code


@pytest.mark.parametrize("content, field", [
    ("0.1,0.2\n0.3,abc\n", "row 2, column 2"),
    ("0.1,0.2\n0.3\n", "ragged"),
    ("0.5,0.5\n0.5,0.5\n0.5,0.5\n", "no steps"),
])
def test_bad_csv_exits_2_and_writes_nothing(tmp_path, capsys, content, field):
    src = tmp_path / "in.csv"
    src.write_text(content)
    out = tmp_path / "calib.h5"
    assert cli(["fit", "--csv", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert field in err and "in.csv" in err
    assert list(tmp_path.iterdir()) == [src]


def test_truncated_measurement_exits_2_and_writes_nothing(tmp_path, capsys):
    good = tmp_path / "m.h5"
    measure(good)
    bad = tmp_path / "cut.h5"
    bad.write_bytes(good.read_bytes()[:2000])
    good.unlink()
    out = tmp_path / "calib.h5"
    assert cli(["fit", str(bad), "--out", str(out)]) == 2
    assert "cut.h5" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.h5"]


def test_twin_tile_matching_rule(tmp_path):
    path = tmp_path / "m.h5"
    measure(path)
    tiles, prov = fit_file(path)
    write_calibration(tmp_path / "c.h5", tiles, prov)
    with open_backend(f"twin://{tmp_path / 'c.h5'}?seed=2&c2c=0&read_noise=0") as tw:
        a = tw.allocate("other", 4, 4)  # no such name: the first tile of that shape
        np.testing.assert_allclose(a.read().numpy(),
                                   np.clip(tiles[0].values["symmetric_point"],
                                           tiles[0].values["tau_min"],
                                           tiles[0].values["tau_max"]), rtol=1e-5, atol=1e-6)
        with pytest.raises(BackendError, match="no unused calibration tile"):
            tw.allocate("again", 4, 4)
        with pytest.raises(BackendError):
            tw.allocate("x", 3, 3)
        a.pulse(torch.ones(4, 4, dtype=torch.int32))
        assert (a.read() > a.devices.w0).all()
    with pytest.raises(Exception, match="unknown parameter"):
        open_backend(f"twin://{tmp_path / 'c.h5'}?bogus=1")
