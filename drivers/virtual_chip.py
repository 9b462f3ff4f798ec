"""The virtual chip: any hil backend (normally sim://) behind the SCPI and framed serial
protocols, on 127.0.0.1 TCP or a pty, with fault injection (dropped, delayed and corrupted
replies, a forced disconnect) so every driver path runs in CI."""

from __future__ import annotations

import os
import select
import socket
import threading
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import quote

from drivers.chip_handlers import HANDLERS, Faults, FrameHandler, ScpiHandler, Session
from drivers.firmware import ChipFirmware
from drivers.profile import load_profile
from drivers.transport import listen_loopback
from hil.backend import Backend, open_backend

if TYPE_CHECKING:
    from drivers.chip_backend import ChipBackend

PROTOCOLS = ("scpi", "serial")
TRANSPORTS = ("tcp", "pty")
__all__ = ["Faults", "FrameHandler", "ScpiHandler", "Session", "VirtualChip", "loopback_backend",
           "running"]


class _TcpServer:
    def __init__(self, fw: ChipFirmware, protocol: str, faults: Faults | None, port: int):
        self.fw, self.protocol, self.faults = fw, protocol, faults
        self.sock = listen_loopback(port)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self.accept_thread = threading.Thread(target=self._accept, daemon=True,
                                              name="virtual-chip-accept")
        self.accept_thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(0.1)
            self.conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name="virtual-chip-conn")
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        handler = HANDLERS[self.protocol](self.fw)
        session = Session(handler, self.faults)
        try:
            while not self.stop.is_set():
                try:
                    data = conn.recv(1 << 20)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                replies, close = session.feed(data)
                for reply in replies:
                    conn.sendall(reply)
                if close:
                    break
        except OSError:
            pass
        finally:
            self.fw.connection_closed(handler.ident)  # the watchdog
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.accept_thread.join(timeout=2)
        for t in self.threads:
            t.join(timeout=2)


class _PtyServer:
    """A pty pair: the host opens the slave path; we serve the master end."""

    def __init__(self, fw: ChipFirmware, protocol: str, faults: Faults | None):
        self.fw, self.faults = fw, faults
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.stop = threading.Event()
        self.session = Session(HANDLERS[protocol](fw), faults)
        self.thread = threading.Thread(target=self._serve, daemon=True, name="virtual-chip-pty")
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:
                break
            replies, _reset = self.session.feed(data)
            for reply in replies:
                view = memoryview(reply)
                while view:
                    view = view[os.write(self.master, view):]
            # reset: a pty cannot be closed under the host; the reply is lost and the
            # input discarded (Session.feed), like a board whose UART was reset

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        os.close(self.master)
        os.close(self.slave)


class VirtualChip:
    """A running virtual chip: ``url`` is what a host opens; ``firmware`` shows its state."""

    def __init__(self, backend_url: str = "sim://", protocol: str = "scpi",
                 transport: str = "tcp", faults: Faults | None = None,
                 profile: str = "virtual", port: int = 0, timeout_s: float | None = None):
        if protocol not in PROTOCOLS or transport not in TRANSPORTS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, transport one of "
                             f"{TRANSPORTS}")
        self.protocol, self.transport, self.profile = protocol, transport, profile
        self.timeout_s = timeout_s
        self.backend: Backend = open_backend(backend_url)
        try:
            self.firmware = ChipFirmware(self.backend, load_profile(profile))
            self.faults = faults
            if transport == "tcp":
                self._server: _TcpServer | _PtyServer = _TcpServer(self.firmware, protocol,
                                                                   faults, port)
            else:
                self._server = _PtyServer(self.firmware, protocol, faults)
        except BaseException:
            self.backend.close()
            raise

    @property
    def address(self) -> str:
        if isinstance(self._server, _TcpServer):
            return f"127.0.0.1:{self._server.port}"
        return self._server.path

    @property
    def url(self) -> str:
        query = f"?profile={quote(self.profile, safe='')}"
        if self.timeout_s is not None:
            query += f"&timeout={self.timeout_s!r}"
        if self.protocol == "scpi":
            if isinstance(self._server, _TcpServer):
                return f"visa://TCPIP0::127.0.0.1::{self._server.port}::SOCKET{query}"
            return f"visa://ASRL{self._server.path}::INSTR{query}"
        if isinstance(self._server, _TcpServer):
            return f"serial://socket://127.0.0.1:{self._server.port}{query}"
        return f"serial://{self._server.path}{query}"

    def close(self) -> None:
        try:
            self._server.close()
        finally:
            self.backend.close()

    def __enter__(self) -> VirtualChip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def running(backend_url: str = "sim://", protocol: str = "scpi", transport: str = "tcp",
            faults: Faults | None = None, profile: str = "virtual",
            timeout_s: float | None = None) -> Iterator[str]:
    """Serve ``backend_url`` as a virtual chip for the block; yields the visa:// or
    serial:// URL to open (bound to 127.0.0.1 or a pty; stopped when the block exits)."""
    with VirtualChip(backend_url, protocol, transport, faults, profile,
                     timeout_s=timeout_s) as chip:
        yield chip.url


def loopback_backend(backend_url: str = "sim://", protocol: str = "scpi",
                     profile: str = "virtual") -> tuple[ChipBackend, ChipFirmware]:
    """A driver backend wired in-process to a virtual chip (no sockets): (backend, firmware).

    The full protocol path (interlock, encoding, parsing, sequence numbers) without I/O,
    for property tests and the benchmark; close the backend, then firmware.backend.
    """
    from drivers.chip_backend import ChipBackend
    from drivers.frames import FrameLink
    from drivers.scpi import ScpiLink
    from drivers.transport import LoopbackTransport

    prof = load_profile(profile)
    inner = open_backend(backend_url)
    fw = ChipFirmware(inner, prof)
    session = Session(HANDLERS[protocol](fw), None)

    def serve(data: bytes) -> bytes:
        return b"".join(session.feed(data)[0])

    link_cls = ScpiLink if protocol == "scpi" else FrameLink
    backend = ChipBackend(f"loopback+{protocol}://", link_cls(LoopbackTransport(serve)), prof)
    return backend, fw
