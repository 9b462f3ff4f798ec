"""The framed serial variant of the chip protocol for MCU boards: length-prefixed binary
frames with a CRC-32, one reply frame per request, matched by opcode and sequence/tag."""

from __future__ import annotations

import struct
import zlib
from enum import IntEnum

import numpy as np

from drivers.link import (
    ChipCaps,
    ChipLink,
    TileInfo,
    format_shape,
    holder_text,
    next_seq,
    parse_arrays,
    parse_bool,
    parse_caps,
    parse_error,
    parse_limits,
    parse_seq,
    parse_session,
    parse_tiles,
    rejected,
)
from drivers.profile import PulseShape
from hil.errors import ProtocolError

REQ_SYNC, REP_SYNC = 0xA5, 0x5A
REQ_HEAD = struct.Struct("<BBII")  # sync, op, seq/tag, body length
REP_HEAD = struct.Struct("<BBIhI")  # sync, op, seq/tag, status, body length
CRC = struct.Struct("<I")
MAX_BODY = 64 << 20  # largest request the firmware accepts
MAX_TEXT = 4096  # largest text or error reply
MAX_SKIP = 1 << 16  # stale bytes discarded while looking for the reply that matches


class Op(IntEnum):
    IDN = 0x01
    CAP = 0x02
    LIM = 0x03
    MAP = 0x04
    SEQ = 0x05
    LIST = 0x06
    ERR = 0x07
    SESS = 0x08
    END = 0x09
    HOLD = 0x0A
    SHAPE = 0x10
    OUT = 0x11
    OUTQ = 0x12
    ALLOC = 0x20
    READ = 0x21
    PULSE = 0x22
    MVM = 0x23
    PULSE_DEV = 0x24
    OUTER = 0x25


SEQUENCED = frozenset({Op.ALLOC, Op.READ, Op.PULSE, Op.MVM, Op.PULSE_DEV,
                       Op.OUTER})


def request_frame(op: int, seq: int, body: bytes) -> bytes:
    head = REQ_HEAD.pack(REQ_SYNC, op, seq, len(body))
    return head + body + CRC.pack(zlib.crc32(body, zlib.crc32(head)))


def reply_frame(op: int, seq: int, status: int, body: bytes) -> bytes:
    head = REP_HEAD.pack(REP_SYNC, op, seq, status, len(body))
    return head + body + CRC.pack(zlib.crc32(body, zlib.crc32(head)))


def name_field(name: str) -> bytes:
    raw = name.encode("ascii")
    return bytes([len(raw)]) + raw


class FrameLink(ChipLink):
    """Framed client over any transport (normally a pyserial port)."""

    _tag = 0

    def _request(self, op: Op, body: bytes, seq: int | None = None, expect: int | None = None,
                 tile: str | None = None) -> bytes:
        """One request and its reply body; non-sequenced requests carry a fresh echo tag."""
        if seq is None:
            self._tag = next_seq(self._tag)
            seq = self._tag
        what = op.name.lower()
        t = self.transport
        t.write(request_frame(op, seq, body))
        skipped = 0
        while True:  # discard stale frames (late replies to earlier, retried requests)
            sync = t.read_exact(1)
            if sync[0] != REP_SYNC:
                skipped += 1
                if skipped > MAX_SKIP:
                    raise ProtocolError("no reply frame start found", tile=tile, op=what)
                continue
            head = sync + t.read_exact(REP_HEAD.size - 1)
            _, rop, rseq, status, length = REP_HEAD.unpack(head)
            limit = expect if (expect is not None and status == 0) else MAX_TEXT
            if length > limit:
                raise ProtocolError(f"reply frame claims {length} bytes, at most {limit} "
                                    "expected", tile=tile, op=what)
            rest = t.read_exact(length + CRC.size)
            body, (crc,) = rest[:length], CRC.unpack(rest[length:])
            if crc != zlib.crc32(body, zlib.crc32(head)):
                raise ProtocolError("reply frame CRC mismatch (corrupted reply)", tile=tile,
                                    op=what)
            if rop == op and rseq == seq:
                break
            skipped += len(head) + len(rest)
            if skipped > MAX_SKIP:
                raise ProtocolError("too many unexpected reply frames", tile=tile, op=what)
        if status != 0:
            raise rejected(status, body.decode("ascii", "replace"), tile=tile, op=what)
        if expect is not None and len(body) != expect:
            raise ProtocolError(f"reply of {len(body)} bytes, expected {expect}", tile=tile,
                                op=what)
        return body

    def _text(self, op: Op) -> str:
        raw = self._request(op, b"")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(f"non-ASCII reply {raw[:40]!r}", op=op.name.lower()) from None
        if not text.isprintable():
            raise ProtocolError(f"unprintable reply {raw[:40]!r}", op=op.name.lower())
        return text

    def identify(self) -> str:
        text = self._text(Op.IDN)
        if text.count(",") != 3:
            raise ProtocolError(f"malformed identification {text!r}", op="identify")
        return text

    def capabilities(self) -> ChipCaps:
        return parse_caps(self._text(Op.CAP))

    def limits(self) -> dict[str, float]:
        return parse_limits(self._text(Op.LIM))

    def arrays(self) -> list[tuple[int, int]]:
        return parse_arrays(self._text(Op.MAP))

    def last_seq(self) -> int:
        return parse_seq(self._text(Op.SEQ))

    def list_tiles(self) -> list[tuple[TileInfo, float]]:
        return parse_tiles(self._text(Op.LIST))

    def next_error(self) -> tuple[int, str]:
        return parse_error(self._text(Op.ERR))

    def open_session(self, session: int, take_over: bool, holder: str) -> int:
        body = f"{session},{int(take_over)},{holder_text(holder)}".encode("ascii")
        raw = self._request(Op.SESS, body)
        return parse_session(raw.decode("ascii", "replace"))

    def end_session(self, session: int) -> None:
        self._request(Op.END, str(session).encode("ascii"), expect=0)

    def arm(self, potentiate: PulseShape, depress: PulseShape) -> None:
        self._request(Op.SHAPE, f"POT,{format_shape(potentiate)}".encode("ascii"), expect=0)
        self._request(Op.SHAPE, f"DEP,{format_shape(depress)}".encode("ascii"), expect=0)
        self.set_output(True)

    def set_output(self, on: bool) -> None:
        self._request(Op.OUT, b"\x01" if on else b"\x00", expect=0)
        if parse_bool(self._text(Op.OUTQ), "output") != on:
            raise ProtocolError(f"outputs did not switch {'on' if on else 'off'}", op="output")

    def alloc(self, seq: int, info: TileInfo) -> float:
        body = (f"{info.name},{info.array},{info.row},{info.col},{info.rows},{info.cols}"
                .encode("ascii"))
        payload = self._request(Op.ALLOC, body, seq, 8, info.name)
        dw_min = float(np.frombuffer(payload, "<f8")[0])
        if not np.isfinite(dw_min) or dw_min <= 0:
            raise ProtocolError(f"chip reported dw_min={dw_min}", tile=info.name, op="allocate")
        return dw_min

    def read(self, seq: int, name: str, shape: tuple[int, int]) -> np.ndarray:
        payload = self._request(Op.READ, name.encode("ascii"), seq, 4 * shape[0] * shape[1],
                                name)
        return np.frombuffer(payload, "<f4").reshape(shape)

    def pulse(self, seq: int, name: str, counts: np.ndarray) -> None:
        self._request(Op.PULSE, name_field(name) + counts.tobytes(), seq, 0, name)

    def pulse_device(self, seq: int, name: str, row: int, col: int, count: int) -> None:
        body = name_field(name) + struct.pack("<IIi", row, col, count)
        self._request(Op.PULSE_DEV, body, seq, 0, name)

    def outer(self, seq: int, name: str, lr: float, x: np.ndarray, d: np.ndarray) -> None:
        body = (name_field(name) + struct.pack("<dI", lr, x.shape[0])
                + np.concatenate([x, d], axis=1).astype("<f4").tobytes())
        self._request(Op.OUTER, body, seq, 0, name)

    def mvm(self, seq: int, name: str, transpose: bool, x: np.ndarray,
            out_features: int) -> np.ndarray:
        body = (name_field(name) + struct.pack("<BI", int(transpose), x.shape[0])
                + np.ascontiguousarray(x, "<f4").tobytes())
        payload = self._request(Op.MVM, body, seq, 4 * x.shape[0] * out_features, name)
        return np.frombuffer(payload, "<f4").reshape(x.shape[0], out_features)
