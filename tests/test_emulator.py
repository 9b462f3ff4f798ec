"""The sim:// emulator's physics: single steps, bounds, symmetric point, pulse trains, noise,
outer_update statistics, MVM periphery, reproducibility, snapshots, compiled vs eager."""

from __future__ import annotations

import os

import pytest
import torch

import hil
from hil.response import PowerResponse, TabulatedResponse
from sim_backend import DeviceArray, SimBackend, SimConfig, apply_pulses

FAMILIES = ["linear", "power", "exp"]
BASE = "sim://?model={model}&gamma=0.5&tau=0.6&engine=eager&seed=3"


def open_sim(model: str = "power", extra: str = ""):
    return hil.open_backend(BASE.format(model=model) + extra)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sign", [1, -1])
def test_one_noiseless_pulse_moves_by_dw_min_q(family, sign):
    with open_sim(family, "&d2d=0.3&asym=0.1&init=0.05&stuck=0.05") as be:
        tile = be.allocate("t", 24, 24)
        dev = tile.devices
        w0 = tile.read()
        tile.pulse(torch.full((24, 24), sign, dtype=torch.int32))
        q = dev.response.q_plus(w0) if sign > 0 else dev.response.q_minus(w0)
        expect = torch.clamp(w0 + sign * dev.dw_min * q, dev.tau_min, dev.tau_max)
        expect = torch.where(dev.stuck, w0, expect)
        assert torch.allclose(tile.read(), expect, rtol=0, atol=2e-7)
        free = w0 < dev.tau_max if sign > 0 else w0 > dev.tau_min
        moved = ~dev.stuck & free
        assert bool(((tile.read() - w0)[moved] * sign > 0).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_pulses_never_leave_the_bounds(family):
    with open_sim(family, "&d2d=0.4&c2c=0.8&dw_min=0.05") as be:
        tile = be.allocate("t", 16, 16)
        dev = tile.devices
        g = gen(1)
        for _ in range(40):
            tile.pulse(torch.randint(-30, 31, (16, 16), generator=g, dtype=torch.int32))
            w = tile.read()
            assert bool(((w >= dev.tau_min) & (w <= dev.tau_max)).all())
        # driven hard into each bound, the devices sit on it
        tile.pulse(torch.full((16, 16), 400, dtype=torch.int32))
        assert bool((tile.read() <= dev.tau_max).all())


@pytest.mark.parametrize("family,asym", [("linear", 0.2), ("linear", -0.3), ("power", 0.2),
                                         ("exp", 0.1)])
def test_alternating_pulses_settle_at_the_symmetric_point(family, asym):
    with open_sim(family, f"&asym={asym}&d2d=0.1&dw_min=5e-3") as be:
        tile = be.allocate("t", 8, 8)
        up = torch.ones(8, 8, dtype=torch.int32)
        for _ in range(1000):
            tile.pulse(up)
            tile.pulse(-up)
        ws = tile.devices.response.symmetric_point()
        dw = tile.devices.dw_min
        assert bool(((tile.read() - ws).abs() <= 2 * dw).all())
        if family == "linear":  # closed form w = a * tau for symmetric bounds and no spread
            ref = asym * 0.6
            with open_sim(family, f"&asym={asym}&dw_min=5e-3") as be2:
                t2 = be2.allocate("t", 2, 2)
                for _ in range(1000):
                    t2.pulse(up[:2, :2])
                    t2.pulse(-up[:2, :2])
                assert bool(((t2.read() - ref).abs() <= 2 * 5e-3).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_n_pulses_equal_n_single_pulses_without_noise(family):
    n = torch.randint(-12, 13, (20, 20), generator=gen(2), dtype=torch.int32)
    with open_sim(family, "&d2d=0.3&asym=0.1") as a, open_sim(family, "&d2d=0.3&asym=0.1") as b:
        ta, tb = a.allocate("t", 20, 20), b.allocate("t", 20, 20)
        ta.pulse(n)
        for k in range(12):
            tb.pulse(torch.sign(n).to(torch.int32) * (n.abs() > k))
        assert torch.equal(ta.read(), tb.read())


def test_n_pulses_match_single_pulses_in_distribution_with_noise():
    extra = "&c2c=0.5&dw_min=0.01&init=-0.3"
    with open_sim("power", extra) as a, open_sim("power", extra) as b:
        ta, tb = a.allocate("t", 64, 64), b.allocate("t", 64, 64)
        ta.pulse(torch.full((64, 64), 8, dtype=torch.int32))
        for _ in range(8):
            tb.pulse(torch.ones(64, 64, dtype=torch.int32))
        wa, wb = ta.read().flatten(), tb.read().flatten()
        assert not torch.equal(wa, wb)  # different noise draws ...
        se = (wa.var() / wa.numel() + wb.var() / wb.numel()).sqrt()
        assert abs(float(wa.mean() - wb.mean())) < 4 * float(se)  # ... same distribution
        assert float(wa.std() / wb.std()) == pytest.approx(1.0, abs=0.12)
        # the spread is what c2c predicts: 8 steps of relative std 0.5
        q_step = 0.01 * PowerResponse(-0.6, 0.6, gamma=0.5).q_plus(torch.tensor(-0.26))
        assert float(wa.std()) == pytest.approx(float(q_step) * 0.5 * 8**0.5, rel=0.15)


def test_noise_is_drawn_only_for_pulsed_devices():
    """A device's noise depends on the call and its own pulses, not on idle neighbours."""
    n_all = torch.ones(8, 8, dtype=torch.int32)
    n_half = n_all.clone()
    n_half[:, 4:] = 0
    with open_sim("linear", "&c2c=0.3") as a, open_sim("linear", "&c2c=0.3") as b:
        ta, tb = a.allocate("t", 8, 8), b.allocate("t", 8, 8)
        ta.pulse(n_all)
        tb.pulse(n_half)
        assert torch.equal(ta.read()[:, :4], tb.read()[:, :4])
        assert bool((tb.read()[:, 4:] == 0).all())


@pytest.mark.parametrize("family,init,asym", [("linear", 0.0, 0.3), ("power", 0.2, 0.0),
                                              ("exp", -0.1, 0.2)])
def test_outer_update_mean_matches_F_and_G(family, init, asym):
    """E[dW] = D*F(W) - |D|*G(W) with D = lr * sum_b d_b x_b^T, per group of equal (d, x)."""
    rows = cols = 128
    levels_d = torch.tensor([-0.8, -0.3, 0.5, 1.0])
    levels_x = torch.tensor([-1.0, -0.4, 0.6, 0.9])
    d = levels_d.repeat_interleave(rows // 4).reshape(1, rows)
    x = levels_x.repeat(cols // 4).reshape(1, cols)
    batch, lr = 2, 0.01
    with open_sim(family, f"&init={init}&asym={asym}") as be:
        tile = be.allocate("t", rows, cols)
        resp = tile.devices.response
        w0 = tile.read()
        tile.outer_update(x.repeat(batch, 1), d.repeat(batch, 1), lr)
        dw = tile.read() - w0
    delta = batch * lr * d.t() @ x
    expect = delta * resp.F(w0) - delta.abs() * resp.G(w0)
    for i in range(4):
        for j in range(4):
            blk = (slice(i * rows // 4, (i + 1) * rows // 4), slice(j, cols, 4))
            got, want = dw[blk], expect[blk]
            # counts in one row share the row's pulse train: rows are the independent units
            se = 1e-3 * float(want.abs().mean() / 1e-3).__pow__(0.5) * 1.5 / (rows // 4) ** 0.5
            assert float(got.mean()) == pytest.approx(float(want.mean()), abs=4 * se + 2e-5)


def test_outer_update_applies_samples_in_order():
    """outer_update equals applying each sample's coincidence counts one after the other."""
    from sim_backend import pulse_train_counts

    x = torch.rand(5, 12, generator=gen(4)) * 2 - 1
    d = torch.rand(5, 10, generator=gen(5)) * 2 - 1
    extra = "&asym=0.2&d2d=0.2&init=0.3"
    with open_sim("power", extra) as a, open_sim("power", extra) as b:
        ta, tb = a.allocate("t", 10, 12), b.allocate("t", 10, 12)
        ta.outer_update(x, d, 0.05)
        counts = pulse_train_counts(x, d, 0.05, tb.dw_min, 31, tb.gen)
        assert counts.shape == (5, 10, 12) and int(counts.abs().max()) > 1
        for n in counts:
            tb.pulse(n)
        assert torch.allclose(ta.read(), tb.read(), rtol=0, atol=1e-6)


def test_pulse_train_counts_mean_and_sign():
    from sim_backend import pulse_train_counts

    x = torch.tensor([[0.5, -1.0, 0.0]])
    d = torch.tensor([[1.0, -0.25]])
    g = gen(6)
    total = sum(pulse_train_counts(x, d, 0.01, 1e-3, 31, g)[0].float() for _ in range(2000))
    mean = total / 2000
    want = 0.01 * d.t() @ x / 1e-3
    assert torch.allclose(mean, want, atol=0.15)
    neg = pulse_train_counts(x, d, -0.01, 1e-3, 31, gen(7))[0]
    assert bool((neg * torch.sign(want) <= 0).all())


def test_seeded_runs_are_bit_identical():
    url = BASE.format(model="exp") + "&c2c=0.2&d2d=0.3&read_noise=1e-3&stuck=0.02"

    def run():
        with hil.open_backend(url) as be:
            t = be.allocate("fc1", 32, 16)
            u = be.allocate("fc2", 8, 32)
            g = gen(9)
            out = []
            for _ in range(3):
                t.pulse(torch.randint(-5, 6, (32, 16), generator=g, dtype=torch.int32))
                t.outer_update(torch.rand(4, 16, generator=g), torch.rand(4, 32, generator=g),
                               0.02)
                out += [t.read(), t.mvm(torch.rand(3, 16, generator=g)), u.read()]
            return out

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_tile_seed_does_not_depend_on_allocation_order():
    with open_sim("power", "&d2d=0.3") as a, open_sim("power", "&d2d=0.3") as b:
        a.allocate("x", 4, 4)
        ya = a.allocate("y", 4, 4)
        yb = b.allocate("y", 4, 4)
        assert torch.equal(ya.devices.dw_min, yb.devices.dw_min)


def test_device_population_statistics():
    with open_sim("power", "&d2d=0.2&stuck=0.1&asym=0.1&dw_min=1e-3") as be:
        dev = be.allocate("t", 100, 100).devices
        assert float(dev.dw_min.mean()) == pytest.approx(1e-3, rel=0.02)
        assert float(dev.dw_min.std() / dev.dw_min.mean()) == pytest.approx(0.2, rel=0.1)
        assert float(dev.stuck.float().mean()) == pytest.approx(0.1, abs=0.01)
        assert float(dev.response.asym.mean()) == pytest.approx(0.1, abs=0.01)
        assert float(dev.tau_max.mean()) == pytest.approx(0.6, rel=0.02)


def test_stuck_devices_never_move():
    with open_sim("linear", "&stuck=0.3&c2c=0.2") as be:
        tile = be.allocate("t", 20, 20)
        w0 = tile.read()
        for s in (1, -1, 7):
            tile.pulse(torch.full((20, 20), s, dtype=torch.int32))
        stuck = tile.devices.stuck
        assert torch.equal(tile.read()[stuck], w0[stuck])
        assert bool((tile.read()[~stuck] != w0[~stuck]).all())


def test_read_noise_has_the_requested_std():
    with open_sim("linear", "&read_noise=0.01&init=0.1") as be:
        tile = be.allocate("t", 100, 100)
        r = tile.read()
        assert float((r - 0.1).std()) == pytest.approx(0.01, rel=0.05)
        assert not torch.equal(r, tile.read())


def test_mvm_ideal_and_paper_periphery():
    with open_sim("linear", "&io=ideal&init=0.3") as be:
        tile = be.allocate("t", 6, 5)
        x = torch.rand(4, 5, generator=gen(10))
        assert torch.allclose(tile.mvm(x), x @ tile.read().t())
        assert tile.mvm(torch.rand(4, 6), transpose=True).shape == (4, 5)
        assert tile.mvm(torch.rand(5)).shape == (6,)
        with pytest.raises(hil.BackendError, match="features"):
            tile.mvm(torch.rand(2, 6))
    with open_sim("linear", "&init=0.5&out_noise=0") as be:
        tile = be.allocate("t", 40, 300)
        x = torch.rand(8, 300, generator=gen(11))
        y = tile.mvm(x)
        exact = x @ tile.read().t()
        scale = x.abs().amax(dim=1, keepdim=True)
        assert bool((y <= 12.0 * scale + 1e-5).all())  # output bound 12, undone by the scale
        assert float((exact - 150 * scale).abs().min()) > 0  # exact exceeds the bound ...
        assert torch.allclose(y, 12.0 * scale.expand_as(y), rtol=1e-5)  # ... so y saturates
    with open_sim("linear", "&init=0.1") as be:
        tile = be.allocate("t", 10, 10)
        x = torch.rand(2000, 10, generator=gen(12))
        err = tile.mvm(x) - x @ tile.read().t()
        scale = x.abs().amax(dim=1, keepdim=True)
        assert float((err / scale).std()) == pytest.approx(0.06, rel=0.1)  # output noise


def test_state_dict_round_trip():
    url = BASE.format(model="power") + "&c2c=0.2&read_noise=1e-3"
    with hil.open_backend(url) as be:
        t = be.allocate("t", 12, 12)
        t.pulse(torch.full((12, 12), 3, dtype=torch.int32))
        state = be.state_dict()
        t.pulse(torch.full((12, 12), -2, dtype=torch.int32))
        after = t.read()
        be.load_state_dict(state)
        t.pulse(torch.full((12, 12), -2, dtype=torch.int32))
        assert torch.equal(t.read(), after)
    with hil.open_backend(url) as fresh:  # restoring into a new backend allocates the tile
        fresh.load_state_dict(state)
        fresh.tile("t").pulse(torch.full((12, 12), -2, dtype=torch.int32))
        assert torch.equal(fresh.tile("t").read(), after)
        with pytest.raises(hil.BackendError, match="shape"):
            fresh.load_state_dict({"t": {**state["t"], "w": torch.zeros(3, 3)}})


def test_pulse_rejects_bad_counts():
    with open_sim() as be:
        tile = be.allocate("t", 4, 4)
        with pytest.raises(hil.BackendError, match="integer"):
            tile.pulse(torch.ones(4, 4))
        with pytest.raises(hil.BackendError, match="shape"):
            tile.pulse(torch.ones(3, 4, dtype=torch.int32))
        with pytest.raises(hil.BackendError, match="Tensor"):
            tile.pulse([[1]])


def tabulated_population(name, rows, cols, generator):
    grid = torch.linspace(-0.5, 0.5, 6).expand(rows, cols, 6)
    qp = torch.tensor([1.0, 1.2, 0.9, 0.6, 0.3, 0.0]).expand(rows, cols, 6)
    qm = torch.tensor([0.0, 0.4, 0.7, 0.8, 1.1, 1.0]).expand(rows, cols, 6)
    resp = TabulatedResponse(grid, qp, qm)
    return DeviceArray(response=resp, dw_min=torch.full((rows, cols), 0.01), stuck=None,
                       c2c=0.1, w0=torch.zeros(rows, cols))


def test_generic_response_through_population_factory():
    cfg = SimConfig(seed=1)
    with SimBackend("twin://test", cfg, population=tabulated_population) as be:
        tile = be.allocate("t", 6, 7)
        assert tile.devices.fused() is None  # no closed-form kernel: the generic loop
        tile.pulse(torch.full((6, 7), 4, dtype=torch.int32))
        w = tile.read()
        assert bool((w > 0).all()) and bool((w <= 0.5).all())
        tile.outer_update(torch.rand(3, 7), torch.rand(3, 6), 0.05)
        assert bool((tile.read() >= w).all())
    noiseless = DeviceArray(response=tabulated_population("t", 2, 2, None).response,
                            dw_min=torch.full((2, 2), 0.01), stuck=None, c2c=0.0,
                            w0=torch.zeros(2, 2))
    w = apply_pulses(torch.zeros(2, 2), torch.tensor([[1, -1], [2, 0]]), noiseless, gen())
    q = noiseless.response
    w1 = 0.01 * q.q_plus(torch.zeros(1))
    assert torch.allclose(w[0, 0], w1)
    assert torch.allclose(w[0, 1], -0.01 * q.q_minus(torch.zeros(1)))
    assert torch.allclose(w[1, 0], w1 + 0.01 * q.q_plus(w1)) and float(w[1, 1]) == 0.0


def test_fused_params_follow_in_place_changes():
    with open_sim("linear") as be:
        tile = be.allocate("t", 4, 4)
        before = tile.devices.fused().kp.clone()
        tile.devices.dw_min.mul_(2)
        assert torch.allclose(tile.devices.fused().kp, 2 * before)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HIL_TEST_COMPILE"),
                    reason="compiling the kernels takes minutes on a loaded 2-core machine; "
                    "set HIL_TEST_COMPILE=1 (benchmarks/emulator.py checks this too)")
def test_compiled_kernels_agree_with_eager():
    """The torch.compile path matches the eager one to float rounding (same noise stream)."""
    g = gen(13)
    n = torch.randint(-10, 11, (64, 64), generator=g, dtype=torch.int32)
    x, d = torch.rand(4, 64, generator=g) * 2 - 1, torch.rand(4, 64, generator=g) * 2 - 1
    out = {}
    for engine in ("eager", "compiled"):
        url = f"sim://?model=power&gamma=0.5&tau=0.6&d2d=0.2&c2c=0.1&engine={engine}&seed=2"
        with hil.open_backend(url) as be:
            tile = be.allocate("t", 64, 64)
            tile.pulse(n)
            tile.outer_update(x, d, 0.02)
            out[engine] = tile.read()
    assert float((out["eager"] - out["compiled"]).abs().max()) < 1e-5


def _trains(b: int, rows: int, cols: int, kmax: int, seed: int) -> torch.Tensor:
    """Random signed counts [b, rows, cols] in [-kmax, kmax], as int8 like outer_update's."""
    return torch.randint(-kmax, kmax + 1, (b, rows, cols), generator=gen(seed)).to(torch.int8)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["sample", "device"])
def test_pulse_trains_equal_per_sample_pulses_without_noise(family, method):
    """apply_pulse_trains equals applying each sample's counts with apply_pulses in turn."""
    from sim_backend import apply_pulse_trains

    counts = _trains(6, 16, 24, 9, 21)
    with open_sim(family, "&d2d=0.3&asym=0.1&stuck=0.05") as a:
        t = a.allocate("t", 16, 24)
        w_ref = t.w.clone()
        for n in counts:
            apply_pulses(w_ref, n.to(torch.int32), t.devices, t.gen, engine="eager", out=w_ref)
        w = t.w.clone()
        apply_pulse_trains(w, counts, t.devices, t.gen, engine="eager", method=method)
        assert torch.equal(w, w_ref)


def test_sample_levels_do_not_change_the_noise(monkeypatch):
    """Restricting late pulses to the devices that still have some keeps every noise draw."""
    import sim_backend.emulator as em

    counts = _trains(5, 20, 20, 12, 22)
    out = []
    for levels in ((), (2, 5)):
        monkeypatch.setattr(em, "SAMPLE_LEVELS", levels)
        with open_sim("power", "&c2c=0.3&d2d=0.2") as a:
            t = a.allocate("t", 20, 20)
            w = t.w.clone()
            em.apply_pulse_trains(w, counts, t.devices, t.gen, engine="eager")
            out.append(w)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("method", ["sample", "device"])
def test_pulse_trains_match_per_sample_pulses_in_distribution_with_noise(method):
    """With c2c the train kernels draw other normals than per-sample pulse() calls, from
    the same distribution: compare mean and spread over 4096 devices."""
    from sim_backend import apply_pulse_trains

    seq = [5, -3, 7, 0, -6, 4]
    counts = torch.tensor(seq, dtype=torch.int8).view(-1, 1, 1).expand(-1, 64, 64).contiguous()
    extra = "&c2c=0.5&dw_min=0.01&init=-0.2"
    with open_sim("power", extra) as a, open_sim("power", extra) as b:
        ta, tb = a.allocate("t", 64, 64), b.allocate("t", 64, 64)
        apply_pulse_trains(ta.w, counts, ta.devices, ta.gen, engine="eager", method=method)
        for n in counts:
            tb.pulse(n.to(torch.int32))
        wa, wb = ta.read().flatten(), tb.read().flatten()
        assert not torch.equal(wa, wb)
        se = (wa.var() / wa.numel() + wb.var() / wb.numel()).sqrt()
        assert abs(float(wa.mean() - wb.mean())) < 4 * float(se)
        assert float(wa.std() / wb.std()) == pytest.approx(1.0, abs=0.12)


def test_pulse_trains_reject_unknown_method():
    from sim_backend import apply_pulse_trains

    with open_sim("linear") as a:
        t = a.allocate("t", 4, 4)
        with pytest.raises(ValueError, match="method"):
            apply_pulse_trains(t.w, _trains(2, 4, 4, 3, 1), t.devices, t.gen, method="x")
