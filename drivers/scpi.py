"""The SCPI variant of the chip protocol (docs/protocol.md): line commands, IEEE 488.2
definite-length blocks, and CRC-checked data replies carrying the sequence number."""

from __future__ import annotations

import re
import zlib

import numpy as np

from drivers.link import (
    ChipCaps,
    ChipLink,
    TileInfo,
    format_shape,
    holder_text,
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

HEAD_LEN = 17  # "SSSSSSSSSS,+CCC,#"
HEAD_RE = re.compile(rb"^(\d{10}),([+-]\d{3}),#$")
TRAIL_RE = re.compile(rb"^,([0-9A-F]{8})\n$")
MAX_ERROR_TEXT = 4096


def ieee_block(payload: bytes) -> bytes:
    """IEEE 488.2 definite-length block: '#', digit count, length, payload."""
    n = str(len(payload))
    return b"#" + str(len(n)).encode() + n.encode() + payload


def data_reply(seq: int, status: int, payload: bytes) -> bytes:
    """'<seq:10>,<status:+3>,#<block>,<crc32:8X>\\n' with the CRC over everything before it."""
    body = f"{seq:010d},{status:+04d},".encode() + ieee_block(payload)
    return body + f",{zlib.crc32(body):08X}\n".encode()


class ScpiLink(ChipLink):
    """SCPI client over any transport (normally a pyvisa resource)."""

    def _line(self, command: str, what: str) -> str:
        self.transport.write(command.encode("ascii") + b"\n")
        raw = self.transport.read_line()
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(f"non-ASCII reply to {command!r}: {raw[:40]!r}", op=what) from None
        if not text.endswith("\n") or "\n" in text[:-1]:
            raise ProtocolError(f"malformed reply to {command!r}: {raw[:40]!r}", op=what)
        return text[:-1].rstrip("\r")

    def _data(self, command: bytes, seq: int, expect: int, what: str,
              tile: str | None) -> bytes:
        """Send a sequenced command; return its validated payload of ``expect`` bytes."""
        t = self.transport
        t.write(command)
        head = t.read_exact(HEAD_LEN)
        m = HEAD_RE.match(head)
        if not m:
            raise ProtocolError(f"malformed reply head {head!r}", tile=tile, op=what)
        if int(m[1]) != seq:
            raise ProtocolError(f"reply carries sequence {int(m[1])}, sent {seq}",
                                tile=tile, op=what)
        status = int(m[2])
        digits = t.read_exact(1)
        if not digits.isdigit() or digits == b"0":
            raise ProtocolError(f"malformed block header digit {digits!r}", tile=tile, op=what)
        length_raw = t.read_exact(int(digits))
        if not length_raw.isdigit():
            raise ProtocolError(f"malformed block length {length_raw!r}", tile=tile, op=what)
        length = int(length_raw)
        if (status == 0 and length != expect) or (status != 0 and length > MAX_ERROR_TEXT):
            raise ProtocolError(f"block of {length} bytes, expected {expect}", tile=tile, op=what)
        rest = t.read_exact(length + 10)
        payload, trail = rest[:length], rest[length:]
        tm = TRAIL_RE.match(trail)
        if not tm:
            raise ProtocolError(f"malformed reply trailer {trail!r}", tile=tile, op=what)
        crc = zlib.crc32(payload, zlib.crc32(head + digits + length_raw))
        if int(tm[1], 16) != crc:
            raise ProtocolError("reply CRC mismatch (corrupted reply)", tile=tile, op=what)
        if status != 0:
            raise rejected(status, payload.decode("ascii", "replace"), tile=tile, op=what)
        return payload

    # -- plain queries -------------------------------------------------------------------
    def identify(self) -> str:
        text = self._line("*IDN?", "identify")
        if text.count(",") != 3 or not text.isprintable():
            raise ProtocolError(f"malformed *IDN? reply {text!r}", op="identify")
        return text

    def capabilities(self) -> ChipCaps:
        return parse_caps(self._line("SYST:CAP?", "capabilities"))

    def limits(self) -> dict[str, float]:
        return parse_limits(self._line("SYST:LIM?", "limits"))

    def arrays(self) -> list[tuple[int, int]]:
        return parse_arrays(self._line("TILE:MAP?", "tile map"))

    def last_seq(self) -> int:
        return parse_seq(self._line("SYST:SEQ?", "sequence"))

    def list_tiles(self) -> list[tuple[TileInfo, float]]:
        return parse_tiles(self._line("TILE:LIST?", "tile list"))

    def next_error(self) -> tuple[int, str]:
        return parse_error(self._line("SYST:ERR?", "error queue"))

    def open_session(self, session: int, take_over: bool, holder: str) -> int:
        code, text = parse_error(self._line(
            f"SYST:SESS? {session},{int(take_over)},{holder_text(holder)}", "session"))
        if code != 0:
            raise rejected(code, text, op="session")
        return parse_session(text)

    def end_session(self, session: int) -> None:
        self.transport.write(f"*CLS\nSYST:SESS:END {session}\n".encode("ascii"))
        code, message = self.next_error()
        if code != 0:
            raise rejected(code, message, op="session")

    def arm(self, potentiate: PulseShape, depress: PulseShape) -> None:
        self.transport.write(f"*CLS\nPULS:POT {format_shape(potentiate)}\n"
                             f"PULS:DEP {format_shape(depress)}\nOUTP ON\n".encode("ascii"))
        self._confirm(True)

    def set_output(self, on: bool) -> None:
        self.transport.write(b"*CLS\nOUTP ON\n" if on else b"*CLS\nOUTP OFF\n")
        self._confirm(on)

    def _confirm(self, on: bool) -> None:
        code, message = self.next_error()
        if code != 0:
            raise rejected(code, message, op="output")
        if parse_bool(self._line("OUTP?", "output"), "output") != on:
            raise ProtocolError(f"outputs did not switch {'on' if on else 'off'}", op="output")

    # -- sequenced commands --------------------------------------------------------------
    def alloc(self, seq: int, info: TileInfo) -> float:
        cmd = (f"TILE:ALLOC? {seq},{info.name},{info.array},{info.row},{info.col},"
               f"{info.rows},{info.cols}\n").encode("ascii")
        payload = self._data(cmd, seq, 8, "allocate", info.name)
        dw_min = float(np.frombuffer(payload, "<f8")[0])
        if not np.isfinite(dw_min) or dw_min <= 0:
            raise ProtocolError(f"chip reported dw_min={dw_min}", tile=info.name, op="allocate")
        return dw_min

    def read(self, seq: int, name: str, shape: tuple[int, int]) -> np.ndarray:
        payload = self._data(f"TILE:READ? {seq},{name}\n".encode("ascii"), seq,
                             4 * shape[0] * shape[1], "read", name)
        return np.frombuffer(payload, "<f4").reshape(shape)

    def pulse(self, seq: int, name: str, counts: np.ndarray) -> None:
        cmd = f"TILE:PULS? {seq},{name},".encode("ascii") + ieee_block(counts.tobytes()) + b"\n"
        self._data(cmd, seq, 0, "pulse", name)

    def pulse_device(self, seq: int, name: str, row: int, col: int, count: int) -> None:
        cmd = f"TILE:PULS:DEV? {seq},{name},{row},{col},{count}\n".encode("ascii")
        self._data(cmd, seq, 0, "pulse", name)

    def outer(self, seq: int, name: str, lr: float, x: np.ndarray, d: np.ndarray) -> None:
        block = np.concatenate([x, d], axis=1).astype("<f4").tobytes()
        cmd = (f"TILE:OUTER? {seq},{name},{lr!r},{x.shape[0]},".encode("ascii")
               + ieee_block(block) + b"\n")
        self._data(cmd, seq, 0, "outer_update", name)

    def mvm(self, seq: int, name: str, transpose: bool, x: np.ndarray,
            out_features: int) -> np.ndarray:
        batch = x.shape[0]
        cmd = (f"TILE:MVM? {seq},{name},{int(transpose)},{batch},".encode("ascii")
               + ieee_block(np.ascontiguousarray(x, "<f4").tobytes()) + b"\n")
        payload = self._data(cmd, seq, 4 * batch * out_features, "mvm", name)
        return np.frombuffer(payload, "<f4").reshape(batch, out_features)
