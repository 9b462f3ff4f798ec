"""The test chip's firmware logic, independent of the wire: tiles on any hil backend,
pulse shapes, outputs, an error queue, its own interlock, and the sequence-number cache
that makes every sequenced operation happen exactly once."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from drivers.frames import MAX_BODY
from drivers.link import (
    E_DATA_RANGE,
    E_ILLEGAL,
    E_NO_TILE,
    E_SEQUENCE,
    E_SESSION,
    E_SETTINGS_CONFLICT,
    MAX_BATCH,
    NAME_RE,
    NUMPY_DTYPES,
    TileInfo,
    format_kv,
    format_tiles,
    holder_text,
    next_seq,
)
from drivers.profile import DTYPE_MAX, Profile
from hil.backend import Backend, Tile
from hil.errors import HilError

RATINGS = {"MAXAMPL": 5.0, "MAXWIDT": 1e-3, "MAXCOMP": 1e-2}  # the chip's absolute maxima
IDN = "analog-hil,virtual-chip,VC-0001,0.1.0"


def idn_for(profile: Profile) -> str:
    """The identification the virtual chip gives when it stands in for a profile's chip."""
    wanted = profile.chip.idn_contains
    if wanted in IDN:
        return IDN
    model = "virtual-chip emulating " + "".join(c if c.isprintable() and c != "," else " "
                                                for c in wanted)
    return f"analog-hil,{model},VC-0001,0.1.0"


class ChipError(Exception):
    """A command the firmware refuses; becomes an error status and an error-queue entry."""

    def __init__(self, code: int, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


@dataclass
class HostSession:
    """The controlling host: its session id, what it announced, the connection it is bound
    to (None while that connection is down) and when it opened."""

    id: int
    holder: str
    conn: int | None
    since: float

    def describe(self) -> str:
        age = time.monotonic() - self.since
        link = "connected" if self.conn is not None else "connection dropped"
        return f"{self.holder} (session {self.id}, {age:.0f} s, {link})"


ENDED_KEEP = 64  # ended sessions remembered, so their host hears why on its next call


class ChipFirmware:
    """One chip: thread-safe, shared by every connection and both protocols.

    One controlling host at a time (a session): only the session's connection may arm the
    outputs or run sequenced operations; sequence numbers and the reply cache belong to
    the session, so a second host can never be answered from another host's cache.
    """

    def __init__(self, backend: Backend, profile: Profile):
        self.backend = backend
        self.identification = idn_for(profile)
        self.arrays = [(a.rows, a.cols) for a in profile.arrays]
        self.pulse_dtype = profile.chip.pulse_dtype
        self.np_dtype = np.dtype(NUMPY_DTYPES[self.pulse_dtype])
        # the largest binary block a command may carry: a whole array's pulse map, or
        # MAX_BATCH float32 samples of an MVM or rank-1 update on the largest array
        self.max_block = min(MAX_BODY, max(
            max(r * c * self.np_dtype.itemsize, 4 * MAX_BATCH * (r + c))
            for r, c in self.arrays))
        self.lock = threading.RLock()
        self.outputs = False
        self.shapes: dict[str, tuple[float, float, float] | None] = {"POT": None, "DEP": None}
        self.errors: deque[tuple[int, str]] = deque(maxlen=32)
        self.last_seq = 0
        self._cached: tuple[int, bytes] | None = None
        self.placements: dict[str, TileInfo] = {}
        self.log: list[str] = []  # what the chip did, for tests: 'OUTP ON', 'PULSE name seq', ...
        self.device_pulses = 0  # total |count| applied
        # per-device |counts| of every pulse command, in log order, when a test sets it to a
        # list: ('PULSE' or 'OUTER', tile, map [rows, cols]), a rank-1 update with its bound
        # (train length per sample where both lines are driven); mark() adds (text, '', [])
        self.count_log: list[tuple[str, str, np.ndarray]] | None = None
        self.replayed = 0  # sequenced commands answered from the cache (retries)
        self.connections = 0  # connections ever opened (each gets the next number)
        self.session: HostSession | None = None
        self.ended: OrderedDict[int, str] = OrderedDict()  # session id -> why it ended
        self.session_log: list[str] = []  # 'OPEN 1 holder', 'TAKE-OVER 2 ...', 'END 1'
        self._next_session = 0

    # -- plain queries -------------------------------------------------------------------
    def idn(self) -> str:
        return self.identification

    @property
    def train_length(self) -> int:
        """Pulse-train length of the backend's rank-1 update (0: the chip has none)."""
        if not self.backend.capabilities.outer_update:
            return 0
        return int(getattr(getattr(self.backend, "config", None), "train_length", 0) or 0)

    def caps(self) -> str:
        return format_kv({"MVM": int(self.backend.capabilities.mvm), "ALLOC": 1,
                          "DTYPE": self.pulse_dtype, "OUTER": self.train_length})

    def limits(self) -> str:
        return format_kv({"MAXPULSE": DTYPE_MAX[self.pulse_dtype], **RATINGS})

    def tile_map(self) -> str:
        return ",".join(f"{r}x{c}" for r, c in self.arrays)

    def seq(self) -> str:
        return str(self.last_seq)

    def tile_list(self) -> str:
        with self.lock:
            return format_tiles([(info, self.backend.tile(name).dw_min)
                                 for name, info in self.placements.items()])

    def next_error(self) -> str:
        with self.lock:
            code, msg = self.errors.popleft() if self.errors else (0, "No error")
        return f'{code},"{msg}"'

    def clear_errors(self) -> None:
        with self.lock:
            self.errors.clear()

    def output_state(self) -> str:
        return "1" if self.outputs else "0"

    # -- settings ------------------------------------------------------------------------
    def mark(self, text: str) -> None:
        """Put a marker (e.g. a step boundary set by a test) into the log and count log."""
        with self.lock:
            self.log.append(text)
            if self.count_log is not None:
                self.count_log.append((text, "", np.zeros((0, 0), np.int64)))

    def _record(self, kind: str, name: str, counts: np.ndarray) -> None:
        if self.count_log is not None:
            self.count_log.append((kind, name, np.abs(counts.astype(np.int64))))

    def push_error(self, code: int, message: str) -> None:
        """Queue an error for SYST:ERR?: printable ASCII only (anything else becomes '?'),
        so whatever garbage caused it, the reply can always be sent."""
        text = "".join(ch if " " <= ch <= "~" else "?" for ch in message[:200])
        self.errors.append((code, text.replace('"', "'")))

    def set_shape(self, polarity: str, args: str) -> None:
        if polarity not in self.shapes:
            raise ChipError(E_ILLEGAL, f"unknown polarity {polarity}")
        try:
            amp, width, comp = (float(v) for v in args.split(","))
        except ValueError:
            raise ChipError(E_ILLEGAL, f"bad pulse shape {args}") from None
        if not (np.isfinite([amp, width, comp]).all() and abs(amp) <= RATINGS["MAXAMPL"]
                and 0 < width <= RATINGS["MAXWIDT"] and 0 < comp <= RATINGS["MAXCOMP"]):
            raise ChipError(E_DATA_RANGE, f"pulse shape {args} exceeds the chip ratings")
        with self.lock:
            self.shapes[polarity] = (amp, width, comp)
            self.log.append(f"PULS:{polarity} {args}")

    def set_output(self, on: bool) -> None:
        with self.lock:
            if on and None in self.shapes.values():
                raise ChipError(E_SETTINGS_CONFLICT, "pulse shapes not set")
            self.outputs = on
            self.log.append("OUTP ON" if on else "OUTP OFF")

    def connection_opened(self) -> int:
        with self.lock:
            self.connections += 1
            return self.connections

    def connection_closed(self, conn: int) -> None:
        """Watchdog: the controlling host's connection went away, so ground the outputs.
        The session stays (its host may reconnect and rejoin it)."""
        with self.lock:
            cur = self.session
            if cur is not None and cur.conn == conn:
                cur.conn = None
                if self.outputs:
                    self.outputs = False
                    self.log.append("OUTP OFF (watchdog)")

    # -- sessions: one controlling host --------------------------------------------------
    def open_session(self, conn: int, args: str) -> int:
        """'session,take_over,holder': session 0 opens a new session (refused while another
        host holds one, unless take_over is 1); a known id rejoins it on this connection."""
        sid_text, _, rest = args.partition(",")
        take_text, _, holder = rest.partition(",")
        if not sid_text.isdigit() or take_text not in ("0", "1") or not holder:
            raise ChipError(E_ILLEGAL, f"bad session request {args[:80]}")
        sid, holder = int(sid_text), holder_text(holder)
        with self.lock:
            cur = self.session
            if cur is not None and not sid and cur.holder == holder:
                sid = cur.id  # the same host retrying a request whose reply it lost
            if sid:
                if cur is not None and cur.id == sid:
                    cur.conn = conn
                    self.session_log.append(f"REJOIN {sid}")
                    return sid
                raise ChipError(E_SESSION, self.why_refused(sid))
            if cur is not None and take_text != "1":
                raise ChipError(E_SESSION, f"chip held by {cur.describe()}; take it over "
                                           "only if that host is gone (--take-over, or "
                                           "take_over=1 in the URL)")
            if cur is not None:
                self._end(cur, f"taken over by {holder}")
                if self.outputs:
                    self.outputs = False
                    self.log.append("OUTP OFF (take-over)")
            self._next_session += 1
            self.session = HostSession(self._next_session, holder, conn, time.monotonic())
            self.last_seq, self._cached = 0, None  # sequence numbers are the session's
            self.session_log.append(f"OPEN {self._next_session} {holder}")
            return self._next_session

    def end_session(self, conn: int, args: str) -> None:
        """Clean close by the holder: outputs off, the chip is free for another host."""
        if not args.isdigit():
            raise ChipError(E_ILLEGAL, f"bad session id {args[:20]}")
        with self.lock:
            cur = self.session
            if cur is None or cur.id != int(args):
                raise ChipError(E_SESSION, self.why_refused(int(args)))
            if self.outputs:
                self.outputs = False
                self.log.append("OUTP OFF")
            self._end(cur, "closed by its host")

    def _end(self, cur: HostSession, why: str) -> None:
        self.ended[cur.id] = why
        while len(self.ended) > ENDED_KEEP:
            self.ended.popitem(last=False)
        self.session = None
        self.session_log.append(f"END {cur.id} {why}")

    def why_refused(self, sid: int) -> str:
        """Why a connection in session ``sid`` (0: none) may not control the chip."""
        cur = self.session
        if sid and sid in self.ended:
            return f"this host's session {sid} has ended: {self.ended[sid]}"
        if sid:
            return f"session {sid} is unknown to the chip (restarted?)"
        if cur is None:
            return "no session: open one first"
        return f"chip held by {cur.describe()}"

    def authorize(self, sid: int) -> None:
        """Raise unless ``sid`` is the controlling host's session."""
        cur = self.session
        if cur is None or cur.id != sid or sid == 0:
            raise ChipError(E_SESSION, self.why_refused(sid))

    def session_state(self) -> str:
        """'0' when free, else 'id,holder'."""
        with self.lock:
            cur = self.session
            return "0" if cur is None else f"{cur.id},{cur.holder}"

    # -- sequenced operations ------------------------------------------------------------
    def sequenced(self, sid: int, seq: int, fn: Callable[[], bytes]) -> tuple[int, bytes]:
        """Run fn once per sequence number of session ``sid``: the last one is answered
        from the session's cache; a connection outside the session is refused."""
        with self.lock:
            try:
                self.authorize(sid)
            except ChipError as exc:
                return exc.code, exc.message.encode()
            if seq == self.last_seq and self._cached is not None:
                self.replayed += 1
                return self._cached
            if seq != next_seq(self.last_seq):
                msg = f"sequence {seq} is neither {self.last_seq} nor the next"
                self.push_error(E_SEQUENCE, msg)
                return E_SEQUENCE, msg.encode()
            try:
                result = (0, fn())
            except ChipError as exc:
                self.push_error(exc.code, exc.message)
                result = (exc.code, exc.message.encode())
            except HilError as exc:
                self.push_error(E_ILLEGAL, str(exc))
                result = (E_ILLEGAL, str(exc).encode())
            self.last_seq, self._cached = seq, result
            return result

    def _tile(self, name: str) -> Tile:
        if name not in self.placements:
            raise ChipError(E_NO_TILE, f"no tile {name}")
        return self.backend.tile(name)

    def alloc(self, args: str) -> bytes:
        parts = args.split(",")
        if len(parts) != 6 or not NAME_RE.match(parts[0]) or not all(
                p.isdigit() for p in parts[1:]):
            raise ChipError(E_ILLEGAL, f"bad allocation {args}")
        info = TileInfo(parts[0], *(int(p) for p in parts[1:]))
        if info.name in self.placements:
            raise ChipError(E_SETTINGS_CONFLICT, f"tile {info.name} exists")
        if info.array >= len(self.arrays) or info.rows < 1 or info.cols < 1:
            raise ChipError(E_DATA_RANGE, f"bad region {args}")
        rows, cols = self.arrays[info.array]
        if info.row + info.rows > rows or info.col + info.cols > cols:
            raise ChipError(E_DATA_RANGE, f"region {args} outside array {info.array}")
        for other in self.placements.values():
            if other.array == info.array and not (
                    info.row >= other.row + other.rows or other.row >= info.row + info.rows
                    or info.col >= other.col + other.cols or other.col >= info.col + info.cols):
                raise ChipError(E_SETTINGS_CONFLICT, f"region overlaps tile {other.name}")
        tile = self.backend.allocate(info.name, info.rows, info.cols)
        self.placements[info.name] = info
        self.log.append(f"ALLOC {args}")
        return np.array([tile.dw_min], "<f8").tobytes()

    def read(self, name: str) -> bytes:
        w = self._tile(name).read()
        return np.ascontiguousarray(w.detach().cpu().numpy(), "<f4").tobytes()

    def pulse(self, name: str, data: bytes, seq: int) -> bytes:
        tile = self._tile(name)
        rows, cols = tile.shape
        if len(data) != rows * cols * self.np_dtype.itemsize:
            raise ChipError(E_ILLEGAL, f"pulse block of {len(data)} bytes for {rows}x{cols}")
        if not self.outputs:
            raise ChipError(E_SETTINGS_CONFLICT, "outputs are off")
        counts = np.frombuffer(data, self.np_dtype).reshape(rows, cols)
        n = torch.from_numpy(counts.astype(np.int32))
        tile.pulse(n)
        self.device_pulses += int(np.abs(counts, dtype=np.int64).sum())
        self._record("PULSE", name, counts)
        self.log.append(f"PULSE {name} {seq}")
        return b""

    def pulse_device(self, name: str, row: int, col: int, count: int, seq: int) -> bytes:
        """Single-crosspoint pulse: the same device physics as a one-device pulse map."""
        tile = self._tile(name)
        rows, cols = tile.shape
        if not (0 <= row < rows and 0 <= col < cols):
            raise ChipError(E_DATA_RANGE, f"device ({row}, {col}) outside {rows}x{cols}")
        if abs(count) > DTYPE_MAX[self.pulse_dtype]:
            raise ChipError(E_DATA_RANGE, f"pulse count {count} too large")
        if not self.outputs:
            raise ChipError(E_SETTINGS_CONFLICT, "outputs are off")
        n = torch.zeros(rows, cols, dtype=torch.int32)
        n[row, col] = count
        tile.pulse(n)
        self.device_pulses += abs(count)
        self._record("PULSE", name, n.numpy())
        self.log.append(f"PULSE {name} {seq}")
        return b""

    def outer(self, name: str, lr: float, batch: int, data: bytes, seq: int) -> bytes:
        """Stochastic pulse-train rank-1 update of x [batch, cols] and d [batch, rows]."""
        tile = self._tile(name)
        rows, cols = tile.shape
        if not self.train_length:
            raise ChipError(E_ILLEGAL, "this chip has no rank-1 update")
        if not 1 <= batch <= MAX_BATCH or len(data) != 4 * batch * (rows + cols):
            raise ChipError(E_ILLEGAL, f"outer block of {len(data)} bytes for batch {batch}")
        if self.train_length > DTYPE_MAX[self.pulse_dtype]:
            raise ChipError(E_DATA_RANGE, "pulse trains longer than the pulse limit")
        if not np.isfinite(lr):
            raise ChipError(E_ILLEGAL, "learning rate is not finite")
        if not self.outputs:
            raise ChipError(E_SETTINGS_CONFLICT, "outputs are off")
        xd = torch.from_numpy(np.frombuffer(data, "<f4").reshape(batch, cols + rows).copy())
        tile.outer_update(xd[:, :cols], xd[:, cols:], lr)
        if self.count_log is not None:
            both = (xd[:, cols:] != 0).T.to(torch.int64) @ (xd[:, :cols] != 0).to(torch.int64)
            self._record("OUTER", name, both.numpy() * self.train_length * (lr != 0))
        self.log.append(f"OUTER {name} {seq}")
        return b""

    def mvm(self, name: str, transpose: bool, batch: int, data: bytes) -> bytes:
        tile = self._tile(name)
        rows, cols = tile.shape
        n_in = rows if transpose else cols
        if not 1 <= batch <= MAX_BATCH or len(data) != 4 * batch * n_in:
            raise ChipError(E_ILLEGAL, f"mvm block of {len(data)} bytes for batch {batch}")
        x = torch.from_numpy(np.frombuffer(data, "<f4").reshape(batch, n_in).copy())
        y = tile.mvm(x, transpose=transpose)
        return np.ascontiguousarray(y.detach().cpu().numpy(), "<f4").tobytes()
