"""The station interlock: every command is checked against the profile's limits before
any byte leaves the host; a violation raises SafetyLimitError and nothing is sent.

It is the one place of these checks for every driver (the chip link, instrument stations,
crossbar platforms). A driver holds one :class:`Interlock` built from its profile and calls:

- :meth:`Interlock.check_shape` for every physical pulse it will apply (amplitude, width,
  compliance within the limits, all finite);
- :meth:`Interlock.check_region` when it places a tile (inside its array and the allowed
  rows and columns);
- :meth:`Interlock.tighten` once it knows what the instrument itself takes per command;
- :meth:`Interlock.admit` before every pulse command: the counts must be integers, within
  ``max_pulses_per_command``, only on allowed devices, and within what the current
  algorithm step may still apply to each device (``max_pulses_per_step``); the command is
  then charged to the step. A command refused here was not charged, so the caller sends
  nothing and may go on;
- :meth:`Interlock.step` as the body of its ``Backend.step()``, so that the algorithms'
  steps open and close the per-step budget (steps nest: the outermost one counts).

A command whose per-device counts are only bounded, not known (a pulse-train rank-1
update: at most ``train_length`` coincidences per sample), is checked per command with
:meth:`check_counts` on its bound and charged with :meth:`charge` on the bound summed
over the samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np

from drivers.profile import ArraySpec, PulseShape, StationLimits
from hil.errors import SafetyLimitError

POLARITIES = ("potentiate", "depress")


class Region(Protocol):
    """Where a tile lies on the chip (drivers.link.TileInfo is one)."""

    name: str
    row: int
    col: int
    rows: int
    cols: int


def as_counts(counts: object, name: str | None = None) -> np.ndarray:
    """Pulse counts as an integer numpy array; a float, bool or non-numeric count is refused
    (never rounded or truncated silently)."""
    arr = np.asarray(counts)
    if arr.dtype.kind not in "iu":
        first = f" such as {np.ravel(arr)[0]!r}" if arr.size else ""
        raise SafetyLimitError(f"pulse counts must be integers, got {arr.dtype}{first}",
                               tile=name, op="pulse")
    return arr


def peak_count(counts: np.ndarray) -> int:
    """The largest |count| of an integer array, in Python integers (no int64 overflow:
    np.abs of the int64 minimum is negative)."""
    if counts.size == 0:
        return 0
    return max(-int(counts.min()), int(counts.max()))


class Interlock:
    """Checks pulse shapes, tile regions, pulse-count maps and per-step totals against the
    station limits (see the module docstring for the calls a driver makes)."""

    def __init__(self, limits: StationLimits, arrays: list[ArraySpec]):
        self.limits = limits
        self.arrays = arrays
        self.max_pulses_per_command = limits.max_pulses_per_command
        self._depth = 0  # nesting of open steps
        self._totals: dict[str, np.ndarray] = {}  # per tile: |counts| applied in this step

    def tighten(self, max_pulses_per_command: int) -> None:
        """Lower the per-command limit to what the instrument itself reports it takes
        (a driver calls this after asking the instrument); never raises it."""
        self.max_pulses_per_command = min(self.max_pulses_per_command,
                                          int(max_pulses_per_command))

    @property
    def step_budget(self) -> int:
        """The most pulses one step may apply to one device."""
        return self.limits.max_pulses_per_step

    # -- pulse shapes and placement ------------------------------------------------------
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

    # -- one command ---------------------------------------------------------------------
    def check_counts(self, name: str, row: int, col: int, counts: object) -> None:
        """One command's pulse counts (top-left device at chip row, col): integers, within
        the per-command limit, and only on allowed devices. Charges nothing."""
        where = {"tile": name, "op": "pulse"}
        counts = as_counts(counts, name)
        if counts.size == 0:
            return
        if counts.ndim != 2:
            raise SafetyLimitError(f"pulse counts must be a 2-d map, got {counts.ndim}-d",
                                   **where)
        peak = peak_count(counts)
        if peak > self.max_pulses_per_command:
            raise SafetyLimitError(
                f"pulse count {peak} exceeds {self.max_pulses_per_command} per command",
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

    # -- one step ------------------------------------------------------------------------
    @contextmanager
    def step(self) -> Iterator[None]:
        """One algorithm step: the per-device totals of every command charged inside are
        bounded by ``max_pulses_per_step``. Nested steps join the outermost one."""
        if self._depth == 0:
            self._totals.clear()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._totals.clear()

    @property
    def in_step(self) -> bool:
        return self._depth > 0

    def charge(self, tile: Region, counts: object, at: tuple[int, int] = (0, 0)) -> None:
        """Add |counts| (a map placed at ``at`` inside ``tile``) to the open step's totals.

        Refused (SafetyLimitError, nothing charged) when a device's total would exceed
        ``max_pulses_per_step``. Outside a step the command is a step of its own."""
        counts = as_counts(counts, tile.name)
        if counts.size == 0:
            return
        budget = self.step_budget
        r, c = at
        h, w = counts.shape
        if r < 0 or c < 0 or r + h > tile.rows or c + w > tile.cols:
            raise SafetyLimitError(f"a {h}x{w} pulse map at ({r}, {c}) outside the "
                                   f"{tile.rows}x{tile.cols} tile", tile=tile.name, op="pulse")
        peak = peak_count(counts)
        if peak > budget:  # also keeps the sums below small enough for int64
            raise SafetyLimitError(self._over(peak, tile.name), tile=tile.name, op="pulse")
        if not self.in_step:
            return
        totals = self._totals.get(tile.name)
        if totals is None or totals.shape != (tile.rows, tile.cols):
            totals = self._totals[tile.name] = np.zeros((tile.rows, tile.cols), np.int64)
        view = totals[r:r + h, c:c + w]
        new = view + np.abs(counts.astype(np.int64))
        worst = int(new.max())
        if worst > budget:
            raise SafetyLimitError(self._over(worst, tile.name, int(view.max())),
                                   tile=tile.name, op="pulse")
        view[...] = new

    def _over(self, total: int, name: str, before: int | None = None) -> str:
        where = "" if before is None else f" (this step had already applied up to {before})"
        return (f"{total} pulses on one device in one step exceed the station's "
                f"max_pulses_per_step={self.step_budget}{where}")

    def admit(self, tile: Region, counts: object, at: tuple[int, int] = (0, 0)) -> None:
        """The check before a pulse command of ``counts`` placed at ``at`` inside ``tile``:
        :meth:`check_counts` (integers, per command, allowed devices), then :meth:`charge`
        (per step). Raises SafetyLimitError with nothing charged: send nothing."""
        counts = as_counts(counts, tile.name)
        self.check_counts(tile.name, tile.row + at[0], tile.col + at[1], counts)
        self.charge(tile, counts, at)
