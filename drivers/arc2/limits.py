"""The station interlock with the ArC TWO's own ratings added: pulse amplitude within
+-13.5 V, width from 40 ns in 10 ns steps (high-speed drivers), 10 mA per channel (the
ArC TWO has no compliance: a pulse shape's ``compliance_a`` is the most current one
device draws at the pulse, which bounds the current of every pulsed line, half-selected
devices at V/2 included), a finite read voltage within the limits. libarc2 clamps an
out-of-range voltage or width without a word (and turns NaN into a rail voltage), so every
value is checked here, on the host, before any pyarc2 call."""

from __future__ import annotations

import math

from drivers.arc2 import spec
from drivers.profile import PulseShape
from drivers.safety import Interlock
from hil.errors import SafetyLimitError

LINE_DEVICES = 32  # devices on one line of the array in the socket


def width_ns(width_s: float) -> int:
    """A pulse width in whole nanoseconds (what pyarc2 takes)."""
    return int(round(width_s * 1e9))


class Arc2Interlock(Interlock):
    """Interlock of an ArC TWO station: the profile's limits, then the instrument's."""

    def check_shape(self, polarity: str, shape: PulseShape) -> None:
        super().check_shape(polarity, shape)
        where = {"op": f"pulse shape {polarity}"}
        if abs(shape.amplitude_v) > spec.MAX_AMPLITUDE_V:
            raise SafetyLimitError(f"amplitude {shape.amplitude_v} V exceeds the ArC TWO's "
                                   f"+-{spec.MAX_AMPLITUDE_V} V", **where)
        if shape.amplitude_v == 0 or (shape.amplitude_v > 0) != (polarity == "potentiate"):
            raise SafetyLimitError(f"a {polarity} pulse needs a "
                                   f"{'positive' if polarity == 'potentiate' else 'negative'} "
                                   f"amplitude, got {shape.amplitude_v} V", **where)
        ns = shape.width_s * 1e9
        if not (spec.MIN_WIDTH_NS <= ns < spec.MAX_FAST_WIDTH_NS):
            raise SafetyLimitError(f"width {shape.width_s} s outside the ArC TWO's "
                                   f"{spec.MIN_WIDTH_NS} ns .. 500 ms pulses", **where)
        if abs(ns - width_ns(shape.width_s)) > 1e-6 or width_ns(shape.width_s) % \
                spec.WIDTH_STEP_NS:
            raise SafetyLimitError(f"width {shape.width_s} s is not a multiple of "
                                   f"{spec.WIDTH_STEP_NS} ns", **where)
        if shape.compliance_a > spec.MAX_CHANNEL_CURRENT_A:
            raise SafetyLimitError(f"compliance {shape.compliance_a} A exceeds the ArC TWO's "
                                   f"{spec.MAX_CHANNEL_CURRENT_A} A per channel", **where)
        # a selected wordline carries its device at V and 31 half-selected ones at V/2
        line = shape.compliance_a * (1 + (LINE_DEVICES - 1) / 2)
        if line > spec.MAX_CHANNEL_CURRENT_A:
            raise SafetyLimitError(
                f"compliance {shape.compliance_a} A per device puts up to {line:.3g} A on a "
                f"pulsed line (1 device at V, {LINE_DEVICES - 1} at V/2), over the ArC TWO's "
                f"{spec.MAX_CHANNEL_CURRENT_A} A per channel", **where)

    @staticmethod
    def max_group(shape: PulseShape) -> int:
        """The most devices one slice pulse may select on its low line: k at V and the
        other devices of the line at V/2 stay within the channel rating."""
        k = 2 * spec.MAX_CHANNEL_CURRENT_A / shape.compliance_a - LINE_DEVICES
        return max(1, min(LINE_DEVICES, int(math.floor(k + 1e-9))))

    def check_read_voltage(self, volts: float, g_max: float) -> None:
        """A finite read voltage within the amplitude limits, whose current through a whole
        line of ``32`` devices at conductance ``g_max`` stays under the channel rating."""
        where = {"op": "read voltage"}
        if not math.isfinite(volts) or volts == 0:
            raise SafetyLimitError(f"read voltage {volts!r} must be finite and nonzero", **where)
        top = min(self.limits.max_amplitude_v, spec.MAX_AMPLITUDE_V)
        if abs(volts) > top:
            raise SafetyLimitError(f"read voltage {volts} V exceeds +-{top} V", **where)
        if abs(volts) * g_max * 32 > spec.MAX_CHANNEL_CURRENT_A:
            raise SafetyLimitError(f"a read at {volts} V of 32 devices at {g_max:g} S would "
                                   f"exceed {spec.MAX_CHANNEL_CURRENT_A} A per channel", **where)
