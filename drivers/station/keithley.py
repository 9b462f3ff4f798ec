"""The Keithley station dialect: a 2600B SMU (TSP, 2600B Reference Manual "TSP command
reference": smua.source, smua.measure, the smua.trigger model, errorqueue) and a 707B/708B
matrix (TSP, 707B Reference Manual Section 7: channel.exclusiveclose, channel.open,
channel.connectrule). Every program message is one Lua chunk that ends by printing what the
host needs (readings, the compliance flag, the error count), so each reply confirms it ran."""

from __future__ import annotations

from drivers.station.dialect import (
    ComplianceTrip,
    Connection,
    Dialect,
    InstrumentError,
    Route,
    current,
)
from drivers.station.profile import MATRIX_GEOMETRY
from hil.errors import BackendError, ProtocolError

COLS = MATRIX_GEOMETRY["keithley"][1]
MARK = "ERRCOUNT"  # what the error-count chunk prints first
LINE_HZ = 50.0  # power-line frequency of the lab (NPLC = aperture x line frequency)


def channel(output: int, inp: int) -> str:
    """Matrix output (1-based, slot-major) on row ``inp`` (1 = A) as a 707B channel 'SRCC'."""
    slot, col = (output - 1) // COLS + 1, (output - 1) % COLS + 1
    return f"{slot}{chr(64 + inp)}{col:02d}"


class KeithleyDialect(Dialect):
    """2600B + 707B over TSP."""

    def open(self) -> None:
        p = self.profile
        self.identify()
        self.s = "smub" if str(p.smu.channel) in ("b", "2") else "smua"
        # cold: channel.OFF opens and closes together, the longer settle time (707B Reference
        # Manual 707B-901-01 Rev. B, Section 7 channel.connectrule), with the SMU at 0 V
        rule = "OFF" if self.cold else "BREAK_BEFORE_MAKE"
        s, rd = self.s, p.read
        self._message(self.smu, f"reset() errorqueue.clear() "
                                f"{s}.source.func = {s}.OUTPUT_DCVOLTS {s}.source.levelv = 0 "
                                f"{s}.source.limiti = {rd.compliance_a:.6g} "
                                f"{s}.measure.nplc = {rd.aperture_s * LINE_HZ:.6g} "
                                f"{s}.trigger.measure.action = {s}.DISABLE "
                                f"{s}.trigger.endpulse.action = {s}.SOURCE_IDLE "
                                f"{s}.trigger.endpulse.stimulus = trigger.timer[1].EVENT_ID "
                                f"trigger.timer[1].count = 1 "
                                f"trigger.timer[1].stimulus = {s}.trigger.SOURCE_COMPLETE_EVENT_ID "
                                f"{s}.trigger.source.stimulus = trigger.timer[2].EVENT_ID "
                                f"{s}.trigger.source.action = {s}.ENABLE", "configure SMU")
        self.state: dict[str, object] = {"volt": 0.0, "limit": rd.compliance_a}
        # after the SMU: on a TSP-Link master reset() resets the whole system, nodes included
        local = "" if self.tsplink else "reset() errorqueue.clear() "
        for conn in self.frames:
            self._message(conn, f'{local}channel.open("allslots") '
                                f"channel.connectrule = channel.{rule}", "configure matrix")
        self.routed = None

    def arm(self) -> None:
        s, rd = self.s, self.profile.read
        self.state = {}
        chunk = self._settings({"volt": 0.0, "limit": rd.compliance_a})
        on = self._message(self.smu, f"{chunk} {s}.source.output = {s}.OUTPUT_ON "
                                     f"print({s}.source.output)", "output on", 1)
        if float(on[0]) != 1:
            raise BackendError(f"{self.smu.name}: the output did not switch on", op="output")

    # -- messages ----------------------------------------------------------------------------
    @property
    def tsplink(self) -> bool:
        """The matrix frames are TSP-Link nodes of the SMU (routes run in its scripts)."""
        return self.profile.tsplink_nodes is not None

    @property
    def routes_in_smu_chunk(self) -> bool:
        return self.tsplink

    def _message(self, conn, chunk: str, where: str, replies: int | None = 0) -> list[str]:
        """Run ``chunk`` (which prints ``replies`` lines; None: any number), then, as a chunk
        of its own (a failing chunk stops at its error and prints nothing more), the error
        count."""
        self.messages += 1
        conn.write(f'{chunk}\nwaitcomplete() print("{MARK}", errorqueue.count)')
        lines: list[str] = []
        while True:
            line = conn.read()
            if line.startswith(MARK + "\t"):
                break
            lines.append(line)
            if len(lines) > (replies or 0) + 100000:
                raise ProtocolError(f"no error count after {len(lines)} lines ({where})",
                                    op="instrument")
        count = int(float(line.split("\t")[1]))
        if count != 0:
            errors = []
            for _ in range(32):
                code, _, rest = conn.query("print(errorqueue.next())").partition("\t")
                if int(float(code)) == 0:
                    break
                errors.append(f"{int(float(code))},{rest.split(chr(9))[0]}")
            raise InstrumentError(f"{conn.name} reported {'; '.join(errors)} ({where})",
                                  op="instrument")
        if replies is not None and len(lines) != replies:
            raise ProtocolError(f"{len(lines)} reply lines, expected {replies} ({where})",
                                op="instrument")
        return lines

    def _route(self, route: Route, where: str) -> None:
        """One frame: ``channel.exclusiveclose`` of the new route (the connect rule orders the
        opens and closes); several frames: every frame's opens before any frame's closes."""
        if self.routed == route:
            return
        bodies = self._route_bodies(route)
        self.routed = None
        for frame, body in bodies:
            self.relay_commands += 1
            self._message(self.frames[frame], body, where)
        self.routed = route

    def _route_bodies(self, route: Route) -> list[tuple[int, str]]:
        """(frame, chunk) of each relay command that goes from the present route to
        ``route``, in order."""
        opening, closing = self.frame_changes(route)
        frames = sorted(set(opening) | set(closing))
        if len(frames) == 1 and closing:
            frame = frames[0]
            mine = sorted(r[1:] for r in self.relays(route) if r[0] == frame)
            return [(frame, f'channel.exclusiveclose("{self._chans(mine)}")')]
        return [(frame, f'channel.{verb}("{self._chans(chans)}")')
                for verb, changes in (("open", opening), ("close", closing))
                for frame, chans in sorted(changes.items())]

    @staticmethod
    def _chans(pairs: list[tuple[int, int]]) -> str:
        return ",".join(channel(out, inp) for out, inp in pairs)

    def _settings(self, want: dict[str, object]) -> str:
        s, out = self.s, []
        spell = {"volt": f"{s}.source.levelv = {{:.6g}}", "limit": f"{s}.source.limiti = {{:.6g}}",
                 "listv": f"{s}.trigger.source.listv({{{{{{:.6g}}}}}})",
                 "tlimit": f"{s}.trigger.source.limiti = {{:.6g}}",
                 "width": "trigger.timer[1].delay = {:.6g}",
                 "period": "trigger.timer[2].delay = {:.6g}",
                 "count": f"{s}.trigger.count = {{}}"}
        for key, value in want.items():
            if self.state.get(key) != value:
                out.append(spell[key].format(value))
                self.state[key] = value
        return " ".join(out)

    def _train(self, count: int) -> str:
        polarity = "potentiate" if count > 0 else "depress"
        shape = self.profile.pulses[polarity]
        return (self._settings({"listv": shape.amplitude_v, "tlimit": shape.compliance_a,
                                "width": shape.width_s, "period": self.period(polarity),
                                "count": abs(count)})
                + f" {self.s}.trigger.initiate() waitcomplete() print({self.s}.source.compliance)")

    def _read(self) -> str:
        rd = self.profile.read
        return (self._settings({"volt": rd.voltage_v, "limit": rd.compliance_a})
                + f" print({self.s}.measure.i(), {self.s}.source.compliance)")

    def _smu(self, chunk: str, replies: int, where: str) -> list[str]:
        try:
            return self._message(self.smu, chunk, where, replies)
        except BaseException:
            self.state = {}
            raise

    @staticmethod
    def _trip(flag: str, where: str, what: str) -> None:
        flag = flag.strip()
        if flag not in ("true", "false"):
            raise ProtocolError(f"malformed compliance flag {flag!r} ({where})", op=what)
        if flag == "true":
            raise ComplianceTrip(f"SMU compliance reached on {where}", op=what)

    def _reading(self, line: str, where: str) -> float:
        value, _, flag = line.partition("\t")
        self._trip(flag, where, "read")
        return current(value, where)

    # -- operations ----------------------------------------------------------------------------
    def _compose(self, steps: list[tuple[int, bool]], stop: bool = False
                 ) -> tuple[list[str], list[str]]:
        """The chunk parts of ``steps`` on the routed device and what each printed line is
        ('trip' or 'current'); ``stop``: the chunk ends at the first compliance flag (a batch
        of devices goes no further than a tripped one)."""
        parts: list[str] = []
        kinds: list[str] = []
        halt = f" if {self.s}.source.compliance then return end" if stop else ""
        for n, read in steps:
            if n:
                parts.append(self._train(n) + halt)
                kinds.append("trip")
            if read:
                parts.append(self._read() + halt)
                kinds.append("current")
        if self.cold:  # back to 0 V before the matrix switches again
            parts.append(self._settings({"volt": 0.0}))
        return parts, kinds

    def _parse(self, kinds: list[str], lines: list[str], where: str) -> list[float]:
        currents = []
        for kind, line in zip(kinds, lines, strict=True):
            if kind == "trip":
                self._trip(line, where, "exchange")
            else:
                currents.append(self._reading(line, where))
        return currents

    def exchange(self, steps: list[tuple[int, bool]], where: str) -> list[float]:
        parts, kinds = self._compose(steps)
        lines = self._smu(" ".join(parts), len(kinds), where)
        return self._parse(kinds, lines, where)

    # -- TSP-Link: a batch of devices, routes included, in one chunk the SMU runs ----------
    def pulse_devices(self, trains: list[tuple[Route, int]], where: list[str]) -> None:
        if not self.tsplink:
            return super().pulse_devices(trains, where)
        self.ensure_armed()
        self._batched([(route, [(count, False)]) for route, count in trains], where)
        return None

    def run_programs(self, programs, where: list[str]) -> list[list[float]]:
        if not self.tsplink:
            return super().run_programs(programs, where)
        self.ensure_armed()
        out = self._batched([(route, [(n, True) for n in counts]) for route, counts in programs],
                            where)
        self.idle()
        return out

    def _batched(self, jobs: list[tuple[Route, list[tuple[int, bool]]]],
                 where: list[str]) -> list[list[float]]:
        """Each device's route (``node[N].channel...``) and steps in chunks of at most
        ``profile.batch`` steps, each chunk one message the SMU runs by itself; a device's
        program longer than a batch continues, still routed, in the next chunk."""
        segments = []  # (device, route or None, steps)
        batch = self.profile.batch
        for k, (route, steps) in enumerate(jobs):
            for start in range(0, max(1, len(steps)), batch):
                segments.append((k, route if start == 0 else None, steps[start:start + batch]))
        out: list[list[float]] = [[] for _ in jobs]
        i = 0
        while i < len(segments):
            chunk, plan, used = [], [], 0
            while i < len(segments) and (not plan or used + len(segments[i][2]) <= batch):
                k, route, steps = segments[i]
                if route is not None and route != self.routed:
                    nodes = self.profile.tsplink_nodes
                    chunk += [f"node[{nodes[frame]}].{body}"
                              for frame, body in self._route_bodies(route)]
                    self.relay_commands += 1
                    self.routed = route  # confirmed by the chunk's reply, else reset below
                parts, kinds = self._compose(steps, stop=True)
                chunk += parts
                plan.append((k, kinds))
                used += len(steps)
                i += 1
            first, last = where[plan[0][0]], where[plan[-1][0]]
            span = first if len(plan) == 1 else f"{first} .. {last}"
            try:
                lines = self._smu(" ".join(chunk), None, span)
            except BaseException:
                self.routed = None  # where the chunk stopped is unknown
                raise
            for k, kinds in plan:
                mine, lines = lines[:len(kinds)], lines[len(kinds):]
                if len(mine) < len(kinds):  # the chunk stopped: a trip on the last line
                    self.routed = None
                    self._parse(kinds[:len(mine)], mine, where[k])
                    raise ProtocolError(f"{len(mine)} reply lines, expected {len(kinds)} "
                                        f"({where[k]})", op="instrument")
                out[k] += self._parse(kinds, mine, where[k])
            if lines:
                raise ProtocolError(f"{len(lines)} reply lines too many ({span})",
                                    op="instrument")
        return out

    def idle(self) -> None:
        if self.state.get("volt"):
            self._smu(self._settings({"volt": 0.0}), 0, "idle")

    def _output_off(self) -> bool:
        s = getattr(self, "s", "smua")
        state = self.smu.query(f"{s}.source.output = {s}.OUTPUT_OFF waitcomplete() "
                               f"print({s}.source.output)")
        return float(state) == 0

    def _open_all(self, conn: Connection) -> str:
        closed = conn.query('channel.open("allslots") waitcomplete() '
                            'print(channel.getclose("allslots"))').strip()
        return "" if closed == "nil" else closed
