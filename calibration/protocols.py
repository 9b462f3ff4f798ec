"""Measurement protocols on any backend tile, through read() and pulse() only.

- pulse-response sweep: n pulses up then n down, for several cycles, a read after
  every ``read_every`` pulses;
- symmetric-point search: alternating +1 / -1 pulses; the device settles where q+ = q-;
- read noise: repeated reads without pulses.
Every protocol hands its reads to a :class:`MeasurementWriter` block by block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from calibration.measfile import MeasurementWriter
from hil.backend import Backend, Tile, claim_tile

Advance = Callable[[int], None]


@dataclass(frozen=True)
class SweepProtocol:
    """Parameters of a characterization run (stored in the measurement file)."""

    pulses: int = 400  # pulses per direction
    cycles: int = 2
    read_every: int = 1  # pulses between reads
    block: int = 50  # reads per block written to the file
    sympoint_pairs: int = 200  # alternating up/down pairs of the symmetric-point search
    noise_reads: int = 20  # repeated reads of the read-noise estimate

    def __post_init__(self) -> None:
        for name in ("pulses", "cycles", "read_every", "block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.sympoint_pairs < 0 or self.noise_reads < 0:
            raise ValueError("sympoint_pairs and noise_reads must be >= 0")
        if self.pulses % self.read_every:
            raise ValueError("pulses must be a multiple of read_every")

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def n_reads(self) -> int:
        """Reads one tile takes over all protocols (for progress bars)."""
        sweep = 2 * self.cycles * self.pulses // self.read_every + 1
        return sweep + (2 * self.sympoint_pairs + 1 if self.sympoint_pairs else 0) \
            + self.noise_reads


def _read(tile: Tile) -> np.ndarray:
    return tile.read().detach().to("cpu", torch.float32).numpy()


def _run(tile: Tile, protocol: str, schedule: list[int], writer: MeasurementWriter,
         block: int, advance: Advance | None) -> None:
    """Read, then for each entry of ``schedule`` pulse it (signed, all devices) and read;
    each block of the schedule goes to the tile as one ``pulse_read`` program."""
    reads, pulses = [_read(tile)], [0]
    ones = torch.ones(tile.shape, dtype=torch.int32)
    start = 0
    while start < len(schedule) or reads:
        room = max(1, block - len(reads))
        chunk = schedule[start:start + room]
        start += len(chunk)
        if chunk:
            got = tile.pulse_read([ones * int(n) for n in chunk])
            reads += list(got.detach().to("cpu", torch.float32).numpy())
            pulses += [int(n) for n in chunk]
        if len(reads) >= block or start >= len(schedule):
            writer.append(tile.name, protocol, np.stack(reads), np.array(pulses))
            if advance:
                advance(len(reads))
            reads, pulses = [], []


def sweep(tile: Tile, proto: SweepProtocol, writer: MeasurementWriter,
          advance: Advance | None = None) -> None:
    """Pulse-response sweeps: ``cycles`` x (``pulses`` up, ``pulses`` down)."""
    k = proto.read_every
    per_dir = proto.pulses // k
    schedule = ([k] * per_dir + [-k] * per_dir) * proto.cycles
    _run(tile, "sweep", schedule, writer, proto.block, advance)


def sympoint_search(tile: Tile, pairs: int, writer: MeasurementWriter, block: int = 50,
                    advance: Advance | None = None) -> None:
    """Alternating +1 / -1 pulses with a read after each; reads settle at the symmetric point."""
    _run(tile, "sympoint", [1, -1] * pairs, writer, block, advance)


def read_noise(tile: Tile, reads: int, writer: MeasurementWriter,
               advance: Advance | None = None) -> None:
    """Repeated reads without pulses (their spread per device is the read noise)."""
    if reads > 0:
        _run(tile, "read_noise", [0] * (reads - 1), writer, max(reads, 1), advance)


def settled_value(reads: np.ndarray, tail: float = 0.5) -> np.ndarray:
    """Mean of the last ``tail`` fraction of alternating-search reads [T, ...] (NaN-aware)."""
    start = int(reads.shape[0] * (1 - tail))
    start -= start % 2  # keep whole up/down pairs, so the half-step offsets cancel
    return np.nanmean(reads[start:], axis=0)


def estimate_seconds(tile: Tile, proto: SweepProtocol) -> float | None:
    """Instrument seconds :func:`characterize` would take on ``tile``: each protocol run is
    one read, then its steps as pulse_read calls of ``block`` reads (the tile's own estimate;
    None: no instrument time)."""
    runs = [(proto.noise_reads - 1, 0), (2 * proto.cycles * proto.pulses // proto.read_every,
                                        proto.read_every), (2 * proto.sympoint_pairs, 1)]
    total = 0.0
    for steps, count in runs:
        if steps < 0 or (steps == 0 and count):
            continue
        calls = -(-(steps + 1) // proto.block)
        part = tile.estimate_seconds(reads=1, pulse_reads=steps, count=count, calls=calls)
        if part is None:
            return None
        total += part
    return total


def characterize(backend: Backend, writer: MeasurementWriter, tiles: dict[str, tuple[int, int]],
                 proto: SweepProtocol, advance: Advance | None = None) -> None:
    """Run read noise, sweeps and the symmetric-point search on every tile."""
    for name, (rows, cols) in tiles.items():
        tile = claim_tile(backend, name, (rows, cols))
        read_noise(tile, proto.noise_reads, writer, advance)
        sweep(tile, proto, writer, advance)
        if proto.sympoint_pairs:
            sympoint_search(tile, proto.sympoint_pairs, writer, proto.block, advance)
