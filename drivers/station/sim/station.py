"""A simulated station: the simulated chip and the two simulated instruments of a profile's
dialect, each answering program messages as the real one would; every message spends its
bus time on the station clock."""

from __future__ import annotations

from collections.abc import Callable

from drivers.station.profile import StationProfile
from drivers.station.sim.chip import SimChip
from drivers.station.timing import TIMINGS


class SimStation:
    """``smu`` and ``matrix`` are the instrument models; :meth:`server` gives the callable
    that answers one program message of either (a line in, the reply line or None out)."""

    def __init__(self, profile: StationProfile, backend_url: str = "sim://"):
        self.profile = profile
        self.chip = SimChip(profile, backend_url)
        m = profile.matrix
        try:
            if profile.dialect == "keysight":
                from drivers.station.sim.b2200 import B2200
                from drivers.station.sim.b2900 import B2900

                self.smu = B2900(self.chip, channels=2)
                self.matrix = B2200(self.chip, m.cards, m.force_input, m.ground_input,
                                    m.sense_input)
            else:
                from drivers.station.sim.k707 import K707
                from drivers.station.sim.k2600 import K2600

                self.smu = K2600(self.chip)
                self.matrix = K707(self.chip, m.cards, m.force_input, m.ground_input,
                                   m.sense_input)
        except BaseException:
            self.chip.close()
            raise
        self.message_s = TIMINGS[profile.dialect].message_s
        self.owner: dict[str, object] = {}  # instrument -> the controlling client

    def server(self, which: str) -> Callable[[str], str | None]:
        inst = self.smu if which == "smu" else self.matrix

        def serve(line: str) -> str | None:
            self.chip.clock.spend("message", self.message_s)
            return inst.message(line)

        return serve

    @property
    def clock(self):
        return self.chip.clock

    def close(self) -> None:
        self.chip.close()
