"""``station://PROFILE``: a crossbar chip behind an SMU and a switch matrix, on the one backend
contract. ``pulse(n)`` becomes, for each device with a non-zero count, a route (break before
make: only its row on the SMU force input, only its column on ground) and one pulse train of
|n| pulses of its polarity (a trigger count, not |n| commands); ``read()`` routes each device,
sources the read voltage and measures the current (G = I / V_read, then the weight map).
Devices are ordered row by row so a row stays closed while its columns step. Every limit is
checked by the interlock before any byte; every error path and close() switch the SMU output
off and open every relay, and confirm it."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from drivers.interlocked import InstrumentBackend
from drivers.profile import ArraySpec
from drivers.safety import Interlock
from drivers.station.dialect import Dialect, Route
from drivers.station.profile import StationProfile
from drivers.station.timing import TIMINGS, period_of
from drivers.weight_map import TileMap, WeightMap
from hil.backend import Capabilities, Tile
from hil.errors import BackendError, SafetyLimitError

log = logging.getLogger(__name__)


def station_interlock(profile: StationProfile) -> Interlock:
    """The shared interlock over the profile's limits and arrays, with every station-specific
    check run once: pulse shapes, the read (a bias below every limit), instrument minimums."""
    lock = Interlock(profile.limits, [ArraySpec(rows=a.rows, cols=a.cols)
                                      for a in profile.arrays])
    timing = TIMINGS[profile.dialect]
    for polarity, shape in profile.pulses.items():
        lock.check_shape(polarity, shape)
        if shape.width_s < timing.min_pulse_width_s:
            raise SafetyLimitError(f"width {shape.width_s} s is below the SMU's shortest pulse "
                                   f"{timing.min_pulse_width_s} s", op=f"pulse shape {polarity}")
    most = profile.limits.max_pulses_per_command
    if most > timing.max_train:
        raise SafetyLimitError(f"limits.max_pulses_per_command={most} exceeds the SMU's "
                               f"longest train ({timing.max_train})", op="pulse")
    if (profile.pulses["potentiate"].amplitude_v <= 0
            or profile.pulses["depress"].amplitude_v >= 0):
        raise SafetyLimitError("potentiate needs a positive amplitude, depress a negative one",
                               op="pulse shape")
    rd = profile.read
    if not np.isfinite([rd.voltage_v, rd.aperture_s, rd.compliance_a]).all():
        raise SafetyLimitError("read has a non-finite value", op="read")
    if rd.voltage_v == 0 or abs(rd.voltage_v) > profile.limits.max_amplitude_v:
        raise SafetyLimitError(f"read voltage {rd.voltage_v} V must be nonzero and within "
                               f"+-{profile.limits.max_amplitude_v} V", op="read")
    weakest = min(abs(p.amplitude_v) for p in profile.pulses.values())
    if abs(rd.voltage_v) >= weakest:
        raise SafetyLimitError(f"read voltage {rd.voltage_v} V would be a pulse: it must stay "
                               f"below the weakest pulse amplitude {weakest} V", op="read")
    if rd.compliance_a > profile.limits.max_compliance_a:
        raise SafetyLimitError(f"read compliance {rd.compliance_a} A exceeds "
                               f"{profile.limits.max_compliance_a} A", op="read")
    if not timing.min_aperture_s <= rd.aperture_s <= timing.max_aperture_s:
        raise SafetyLimitError(f"aperture {rd.aperture_s} s outside the SMU's "
                               f"{timing.min_aperture_s}..{timing.max_aperture_s} s", op="read")
    return lock


@dataclass(frozen=True)
class TileRegion:
    """Where a tile lies on its array (the interlock's Region)."""

    name: str
    row: int
    col: int
    rows: int
    cols: int


class StationTile(Tile):
    """A tile on one array of the station's chip: (array, row, col) of its top-left device."""

    def __init__(self, backend: StationBackend, name: str, array: int, row: int, col: int,
                 rows: int, cols: int, wmap: TileMap):
        self.station = backend
        self.array, self.row, self.col = array, row, col
        self.wmap = wmap
        self.region = TileRegion(name, row, col, rows, cols)
        super().__init__(backend, name, rows, cols, backend.profile.dw_min)

    def _lines(self, r: int, c: int) -> Route:
        spec = self.station.profile.arrays[self.array]
        return Route(spec.row_lines[self.row + r], spec.col_lines[self.col + c])

    def _order(self, mask: np.ndarray) -> list[tuple[int, int]]:
        """Devices of ``mask`` row by row (a row stays closed while its columns step)."""
        rows, cols = np.nonzero(mask)
        return list(zip(rows.tolist(), cols.tolist(), strict=True))

    # -- the contract --------------------------------------------------------------------
    def read(self) -> torch.Tensor:
        return self._read_region(0, self.shape[1])

    def read_columns(self, cols: slice) -> torch.Tensor:
        first, width = self.column_range(cols)
        return self._read_region(first, width)

    def _read_region(self, first: int, width: int) -> torch.Tensor:
        st = self.station
        st._check_open("read", self.name)
        mask = np.zeros(self.shape, bool)
        mask[:, first:first + width] = True
        g = np.full(self.shape, np.nan)
        with st.guard("read", self.name):
            devices = self._order(mask)
            currents = st.dialect.read_devices([self._lines(r, c) for r, c in devices],
                                               self._where(devices))
            for (r, c), i in zip(devices, currents, strict=True):
                g[r, c] = i / st.profile.read.voltage_v
        w = self.wmap.to_weight(g[:, first:first + width])
        return torch.from_numpy(np.ascontiguousarray(w))

    def pulse(self, n: torch.Tensor) -> None:
        """Signed pulse counts; the interlock checks them before anything is sent."""
        counts = self.check_pulses(n).cpu().numpy()
        self.station._check_open("pulse", self.name)
        self.station.interlock.admit(self.region, counts)  # per command and per step
        self._pulse_counts(counts)

    def _pulse(self, n: torch.Tensor) -> None:  # the contract's hook; pulse() is overridden
        self.pulse(n)

    def _pulse_counts(self, counts: np.ndarray) -> None:
        st = self.station
        st._check_open("pulse", self.name)
        devices = self._order(counts != 0)
        if not devices:
            return
        with st.guard("pulse", self.name):
            st.dialect.pulse_devices([(self._lines(r, c), int(counts[r, c])) for r, c in devices],
                                     self._where(devices))

    def pulse_read(self, schedule: Sequence[torch.Tensor]) -> torch.Tensor:
        """For each pulse-count map of ``schedule``: pulse, then read; the reads [T, rows,
        cols]. Each device is routed once and runs its whole schedule (trains and reads)
        while routed: one route per device instead of two per step."""
        st = self.station
        st._check_open("pulse_read", self.name)
        maps = [self.check_pulses(n).cpu().numpy() for n in schedule]
        for counts in maps:
            st.interlock.check_counts(self.name, self.row, self.col, counts)
        for counts in maps:
            st.interlock.admit(self.region, counts)
        if not maps:
            return torch.empty((0, *self.shape))
        stack = np.stack(maps).astype(np.int64)  # [T, rows, cols]
        devices = self._order(np.ones(self.shape, bool))
        g = np.empty(stack.shape)
        with st.guard("pulse_read", self.name):
            programs = [(self._lines(r, c), stack[:, r, c].tolist()) for r, c in devices]
            currents = st.dialect.run_programs(programs, self._where(devices))
            for (r, c), seq in zip(devices, currents, strict=True):
                g[:, r, c] = np.asarray(seq) / st.profile.read.voltage_v
        return torch.from_numpy(np.ascontiguousarray(self.wmap.to_weight(g)))

    def estimate_seconds(self, reads: int = 0, pulses: int = 0, pulse_reads: int = 0,
                         count: int = 1, calls: int = 1) -> float:
        """Modelled instrument seconds of ``reads`` whole-tile reads, ``pulses`` whole-tile
        pulse maps of |count| on every device, and ``pulse_reads`` steps of pulse_read in
        ``calls`` calls (each call routes every device once)."""
        return self.station.dialect.estimate(self.shape, reads, pulses, pulse_reads, count,
                                             calls)

    def _where(self, devices: list[tuple[int, int]]) -> list[str]:
        return [f"tile {self.name!r} device ({r}, {c}) = array {self.array} "
                f"({self.row + r}, {self.col + c})" for r, c in devices]


class StationBackend(InstrumentBackend):
    """SMU + switch matrix as a backend: tiles are regions of the profile's arrays."""

    def __init__(self, url: str, profile: StationProfile, dialect: Dialect,
                 weight_map: WeightMap | None = None, chip: object | None = None):
        super().__init__(url)
        self.profile = profile
        self.interlock = station_interlock(profile)
        self.dialect = dialect
        self.weight_map = weight_map
        self.chip = chip  # the simulated chip with ?sim= (tests look at its devices)
        lim = profile.limits
        self.capabilities = Capabilities(mvm=False, outer_update=False, allocate=True,
                                         max_pulses_per_command=lim.max_pulses_per_command,
                                         max_pulses_per_step=self.interlock.step_budget,
                                         device="cpu")
        self.timing = TIMINGS[profile.dialect]
        self.period_s = {p: period_of(s.width_s, profile.pulse_period_s, self.timing)
                         for p, s in profile.pulses.items()}
        try:
            with self.guard("configure"):
                dialect.open()
        except BaseException:
            dialect.close()
            raise

    # -- safety ------------------------------------------------------------------------------
    def guard(self, op: str, tile: str | None = None) -> _Guard:
        """A block after whose failure (any exception, Ctrl-C included) outputs go safe."""
        return _Guard(self, op, tile)

    def make_safe(self) -> None:
        """SMU output off and every relay open, confirmed by the instruments (best effort)."""
        try:
            self.dialect.safe()
        except Exception as exc:  # noqa: BLE001 - report; the caller's error is the story
            log.error("could not confirm the station safe: %s", exc)

    @contextmanager
    def step(self) -> Iterator[None]:
        """One algorithm step: the interlock bounds the pulses each device receives over all
        the trains sent inside (the profile's max_pulses_per_step)."""
        with self.interlock.step():
            yield

    def estimate_seconds(self, job) -> float:
        """Run ``job`` on a simulated twin of this station (the same profile and driver, the
        simulated instruments' clock; devices from sim://) and return its modelled seconds."""
        from drivers.station.url import connect

        twin = connect(f"{self.url} (estimate)", self.profile, "sim://", self.weight_map)
        try:
            start = twin.chip.clock.seconds
            job(twin)
            return twin.chip.clock.seconds - start
        finally:
            twin.close()

    @property
    def instrument_seconds(self) -> float | None:
        """The simulated instruments' modelled clock (None on real instruments)."""
        return None if self.chip is None else self.chip.clock.seconds

    # -- the contract --------------------------------------------------------------------
    def _allocate(self, name: str, rows: int, cols: int) -> Tile:
        fixed = self.profile.tiles.get(name)
        if fixed is not None:
            array, row, col = fixed.array, fixed.row, fixed.col
        else:
            array, row, col = self._place(name, rows, cols)
        self.interlock.check_region(name, array, row, col, rows, cols)
        for t in self._tiles.values():
            if (isinstance(t, StationTile) and t.array == array
                    and row < t.row + t.shape[0] and t.row < row + rows
                    and col < t.col + t.shape[1] and t.col < col + cols):
                raise BackendError(f"overlaps tile {t.name!r}", tile=name, op="allocate")
        return StationTile(self, name, array, row, col, rows, cols, self._map(name, (rows, cols)))

    def _map(self, name: str, shape: tuple[int, int]) -> TileMap:
        cond = self.profile.conductance
        if self.weight_map is not None:
            return self.weight_map.for_tile(name, shape)
        return TileMap(np.asarray(cond.g_ref, np.float64), cond.weight_scale)

    def _place(self, name: str, rows: int, cols: int) -> tuple[int, int, int]:
        """First fit in the allowed region of each array, row bands then columns."""
        (r0, r1), (c0, c1) = self.profile.limits.allowed_rows, self.profile.limits.allowed_cols
        for index, spec in enumerate(self.profile.arrays):
            used = [t for t in self._tiles.values()
                    if isinstance(t, StationTile) and t.array == index]
            for row in range(r0, min(r1, spec.rows - 1) - rows + 2):
                for col in range(c0, min(c1, spec.cols - 1) - cols + 2):
                    if not any(row < t.row + t.shape[0] and t.row < row + rows
                               and col < t.col + t.shape[1] and t.col < col + cols
                               for t in used):
                        return index, row, col
        raise BackendError(f"no room for a {rows}x{cols} tile in the allowed region",
                           tile=name, op="allocate")

    def _release(self) -> None:
        """After the output is off and the relays open: the connections."""
        self.dialect.close()
        if self.chip is not None:
            self.chip.close()


class _Guard:
    def __init__(self, backend: StationBackend, op: str, tile: str | None):
        self.backend, self.op, self.tile = backend, op, tile

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if kind is not None:
            self.backend.make_safe()
