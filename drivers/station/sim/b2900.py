"""A simulated Keysight B2900 series SMU (B2901/B2902) behind its SCPI command set: voltage
source in DC or pulse shape, triggered pulse trains (:TRIG:COUN, :INIT), spot and array
measurements, current compliance with its trip flag, output relay. Nothing reaches the chip
unless the output is on and a trigger (INIT) or a spot measurement (MEAS) runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from drivers.station.sim.chip import SimChip
from drivers.station.sim.scpi import Call, ScpiError, ScpiInstrument
from drivers.station.timing import KEYSIGHT

V_MAX = 210.0  # B2900 User's Guide, "Specifications": +-210 V maximum voltage (B2901/B2902)
I_MAX = 3.03  # +-3.03 A DC maximum (same table)
MAX_COUNT = KEYSIGHT.max_train
SHAPES = {"DC": "DC", "PULSe": "PULS"}


@dataclass
class _Channel:
    mode: str = "VOLT"
    shape: str = "DC"
    volt: float = 0.0  # immediate (DC / pulse base) level
    volt_trig: float = 0.0  # triggered (pulse peak) level
    width: float = 1e-4
    delay: float = 0.0
    compliance: float = 1e-4
    aperture: float = 1e-4
    count: int = 1
    period: float = 1e-3
    output: bool = False
    tripped: bool = False
    fetched: list[float] = field(default_factory=list)


class B2900(ScpiInstrument):
    """One B2900 SMU (``channels`` 1 or 2) acting on a simulated chip."""

    def __init__(self, chip: SimChip, channels: int = 1, model: str = "B2902B"):
        super().__init__()
        self.chip = chip
        self.n_channels = channels
        self.idn = f"Keysight Technologies,{model},SIM0001,analog-hil sim"
        self.t = KEYSIGHT
        self.reset()
        a = self.add
        a(":SOURce#:FUNCtion:MODE", self._func_mode)
        a(":SOURce#:FUNCtion:MODE?", lambda c: self._ch(c).mode)
        a(":SOURce#:FUNCtion[:SHAPe]", self._shape)
        a(":SOURce#:FUNCtion[:SHAPe]?", lambda c: self._ch(c).shape)
        a(":SOURce#:VOLTage[:LEVel][:IMMediate][:AMPLitude]", self._volt)
        a(":SOURce#:VOLTage[:LEVel][:IMMediate][:AMPLitude]?", lambda c: f"{self._ch(c).volt:+.6E}")
        a(":SOURce#:VOLTage[:LEVel]:TRIGgered[:AMPLitude]", self._volt_trig)
        a(":SOURce#:VOLTage[:LEVel]:TRIGgered[:AMPLitude]?",
          lambda c: f"{self._ch(c).volt_trig:+.6E}")
        a(":SOURce#:PULSe:WIDTh", self._width)
        a(":SOURce#:PULSe:WIDTh?", lambda c: f"{self._ch(c).width:+.6E}")
        a(":SOURce#:PULSe:DELay", self._delay)
        a(":SENSe#:CURRent[:DC]:PROTection[:LEVel]", self._compliance)
        a(":SENSe#:CURRent[:DC]:PROTection[:LEVel]?", lambda c: f"{self._ch(c).compliance:+.6E}")
        a(":SENSe#:CURRent[:DC]:PROTection:TRIPped?", self._trip)
        a(":SENSe#:CURRent[:DC]:APERture", self._aperture)
        a(":SENSe#:FUNCtion[:ON]", self._sense_func)
        a(":TRIGger#[:ALL]:COUNt", self._count)
        a(":TRIGger#[:ALL]:COUNt?", lambda c: str(self._ch(c).count))
        a(":TRIGger#[:ALL]:SOURce", self._trig_source)
        a(":TRIGger#[:ALL]:TIMer", self._period)
        a(":INITiate[:IMMediate][:ALL]", self._init)
        a(":OUTPut#[:STATe]", self._output)
        a(":OUTPut#[:STATe]?", lambda c: "1" if self._ch(c).output else "0")
        a(":MEASure:CURRent[:DC]?", self._measure)
        a(":FETCh:ARRay:CURRent[:DC]?", self._fetch)

    def reset(self) -> None:
        self.channels = {i: _Channel() for i in range(1, self.n_channels + 1)}
        self.trig_source = "AINT"

    # -- helpers -----------------------------------------------------------------------------
    def _ch(self, c: Call) -> _Channel:
        if c.suffix not in self.channels:
            raise ScpiError(-114, f"channel {c.suffix}")
        return self.channels[c.suffix]

    def _list_channel(self, c: Call) -> _Channel:
        """The channel of a '(@n)' parameter (the default channel 1 without one)."""
        if not c.params:
            return self.channels[1]
        if len(c.params) > 1:
            raise ScpiError(-108)
        text = c.params[0].replace(" ", "")
        if not (text.startswith("(@") and text.endswith(")") and text[2:-1].isdigit()):
            raise ScpiError(-104, f"channel list expected, got {c.params[0]!r}")
        n = int(text[2:-1])
        if n not in self.channels:
            raise ScpiError(-222, f"channel {n}")
        return self.channels[n]

    def _set(self, c: Call) -> _Channel:
        c.need(1)
        return self._ch(c)

    # -- settings ----------------------------------------------------------------------------
    def _func_mode(self, c: Call) -> None:
        ch = self._set(c)
        mode = c.choice(0, {"VOLTage": "VOLT", "CURRent": "CURR"})
        if mode != "VOLT":
            raise ScpiError(-221, "this simulation sources voltage only")
        ch.mode = mode

    def _shape(self, c: Call) -> None:
        ch = self._set(c)
        ch.shape = c.choice(0, SHAPES)

    def _volt(self, c: Call) -> None:
        ch = self._set(c)
        ch.volt = c.number(0, -V_MAX, V_MAX, 0.0)

    def _volt_trig(self, c: Call) -> None:
        ch = self._set(c)
        ch.volt_trig = c.number(0, -V_MAX, V_MAX, 0.0)

    def _width(self, c: Call) -> None:
        ch = self._set(c)
        ch.width = c.number(0, self.t.min_pulse_width_s, self.t.max_pulse_width_s, 1e-4)

    def _delay(self, c: Call) -> None:
        ch = self._set(c)
        ch.delay = c.number(0, 0.0, 99999.9, 0.0)

    def _compliance(self, c: Call) -> None:
        ch = self._set(c)
        ch.compliance = c.number(0, 1e-9, I_MAX, 1e-4)

    def _aperture(self, c: Call) -> None:
        ch = self._set(c)
        ch.aperture = c.number(0, self.t.min_aperture_s, self.t.max_aperture_s, 1e-4)

    def _sense_func(self, c: Call) -> None:
        self._ch(c)
        if not c.params:
            raise ScpiError(-109)
        for i in range(len(c.params)):
            c.choice(i, {"CURRent": "CURR", "VOLTage": "VOLT"})

    def _count(self, c: Call) -> None:
        ch = self._set(c)
        ch.count = c.integer(0, 1, MAX_COUNT)

    def _trig_source(self, c: Call) -> None:
        self._set(c)
        self.trig_source = c.choice(0, {"AINT": "AINT", "TIMer": "TIM", "BUS": "BUS"})

    def _period(self, c: Call) -> None:
        ch = self._set(c)
        ch.period = c.number(0, self.t.min_period_s, 1e5, 1e-3)

    def _output(self, c: Call) -> None:
        ch = self._set(c)
        on = c.boolean(0)
        if on != ch.output:
            self.chip.clock.spend("output", 1e-3)  # ASSUMED: the output relay's switching
        ch.output = on
        ch.tripped = False

    # -- actions -----------------------------------------------------------------------------
    def _init(self, c: Call) -> None:
        """Run the transient: ``count`` triggers of the timer; in pulse shape each one is a
        pulse of VOLT:TRIG for WIDTh from the VOLT base; the peak current is recorded."""
        ch = self._list_channel(c)
        if ch.shape == "PULS" and ch.width + ch.delay > ch.period and ch.count > 1:
            raise ScpiError(-221, "pulse width + delay exceed the trigger period")
        ch.fetched = []
        if not ch.output:  # the output relay is open: the trigger runs into nothing
            self.chip.clock.spend("trigger", ch.count * ch.period, ch.count)
            ch.fetched = [0.0] * ch.count
            return
        if ch.shape == "PULS":
            per, pulses = max(ch.period, ch.width + ch.delay), ch.count
        else:  # DC: the output steps to VOLT:TRIG and stays: one long stress, not a train
            per, pulses = ch.period, 1
        peak = self.chip.pulse(ch.volt_trig, pulses, ch.compliance)
        ch.tripped = ch.tripped or peak.tripped
        ch.fetched = [peak.current_a] * min(ch.count, 1000)
        self.chip.clock.spend("pulse", ch.count * per, ch.count)

    def _measure(self, c: Call) -> str:
        ch = self._list_channel(c)
        self.chip.clock.spend("measure", ch.aperture + self.t.measure_overhead_s)
        if not ch.output:
            return f"{0.0:+.6E}"
        if abs(ch.volt) >= self.chip.threshold_v:  # a "read" that switches: the bias stresses
            self.chip.pulse(ch.volt, 1, ch.compliance)
        r = self.chip.bias(ch.volt, ch.compliance)
        ch.tripped = ch.tripped or r.tripped
        return f"{r.current_a:+.6E}"

    def _fetch(self, c: Call) -> str:
        ch = self._list_channel(c)
        return ",".join(f"{i:+.6E}" for i in ch.fetched) or f"{0.0:+.6E}"

    def _trip(self, c: Call) -> str:
        ch = self._list_channel(c)
        return "1" if ch.tripped else "0"
