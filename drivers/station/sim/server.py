"""Serve a simulated station's instruments on loopback TCP sockets as ordinary VISA
resources (``TCPIP0::127.0.0.1::PORT::SOCKET``, newline-terminated messages), so any VISA
client (pyvisa, pymeasure, QCoDeS, the station driver) talks to them as to the real ones.
One controlling client per instrument: a second connection is refused (closed at once)
while the first is open, so nothing it does can disturb the first one's state."""

from __future__ import annotations

import logging
import socket
import threading

from drivers.station.profile import StationProfile
from drivers.station.sim.station import SimStation
from drivers.transport import listen_loopback

log = logging.getLogger(__name__)
MAX_MESSAGE = 1 << 20  # bytes of one newline-terminated message (a TSP chunk, a SCPI list)


class _Listener:
    def __init__(self, station: StationServer, which: str, port: int):
        self.station, self.which = station, which
        self.serve = station.sim.server(which)
        self.sock = listen_loopback(port)
        self.port = self.sock.getsockname()[1]
        self.busy = False
        self.refused = 0
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, daemon=True,
                                       name=f"station-{which}")
        self.thread.start()

    @property
    def resource(self) -> str:
        return f"TCPIP0::127.0.0.1::{self.port}::SOCKET"

    def _accept(self) -> None:
        while not self.station.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            if self.busy:  # one controlling client: the second is refused
                self.refused += 1
                log.warning("%s: a second client was refused", self.which)
                conn.close()
                continue
            self.busy = True
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(0.1)
        buf = b""
        try:
            while not self.station.stop.is_set():
                try:
                    data = conn.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                buf += data
                if len(buf) > MAX_MESSAGE and b"\n" not in buf:  # never buffer without bound
                    log.warning("%s: a message over %d bytes without a newline; connection "
                                "closed", self.which, MAX_MESSAGE)
                    break
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode("ascii", "replace").strip()
                    if not text:
                        continue
                    with self.station.lock:  # the two instruments share one chip
                        reply = self.serve(text)
                    if reply is not None:
                        conn.sendall(reply.encode("ascii") + b"\n")
        finally:
            conn.close()
            self.busy = False

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=2)
        for t in self.threads:
            t.join(timeout=2)


class StationServer:
    """A running simulated station; ``resources`` are the VISA resources of its SMU and
    matrix, ``url`` the station:// URL that drives them over the sockets."""

    def __init__(self, profile: StationProfile, profile_name: str, backend_url: str = "sim://",
                 first_port: int = 0):
        self.sim = SimStation(profile, backend_url)
        self.profile_name = profile_name
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.listeners: dict[str, _Listener] = {}
        try:
            for k, which in enumerate(self.sim.instruments):  # smu, matrix, matrix2, ...
                self.listeners[which] = _Listener(self, which, first_port + k if first_port
                                                  else 0)
        except BaseException:
            self.close()
            raise

    @property
    def resources(self) -> dict[str, str]:
        return {which: lst.resource for which, lst in self.listeners.items()}

    @property
    def url(self) -> str:
        return f"station://{self.profile_name}?" + "&".join(
            f"{which}={resource}" for which, resource in self.resources.items())

    def close(self) -> None:
        self.stop.set()
        for lst in self.listeners.values():
            lst.close()
        self.sim.close()

    def __enter__(self) -> StationServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
