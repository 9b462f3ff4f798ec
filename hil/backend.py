"""The backend contract: named tiles of devices with read and pulse (of the whole tile, or
of a column range: defaults built on the whole-tile operations), optional MVM (of one tile,
or of a weighted sum of tiles read as one array) and rank-1 update, algorithm steps (the
unit of the per-step pulse budget), and a URL-scheme registry so the core never imports a
backend package."""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points

import numpy as np
import torch

from hil.errors import BackendError, BackendURLError, NonFiniteError, UnsupportedOperation
from hil.url import BackendURL


def check_finite(value: torch.Tensor | np.ndarray | float, what: str, *,
                 tile: str | None = None, op: str | None = None) -> None:
    """Raise NonFiniteError when ``value`` (a number, tensor or array) holds NaN or inf.

    Every value that becomes pulses passes here before any byte leaves the host:
    gradients, layer inputs and errors, rates, programming targets."""
    if isinstance(value, torch.Tensor):
        # one reduction: a sum is finite only if every element is (NaN and inf propagate);
        # a non-finite sum of finite values (overflow) falls back to the element check
        ok = not value.is_floating_point() or bool(torch.isfinite(value.sum())) or \
            bool(torch.isfinite(value).all())
    elif isinstance(value, np.ndarray):
        ok = bool(np.isfinite(value).all()) if value.dtype.kind in "fc" else True
    else:
        try:
            ok = math.isfinite(value)
        except TypeError:
            raise NonFiniteError(f"{what} must be a number, got {type(value).__name__}",
                                 tile=tile, op=op) from None
    if not ok:
        raise NonFiniteError(f"{what} is not finite (NaN or inf)", tile=tile, op=op)


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares it can do; controllers never guess."""

    mvm: bool = False
    outer_update: bool = False
    allocate: bool = True
    max_pulses_per_command: int = 2**31 - 1
    device: str = "cpu"
    snapshot: bool = False  # state_dict()/load_state_dict() restore the devices (emulators)
    mvm_sum: bool = False  # Backend.mvm_sum: a weighted sum of tiles read as one array
    # the most pulses one algorithm step (Backend.step) may apply to any one device, summed
    # over all the commands of the step; None: no budget (an emulator)
    max_pulses_per_step: int | None = None


class Tile(ABC):
    """A rows x cols array of devices, read and written in weight units."""

    def __init__(self, backend: Backend, name: str, rows: int, cols: int, dw_min: float):
        self.backend = backend
        self.name = name
        self.shape = (int(rows), int(cols))
        self.dw_min = float(dw_min)  # nominal weight change of one pulse

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @abstractmethod
    def read(self) -> torch.Tensor:
        """Return the weights as float32 [rows, cols] (with the backend's read noise)."""

    @abstractmethod
    def _pulse(self, n: torch.Tensor) -> None:
        """Apply validated signed pulse counts (int32 [rows, cols], on this backend's device)."""

    def pulse(self, n: torch.Tensor) -> None:
        """Apply signed integer pulse counts per device: + potentiates, - depresses, 0 nothing."""
        self._pulse(self.check_pulses(n))

    def pulse_read(self, schedule: Sequence[torch.Tensor]) -> torch.Tensor:
        """For each pulse-count map of ``schedule``: pulse it (an all-zero map pulses
        nothing), then read; the reads stacked [T, rows, cols]. This default loops over
        :meth:`pulse` and :meth:`read`; an instrument station overrides it to run each
        device's whole schedule while that device is routed (one route, not two per step)."""
        out = []
        for n in schedule:
            if bool(torch.as_tensor(n).any()):
                self.pulse(n)
            out.append(self.read())
        return torch.stack(out) if out else torch.empty((0, *self.shape))

    def estimate_seconds(self, reads: int = 0, pulses: int = 0, pulse_reads: int = 0,
                         count: int = 1, calls: int = 1) -> float | None:
        """Instrument seconds of ``reads`` whole-tile reads, ``pulses`` whole-tile pulse maps
        of ``count`` on every device and ``pulse_reads`` steps of :meth:`pulse_read` split
        into ``calls`` calls; None (this default) where operations take no instrument time
        worth planning (emulators)."""
        return None

    def read_columns(self, cols: slice) -> torch.Tensor:
        """The columns ``cols`` of :meth:`read`, [rows, width] (a column transfer needs one).
        This default reads the whole tile; a backend that can read fewer devices overrides it."""
        first, width = self.column_range(cols)
        return self.read()[:, first:first + width]

    def pulse_columns(self, n: torch.Tensor, cols: slice) -> None:
        """Pulse counts [rows, width] for the columns ``cols`` only (the others get none).
        This default pads them to the whole tile for :meth:`pulse`; a backend that can
        address a column range overrides it (same result)."""
        first, width = self.column_range(cols)
        n = self.check_pulses(n, (self.shape[0], width))
        full = torch.zeros(self.shape, dtype=torch.int32, device=n.device)
        full[:, first:first + width] = n
        self.pulse(full)

    def column_range(self, cols: slice) -> tuple[int, int]:
        """(first, width) of a contiguous, non-empty column slice of this tile."""
        if not isinstance(cols, slice) or cols.step not in (None, 1):
            raise BackendError(f"columns must be a contiguous slice, got {cols!r}",
                               tile=self.name, op="columns")
        first, stop, _ = cols.indices(self.shape[1])
        if stop <= first:
            raise BackendError(f"empty column range {cols!r} of {self.shape[1]} columns",
                               tile=self.name, op="columns")
        return first, stop - first

    def check_pulses(self, n: torch.Tensor, shape: tuple[int, int] | None = None
                     ) -> torch.Tensor:
        """Validate a pulse-count map (of the tile, or of ``shape``) and return it as int32
        on the backend's device."""
        return self._checked_pulses(n, shape)[0]

    def _checked_pulses(self, n: torch.Tensor, shape: tuple[int, int] | None = None
                        ) -> tuple[torch.Tensor, int]:
        """:meth:`check_pulses` and the largest |count| it found (0: no pulse at all)."""
        if not isinstance(n, torch.Tensor):
            raise BackendError("pulse counts must be a torch.Tensor", tile=self.name, op="pulse")
        if n.dtype.is_floating_point or n.dtype.is_complex or n.dtype == torch.bool:
            raise BackendError(
                f"pulse counts must be an integer tensor, got {n.dtype}", tile=self.name, op="pulse"
            )
        want = self.shape if shape is None else tuple(shape)
        if tuple(n.shape) != want:
            raise BackendError(
                f"pulse counts have shape {tuple(n.shape)}, "
                + (f"tile is {self.shape}" if shape is None else f"columns take {want}"),
                tile=self.name, op="pulse",
            )
        limit = self.backend.capabilities.max_pulses_per_command
        biggest = 0
        if n.numel():
            lo, hi = torch.aminmax(n)  # one read pass, no temporary |n|
            biggest = max(-int(lo), int(hi))
            if biggest > limit:
                raise BackendError(
                    f"pulse count {biggest} exceeds {limit} per command",
                    tile=self.name, op="pulse",
                )
        return n.to(device=self.backend.capabilities.device, dtype=torch.int32), biggest

    def mvm(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Analog MVM: x [B, cols] -> [B, rows]; transpose: [B, rows] -> [B, cols]."""
        raise UnsupportedOperation("backend has no analog MVM", tile=self.name, op="mvm")

    def check_update(self, x: torch.Tensor, d: torch.Tensor, lr: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the operands of :meth:`outer_update`: finite x, d and lr, one batch of
        [B, cols] inputs and [B, rows] errors; returns them as 2-d float32 tensors."""
        rows, cols = self.shape
        check_finite(float(lr), "outer_update learning rate", tile=self.name, op="outer_update")
        x = x.detach().reshape(-1, cols).to(torch.float32)
        d = d.detach().reshape(-1, rows).to(torch.float32)
        if x.shape[0] != d.shape[0]:
            raise BackendError("outer_update: x and d have different batch sizes",
                               tile=self.name, op="outer_update")
        check_finite(x, "outer_update input x", tile=self.name, op="outer_update")
        check_finite(d, "outer_update error d", tile=self.name, op="outer_update")
        return x, d

    def outer_update(self, x: torch.Tensor, d: torch.Tensor, lr: float) -> None:
        """Stochastic pulse-train rank-1 update aiming at W += lr * sum_b d_b x_b^T
        (a backend that has one validates its operands with :meth:`check_update`)."""
        raise UnsupportedOperation(
            "backend has no parallel rank-1 update", tile=self.name, op="outer_update"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.shape[0]}x{self.shape[1]}>"


class Backend(ABC):
    """A set of named tiles behind one URL; a context manager whose close() makes outputs safe."""

    capabilities: Capabilities = Capabilities()

    def __init__(self, url: str):
        self.url = url
        self._tiles: dict[str, Tile] = {}
        self.closed = False

    @abstractmethod
    def _allocate(self, name: str, rows: int, cols: int) -> Tile:
        """Create the tile (backend-specific)."""

    def allocate(self, name: str, rows: int, cols: int) -> Tile:
        """Reserve a new rows x cols tile under ``name``. A backend whose devices outlive
        the process (a chip) re-attaches a tile of that name and shape left by an earlier
        session instead (its devices keep their state)."""
        self._check_open("allocate", name)
        if name in self._tiles:
            raise BackendError("tile already allocated", tile=name, op="allocate")
        if int(rows) < 1 or int(cols) < 1:
            raise BackendError(f"bad tile shape {rows}x{cols}", tile=name, op="allocate")
        tile = self._allocate(name, int(rows), int(cols))
        self._tiles[name] = tile
        return tile

    def tile(self, name: str) -> Tile:
        """Return the tile called ``name``."""
        self._check_open("tile", name)
        try:
            return self._tiles[name]
        except KeyError:
            known = ", ".join(sorted(self._tiles)) or "none"
            raise BackendError(f"no such tile (known: {known})", tile=name, op="tile") from None

    def tiles(self) -> dict[str, Tile]:
        return dict(self._tiles)

    def _check_open(self, op: str, name: str | None = None) -> None:
        if self.closed:
            raise BackendError("backend is closed", tile=name, op=op)

    @contextmanager
    def step(self) -> Iterator[None]:
        """Mark one algorithm step: every pulse command sent inside the block belongs to it.

        A driver bounds what one step may apply to each device, summed over all the
        commands the step is split into (``capabilities.max_pulses_per_step``, from the
        station profile), and refuses a command past it before sending anything. Steps
        nest: an inner ``step()`` joins the outer one. The algorithms, layers and the
        optimizer enter it around each update; this default (an emulator) does nothing."""
        yield

    def estimate_seconds(self, job: Callable[[Backend], object]) -> float | None:
        """Instrument seconds ``job(backend)`` would take here, measured by running it on a
        simulated copy of this backend's instruments (nothing reaches the real ones); None
        (this default) where there is no instrument time to plan (emulators)."""
        return None

    def mvm_sum(self, terms: Sequence[tuple[Tile, float]], x: torch.Tensor,
                transpose: bool = False) -> torch.Tensor:
        """Analog MVM of the weighted sum of tiles sum_k c_k W_k (same shape) as one array:
        the tiles' outputs are combined before one ADC (one output noise, one quantization),
        where ``tile.mvm`` per term would convert each tile's output on its own."""
        raise UnsupportedOperation("backend cannot read a weighted sum of tiles in one MVM",
                                   op="mvm_sum")

    def state_dict(self) -> dict[str, object]:
        """Device state for checkpoints (emulators only: a real chip keeps its own state)."""
        raise UnsupportedOperation("backend cannot snapshot its devices", op="state_dict")

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the device state saved by :meth:`state_dict`."""
        raise UnsupportedOperation("backend cannot restore its devices", op="load_state_dict")

    def close(self) -> None:
        """Release the backend; drivers set instrument outputs safe here."""
        self.closed = True

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def claim_tile(backend: Backend, name: str, shape: tuple[int, int], *,
               exclusive: bool = False) -> Tile:
    """The backend's tile ``name`` where it already holds one of this shape (a chip keeps
    its tiles across sessions: the tiles ``hil characterize --config`` calibrated are the
    ones the job trains on), else a newly allocated one. ``exclusive`` (an algorithm's
    tiles): a tile another algorithm of this session claimed is refused, so two layers
    never share one."""
    tile = backend.tiles().get(name)
    if tile is None:
        tile = backend.allocate(name, *shape)
    elif exclusive and getattr(tile, "claimed", False):
        raise BackendError("tile already allocated (claimed by another algorithm)",
                           tile=name, op="allocate")
    if tile.shape != tuple(shape):
        raise BackendError(f"tile exists with shape {tile.shape}, the job needs "
                           f"{tuple(shape)}", tile=name, op="allocate")
    if exclusive:
        tile.claimed = True
    return tile

BackendFactory = Callable[[BackendURL], Backend]
_REGISTRY: dict[str, BackendFactory | str] = {}


def register_backend(scheme: str, factory: BackendFactory | str) -> None:
    """Register a backend factory (or a lazy 'module:function' path) for a URL scheme."""
    _REGISTRY[scheme.lower()] = factory


def _resolve(scheme: str) -> BackendFactory:
    target = _REGISTRY.get(scheme)
    if target is None:
        for ep in entry_points(group="hil.backends"):
            if ep.name == scheme:
                target = ep.value
                break
    if target is None:
        known = sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group="hil.backends")})
        raise BackendURLError(f"unknown backend scheme {scheme!r} (known: {', '.join(known)})")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
        _REGISTRY[scheme] = target
    return target


def open_backend(url: str) -> Backend:
    """Open the backend behind ``url``; use it as a context manager so close() always runs."""
    parsed = BackendURL.parse(url)
    backend = _resolve(parsed.scheme)(parsed)
    try:
        parsed.finish()
    except BackendURLError:
        backend.close()
        raise
    return backend


def check_backend_url(url: str) -> None:
    """Check ``url`` without opening it: its syntax and scheme, and its parameters where the
    scheme's factory offers a ``check`` (a callable on the parsed URL that builds nothing;
    the emulator has one). Raises BackendURLError."""
    parsed = BackendURL.parse(url)
    check = getattr(_resolve(parsed.scheme), "check", None)
    if check is not None:
        check(parsed)
        parsed.finish()


# Schemes shipped with analog-hil, resolved lazily (also declared as entry points).
for _scheme, _target in {
    "sim": "sim_backend:open_sim",
    "twin": "calibration.twin:open_twin",
    "visa": "drivers.visa_backend:open_visa",
    "serial": "drivers.serial_backend:open_serial",
    "station": "drivers.station.url:open_station",
    "arc2": "drivers.arc2.backend:open_arc2",
}.items():
    register_backend(_scheme, _target)
