"""Byte transports under the chip protocols: pyvisa resources, pyserial ports and an
in-process loopback; each maps its failures onto InstrumentTimeout or LinkDown."""

from __future__ import annotations

import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from hil.errors import BackendError, InstrumentTimeout


class LinkDown(BackendError):
    """The connection to the instrument dropped or cannot be opened."""


INTERBYTE_TIMEOUT_S = 0.1  # firmware discards a partial request after this much silence


def listen_loopback(port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:``port`` (0: any free port) for the simulated
    instruments' servers, with a short accept timeout so their threads can stop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(4)
    except OSError:
        sock.close()
        raise
    sock.settimeout(0.1)
    return sock


class Transport(ABC):
    """A byte stream to one instrument: write, read exactly n bytes, read one line."""

    name: str = "transport"

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def read_exact(self, n: int) -> bytes:
        """Exactly n bytes, or InstrumentTimeout / LinkDown."""

    @abstractmethod
    def read_line(self) -> bytes:
        """Bytes up to and including the next b'\\n', or InstrumentTimeout / LinkDown."""

    @abstractmethod
    def reconnect(self) -> None:
        """Drop the connection and open a fresh one (discarding any pending input)."""

    def resync(self) -> bool:
        """Discard pending input before a retry; True if that took a fresh connection
        (the default), after which the chip has grounded its outputs."""
        self.reconnect()
        return True

    @abstractmethod
    def close(self) -> None: ...


class VisaTransport(Transport):
    """A pyvisa resource on the pyvisa-py backend ('@py'): TCPIP SOCKET, USB, GPIB, ASRL."""

    def __init__(self, resource: str, timeout_s: float, visa_library: str = "@py"):
        import pyvisa

        self.name = resource
        self.timeout_ms = max(1, int(round(timeout_s * 1000)))
        self._pyvisa = pyvisa
        try:  # the process-wide manager of this library (pyvisa shares it): never closed here
            self._rm = pyvisa.ResourceManager(visa_library)
        except (OSError, ValueError, pyvisa.errors.Error) as exc:
            raise LinkDown(f"cannot load VISA library {visa_library!r}: {exc}",
                           op="connect") from None
        self._inst = None
        self._open()

    def _open(self) -> None:
        try:
            inst = self._rm.open_resource(self.name, open_timeout=self.timeout_ms)
        except Exception as exc:  # pyvisa-py raises plain Exception on a refused connection
            raise LinkDown(f"cannot open {self.name}: {exc}", op="connect") from None
        inst.timeout = self.timeout_ms
        inst.read_termination = "\n"
        inst.write_termination = ""
        inst.chunk_size = 1 << 20
        # pyvisa-py receives in 4 KiB pieces by default; whole-tile blocks want larger ones
        session = getattr(self._rm.visalib, "sessions", {}).get(inst.session)
        if session is not None and hasattr(session, "max_recv_size"):
            session.max_recv_size = 1 << 20
        self._inst = inst

    def _fail(self, exc: Exception, op: str) -> BackendError:
        err = getattr(exc, "error_code", None)
        if err == self._pyvisa.constants.StatusCode.error_timeout:
            return InstrumentTimeout(f"no reply from {self.name} within {self.timeout_ms} ms",
                                     op=op)
        return LinkDown(f"{self.name}: {exc}", op=op)

    def write(self, data: bytes) -> None:
        if self._inst is None:
            raise LinkDown(f"{self.name} is not connected", op="write")
        try:
            self._inst.write_raw(data)
        except (self._pyvisa.errors.VisaIOError, OSError) as exc:
            raise self._fail(exc, "write") from None

    def read_exact(self, n: int) -> bytes:
        if self._inst is None:
            raise LinkDown(f"{self.name} is not connected", op="read")
        try:
            data = self._inst.read_bytes(n)
        except (self._pyvisa.errors.VisaIOError, OSError) as exc:
            raise self._fail(exc, "read") from None
        if len(data) != n:
            raise InstrumentTimeout(f"{self.name}: short read ({len(data)} of {n} bytes)",
                                    op="read")
        return bytes(data)

    def read_line(self) -> bytes:
        if self._inst is None:
            raise LinkDown(f"{self.name} is not connected", op="read")
        try:
            data = self._inst.read_raw()
        except (self._pyvisa.errors.VisaIOError, OSError) as exc:
            raise self._fail(exc, "read") from None
        return bytes(data)

    def reconnect(self) -> None:
        self._drop()
        self._open()

    def _drop(self) -> None:
        if self._inst is not None:
            try:
                self._inst.close()
            except Exception:  # noqa: BLE001 - a dead session may fail to close; it is gone anyway
                pass
            self._inst = None

    def close(self) -> None:
        """Close this instrument session only. pyvisa shares one ResourceManager per VISA
        library in a process; closing it would invalidate every other backend's session
        (their next call a raw InvalidSession, their outputs left on), so it stays open
        and pyvisa releases it at exit."""
        self._drop()


class SerialTransport(Transport):
    """A pyserial port: a device path, a pty, or any pyserial URL such as socket://host:port."""

    def __init__(self, port: str, baud: int, timeout_s: float):
        import serial

        self.name = port
        self._partial = False
        self.baud = baud
        self.timeout_s = timeout_s
        self._serial = serial
        self._port = None
        self._open()

    def _open(self) -> None:
        try:
            # exclusive: a second process cannot open the same port (one host per chip;
            # a pyserial URL such as socket:// ignores it and the chip's session decides)
            self._port = self._serial.serial_for_url(self.name, baudrate=self.baud,
                                                     timeout=self.timeout_s,
                                                     write_timeout=self.timeout_s,
                                                     exclusive=True)
        except (self._serial.SerialException, OSError, ValueError) as exc:
            raise LinkDown(f"cannot open {self.name}: {exc}", op="connect") from None
        try:
            self._port.reset_input_buffer()
        except (self._serial.SerialException, OSError):
            pass

    def write(self, data: bytes) -> None:
        if self._port is None:
            raise LinkDown(f"{self.name} is not connected", op="write")
        try:
            self._partial = True  # stays set if the write is interrupted (Ctrl-C)
            self._port.write(data)
            self._port.flush()
            self._partial = False
        except self._serial.SerialTimeoutException:
            raise InstrumentTimeout(f"{self.name}: write timed out", op="write") from None
        except (self._serial.SerialException, OSError) as exc:
            raise LinkDown(f"{self.name}: {exc}", op="write") from None

    def read_exact(self, n: int) -> bytes:
        if self._port is None:
            raise LinkDown(f"{self.name} is not connected", op="read")
        try:
            data = self._port.read(n)
        except (self._serial.SerialException, OSError) as exc:
            raise LinkDown(f"{self.name}: {exc}", op="read") from None
        if len(data) != n:
            raise InstrumentTimeout(f"no reply from {self.name} within {self.timeout_s} s "
                                    f"({len(data)} of {n} bytes)", op="read")
        return bytes(data)

    def read_line(self) -> bytes:
        if self._port is None:
            raise LinkDown(f"{self.name} is not connected", op="read")
        try:
            data = self._port.read_until(b"\n")
        except (self._serial.SerialException, OSError) as exc:
            raise LinkDown(f"{self.name}: {exc}", op="read") from None
        if not data.endswith(b"\n"):
            raise InstrumentTimeout(f"no reply line from {self.name} within {self.timeout_s} s",
                                    op="read")
        return bytes(data)

    def reconnect(self) -> None:
        self._drop()
        self._open()

    def resync(self) -> bool:
        """Flush input but keep the port (replies are matched by opcode and sequence); after
        an interrupted write, first stay silent until the firmware drops the partial frame."""
        if self._partial:
            time.sleep(3 * INTERBYTE_TIMEOUT_S)
            self._partial = False
        if self._port is None:
            self._open()
            return True
        try:
            self._port.reset_input_buffer()
        except (self._serial.SerialException, OSError):
            self.reconnect()
            return True
        return False

    def _drop(self) -> None:
        if self._port is not None:
            try:
                self._port.close()
            except (self._serial.SerialException, OSError):
                pass
            self._port = None

    def close(self) -> None:
        self._drop()


class LoopbackTransport(Transport):
    """In-process transport: every write is handed to ``serve(bytes) -> reply bytes``.

    Used by tests and the benchmark to run the full protocol path without sockets.
    """

    def __init__(self, serve: Callable[[bytes], bytes], name: str = "loopback"):
        self.name = name
        self._serve = serve
        self._pending = bytearray()
        self._pos = 0

    def write(self, data: bytes) -> None:
        reply = self._serve(bytes(data))
        if self._pos:
            del self._pending[:self._pos]
            self._pos = 0
        self._pending += reply

    def read_exact(self, n: int) -> bytes:
        if len(self._pending) - self._pos < n:
            raise InstrumentTimeout(f"{self.name}: no reply", op="read")
        out = bytes(self._pending[self._pos:self._pos + n])
        self._pos += n
        return out

    def read_line(self) -> bytes:
        end = self._pending.find(b"\n", self._pos)
        if end < 0:
            raise InstrumentTimeout(f"{self.name}: no reply line", op="read")
        return self.read_exact(end + 1 - self._pos)

    def reconnect(self) -> None:
        self._pending.clear()
        self._pos = 0

    def close(self) -> None:
        self._pending.clear()
