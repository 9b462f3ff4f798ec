"""``arc2://`` : an ArC TWO through pyarc2 (``arc2://0?firmware=PATH&mapping=NAME&profile=NAME``)
or the simulated one (``arc2://sim?backend=URL`` with the devices of any hil backend URL,
quoted; parameters arc2 does not take go to that backend, so
``arc2://sim?model=power&seed=3`` is the ArC TWO over ``sim://?model=power&seed=3``), on
the backend contract. Also ``calib=FILE`` (the weight map), and for the simulated one
``threshold=V`` (the devices' switching voltage), ``current_noise=A`` (the std of each
current conversion) and ``noise_seed=N``.

``Tile.pulse(n)``: in rounds, each device still owed a pulse gets one; per bitline (a tile
column, the low channel) the devices of one polarity form one ``pulse_slice_masked`` (their
wordlines high), or per wordline (the low channel, at the opposite voltage) where that
takes fewer commands; the whole program is queued and run by one ``execute()``, then
``wait()``. ``Tile.read()``: ``read_all`` (a tile over every bitline) or one
``read_slice_masked`` per bitline, at the profile's read voltage, remapped from channel
order to (row, column), current to conductance to weight through the weight map.
Every value is checked by the interlock before any call; any failure grounds the
outputs (``finalise_operation(HardGnd)``) and becomes a BackendError naming the devices and
the call; close() grounds them too.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import numpy as np
import torch

from drivers.arc2.limits import Arc2Interlock, width_ns
from drivers.arc2.mapping import ChannelMap, load_mapping
from drivers.arc2.profile import Arc2Profile, load_arc2_profile
from drivers.arc2.spec import BIT_CHANNELS
from drivers.interlocked import InstrumentBackend, InterlockedTile
from drivers.weight_map import TileMap, WeightMap
from hil.backend import Capabilities, Tile
from hil.errors import BackendError, BackendURLError, SafetyLimitError
from hil.url import BackendURL

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Placement:
    """Where a tile sits: its first wordline and bitline (the interlock's Region)."""

    name: str
    row: int
    col: int
    rows: int
    cols: int


def pulse_program(counts: np.ndarray, group: dict[int, int] | None = None
                  ) -> list[tuple[int, int, np.ndarray]]:
    """The grouped pulses of a signed count map [rows, cols]: (column, sign, rows) per
    round and column, round by round, so that each device gets its |n| pulses; a column's
    group of one sign is split into commands of at most ``group[sign]`` rows."""
    program: list[tuple[int, int, np.ndarray]] = []
    mag = np.abs(counts)
    for k in range(1, int(mag.max(initial=0)) + 1):
        for sign in (1, -1):
            owed = (counts * sign) >= k
            size = (group or {}).get(sign, counts.shape[0]) or 1
            for j in np.flatnonzero(owed.any(axis=0)):
                rows = np.flatnonzero(owed[:, j])
                program += [(int(j), sign, rows[s:s + size]) for s in range(0, rows.size, size)]
    return program


class Arc2Tile(InterlockedTile):
    """A tile of the crossbar in the ArC TWO's socket, in weight units."""

    def __init__(self, backend: Arc2Backend, name: str, place: Placement, wmap: TileMap):
        super().__init__(backend, name, place.rows, place.cols,
                         backend.profile.dw_min)
        self.arc: Arc2Backend = backend
        self.place = place
        self.wmap = wmap
        m = backend.mapping
        self.word_ch = np.array(m.words[place.row:place.row + place.rows], dtype=np.uint64)
        self.bit_ch = [int(c) for c in m.bits[place.col:place.col + place.cols]]
        self._wpos = m.word_positions(range(place.row, place.row + place.rows))
        self._bpos = m.bit_positions(range(place.col, place.col + place.cols))

    def _devices(self, rows: np.ndarray | None = None, col: int | None = None) -> str:
        """Name devices as tile (row, col) with their wordline/bitline channels."""
        p = self.place
        if col is None:
            return f"rows {p.row}..{p.row + p.rows - 1}, cols {p.col}..{p.col + p.cols - 1}"
        rs = list(range(p.rows)) if rows is None else [int(r) for r in rows]
        return (f"devices rows {rs} of column {col} (bitline {p.col + col}, channel "
                f"{self.bit_ch[col]}; wordline channels "
                f"{[int(self.word_ch[r]) for r in rs]})")

    def _row_devices(self, row: int, cols: np.ndarray) -> str:
        """Name the devices of one wordline group."""
        cs = [int(c) for c in cols]
        return (f"devices row {row} (wordline {self.place.row + row}, channel "
                f"{int(self.word_ch[row])}), columns {cs} (bitline channels "
                f"{[self.bit_ch[c] for c in cs]})")

    def read(self) -> torch.Tensor:
        be = self.arc
        be._check_open("read", self.name)
        v = be.profile.read_voltage_v
        api = be.api
        cur = np.empty(self.shape, dtype=np.float64)
        if self.place.cols == len(BIT_CHANNELS):
            raw = be.call("read_all", self, self._devices(),
                          lambda: be.instrument.read_all(v, api.BiasOrder.Cols))
            cur[:] = np.asarray(raw, dtype=np.float64)[np.ix_(self._bpos, self._wpos)].T
        else:
            for j, low in enumerate(self.bit_ch):
                row = be.call("read_slice_masked", self, self._devices(col=j),
                              lambda low=low: be.instrument.read_slice_masked(
                                  low, self.word_ch, v))
                cur[:, j] = np.asarray(row, dtype=np.float64)[self._wpos]
        bad = ~np.isfinite(cur)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            be.make_safe()
            raise BackendError(f"no current for {int(bad.sum())} devices, first "
                               f"{self._devices(np.array([r]), int(c))}",
                               tile=self.name, op="read")
        g = np.abs(cur) / abs(v)  # the sign convention (low channel at -vread) drops out
        return torch.from_numpy(self.wmap.to_weight(g))

    def _pulse(self, n: torch.Tensor) -> None:
        be = self.arc
        be._check_open("pulse", self.name)
        counts = n.detach().cpu().numpy()
        be.interlock.admit(self.place, counts)
        counts = counts.astype(np.int64)  # within the limits now: negation cannot overflow
        if self.wmap.weight_scale < 0:
            counts = -counts  # potentiating the conductance lowers the weight
        group = {1: be.group_limit("potentiate"), -1: be.group_limit("depress")}
        by_bitline, by_wordline = pulse_program(counts, group), pulse_program(counts.T, group)
        if not by_bitline:
            return
        shapes = {1: be.shape("potentiate"), -1: be.shape("depress")}
        bits = np.array(self.bit_ch, dtype=np.uint64)
        if len(by_bitline) <= len(by_wordline):  # the bitline low, its wordlines high
            for j, sign, rows in by_bitline:
                volts, nanos = shapes[sign]
                be.call("pulse_slice_masked", self, self._devices(rows, j),
                        lambda j=j, v=volts, ns=nanos, m=self.word_ch[rows]:
                        be.instrument.pulse_slice_masked(self.bit_ch[j], v, ns, m))
        else:  # fewer commands with the wordline low: the same device voltage is -V
            for i, sign, cols in by_wordline:
                volts, nanos = shapes[sign]
                be.call("pulse_slice_masked", self, self._row_devices(i, cols),
                        lambda i=i, v=-volts, ns=nanos, m=bits[cols]:
                        be.instrument.pulse_slice_masked(int(self.word_ch[i]), v, ns, m))
        be.call("execute", self, self._devices(), lambda: be.instrument.execute())
        be.call("wait", self, self._devices(), lambda: be.instrument.wait())


class Arc2Backend(InstrumentBackend):
    """An ArC TWO (real through pyarc2, or the simulated one) under one station profile."""

    def __init__(self, url: str, api: ModuleType, instrument: Any, profile: Arc2Profile,
                 mapping: ChannelMap, weight_map: WeightMap | None = None,
                 on_close: Callable[[], None] | None = None):
        super().__init__(url)
        self.api = api
        self.instrument = instrument
        self.profile = profile
        self.mapping = mapping
        self.weight_map = weight_map
        self._on_close = on_close
        try:
            self.interlock, self._shapes = checked_profile(profile, mapping)
            self.capabilities = Capabilities(
                mvm=False, outer_update=False, allocate=True, device="cpu",
                max_pulses_per_command=profile.limits.max_pulses_per_command,
                max_pulses_per_step=self.interlock.step_budget)
            self.make_safe(strict=True)  # start from grounded outputs
        except BaseException:
            self._release()
            raise

    @contextmanager
    def step(self) -> Iterator[None]:
        """One algorithm step: the interlock bounds the pulses each device receives over
        all the commands sent inside (the profile's max_pulses_per_step)."""
        with self.interlock.step():
            yield

    def shape(self, polarity: str) -> tuple[float, int]:
        """(volts, nanoseconds) of one pulse of ``polarity``, as checked at open."""
        return self._shapes[polarity][:2]

    def group_limit(self, polarity: str) -> int:
        """The most devices one slice pulse of ``polarity`` may select (channel current)."""
        return self._shapes[polarity][2]

    def call(self, op: str, tile: Tile | None, devices: str, fn: Callable[[], T]) -> T:
        """One instrument call: any failure (ArC2Error, a panic in the library, Ctrl-C)
        grounds the outputs first and becomes a BackendError naming the devices and call."""
        self._check_open(op, tile.name if tile else None)
        try:
            return fn()
        except BaseException as exc:
            self.make_safe()
            if isinstance(exc, (KeyboardInterrupt, SystemExit, BackendError)):
                raise
            raise BackendError(f"{op} failed on {devices}: {type(exc).__name__}: {exc}",
                               tile=tile.name if tile else None, op=op) from exc

    # -- the contract ------------------------------------------------------------------------
    def _allocate(self, name: str, rows: int, cols: int) -> Tile:
        place = self._place(name, rows, cols)
        self.interlock.check_region(name, 0, place.row, place.col, rows, cols)
        usable = self.mapping.usable[place.row:place.row + rows, place.col:place.col + cols]
        if not usable.all():
            raise SafetyLimitError(f"mapping {self.mapping.name!r} masks out devices of "
                                   f"this tile", tile=name, op="allocate")
        if self.weight_map is not None:
            wmap = self.weight_map.for_tile(name, (rows, cols))
        else:
            wm = self.profile.weight_map
            wmap = TileMap(np.asarray(wm.g_ref, dtype=np.float64), wm.weight_scale)
        return Arc2Tile(self, name, place, wmap)

    def _place(self, name: str, rows: int, cols: int) -> Placement:
        """The profile's fixed placement, else first fit in row bands of the allowed region."""
        fixed = self.profile.tiles.get(name)
        if fixed is not None:
            return Placement(name, fixed.row, fixed.col, rows, cols)
        (r0, r1), (c0, c1) = self.profile.limits.allowed_rows, self.profile.limits.allowed_cols
        nw, nb = self.mapping.shape
        used = [t.place for t in self._tiles.values() if isinstance(t, Arc2Tile)]
        row = max([r0, *(u.row + u.rows for u in used)])
        if row + rows - 1 <= min(r1, nw - 1) and c0 + cols - 1 <= min(c1, nb - 1):
            return Placement(name, row, c0, rows, cols)
        raise BackendError(f"no room for a {rows}x{cols} tile in the allowed region",
                           tile=name, op="allocate")

    def make_safe(self, strict: bool = False) -> None:
        """Ground every channel (finalise_operation(HardGnd)); best effort unless strict."""
        try:
            self.instrument.finalise_operation(self.api.IdleMode.HardGnd)
        except Exception as exc:  # noqa: BLE001 - report; the caller's error goes on
            if strict:
                raise BackendError(f"could not ground the outputs: {exc}", op="open") from exc
            log.error("could not ground the ArC TWO outputs: %s", exc)

    def _release(self) -> None:
        """Drop the instrument (pyarc2 frees the USB handle with the object), then run the
        release hook (the port lock, or the simulation's backend)."""
        self.instrument = None
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


def checked_profile(profile: Arc2Profile, mapping: ChannelMap
                    ) -> tuple[Arc2Interlock, dict[str, tuple[float, int, int]]]:
    """The interlock of a profile and its pulses as (volts, ns, most devices per command)
    per polarity, every value checked (pulse shapes, read voltage) before an instrument is
    even opened."""
    interlock = Arc2Interlock(profile.limits, profile.arrays(mapping.shape))
    shapes: dict[str, tuple[float, int, int]] = {}
    for polarity in ("potentiate", "depress"):
        shape = getattr(profile.pulses, polarity)
        interlock.check_shape(polarity, shape)
        shapes[polarity] = (float(shape.amplitude_v), width_ns(shape.width_s),
                            interlock.max_group(shape))
    wm = profile.weight_map
    g_max = wm.g_ref + abs(wm.weight_scale) * 2.0  # a device at twice a unit weight
    interlock.check_read_voltage(profile.read_voltage_v, g_max)
    return interlock, shapes


def sim_url(backend: str = "sim://", **params: object) -> str:
    """``arc2://sim`` over the devices of the hil backend URL ``backend``, plus arc2
    parameters: ``sim://?model=power`` becomes ``arc2://sim?model=power``, any other
    backend goes quoted into ``backend=``."""
    scheme, _, query = backend.partition("?")
    parts = [query] if scheme == "sim://" and query else []
    if scheme != "sim://":
        parts.append(f"backend={quote(backend, safe='')}")
    parts += [f"{k}={quote(str(v), safe='')}" for k, v in params.items()]
    return "arc2://sim" + ("?" + "&".join(parts) if parts else "")


def open_arc2(url: BackendURL) -> Arc2Backend:
    """``arc2://PORT?firmware=..`` (pyarc2) or ``arc2://sim?backend=..`` (simulated)."""
    profile = load_arc2_profile(url.get_str("profile", "arc2") or "arc2")
    mapping = load_mapping(url.get_str("mapping", profile.mapping) or profile.mapping)
    calib = url.get_str("calib")
    weight_map = WeightMap.load(calib) if calib else None
    # the CLI's --take-over: an ArC TWO's lock dies with the process that held it, so
    # there is never a stale holder to take over from (a live one is refused by name)
    url.get_int("take_over", 0, lo=0, hi=1)
    checked_profile(profile, mapping)  # nothing out of limits reaches an instrument
    if url.location == "sim":
        inner = url.get_str("backend", "sim://") or "sim://"
        threshold = url.get_float("threshold", 1.0, lo=1e-3, hi=13.5)
        noise = url.get_float("current_noise", 0.0, lo=0.0, hi=1e-3)
        noise_seed = url.get_int("noise_seed", 0, lo=0)
        extra = {k: v for k, v in url.params.items() if k not in url._used}
        if extra:  # the devices' own parameters: their backend rejects any it does not know
            inner += ("&" if "?" in inner else "?") + urlencode(extra)
            for key in extra:
                url.get_str(key)
        url.finish()
        from drivers.arc2 import sim

        wm = profile.weight_map
        try:
            inst = sim.Instrument(0, "", backend=inner, mapping=mapping_name(url, profile),
                                  g_ref=wm.g_ref, g_scale=wm.weight_scale,
                                  threshold_v=threshold, current_noise=noise, seed=noise_seed)
        except sim.ArC2Error as exc:
            raise BackendError(f"cannot open the simulated ArC TWO: {exc}", op="open") from exc
        return Arc2Backend(url.url, sim, inst, profile, mapping, weight_map,
                           on_close=lambda: sim.close(inst))
    firmware = url.get_str("firmware")
    url.finish()
    try:
        port = int(url.location)
    except ValueError:
        raise BackendURLError(f"backend URL {url.url!r}: give an instrument id (arc2://0) "
                              "or arc2://sim") from None
    if not firmware:
        raise BackendURLError(f"backend URL {url.url!r}: give the firmware file, "
                              "?firmware=PATH")
    try:
        import pyarc2
    except ImportError:
        raise BackendURLError("arc2:// needs pyarc2: pip install 'analog-hil[arc2]'") from None
    release = port_lock(port)
    try:
        inst = pyarc2.Instrument(port, firmware)
    except BaseException as exc:
        release()
        if not isinstance(exc, pyarc2.ArC2Error):
            raise
        raise BackendError(f"cannot open ArC TWO {port} with firmware {firmware!r}: {exc} "
                           f"(instruments found: {pyarc2.find_ids()})", op="open") from exc
    return Arc2Backend(url.url, pyarc2, inst, profile, mapping, weight_map, on_close=release)


def port_lock(port: int, folder: str | None = None) -> Callable[[], None]:
    """One controlling process per instrument on this host: an exclusive lock on a file
    named after the port, held until the returned release() (or the process's end)."""
    try:
        import fcntl
    except ImportError:  # Windows: the USB driver refuses a second open on its own
        return lambda: None
    path = Path(folder or tempfile.gettempdir()) / f"analog-hil-arc2-{int(port)}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise BackendError(f"ArC TWO {port} is already controlled by pid {holder} "
                           f"(lock {path}): stop that process first", op="open") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())

    def release() -> None:
        os.close(fd)
    return release


def mapping_name(url: BackendURL, profile: Arc2Profile) -> str:
    """The mapping the URL chose (already consumed), else the profile's."""
    return url.params.get("mapping", profile.mapping)
