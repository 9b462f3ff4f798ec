"""The simulated ArC TWO behaves as pyarc2's Instrument: channel layout and raw order of
read_all, the current sign, NaN where masked out, pulses queued until execute, switching
threshold and half-selected devices, the instrument's limits, the output buffer and its
clock."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drivers.arc2 import sim, spec
from drivers.arc2.mapping import load_mapping
from drivers.arc2.spec import BIT_CHANNELS, WORD_CHANNELS

G_REF, G_SCALE = 5e-5, 2.5e-5


@pytest.fixture
def arc():
    inst = sim.Instrument(0, "", backend="sim://?model=linear&tau=1&dw_min=0.01&seed=1",
                          g_ref=G_REF, g_scale=G_SCALE, threshold_v=1.0)
    yield inst
    sim.close(inst)


def weights(arc) -> np.ndarray:
    return arc._tile.w.double().numpy().copy()


def set_weights(arc, w: np.ndarray) -> None:
    arc._tile.w.copy_(torch.as_tensor(w, dtype=torch.float32))


def distinct(arc) -> np.ndarray:
    """A distinct weight per (wordline, bitline) so that any mix-up shows."""
    w = (np.arange(32 * 32).reshape(32, 32) / 1024.0 - 0.5).astype(np.float32)
    set_weights(arc, w)
    return w.astype(np.float64)


def test_read_all_raw_order_and_sign(arc):
    w = distinct(arc)
    m = load_mapping("standard32")
    g = G_REF + G_SCALE * w  # [wordline, bitline]
    raw = arc.read_all(0.2, sim.BiasOrder.Cols)
    assert raw.shape == (32, 32) and raw.dtype == np.float32
    # row i: low channel BIT_CHANNELS[i]; column j: the wordline on WORD_CHANNELS[j]
    word_of, bit_of = m.line_of_channel()
    for i, low in enumerate(BIT_CHANNELS):
        for j, high in enumerate(WORD_CHANNELS):
            expect = g[word_of[high], bit_of[low]] * 0.2
            assert raw[i, j] == pytest.approx(expect, rel=1e-6)
    # Rows: the wordlines are the low channels; the current is again +G*vread
    rows = arc.read_all(0.2, sim.BiasOrder.Rows)
    np.testing.assert_allclose(rows, raw.T, rtol=1e-6)
    # a negative read voltage reverses every current (low channel at -vread)
    np.testing.assert_allclose(arc.read_all(-0.2, sim.BiasOrder.Cols), -raw, rtol=1e-6)
    assert arc.read_one(BIT_CHANNELS[3], WORD_CHANNELS[5], 0.2) == pytest.approx(raw[3, 5])


def test_masked_read_gives_nan_outside_the_mask(arc):
    distinct(arc)
    mask = [WORD_CHANNELS[0], WORD_CHANNELS[7]]
    row = arc.read_slice_masked(BIT_CHANNELS[2], mask, 0.2)
    full = arc.read_slice(BIT_CHANNELS[2], 0.2)
    assert row.shape == (32,) and row.dtype == np.float32
    assert np.isfinite(row[[0, 7]]).all() and np.isnan(np.delete(row, [0, 7])).all()
    np.testing.assert_array_equal(row[[0, 7]], full[[0, 7]])
    # a wordline as the low channel reads the bitlines
    col = arc.read_slice_masked(WORD_CHANNELS[4], [BIT_CHANNELS[1]], 0.2)
    assert np.isfinite(col[1]) and np.isnan(col[0])


def test_pulses_wait_for_execute_and_respect_the_threshold(arc):
    m = load_mapping("standard32")
    before = weights(arc)
    word, bit = m.words[3], m.bits[5]
    arc.pulse_one(bit, word, 1.6, 100)
    assert np.array_equal(weights(arc), before)  # queued only
    arc.execute()
    after = weights(arc)
    changed = np.argwhere(after != before)
    assert changed.tolist() == [[3, 5]] and after[3, 5] > before[3, 5]
    # the other polarity depresses; a pulse below the threshold does nothing
    arc.pulse_one(bit, word, -1.6, 100).pulse_one(bit, word, 0.9, 100).execute()
    assert weights(arc)[3, 5] < after[3, 5]
    snap = weights(arc)
    arc.pulse_one(bit, word, 0.95, 1000).execute()
    assert np.array_equal(weights(arc), snap)


def test_half_selected_devices_switch_only_past_the_threshold(arc):
    m = load_mapping("standard32")
    before = weights(arc)
    arc.pulse_slice_masked(m.bits[0], 1.6, 100, [m.words[0], m.words[1]]).execute()
    moved = np.argwhere(weights(arc) != before).tolist()
    assert moved == [[0, 0], [1, 0]]  # V/2 = 0.8 V on the half-selected ones: no change
    before = weights(arc)
    arc.pulse_slice_masked(m.bits[0], 2.4, 100, [m.words[0]]).execute()
    moved = weights(arc) != before
    # V/2 = 1.2 V past the threshold: the rest of wordline 0 and of bitline 0 move too
    assert moved[0, :].all() and moved[:, 0].all() and moved.sum() == 32 + 31


def test_limits_are_refused_with_arc2error(arc):
    with pytest.raises(sim.ArC2Error, match="13.5"):
        arc.pulse_one(0, 16, 14.0, 100)
    with pytest.raises(sim.ArC2Error, match="40 ns"):
        arc.pulse_one(0, 16, 1.0, 30)
    with pytest.raises(sim.ArC2Error, match="10 ns steps"):
        arc.pulse_one(0, 16, 1.0, 45)
    with pytest.raises(sim.ArC2Error, match="channel 64"):
        arc.pulse_slice_masked(0, 1.0, 100, [16, 64])
    with pytest.raises(sim.ArC2Error, match="not finite"):
        arc.read_slice(0, float("nan"))
    with pytest.raises(OverflowError):
        arc.pulse_one(0, 16, 1.0, -100)
    with pytest.raises(TypeError):
        arc.pulse_one(0, 16, 1.0, 100.0)
    assert not arc._queue  # nothing refused was queued
    hot = sim.Instrument(0, "", backend="sim://?seed=0", g_ref=1e-3, g_scale=1e-4)
    try:
        with pytest.raises(sim.ArC2Error, match="channel rating"):
            hot.read_slice(0, 0.5)  # 32 devices of 1 mS at 0.5 V: 16 mA on the bitline
    finally:
        sim.close(hot)
    with pytest.raises(sim.ArC2Error, match="device id"):
        sim.Instrument(3, "")
    with pytest.raises(sim.ArC2Error, match="firmware"):
        sim.Instrument(0, "/nonexistent/fw.bin")


def test_current_noise_of_the_instrument():
    kw = {"backend": "sim://?seed=1", "current_noise": 1e-8}
    a, b = sim.Instrument(0, "", **kw), sim.Instrument(0, "", **kw, seed=5)
    try:
        reads = np.stack([a.read_slice(BIT_CHANNELS[0], 0.2) for _ in range(200)])
        assert reads.std(axis=0).mean() == pytest.approx(1e-8, rel=0.15)
        assert reads.mean(axis=0) == pytest.approx(np.full(32, G_REF * 0.2), rel=1e-3)
        again = sim.Instrument(0, "", **kw)
        try:
            assert np.array_equal(again.read_slice(BIT_CHANNELS[0], 0.2), reads[0])  # seeded
        finally:
            sim.close(again)
        assert not np.array_equal(b.read_slice(BIT_CHANNELS[0], 0.2), reads[0])
    finally:
        sim.close(a)
        sim.close(b)


def test_the_clock_follows_the_command_sequences(arc):
    clock = sim.clock(arc)
    t0, calls0 = clock.ns, clock.total_calls
    arc.pulse_slice_masked(0, 1.6, 100, [16, 17]).pulse_slice_masked(1, 1.6, 100, [16])
    assert clock.ns == t0  # queued: the instrument has not run anything yet
    arc.execute()
    assert clock.ns - t0 == spec.USB_WRITE_NS + 2 * spec.pulse_ns(100)
    t1 = clock.ns
    arc.read_slice(0, 0.2)
    assert clock.ns - t1 == spec.read_ns() + spec.USB_WRITE_NS + spec.USB_READ_NS
    assert clock.total_calls - calls0 == 4
    assert clock.calls["pulse_slice_masked"] == 2


def test_ramp_results_through_the_output_buffer(arc):
    arc.generate_ramp(BIT_CHANNELS[0], WORD_CHANNELS[0], 0.2, 0.2, 0.6, 100, 1000, 2,
                      sim.ReadAt.Arb(0.1), sim.ReadAfter.Block).execute()
    data = [item[0] for item in arc.get_iter(sim.DataMode.Words)]  # pyarc2 yields [array]
    assert len(data) == 3 and all(d.shape == (32,) and d.dtype == np.float32 for d in data)
    assert all(np.isfinite(d[0]) and np.isnan(d[1:]).all() for d in data)
    assert arc.pick_one(sim.DataMode.All, sim.ReadType.Current) is None
    arc.read_slice_open_deferred([16, 17], True).execute()
    assert arc.pick_one(sim.DataMode.All, sim.ReadType.Current).shape == (64,)
    with pytest.raises(sim.ArC2Error, match="inconsistent ramp"):
        arc.generate_ramp(0, 16, 0.5, 0.1, 0.2, 100, 0, 1, sim.ReadAt.Never,
                          sim.ReadAfter.Never)


def test_finalise_operation_grounds_every_channel(arc):
    arc.config_channels([(16, 0.3), (0, -0.3)], None).execute()
    assert arc.vread_channels([0, 16], False) == pytest.approx([-0.3, 0.3])
    arc.finalise_operation(sim.IdleMode.HardGnd)
    assert arc._grounded.all() and arc._floating.all() and not arc._dc.any()
    assert arc.vread_channels([0, 16], False) == [0.0, 0.0]
    with pytest.raises(sim.ArC2Error, match="idle mode"):
        arc.finalise_operation("gnd")


def test_a_script_written_for_pyarc2_runs_on_the_simulation(arc):
    """arc2control's read-all-and-remap, with pyarc2's own enums where it imports."""
    pyarc2 = pytest.importorskip("pyarc2")
    w = distinct(arc)
    m = load_mapping("standard32")
    arc.finalise_operation(pyarc2.IdleMode.HardGnd)
    raw = arc.read_all(0.2, pyarc2.BiasOrder.Cols)
    res = np.empty((32, 32))
    word_idx = m.word_positions(range(32))
    for channel in sorted(m.bits):
        bitline = m.bits.index(channel)
        res[bitline] = 0.2 / np.abs(raw[BIT_CHANNELS.index(channel)][word_idx])
    np.testing.assert_allclose(1 / res.T, G_REF + G_SCALE * w, rtol=1e-5)


def test_the_rest_of_the_api(arc):
    m = load_mapping("standard32")
    word, bit = m.words[2], m.bits[3]
    # a held DC bias past the threshold switches the device across it on a delay
    before = weights(arc)
    arc.config_channels([(word, 0.6), (bit, -0.6)], 0.0).delay(1000).execute()
    moved = np.argwhere(weights(arc) != before).tolist()
    assert moved == [[2, 3]]
    arc.ground_all().execute()
    # fast open pulses: per-cluster timings, 8 of them
    before = weights(arc)
    timings = [None] * 8
    timings[word // 8] = timings[bit // 8] = 100
    arc.pulse_slice_fast_open([(word, 0.8, 0.0), (bit, -0.8, 0.0)], timings, False).execute()
    assert weights(arc)[2, 3] > before[2, 3]
    with pytest.raises(ValueError, match="8 arguments"):
        arc.pulse_slice_fast_open([(word, 0.8, 0.0)], [100] * 7, False)
    with pytest.raises(sim.ArC2Error, match="no timing"):
        arc.pulse_slice_fast_open([(word, 0.8, 0.0)], [None] * 8, False)
    # pulse-and-read forms
    i0 = arc.read_one(bit, word, 0.2)
    assert arc.pulseread_one(bit, word, 1.6, 100, 0.2) > i0 > 0
    row = arc.pulseread_slice_masked(bit, [word], 1.6, 100, 0.2)
    assert np.isfinite(row[WORD_CHANNELS.index(word)]) and np.isnan(row).sum() == 31
    assert arc.pulseread_slice(bit, -1.6, 100, 0.2).shape == (32,)
    assert arc.pulseread_all(-1.6, 100, 0.2, sim.BiasOrder.Cols).shape == (32, 32)
    # trains and the output buffer
    arc.generate_read_train(None, [word], 0.2, 3, 0, True).execute()
    arc.generate_vread_train([word, bit], False, 2, 0).execute()
    arc.read_train(bit, word, 0.2, 1000, None, sim.WaitFor.Iterations(4))
    got = [item[0] for item in arc.get_iter(sim.DataMode.All)]
    assert len(got) == 3 + 2 + 4 and all(g.shape == (64,) for g in got)
    arc.read_slice_open_deferred([word], False).execute()
    addr = arc._output[0]
    assert np.isfinite(arc.currents_from_address(addr, [word])[word])
    assert arc.word_currents_from_address(addr).shape == (32,)
    assert arc.bit_currents_from_address(addr).shape == (32,)
    with pytest.raises(sim.ArC2Error, match="no result"):
        arc.word_currents_from_address(addr + 4096)
    # channel state and peripherals: queued until execute, like everything else
    arc.config_aux_channels([(sim.AuxDACFn.CREF, 1.0)]).config_selectors([1, 2]) \
        .set_logic(0xF, sim.IODir.IN).set_logic_level(sim.LogicLevel.LL5V) \
        .set_channel_range([0], sim.OutputRange.EXT).set_control_mode(sim.ControlMode.Header) \
        .open_channels([1]).gnd_add([2]).gnd_remove([2]).connect_to_ac_gnd([3]) \
        .gnd_ac_add([4]).gnd_ac_remove([4]).float_all().ground_all_fast()
    assert arc._control == "Internal" and not arc.busy()  # queued on the host only
    arc.execute().wait()
    assert not arc.busy()
    assert (arc._control, arc._logic_level, arc._selectors) == ("Header", "LL5V", (1, 2))
    assert arc._range[0] == "EXT" and arc._ac_grounded[3] and not arc._ac_grounded[4]
    with pytest.raises(sim.ArC2Error, match="selectors"):
        arc.config_selectors([40])
    with pytest.raises(TypeError, match="BiasOrder"):
        arc.read_all(0.2, "rows")
    assert sim.find_ids() == [0]
