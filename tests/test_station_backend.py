"""station:// on both simulated stations (Keysight B2900 + B2200A over SCPI, Keithley 2600B +
707B over TSP): the devices get exactly the counts asked for, calibration and RLv2 run end to
end, every command the driver sent is valid for the instrument, and the interlock and the
safe state hold on every error path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from station_profiles import shipped, write_changed

from calibration.calibfile import load_calibration, write_calibration
from calibration.fit import torch_threads
from calibration.measfile import MeasurementWriter
from calibration.pipeline import fit_file
from calibration.protocols import SweepProtocol, characterize, estimate_seconds
from calibration.zeroshift import zero_shift
from drivers.profile import profile_path
from drivers.station.dialect import ComplianceTrip
from drivers.station.profile import station_profile
from drivers.station.sim.station import SimStation
from hil.algorithms import ResidualLearningV2
from hil.backend import open_backend
from hil.errors import BackendError, ConfigError, SafetyLimitError

PROFILES = ["keysight-b2900-b2200", "keithley-2600b-707b"]
SIM = "sim://?model=power&gamma=2&dw_min=0.02&d2d=0.3&seed=5"  # noise off
NOISY = "sim://?model=power&gamma=2&dw_min=0.02&d2d=0.3&c2c=0.1&seed=5"  # as test_calibration_twin


def write_profile(tmp_path: Path, name: str, **changes) -> str:
    """A copy of a shipped profile with some fields changed (dotted keys)."""
    return write_changed(tmp_path, shipped(name), f"{name}-test", **changes)


@pytest.mark.parametrize("name", PROFILES)
def test_scripted_program_reaches_the_devices_bit_for_bit(name):
    g = torch.Generator().manual_seed(0)
    prog = [torch.randint(-4, 5, (8, 8), generator=g, dtype=torch.int32) for _ in range(5)]
    with open_backend(f"station://{name}?sim={SIM}") as be:
        tile = be.allocate("cal", 8, 8)
        reads = []
        for n in prog:
            tile.pulse(n)
            reads.append(tile.read())
        both = tile.pulse_read(prog[:2])
        station_w = be.chip.weights(0)
        sent = be.dialect.smu.sent + be.dialect.matrix.sent
    with open_backend(SIM) as ref:
        arr = ref.allocate("array0", 16, 16)  # the same devices: the chip's array
        expect = []
        for n in prog + prog[:2]:
            full = torch.zeros(16, 16, dtype=torch.int32)
            full[:8, :8] = n
            arr.pulse(full)
            expect.append(arr.read()[:8, :8])
        assert torch.equal(station_w, arr.w)  # what reached the devices: exactly the counts
    got = torch.stack(reads + list(both))
    # the reads went through current = G V, I / V and the weight map: instrument digits
    torch.testing.assert_close(got, torch.stack(expect), rtol=0, atol=1e-6)
    assert len(sent) > 20  # (a TSP-Link station sends a batch of devices per message)


@pytest.mark.parametrize("name", PROFILES)
def test_every_command_sent_is_valid_instrument_syntax(name):
    """Replay the driver's messages against fresh simulated instruments: none refused; and
    the instruments refuse what a real one refuses, with its error."""
    with open_backend(f"station://{name}?sim={SIM}") as be:
        tile = be.allocate("cal", 4, 4)
        tile.pulse(torch.full((4, 4), 2, dtype=torch.int32))
        tile.read()
        tile.pulse_read([torch.full((4, 4), -1, dtype=torch.int32)] * 3)
        smu_sent, matrix_sent = be.dialect.smu.sent, be.dialect.matrix.sent
        profile = be.profile
    fresh = SimStation(profile)
    try:
        for inst, sent in ((fresh.smu, smu_sent), (fresh.matrix, matrix_sent)):
            for line in sent:
                inst.message(line)
            assert inst.refused == [], inst.refused
            assert len(inst.log) >= len(sent) // 2
        if profile.dialect == "keysight":
            fresh.smu.message(":SOUR1:VOLT:BOGUS 1")
            fresh.smu.message(":SOURce1:VOLTage 500")
            fresh.smu.message(":SOUR:PULS:WIDT 1e-6")  # below the 50 us minimum
            fresh.matrix.message(":ROUT:CLOS (@51501)")  # card 5, input 15: no such relay
            assert [c for _, c in fresh.smu.refused] == [-113, -222, -222]
            assert fresh.smu.message(":SYST:ERR?").startswith("-113,")
            assert fresh.matrix.refused[-1][1] == -222
            # short and long forms, optional nodes, chains with the path rule
            assert fresh.smu.message(":SOUR1:VOLT 0.2;:SOURce1:VOLTage:LEVel:IMMediate?") \
                == "+2.000000E-01"
            assert fresh.smu.message(":SENS1:CURR:PROT 1e-3;PROT?") == "+1.000000E-03"
        else:
            fresh.smu.message("smua.source.levelv = 100")  # beyond the 40 V range
            fresh.smu.message("smua.sourze.levelv = 1")  # a typo: indexing nil
            fresh.smu.message("smua.source.levelv = = 1")
            fresh.matrix.message('channel.close("9Z99")')
            assert [c for _, c in fresh.smu.refused] == [1101, -286, -285]
            assert fresh.smu.message("print(errorqueue.next())").startswith("1101\t")
            assert fresh.matrix.refused[-1][1] == 1115
            fresh.matrix.message('channel.close("1A03")')
            assert fresh.matrix.message('print(channel.getclose("allslots"))') == "1A03"
            assert fresh.smu.message("print(python)") == "nil"  # sandboxed Lua
    finally:
        fresh.close()


@pytest.mark.parametrize("name", PROFILES)
def test_interlock_refuses_before_any_byte(tmp_path, name, monkeypatch):
    import drivers.station.url as station_url

    def no_connection(*a, **k):
        raise AssertionError("a connection was opened")

    monkeypatch.setattr(station_url, "VisaConnection", no_connection)
    monkeypatch.setattr(station_url, "LocalConnection", no_connection)
    for change in ({"pulses.potentiate.amplitude_v": 5.0},
                   {"pulses.depress.width_s": 1.0e-5},  # below the SMU's shortest pulse
                   {"read.voltage_v": float("nan")},
                   {"read.voltage_v": 1.5},  # within the limits, but as strong as a pulse
                   {"limits.max_pulses_per_command": 300000000},  # beyond any trigger count
                   {"read.compliance_a": 0.5}):
        bad = write_profile(tmp_path, name, **change)
        refused = ConfigError if "read.voltage_v" in change and change["read.voltage_v"] != \
            change["read.voltage_v"] else SafetyLimitError  # NaN: the profile file is refused
        with pytest.raises(refused):
            open_backend(f"station://{bad}")
        with pytest.raises(refused):
            open_backend(f"station://{bad}?sim=sim://")
    monkeypatch.undo()
    with open_backend(f"station://{name}?sim=sim://") as be:
        tile = be.allocate("cal", 4, 4)
        before = len(be.dialect.smu.sent) + len(be.dialect.matrix.sent)
        too_many = torch.zeros(4, 4, dtype=torch.int32)
        too_many[1, 2] = be.profile.limits.max_pulses_per_command + 1
        with pytest.raises((SafetyLimitError, Exception)) as info:
            tile.pulse(too_many)
        assert "exceeds" in str(info.value)
        with pytest.raises(Exception, match="exceeds"):
            tile.pulse_read([torch.zeros(4, 4, dtype=torch.int32), too_many])
        assert len(be.dialect.smu.sent) + len(be.dialect.matrix.sent) == before
        with be.step():  # the per-step budget over several trains (max_pulses_per_step)
            budget = be.capabilities.max_pulses_per_step
            one = torch.zeros(4, 4, dtype=torch.int32)
            one[0, 0] = budget
            tile.pulse(one)
            sent = len(be.dialect.smu.sent)
            with pytest.raises(SafetyLimitError, match="max_pulses_per_step"):
                tile.pulse(torch.ones(4, 4, dtype=torch.int32))
            assert len(be.dialect.smu.sent) == sent
        with pytest.raises(BackendError, match="no room"):
            be.allocate("outside", 17, 4)


def _station_safe(be) -> bool:
    station = be.chip.station
    relays = station.matrix.closed
    if be.profile.dialect == "keysight":
        return not station.smu.channels[1].output and not relays
    return station.smu.s["output"] == 0 and not relays


@pytest.mark.parametrize("name", PROFILES)
def test_compliance_trip_names_the_device_and_leaves_the_station_safe(tmp_path, name):
    # a read compliance of 1 uA: a device of G > 10 uS at 0.1 V trips it
    prof = write_profile(tmp_path, name, **{"read.compliance_a": 1e-6})
    be = open_backend(f"station://{prof}?sim=sim://?init=0.5")
    try:
        tile = be.allocate("cal", 2, 2)
        with pytest.raises(ComplianceTrip, match=r"device \(0, 0\)"):
            tile.read()
        assert _station_safe(be)
        before = be.chip.device_pulses
        tile.pulse(torch.ones(2, 2, dtype=torch.int32))  # usable again after the error:
        assert be.chip.device_pulses == before + 4  # the output is switched on again
        assert not _station_safe(be)
    finally:
        be.close()
    assert _station_safe(be)
    be.close()  # twice is fine


PROTO = SweepProtocol(pulses=100, cycles=1, sympoint_pairs=5, noise_reads=3, block=50)


def _fit_errors(be, tile_name: str, truth_tile, rows: int, cols: int, tmp_path: Path, tag: str):
    proto = PROTO
    meas = tmp_path / f"{tag}.h5"
    with MeasurementWriter(meas, tag, proto.as_dict()) as w:
        characterize(be, w, {tile_name: (rows, cols)}, proto)
    tiles, prov = fit_file(meas)
    write_calibration(tmp_path / f"{tag}-cal.h5", tiles, prov)
    res = tiles[0]
    dev = truth_tile.devices

    def rel(est, true):
        return float(np.nanmedian(np.abs(est - true) / np.abs(true)))

    v = res.values
    errs = {"dw_min": rel(v["dw_min"].reshape(-1), dev.dw_min.reshape(-1).numpy()),
            "tau_max": rel(v["tau_max"].reshape(-1), dev.tau_max.reshape(-1).numpy())}
    return errs, tmp_path / f"{tag}-cal.h5"


@pytest.mark.parametrize("name", PROFILES)
@torch_threads(1)
def test_calibrate_zero_shift_and_train_on_the_station(tmp_path, name):
    prof = write_profile(tmp_path, name)
    with open_backend(f"station://{prof}?sim={NOISY}") as be:
        truth = be.chip.arrays[0].tile
        est = estimate_seconds(be.allocate("cal", 8, 8), PROTO)
        start = be.instrument_seconds
        errs, calib = _fit_errors(be, "cal", _Sub(truth, 8, 8), 8, 8, tmp_path, "station")
        seconds = be.instrument_seconds - start
        zs = zero_shift(be, load_calibration(calib), pairs=20)
        alg = ResidualLearningV2(be, (4, 4), lr=0.1, transfer_lr=0.3, prefix="fc")
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            alg.step(torch.randn(4, 4, generator=g) * 0.05)
        assert torch.isfinite(alg.read("W")).all()
    with open_backend(NOISY) as ref:
        ref_tile = ref.allocate("cal", 8, 8)
        ref_errs, _ = _fit_errors(ref, "cal", ref_tile, 8, 8, tmp_path, "sim")
    print(name, "station fit errors", errs, "sim:// fit errors", ref_errs,
          f"instrument time {seconds:.1f} s (estimate {est:.1f} s)")
    for key, err in errs.items():
        assert err <= max(0.05, 1.5 * ref_errs[key]), (key, err, ref_errs[key])
    assert zs[0].tile == "cal"
    assert 0.9 * seconds < est < 1.1 * seconds  # the time estimate the CLI prints


class _Sub:
    """The top-left rows x cols devices of the simulated array (the station tile's truth)."""

    def __init__(self, tile, rows: int, cols: int):
        d = tile.devices

        class _D:
            dw_min = d.dw_min[:rows, :cols]
            tau_max = d.tau_max[:rows, :cols]

        self.devices = _D


def test_profile_errors_name_file_and_field(tmp_path):
    from drivers.station.profile import load_station_profile
    from hil.errors import ConfigError

    bad = write_profile(tmp_path, PROFILES[0], **{"arrays": [
        {"rows": 2, "cols": 2, "row_lines": "1-2", "col_lines": "2-3"}]})
    with pytest.raises(ConfigError, match="wired twice"):
        load_station_profile(bad)
    with pytest.raises(ConfigError, match="matrix.cards"):
        station_profile({**yaml.safe_load(profile_path(PROFILES[1]).read_text()),
                         "matrix": {"resource": "x", "idn_contains": "7", "cards": 9,
                                    "force_input": 1, "ground_input": 2}})


@pytest.mark.parametrize("name", PROFILES)
def test_interrupt_and_instrument_errors_leave_the_station_safe(name):
    from drivers.station.dialect import InstrumentError

    be = open_backend(f"station://{name}?sim=sim://")
    try:
        tile = be.allocate("t", 4, 4)
        conn = be.dialect.smu
        write, seen = conn.write, []

        def interrupted(line: str) -> None:
            seen.append(line)
            if len(seen) == 2:  # after switching the output on (on TSP-Link: in the batch)
                raise KeyboardInterrupt  # Ctrl-C in the middle of a pulse
            write(line)

        conn.write = interrupted
        with pytest.raises(KeyboardInterrupt):
            tile.pulse(torch.full((4, 4), 2, dtype=torch.int32))
        conn.write = write
        assert _station_safe(be)
        # an instrument refuses a command: its own code and message, then safe
        if be.profile.dialect == "keysight":
            be.dialect._read = lambda: [":SOUR1:VOLT 500", ":MEAS:CURR? (@1)",
                                        ":SENS1:CURR:PROT:TRIP? (@1)"]
            pattern = r"-222,Data out of range"
        else:
            be.dialect._read = lambda: ("smua.source.levelv = 500 "
                                        "print(smua.measure.i(), smua.source.compliance)")
            pattern = r"1101,Parameter too big"
        tile.pulse(torch.ones(4, 4, dtype=torch.int32))
        with pytest.raises(InstrumentError, match=pattern):
            tile.read()
        assert _station_safe(be)
        # a reading that is no number (SCPI's 9.91E37, NaN) never becomes a weight
        from drivers.station.sim.chip import Compliance
        from hil.errors import ProtocolError

        del be.dialect._read
        be.chip.bias = lambda volts, compliance: Compliance(float("nan"), False)
        with pytest.raises(ProtocolError, match="no valid reading"):
            tile.read()
        assert _station_safe(be)
    finally:
        be.close()
