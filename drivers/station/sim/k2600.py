"""A simulated Keithley 2600B SMU (smua) behind TSP: the source (function, level, limit,
output), the measure (i(), nplc), the trigger model for pulse trains (source list, end-pulse
action on a timer, count, initiate) and the compliance flag. Names, enumerations and ranges
as the 2600B Reference Manual's "TSP command reference" gives them."""

from __future__ import annotations

from drivers.station.sim.chip import SimChip
from drivers.station.sim.tsp import LuaObject, TspError, TspInstrument, number
from drivers.station.timing import KEITHLEY

V_MAX = 40.4  # 2602B/2612B: 40 V range, 40.4 V maximum (2600B Reference Manual, "Ranges")
I_MAX = 3.0  # 3 A range (2601B/2602B), pulsed up to 10 A; DC limit 3 A at 6 V
MAX_COUNT = KEITHLEY.max_train
OUTPUT_DCAMPS, OUTPUT_DCVOLTS = 0, 1  # smua.source.func
OFF, ON = 0, 1
SOURCE_IDLE, SOURCE_HOLD = 0, 1  # smua.trigger.endpulse.action
DISABLE, ENABLE = 0, 1
TIMER_EVENTS = {1: 21, 2: 22}  # trigger.timer[N].EVENT_ID (values ASSUMED, names real)
SOURCE_COMPLETE_EVENT_ID, ARMED_EVENT_ID = 3, 1


class K2600(TspInstrument):
    model = "2602B"
    idn = "Keithley Instruments Inc.,Model 2602B,SIM0003,analog-hil sim"

    def __init__(self, chip: SimChip, links: dict[int, TspInstrument] | None = None):
        """``links``: the matrices on this SMU's TSP-Link network by node number (this SMU is
        node 1, the master); its scripts reach them as ``node[N]``."""
        self.chip = chip
        self.t = KEITHLEY
        self.links = dict(links or {})
        super().__init__()

    def reset(self) -> None:
        """reset(): on a TSP-Link master the whole system, its nodes included (2600B
        Reference Manual, reset())."""
        for node in getattr(self, "links", {}).values():
            node.reset()
        self.s = {"func": OUTPUT_DCVOLTS, "levelv": 0.0, "limiti": 1e-4, "output": OFF,
                  "nplc": 1.0, "compliance": False, "listv": [], "src_action": DISABLE,
                  "endpulse": SOURCE_HOLD, "endpulse_stim": 0, "count": 1,
                  "meas_action": DISABLE, "trig_limiti": 1e-4, "src_stim": 0}
        self.timers = {n: {"delay": 1e-5, "count": 1, "stimulus": 0} for n in TIMER_EVENTS}

    def _setter(self, key: str, lo: float, hi: float, what: str, integer: bool = False):
        def put(value: object) -> None:
            v = number(value, lo, hi, what)
            self.s[key] = int(v) if integer else v
        return put

    def _enum(self, key: str, allowed: tuple[int, ...], what: str):
        def put(value: object) -> None:
            if isinstance(value, bool) or value not in allowed:
                raise TspError(1100, f"Parameter error: {what} = {value!r}")
            self.s[key] = int(value)
        return put

    def _output(self, value: object) -> None:
        self._enum("output", (OFF, ON), "smua.source.output")(value)
        self.chip.clock.spend("output", 1e-3)  # ASSUMED: output relay switching
        self.s["compliance"] = False

    def build(self) -> None:
        s, g = self.s if hasattr(self, "s") else None, self.lua.globals()
        del s
        source = LuaObject(self, {
            "func": (lambda: self.s["func"], self._enum("func", (0, 1), "smua.source.func")),
            "levelv": (lambda: self.s["levelv"],
                       self._setter("levelv", -V_MAX, V_MAX, "smua.source.levelv")),
            "limiti": (lambda: self.s["limiti"],
                       self._setter("limiti", 1e-9, I_MAX, "smua.source.limiti")),
            "output": (lambda: self.s["output"], self._output),
            "compliance": (lambda: self.s["compliance"], None),
        })
        measure = LuaObject(self, {
            "nplc": (lambda: self.s["nplc"], self._setter("nplc", 0.001, 25, "smua.measure.nplc")),
        }, {"i": self._measure_i})
        trig_source = LuaObject(self, {
            "action": (lambda: self.s["src_action"],
                       self._enum("src_action", (0, 1), "smua.trigger.source.action")),
            "limiti": (lambda: self.s["trig_limiti"],
                       self._setter("trig_limiti", 1e-9, I_MAX, "smua.trigger.source.limiti")),
            "stimulus": (lambda: self.s["src_stim"], self._setter("src_stim", 0, 100, "stimulus",
                                                                  True)),
        }, {"listv": self._listv_table})
        endpulse = LuaObject(self, {
            "action": (lambda: self.s["endpulse"],
                       self._enum("endpulse", (0, 1), "smua.trigger.endpulse.action")),
            "stimulus": (lambda: self.s["endpulse_stim"],
                         self._setter("endpulse_stim", 0, 100, "stimulus", True)),
        })
        trig_measure = LuaObject(self, {
            "action": (lambda: self.s["meas_action"],
                       self._enum("meas_action", (0, 1), "smua.trigger.measure.action")),
        })
        trigger_a = LuaObject(self, {
            "count": (lambda: self.s["count"],
                      self._setter("count", 1, MAX_COUNT, "smua.trigger.count", True)),
        }, {"source": trig_source, "endpulse": endpulse, "measure": trig_measure,
            "initiate": self._initiate, "SOURCE_COMPLETE_EVENT_ID": SOURCE_COMPLETE_EVENT_ID,
            "ARMED_EVENT_ID": ARMED_EVENT_ID})
        g.smua = LuaObject(self, {}, {
            "source": source, "measure": measure, "trigger": trigger_a,
            "reset": lambda *a: self.reset(),
            "OUTPUT_DCVOLTS": OUTPUT_DCVOLTS, "OUTPUT_DCAMPS": OUTPUT_DCAMPS,
            "OUTPUT_ON": ON, "OUTPUT_OFF": OFF, "SOURCE_IDLE": SOURCE_IDLE,
            "SOURCE_HOLD": SOURCE_HOLD, "ENABLE": ENABLE, "DISABLE": DISABLE}).proxy
        timers = {}
        for n, event in TIMER_EVENTS.items():
            timers[n] = LuaObject(self, {
                "delay": (lambda n=n: self.timers[n]["delay"], self._timer(n, "delay", 1e-6, 1e5)),
                "count": (lambda n=n: self.timers[n]["count"], self._timer(n, "count", 0, 1e9)),
                "stimulus": (lambda n=n: self.timers[n]["stimulus"],
                             self._timer(n, "stimulus", 0, 100)),
            }, {"EVENT_ID": event}).proxy
        g.trigger = LuaObject(self, {}, {"timer": self.table(*[timers[n] for n in
                                                               sorted(timers)])}).proxy
        nodes = self.table()
        for node_id, inst in self.links.items():  # node[N].channel, node[N].model
            nodes[node_id] = LuaObject(self, {}, {"channel": inst.channel_object(self),
                                                  "model": inst.model}).proxy
        g.node = nodes

    def _timer(self, n: int, key: str, lo: float, hi: float):
        def put(value: object) -> None:
            self.timers[n][key] = number(value, lo, hi, f"trigger.timer[{n}].{key}")
        return put

    def _listv_table(self, values: object = None) -> None:
        try:
            self._listv(*values.values())
        except AttributeError:
            raise TspError(-286, "TSP Runtime error: listv needs a table of numbers") from None

    def _listv(self, *values: object) -> None:
        levels = list(values)
        if not levels:
            raise TspError(1102, "Parameter too small: empty source list")
        self.s["listv"] = [number(v, -V_MAX, V_MAX, "smua.trigger.source.listv")
                           for v in levels]

    def _aperture(self) -> float:
        return self.s["nplc"] / 50.0  # 50 Hz line (ASSUMED; 60 Hz labs: /60)

    def _measure_i(self, *args: object) -> float:
        self.chip.clock.spend("measure", self._aperture() + self.t.measure_overhead_s)
        if self.s["output"] != ON:
            return 0.0
        if abs(self.s["levelv"]) >= self.chip.threshold_v:  # the bias itself stresses
            self.chip.pulse(self.s["levelv"], 1, self.s["limiti"])
        r = self.chip.bias(self.s["levelv"], self.s["limiti"])
        self.s["compliance"] = self.s["compliance"] or r.tripped
        return r.current_a

    def _initiate(self, *args: object) -> None:
        """A pulse train: ``count`` pulses of listv[1] (the list repeats), each ended by
        timer 1 (its delay is the width) back to the idle level; the next one started by
        timer 2 (its delay is the period) when the source stimulus names it."""
        s = self.s
        if s["src_action"] != ENABLE or not s["listv"]:
            raise TspError(-286, "TSP Runtime error: trigger source action is disabled")
        if s["endpulse"] != SOURCE_IDLE or s["endpulse_stim"] != TIMER_EVENTS[1]:
            raise TspError(-286, "TSP Runtime error: end pulse must be SOURCE_IDLE on timer 1")
        width = self.timers[1]["delay"]
        period = self.timers[2]["delay"] if s["src_stim"] == TIMER_EVENTS[2] else 0.0
        period = max(period, width + self.t.min_period_s)
        if width < self.t.min_pulse_width_s:
            raise TspError(1102, f"Parameter too small: pulse width {width} s")
        count = int(s["count"])
        if s["output"] != ON:
            self.chip.clock.spend("trigger", count * period, count)
            return
        level = s["listv"][0]
        peak = self.chip.pulse(level, count, s["trig_limiti"])
        s["compliance"] = s["compliance"] or peak.tripped
        self.chip.clock.spend("pulse", count * period, count)
