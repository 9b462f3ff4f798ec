"""The Keysight station dialect: a B2900 series SMU (SCPI, B2900 SCPI Command Reference) and a
B2200A / E5250A switching matrix (SCPI, B2200A User's Guide ch. "SCPI Command Reference").

Every program message ends in a query (``*OPC?`` and/or ``:SYST:ERR?``) so the host knows the
instrument finished and accepted it before the next instrument acts: a relay route is
confirmed before a pulse, a pulse train before the next route."""

from __future__ import annotations

from drivers.station.dialect import (
    ComplianceTrip,
    Connection,
    Dialect,
    InstrumentError,
    Route,
    current,
)
from hil.errors import BackendError, ProtocolError


def channel(output: int, inp: int) -> str:
    """Matrix output (1-based, card-major: card 2 output 1 is 13) on input ``inp`` as a
    B2200A channel in auto configuration mode: card 0, outputs 01..48 across the cards
    (B2200A User's Guide, [:ROUTe]:FUNCtion ACONfig; the QCoDeS B220x driver's 0IIOO)."""
    return f"0{inp:02d}{output:02d}"


def parse_error(text: str) -> tuple[int, str]:
    """'+0,"No error"' -> (0, 'No error')."""
    code, _, message = text.partition(",")
    try:
        return int(code), message.strip().strip('"')
    except ValueError:
        raise ProtocolError(f"malformed error-queue reply {text!r}", op="error queue") from None


def split_reply(reply: str) -> list[str]:
    """A response message's units: split at ';' outside quoted strings."""
    parts, cur, quoted = [], [], False
    for ch in reply:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


class KeysightDialect(Dialect):
    """B2900 + B2200A over SCPI."""

    def open(self) -> None:
        p = self.profile
        self.identify()
        ch = self.ch = int(str(p.smu.channel).replace("a", "1").replace("b", "2"))
        self.state: dict[str, object] = {}
        # auto configuration mode: the cards as one matrix (card 0, outputs 1..48), so the
        # rules below hold across cards. cold: the single-route rule (one input per output:
        # the matrix itself keeps one row on force and one column on ground) with no
        # sequence, so a CLOSe that moves an input opens its old output and closes the new
        # one together (B2200A User's Guide, [:ROUTe]:FUNCtion, [:ROUTe]:CONNection:RULE
        # SROUte and :SEQuence NSEQ; E5250A User's Guide Ed. 9, Table 5-3)
        rule, seq = ("SROU", "NSEQ") if self.cold else ("FREE", "BBM")
        for conn in self.frames:
            self._message(conn, f"*RST;*CLS;:ROUT:FUNC ACON;:ROUT:OPEN:CARD ALL;"
                                f":ROUT:CONN:RULE ALL,{rule};:ROUT:CONN:SEQ ALL,{seq}",
                          "configure matrix")
        self.routed = None
        rd = p.read
        self._message(self.smu, f"*RST;*CLS;:SOUR{ch}:FUNC:MODE VOLT;:SOUR{ch}:FUNC:SHAP DC;"
                                f":SOUR{ch}:VOLT 0;:SENS{ch}:FUNC \"CURR\";"
                                f":SENS{ch}:CURR:PROT {rd.compliance_a:.6G};"
                                f":SENS{ch}:CURR:APER {rd.aperture_s:.6G};"
                                f":SOUR{ch}:PULS:DEL 0;:TRIG{ch}:SOUR TIM", "configure SMU")
        self.state = {"shape": "DC", "volt": 0.0, "prot": rd.compliance_a}

    def arm(self) -> None:
        ch, rd = self.ch, self.profile.read
        self.state = {}
        commands = self._settings({"shape": "DC", "volt": 0.0, "prot": rd.compliance_a})
        self._message(self.smu, ";".join([*commands, f":OUTP{ch} ON"]), "output on")
        if self.smu.query(f":OUTP{ch}?").strip() not in ("1", "ON"):
            raise BackendError(f"{self.smu.name}: the output did not switch on", op="output")

    # -- messages ----------------------------------------------------------------------------
    def _message(self, conn, body: str, where: str, opc: bool = False) -> list[str]:
        """Send ``body`` with ``*OPC?`` (if asked) and ``:SYST:ERR?`` appended; the replies
        of its queries (the error reply checked and dropped)."""
        self.messages += 1
        reply = conn.query(f"{body};{'*OPC?;' if opc else ''}:SYST:ERR?")
        parts = split_reply(reply)
        code, message = parse_error(parts[-1])
        if code != 0:
            errors = [f"{code},{message}"]
            for _ in range(32):  # drain the queue: the instrument's own messages
                code, message = parse_error(conn.query(":SYST:ERR?"))
                if code == 0:
                    break
                errors.append(f"{code},{message}")
            raise InstrumentError(f"{conn.name} reported {'; '.join(errors)} ({where})",
                                  op="instrument")
        return parts[:-1]

    def _route(self, route: Route, where: str) -> None:
        """Only this row on force and this column on ground: break before make, or cold
        (see open()); on several frames, every frame's opens before any frame's closes."""
        if self.routed == route:
            return
        opening, closing = self.frame_changes(route)
        if self.cold:  # single route (auto config: over the whole frame): closing an
            for frame, pairs in list(opening.items()):  # input's new output opens its old one
                kept = [(out, inp) for out, inp in pairs
                        if not any(inp == i for _, i in closing.get(frame, []))]
                if kept:
                    opening[frame] = kept
                else:
                    del opening[frame]
        def command(verb: str, chans: list[tuple[int, int]]) -> str:
            return f":ROUT:{verb} (@{','.join(channel(o, i) for o, i in chans)})"

        bodies: list[tuple[int, str]] = []
        frames = sorted(set(opening) | set(closing))
        if len(frames) == 1:
            frame = frames[0]
            parts = [command(verb, chans) for verb, chans in
                     (("OPEN", opening.get(frame)), ("CLOS", closing.get(frame))) if chans]
            bodies.append((frame, ";".join(parts)))
        else:
            for verb, changes in (("OPEN", opening), ("CLOS", closing)):
                bodies += [(frame, command(verb, chans)) for frame, chans in
                           sorted(changes.items())]
        self.routed = None  # unknown until confirmed
        for frame, body in bodies:
            self.relay_commands += 1
            self._message(self.frames[frame], body, where)
        self.routed = route

    def _settings(self, want: dict[str, object]) -> list[str]:
        """Commands that bring the SMU to ``want`` (only what changed)."""
        ch, out = self.ch, []
        spell = {"shape": f":SOUR{ch}:FUNC:SHAP {{}}", "volt": f":SOUR{ch}:VOLT {{:.6G}}",
                 "trig": f":SOUR{ch}:VOLT:TRIG {{:.6G}}", "width": f":SOUR{ch}:PULS:WIDT {{:.6G}}",
                 "prot": f":SENS{ch}:CURR:PROT {{:.6G}}", "period": f":TRIG{ch}:TIM {{:.6G}}",
                 "count": f":TRIG{ch}:COUN {{}}"}
        for key, value in want.items():
            if self.state.get(key) != value:
                out.append(spell[key].format(value))
                self.state[key] = value
        return out

    def _train(self, count: int) -> list[str]:
        polarity = "potentiate" if count > 0 else "depress"
        shape = self.profile.pulses[polarity]
        return self._settings({"shape": "PULS", "volt": 0.0, "trig": shape.amplitude_v,
                               "width": shape.width_s, "prot": shape.compliance_a,
                               "period": self.period(polarity), "count": abs(count)}) + \
            [f":INIT (@{self.ch})", "*OPC?", f":SENS{self.ch}:CURR:PROT:TRIP? (@{self.ch})"]

    def _read(self) -> list[str]:
        rd = self.profile.read
        return self._settings({"shape": "DC", "volt": rd.voltage_v, "prot": rd.compliance_a}) + \
            [f":MEAS:CURR? (@{self.ch})", f":SENS{self.ch}:CURR:PROT:TRIP? (@{self.ch})"]

    def _smu(self, commands: list[str], where: str) -> list[str]:
        try:
            return self._message(self.smu, ";".join(commands), where)
        except BaseException:
            self.state = {}  # unknown after a failure: send everything again next time
            raise

    @staticmethod
    def _trip(flag: str, where: str, what: str) -> None:
        if flag.strip() not in ("0", "1"):
            raise ProtocolError(f"malformed compliance flag {flag!r} ({where})", op=what)
        if flag.strip() == "1":
            raise ComplianceTrip(f"SMU compliance reached on {where}", op=what)

    # -- operations ----------------------------------------------------------------------------
    def exchange(self, steps: list[tuple[int, bool]], where: str) -> list[float]:
        commands: list[str] = []
        kinds: list[str] = []
        for n, read in steps:
            if n:
                commands += self._train(n)
                kinds += ["opc", "trip"]
            if read:
                commands += self._read()
                kinds += ["current", "trip"]
        if self.cold:  # back to 0 V before the matrix switches again
            commands += self._settings({"volt": 0.0})
        replies = self._smu(commands, where)
        if len(replies) != len(kinds):
            raise ProtocolError(f"{len(replies)} replies to {len(kinds)} queries ({where})",
                                op="exchange")
        currents = []
        for kind, text in zip(kinds, replies, strict=True):
            if kind == "trip":
                self._trip(text, where, "exchange")
            elif kind == "opc" and text.strip() != "1":
                raise ProtocolError(f"*OPC? answered {text!r} ({where})", op="pulse")
            elif kind == "current":
                currents.append(current(text, where))
        return currents

    def idle(self) -> None:
        if self.state.get("volt"):
            self._smu(self._settings({"volt": 0.0}), "idle")

    def _output_off(self) -> bool:
        ch = getattr(self, "ch", 1)
        self.smu.query(f":OUTP{ch} OFF;*OPC?")
        return self.smu.query(f":OUTP{ch}?").strip() in ("0", "OFF")

    def _open_all(self, conn: Connection) -> str:
        conn.query(":ROUT:OPEN:CARD ALL;*OPC?")
        closed = conn.query(":ROUT:CLOS:CARD? 0").strip()  # auto config: all cards
        return "" if closed in ("(@)", "") else closed
