"""A simulated ArC TWO behind pyarc2 0.6.0's Python API, driven by any hil backend URL.

This module stands in for ``pyarc2``: the same names (``Instrument``, ``BiasOrder``,
``ReadAt``, ``ReadAfter``, ``DataMode``, ``ReadType``, ``ControlMode``, ``IdleMode``,
``WaitFor``, ``AuxDACFn``, ``IODir``, ``LogicLevel``, ``OutputRange``, ``ArC2Error``,
``find_ids``), and ``Instrument`` has pyarc2's public methods with the same arguments and
return types, so a script written against one runs on the other
(``import drivers.arc2.sim as pyarc2``).

The model: the devices of the array in the socket are one tile of the backend behind
``backend`` (rows: wordlines, columns: bitlines of the channel mapping), conductance
``G = g_ref + g_scale * w``. Every operation sets channel voltages; a device sees its
wordline's minus its bitline's voltage. A device seeing at least ``threshold_v`` gets one
potentiating pulse, at most ``-threshold_v`` one depressing pulse (so a V/2 half-selected
neighbour below the threshold is left alone); currents are ``G * V`` summed per channel,
plus the instrument's own noise if asked for (float32, as the instrument returns them),
NaN where a channel was not measured. Pulses and
other buffered commands are queued and happen on ``execute()``; reads flush the queue and
happen at once, as in libarc2. The limits of the instrument (channels 0..63, +-13.5 V,
pulses from 40 ns in 10 ns steps, 10 mA per channel, finite values) are refused with
``ArC2Error`` (libarc2 itself clamps a voltage or width out of range, and turns NaN into a
rail voltage: the driver's interlock must refuse them first). A modelled instrument clock
adds up the time of every command sequence (``drivers.arc2.spec``).
"""

from __future__ import annotations

import functools
import math
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drivers.arc2 import spec
from drivers.arc2.mapping import DEFAULT_MAPPING, load_mapping
from drivers.arc2.spec import BIT_CHANNELS, CHANNELS, WORD_CHANNELS
from hil.backend import Backend, open_backend

SIM_PORTS = (0,)
LIBARC2_VERSION = "0.6.0"  # the libarc2 whose behaviour this models
_WORD_SET, _BIT_SET = frozenset(WORD_CHANNELS), frozenset(BIT_CHANNELS)


class ArC2Error(Exception):
    """Raised for what the instrument refuses (pyarc2's catch-all error)."""


# -- pyarc2's enumerations: class attributes holding one instance per variant -------------
class _Variant:
    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self._name}>"


class BiasOrder(_Variant):
    """Which lines are the low (biased) channels of a whole-array operation."""

    Rows: BiasOrder
    Cols: BiasOrder


class ControlMode(_Variant):
    Header: ControlMode
    Internal: ControlMode


class DataMode(_Variant):
    All: DataMode
    Bits: DataMode
    Words: DataMode


class ReadType(_Variant):
    Current: ReadType
    Voltage: ReadType


class AuxDACFn(_Variant):
    SELL: AuxDACFn
    SELH: AuxDACFn
    ARB1: AuxDACFn
    ARB2: AuxDACFn
    ARB3: AuxDACFn
    ARB4: AuxDACFn
    CREF: AuxDACFn
    CSET: AuxDACFn
    LGC: AuxDACFn


class IODir(_Variant):
    IN: IODir
    OUT: IODir


class LogicLevel(_Variant):
    LL1V8: LogicLevel
    LL3V3: LogicLevel
    LL5V: LogicLevel


class OutputRange(_Variant):
    STD: OutputRange
    EXT: OutputRange


class ReadAfter(_Variant):
    Block: ReadAfter
    Never: ReadAfter
    Pulse: ReadAfter
    Ramp: ReadAfter

    @staticmethod
    def from_str(r: str) -> ReadAfter:
        try:
            return {"pulse": ReadAfter.Pulse, "ramp": ReadAfter.Ramp, "block": ReadAfter.Block,
                    "never": ReadAfter.Never}[r]
        except KeyError:
            raise ValueError(f"unknown read-after mode {r!r}") from None

    def __str__(self) -> str:
        return self._name.lower()


class ReadAt(_Variant):
    __slots__ = ("_volts",)
    Bias: ReadAt
    Never: ReadAt

    def __init__(self, name: str, volts: float | None = None):
        super().__init__(name)
        self._volts = volts

    @staticmethod
    def Arb(voltage: float) -> ReadAt:  # noqa: N802 - pyarc2's name
        return ReadAt("Arb", float(np.float32(voltage)))

    def voltage(self) -> float:
        if self._volts is None:
            raise Exception("No voltage associated")  # noqa: TRY002 - pyarc2 raises this
        return self._volts


class WaitFor(_Variant):
    __slots__ = ("_amount",)

    def __init__(self, name: str, amount: int):
        super().__init__(name)
        self._amount = int(amount)

    @staticmethod
    def Nanos(nanos: int) -> WaitFor:  # noqa: N802
        return WaitFor("Nanos", nanos)

    @staticmethod
    def Millis(millis: int) -> WaitFor:  # noqa: N802
        return WaitFor("Millis", millis)

    @staticmethod
    def Iterations(iterations: int) -> WaitFor:  # noqa: N802
        return WaitFor("Iterations", iterations)


for _cls, _names in ((BiasOrder, "Rows Cols"), (ControlMode, "Header Internal"),
                     (DataMode, "All Bits Words"), (ReadType, "Current Voltage"),
                     (AuxDACFn, "SELL SELH ARB1 ARB2 ARB3 ARB4 CREF CSET LGC"),
                     (IODir, "IN OUT"), (LogicLevel, "LL1V8 LL3V3 LL5V"),
                     (OutputRange, "STD EXT"), (ReadAfter, "Block Never Pulse Ramp"),
                     (ReadAt, "Bias Never")):
    for _name in _names.split():
        setattr(_cls, _name, _cls(_name))


class IdleMode(Enum):
    """How finalise_operation leaves the channels (pyarc2's values)."""

    Float = 0b01
    SoftGnd = 0b10
    HardGnd = 0b11


@dataclass
class ArC2Config:
    idleMode: IdleMode  # noqa: N815 - pyarc2's field names
    controlMode: ControlMode  # noqa: N815


def find_ids() -> list[int]:
    """The ports of the simulated instruments."""
    return list(SIM_PORTS)


def _variant(value: Any, cls: type[_Variant]) -> str:
    """The variant name of ``value``: one of this module's or the equal one of pyarc2's."""
    if isinstance(value, cls):
        return value._name
    if type(value).__name__ == cls.__name__:
        try:
            import pyarc2  # the real enums, where a script passes those
            real = getattr(pyarc2, cls.__name__)
            for name in vars(cls):
                if not name.startswith("_") and isinstance(getattr(cls, name), cls):
                    if value == getattr(real, name):
                        return name
        except ImportError:
            pass
    raise TypeError(f"expected a {cls.__name__}, got {value!r}")


def _wait_amount(condition: Any) -> int:
    """How many iterations, ms or ns a WaitFor holds (pyarc2's keeps it internal)."""
    if isinstance(condition, WaitFor):
        return condition._amount
    raise TypeError("read_train on the simulation takes this module's WaitFor")


# -- the instrument clock --------------------------------------------------------------
@dataclass
class InstrumentClock:
    """Modelled instrument time and the host's calls, per method."""

    ns: int = 0
    calls: Counter = field(default_factory=Counter)

    @property
    def seconds(self) -> float:
        return self.ns * 1e-9

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


def _api(fn: Callable) -> Callable:
    """Count one host call of a public method (signature kept for inspect)."""

    @functools.wraps(fn)
    def call(self: Instrument, *args: Any, **kw: Any) -> Any:
        self._clock.calls[fn.__name__] += 1
        return fn(self, *args, **kw)

    return call


def _channels(chans: Iterable[int] | np.ndarray | None) -> np.ndarray:
    """An uint64 channel array as pyarc2 converts it; channels must exist."""
    if chans is None:
        return np.zeros(0, dtype=np.uint64)
    if isinstance(chans, (str, bytes)) or not isinstance(chans, (Iterable, np.ndarray)):
        raise TypeError("Invalid argument type, must be an iterable")
    arr = np.array(list(chans) if not isinstance(chans, np.ndarray) else chans, dtype=np.uint64)
    if arr.ndim != 1:
        raise TypeError(f"Invalid argument dimensions, must be: 1, found {arr.ndim} instead")
    bad = arr[arr >= CHANNELS]
    if bad.size:
        raise ArC2Error(f"channel {int(bad[0])} does not exist (0..{CHANNELS - 1})")
    return arr


def _channel(chan: int) -> int:
    c = _uint(chan, "channel")
    if c >= CHANNELS:
        raise ArC2Error(f"channel {c} does not exist (0..{CHANNELS - 1})")
    return c


def _uint(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"'{type(value).__name__}' object cannot be interpreted as an integer "
                        f"({what})")
    if value < 0:
        raise OverflowError(f"can't convert negative int to unsigned ({what})")
    return int(value)


def _volts(v: Any, what: str, limit: float = spec.MAX_AMPLITUDE_V) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise TypeError(f"argument '{what}': must be real number, not {type(v).__name__}")
    x = float(np.float32(v))
    if not math.isfinite(x):
        raise ArC2Error(f"{what} is not finite ({v!r})")
    if abs(x) > limit:
        raise ArC2Error(f"{what} {x:g} V outside +-{limit:g} V")
    return x


def _width(nanos: Any) -> int:
    ns = _uint(nanos, "nanos")
    if 0 < ns < spec.MIN_WIDTH_NS or ns % spec.WIDTH_STEP_NS:
        raise ArC2Error(f"pulse width {ns} ns: the instrument takes 0 or {spec.MIN_WIDTH_NS} ns "
                        f"and up in {spec.WIDTH_STEP_NS} ns steps")
    return ns


@dataclass
class _Chunk:
    current: np.ndarray  # float32 [64], NaN where not measured
    voltage: np.ndarray  # float32 [64]


class Instrument:
    """A simulated ArC TWO (see the module docstring); pyarc2.Instrument's interface.

    Beyond pyarc2's ``(port, firmware, init)`` it takes keyword-only model settings:
    ``backend`` (hil URL of the devices), ``mapping`` (socket wiring), ``g_ref`` and
    ``g_scale`` (siemens: G = g_ref + g_scale * w), ``threshold_v`` (switching),
    ``current_noise`` (amperes, the std of each current conversion) and its ``seed``.
    """

    def __init__(self, port: int, firmware: str, init=True, *, backend: str = "sim://",
                 mapping: str = DEFAULT_MAPPING, g_ref: float = 5e-5, g_scale: float = 2.5e-5,
                 threshold_v: float = 1.0, current_noise: float = 0.0, seed: int = 0,
                 tile: str = "crossbar"):
        if _uint(port, "port") not in SIM_PORTS:
            raise ArC2Error(f"Invalid ArC2 device id: {port}")
        if firmware and not Path(firmware).is_file():
            raise ArC2Error(f"cannot load firmware {firmware!r}: no such file")
        if not (g_ref > 0 and g_scale != 0 and threshold_v > 0 and current_noise >= 0):
            raise ValueError("g_ref and threshold_v must be positive, g_scale nonzero, "
                             "current_noise not negative")
        self._noise = float(current_noise)
        self._rng = np.random.default_rng(seed)
        self._clock = InstrumentClock()
        self._map = load_mapping(mapping)
        self._g_ref, self._g_scale, self._threshold = float(g_ref), float(g_scale), threshold_v
        self._backend: Backend = open_backend(backend)
        try:
            self._tile = self._backend.allocate(tile, *self._map.shape)
        except BaseException:
            self._backend.close()
            raise
        self._word_ch = np.array(self._map.words, dtype=np.intp)
        self._bit_ch = np.array(self._map.bits, dtype=np.intp)
        self._queue: list[tuple[int, Callable[[], None]]] = []
        self._g_seen: np.ndarray | None = None
        self._pending = np.zeros(self._map.shape, dtype=np.int32)
        self._dc = np.zeros(CHANNELS)  # DC level of each channel (V)
        self._floating = np.zeros(CHANNELS, dtype=bool)
        self._grounded = np.zeros(CHANNELS, dtype=bool)
        self._ac_grounded = np.zeros(CHANNELS, dtype=bool)
        self._range: list[str] = ["STD"] * CHANNELS
        self._aux: dict[str, float] = {}
        self._selectors: tuple[int, ...] = ()
        self._logic: tuple[int, tuple[str, ...]] = (0, ("OUT",) * 4)
        self._logic_level = "LL3V3" if init else None
        self._control = "Internal"
        self._memory: dict[int, _Chunk] = {}
        self._output: deque[int] = deque()
        self._next_addr = 0x0
        if init:
            self.ground_all().execute()

    # -- model internals ---------------------------------------------------------------
    def _conductance(self) -> np.ndarray:
        """G [words, bits] after everything executed so far (pending pulses applied)."""
        self._apply_pending()
        w = self._tile.read().to(torch.float64).cpu().numpy()
        self._g_seen = np.clip(self._g_ref + self._g_scale * w, 0.0, None)
        return self._g_seen

    def _apply_pending(self) -> None:
        if self._pending.any():
            counts, self._pending = self._pending, np.zeros_like(self._pending)
            self._tile.pulse(torch.from_numpy(counts))

    def _device_volts(self, vch: np.ndarray, floating: np.ndarray) -> np.ndarray:
        """Voltage across each device (wordline minus bitline); 0 on a floating line."""
        vw, vb = vch[self._word_ch], vch[self._bit_ch]
        d = vw[:, None] - vb[None, :]
        dead = floating[self._word_ch][:, None] | floating[self._bit_ch][None, :]
        return np.where(dead, 0.0, d)

    def _stress(self, vch: np.ndarray, floating: np.ndarray | None = None,
                check_current: bool = True) -> None:
        """Channel voltages held for one pulse: switch the devices past the threshold and
        refuse a channel current above the rating."""
        floating = np.zeros(CHANNELS, dtype=bool) if floating is None else floating
        d = self._device_volts(vch, floating)
        if check_current:
            self._check_current(d)
        delta = (d >= self._threshold).astype(np.int32) - (d <= -self._threshold)
        if not delta.any():
            return
        if np.any(self._pending * delta < 0):  # a device reverses: apply what it had first
            self._apply_pending()
        self._pending += delta

    def _check_current(self, d: np.ndarray) -> None:
        """Refuse a channel current over the rating (conductances as last measured, so that
        the check draws no read of its own)."""
        if self._g_seen is None:
            self._conductance()
        amps = np.abs(self._g_seen * d)
        worst_w, worst_b = amps.sum(axis=1), amps.sum(axis=0)
        if max(worst_w.max(), worst_b.max()) > spec.MAX_CHANNEL_CURRENT_A:
            i = int(np.argmax(worst_w)) if worst_w.max() >= worst_b.max() else None
            line = (f"wordline {i} (channel {self._map.words[i]})" if i is not None else
                    f"bitline {int(np.argmax(worst_b))} "
                    f"(channel {self._map.bits[int(np.argmax(worst_b))]})")
            self._queue.clear()
            raise ArC2Error(f"{line} would carry {max(worst_w.max(), worst_b.max()):.3g} A, "
                            f"over the {spec.MAX_CHANNEL_CURRENT_A:g} A channel rating")

    def _measure(self, vch: np.ndarray, measured: Iterable[int],
                 floating: np.ndarray | None = None) -> np.ndarray:
        """Currents (float32 [64], NaN where not measured) flowing from each measured channel
        into the array while the channels sit at ``vch``."""
        floating = np.zeros(CHANNELS, dtype=bool) if floating is None else floating
        d = self._device_volts(vch, floating)
        g = self._conductance()
        self._check_current(d)
        out = np.full(CHANNELS, np.nan)
        into = np.zeros(CHANNELS)
        into[self._word_ch] = (g * d).sum(axis=1)
        into[self._bit_ch] = -(g * d).sum(axis=0)
        idx = np.fromiter((int(c) for c in measured), dtype=np.intp)
        out[idx] = into[idx]
        if self._noise:  # the instrument's own current noise, per conversion
            out[idx] += self._noise * self._rng.standard_normal(idx.size)
        if np.any(np.abs(d) >= self._threshold):  # a read at a switching voltage disturbs
            self._stress(vch, floating, check_current=False)
        return out.astype(np.float32)

    def _read_volts(self, low: int, highs: Iterable[int], vread: float) -> np.ndarray:
        """Channel voltages of a read: the low channel at -vread, every other one at 0."""
        v = np.zeros(CHANNELS)
        v[low] = -vread
        return v

    def _slice_read(self, low: int, highs: np.ndarray, vread: float) -> np.ndarray:
        self._run_queue()
        self._clock.ns += spec.read_ns() + spec.USB_WRITE_NS + spec.USB_READ_NS
        return self._measure(self._read_volts(low, highs, vread), highs.tolist())

    def _queue_op(self, ns: int, fn: Callable[[], None]) -> None:
        self._queue.append((int(ns), fn))

    def _run_queue(self) -> None:
        """Execute the buffered commands in order (the FIFO), then settle pending pulses."""
        queue, self._queue = self._queue, []
        try:
            for ns, fn in queue:
                self._clock.ns += ns
                fn()
        finally:  # what ran before a refused command happened
            self._apply_pending()

    def _pulse_volts(self, pairs: list[tuple[int, int]], voltage: float) -> np.ndarray:
        """Differential pulse: each high channel at +V/2, each low at -V/2, the rest at 0."""
        v = np.zeros(CHANNELS)
        for low, high in pairs:
            v[high] = voltage / 2
            v[low] = -voltage / 2
        return v

    def _queue_pulse(self, pairs: list[tuple[int, int]], voltage: float, nanos: int) -> None:
        vch = self._pulse_volts(pairs, voltage)
        self._queue_op(spec.pulse_ns(nanos), lambda: self._stress(vch) if nanos else None)

    def _chunk(self, current: np.ndarray) -> int:
        addr = self._next_addr
        self._next_addr += 256
        self._memory[addr] = _Chunk(current, self._held()[0].astype(np.float32))
        return addr

    def _defer_read(self, fn: Callable[[], np.ndarray], ns: int) -> None:
        """A read that fills a result chunk when it executes (generate_* and *_deferred)."""
        def run() -> None:
            self._apply_pending()
            self._output.append(self._chunk(fn()))
        self._queue_op(ns, run)

    @staticmethod
    def _slice_lines(chan: int) -> tuple[int, ...]:
        """The lines a slice with ``chan`` as the low channel reads (libarc2's rule)."""
        return WORD_CHANNELS if chan in _BIT_SET else BIT_CHANNELS

    def _select(self, data: np.ndarray, chans: tuple[int, ...]) -> np.ndarray:
        return np.ascontiguousarray(data[list(chans)], dtype=np.float32)

    # -- buffer and state ----------------------------------------------------------------
    @_api
    def delay(self, /, nanos):
        ns = _uint(nanos, "nanos")

        def hold() -> None:  # a held bias past the threshold switches like a pulse
            v, floating = self._held()
            if np.any(np.abs(self._device_volts(v, floating)) >= self._threshold):
                self._stress(v, floating)
        self._queue_op(max(ns, 320), hold)
        return self

    @_api
    def execute(self, /):
        self._clock.ns += spec.USB_WRITE_NS
        self._run_queue()
        return self

    @_api
    def busy(self, /):
        """Whether the instrument's FIFO still holds commands: never, here, as execute()
        runs them (and charges their time to the clock) before it returns; commands only
        queued on the host are not in the FIFO yet."""
        self._clock.ns += spec.USB_READ_NS  # one poll of the FIFO flag
        return False

    @_api
    def wait(self, /):
        self._clock.ns += spec.USB_READ_NS
        return None

    def _set_dc(self, levels: dict[int, float], base: float | None = None,
                float_others: bool = False) -> None:
        if base is not None:
            self._dc[:] = base
            self._floating[:] = False
        for c, v in levels.items():
            self._dc[c] = v
            self._floating[c] = False
        if float_others:
            self._floating[:] = True

    @_api
    def ground_all(self, /):
        def run() -> None:
            self._dc[:] = 0.0
            self._floating[:] = False
        self._queue_op(2 * spec.INSTRUCTION_NS, run)
        return self

    @_api
    def ground_all_fast(self, /):
        def run() -> None:
            self._dc[:] = 0.0
        self._queue_op(spec.INSTRUCTION_NS, run)
        return self

    @_api
    def float_all(self, /):
        def run() -> None:
            self._floating[:] = True
        self._queue_op(spec.INSTRUCTION_NS, run)
        return self

    def _set_mask(self, mask: np.ndarray, chans: Iterable[int] | np.ndarray, mode: str) -> None:
        arr = _channels(chans).astype(np.intp)

        def run() -> None:
            if mode == "set":
                mask[:] = False
            mask[arr] = mode != "remove"
        self._queue_op(spec.INSTRUCTION_NS, run)

    @_api
    def connect_to_gnd(self, chans):
        self._set_mask(self._grounded, chans, "set")
        return self

    @_api
    def gnd_add(self, chans):
        self._set_mask(self._grounded, chans, "add")
        return self

    @_api
    def gnd_remove(self, chans):
        self._set_mask(self._grounded, chans, "remove")
        return self

    @_api
    def connect_to_ac_gnd(self, chans):
        self._set_mask(self._ac_grounded, chans, "set")
        return self

    @_api
    def gnd_ac_add(self, chans):
        self._set_mask(self._ac_grounded, chans, "add")
        return self

    @_api
    def gnd_ac_remove(self, chans):
        self._set_mask(self._ac_grounded, chans, "remove")
        return self

    @_api
    def open_channels(self, /, channels):
        arr = _channels(channels).astype(np.intp)

        def run() -> None:
            self._floating[arr] = True
        self._queue_op(spec.INSTRUCTION_NS, run)
        return self

    @_api
    def config_channels(self, /, input, base=None):  # noqa: A002 - pyarc2's name
        levels = {_channel(c): _volts(v, f"channel {c} voltage") for c, v in input}
        b = None if base is None else _volts(base, "base voltage")
        self._queue_op(spec.INSTRUCTION_NS * (2 + len(levels) // 4) + spec.DAC_SETTLE_NS,
                       lambda: self._set_dc(levels, b))
        return self

    @_api
    def config_aux_channels(self, /, voltages):
        levels = {_variant(fn, AuxDACFn): _volts(v, "aux voltage") for fn, v in voltages}
        self._queue_op(spec.INSTRUCTION_NS * 2, lambda: self._aux.update(levels))
        return self

    @_api
    def config_selectors(self, /, selectors):
        sel = tuple(_uint(s, "selector") for s in selectors)
        if any(s > 31 for s in sel):
            raise ArC2Error("selectors are 0..31")

        def run() -> None:
            self._selectors = sel
        self._queue_op(spec.INSTRUCTION_NS, run)
        return self

    @_api
    def set_control_mode(self, /, mode):
        name = _variant(mode, ControlMode)

        def run() -> None:
            self._control = name
        self._queue_op(spec.INSTRUCTION_NS, run)
        return self

    @_api
    def set_logic(self, mask, cl0=None, cl1=None, cl2=None, cl3=None):
        dirs = tuple("OUT" if c is None else _variant(c, IODir) for c in (cl0, cl1, cl2, cl3))
        m = _uint(mask, "mask")

        def run() -> None:
            self._logic = (m, dirs)
        self._queue_op(spec.INSTRUCTION_NS, run)
        return self

    @_api
    def set_logic_level(self, /, level):
        name = _variant(level, LogicLevel)

        def run() -> None:
            self._logic_level = name
        self._queue_op(2 * spec.INSTRUCTION_NS, run)
        return self

    @_api
    def set_channel_range(self, chans, rng):
        name = _variant(rng, OutputRange)
        arr = _channels(chans).astype(np.intp)

        def run() -> None:
            for c in arr:
                self._range[c] = name
        self._queue_op(spec.INSTRUCTION_NS, run)
        return self

    # -- reads -----------------------------------------------------------------------------
    @_api
    def read_one(self, /, low, high, vread):
        lo, hi, v = _channel(low), _channel(high), _volts(vread, "vread")
        return float(self._slice_read(lo, np.array([hi]), v)[hi])

    @_api
    def read_slice(self, /, chan, vread):
        lo, v = _channel(chan), _volts(vread, "vread")
        lines = self._slice_lines(lo)
        return self._select(self._slice_read(lo, np.array(lines), v), lines)

    @_api
    def read_slice_masked(self, chan, mask, vread):
        lo, highs, v = _channel(chan), _channels(mask), _volts(vread, "vread")
        return self._select(self._slice_read(lo, highs, v), self._slice_lines(lo))

    @_api
    def read_all(self, /, vread, order):
        v = _volts(vread, "vread")
        lows = WORD_CHANNELS if _variant(order, BiasOrder) == "Rows" else BIT_CHANNELS
        rows = [self._select(self._slice_read(lo, np.array(self._slice_lines(lo)), v),
                             self._slice_lines(lo)) for lo in lows]
        return np.stack(rows).reshape(32, 32)

    def _held(self) -> tuple[np.ndarray, np.ndarray]:
        """The DC state: each channel's voltage (0 where hard-grounded) and which float."""
        return np.where(self._grounded, 0.0, self._dc), self._floating & ~self._grounded

    def _open_read(self, highs: np.ndarray) -> np.ndarray:
        v, floating = self._held()
        return self._measure(v, highs.tolist(),
                             floating & ~np.isin(np.arange(CHANNELS), highs.astype(np.intp)))

    @_api
    def read_slice_open(self, highs, ground_after):
        hs = _channels(highs)
        self._run_queue()
        self._clock.ns += (spec.read_ns() + spec.USB_WRITE_NS + spec.USB_READ_NS
                           + (spec.GROUND_SETTLE_NS if ground_after in (None, True) else 0))
        out = self._open_read(hs)
        if ground_after in (None, True):
            self._dc[hs.astype(np.intp)] = 0.0
        return out

    @_api
    def read_slice_open_deferred(self, highs, ground_after):
        hs = _channels(highs)
        self._defer_read(lambda: self._open_read(hs), spec.read_ns())
        return self

    @_api
    def vread_channels(self, chans, averaging):
        cs = sorted(int(c) for c in _channels(chans))
        self._run_queue()
        self._clock.ns += (spec.INSTRUCTION_NS + (32 if averaging else 1) * spec.ADC_NS
                           + spec.USB_WRITE_NS + spec.USB_READ_NS)
        v, floating = self._held()
        return [float(np.float32(0.0 if floating[c] else v[c])) for c in cs]

    @_api
    def vread_channels_deferred(self, chans, averaging):
        cs = _channels(chans).astype(np.intp)

        def volts() -> np.ndarray:
            out = np.full(CHANNELS, np.nan)
            v, floating = self._held()
            out[cs] = np.where(floating[cs], 0.0, v[cs])
            return out.astype(np.float32)
        self._defer_read(volts, spec.INSTRUCTION_NS + (32 if averaging else 1) * spec.ADC_NS)
        return self

    # -- pulses ----------------------------------------------------------------------------
    @_api
    def pulse_one(self, /, low, high, voltage, nanos):
        lo, hi = _channel(low), _channel(high)
        self._queue_pulse([(lo, hi)], _volts(voltage, "voltage"), _width(nanos))
        return self

    @_api
    def pulse_slice(self, /, chan, voltage, nanos):
        lo = _channel(chan)
        self._queue_pulse([(lo, h) for h in self._slice_lines(lo)], _volts(voltage, "voltage"),
                          _width(nanos))
        return self

    @_api
    def pulse_slice_masked(self, chan, voltage, nanos, mask):
        lo, highs = _channel(chan), _channels(mask)
        self._queue_pulse([(lo, int(h)) for h in highs], _volts(voltage, "voltage"),
                          _width(nanos))
        return self

    @_api
    def pulse_slice_fast_open(self, /, chans, cl_nanos, preset_state):
        if len(cl_nanos) != 8:
            raise ValueError("Need 8 arguments for cluster timings")
        timings = [None if t is None else _width(t) for t in cl_nanos]
        v = np.zeros(CHANNELS)
        for c, vpulse, _vnormal in chans:
            c = _channel(c)
            if timings[c // 8] is None:
                raise ArC2Error(f"channel {c} is pulsed but cluster {c // 8} has no timing")
            v[c] = _volts(vpulse, f"channel {c} pulse voltage")
        longest = max((t for t in timings if t is not None), default=0)
        self._queue_op(spec.pulse_ns(longest), lambda: self._stress(v) if longest else None)
        return self

    @_api
    def pulse_all(self, /, voltage, nanos, order):
        v, ns = _volts(voltage, "voltage"), _width(nanos)
        lows = WORD_CHANNELS if _variant(order, BiasOrder) == "Rows" else BIT_CHANNELS
        for lo in lows:
            self._queue_pulse([(lo, h) for h in self._slice_lines(lo)], v, ns)
        return self

    @_api
    def pulseread_one(self, /, low, high, vpulse, nanos, vread):
        lo, hi, rv = _channel(low), _channel(high), _volts(vread, "vread")
        self._queue_pulse([(lo, hi)], _volts(vpulse, "vpulse"), _width(nanos))
        return float(self._slice_read(lo, np.array([hi]), rv)[hi])

    @_api
    def pulseread_slice(self, /, chan, vpulse, nanos, vread):
        lo, rv = _channel(chan), _volts(vread, "vread")
        lines = self._slice_lines(lo)
        self._queue_pulse([(lo, h) for h in lines], _volts(vpulse, "vpulse"), _width(nanos))
        return self._select(self._slice_read(lo, np.array(lines), rv), lines)

    @_api
    def pulseread_slice_masked(self, chan, mask, vpulse, nanos, vread):
        lo, highs, rv = _channel(chan), _channels(mask), _volts(vread, "vread")
        self._queue_pulse([(lo, int(h)) for h in highs], _volts(vpulse, "vpulse"),
                          _width(nanos))
        return self._select(self._slice_read(lo, highs, rv), self._slice_lines(lo))

    @_api
    def pulseread_all(self, /, vpulse, nanos, vread, order):
        vp, ns, rv = _volts(vpulse, "vpulse"), _width(nanos), _volts(vread, "vread")
        lows = WORD_CHANNELS if _variant(order, BiasOrder) == "Rows" else BIT_CHANNELS
        rows = []
        for lo in lows:
            lines = self._slice_lines(lo)
            self._queue_pulse([(lo, h) for h in lines], vp, ns)
            rows.append(self._select(self._slice_read(lo, np.array(lines), rv), lines))
        return np.stack(rows).reshape(32, 32)

    # -- long operations and the output buffer -------------------------------------------
    @_api
    def generate_ramp(self, /, low, high, vstart, vstep, vstop, pw_nanos, inter_nanos,
                      num_pulses, read_at, read_after):
        lo, hi = _channel(low), _channel(high)
        v0, dv, v1 = (_volts(x, n) for x, n in ((vstart, "vstart"), (vstep, "vstep"),
                                                 (vstop, "vstop")))
        pw, gap, n = _width(pw_nanos), _uint(inter_nanos, "inter_nanos"), _uint(
            num_pulses, "num_pulses")
        at, after = _variant(read_at, ReadAt), _variant(read_after, ReadAfter)
        if dv == 0 or (v1 - v0) * dv < 0:
            raise ArC2Error(f"inconsistent ramp {v0:g} -> {v1:g} in steps of {dv:g}")
        steps = int(math.floor((v1 - v0) / dv + 1e-6)) + 1
        voltages = [v0 + k * dv for k in range(steps)]

        def read_at_volts(vp: float) -> float:
            return vp if at == "Bias" else read_at.voltage()

        do_read = at != "Never" and after != "Never"
        for k, vp in enumerate(voltages):
            for p in range(n):
                self._queue_pulse([(lo, hi)], vp, pw)
                if gap:
                    self._queue_op(gap, lambda: None)
                last_in_block, last = p == n - 1, p == n - 1 and k == len(voltages) - 1
                if do_read and (after == "Pulse" or (after == "Block" and last_in_block)
                                or (after == "Ramp" and last)):
                    rv = read_at_volts(vp)
                    self._defer_read(
                        lambda rv=rv: self._measure(self._read_volts(lo, [hi], rv), [hi]),
                        spec.read_ns())
        return self

    @_api
    def generate_read_train(self, lows, highs, vread, nreads, inter_nanos, ground):
        ls = None if lows is None else _channels(lows)
        hs, v = _channels(highs), _volts(vread, "vread")
        n, gap = _uint(nreads, "nreads"), _uint(inter_nanos, "inter_nanos")

        def one() -> np.ndarray:
            if ls is None:
                return self._open_read(hs)
            volts = np.zeros(CHANNELS)
            volts[ls.astype(np.intp)] = -v
            return self._measure(volts, hs.tolist())
        for _ in range(n):
            self._defer_read(one, spec.read_ns() + gap)
        if ground:
            self.ground_all_fast()
        return self

    @_api
    def generate_vread_train(self, chans, averaging, npulses, inter_nanos):
        for _ in range(_uint(npulses, "npulses")):
            self.vread_channels_deferred(chans, averaging)
            self._clock.calls["vread_channels_deferred"] -= 1  # internal, not a host call
            if inter_nanos:
                self._queue_op(_uint(inter_nanos, "inter_nanos"), lambda: None)
        return self

    @_api
    def read_train(self, /, low, high, vread, interpulse, preload, condition):
        lo, hi, v = _channel(low), _channel(high), _volts(vread, "vread")
        gap = max(_uint(interpulse, "interpulse"), 1)
        if preload is not None:
            _volts(preload, "preload")
        kind = _variant(condition, WaitFor)
        amount = _wait_amount(condition)
        n = amount if kind == "Iterations" else amount * (1_000_000 if kind == "Millis"
                                                             else 1) // gap
        for _ in range(max(int(n), 1)):
            self._defer_read(lambda: self._measure(self._read_volts(lo, [hi], v), [hi]),
                             spec.read_ns() + gap)
        self.execute()
        self._clock.calls["execute"] -= 1
        return None

    def _take(self, addr: int, rtype: str) -> np.ndarray:
        try:
            chunk = self._memory.pop(addr)
        except KeyError:
            raise ArC2Error(f"Memory error: no result at address {addr:#x}") from None
        return chunk.current if rtype == "Current" else chunk.voltage

    @_api
    def pick_one(self, /, mode, rtype):
        m, r = _variant(mode, DataMode), _variant(rtype, ReadType)
        self._clock.ns += spec.USB_READ_NS
        if not self._output:
            return None
        data = self._take(self._output.popleft(), r)
        chans = {"All": tuple(range(CHANNELS)), "Words": WORD_CHANNELS, "Bits": BIT_CHANNELS}[m]
        return self._select(data, chans)

    def _array_iter_inner(self, mode: DataMode, rtype: ReadType) -> list[np.ndarray] | None:
        data = self.pick_one(mode, rtype)
        return None if data is None else [data]

    @_api
    def get_iter(self, mode, rtype=None):
        rtype = ReadType.Current if rtype is None else rtype
        return iter(functools.partial(self._array_iter_inner, mode, rtype), None)

    def _peek(self, addr: int) -> _Chunk:
        self._clock.ns += spec.USB_READ_NS
        if addr not in self._memory:
            raise ArC2Error(f"Memory error: no result at address {addr:#x}")
        return self._memory[addr]

    @_api
    def currents_from_address(self, addr, chans):
        cs = _channels(chans).astype(np.intp)
        out = np.full(CHANNELS, np.nan, dtype=np.float32)
        out[cs] = self._peek(_uint(addr, "addr")).current[cs]
        return out

    @_api
    def word_currents_from_address(self, /, addr):
        return self._select(self._peek(_uint(addr, "addr")).current, WORD_CHANNELS)

    @_api
    def bit_currents_from_address(self, /, addr):
        return self._select(self._peek(_uint(addr, "addr")).current, BIT_CHANNELS)

    @_api
    def finalise_operation(self, mode=None, control=None):
        idle = mode.name if isinstance(mode, Enum) and type(mode).__name__ == "IdleMode" \
            else mode  # this module's IdleMode or pyarc2's
        if idle == "Float":
            self.connect_to_gnd([]).ground_all_fast().float_all().execute()
        elif idle == "SoftGnd":
            self.connect_to_gnd([]).ground_all().execute()
        elif idle == "HardGnd":
            self.ground_all_fast().float_all().connect_to_gnd(range(CHANNELS)).execute()
        elif mode is not None:
            raise ArC2Error("Invalid idle mode")
        if control is None:
            return None
        if _variant(control, ControlMode) not in ("Header", "Internal"):
            raise ArC2Error("Invalid control mode")
        self.set_control_mode(control)
        return None


def close(instrument: Instrument) -> None:
    """Release the simulated instrument's backend (a real one is released by dropping it)."""
    instrument._backend.close()


def clock(instrument: Instrument) -> InstrumentClock:
    """The modelled instrument clock and the per-method call counts of ``instrument``."""
    return instrument._clock
