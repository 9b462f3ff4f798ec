"""The station interlock: every command is checked against the profile's limits before
any byte leaves the host; a violation raises SafetyLimitError and nothing is sent."""

from __future__ import annotations

import math

import numpy as np

from drivers.profile import ArraySpec, PulseShape, StationLimits
from hil.errors import SafetyLimitError

POLARITIES = ("potentiate", "depress")


class Interlock:
    """Checks pulse shapes, tile regions and pulse-count maps against station limits."""

    def __init__(self, limits: StationLimits, arrays: list[ArraySpec]):
        self.limits = limits
        self.arrays = arrays

    def check_shape(self, polarity: str, shape: PulseShape) -> None:
        lim = self.limits
        where = {"op": f"pulse shape {polarity}"}
        if polarity not in POLARITIES:
            raise SafetyLimitError(f"unknown polarity {polarity!r}", **where)
        values = (shape.amplitude_v, shape.width_s, shape.compliance_a)
        if not all(math.isfinite(v) for v in values):
            raise SafetyLimitError("pulse shape has a non-finite value", **where)
        if abs(shape.amplitude_v) > lim.max_amplitude_v:
            raise SafetyLimitError(
                f"amplitude {shape.amplitude_v} V exceeds +-{lim.max_amplitude_v} V", **where)
        if not 0 < shape.width_s <= lim.max_width_s:
            raise SafetyLimitError(
                f"width {shape.width_s} s outside (0, {lim.max_width_s}] s", **where)
        if not 0 < shape.compliance_a <= lim.max_compliance_a:
            raise SafetyLimitError(
                f"compliance {shape.compliance_a} A outside (0, {lim.max_compliance_a}] A",
                **where)

    def check_region(self, name: str, array: int, row: int, col: int, rows: int,
                     cols: int) -> None:
        """A tile must lie inside its array and inside the allowed rows and columns."""
        where = {"tile": name, "op": "allocate"}
        if not 0 <= array < len(self.arrays):
            raise SafetyLimitError(f"array {array} does not exist", **where)
        spec = self.arrays[array]
        if row < 0 or col < 0 or row + rows > spec.rows or col + cols > spec.cols:
            raise SafetyLimitError(
                f"rows {row}..{row + rows - 1}, cols {col}..{col + cols - 1} "
                f"outside array {array} ({spec.rows}x{spec.cols})", **where)
        (r0, r1), (c0, c1) = self.limits.allowed_rows, self.limits.allowed_cols
        if row < r0 or row + rows - 1 > r1 or col < c0 or col + cols - 1 > c1:
            raise SafetyLimitError(
                f"rows {row}..{row + rows - 1}, cols {col}..{col + cols - 1} outside the "
                f"allowed rows {r0}..{r1}, cols {c0}..{c1}", **where)

    def check_counts(self, name: str, row: int, col: int, counts: np.ndarray) -> None:
        """Pulse counts within the per-command limit and only on allowed devices."""
        where = {"tile": name, "op": "pulse"}
        if counts.size == 0:
            return
        peak = int(np.abs(counts.astype(np.int64)).max())
        if peak > self.limits.max_pulses_per_command:
            raise SafetyLimitError(
                f"pulse count {peak} exceeds {self.limits.max_pulses_per_command} per command",
                **where)
        (r0, r1), (c0, c1) = self.limits.allowed_rows, self.limits.allowed_cols
        rows, cols = counts.shape
        if row >= r0 and row + rows - 1 <= r1 and col >= c0 and col + cols - 1 <= c1:
            return
        active_r = np.nonzero(counts.any(axis=1))[0] + row
        active_c = np.nonzero(counts.any(axis=0))[0] + col
        if active_r.size and (active_r.min() < r0 or active_r.max() > r1
                              or active_c.min() < c0 or active_c.max() > c1):
            raise SafetyLimitError("pulses on devices outside the allowed rows/columns",
                                   **where)
