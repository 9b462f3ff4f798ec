"""Driver tests against the exact message sequence of each command (pymeasure style): a fake
transport asserts every byte written and plays back scripted replies."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from drivers.chip_backend import ChipBackend
from drivers.frames import FrameLink, Op, reply_frame, request_frame
from drivers.link import ChipRejected
from drivers.profile import load_profile
from drivers.scpi import ScpiLink, data_reply
from drivers.transport import Transport
from hil.errors import InstrumentTimeout, ProtocolError, SafetyLimitError

IDN = b"analog-hil,virtual-chip,VC-0001,0.1.0\n"
SCPI_OPEN = [
    (b"*IDN?\n", IDN),
    (b"SYST:CAP?\n", b"MVM=1,ALLOC=1,DTYPE=int16\n"),
    (b"SYST:LIM?\n", b"MAXPULSE=32767,MAXAMPL=5.0,MAXWIDT=0.001,MAXCOMP=0.01\n"),
    (b"TILE:MAP?\n", b"1024x1024,1024x1024,1024x1024,1024x1024\n"),
    (b"SYST:SESS? 0,0,lab-pc pid 1\n", b'0,"7"\n'),
    (b"SYST:SEQ?\n", b"41\n"),
    (b"TILE:LIST?\n", b"0\n"),
]
SCPI_ARM = [
    (b"*CLS\nPULS:POT 1.2,1e-06,0.0001\nPULS:DEP -1.1,1e-06,0.0001\nOUTP ON\n", b""),
    (b"SYST:ERR?\n", b'0,"No error"\n'),
    (b"OUTP?\n", b"1\n"),
]
SCPI_OFF = [(b"*CLS\nOUTP OFF\n", b""), (b"SYST:ERR?\n", b'0,"No error"\n'), (b"OUTP?\n", b"0\n")]
RECONNECT = ("reconnect", b"")
REJOIN = (b"SYST:SESS? 7,0,lab-pc pid 1\n", b'0,"7"\n')  # a fresh connection rejoins
SCPI_END = [(b"*CLS\nSYST:SESS:END 7\n", b""), (b"SYST:ERR?\n", b'0,"No error"\n')]
HOLDER = "lab-pc pid 1"


class FakeTransport(Transport):
    """Asserts each write equals the next expected message; replies become readable then."""

    def __init__(self, script: list[tuple[bytes | str, bytes]]):
        self.script = list(script)
        self.buf = bytearray()
        self.written: list[bytes] = []

    def _next(self, what: bytes | str) -> None:
        assert self.script, f"unexpected {what!r}: the script is exhausted"
        expected, reply = self.script.pop(0)
        assert what == expected, f"sent {what!r}, expected {expected!r}"
        self.buf += reply

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self._next(data)

    def read_exact(self, n: int) -> bytes:
        if len(self.buf) < n:
            self.buf.clear()
            raise InstrumentTimeout("fake: no reply", op="read")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_line(self) -> bytes:
        end = self.buf.find(b"\n")
        if end < 0:
            raise InstrumentTimeout("fake: no reply line", op="read")
        return self.read_exact(end + 1)

    def reconnect(self) -> None:
        self.buf.clear()
        self._next("reconnect")

    def close(self) -> None:
        pass


def scpi_backend(script, retries=0):
    fake = FakeTransport(script)
    be = ChipBackend("visa://fake", ScpiLink(fake), load_profile("virtual"), retries=retries,
                     sleep=lambda s: None, holder=HOLDER)
    return be, fake


def f8(x: float) -> bytes:
    return np.array([x], "<f8").tobytes()


def test_scpi_open_allocate_read_pulse_mvm_close_exact_bytes():
    w = np.arange(6, dtype="<f4").reshape(2, 3) / 10
    counts = np.array([[1, -2, 0], [0, 3, -1]], "<i2")
    y = np.array([[0.3, 1.2]], "<f4")
    script = [
        *SCPI_OPEN,
        (b"TILE:ALLOC? 42,fc1.W,0,0,0,2,3\n", data_reply(42, 0, f8(1e-3))),
        (b"TILE:READ? 43,fc1.W\n", data_reply(43, 0, w.tobytes())),
        *SCPI_ARM,
        (b"TILE:PULS? 44,fc1.W,#212" + counts.tobytes() + b"\n", data_reply(44, 0, b"")),
        (b"TILE:MVM? 45,fc1.W,0,1,#212" + np.ones((1, 3), "<f4").tobytes() + b"\n",
         data_reply(45, 0, y.tobytes())),
        RECONNECT, REJOIN, *SCPI_OFF, *SCPI_END,
    ]
    be, fake = scpi_backend(script)
    assert be.capabilities.mvm and be.capabilities.max_pulses_per_command == 1024
    tile = be.allocate("fc1.W", 2, 3)
    assert tile.dw_min == 1e-3
    assert torch.equal(tile.read(), torch.from_numpy(w))
    tile.pulse(torch.from_numpy(counts.astype(np.int32)))
    assert torch.equal(tile.mvm(torch.ones(1, 3)), torch.from_numpy(y))
    be.close()
    assert not fake.script and be.closed


def test_scpi_data_reply_format():
    reply = data_reply(7, 0, b"ab")
    body = b"0000000007,+000,#12ab"
    assert reply == body + f",{zlib.crc32(body):08X}\n".encode()
    assert data_reply(3, -221, b"x").startswith(b"0000000003,-221,#11x,")


@pytest.mark.parametrize("bad", [
    b"0000000042,+000,#18" + b"\0" * 8 + b",00000000\n",  # CRC mismatch
    b"0000000041,+000,#18" + b"\0" * 8,  # wrong sequence number
    b"00000042,+000,#18" + b"\0" * 12,  # malformed head
    b"0000000042,+000,#14abcd,00000000\n",  # wrong length
    b"garbage\n",
])
def test_scpi_malformed_reply_is_protocol_error_never_a_number(bad):
    script = [*SCPI_OPEN, (b"TILE:ALLOC? 42,t,0,0,0,1,1\n", bad), RECONNECT, REJOIN, *SCPI_OFF]
    be, fake = scpi_backend(script)
    with pytest.raises((ProtocolError, InstrumentTimeout)):
        be.allocate("t", 1, 1)
    assert not fake.script  # outputs were switched off after the failure
    assert "t" not in be.tiles()


def test_scpi_chip_error_status_raises_and_consumes_sequence():
    script = [*SCPI_OPEN,
              (b"TILE:ALLOC? 42,t,0,0,0,1,1\n", data_reply(42, -222, b"region outside")),
              RECONNECT, REJOIN, *SCPI_OFF,
              (b"TILE:ALLOC? 43,u,0,0,0,1,1\n", data_reply(43, 0, f8(0.01)))]
    be, fake = scpi_backend(script)
    with pytest.raises(ChipRejected, match="-222"):
        be.allocate("t", 1, 1)
    be.allocate("u", 1, 1)
    assert not fake.script


def test_retry_after_lost_reply_resends_same_sequence_number():
    """The reply to a pulse is lost: the retry carries the same number (exactly once)."""
    counts = np.ones((1, 2), "<i2")
    cmd = b"TILE:PULS? 43,t,#14" + counts.tobytes() + b"\n"
    script = [*SCPI_OPEN,
              (b"TILE:ALLOC? 42,t,0,0,0,1,2\n", data_reply(42, 0, f8(0.01))),
              *SCPI_ARM, (cmd, b""),  # lost reply -> timeout
              RECONNECT, REJOIN, *SCPI_ARM, (cmd, data_reply(43, 0, b""))]
    be, fake = scpi_backend(script, retries=2)
    tile = be.allocate("t", 1, 2)
    tile.pulse(torch.ones(1, 2, dtype=torch.int32))
    assert not fake.script and be.seq == 43


def test_bounded_retries_then_timeout_and_outputs_off():
    script = [*SCPI_OPEN, (b"TILE:ALLOC? 42,t,0,0,0,1,1\n", b""),
              RECONNECT, REJOIN, (b"TILE:ALLOC? 42,t,0,0,0,1,1\n", b""),
              RECONNECT, REJOIN, *SCPI_OFF]
    be, fake = scpi_backend(script, retries=1)
    with pytest.raises(InstrumentTimeout):
        be.allocate("t", 1, 1)
    assert not fake.script


def test_safety_limit_sends_nothing():
    script = [*SCPI_OPEN, (b"TILE:ALLOC? 42,t,0,0,0,2,2\n", data_reply(42, 0, f8(0.01)))]
    be, fake = scpi_backend(script)
    tile = be.allocate("t", 2, 2)
    sent = len(fake.written)
    with pytest.raises(SafetyLimitError):
        tile.pulse(torch.full((2, 2), 1025, dtype=torch.int32))
    with pytest.raises(SafetyLimitError):
        be.set_pulse_shape("potentiate", 2.5, 1e-6, 1e-4)
    with pytest.raises(SafetyLimitError):
        be.allocate("big", 2000, 2)
    assert len(fake.written) == sent


def test_identity_mismatch_refuses_to_open():
    fake = FakeTransport([(b"*IDN?\n", b"Keysight,B2912A,MY1,1.0\n"), RECONNECT, *SCPI_OFF])
    with pytest.raises(Exception, match="expects"):
        ChipBackend("visa://fake", ScpiLink(fake), load_profile("virtual"), retries=0,
                     holder=HOLDER)


# -- the framed serial protocol ---------------------------------------------------------
def frame_script_open():
    texts = [(Op.IDN, b"", IDN[:-1]), (Op.CAP, b"", b"MVM=0,ALLOC=1,DTYPE=int16"),
             (Op.LIM, b"", b"MAXPULSE=32767,MAXAMPL=5.0,MAXWIDT=0.001,MAXCOMP=0.01"),
             (Op.MAP, b"", b"1024x1024,1024x1024,1024x1024,1024x1024"),
             (Op.SESS, f"0,0,{HOLDER}".encode(), b"7"), (Op.SEQ, b"", b"0"),
             (Op.LIST, b"", b"0")]
    return [(request_frame(op, tag, req), reply_frame(op, tag, 0, body))
            for tag, (op, req, body) in enumerate(texts, start=1)]


def test_frames_exact_bytes_and_stale_frame_skipped():
    counts = np.array([[2, -1]], "<i2")
    w = np.array([[0.5, -0.25]], "<f4")
    script = [
        *frame_script_open(),
        (request_frame(Op.ALLOC, 1, b"t,0,0,0,1,2"), reply_frame(Op.ALLOC, 1, 0, f8(1e-3))),
        # a stale frame (late reply to an earlier request) precedes the real reply
        (request_frame(Op.READ, 2, b"t"),
         reply_frame(Op.SEQ, 6, 0, b"0") + reply_frame(Op.READ, 2, 0, w.tobytes())),
        (request_frame(Op.SHAPE, 8, b"POT,1.2,1e-06,0.0001"), reply_frame(Op.SHAPE, 8, 0, b"")),
        (request_frame(Op.SHAPE, 9, b"DEP,-1.1,1e-06,0.0001"), reply_frame(Op.SHAPE, 9, 0, b"")),
        (request_frame(Op.OUT, 10, b"\x01"), reply_frame(Op.OUT, 10, 0, b"")),
        (request_frame(Op.OUTQ, 11, b""), reply_frame(Op.OUTQ, 11, 0, b"1")),
        (request_frame(Op.PULSE, 3, b"\x01t" + counts.tobytes()),
         reply_frame(Op.PULSE, 3, 0, b"")),
    ]
    fake = FakeTransport(script)
    be = ChipBackend("serial://fake", FrameLink(fake), load_profile("virtual"), retries=0,
                     holder=HOLDER)
    assert not be.capabilities.mvm
    tile = be.allocate("t", 1, 2)
    assert torch.equal(tile.read(), torch.from_numpy(w))
    tile.pulse(torch.from_numpy(counts.astype(np.int32)))
    assert not fake.script


def test_frame_layout():
    frame = request_frame(Op.READ, 258, b"ab")
    head = struct.pack("<BBII", 0xA5, 0x21, 258, 2)
    assert frame == head + b"ab" + struct.pack("<I", zlib.crc32(head + b"ab"))


def test_frames_corrupted_reply_is_protocol_error():
    script = frame_script_open()
    bad = bytearray(reply_frame(Op.ALLOC, 1, 0, f8(1e-3)))
    bad[14] ^= 0xFF
    script += [(request_frame(Op.ALLOC, 1, b"t,0,0,0,1,1"), bytes(bad)), RECONNECT,
               (request_frame(Op.SESS, 8, f"7,0,{HOLDER}".encode()),
                reply_frame(Op.SESS, 8, 0, b"7")),
               (request_frame(Op.OUT, 9, b"\x00"), reply_frame(Op.OUT, 9, 0, b"")),
               (request_frame(Op.OUTQ, 10, b""), reply_frame(Op.OUTQ, 10, 0, b"0"))]
    fake = FakeTransport(script)
    be = ChipBackend("serial://fake", FrameLink(fake), load_profile("virtual"), retries=0,
                     holder=HOLDER)
    with pytest.raises(ProtocolError, match="CRC"):
        be.allocate("t", 1, 1)
    assert not fake.script


def test_scpi_single_device_pulse_exact_bytes():
    script = [*SCPI_OPEN, (b"TILE:ALLOC? 42,t,0,0,0,2,2\n", data_reply(42, 0, f8(0.01))),
              *SCPI_ARM, (b"TILE:PULS:DEV? 43,t,1,0,-7\n", data_reply(43, 0, b""))]
    be, fake = scpi_backend(script)
    be.allocate("t", 2, 2).pulse_device(1, 0, -7)
    assert not fake.script


def test_scpi_outer_update_exact_bytes():
    caps = (b"SYST:CAP?\n", b"MVM=1,ALLOC=1,DTYPE=int16,OUTER=31\n")
    x, d = np.ones((1, 2), "<f4"), np.full((1, 1), 2.0, "<f4")
    script = [SCPI_OPEN[0], caps, *SCPI_OPEN[2:],
              (b"TILE:ALLOC? 42,t,0,0,0,1,2\n", data_reply(42, 0, f8(0.01))), *SCPI_ARM,
              (b"TILE:OUTER? 43,t,-0.5,1,#212" + np.concatenate([x, d], 1).tobytes() + b"\n",
               data_reply(43, 0, b""))]
    be, fake = scpi_backend(script)
    assert be.capabilities.outer_update
    be.allocate("t", 1, 2).outer_update(torch.ones(1, 2), torch.full((1, 1), 2.0), -0.5)
    assert not fake.script


def test_sequence_error_rereads_the_chip_counter_once():
    """Another host moved the chip's counter: nothing ran, so a fresh number is safe."""
    script = [*SCPI_OPEN,
              (b"TILE:ALLOC? 42,t,0,0,0,1,1\n", data_reply(42, 101, b"sequence 42")),
              (b"SYST:SEQ?\n", b"50\n"),
              (b"TILE:ALLOC? 51,t,0,0,0,1,1\n", data_reply(51, 0, f8(0.01)))]
    be, fake = scpi_backend(script)
    be.allocate("t", 1, 1)
    assert not fake.script and be.seq == 51
