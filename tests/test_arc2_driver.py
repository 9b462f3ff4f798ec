"""The arc2:// driver on the simulated ArC TWO: grouped pulses, reads remapped from channel
order, a scripted program bit-identical to sim:// on the devices, the interlock before any
call, errors naming the devices and the call, outputs grounded on every exit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from drivers.arc2 import sim
from drivers.arc2.backend import pulse_program, sim_url
from drivers.weight_map import write_weight_map
from hil.backend import open_backend
from hil.errors import BackendError, BackendURLError, ConfigError, SafetyLimitError

DEVICES = "sim://?model=power&gamma=0.5&tau=0.6&d2d=0.2&c2c=0.1&seed=7"  # no read noise
PROFILE = Path(__file__).parents[1] / "drivers" / "profiles" / "arc2.yaml"


def calls(be) -> int:
    return sim.clock(be.instrument).total_calls


def scripted(be, a, b, steps: int = 20) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    reads = []
    for _ in range(steps):
        a(torch.randint(-4, 5, (8, 8), generator=gen, dtype=torch.int32))
        b(torch.randint(-2, 3, (8, 6), generator=gen, dtype=torch.int32))
        reads.append(be())
    return reads


def test_scripted_program_is_bit_identical_to_sim():
    """Same pulses on the same devices: the device states match sim:// bit for bit (c2c
    noise included), and every read is sim://'s read passed through the instrument's
    float32 current, bit for bit (within ~1e-7 of sim://'s own value)."""
    with open_backend(sim_url(DEVICES)) as arc:
        a, b = arc.allocate("a", 8, 8), arc.allocate("b", 8, 6)
        assert (a.place.row, b.place.row) == (0, 8)
        arc_reads = scripted(lambda: torch.cat([a.read(), b.read()], 1), a.pulse, b.pulse)
        arc_state = arc.instrument._tile.w.clone()
    with open_backend(DEVICES) as ref:
        xbar = ref.allocate("crossbar", 32, 32)  # the simulated socket's devices

        def padded(n, r0):
            full = torch.zeros(32, 32, dtype=torch.int32)
            full[r0:r0 + n.shape[0], :n.shape[1]] = n
            xbar.pulse(full)
        sim_reads = scripted(lambda: torch.cat([xbar.read()[0:8, :8], xbar.read()[8:16, :6]], 1),
                             lambda n: padded(n, 0), lambda n: padded(n, 8))
        assert torch.equal(arc_state, xbar.w)
    for got, want in zip(arc_reads, sim_reads, strict=True):
        assert got.shape == want.shape
        # one float32 current (~2^-24 relative of G ~ 50 uS) is ~1e-7 of a weight unit
        assert float((got - want).abs().max()) < 3e-7
        assert not torch.equal(want, torch.zeros_like(want))
        # bit for bit: sim://'s weights through the instrument's float32 current and back
        assert torch.equal(got, through_adc(want))


def through_adc(w: torch.Tensor, v: float = 0.2, g_ref: float = 5e-5, scale: float = 2.5e-5
                ) -> torch.Tensor:
    """Weights read as the ArC TWO reads them: G = g_ref + scale w, a float32 current at the
    float32 read voltage, |I| / V back to conductance and weight (the profile's map)."""
    g = np.clip(g_ref + scale * w.double().numpy(), 0.0, None)
    amps = (g * float(np.float32(v))).astype(np.float32)
    return torch.from_numpy(((np.abs(amps.astype(np.float64)) / v - g_ref) / scale)
                            .astype(np.float32))


def test_pulses_are_grouped_per_bitline_and_round():
    n = torch.tensor([[3, 0, -1], [1, 2, -1], [-2, 2, 0]], dtype=torch.int32)
    program = pulse_program(n.numpy())
    got = np.zeros((3, 3), np.int64)
    for col, sign, rows in program:
        got[rows, col] += sign
    assert np.array_equal(got, n.numpy())
    # round 1: col 0 (+ rows 0,1; - row 2), col 1 (+), col 2 (-); round 2: col 0 (+, -),
    # col 1 (+); round 3: col 0 (+)
    assert len(program) == 8
    with open_backend(sim_url(DEVICES)) as be:
        t = be.allocate("t", 3, 3)
        before = dict(sim.clock(be.instrument).calls)
        t.pulse(n)
        after = sim.clock(be.instrument).calls
        assert after["pulse_slice_masked"] - before.get("pulse_slice_masked", 0) == 8
        assert after["execute"] - before.get("execute", 0) == 1
        assert after["pulse_one"] == 0


def test_groups_stay_within_the_channel_current(tmp_path):
    """4e-4 A per device: a low line with k devices at V and 32 - k at V/2 carries
    (k + 32) * 2e-4 A, so at most 18 devices per command."""
    prof = tmp_path / "hot.yaml"
    prof.write_text(PROFILE.read_text().replace("compliance_a: 2.0e-4", "compliance_a: 4.0e-4"))
    n = torch.ones(32, 2, dtype=torch.int32)
    assert [r.size for _, _, r in pulse_program(n.numpy(), {1: 18, -1: 18})] == [18, 14] * 2
    with open_backend(sim_url(DEVICES, profile=str(prof))) as be:
        t = be.allocate("t", 32, 2)
        w0 = be.instrument._tile.w.clone()
        t.pulse(n)
        assert sim.clock(be.instrument).calls["pulse_slice_masked"] == 4
        assert bool((be.instrument._tile.w[:, :2] > w0[:, :2]).all())


def test_a_sparse_row_is_pulsed_with_its_wordline_low():
    n = torch.zeros(6, 6, dtype=torch.int32)
    n[2, :] = torch.tensor([2, -1, 1, 0, 2, -2])
    with open_backend(sim_url(DEVICES)) as be:
        t = be.allocate("t", 6, 6)
        w0 = be.instrument._tile.w.clone()
        before = sim.clock(be.instrument).calls["pulse_slice_masked"]
        t.pulse(n)
        # per wordline: round 1 (+, -), round 2 (+, -): 4 commands, not 8 by bitline
        assert sim.clock(be.instrument).calls["pulse_slice_masked"] - before == 4
        moved = torch.sign(be.instrument._tile.w - w0)[:6, :6]
        assert torch.equal(moved, torch.sign(n).to(moved.dtype))
        real = be.instrument.pulse_slice_masked

        def refuse(chan, voltage, nanos, mask):
            raise sim.ArC2Error("FPGA Error")
        be.instrument.pulse_slice_masked = refuse
        with pytest.raises(BackendError, match=r"devices row 2 \(wordline 2, channel 17\), "
                           r"columns \[0, 2, 4\] \(bitline channels \[15, 14, 13\]\)"):
            t.pulse(n)
        be.instrument.pulse_slice_masked = real


def test_reads_do_not_depend_on_the_current_sign_convention(monkeypatch):
    """|I| / V: an instrument reporting the current into the channel (negative) reads the
    same weights."""
    with open_backend(sim_url(DEVICES)) as be:
        t = be.allocate("t", 3, 3)
        t.pulse(torch.tensor([[1, 2, 3], [0, -1, -2], [4, 0, -4]], dtype=torch.int32))
        w = t.read()
        real = be.instrument.read_slice_masked
        monkeypatch.setattr(be.instrument, "read_slice_masked",
                            lambda chan, mask, vread: -real(chan, mask, vread))
        assert torch.equal(t.read(), w)


def test_reading_a_whole_row_band_uses_read_all():
    with open_backend(sim_url(DEVICES)) as be:
        t = be.allocate("wide", 4, 32)
        t.pulse(torch.arange(4 * 32, dtype=torch.int32).reshape(4, 32) % 5 - 2)
        w = t.read()
        clock = sim.clock(be.instrument)
        assert clock.calls["read_all"] == 1 and clock.calls["read_slice_masked"] == 0
        np.testing.assert_allclose(w.numpy(), be.instrument._tile.w[:4].numpy(), atol=3e-7)


def test_nothing_out_of_limits_reaches_the_instrument(tmp_path):
    with open_backend(sim_url(DEVICES)) as be:
        t = be.allocate("t", 4, 4)
        start = calls(be)
        with pytest.raises(BackendError, match="integer"):
            t.pulse(torch.full((4, 4), float("nan")))
        with pytest.raises(SafetyLimitError, match="1001 exceeds 1000"):
            t.pulse(torch.full((4, 4), 1001, dtype=torch.int32))
        with pytest.raises(BackendError, match="no room"):
            be.allocate("outside", 8, 40)
        assert calls(be) == start
        assert be.capabilities.max_pulses_per_step == 1000
        with be.step():  # the per-step budget over several commands of one step
            t.pulse(torch.full((4, 4), 600, dtype=torch.int32))
            sent = calls(be)
            with pytest.raises(SafetyLimitError, match="max_pulses_per_step=1000"):
                t.pulse(torch.full((4, 4), -500, dtype=torch.int32))
            assert calls(be) == sent
        t.pulse(torch.full((4, 4), -500, dtype=torch.int32))  # a new step
    text = PROFILE.read_text()
    wide = {"max_amplitude_v: 5.0": "max_amplitude_v: 20.0",
            "max_compliance_a: 1.0e-2": "max_compliance_a: 1.0"}  # station limits past the
    for edits, match in (({"amplitude_v: 1.6,": "amplitude_v: 14.0,", **wide}, "ArC TWO's"),
                         ({"amplitude_v: 1.6,": "amplitude_v: 6.0,"}, "exceeds \\+-5.0 V"),
                         ({"width_s: 1.0e-7": "width_s: 4.5e-8"}, "multiple of 10 ns"),
                         ({"width_s: 1.0e-7": "width_s: 2.0e-8"}, "40 ns"),
                         ({"compliance_a: 2.0e-4": "compliance_a: 2.0e-2", **wide}, "ArC TWO"),
                         ({"compliance_a: 2.0e-4": "compliance_a: 7.0e-4"}, "on a pulsed line"),
                         ({"read_voltage_v: 0.2": "read_voltage_v: 4.0"}, "per channel")):
        bad = tmp_path / "bad.yaml"  # instrument ratings (the interlock adds them)
        changed = text
        for old, new in edits.items():
            changed = changed.replace(old, new, 1)
        bad.write_text(changed)
        opened = []
        real = sim.Instrument

        def spy(*a, opened=opened, real=real, **k):
            opened.append(1)
            return real(*a, **k)
        sim.Instrument = spy
        try:
            with pytest.raises(SafetyLimitError, match=match):
                open_backend(sim_url(DEVICES, profile=str(bad)))
        finally:
            sim.Instrument = real
        assert not opened  # refused before an instrument was opened
    for broken in (text.replace("read_voltage_v: 0.2\n", ""),
                   text.replace("read_voltage_v: 0.2", "read_voltage_v: .nan")):
        bad.write_text(broken)
        with pytest.raises(ConfigError, match="bad.yaml: read_voltage_v"):
            open_backend(sim_url(DEVICES, profile=str(bad)))


def test_an_instrument_error_names_the_devices_and_grounds_the_outputs(monkeypatch):
    with open_backend(sim_url(DEVICES)) as be:
        t = be.allocate("t", 4, 4)
        inst = be.instrument
        real = inst.pulse_slice_masked
        count = {"n": 0}

        def flaky(chan, voltage, nanos, mask):
            count["n"] += 1
            if count["n"] == 3:
                raise sim.ArC2Error("FPGA Error: transfer failed")
            return real(chan, voltage, nanos, mask)
        monkeypatch.setattr(inst, "pulse_slice_masked", flaky)
        inst.config_channels([(16, 0.5)], None).execute()  # something not grounded
        with pytest.raises(BackendError) as err:
            t.pulse(torch.ones(4, 4, dtype=torch.int32))
        msg = str(err.value)
        assert "pulse_slice_masked failed on devices rows [0, 1, 2, 3] of column 2" in msg
        assert "bitline 2, channel 14" in msg and "FPGA Error" in msg and "'t'" in msg
        assert inst._grounded.all() and not inst._dc.any()


def test_a_panic_in_the_library_becomes_a_backend_error(monkeypatch):
    """pyarc2's read_* unwrap libarc2's errors: a pyo3 PanicException (a BaseException)."""
    class PanicException(BaseException):
        pass

    with open_backend(sim_url(DEVICES)) as be:
        t = be.allocate("t", 2, 2)

        def panic(*a, **k):
            raise PanicException("called `Result::unwrap()` on an `Err` value: FPGAError")
        monkeypatch.setattr(be.instrument, "read_slice_masked", panic)
        with pytest.raises(BackendError, match="read_slice_masked failed on devices rows "
                           r"\[0, 1\] of column 0.*PanicException"):
            t.read()
        assert be.instrument._grounded.all()


def test_ctrl_c_in_execute_grounds_the_outputs_and_propagates(monkeypatch):
    with open_backend(sim_url(DEVICES)) as be:
        t = be.allocate("t", 4, 4)
        inst = be.instrument
        real = inst.execute
        state = {"armed": True}

        def interrupted():
            if state["armed"]:
                state["armed"] = False
                inst.config_channels([(16, 0.5)], None)
                real()
                raise KeyboardInterrupt
            return real()
        monkeypatch.setattr(inst, "execute", interrupted)
        with pytest.raises(KeyboardInterrupt):
            t.pulse(torch.ones(4, 4, dtype=torch.int32))
        assert inst._grounded.all() and not inst._dc.any()


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_grounds_the_outputs(monkeypatch, signame):
    """hil's orderly stop (the signal becomes Interrupted, a KeyboardInterrupt) arriving
    inside an instrument call: outputs grounded, the stop propagates. This test sets its
    own signal dispositions and restores them."""
    import signal

    from hil import interrupts
    sig = getattr(signal, signame)
    saved = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    interrupts.install()
    try:
        with open_backend(sim_url(DEVICES)) as be:
            t = be.allocate("t", 4, 4)
            inst = be.instrument
            real = inst.execute
            armed = [True]

            def stopped():
                if not armed:
                    return real()  # make_safe's own execute
                armed.clear()
                inst.config_channels([(16, 0.5)], None)
                real()
                os.kill(os.getpid(), sig)  # the handler raises here
                return inst
            monkeypatch.setattr(inst, "execute", stopped)
            with pytest.raises(interrupts.Interrupted) as stop:
                t.pulse(torch.ones(4, 4, dtype=torch.int32))
            assert stop.value.signum == sig
            assert inst._grounded.all() and not inst._dc.any()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        interrupts.reset()


def test_close_grounds_and_the_backend_refuses_afterwards():
    be = open_backend(sim_url(DEVICES))
    t = be.allocate("t", 2, 2)
    inst = be.instrument
    inst.config_channels([(16, 0.5), (0, -0.5)], None).execute()
    be.close()
    assert inst._grounded.all() and not inst._dc.any() and inst._backend.closed
    be.close()  # twice is fine
    with pytest.raises(BackendError, match="closed"):
        t.read()


def test_calibrated_weight_map_and_its_polarity(tmp_path):
    calib = tmp_path / "c.h5"
    write_weight_map(str(calib), {"t": (5e-5, -2.5e-5)})  # weight up = conductance down
    with open_backend(sim_url(DEVICES, calib=str(calib))) as be:
        t = be.allocate("t", 2, 2)
        w0 = t.read()
        t.pulse(torch.tensor([[3, 0], [0, -3]], dtype=torch.int32))
        dw = t.read() - w0
        assert dw[0, 0] > 0 and dw[1, 1] < 0 and dw[0, 1] == 0 and dw[1, 0] == 0
        g = be.instrument._tile.w  # the devices: potentiating raised w (and G)
        assert g[0, 0] < 0 < g[1, 1]
    with pytest.raises(ConfigError, match="no weight map for this tile"):
        with open_backend(sim_url(DEVICES, calib=str(calib))) as be:
            be.allocate("other", 2, 2)


def test_profile_places_named_tiles(tmp_path):
    prof = tmp_path / "placed.yaml"
    prof.write_text(PROFILE.read_text().replace(
        "tiles: {}", "tiles: {fc1.W: {row: 16, col: 8}, big: {row: 30, col: 0}}"))
    with open_backend(sim_url(DEVICES, profile=str(prof))) as be:
        w = be.allocate("fc1.W", 4, 4)
        free = be.allocate("free", 4, 4)  # first fit below the placed ones
        assert (w.place.row, w.place.col) == (16, 8) and (free.place.row, free.place.col) == (20, 0)
        w.pulse(torch.eye(4, dtype=torch.int32) * 2)
        moved = (be.instrument._tile.w != 0).nonzero().tolist()
        assert moved == [[16 + k, 8 + k] for k in range(4)]
        with pytest.raises(SafetyLimitError, match="outside array"):
            be.allocate("big", 4, 4)


def test_url_errors_are_one_clear_line():
    with pytest.raises(BackendURLError, match="firmware"):
        open_backend("arc2://0")
    with pytest.raises(BackendURLError, match="instrument id"):
        open_backend("arc2://zero?firmware=fw.bin")
    with pytest.raises(BackendURLError, match="unknown parameter"):
        open_backend(sim_url(DEVICES, speed=3))
    with pytest.raises(ConfigError, match="no such mapping"):
        open_backend(sim_url(DEVICES, mapping="nope"))
    pytest.importorskip("pyarc2")
    with pytest.raises(BackendError, match="cannot open ArC TWO 0"):
        open_backend("arc2://0?firmware=/nonexistent/fw.bin")


def test_mapping_files(tmp_path):
    from drivers.arc2.mapping import load_mapping

    m = load_mapping("standard32")
    assert m.shape == (32, 32) and m.words[0] == 16 and m.bits[0] == 15
    bad = tmp_path / "m.toml"
    bad.write_text('[config]\nwords = 2\nbits = 2\n[mapping]\nwords = [16, 0]\nbits = [1, 2]\n')
    with pytest.raises(ConfigError, match="m.toml: mapping.words: channels \\[0\\]"):
        load_mapping(str(bad))
    bad.write_text('[config]\nwords = 2\nbits = 2\nmask = [[0, 0], [5, 1]]\n'
                   '[mapping]\nwords = [16, 17]\nbits = [1, 2]\n')
    with pytest.raises(ConfigError, match="config.mask"):
        load_mapping(str(bad))
    bad.write_text('[config]\nwords = 2\nbits = 2\nmask = [[0, 0], [1, 1]]\n'
                   '[mapping]\nwords = [17, 16]\nbits = [2, 1]\n')
    small = load_mapping(str(bad))
    assert small.usable.tolist() == [[True, False], [False, True]]
    url = sim_url(DEVICES, mapping=str(bad))
    with open_backend(url) as be:
        with pytest.raises(SafetyLimitError, match="masks out"):
            be.allocate("t", 2, 2)
        t = be.allocate("one", 1, 1)
        t.pulse(torch.tensor([[2]], dtype=torch.int32))
        assert be.instrument._tile.w[0, 0] > 0


def test_station_benchmark_rows_on_a_small_tile():
    """benchmarks/station_arc2.py's rows (modelled instrument time, deterministic)."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "station_arc2.py"
    spec = importlib.util.spec_from_file_location("station_arc2", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {r["method"]: r for r in bench.device_pulse_rows(size=8)}
    assert set(rows) == set(bench.METHODS)
    assert len({r["device_pulses"] for r in rows.values()}) == 1
    assert rows["pulse_one chained"]["calls"] == rows["pulse_one chained"]["device_pulses"] + 2
    assert rows["grouped"]["calls"] < rows["pulse_one chained"]["calls"]
    assert rows["grouped"]["pulse_time_vs_each"] < 0.1


def test_one_controlling_process_per_instrument(tmp_path):
    """An exclusive flock per port: a second open (another open file description, in this
    process or any other) is refused naming the holder, until the first one releases."""
    from drivers.arc2.backend import port_lock

    release = port_lock(0, str(tmp_path))
    with pytest.raises(BackendError, match=f"already controlled by pid {os.getpid()}"):
        port_lock(0, str(tmp_path))
    port_lock(1, str(tmp_path))()  # another instrument is free
    release()
    port_lock(0, str(tmp_path))()
