"""What makes the station driver fast, and that it changes nothing the devices see: cold
switching (relays move together, only while the SMU sources 0 V), RLv2's gradient pulses and
transfer read of P fused into one pulse_read, and matrices of several frames (a chip with more
lines than one mainframe has outputs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from station_profiles import shipped, write_changed

from drivers.station.sim.station import SimStation
from drivers.station.timing import TIMINGS
from hil.algorithms import ResidualLearningV2
from hil.backend import open_backend
from hil.errors import ConfigError, SafetyLimitError

PROFILES = ["keysight-b2900-b2200", "keithley-2600b-707b"]
# the shipped profiles (the Keithley one on TSP-Link) and the 707B on its own connection
VARIANTS = [(PROFILES[0], {}), (PROFILES[1], {}), (PROFILES[1], {"matrix.tsplink_node": None})]
SIM = "sim://?model=power&gamma=2&dw_min=0.02&seed=5"  # no noise, no device variation


def write_profile(tmp_path: Path, name: str, frames: bool = False, **changes) -> str:
    """A shipped profile with dotted-key changes; ``frames``: one card on the first matrix
    frame and a second frame of one card, an 8x8 array whose columns cross from one to the
    other (outputs 1-8 rows, 9-16 columns; one card has 12)."""
    raw = shipped(name)
    if frames:
        raw["matrix"]["cards"] = 1
        node = changes.get("matrix.tsplink_node", raw["matrix"].get("tsplink_node"))
        raw["matrix"]["expansion"] = [{"resource": "GPIB0::9::INSTR", "cards": 1,
                                       "idn_contains": raw["matrix"]["idn_contains"],
                                       **({"tsplink_node": node + 1} if node else {})}]
        raw["arrays"] = [{"rows": 8, "cols": 8, "row_lines": "1-8", "col_lines": "9-16"}]
        raw["limits"]["allowed_rows"] = [0, 7]
        raw["limits"]["allowed_cols"] = [0, 7]
    return write_changed(tmp_path, raw, f"{name}-{'frames' if frames else 'one'}", **changes)


def _source_level(station: SimStation) -> float:
    smu = station.smu
    if hasattr(smu, "channels"):  # B2900: the DC level, which is also the pulse base
        ch = smu.channels[1]
        return ch.volt if ch.output else 0.0
    return smu.s["levelv"] if smu.s["output"] else 0.0


@pytest.mark.parametrize(("name", "change"), VARIANTS)
def test_cold_switching_moves_relays_only_at_zero_volts(tmp_path, name, change):
    with open_backend(f"station://{write_profile(tmp_path, name, **change)}?sim={SIM}") as be:
        station, levels, steps = be.chip.station, [], []
        for frame in station.frames:
            switch = frame._switch

            def spy(opening, closing, switch=switch):
                levels.append(_source_level(station))
                before = station.clock.by_kind.get("relay", 0.0)
                switch(opening, closing)
                steps.append(station.clock.by_kind.get("relay", 0.0) - before)
            frame._switch = spy
        tile = be.allocate("t", 4, 4)
        tile.pulse(torch.full((4, 4), 3, dtype=torch.int32))
        tile.read()
        tile.pulse_read([torch.full((4, 4), -1, dtype=torch.int32)] * 2)
        assert be.dialect.cold and len(levels) > 40
        assert set(levels) == {0.0}  # never switched under a bias
        t = TIMINGS[be.profile.dialect]
        # a route change (row and column, or a column step) settles once, not open + close
        assert max(steps) == pytest.approx(max(t.relay_open_s, t.relay_close_s))


def test_single_route_rule_refuses_two_inputs_on_one_output():
    st = SimStation(yaml_profile("keysight-b2900-b2200"))
    try:
        m = st.matrix
        m.message(":ROUT:CONN:RULE ALL,SROU;:ROUT:CONN:SEQ ALL,NSEQ")
        m.message(":ROUT:CLOS (@10101,10201)")  # force and ground on one output
        assert m.refused[-1][1] == -221 and not m.closed
        m.message(":ROUT:CLOS (@10101,10212)")
        t = st.clock.seconds
        m.message(":ROUT:CLOS (@10103)")  # input 1 moves: its old output opens with it
        assert sorted(m.closed) == [(1, 1, 3), (1, 2, 12)] and m.refused == [
            (":ROUT:CLOS (@10101,10201)", -221)]
        settle = max(TIMINGS["keysight"].relay_open_s, TIMINGS["keysight"].relay_close_s)
        assert st.clock.seconds - t == pytest.approx(settle)
        # auto configuration mode: the cards are one matrix (card 0, outputs 1..36 here), so
        # the rule holds across cards: input 1 moves from card 1 to card 3 in one settle
        m.message("*RST;:ROUT:FUNC ACON;:ROUT:CONN:RULE ALL,SROU;:ROUT:CONN:SEQ ALL,NSEQ")
        assert m.message(":ROUT:FUNC?") == "ACON"
        m.message(":ROUT:CLOS (@00101,00236)")
        t = st.clock.seconds
        m.message(":ROUT:CLOS (@00125)")
        assert sorted(m.closed) == [(3, 1, 1), (3, 2, 12)]
        assert st.clock.seconds - t == pytest.approx(settle)
        assert m.message(":ROUT:CLOS:CARD? 0") == "(@00125,00236)"
        m.message(":ROUT:CLOS (@10101)")  # normal-mode channel: refused in auto mode
        assert m.refused[-1][1] == -222
    finally:
        st.close()


def yaml_profile(name: str):
    from drivers.station.profile import load_station_profile

    return load_station_profile(name)


@pytest.mark.parametrize("name", PROFILES)
def test_rlv2_fused_step_gives_the_same_devices_as_sim(tmp_path, name):
    """The fused pulse_read of P is taken, and W, P and H end bit for bit as on sim://."""
    g = torch.Generator().manual_seed(2)
    grads = [0.05 * torch.randn(4, 4, generator=g) for _ in range(3)]

    def train(be):
        alg = ResidualLearningV2(be, (4, 4), lr=0.5, transfer_lr=0.5, prefix="fc")
        calls = []
        p = alg.tiles["P"]
        fused = p.pulse_read
        p.pulse_read = lambda schedule: calls.append(len(schedule)) or fused(schedule)
        for grad in grads:
            alg.weight()
            alg.step(grad)
        return alg, calls

    with open_backend(f"station://{write_profile(tmp_path, name)}?sim={SIM}") as be:
        alg, calls = train(be)
        devices = be.chip.weights(0)
        w_dev, p_dev = devices[:4, :4].clone(), devices[:4, 4:8].clone()
        h = alg.H.clone()
    assert calls == [1, 1, 1]  # one pulse_read of P per step
    with open_backend(SIM) as ref:
        ref_alg, _ = train(ref)
        assert torch.equal(w_dev, ref_alg.tiles["W"].w)
        assert torch.equal(p_dev, ref_alg.tiles["P"].w)
    torch.testing.assert_close(h, ref_alg.H, rtol=0, atol=1e-6)  # reads: instrument digits


@pytest.mark.parametrize(("name", "change"), VARIANTS)
def test_two_matrix_frames(tmp_path, name, change):
    """An array whose lines cross from one frame to the next: the devices get exactly the
    counts asked for, every command is valid on its frame, and every frame ends open."""
    prof = write_profile(tmp_path, name, frames=True, **change)
    g = torch.Generator().manual_seed(0)
    prog = [torch.randint(-3, 4, (8, 8), generator=g, dtype=torch.int32) for _ in range(3)]
    with open_backend(f"station://{prof}?sim={SIM}") as be:
        assert len(be.dialect.frames) == 2
        tile = be.allocate("t", 8, 8)
        for n in prog:
            tile.pulse(n)
        got = tile.read()
        station_w = be.chip.weights(0)
        sent = [c.sent for c in (be.dialect.smu, *be.dialect.frames)]
        assert all(f.relay_operations > 10 for f in be.chip.station.frames)  # both switched
        profile, station = be.profile, be.chip.station
    assert all(not f.closed for f in station.frames)  # close() opened every frame
    with open_backend(SIM) as ref:
        arr = ref.allocate("array0", 8, 8)
        for n in prog:
            arr.pulse(n)
        assert torch.equal(station_w, arr.w)
        torch.testing.assert_close(got, arr.read(), rtol=0, atol=1e-6)
    fresh = SimStation(profile)
    try:
        for inst, lines in zip((fresh.smu, *fresh.frames), sent, strict=True):
            for line in lines:
                inst.message(line)
            assert inst.refused == [], inst.refused
    finally:
        fresh.close()


@pytest.mark.parametrize(("name", "change"), VARIANTS)
def test_two_frames_safe_after_an_interrupt_and_interlock_first(tmp_path, name, change,
                                                                 monkeypatch):
    prof = write_profile(tmp_path, name, frames=True, **change)
    with open_backend(f"station://{prof}?sim={SIM}") as be:
        tile = be.allocate("t", 8, 8)
        conn = be.dialect.smu
        write, seen = conn.write, []

        def interrupted(line: str) -> None:
            seen.append(line)
            if len(seen) == 2:  # after the output went on: mid-pulse (a batch on TSP-Link)
                raise KeyboardInterrupt
            write(line)

        conn.write = interrupted
        with pytest.raises(KeyboardInterrupt):
            tile.pulse(torch.full((8, 8), 2, dtype=torch.int32))
        conn.write = write
        assert all(not f.closed for f in be.chip.station.frames)
    import drivers.station.url as station_url

    def no_connection(*a, **k):
        raise AssertionError("a connection was opened")

    monkeypatch.setattr(station_url, "LocalConnection", no_connection)
    bad = write_profile(tmp_path, name, frames=True,
                        **{**change, "pulses.potentiate.amplitude_v": 5.0})
    with pytest.raises(SafetyLimitError):
        open_backend(f"station://{bad}?sim=sim://")


@pytest.mark.parametrize(("change", "field"), [
    ({"matrix.expansion": [{"resource": "GPIB0::9::INSTR", "idn_contains": "B220",
                            "cards": 9}]}, "matrix.expansion.0.cards"),
    ({"matrix.expansion": [{"resource": "GPIB0::22::INSTR", "idn_contains": "B220",
                            "cards": 1}]}, "already a frame"),
    ({"arrays": [{"rows": 2, "cols": 2, "row_lines": "1-2", "col_lines": "48-49"}]},
     "outside the matrix outputs 1..36"),
    ({"matrix.sense_input": 3}, "switching=cold"),
    ({"matrix.tsplink_node": 2}, "TSP-Link joins Keithley"),
])
def test_frame_and_switching_errors_name_the_field(tmp_path, change, field):
    bad = write_profile(tmp_path, PROFILES[0], **change)
    with pytest.raises(ConfigError, match=field) as info:
        open_backend(f"station://{bad}?sim=sim://")
    assert "\n" not in str(info.value) and bad in str(info.value)


def test_two_frames_served_as_visa_resources(tmp_path):
    """serve-virtual-chip serves every frame; the URL it prints names them (matrix2=...)."""
    from drivers.station.profile import load_station_profile
    from drivers.station.sim.server import StationServer

    prof = write_profile(tmp_path, PROFILES[1], frames=True)
    with StationServer(load_station_profile(prof), prof, "sim://?seed=1") as server:
        assert set(server.resources) == {"smu", "matrix", "matrix2"}
        assert "&matrix2=TCPIP0::127.0.0.1::" in server.url
        with open_backend(server.url) as be:
            tile = be.allocate("t", 8, 8)
            tile.pulse(torch.ones(8, 8, dtype=torch.int32))
            assert torch.isfinite(tile.read()).all()
        assert server.sim.chip.device_pulses == 64
        assert all(not f.closed for f in server.sim.frames)


def test_tsplink_batches_devices_and_stops_at_a_trip(tmp_path):
    """On TSP-Link a whole tile read is one message the SMU runs; a compliance trip in the
    middle of a batch names its device and nothing after it in the batch runs."""
    from drivers.station.dialect import ComplianceTrip

    prof = write_profile(tmp_path, PROFILES[1], **{"read.compliance_a": 5e-6})
    with open_backend(f"station://{prof}?sim=sim://?model=power&init=-0.5") as be:
        tile = be.allocate("t", 2, 2)
        before = be.dialect.messages
        tile.read()
        assert be.dialect.messages - before <= 2  # the batch, then back to 0 V
        up = torch.zeros(2, 2, dtype=torch.int32)
        up[0, 1] = 900  # device (0, 1) to a conductance above 5 uA / 0.1 V
        tile.pulse(up)
        counts = be.chip.clock.counts
        reads = counts.get("measure", 0)
        with pytest.raises(ComplianceTrip, match=r"device \(0, 1\)"):
            tile.read()
        assert counts["measure"] - reads == 2  # (0, 0) and (0, 1); (1, 0), (1, 1) never
        station = be.chip.station
        assert station.smu.s["output"] == 0 and not station.matrix.closed  # safe


def test_tsplink_node_identity():
    """A TSP-Link node identifies by its model; a node not on the network says so (no
    error, no hang), and the driver refuses it in one line."""
    from drivers.station.dialect import LocalConnection, NodeConnection

    st = SimStation(yaml_profile(PROFILES[1]))
    try:
        smu = LocalConnection(st.server("smu"), "sim-smu")
        assert NodeConnection(smu, 2).identity() == "TSP-Link node 2: Model 707B"
        assert NodeConnection(smu, 5).identity() == "TSP-Link node 5: Model none"
        assert st.smu.refused == []
    finally:
        st.close()
