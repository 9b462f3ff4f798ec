"""A simulated Keithley 707B/708B switching matrix behind TSP: channels 'SRCC' (slot, row
letter A-H, column 01-12), lists and ranges, channel.close/open/exclusiveclose/getclose,
the connect rule (break-before-make, make-before-break, off) with its settling times on the
station clock (707B Reference Manual, Section 7, channel.connectrule)."""

from __future__ import annotations

import re

from drivers.station.profile import MATRIX_GEOMETRY
from drivers.station.sim.chip import FORCE, GROUND, SimChip
from drivers.station.sim.tsp import LuaObject, TspError, TspInstrument
from drivers.station.timing import KEITHLEY

ROWS, COLS, _ = MATRIX_GEOMETRY["keithley"]
OFF, BREAK_BEFORE_MAKE, MAKE_BEFORE_BREAK = 0, 1, 2


class K707(TspInstrument):
    model = "707B"
    idn = "Keithley Instruments Inc.,Model 707B,SIM0004,analog-hil sim"

    def __init__(self, chip: SimChip, cards: int, force_input: int, ground_input: int,
                 sense_input: int | None = None, frame: int = 0,
                 offset: int = 0):
        self.chip = chip
        self.cards = cards
        self.frame, self.offset = frame, offset  # which frame; its first output's number - 1
        self.terminals = {force_input: FORCE, ground_input: GROUND}
        if sense_input:
            self.terminals[sense_input] = FORCE
        self.t = KEITHLEY
        self.relay_operations = 0
        super().__init__()

    def reset(self) -> None:
        self.closed: set[tuple[int, int, int]] = set()
        self.rule = BREAK_BEFORE_MAKE
        self._publish()

    def build(self) -> None:
        self.lua.globals().channel = self.channel_object(self).proxy

    def channel_object(self, engine: TspInstrument) -> LuaObject:
        """The ``channel`` object in ``engine``'s Lua: this instrument's own, or a TSP-Link
        master's ``node[N].channel`` (the same functions, run on this matrix)."""
        return LuaObject(engine, {
            "connectrule": (lambda: self.rule, self._set_rule),
        }, {"close": self._close, "open": self._open, "exclusiveclose": self._exclusive,
            "getclose": self._getclose, "OFF": OFF, "BREAK_BEFORE_MAKE": BREAK_BEFORE_MAKE,
            "MAKE_BEFORE_BREAK": MAKE_BEFORE_BREAK})

    def _set_rule(self, value: object) -> None:
        if value not in (OFF, BREAK_BEFORE_MAKE, MAKE_BEFORE_BREAK):
            raise TspError(1100, f"Parameter error: channel.connectrule = {value!r}")
        self.rule = int(value)

    # -- channels ----------------------------------------------------------------------------
    def _one(self, text: str) -> tuple[int, int, int]:
        m = re.fullmatch(r"(\d)([A-Ha-h])(\d{2})", text)
        if not m:
            raise TspError(1115, f"Parameter error: invalid channel {text!r}")
        slot, row, col = int(m[1]), ord(m[2].upper()) - 64, int(m[3])
        if not 1 <= slot <= self.cards or not 1 <= col <= COLS or row > ROWS:
            raise TspError(1115, f"Parameter error: invalid channel {text!r} "
                                 f"(slots 1..{self.cards})")
        return slot, row, col

    def _list(self, spec: object) -> set[tuple[int, int, int]]:
        if not isinstance(spec, str):
            raise TspError(-286, "TSP Runtime error: channel list must be a string")
        out: set[tuple[int, int, int]] = set()
        for item in spec.replace(" ", "").split(","):
            if item.lower() == "allslots":
                out |= set(self.closed)  # (open only: what is closed anywhere)
                continue
            if re.fullmatch(r"slot\d", item.lower()):
                slot = int(item[-1])
                out |= {c for c in self.closed if c[0] == slot}
                continue
            first, sep, last = item.partition(":")
            a = self._one(first)
            if not sep:
                out.add(a)
                continue
            b = self._one(last)
            if b[0] != a[0] or b[1] < a[1] or b[2] < a[2]:
                raise TspError(1115, f"Parameter error: invalid range {item!r}")
            out |= {(a[0], r, c) for r in range(a[1], b[1] + 1) for c in range(a[2], b[2] + 1)}
        return out

    def _publish(self) -> None:
        wiring: dict[int, set[str]] = {}
        for slot, row, col in self.closed:
            terminal = self.terminals.get(row)
            if terminal:
                wiring.setdefault(self.offset + (slot - 1) * COLS + col, set()).add(terminal)
        self.chip.set_connections(wiring, self.frame)

    def _switch(self, opening: set, closing: set) -> None:
        opening = (opening & self.closed) - closing
        closing = closing - self.closed
        if not opening and not closing:
            return
        t_open = self.t.relay_open_s if opening else 0.0
        t_close = self.t.relay_close_s if closing else 0.0
        spent = max(t_open, t_close) if self.rule == OFF else t_open + t_close
        self.closed = (self.closed - opening) | closing
        self.relay_operations += len(opening) + len(closing)
        self.chip.clock.spend("relay", spent, len(opening) + len(closing))
        self._publish()

    def _close(self, spec: object) -> None:
        self._switch(set(), self._list(spec))

    def _open(self, spec: object) -> None:
        self._switch(self._list(spec), set())

    def _exclusive(self, spec: object) -> None:
        want = self._list(spec)
        self._switch(self.closed - want, want)

    def _getclose(self, spec: object) -> str | None:
        if spec != "allslots" and not (isinstance(spec, str) and spec.startswith("slot")):
            self._list(spec)
        chans = sorted(self.closed)
        if spec != "allslots" and isinstance(spec, str) and spec.startswith("slot"):
            chans = [c for c in chans if c[0] == int(spec[-1])]
        return ";".join(f"{s}{chr(64 + r)}{c:02d}" for s, r, c in chans) or None
