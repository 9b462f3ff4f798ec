"""The station interlock with the ArC TWO's own ratings added: pulse amplitude within
+-13.5 V, width from 40 ns in 10 ns steps (high-speed drivers), 10 mA per channel, a finite
read voltage within the limits. libarc2 clamps an out-of-range voltage or width without a
word (and turns NaN into a rail voltage), so every value is checked here, on the host,
before any pyarc2 call."""

from __future__ import annotations

import math

from drivers.arc2 import spec
from drivers.profile import PulseShape
from drivers.safety import Interlock
from hil.errors import SafetyLimitError


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
