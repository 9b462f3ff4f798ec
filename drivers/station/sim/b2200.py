"""A simulated Keysight B2200A (or E5250A) switching matrix behind its SCPI command set:
relays addressed as channels cIIOO (card, input, output), channel lists and ranges, the
channel configuration mode (normal: each card its own matrix, c = 1..4, OO = 1..12; auto:
the cards as one matrix, c = 0, OO = 1..48, as the QCoDeS B220x driver addresses it), the
connection rule (FREE / SROU) and sequence (NSEQ / BBM / MBBR), open/close per card, the
closed-channel query; every relay command advances the station clock by its settling."""

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
        a(":ROUTe:FUNCtion", self._function)
        a(":ROUTe:FUNCtion?", lambda c: "ACON" if self.auto else "NCON")
        a(":ROUTe:CLOSe", self._close)
        a(":ROUTe:OPEN[:LIST]", self._open)
        a(":ROUTe:OPEN:CARD", self._open_card)
        a(":ROUTe:CLOSe:CARD?", self._closed_card)
        a(":ROUTe:CLOSe?", self._closed_query)
        a(":ROUTe:CONNection:RULE", self._rule)
        a(":ROUTe:CONNection:RULE?", lambda c: self.rule[self._cards(c.params[0])[0]])
        a(":ROUTe:CONNection:SEQuence", self._sequence)
        a(":ROUTe:CONNection:SEQuence?",
          lambda c: self.sequence[self._cards(c.params[0])[0]])

    def reset(self) -> None:
        self.auto = False  # *RST: normal configuration mode (ASSUMED; the driver sets it)
        self.closed: set[tuple[int, int, int]] = set()
        self.rule = {card: "FREE" for card in range(1, self.cards + 1)}
        self.sequence = {card: "BBM" for card in range(1, self.cards + 1)}
        self._publish()

    # -- channels ----------------------------------------------------------------------------
    def _cards(self, text: str) -> list[int]:
        """The cards a card-number parameter names: ALL; 0 in auto configuration mode (the
        cards as one matrix); 1..cards in normal mode."""
        text = text.strip().upper()
        if text == "ALL" or (self.auto and text == "0"):
            return list(range(1, self.cards + 1))
        if self.auto or not text.isdigit() or not 1 <= int(text) <= self.cards:
            raise ScpiError(-222, f"card {text!r} (installed: "
                                  f"{'0' if self.auto else f'1..{self.cards}'} or ALL)")
        return [int(text)]

    def _channel(self, text: str) -> tuple[int, int, int]:
        """'cIIOO' as the physical relay (card, input, output on that card)."""
        if not re.fullmatch(r"\d{5}", text):
            raise ScpiError(-104, f"channel {text!r} is not cIIOO")
        card, inp, out = int(text[0]), int(text[1:3]), int(text[3:])
        if self.auto:  # card 0, outputs numbered across the cards
            if card != 0 or not 1 <= inp <= INPUTS or not 1 <= out <= OUTPUTS * self.cards:
                raise ScpiError(-222, f"channel {text} (auto config: 0IIOO, OO 1..."
                                      f"{OUTPUTS * self.cards})")
            return (out - 1) // OUTPUTS + 1, inp, (out - 1) % OUTPUTS + 1
        if not 1 <= card <= self.cards or not 1 <= inp <= INPUTS or not 1 <= out <= OUTPUTS:
            raise ScpiError(-222, f"channel {text}")
        return card, inp, out

    def _name(self, ch: tuple[int, int, int]) -> str:
        card, inp, out = ch
        if self.auto:
            return f"0{inp:02d}{(card - 1) * OUTPUTS + out:02d}"
        return f"{card}{inp:02d}{out:02d}"

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
            (ca, ia, oa), (cb, ib, ob) = (self._global(a), self._global(b))
            if (not self.auto and cb != ca) or ib < ia or ob < oa:
                raise ScpiError(-224, f"range {item}")
            out += [self._local(ca, i, o) for i in range(ia, ib + 1) for o in range(oa, ob + 1)]
        return out

    @staticmethod
    def _global(ch: tuple[int, int, int]) -> tuple[int, int, int]:
        return ch[0], ch[1], (ch[0] - 1) * OUTPUTS + ch[2]

    @staticmethod
    def _local(card: int, inp: int, out: int) -> tuple[int, int, int]:
        return (out - 1) // OUTPUTS + 1, inp, (out - 1) % OUTPUTS + 1

    def _format(self, chans: list[tuple[int, int, int]]) -> str:
        return "(@" + ",".join(self._name(ch) for ch in sorted(chans)) + ")"

    def _scope(self, a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
        """Whether two relays are on one matrix for the single-route rule (one card in
        normal mode, the whole frame in auto configuration mode)."""
        return self.auto or a[0] == b[0]

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
        for a in chans:  # single route: one input per output and vice versa
            if self.rule[a[0]] == "SROU" and any(
                    b != a and self._scope(a, b) and (
                        b[1] == a[1] or self._global(b)[2] == self._global(a)[2])
                    for b in chans):
                raise ScpiError(-221, "single route: one input per output and vice versa")
        opening = set()
        for a in chans:
            if self.rule[a[0]] == "SROU":  # the input's or the output's old route opens
                opening |= {b for b in self.closed if b not in chans and self._scope(a, b)
                            and (b[1] == a[1] or self._global(b)[2] == self._global(a)[2])}
        self._switch(opening, chans)

    def _open(self, c: Call) -> None:
        self._switch(set(self._channels(c)), set())

    def _open_card(self, c: Call) -> None:
        c.need(1)
        cards = self._cards(c.params[0])
        self._switch({ch for ch in self.closed if ch[0] in cards}, set())

    def _closed_card(self, c: Call) -> str:
        c.need(1)
        if c.params[0].strip().upper() == "ALL":
            raise ScpiError(-224, "ALL is not available for the query")
        cards = self._cards(c.params[0])
        return self._format([ch for ch in self.closed if ch[0] in cards])

    def _function(self, c: Call) -> None:
        c.need(1)
        self.auto = c.choice(0, {"ACONfig": "ACON", "NCONfig": "NCON"}) == "ACON"

    def _closed_query(self, c: Call) -> str:
        chans = self._channels(c)
        return ",".join("1" if ch in self.closed else "0" for ch in chans)

    def _rule(self, c: Call) -> None:
        c.need(2)
        text = c.params[0].strip().upper()
        value = c.choice(1, {"FREE": "FREE", "SROUte": "SROU"})
        for card in self._cards(text):
            self.rule[card] = value

    def _sequence(self, c: Call) -> None:
        c.need(2)
        text = c.params[0].strip().upper()
        value = c.choice(1, {"NSEQ": "NSEQ", "BBM": "BBM", "MBBR": "MBBR"})
        for card in self._cards(text):
            self.sequence[card] = value
