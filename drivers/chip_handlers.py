"""The firmware side of both wire formats: parse one request from a byte stream, execute
it on the ChipFirmware, and inject faults into the replies (dropped, delayed, corrupted,
a forced disconnect)."""

from __future__ import annotations

import random
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass, field

from drivers.firmware import ChipError, ChipFirmware
from drivers.frames import MAX_BODY, REQ_HEAD, REQ_SYNC, SEQUENCED, Op, reply_frame
from drivers.link import E_COMMAND, E_ILLEGAL
from drivers.scpi import data_reply
from drivers.transport import INTERBYTE_TIMEOUT_S


@dataclass
class Faults:
    """Fault injection: drop or corrupt a fraction of replies, delay a fraction of replies
    (``delay_fraction``, default all) by ``delay_s``, and close the connection (once) right
    after executing command number ``close_after``."""

    drop: float = 0.0
    corrupt: float = 0.0
    delay_s: float = 0.0
    delay_fraction: float = 1.0
    close_after: int | None = None
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)
    commands: int = field(default=0, init=False)
    dropped: int = field(default=0, init=False)
    delayed: int = field(default=0, init=False)
    corrupted: int = field(default=0, init=False)
    disconnects: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        for name in ("drop", "corrupt"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        if not 0.0 <= self.delay_fraction <= 1.0 or self.delay_s < 0:
            raise ValueError("delay_fraction must be in [0, 1] and delay_s >= 0")
        self._rng = random.Random(self.seed)

    def decide(self, checked: bool) -> str:
        """'close', 'drop', 'corrupt' or 'send' for the reply to the next command."""
        self.commands += 1
        if self.close_after is not None and self.commands == self.close_after:
            self.disconnects += 1
            return "close"
        if self.drop and self._rng.random() < self.drop:
            self.dropped += 1
            return "drop"
        if checked and self.corrupt and self._rng.random() < self.corrupt:
            self.corrupted += 1
            return "corrupt"
        return "send"

    def delay(self) -> float:
        """Seconds to hold back the next reply."""
        if self.delay_s and (self.delay_fraction >= 1.0
                             or self._rng.random() < self.delay_fraction):
            self.delayed += 1
            return self.delay_s
        return 0.0

    def mangle(self, reply: bytes) -> bytes:
        i = self._rng.randrange(len(reply) - 1)  # never the final byte, so the reply still ends
        return reply[:i] + bytes([reply[i] ^ 0x5A]) + reply[i + 1:]


MAX_LINE = 4096  # bytes of SCPI command text (before a block or the newline)
FRAME_ARGS = 128  # bytes of a frame body besides its block: tile name and arguments


# -- protocol handlers: parse one request from a buffer, execute it on the firmware -------
def _ascii(text: str) -> str:
    """An error text as a reply line carries it: ASCII, no double quotes."""
    return text.encode("ascii", "replace").decode("ascii").replace('"', "'")


class _Connection:
    """One host connection's view of the chip: its number (for the watchdog), the session
    it belongs to (0: none), and its own queue for refusals of a host outside the session
    (so a refused host never reads or clears the controlling host's error queue)."""

    def __init__(self, fw: ChipFirmware | None):
        self.fw = fw
        self.ident = fw.connection_opened() if fw is not None else 0
        self.sid = 0
        self.refused: deque[tuple[int, str]] = deque(maxlen=8)
        self.skip = 0  # bytes still to discard of a refused (oversized) block

    def reset(self) -> None:
        """Forget a partial request (the inter-byte timeout)."""
        self.skip = 0

    @property
    def max_block(self) -> int:
        """The largest binary block this chip takes (a parser without a chip: any frame's)."""
        return self.fw.max_block if self.fw is not None else MAX_BODY

    def holds(self) -> bool:
        cur = self.fw.session
        return cur is not None and self.sid != 0 and cur.id == self.sid

    def open_session(self, args: str) -> str:
        """The session request's reply line: '0,"id"', or the refusal as an error."""
        try:
            self.sid = self.fw.open_session(self.ident, args)
        except ChipError as exc:
            return f'{exc.code},"{_ascii(exc.message)}"'
        return f'0,"{self.sid}"'

    def end_session(self, args: str) -> None:
        self.fw.end_session(self.ident, args)
        self.sid = 0

    def control(self) -> None:
        """Raise the session error unless this connection holds the chip."""
        self.fw.authorize(self.sid)

    def push(self, exc: ChipError) -> None:
        """Queue an error: a connection outside the session keeps its own (its refusals and
        its garbage never reach the controlling host's queue, e.g. in the middle of an
        arm sequence); the holder, or anyone while the chip is free, the chip's queue."""
        if self.fw.session is not None and not self.holds():
            self.refused.append((exc.code, _ascii(exc.message)))
        else:
            self.fw.push_error(exc.code, exc.message)

    def next_error(self) -> str:
        if self.refused:
            code, msg = self.refused.popleft()
            return f'{code},"{msg}"'
        if not self.holds() and self.fw.session is not None:
            return '0,"No error"'  # the queue is the controlling host's
        return self.fw.next_error()

    def clear_errors(self) -> None:
        self.refused.clear()
        if self.holds() or self.fw.session is None:
            self.fw.clear_errors()


class ScpiHandler(_Connection):
    """Line-oriented SCPI; TILE:PULS? and TILE:MVM? end with an IEEE 488.2 block."""

    def parse(self, buf: bytearray) -> tuple[tuple[str, bytes | None] | None, int]:
        if self.skip:  # drop a refused block as it arrives, never buffering it
            used = min(self.skip, len(buf))
            self.skip -= used
            return None, used
        nl = buf.find(b"\n")
        hash_ = buf.find(b"#", 0, nl if nl >= 0 else len(buf))
        text_end = hash_ if hash_ >= 0 else nl if nl >= 0 else len(buf)
        if text_end > MAX_LINE:  # a command's text is short: never buffer a runaway line
            self.push(ChipError(E_COMMAND, f"command text longer than {MAX_LINE} bytes"))
            return None, text_end
        if hash_ < 0:
            if nl < 0:
                return None, 0
            return (buf[:nl].decode("ascii", "replace").strip(), None), nl + 1
        if len(buf) < hash_ + 2:
            return None, 0
        digits = buf[hash_ + 1:hash_ + 2]
        if not digits.isdigit() or digits == b"0":
            return ("", None), (nl + 1 if nl >= 0 else len(buf))  # junk: skip to the line end
        d = int(digits)
        if len(buf) < hash_ + 2 + d:
            return None, 0
        length_raw = bytes(buf[hash_ + 2:hash_ + 2 + d])
        if not length_raw.isdigit():
            return ("", None), (nl + 1 if nl >= 0 else len(buf))
        start = hash_ + 2 + d
        length = int(length_raw)
        if length > self.max_block:  # refused before a byte of it is buffered
            self.push(ChipError(E_ILLEGAL, f"block of {length} bytes exceeds the largest "
                                           f"this chip takes ({self.max_block})"))
            self.skip = length + 1  # the block and its terminating newline
            return None, start
        end = start + length
        if len(buf) < end + 1:
            return None, 0
        head = buf[:hash_].decode("ascii", "replace").strip()
        return (head, bytes(buf[start:end])), end + 1

    def execute(self, req: tuple[str, bytes | None]) -> tuple[bytes | None, bool]:
        """The reply (None for a setter) and whether it carries a CRC."""
        text, block = req
        fw = self.fw
        verb, _, args = text.partition(" ")
        verb = verb.upper()
        if verb == "*CLS" and not args:
            self.clear_errors()
            return None, False
        plain = {"*IDN?": fw.idn, "SYST:CAP?": fw.caps, "SYST:LIM?": fw.limits,
                 "TILE:MAP?": fw.tile_map, "SYST:SEQ?": fw.seq, "TILE:LIST?": fw.tile_list,
                 "SYST:ERR?": self.next_error, "OUTP?": fw.output_state,
                 "SYST:SESS:HOLD?": fw.session_state}
        try:
            if verb in plain and not args:
                return (plain[verb]() + "\n").encode("ascii"), False
            if verb == "SYST:SESS?":
                return (self.open_session(args) + "\n").encode("ascii"), False
            if verb == "SYST:SESS:END":
                self.end_session(args)
                return None, False
            if verb in ("PULS:POT", "PULS:DEP"):
                self.control()
                fw.set_shape(verb[5:], args)
                return None, False
            if verb == "OUTP" and args.upper() in ("ON", "OFF", "1", "0"):
                self.control()
                fw.set_output(args.upper() in ("ON", "1"))
                return None, False
            if verb in ("TILE:ALLOC?", "TILE:READ?", "TILE:PULS?", "TILE:MVM?",
                        "TILE:PULS:DEV?", "TILE:OUTER?"):
                return self._sequenced(verb, args, block), True
        except ChipError as exc:
            self.push(exc)
            return None, False
        self.push(ChipError(E_COMMAND, f"undefined header {text[:40]}"))
        return None, False

    def _sequenced(self, verb: str, args: str, block: bytes | None) -> bytes:
        fw = self.fw
        seq_text, _, rest = args.partition(",")
        if not seq_text.isdigit():
            self.push(ChipError(E_COMMAND, f"{verb} without a sequence number"))
            return data_reply(0, E_COMMAND, b"missing sequence number")
        seq = int(seq_text)
        rest = rest.rstrip(",")
        if verb == "TILE:ALLOC?":
            status, payload = fw.sequenced(self.sid, seq, lambda: fw.alloc(rest))
        elif verb == "TILE:READ?":
            status, payload = fw.sequenced(self.sid, seq, lambda: fw.read(rest))
        elif verb == "TILE:PULS?":
            status, payload = fw.sequenced(self.sid, seq, lambda: fw.pulse(rest, _need(block), seq))
        elif verb == "TILE:PULS:DEV?":
            def run_device() -> bytes:
                parts = rest.split(",")
                if len(parts) != 4 or not all(p.lstrip("-").isdigit() for p in parts[1:]):
                    raise ChipError(E_ILLEGAL, f"bad device pulse arguments {rest}")
                return fw.pulse_device(parts[0], *(int(p) for p in parts[1:]), seq)
            status, payload = fw.sequenced(self.sid, seq, run_device)
        elif verb == "TILE:OUTER?":
            def run_outer() -> bytes:
                parts = rest.split(",")
                if len(parts) != 3 or not parts[2].isdigit():
                    raise ChipError(E_ILLEGAL, f"bad outer arguments {rest}")
                try:
                    lr = float(parts[1])
                except ValueError:
                    raise ChipError(E_ILLEGAL, f"bad learning rate {parts[1]}") from None
                return fw.outer(parts[0], lr, int(parts[2]), _need(block), seq)
            status, payload = fw.sequenced(self.sid, seq, run_outer)
        else:
            def run_mvm() -> bytes:
                name, transpose, batch = _split3(rest)
                return fw.mvm(name, transpose == "1", int(batch), _need(block))
            status, payload = fw.sequenced(self.sid, seq, run_mvm)
        return data_reply(seq, status, payload)


def _need(block: bytes | None) -> bytes:
    if block is None:
        raise ChipError(E_ILLEGAL, "binary block missing")
    return block


def _split3(text: str) -> tuple[str, str, str]:
    parts = text.split(",")
    if len(parts) != 3 or not parts[2].isdigit() or parts[1] not in ("0", "1"):
        raise ChipError(E_ILLEGAL, f"bad mvm arguments {text}")
    return parts[0], parts[1], parts[2]


class FrameHandler(_Connection):
    """Length-prefixed frames with CRC-32; a corrupted request is answered with an error."""

    def parse(self, buf: bytearray) -> tuple[tuple[int, int, bytes, bool] | None, int]:
        start = buf.find(bytes([REQ_SYNC]))
        if start < 0:
            return None, len(buf)
        if len(buf) < start + REQ_HEAD.size:
            return None, start
        _, op, seq, length = REQ_HEAD.unpack_from(buf, start)
        if length > min(MAX_BODY, self.max_block + FRAME_ARGS):
            return None, start + 1  # not a real frame start (or too large): resynchronise
        end = start + REQ_HEAD.size + length + 4
        if len(buf) < end:
            return None, start
        frame = bytes(buf[start:end])
        (crc,) = struct.unpack("<I", frame[-4:])
        ok = crc == zlib.crc32(frame[:-4])
        return (op, seq, frame[REQ_HEAD.size:-4], ok), end

    def execute(self, req: tuple[int, int, bytes, bool]) -> tuple[bytes | None, bool]:
        op, seq, body, ok = req
        fw = self.fw
        if not ok:
            return reply_frame(op, seq, E_COMMAND, b"request CRC mismatch"), True
        try:
            op = Op(op)
        except ValueError:
            return reply_frame(op, seq, E_COMMAND, b"unknown opcode"), True
        plain = {Op.IDN: fw.idn, Op.CAP: fw.caps, Op.LIM: fw.limits, Op.MAP: fw.tile_map,
                 Op.SEQ: fw.seq, Op.LIST: fw.tile_list, Op.ERR: self.next_error,
                 Op.OUTQ: fw.output_state, Op.HOLD: fw.session_state}
        try:
            if op in plain:
                return reply_frame(op, seq, 0, plain[op]().encode("ascii")), True
            if op == Op.SESS:
                self.sid = fw.open_session(self.ident, body.decode("ascii", "replace"))
                return reply_frame(op, seq, 0, str(self.sid).encode("ascii")), True
            if op == Op.END:
                self.end_session(body.decode("ascii", "replace"))
                return reply_frame(op, seq, 0, b""), True
            if op in (Op.SHAPE, Op.OUT):
                self.control()
            if op == Op.SHAPE:
                polarity, _, args = body.decode("ascii", "replace").partition(",")
                fw.set_shape(polarity, args)
                return reply_frame(op, seq, 0, b""), True
            if op == Op.OUT:
                if body not in (b"\x00", b"\x01"):
                    raise ChipError(E_ILLEGAL, "output body must be one byte 0 or 1")
                fw.set_output(body == b"\x01")
                return reply_frame(op, seq, 0, b""), True
        except ChipError as exc:
            self.push(exc)
            return reply_frame(op, seq, exc.code, exc.message.encode()), True
        assert op in SEQUENCED
        status, payload = fw.sequenced(self.sid, seq, lambda: self._run(op, seq, body))
        return reply_frame(op, seq, status, payload), True

    def _run(self, op: Op, seq: int, body: bytes) -> bytes:
        fw = self.fw
        if op == Op.ALLOC:
            return fw.alloc(body.decode("ascii", "replace"))
        if op == Op.READ:
            return fw.read(body.decode("ascii", "replace"))
        if not body or len(body) < 1 + body[0]:
            raise ChipError(E_ILLEGAL, "frame body too short")
        name, rest = body[1:1 + body[0]].decode("ascii", "replace"), body[1 + body[0]:]
        if op == Op.PULSE:
            return fw.pulse(name, rest, seq)
        if op == Op.OUTER:
            if len(rest) < 12:
                raise ChipError(E_ILLEGAL, "outer body too short")
            lr, batch = struct.unpack_from("<dI", rest)
            return fw.outer(name, lr, batch, rest[12:], seq)
        if op == Op.PULSE_DEV:
            if len(rest) != 12:
                raise ChipError(E_ILLEGAL, "device pulse body must be 12 bytes")
            row, col, count = struct.unpack("<IIi", rest)
            return fw.pulse_device(name, row, col, count, seq)
        if len(rest) < 5:
            raise ChipError(E_ILLEGAL, "mvm body too short")
        transpose, batch = struct.unpack_from("<BI", rest)
        return fw.mvm(name, bool(transpose), batch, rest[5:])


HANDLERS = {"scpi": ScpiHandler, "serial": FrameHandler}


class Session:
    """One connection's stream state: buffered input, parsed requests, faulted replies."""

    def __init__(self, handler: ScpiHandler | FrameHandler, faults: Faults | None):
        self.handler = handler
        self.faults = faults
        self.buf = bytearray()
        self.last_input = 0.0
        self.discarded = 0  # partial requests dropped by the inter-byte timeout

    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        """Replies to send for the new input, and whether to close the connection now.

        A partial request followed by INTERBYTE_TIMEOUT_S of silence is discarded (as a
        UART firmware does), so a host interrupted mid-write can resynchronise.
        """
        now = time.monotonic()
        pending = self.buf or getattr(self.handler, "skip", 0)
        if pending and now - self.last_input > INTERBYTE_TIMEOUT_S:
            self.buf.clear()
            if hasattr(self.handler, "reset"):
                self.handler.reset()
            self.discarded += 1
        self.last_input = now
        self.buf += data
        out: list[bytes] = []
        while True:
            req, used = self.handler.parse(self.buf)
            if used:
                del self.buf[:used]
            if req is None:
                if not used:
                    return out, False
                continue
            with self.handler.fw.lock:
                reply, checked = self.handler.execute(req)
            action = self.faults.decide(checked) if self.faults is not None else "send"
            if action == "close":
                self.buf.clear()
                return out, True
            if reply is None or action == "drop":
                continue
            if action == "corrupt":
                reply = self.faults.mangle(reply)
            if self.faults is not None and self.faults.delay_s:
                time.sleep(self.faults.delay())
            out.append(reply)
