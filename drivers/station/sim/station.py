"""A simulated station: the simulated chip and the two simulated instruments of a profile's
dialect, each answering program messages as the real one would; every message spends its
bus time on the station clock."""

from __future__ import annotations

from collections.abc import Callable

from drivers.station.profile import MATRIX_GEOMETRY, StationProfile
from drivers.station.sim.chip import SimChip
from drivers.station.timing import TIMINGS


def frame_index(which: str) -> int:
    """'matrix' -> 0, 'matrix2' -> 1, ... (the names of a station's matrix frames)."""
    return int(which[len("matrix"):] or 1) - 1


class SimStation:
    """``smu`` and ``matrix`` are the instrument models; :meth:`server` gives the callable
    that answers one program message of either (a line in, the reply line or None out)."""

    def __init__(self, profile: StationProfile, backend_url: str = "sim://"):
        self.profile = profile
        self.chip = SimChip(profile, backend_url)
        m = profile.matrix
        try:
            if profile.dialect == "keysight":
                from drivers.station.sim.b2200 import B2200 as frame_class
            else:
                from drivers.station.sim.k707 import K707 as frame_class
            per_card = MATRIX_GEOMETRY[profile.dialect][1]
            self.frames = []  # one matrix model per frame (the profile's expansion frames)
            offset = 0
            for k, cards in enumerate(profile.frame_cards):
                self.frames.append(frame_class(self.chip, cards, m.force_input, m.ground_input,
                                               m.sense_input, frame=k, offset=offset))
                offset += cards * per_card
            self.matrix = self.frames[0]
            if profile.dialect == "keysight":
                from drivers.station.sim.b2900 import B2900

                self.smu = B2900(self.chip, channels=2)
            else:
                from drivers.station.sim.k2600 import K2600

                nodes = profile.tsplink_nodes or []
                self.smu = K2600(self.chip, dict(zip(nodes, self.frames, strict=False)))
        except BaseException:
            self.chip.close()
            raise
        self.message_s = TIMINGS[profile.dialect].message_s
        self.owner: dict[str, object] = {}  # instrument -> the controlling client

    def server(self, which: str) -> Callable[[str], str | None]:
        inst = self.smu if which == "smu" else self.frames[frame_index(which)]

        def serve(line: str) -> str | None:
            self.chip.clock.spend("message", self.message_s)
            return inst.message(line)

        return serve

    @property
    def relay_operations(self) -> int:
        """Relay operations of every matrix frame."""
        return sum(f.relay_operations for f in self.frames)

    @property
    def instruments(self) -> list[str]:
        """The names :meth:`server` answers: 'smu', 'matrix', then 'matrix2', ..."""
        return ["smu", "matrix"] + [f"matrix{k + 1}" for k in range(1, len(self.frames))]

    @property
    def clock(self):
        return self.chip.clock

    def close(self) -> None:
        self.chip.close()
