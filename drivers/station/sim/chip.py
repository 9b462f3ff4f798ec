"""The simulated chip behind a station's instruments: the crossbar arrays as tiles of any hil
backend (normally sim://), the matrix outputs each line is wired to, and the modelled
instrument clock. A device is stressed only when its row and column lines are routed to the
SMU force input and to ground; a bias below the switching threshold moves nothing (a read)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from drivers.station.profile import StationProfile
from hil.backend import Backend, Tile, open_backend

FORCE, GROUND = "force", "ground"


@dataclass
class Compliance:
    """What a bias produced under a current compliance: current and whether it clamped."""

    current_a: float
    tripped: bool


@dataclass
class _Array:
    tile: Tile
    rows: int
    cols: int
    pending: torch.Tensor  # int32 counts not yet applied to the inner tile
    snapshot: np.ndarray | None = None  # one read of every device (read noise drawn once)
    used: np.ndarray | None = None  # devices whose snapshot value a measurement consumed
    dirty: bool = False


@dataclass
class InstrumentClock:
    """Modelled seconds the station has spent, by what spent them."""

    seconds: float = 0.0
    by_kind: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def spend(self, kind: str, seconds: float, n: int = 1) -> None:
        self.seconds += seconds
        self.by_kind[kind] = self.by_kind.get(kind, 0.0) + seconds
        self.counts[kind] = self.counts.get(kind, 0) + n


class SimChip:
    """The devices behind the matrix; the instruments call :meth:`bias` and :meth:`pulse`."""

    def __init__(self, profile: StationProfile, backend_url: str = "sim://"):
        self.profile = profile
        self.backend: Backend = open_backend(backend_url)
        self.clock = InstrumentClock()
        cond = profile.conductance
        g_min = cond.g_min_s if cond.g_min_s is not None else 1e-6
        g_max = cond.g_max_s if cond.g_max_s is not None else 1e-4
        self.g_ref, self.g_scale = 0.5 * (g_min + g_max), 0.5 * (g_max - g_min)
        self.threshold_v = profile.sim.switching_threshold_v
        self.noise_a = profile.sim.current_noise_a
        self.rng = np.random.default_rng(0)
        self.device_pulses = 0  # pulses that reached a device
        self.arrays: list[_Array] = []
        self.line_of: dict[int, tuple[int, str, int]] = {}  # output -> (array, row|col, index)
        try:
            for k, a in enumerate(profile.arrays):
                tile = self.backend.allocate(f"array{k}", a.rows, a.cols)
                self.arrays.append(_Array(tile, a.rows, a.cols,
                                          torch.zeros(a.rows, a.cols, dtype=torch.int32)))
                for i, line in enumerate(a.row_lines):
                    self.line_of[line] = (k, "row", i)
                for j, line in enumerate(a.col_lines):
                    self.line_of[line] = (k, "col", j)
        except BaseException:
            self.backend.close()
            raise
        self.connections: dict[int, set[str]] = {}  # matrix output -> terminals on it
        self._frames: dict[int, dict[int, set[str]]] = {}  # the same, per matrix frame

    # -- wiring (the matrix model sets it) ---------------------------------------------------
    def set_connections(self, connections: dict[int, set[str]], frame: int = 0) -> None:
        """What matrix frame ``frame`` connects now (global output -> terminals); the chip
        sees the union over all frames."""
        self._frames[frame] = {k: set(v) for k, v in connections.items() if v}
        merged: dict[int, set[str]] = {}
        for wiring in self._frames.values():
            for k, v in wiring.items():
                merged.setdefault(k, set()).update(v)
        self.connections = merged

    def _stressed(self) -> list[tuple[int, int, int, int]]:
        """(array, row, col, sign) of every device across force and ground: sign +1 when the
        row carries the force line, -1 when the column does (the device sees -V)."""
        out = []
        lines: dict[int, dict[str, dict[str, list[int]]]] = {}
        for output, terminals in self.connections.items():
            where = self.line_of.get(output)
            if where is None:
                continue
            k, kind, index = where
            for terminal in terminals:
                lines.setdefault(k, {}).setdefault(kind, {}).setdefault(terminal, []).append(index)
        for k, kinds in lines.items():
            rows, cols = kinds.get("row", {}), kinds.get("col", {})
            for r in rows.get(FORCE, []):
                out += [(k, r, c, 1) for c in cols.get(GROUND, [])]
            for c in cols.get(FORCE, []):
                out += [(k, r, c, -1) for r in rows.get(GROUND, [])]
        return out

    # -- physics ---------------------------------------------------------------------------
    def conductance(self, k: int, r: int, c: int) -> float:
        """One measurement's conductance of a device (its read noise drawn fresh)."""
        a = self.arrays[k]
        if int(a.pending[r, c]):  # its own pulses first; other devices' may wait
            self._flush(a)
        if a.snapshot is None or a.used[r, c]:
            a.snapshot = a.tile.read().detach().to("cpu", torch.float64).numpy()
            a.used = np.zeros(a.snapshot.shape, bool)
        a.used[r, c] = True
        return self.g_ref + self.g_scale * float(a.snapshot[r, c])

    def bias(self, volts: float, compliance_a: float) -> Compliance:
        """A DC bias on the force line: the current through every routed device (clamped)."""
        current = 0.0
        for k, r, c, sign in self._stressed():
            current += sign * volts * self.conductance(k, r, c)
        if self.noise_a:
            current += float(self.rng.normal(0.0, self.noise_a))
        if abs(current) > compliance_a:
            return Compliance(float(np.copysign(compliance_a, current)), True)
        return Compliance(current, False)

    def pulse(self, volts: float, count: int, compliance_a: float) -> Compliance:
        """``count`` pulses of ``volts`` on the force line: each routed device whose bias
        reaches the switching threshold (and is not held back by the compliance) moves by
        ``count`` pulses of the polarity of the bias it sees."""
        stressed = self._stressed()
        g = {(k, r, c): self.conductance(k, r, c) for k, r, c, _ in stressed}
        total = sum(sign * volts * g[k, r, c] for k, r, c, sign in stressed)
        peak = Compliance(float(np.copysign(compliance_a, total)), True) \
            if abs(total) > compliance_a else Compliance(total, False)
        if count <= 0:
            return peak
        for k, r, c, sign in stressed:
            v = sign * volts
            if peak.tripped:  # the SMU holds the current: the bias collapses across the load
                v *= compliance_a / abs(total)
            if abs(v) < self.threshold_v:
                continue
            a = self.arrays[k]
            if int(a.pending[r, c]):
                self._flush(a)
            a.pending[r, c] = count if v > 0 else -count
            a.dirty = True
            self.device_pulses += count
        return peak

    def _flush(self, a: _Array) -> None:
        """Apply the pending pulse trains to the devices (one call: counts as the host asked)."""
        if a.dirty:
            a.tile.pulse(a.pending)
            a.pending = torch.zeros_like(a.pending)
            a.dirty = False
            a.snapshot = None

    def weights(self, k: int = 0) -> torch.Tensor:
        """The devices' true weights (tests compare them with sim://)."""
        a = self.arrays[k]
        self._flush(a)
        return a.tile.w.clone() if hasattr(a.tile, "w") else a.tile.read()

    def close(self) -> None:
        self.backend.close()
