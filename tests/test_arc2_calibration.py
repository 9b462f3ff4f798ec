"""Characterize -> fit -> zero-shift -> a short Residual Learning v2 run on an 8x8 tile
through the simulated ArC TWO (arc2://sim): the fitted parameters within the tolerances
the sim:// tests use, the zero-shift residual as on sim://, and RLv2 training as on sim://."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration.calibfile import load_calibration, write_calibration
from calibration.fit import torch_threads
from calibration.measfile import MeasurementWriter
from calibration.pipeline import fit_file
from calibration.protocols import SweepProtocol, characterize
from calibration.zeroshift import zero_shift
from drivers.arc2.backend import sim_url
from hil.algorithms import ResidualLearningV2
from hil.backend import open_backend

CHIP = "sim://?model=power&gamma=2&dw_min=0.02&d2d=0.3&c2c=0.1&seed=5"  # as the sim:// tests
ARC = sim_url(CHIP)


def rel(est: np.ndarray, true: np.ndarray) -> float:
    return float(np.median(np.abs(est - true) / np.abs(true)))


def rlv2_distance(url: str, steps: int = 100) -> tuple[float, float]:
    """Distance of W to a fixed target before and after a short seeded RLv2 run."""
    with open_backend(url) as be:
        alg = ResidualLearningV2(be, (8, 8), lr=0.1, transfer_lr=0.3, gamma=0.5, seed=3,
                                 prefix="fc1")
        target = torch.linspace(-0.3, 0.3, 64).reshape(8, 8)
        start = float((alg.read("W") - target).norm())
        for _ in range(steps):
            alg.step(alg.weight() - target)
        return start, float((alg.read("W") - target).norm())


@pytest.mark.slow
@torch_threads(1)
def test_calibration_pipeline_and_training_through_arc2_sim(tmp_path):
    proto = SweepProtocol(pulses=400, cycles=2, sympoint_pairs=0, noise_reads=0, block=200)
    with open_backend(ARC) as be, MeasurementWriter(tmp_path / "m.h5", ARC,
                                                    proto.as_dict()) as writer:
        characterize(be, writer, {"cal": (8, 8)}, proto)
        dev = be.instrument._tile.devices  # the simulated socket's devices
        tile = be.tile("cal")
        sl = (slice(tile.place.row, tile.place.row + 8), slice(tile.place.col, tile.place.col + 8))
        truth = {"dw_min": dev.dw_min[sl], "tau_min": dev.response.tau_min[sl],
                 "tau_max": dev.response.tau_max[sl]}
    tiles, prov = fit_file(tmp_path / "m.h5")
    write_calibration(tmp_path / "c.h5", tiles, prov)
    cal = load_calibration(tmp_path / "c.h5")
    v = cal.tiles["cal"].values
    errors = {k: rel(v[k].reshape(-1), t.reshape(-1).double().numpy()) for k, t in truth.items()}
    errors["gamma"] = rel(v["gamma"].reshape(-1), np.full(64, 2.0))
    print("arc2://sim median relative fit errors", errors)
    assert all(e < 0.05 for e in errors.values()), errors  # test_calibration_fit's tolerance

    with open_backend(ARC) as be:
        z = zero_shift(be, cal, pairs=150)[0]
        assert be.tile("cal.ref").place.row == 8  # the reference devices share the socket
    print(f"arc2://sim zero-shift: median |res| {z.median_abs:.4g} ({z.median_rel:.2%} of "
          f"range), converged {z.converged:.1%}")
    assert z.converged > 0.9 and z.median_rel < 0.02  # test_calibration_twin's tolerances
    assert np.median(np.abs(v["symmetric_point"])) > 3 * z.median_abs

    devices = "sim://?model=power&gamma=0.5&tau=0.6&d2d=0.2&c2c=0.1&seed=7"
    start_sim, end_sim = rlv2_distance(devices)
    start_arc, end_arc = rlv2_distance(sim_url(devices))
    print(f"RLv2 distance to target: sim:// {start_sim:.3f} -> {end_sim:.3f}, "
          f"arc2://sim {start_arc:.3f} -> {end_arc:.3f}")
    assert start_arc == start_sim  # the same devices start at the same weights
    assert end_sim < 0.65 * start_sim and end_arc < 0.65 * start_arc
    assert abs(end_arc - end_sim) < 0.1 * end_sim
