"""The simulated instruments as a lab script sees them: the SCPI parser's rules, the error
queue, relays, an SMU that does nothing unless on and triggered, a device stressed only when
both its lines are routed, a sub-threshold bias moving nothing, and the modelled clock."""

from __future__ import annotations

import pytest
import torch

from drivers.station.profile import load_station_profile
from drivers.station.sim.station import SimStation
from drivers.station.timing import KEYSIGHT


@pytest.fixture
def keysight():
    st = SimStation(load_station_profile("keysight-b2900-b2200"), "sim://?seed=3")
    yield st
    st.close()


def test_scpi_parser_rules(keysight):
    smu = keysight.smu
    assert smu.message("*IDN?").startswith("Keysight Technologies,B2902B")
    # long and short forms, optional nodes, numeric suffixes, MIN/MAX, ; chains
    smu.message(":SOURce2:VOLTage:LEVel:IMMediate:AMPLitude 1.5")
    assert smu.message(":SOUR2:VOLT?") == "+1.500000E+00"
    assert smu.message(":sour1:volt 0.25;:SOUR1:VOLT?;*OPC?") == "+2.500000E-01;1"
    smu.message(":SOUR1:PULS:WIDT MIN")
    assert smu.message(":SOUR1:PULS:WIDT?") == f"{KEYSIGHT.min_pulse_width_s:+.6E}"
    # the path rule: a header without a colon continues at the previous command's node
    assert smu.message(":SENS1:CURR:PROT 2e-3;PROT?") == "+2.000000E-03"
    # errors: FIFO, standard codes, then "No error"
    smu.message(":SOUR3:VOLT 1")  # no channel 3
    smu.message(":SOUR1:VOLT")  # missing parameter
    smu.message(":OUTP1 MAYBE")
    smu.message(":BOGUS:CMD")
    codes = [int(smu.message(":SYST:ERR?").split(",")[0]) for _ in range(5)]
    assert codes == [-114, -109, -224, -113, 0]
    for _ in range(40):
        smu.message(":BOGUS")
    assert smu.message(":SYST:ERR:COUN?") == "30"
    smu.message("*CLS")
    assert smu.message(":SYST:ERR?") == '+0,"No error"'
    smu.message(":SOUR1:VOLT 0.7;*RST")
    assert smu.message(":SOUR1:VOLT?") == "+0.000000E+00"


def test_a_device_moves_only_when_routed_on_and_triggered(keysight):
    smu, matrix, chip = keysight.smu, keysight.matrix, keysight.chip
    w0 = chip.weights(0).clone()
    smu.message(":SOUR1:FUNC:SHAP PULS;:SOUR1:VOLT:TRIG 1.2;:SOUR1:PULS:WIDT 1e-4;"
                ":TRIG1:TIM 2e-4;:TRIG1:COUN 5;:SENS1:CURR:PROT 1e-3")
    smu.message(":INIT (@1)")  # output off: nothing
    matrix.message(":ROUT:CLOS (@10101)")  # row 0 on force, no column on ground
    smu.message(":OUTP1 ON;:INIT (@1)")
    assert chip.device_pulses == 0 and torch.equal(chip.weights(0), w0)
    t = chip.clock.seconds
    matrix.message(":ROUT:CLOS (@20206)")  # column 1 (output 18) on ground: device (0, 1)
    assert chip.clock.seconds - t == pytest.approx(KEYSIGHT.relay_close_s)
    smu.message(":SOUR1:VOLT:TRIG 0.3;:INIT (@1)")  # below the switching threshold
    assert chip.device_pulses == 0 and torch.equal(chip.weights(0), w0)
    t = chip.clock.seconds
    smu.message(":SOUR1:VOLT:TRIG 1.2;:INIT (@1)")
    assert chip.clock.seconds - t == pytest.approx(5 * 2e-4)  # five periods
    moved = chip.weights(0) != w0
    assert chip.device_pulses == 5 and moved[0, 1] and int(moved.sum()) == 1
    assert smu.message(":SENS1:CURR:PROT:TRIP? (@1)") == "0"
    matrix.message(":ROUT:OPEN:CARD ALL")
    assert matrix.message(":ROUT:CLOS:CARD? 1") == "(@)"


def test_keithley_tsp_objects():
    st = SimStation(load_station_profile("keithley-2600b-707b"), "sim://?seed=3")
    try:
        smu, matrix, chip = st.smu, st.matrix, st.chip
        assert smu.message("print(localnode.model)") == "2602B"
        matrix.message('channel.close("1A01")')
        matrix.message('channel.exclusiveclose("1A01,2B06")')  # row 0, column 1 (output 18)
        assert matrix.message('print(channel.getclose("allslots"))') == "1A01;2B06"
        smu.message("smua.source.levelv = 0.1 smua.source.output = smua.OUTPUT_ON")
        i = float(smu.message("print(smua.measure.i())"))
        assert 1e-7 < i < 1e-5
        for line in ("x = 1 +", "smua.bogus.thing = 1", "smua.source.limiti = 10",
                     'channel.close("7A01")'):
            (matrix if "channel" in line else smu).message(line)
        assert [c for _, c in smu.refused] == [-285, -286, 1101]
        assert matrix.refused[-1][1] == 1115
        assert chip.device_pulses == 0
    finally:
        st.close()
