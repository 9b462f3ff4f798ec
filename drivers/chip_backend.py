"""The backend contract over a chip link: station interlock before every command, bounded
retries with backoff and reconnection, sequence-numbered exactly-once operations, outputs
made safe on close, on any error and on Ctrl-C."""

from __future__ import annotations

import getpass
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

from drivers.interlocked import InstrumentBackend, InterlockedTile
from drivers.link import (
    E_SEQUENCE,
    MAX_BATCH,
    ChipLink,
    ChipRejected,
    SessionRefused,
    TileInfo,
    check_name,
    next_seq,
)
from drivers.profile import NUMPY_DTYPES_BY_NAME, Profile, PulseShape
from drivers.safety import POLARITIES, Interlock, as_counts
from drivers.transport import LinkDown
from drivers.weight_map import TileMap, WeightMap
from hil.backend import Capabilities, Tile
from hil.errors import (
    BackendError,
    InstrumentTimeout,
    NonFiniteError,
    ProtocolError,
    SafetyLimitError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRYABLE = (InstrumentTimeout, ProtocolError, LinkDown)


def this_host() -> str:
    """What this host announces when it takes a chip: user, host name, pid and a nonce
    (the nonce makes a retried session request recognisable as the same host's)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}/{secrets.token_hex(3)}"


class ChipTile(InterlockedTile):
    """A tile on a chip: reads and pulses go over the link, in weight units."""

    def __init__(self, backend: ChipBackend, info: TileInfo, dw_min_g: float,
                 wmap: TileMap | None):
        self.info = info
        self.wmap = wmap
        dw = dw_min_g * abs(wmap.scale) if wmap is not None else dw_min_g
        super().__init__(backend, info.name, info.rows, info.cols, dw)
        self.chip: ChipBackend = backend

    def read(self) -> torch.Tensor:
        g = self.chip._sequenced("read", self.name,
                                 lambda seq: self.chip.link.read(seq, self.name, self.shape))
        w = self.wmap.to_weight(g) if self.wmap is not None else g.copy()
        return torch.from_numpy(w)

    def _pulse(self, n: torch.Tensor) -> None:
        counts = n.detach().cpu().numpy()
        self.chip.interlock.admit(self.info, counts)
        counts = counts.astype(np.int64)  # within the limits now: negation cannot overflow
        if self.wmap is not None and self.wmap.scale < 0:
            counts = -counts  # potentiating the conductance lowers the weight
        wire = np.ascontiguousarray(counts.astype(self.chip.wire_dtype))
        self.chip._sequenced("pulse", self.name,
                             lambda seq: self.chip.link.pulse(seq, self.name, wire), arm=True)

    def pulse_device(self, row: int, col: int, count: int) -> None:
        """Pulse one device with one single-crosspoint command (slow path; checked likewise).
        ``count`` must be an integer: a float is refused, never truncated."""
        if not (0 <= row < self.shape[0] and 0 <= col < self.shape[1]):
            raise BackendError(f"device ({row}, {col}) outside {self.shape}", tile=self.name,
                               op="pulse")
        if isinstance(count, torch.Tensor):
            count = count.detach().cpu().numpy()
        one = as_counts(count, self.name).reshape(1, 1)  # refuses 0.7, True, '3'
        self.chip.interlock.admit(self.info, one, at=(row, col))
        count = int(one[0, 0])
        if self.wmap is not None and self.wmap.scale < 0:
            count = -count
        self.chip._sequenced(
            "pulse", self.name,
            lambda seq: self.chip.link.pulse_device(seq, self.name, row, col, count),
            arm=True)

    def outer_update(self, x: torch.Tensor, d: torch.Tensor, lr: float) -> None:
        """On-chip pulse-train rank-1 update. Each sample is one pulse-train application of
        at most train-length coincidences per device, which the interlock bounds like a
        pulse command; the step is charged with that bound summed over the samples where
        both lines fire; the tile must lie wholly inside the allowed rows and columns."""
        bl = self.chip.train_length
        if not bl:
            return super().outer_update(x, d, lr)
        rows, cols = self.shape
        xt, dt = self.check_update(x, d, lr)
        xa = np.ascontiguousarray(xt.cpu().numpy())
        da = np.ascontiguousarray(dt.cpu().numpy())
        lr_g = float(lr) * (self.wmap.weight_scale if self.wmap is not None else 1.0)
        if not np.isfinite(lr_g):
            raise NonFiniteError("outer_update: learning rate in conductance units is not "
                                 "finite", tile=self.name, op="outer_update")
        lock = self.chip.interlock
        lock.check_counts(self.name, self.info.row, self.info.col,
                          np.full((rows, cols), bl, np.int64))
        both = (da != 0).T.astype(np.int64) @ (xa != 0).astype(np.int64)  # [rows, cols]
        lock.charge(self.info, both * bl if lr_g else np.zeros_like(both))
        for i in range(0, xa.shape[0], MAX_BATCH):  # samples in order, MAX_BATCH a command
            xp, dp = xa[i:i + MAX_BATCH], da[i:i + MAX_BATCH]
            self.chip._sequenced(
                "outer_update", self.name,
                lambda seq, xp=xp, dp=dp: self.chip.link.outer(seq, self.name, lr_g, xp, dp),
                arm=True)

    def mvm(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        if not self.chip.capabilities.mvm:
            return super().mvm(x, transpose)
        rows, cols = self.shape
        n_in, n_out = (rows, cols) if transpose else (cols, rows)
        squeeze = x.dim() == 1
        xb = x.detach().reshape(1, -1) if squeeze else x.detach()
        if xb.dim() != 2 or xb.shape[1] != n_in:
            raise BackendError(f"mvm input has shape {tuple(x.shape)}, tile takes {n_in}",
                               tile=self.name, op="mvm")
        xa = np.ascontiguousarray(xb.cpu().numpy(), dtype="<f4")
        if not xa.shape[0]:
            return torch.zeros(0, n_out)
        parts = []
        for i in range(0, xa.shape[0], MAX_BATCH):  # a command carries at most MAX_BATCH
            part = xa[i:i + MAX_BATCH]
            parts.append(self.chip._sequenced(
                "mvm", self.name,
                lambda seq, part=part: self.chip.link.mvm(seq, self.name, transpose, part,
                                                          n_out)))
        y = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if self.wmap is not None:
            g_ref = np.broadcast_to(self.wmap.g_ref, self.shape)
            ref = xa.astype(np.float64) @ (g_ref if transpose else g_ref.T)
            y = ((y.astype(np.float64) - ref) * self.wmap.scale).astype(np.float32)
        out = torch.from_numpy(np.array(y))
        return out.reshape(-1) if squeeze else out


class ChipBackend(InstrumentBackend):
    """A chip behind a ChipLink (SCPI or frames), governed by a station profile."""

    def __init__(self, url: str, link: ChipLink, profile: Profile,
                 weight_map: WeightMap | None = None, retries: int = 4, backoff_s: float = 0.02,
                 sleep: Callable[[float], None] = time.sleep, take_over: bool = False,
                 holder: str | None = None):
        super().__init__(url)
        self.holder = holder or this_host()
        self.session = 0  # this host's session on the chip (0: none yet)
        self.left: set[str] = set()  # tiles an earlier session left, not yet re-attached
        self.joined = False  # whether the current connection is bound to the session
        self.link = link
        self.profile = profile
        self.interlock = Interlock(profile.limits, profile.arrays)
        self.weight_map = weight_map
        self.retries = retries
        self.backoff_s = backoff_s
        self._sleep = sleep
        self.shapes = {"potentiate": profile.pulses.potentiate, "depress": profile.pulses.depress}
        self.armed = False
        for polarity, shape in self.shapes.items():
            self.interlock.check_shape(polarity, shape)
        try:
            self._handshake(take_over)
        except BaseException:
            try:
                self._end_session()
            finally:
                self.link.transport.close()
            raise

    # -- opening ---------------------------------------------------------------------------
    def _handshake(self, take_over: bool) -> None:
        p = self.profile
        idn = self._retry("identify", None, self.link.identify)
        if p.chip.idn_contains not in idn:
            raise BackendError(f"instrument identifies as {idn!r}, profile {p.name!r} expects "
                               f"{p.chip.idn_contains!r}", op="identify")
        caps = self._retry("capabilities", None, self.link.capabilities)
        if caps.pulse_dtype != p.chip.pulse_dtype:
            raise BackendError(f"chip takes {caps.pulse_dtype} pulse counts, profile says "
                               f"{p.chip.pulse_dtype}", op="capabilities")
        chip_limits = self._retry("limits", None, self.link.limits)
        arrays = self._retry("tile map", None, self.link.arrays)
        expected = [(a.rows, a.cols) for a in p.arrays]
        if arrays != expected:
            raise BackendError(f"chip reports arrays {arrays}, profile {p.name!r} expects "
                               f"{expected}", op="tile map")
        for polarity, shape in self.shapes.items():
            if (abs(shape.amplitude_v) > chip_limits["MAXAMPL"]
                    or shape.width_s > chip_limits["MAXWIDT"]
                    or shape.compliance_a > chip_limits["MAXCOMP"]):
                raise SafetyLimitError(f"{polarity} pulse exceeds the chip's ratings "
                                       f"{chip_limits}", op="pulse shape")
        self.wire_dtype = NUMPY_DTYPES_BY_NAME[caps.pulse_dtype]
        self.train_length = caps.outer_train_length
        self.capabilities = Capabilities(
            mvm=caps.mvm, outer_update=caps.outer_train_length > 0, allocate=True,
            device="cpu",
            max_pulses_per_command=int(min(p.limits.max_pulses_per_command, caps.max_pulses,
                                           chip_limits["MAXPULSE"])),
            max_pulses_per_step=self.interlock.step_budget)
        self.interlock.tighten(self.capabilities.max_pulses_per_command)
        self.session = self._retry(
            "session", None, lambda: self.link.open_session(0, take_over, self.holder))
        self.joined = True
        self.seq = self._retry("sequence", None, self.link.last_seq)  # 0: a new session
        for info, dw_min_g in self._retry("tile list", None, self.link.list_tiles):
            self._register(info, dw_min_g)  # tiles an earlier session left on the chip
            self.left.add(info.name)

    def _register(self, info: TileInfo, dw_min_g: float) -> ChipTile:
        wmap = (self.weight_map.for_tile(info.name, (info.rows, info.cols))
                if self.weight_map is not None else None)
        tile = ChipTile(self, info, dw_min_g, wmap)
        self._tiles[info.name] = tile
        return tile

    # -- the contract ----------------------------------------------------------------------
    def allocate(self, name: str, rows: int, cols: int) -> Tile:
        """Reserve a new tile, or re-attach the tile of that name and shape that an earlier
        session left on the chip (the chip keeps its tiles and their devices' state: a
        resumed or repeated run finds its tiles again); another shape is refused."""
        self._check_open("allocate", name)
        if name in self.left:
            tile = self._tiles[name]
            if tile.shape != (int(rows), int(cols)):
                raise BackendError(f"the chip holds this tile as {tile.shape[0]}x"
                                   f"{tile.shape[1]}, asked for {rows}x{cols}", tile=name,
                                   op="allocate")
            self.left.discard(name)
            return tile
        return super().allocate(name, rows, cols)

    def _allocate(self, name: str, rows: int, cols: int) -> Tile:
        check_name(name)
        info = self._place(name, rows, cols)
        self.interlock.check_region(name, info.array, info.row, info.col, rows, cols)
        dw_min_g = self._sequenced("allocate", name, lambda seq: self.link.alloc(seq, info))
        return self._register(info, dw_min_g)

    def _place(self, name: str, rows: int, cols: int) -> TileInfo:
        """The profile's fixed placement, else first fit in row bands of the allowed region."""
        fixed = self.profile.tiles.get(name)
        if fixed is not None:
            return TileInfo(name, fixed.array, fixed.row, fixed.col, rows, cols)
        (r0, r1), (c0, c1) = self.profile.limits.allowed_rows, self.profile.limits.allowed_cols
        if rows > r1 - r0 + 1 or cols > c1 - c0 + 1:
            raise SafetyLimitError(f"a {rows}x{cols} tile does not fit the allowed rows "
                                   f"{r0}..{r1}, cols {c0}..{c1}", tile=name, op="allocate")
        for index, spec in enumerate(self.profile.arrays):
            used = [t.info for t in self._tiles.values() if isinstance(t, ChipTile)
                    and t.info.array == index]
            row = max([r0, *(u.row + u.rows for u in used)])
            if row + rows - 1 <= min(r1, spec.rows - 1) and c0 + cols - 1 <= min(c1, spec.cols - 1):
                return TileInfo(name, index, row, c0, rows, cols)
        raise BackendError(f"no room for a {rows}x{cols} tile in the allowed region",
                           tile=name, op="allocate")

    @contextmanager
    def step(self) -> Iterator[None]:
        """One algorithm step: the interlock bounds the pulses each device receives over
        all the commands sent inside (the profile's max_pulses_per_step)."""
        with self.interlock.step():
            yield

    def set_pulse_shape(self, polarity: str, amplitude_v: float, width_s: float,
                        compliance_a: float) -> None:
        """Change the physical pulse of one polarity (checked now, sent when next armed)."""
        self._check_open("set_pulse_shape")
        if polarity not in POLARITIES:
            raise SafetyLimitError(f"unknown polarity {polarity!r}", op="pulse shape")
        shape = PulseShape.model_construct(amplitude_v=float(amplitude_v), width_s=float(width_s),
                                           compliance_a=float(compliance_a))
        self.interlock.check_shape(polarity, shape)
        self.shapes[polarity] = shape
        self.armed = False

    def _release(self) -> None:
        """After the outputs are off: end the session, then release the link."""
        try:
            self._end_session()
        finally:
            self.link.transport.close()

    # -- the session: one controlling host per chip ----------------------------------------
    def _join(self) -> None:
        """Bind a fresh connection to this host's session (SessionRefused if it was taken
        over meanwhile); the chip grounded the outputs when the old connection dropped."""
        self.link.open_session(self.session, False, self.holder)
        self.joined = True
        self.armed = False

    def _end_session(self) -> None:
        """Clean close: the chip is free for the next host (best effort, never raises)."""
        if not self.session:
            return
        try:
            if not self.joined:
                self._join()
            self.link.end_session(self.session)
        except SessionRefused:
            pass  # taken over or already ended: nothing of ours is left on the chip
        except Exception as exc:  # noqa: BLE001 - the chip keeps the session; take_over frees it
            log.warning("could not end the session on the chip: %s", exc)
        self.session = 0

    # -- reliability -----------------------------------------------------------------------
    def _sequenced(self, op: str, tile: str, fn: Callable[[int], T], arm: bool = False) -> T:
        """Run a sequence-numbered operation exactly once, retrying with the same number.

        A sequence error (the chip's counter moved, e.g. another host or a firmware
        restart; nothing was executed) re-reads the chip's counter and tries once more.
        """
        self._check_open(op, tile)
        for resync in (False, True):
            seq = next_seq(self.seq)

            def attempt(seq: int = seq) -> T:
                if not self.joined:
                    self._join()
                if arm and not self.armed:
                    self.link.arm(self.shapes["potentiate"], self.shapes["depress"])
                    self.armed = True
                return fn(seq)

            try:
                result = self._retry(op, tile, attempt)
            except ChipRejected as exc:
                if exc.code == E_SEQUENCE and not resync:
                    self.seq = self._retry("sequence", tile, self.link.last_seq)
                    continue
                self.seq = seq  # the chip consumed the number with its error reply
                raise
            self.seq = seq
            return result
        raise AssertionError("unreachable")

    def _retry(self, op: str, tile: str | None, fn: Callable[[], T]) -> T:
        """Bounded retries with exponential backoff and reconnection; on any failure that
        escapes (including KeyboardInterrupt) the outputs are made safe first."""
        attempt = 0
        try:
            while True:
                try:
                    return fn()
                except RETRYABLE as exc:
                    if attempt >= self.retries:
                        raise
                    attempt += 1
                    log.warning("%s on %s failed (%s); retry %d of %d", op, tile, exc, attempt,
                                self.retries)
                    self._sleep(self.backoff_s * 2 ** (attempt - 1))
                    self._reconnect(isinstance(exc, LinkDown))
        except BaseException as exc:
            if not (isinstance(exc, ChipRejected) and exc.code == E_SEQUENCE):
                self.make_safe()  # a sequence error executed nothing and is resolved above
            raise

    def _reconnect(self, link_down: bool) -> None:
        """A fresh connection after a dropped link, else just discard pending input."""
        try:
            if link_down or self.link.transport.resync():
                self.armed = False  # the chip grounds its outputs when a connection drops
                self.joined = False  # a fresh connection rejoins the session first
                if link_down:
                    self.link.transport.reconnect()
        except RETRYABLE as exc:
            self.armed = self.joined = False
            log.warning("reconnect failed: %s", exc)

    def make_safe(self) -> None:
        """Switch the outputs off and confirm it (best effort: a fresh connection, 2 tries)."""
        self.armed = False
        for attempt in range(2):
            try:
                if attempt:
                    self.link.transport.reconnect()
                    self.joined = False
                elif self.link.transport.resync():
                    self.joined = False
                if not self.joined and self.session:
                    self._join()
                self.link.set_output(False)
                return
            except SessionRefused as exc:
                # never held, or taken over (the chip grounded the outputs then): the outputs
                # are not this host's to switch; the caller hears the session error itself
                log.debug("outputs not switched: %s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - report and try once more
                log.error("could not confirm outputs off (try %d): %s", attempt + 1, exc)
