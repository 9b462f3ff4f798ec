"""A simulated Keysight B2200A (or E5250A) switching matrix behind its SCPI command set:
relays addressed as channels cIIOO (card, input, output), channel lists and ranges,
the connection rule (FREE / SROU) and sequence (NSEQ / BBM / MBBR), open/close per card,
the closed-channel query; every relay command advances the station clock by its settling."""

from __future__ import annotations

import re

from drivers.station.profile import MATRIX_GEOMETRY
from drivers.station.sim.chip import FORCE, GROUND, SimChip
from drivers.station.sim.scpi import Call, ScpiError, ScpiInstrument
from drivers.station.timing import KEYSIGHT

INPUTS, OUTPUTS, _ = MATRIX_GEOMETRY["keysight"]


class B2200(ScpiInstrument):
    """The matrix: ``closed`` holds (card, input, output) of every closed relay."""

    def __init__(self, chip: SimChip, cards: int, force_input: int, ground_input: int,
                 sense_input: int | None = None, frame: int = 0,
                 offset: int = 0, model: str = "B2200A"):
        super().__init__()
        self.chip = chip
        self.cards = cards
        self.frame, self.offset = frame, offset  # which frame; its first output's number - 1
        self.terminals = {force_input: FORCE, ground_input: GROUND}
        if sense_input:
            self.terminals[sense_input] = FORCE
        self.idn = f"Agilent Technologies,{model},SIM0002,analog-hil sim"
        self.t = KEYSIGHT
        self.relay_operations = 0
        self.reset()
        a = self.add
        a(":ROUTe:CLOSe", self._close)
        a(":ROUTe:OPEN[:LIST]", self._open)
        a(":ROUTe:OPEN:CARD", self._open_card)
        a(":ROUTe:CLOSe:CARD?", self._closed_card)
        a(":ROUTe:CLOSe?", self._closed_query)
        a(":ROUTe:CONNection:RULE", self._rule)
        a(":ROUTe:CONNection:RULE?", lambda c: self.rule[self._card(c.params[0])])
        a(":ROUTe:CONNection:SEQuence", self._sequence)
        a(":ROUTe:CONNection:SEQuence?", lambda c: self.sequence[self._card(c.params[0])])

    def reset(self) -> None:
        self.closed: set[tuple[int, int, int]] = set()
        self.rule = {card: "FREE" for card in range(1, self.cards + 1)}
        self.sequence = {card: "BBM" for card in range(1, self.cards + 1)}
        self._publish()

    # -- channels ----------------------------------------------------------------------------
    def _card(self, text: str) -> int:
        text = text.strip()
        if not text.isdigit() or not 1 <= int(text) <= self.cards:
            raise ScpiError(-222, f"card {text!r} (installed: 1..{self.cards})")
        return int(text)

    def _channel(self, text: str) -> tuple[int, int, int]:
        if not re.fullmatch(r"\d{5}", text):
            raise ScpiError(-104, f"channel {text!r} is not cIIOO")
        card, inp, out = int(text[0]), int(text[1:3]), int(text[3:])
        if not 1 <= card <= self.cards or not 1 <= inp <= INPUTS or not 1 <= out <= OUTPUTS:
            raise ScpiError(-222, f"channel {text}")
        return card, inp, out

    def _channels(self, c: Call) -> list[tuple[int, int, int]]:
        """'(@10101,10203:10205)': single channels and rectangular ranges."""
        c.need(1)
        text = c.params[0].replace(" ", "")
        if not (text.startswith("(@") and text.endswith(")")):
            raise ScpiError(-104, f"channel list expected, got {c.params[0]!r}")
        out: list[tuple[int, int, int]] = []
        for item in text[2:-1].split(","):
            first, sep, last = item.partition(":")
            a = self._channel(first)
            if not sep:
                out.append(a)
                continue
            b = self._channel(last)
            if b[0] != a[0] or b[1] < a[1] or b[2] < a[2]:
                raise ScpiError(-224, f"range {item}")
            out += [(a[0], i, o) for i in range(a[1], b[1] + 1) for o in range(a[2], b[2] + 1)]
        return out

    @staticmethod
    def _format(chans: list[tuple[int, int, int]]) -> str:
        return "(@" + ",".join(f"{c}{i:02d}{o:02d}" for c, i, o in sorted(chans)) + ")"

    def _publish(self) -> None:
        """Tell the chip which terminal each matrix output carries now."""
        wiring: dict[int, set[str]] = {}
        for card, inp, out in self.closed:
            terminal = self.terminals.get(inp)
            if terminal:
                wiring.setdefault(self.offset + (card - 1) * OUTPUTS + out, set()).add(terminal)
        self.chip.set_connections(wiring, self.frame)

    def _switch(self, opening: set, closing: set) -> None:
        opening &= self.closed
        closing -= self.closed
        if not opening and not closing:
            return
        seq = {self.sequence[c] for c, _, _ in opening | closing}
        t_open = self.t.relay_open_s if opening else 0.0
        t_close = self.t.relay_close_s if closing else 0.0
        # BBM / MBBR: one after the other; NSEQ: together (the longer of the two)
        spent = max(t_open, t_close) if seq == {"NSEQ"} else t_open + t_close
        self.closed -= opening
        self.closed |= closing
        self.relay_operations += len(opening) + len(closing)
        self.chip.clock.spend("relay", spent, len(opening) + len(closing))
        self._publish()

    # -- commands ----------------------------------------------------------------------------
    def _close(self, c: Call) -> None:
        chans = set(self._channels(c))
        for card in {ch[0] for ch in chans if self.rule[ch[0]] == "SROU"}:
            mine = [ch for ch in chans if ch[0] == card]
            if (len({ch[1] for ch in mine}) < len(mine)
                    or len({ch[2] for ch in mine}) < len(mine)):
                raise ScpiError(-221, "single route: one input per output and vice versa")
        opening = set()
        for card, inp, out in chans:
            if self.rule[card] == "SROU":  # single route: one input per output and vice versa
                opening |= {ch for ch in self.closed if ch[0] == card and ch not in chans
                            and (ch[1] == inp or ch[2] == out)}
        self._switch(opening, chans)

    def _open(self, c: Call) -> None:
        self._switch(set(self._channels(c)), set())

    def _open_card(self, c: Call) -> None:
        c.need(1)
        text = c.params[0].strip().upper()
        cards = range(1, self.cards + 1) if text == "ALL" else [self._card(text)]
        self._switch({ch for ch in self.closed if ch[0] in cards}, set())

    def _closed_card(self, c: Call) -> str:
        c.need(1)
        card = self._card(c.params[0])
        return self._format([ch for ch in self.closed if ch[0] == card])

    def _closed_query(self, c: Call) -> str:
        chans = self._channels(c)
        return ",".join("1" if ch in self.closed else "0" for ch in chans)

    def _rule(self, c: Call) -> None:
        c.need(2)
        text = c.params[0].strip().upper()
        value = c.choice(1, {"FREE": "FREE", "SROUte": "SROU"})
        for card in (range(1, self.cards + 1) if text == "ALL" else [self._card(text)]):
            self.rule[card] = value

    def _sequence(self, c: Call) -> None:
        c.need(2)
        text = c.params[0].strip().upper()
        value = c.choice(1, {"NSEQ": "NSEQ", "BBM": "BBM", "MBBR": "MBBR"})
        for card in (range(1, self.cards + 1) if text == "ALL" else [self._card(text)]):
            self.sequence[card] = value
