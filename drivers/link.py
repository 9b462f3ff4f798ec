"""The operations a chip's firmware answers, independent of the wire (SCPI or frames), and
the text formats both protocols share for identification, capabilities, limits and tiles."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from drivers.profile import DTYPE_MAX, PulseShape
from drivers.transport import Transport
from hil.errors import BackendError, ProtocolError

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
SEQ_MOD = 2**32
NUMPY_DTYPES = {"int8": "<i1", "int16": "<i2", "int32": "<i4"}
MAX_BATCH = 4096  # samples in one MVM or rank-1 update command; the host splits larger ones
# chip status codes (SCPI error numbers; positive ones are this firmware's own)
OK = 0
E_COMMAND = -100
E_SETTINGS_CONFLICT = -221  # e.g. pulse while outputs are off
E_DATA_RANGE = -222  # the chip's own interlock refused a value
E_ILLEGAL = -224
E_NO_TILE = -241
E_SEQUENCE = 101  # sequence number neither the last one nor the next one
E_SESSION = 102  # the chip serves another host, or this host's session has ended
HOLDER_MAX = 96  # longest holder text a host announces


class ChipRejected(BackendError):
    """The chip answered with an error status; nothing was applied."""

    def __init__(self, code: int, message: str, *, tile: str | None = None,
                 op: str | None = None):
        self.code = code
        super().__init__(f"chip error {code}: {message}", tile=tile, op=op)


class SessionRefused(ChipRejected):
    """The chip serves another controlling host, or this host's session was taken over or
    has ended: nothing was applied (the message names the holder)."""


def rejected(code: int, message: str, *, tile: str | None = None,
             op: str | None = None) -> ChipRejected:
    """The error for a chip's refusal: SessionRefused for a session error."""
    cls = SessionRefused if code == E_SESSION else ChipRejected
    return cls(code, message, tile=tile, op=op)


def holder_text(text: str) -> str:
    """A host's self-description as the chip stores it: printable ASCII without quotes or
    '#' (a SCPI block header), bounded."""
    clean = "".join(c if (" " <= c <= "~" and c not in '"#') else "?" for c in text)
    return clean[:HOLDER_MAX] or "?"


@dataclass(frozen=True)
class ChipCaps:
    mvm: bool
    pulse_dtype: str
    max_pulses: int
    outer_train_length: int = 0  # pulse-train length of the on-chip rank-1 update; 0: none


@dataclass(frozen=True)
class TileInfo:
    name: str
    array: int
    row: int
    col: int
    rows: int
    cols: int


def next_seq(seq: int) -> int:
    """Sequence numbers run 1 .. 2^32-1 and wrap to 1 (0 means 'nothing applied yet')."""
    return seq % (SEQ_MOD - 1) + 1


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise BackendError("tile names must be 1-64 of A-Z a-z 0-9 _ . -", tile=name,
                           op="allocate")


# -- shared text formats ------------------------------------------------------------------
def format_kv(values: dict[str, object]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def parse_kv(text: str, keys: tuple[str, ...], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq or not value:
            raise ProtocolError(f"malformed {what} reply {text!r}", op=what)
        out[key] = value
    missing = [k for k in keys if k not in out]
    if missing:
        raise ProtocolError(f"{what} reply {text!r} lacks {', '.join(missing)}", op=what)
    return out


def parse_caps(text: str) -> ChipCaps:
    kv = parse_kv(text, ("MVM", "DTYPE"), "capabilities")
    outer = kv.get("OUTER", "0")
    if kv["MVM"] not in ("0", "1") or kv["DTYPE"] not in NUMPY_DTYPES or not outer.isdigit():
        raise ProtocolError(f"bad capabilities reply {text!r}", op="capabilities")
    return ChipCaps(mvm=kv["MVM"] == "1", pulse_dtype=kv["DTYPE"],
                    max_pulses=DTYPE_MAX[kv["DTYPE"]], outer_train_length=int(outer))


def parse_limits(text: str) -> dict[str, float]:
    kv = parse_kv(text, ("MAXPULSE", "MAXAMPL", "MAXWIDT", "MAXCOMP"), "limits")
    try:
        out = {k: float(v) for k, v in kv.items()}
    except ValueError:
        raise ProtocolError(f"non-numeric limits reply {text!r}", op="limits") from None
    if any(not np.isfinite(v) or v <= 0 for v in out.values()):
        raise ProtocolError(f"limits reply {text!r} has a non-positive value", op="limits")
    return out


def parse_arrays(text: str) -> list[tuple[int, int]]:
    arrays = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d{1,7})x(\d{1,7})", item)
        if not m:
            raise ProtocolError(f"malformed tile map reply {text!r}", op="tile map")
        arrays.append((int(m[1]), int(m[2])))
    return arrays


def format_tiles(tiles: list[tuple[TileInfo, float]]) -> str:
    rows = [f"{t.name},{t.array},{t.row},{t.col},{t.rows},{t.cols},{dw!r}" for t, dw in tiles]
    return ";".join([str(len(tiles)), *rows])


def parse_tiles(text: str) -> list[tuple[TileInfo, float]]:
    """'count;name,array,row,col,rows,cols,dw_min;...' -> placements with their dw_min."""
    count, *items = text.split(";")
    if not count.isdigit() or int(count) != len(items):
        raise ProtocolError(f"malformed tile list reply {text!r}", op="tile list")
    tiles = []
    for item in items:
        parts = item.split(",")
        if len(parts) != 7 or not NAME_RE.match(parts[0]) or not all(
                p.isdigit() for p in parts[1:6]):
            raise ProtocolError(f"malformed tile list entry {item!r}", op="tile list")
        try:
            dw = float(parts[6])
        except ValueError:
            raise ProtocolError(f"malformed dw_min in tile list entry {item!r}",
                                op="tile list") from None
        if not np.isfinite(dw) or dw <= 0:
            raise ProtocolError(f"bad dw_min in tile list entry {item!r}", op="tile list")
        tiles.append((TileInfo(parts[0], *(int(p) for p in parts[1:6])), dw))
    return tiles


def parse_error(text: str) -> tuple[int, str]:
    m = re.fullmatch(r'([+-]?\d{1,4}),"([^"]*)"', text)
    if not m:
        raise ProtocolError(f"malformed error queue reply {text!r}", op="error queue")
    return int(m[1]), m[2]


def parse_session(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < SEQ_MOD:
        raise ProtocolError(f"malformed session reply {text!r}", op="session")
    return int(text)


def parse_seq(text: str) -> int:
    if not text.isdigit() or int(text) >= SEQ_MOD:
        raise ProtocolError(f"malformed sequence reply {text!r}", op="sequence")
    return int(text)


def parse_bool(text: str, what: str) -> bool:
    if text not in ("0", "1"):
        raise ProtocolError(f"malformed {what} reply {text!r}", op=what)
    return text == "1"


def format_shape(shape: PulseShape) -> str:
    return f"{shape.amplitude_v!r},{shape.width_s!r},{shape.compliance_a!r}"


class ChipLink(ABC):
    """One protocol's client: each method is one request and its validated reply."""

    def __init__(self, transport: Transport):
        self.transport = transport

    @abstractmethod
    def identify(self) -> str: ...

    @abstractmethod
    def capabilities(self) -> ChipCaps: ...

    @abstractmethod
    def limits(self) -> dict[str, float]: ...

    @abstractmethod
    def arrays(self) -> list[tuple[int, int]]: ...

    @abstractmethod
    def last_seq(self) -> int: ...

    @abstractmethod
    def list_tiles(self) -> list[tuple[TileInfo, float]]: ...

    @abstractmethod
    def open_session(self, session: int, take_over: bool, holder: str) -> int:
        """Become the chip's controlling host: a new session (``session`` 0), or rejoin
        ``session`` on a fresh connection; returns the session id, or SessionRefused."""

    @abstractmethod
    def end_session(self, session: int) -> None:
        """End this host's session (clean close); another host may then open one."""

    @abstractmethod
    def arm(self, potentiate: PulseShape, depress: PulseShape) -> None:
        """Set both pulse shapes, switch the outputs on and confirm both."""

    @abstractmethod
    def set_output(self, on: bool) -> None:
        """Switch the outputs and confirm the new state."""

    @abstractmethod
    def next_error(self) -> tuple[int, str]: ...

    @abstractmethod
    def alloc(self, seq: int, info: TileInfo) -> float:
        """Reserve a tile; returns its nominal dw_min (conductance units)."""

    @abstractmethod
    def read(self, seq: int, name: str, shape: tuple[int, int]) -> np.ndarray: ...

    @abstractmethod
    def pulse(self, seq: int, name: str, counts: np.ndarray) -> None: ...

    @abstractmethod
    def pulse_device(self, seq: int, name: str, row: int, col: int, count: int) -> None:
        """Pulse one device of a tile (single-crosspoint command)."""

    @abstractmethod
    def outer(self, seq: int, name: str, lr: float, x: np.ndarray, d: np.ndarray) -> None:
        """On-chip stochastic pulse-train rank-1 update W += lr sum_b d_b x_b^T."""

    @abstractmethod
    def mvm(self, seq: int, name: str, transpose: bool, x: np.ndarray,
            out_features: int) -> np.ndarray: ...
