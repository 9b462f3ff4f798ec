"""What a station dialect does, whatever the command language: open and configure the two
instruments, route one device, run pulse trains and reads on it, check both error queues,
make the station safe; and the connections (pyvisa resources, or simulated instruments
in-process) it does that over."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from drivers.station.profile import StationProfile
from drivers.station.timing import TIMINGS, StationTiming, period_of
from hil.errors import BackendError, InstrumentTimeout, ProtocolError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """The matrix outputs of one device's row and column lines."""

    row: int
    col: int


class InstrumentError(BackendError):
    """An instrument reported an error (its own code and message)."""


class ComplianceTrip(BackendError):
    """The SMU hit its current compliance on a device (named in the message)."""


class Connection(ABC):
    """A line-oriented connection to one instrument."""

    name: str = "instrument"

    @abstractmethod
    def write(self, line: str) -> None: ...

    @abstractmethod
    def read(self) -> str: ...

    def query(self, line: str) -> str:
        self.write(line)
        return self.read()

    def identity(self) -> str:
        """What the instrument says it is (its *IDN? reply)."""
        return self.query("*IDN?")

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release the connection."""


class NodeConnection(Connection):
    """A TSP-Link node reached through the master's connection: every chunk runs on the
    master with ``channel`` bound to ``node[N].channel`` (errors land in the master's error
    queue, as TSP-Link reports a node's errors)."""

    def __init__(self, master: Connection, node: int):
        self.master, self.node = master, node
        self.name = f"{master.name} node[{node}]"
        self.sent: list[str] = []  # nothing goes out on this connection itself: see master's

    def write(self, line: str) -> None:
        bind = f"local channel = node[{self.node}].channel "
        self.master.write("\n".join(bind + part for part in line.split("\n")))

    def read(self) -> str:
        return self.master.read()

    def identity(self) -> str:
        # pcall: a node that is not on the network answers "none" instead of an error
        model = self.master.query(f"local ok, m = pcall(function() return node[{self.node}]"
                                  ".model end) print(ok and m or 'none')")
        return f"TSP-Link node {self.node}: Model {model}"


class VisaConnection(Connection):
    """A pyvisa resource (pyvisa-py '@py' by default: TCPIP SOCKET/INSTR, GPIB, USB)."""

    def __init__(self, resource: str, timeout_s: float = 10.0, library: str = "@py"):
        import pyvisa

        self.name = resource
        self._errors = (pyvisa.errors.VisaIOError, OSError)
        try:
            self._rm = pyvisa.ResourceManager(library)
            self._inst = self._rm.open_resource(resource, open_timeout=int(timeout_s * 1000))
        except Exception as exc:  # noqa: BLE001 - pyvisa-py raises plain Exception on refusal
            raise BackendError(f"cannot open {resource}: {exc}", op="connect") from None
        self._inst.timeout = int(timeout_s * 1000)
        self._inst.read_termination = "\n"
        self._inst.write_termination = "\n"
        self._lock(pyvisa, timeout_s)

    def _lock(self, pyvisa, timeout_s: float) -> None:
        """One controlling host: a VISA exclusive lock for as long as this connection lives
        (VXI-11 / HiSLIP LAN and vendor-VISA GPIB resources support it; a raw SOCKET does
        not, and an instrument that allows one client per socket enforces it itself)."""
        codes = pyvisa.constants.StatusCode
        try:
            self._inst.lock_excl(timeout=int(timeout_s * 1000))
        except pyvisa.errors.VisaIOError as exc:
            if exc.error_code == codes.error_resource_locked:
                self.close()
                raise BackendError(f"{self.name} is held by another host (VISA lock): close "
                                   "that session first", op="connect") from None
            if exc.error_code != codes.error_nonsupported_operation:
                self.close()
                raise BackendError(f"cannot lock {self.name}: {exc}", op="connect") from None
            log.info("%s: this resource type has no VISA lock", self.name)
        except NotImplementedError:
            log.info("%s: this VISA library has no locks", self.name)

    def write(self, line: str) -> None:
        try:
            self._inst.write(line)
        except self._errors as exc:
            raise InstrumentTimeout(f"{self.name}: {exc}", op="write") from None

    def read(self) -> str:
        try:
            return self._inst.read().strip()
        except self._errors as exc:
            raise InstrumentTimeout(f"{self.name}: {exc}", op="read") from None

    def close(self) -> None:
        for thing in (self._inst, self._rm):
            try:
                thing.close()
            except Exception:  # noqa: BLE001 - a dead session may fail to close
                pass


class LocalConnection(Connection):
    """A simulated instrument in-process: ``serve(line) -> reply or None``."""

    def __init__(self, serve: Callable[[str], str | None], name: str = "sim"):
        self.name = name
        self._serve = serve
        self._replies: list[str] = []
        self.sent: list[str] = []  # every program message, in order (tests replay them)

    def write(self, message: str) -> None:
        for line in message.split("\n"):  # a message of several lines: one command each
            self.sent.append(line)
            reply = self._serve(line)
            if reply is not None:
                self._replies.extend(reply.split("\n"))

    def read(self) -> str:
        if not self._replies:
            raise InstrumentTimeout(f"{self.name}: no reply", op="read")
        return self._replies.pop(0)


Program = tuple[Route, list[int]]
NOT_A_NUMBER = 9.9e37  # SCPI's NaN / overflow reading is 9.91E37 (SCPI-1999 Vol. 1, 7.2.1.5)


def current(text: str, where: str) -> float:
    """A current reading; a non-number, NaN or the SCPI overflow value is a ProtocolError."""
    try:
        value = float(text)
    except ValueError:
        raise ProtocolError(f"malformed reading {text!r} ({where})", op="read") from None
    if not math.isfinite(value) or abs(value) >= NOT_A_NUMBER:
        raise ProtocolError(f"the SMU returned no valid reading ({text}) on {where}",
                            op="read")
    return value


class Dialect(ABC):
    """One station family's command language over two connections (SMU, matrix)."""

    def __init__(self, profile: StationProfile, smu: Connection, matrix: Connection,
                 expansion: Sequence[Connection] = ()):
        self.profile = profile
        self.smu = smu
        self.matrix = matrix  # the first matrix frame
        self.frames: list[Connection] = [matrix, *expansion]  # every frame, in output order
        self.timing: StationTiming = TIMINGS[profile.dialect]
        self.cold = profile.matrix.switching == "cold"  # relays switch only at 0 V
        self.routed: Route | None = None  # what the matrix holds now (None: all open)
        self.armed = False  # SMU output on (after open(); off again after safe())
        self.messages = 0  # program messages sent (benchmarks)
        self.relay_commands = 0

    def period(self, polarity: str) -> float:
        return period_of(self.profile.pulses[polarity].width_s, self.profile.pulse_period_s,
                         self.timing)

    def identify(self) -> None:
        """Both instruments answer *IDN? with what the profile expects (else BackendError)."""
        p = self.profile
        frames = [p.matrix, *p.matrix.expansion]
        for conn, inst in ((self.smu, p.smu), *zip(self.frames, frames, strict=True)):
            idn = conn.identity()
            if inst.idn_contains not in idn:
                raise BackendError(f"{conn.name} identifies as {idn!r}, profile {p.name!r} "
                                   f"expects {inst.idn_contains!r}", op="identify")

    @abstractmethod
    def open(self) -> None:
        """Identify both instruments, reset, configure them, check both error queues."""

    def relays(self, route: Route | None) -> set[tuple[int, int, int]]:
        """(frame, output on that frame, input) of every relay ``route`` closes."""
        if route is None:
            return set()
        m, locate = self.profile.matrix, self.profile.locate
        out = {(*locate(route.row), m.force_input), (*locate(route.col), m.ground_input)}
        if m.sense_input:
            out.add((*locate(route.row), m.sense_input))
        return out

    def frame_changes(self, route: Route) -> tuple[dict[int, list], dict[int, list]]:
        """The relays to open and to close, per frame, to go from the present route to
        ``route``: {frame: [(output, input), ...]} each, sorted."""
        old, new = self.relays(self.routed), self.relays(route)
        opening: dict[int, list] = {}
        closing: dict[int, list] = {}
        for frame, out, inp in sorted(old - new):
            opening.setdefault(frame, []).append((out, inp))
        for frame, out, inp in sorted(new - old):
            closing.setdefault(frame, []).append((out, inp))
        return opening, closing

    @abstractmethod
    def _route(self, route: Route, where: str) -> None:
        """Only this device's row on force and its column on ground (break before make),
        confirmed by the matrix before returning."""

    @abstractmethod
    def exchange(self, steps: list[tuple[int, bool]], where: str) -> list[float]:
        """On the routed device, in one SMU message: for each (count, read) a train of the
        signed count (if nonzero), then a read (if asked); the currents read, in order."""

    @abstractmethod
    def arm(self) -> None:
        """SMU output on at 0 V, confirmed (after open() and after every safe())."""

    def ensure_armed(self) -> None:
        if not self.armed:
            self.arm()
            self.armed = True

    @abstractmethod
    def idle(self) -> None:
        """The SMU back to 0 V after a series of reads (output stays on)."""

    def read_devices(self, routes: list[Route], where: list[str]) -> list[float]:
        """Route each device in turn and measure its current at the read voltage."""
        return [c[0] for c in self.run_programs([(r, [0]) for r in routes], where)]

    def pulse_devices(self, trains: list[tuple[Route, int]], where: list[str]) -> None:
        """Route each device in turn and apply its signed pulse count as one train."""
        self.ensure_armed()
        for (route, count), at in zip(trains, where, strict=True):
            self._route(route, at)
            self.exchange([(count, False)], at)

    def run_programs(self, programs: list[Program], where: list[str]) -> list[list[float]]:
        """Route each device once; for each count of its program: train (if any), read;
        ``profile.batch`` steps per SMU message."""
        out = []
        batch = self.profile.batch
        self.ensure_armed()
        for (route, counts), at in zip(programs, where, strict=True):
            self._route(route, at)
            currents: list[float] = []
            for start in range(0, len(counts), batch):
                currents += self.exchange([(n, True) for n in counts[start:start + batch]], at)
            out.append(currents)
        self.idle()  # after an error the caller makes the station safe instead
        return out

    def safe(self) -> None:
        """SMU output off, every relay open on every frame; raises unless the instruments
        confirm it (each by a query)."""
        errors = []
        self.state = {}
        self.armed = False
        try:
            if not self._output_off():
                errors.append("SMU output still on")
        except (BackendError, ValueError) as exc:
            errors.append(f"SMU: {exc}")
        for k, conn in enumerate(self.frames):
            try:
                closed = self._open_all(conn)
                if closed:
                    errors.append(f"matrix frame {k + 1} still has {closed} closed")
            except BackendError as exc:
                errors.append(f"matrix frame {k + 1}: {exc}")
        if errors:
            raise BackendError("station not confirmed safe: " + "; ".join(errors), op="safe")
        self.routed = None

    @abstractmethod
    def _output_off(self) -> bool:
        """Switch the SMU output off; whether the SMU then reports it off."""

    @abstractmethod
    def _open_all(self, conn: Connection) -> str:
        """Open every relay of one matrix frame; what it still reports closed ('' if none)."""

    def close(self) -> None:
        self.smu.close()
        for conn in self.frames:
            conn.close()

    # -- the time model (the same timings the simulated instruments' clock uses) -----------
    def access_seconds(self, same_row: bool) -> float:
        """One route change: a column step (row kept) or a new row and column, break before
        make; plus the message that does it."""
        t = self.timing
        settle = (max(t.relay_open_s, t.relay_close_s) if self.cold
                  else t.relay_open_s + t.relay_close_s)
        return settle + (0.0 if self.routes_in_smu_chunk else t.message_s)

    @property
    def routes_in_smu_chunk(self) -> bool:
        """Whether routes ride in the SMU's messages (no matrix message of their own)."""
        return False

    def read_seconds(self) -> float:
        t = self.timing
        return self.profile.read.aperture_s + t.measure_overhead_s

    def estimate(self, shape: tuple[int, int], reads: int, pulses: int, pulse_reads: int,
                 count: int, calls: int = 1) -> float:
        """Modelled seconds for whole-tile reads, pulse maps and pulse_read steps."""
        rows, cols = shape
        n = rows * cols
        route = self.access_seconds(True)
        train = abs(count) * self.period("potentiate") + self.timing.message_s
        read = self.read_seconds() + self.timing.message_s
        t = reads * n * (route + read) + pulses * n * (route + train)
        if pulse_reads:
            calls = max(1, min(calls, pulse_reads))
            msgs = calls * -(-(pulse_reads // calls) // max(1, self.profile.batch))
            t += n * (calls * route + pulse_reads * (abs(count) * self.period("potentiate")
                                                     + self.read_seconds())
                      + msgs * self.timing.message_s)
        return t
