"""sim:// drift and ageing follow their documented formulas, are off by default, survive a
checkpoint; the recording backend logs exactly the pulses of each step."""

from __future__ import annotations

import pytest
import torch

from hil.backend import open_backend
from hil.errors import BackendURLError
from hil.recording import RecordingBackend
from sim_backend import SimTile

BASE = "sim://?model=power&gamma=0.5&tau=0.6&dw_min=0.01&engine=eager"


def test_off_by_default_is_the_plain_tile():
    with open_backend(BASE) as be:
        assert type(be.allocate("a", 2, 2)) is SimTile


def test_drift_is_the_power_law_of_the_modelled_clock():
    nu, t0, clock = 0.1, 2.0, 3.0
    with open_backend(f"{BASE}&drift={nu}&drift_t0={t0}&clock={clock}") as be:
        tile = be.allocate("a", 1, 3)
        tile.pulse(torch.full((1, 3), 20, dtype=torch.int32))  # tick 1: t_p = 3 s
        w_p = tile.w.clone()
        for k in range(1, 6):
            w = tile.read()  # tick k + 1: t = 3 (k + 1) s
            expect = w_p * ((clock * k + t0) / t0) ** (-nu)
            assert torch.allclose(w, expect, rtol=1e-5), k
        # a pulse resets the device's clock: no relaxation at the next tick beyond the pulse
        tile.pulse(torch.tensor([[1, 0, 0]], dtype=torch.int32))
        w_p2 = tile.w.clone()
        w = tile.read()
        assert torch.allclose(w[0, 0], w_p2[0, 0] * ((clock + t0) / t0) ** (-nu), rtol=1e-5)


def test_drift_spread_and_reproducible():
    url = f"{BASE}&drift=0.1&drift_d2d=0.5&seed=3"
    runs = []
    for _ in range(2):
        with open_backend(url) as be:
            tile = be.allocate("a", 4, 4)
            tile.pulse(torch.full((4, 4), 10, dtype=torch.int32))
            for _ in range(20):
                w = tile.read()
            runs.append(w)
            assert tile.wear.nu.std() > 0.01  # devices drift at their own rates
    assert torch.equal(runs[0], runs[1])


def test_ageing_changes_dw_min_and_gamma_with_pulses_taken():
    with open_backend(f"{BASE}&age_dw=0.5&age_gamma=1&age_n=100") as be:
        tile = be.allocate("a", 1, 2)
        tile.pulse(torch.tensor([[40, -10]], dtype=torch.int32))
        assert torch.allclose(tile.devices.dw_min, torch.tensor([[0.01 * 1.2, 0.01 * 1.05]]))
        assert torch.allclose(tile.devices.response.gamma, torch.tensor([[0.5 * 1.4,
                                                                          0.5 * 1.1]]))
        tile.outer_update(torch.ones(1, 2), torch.ones(1, 1), 0.1)  # pulse trains age too
        assert bool((tile.wear.pulses > torch.tensor([[40.0, 10.0]])).any())
    with open_backend(f"{BASE}&age_dw=0.5&aged=1e6") as aged, open_backend(
            "sim://?model=power&gamma=0.5&tau=0.6&dw_min=0.015&engine=eager") as fresh:
        a, b = aged.allocate("a", 1, 1), fresh.allocate("a", 1, 1)
        a.pulse(torch.ones(1, 1, dtype=torch.int32))
        b.pulse(torch.ones(1, 1, dtype=torch.int32))
        assert torch.allclose(a.read(), b.read(), rtol=1e-4)  # aged = dw_min x 1.5


def test_state_dict_resumes_drift_and_ageing():
    url = f"{BASE}&drift=0.05&age_dw=0.3&age_n=50&c2c=0.1&seed=1"
    n = torch.tensor([[3, -2], [1, 0]], dtype=torch.int32)
    with open_backend(url) as be:
        tile = be.allocate("a", 2, 2)
        for _ in range(5):
            tile.pulse(n)
        state = be.state_dict()
        for _ in range(5):
            tile.pulse(n)
        want = tile.read()
    with open_backend(url) as be:
        be.load_state_dict(state)
        tile = be.tile("a")
        for _ in range(5):
            tile.pulse(n)
        assert torch.equal(tile.read(), want)


@pytest.mark.parametrize("bad", ["drift=-0.1", "clock=-1", "age_n=0", "aged=-5",
                                 "age_dw=-1"])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(BackendURLError):
        open_backend(f"{BASE}&{bad}")


def test_recording_backend_logs_the_pulses_of_steps_only():
    steps = []
    with RecordingBackend(open_backend(BASE), on_step=steps.append) as be:
        tile = be.allocate("a", 2, 3)
        tile.pulse(torch.ones(2, 3, dtype=torch.int32))  # outside a step: not logged
        with be.step():
            tile.pulse(torch.full((2, 3), 2, dtype=torch.int32))
            with be.step():  # nested: the same step
                tile.pulse_columns(torch.ones(2, 1, dtype=torch.int32), slice(1, 2))
            tile.outer_update(torch.ones(1, 3), torch.ones(1, 2), 0.05)
        assert [c.op for c in steps[0]] == ["pulse", "pulse_columns", "outer_update"]
        assert len(steps) == 1
        after = tile.read()
    # replaying the log on the same devices from the same state reproduces the step
    with open_backend(BASE) as twin:
        t = twin.allocate("a", 2, 3)
        t.pulse(torch.ones(2, 3, dtype=torch.int32))
        for call in steps[0]:
            call.replay(t)
        assert torch.equal(t.read(), after)


def test_a_job_trains_on_the_chips_existing_tiles_but_layers_never_share_one():
    from hil.algorithms import AnalogSGD

    with open_backend(BASE) as be:
        calibrated = be.allocate("fc1.W", 2, 2)  # left on the chip by a characterization
        alg = AnalogSGD(be, (2, 2), lr=0.1, prefix="fc1")
        assert alg.tiles["W"] is calibrated
        with pytest.raises(Exception, match="already allocated"):
            AnalogSGD(be, (2, 2), lr=0.1, prefix="fc1")
        be.allocate("fc2.W", 3, 3)
        with pytest.raises(Exception, match="shape"):
            AnalogSGD(be, (2, 2), lr=0.1, prefix="fc2")
