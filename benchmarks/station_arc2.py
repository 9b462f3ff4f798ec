"""ArC TWO station: instrument calls and modelled instrument time of the arc2:// driver's
grouped pulses (one pulse_slice_masked per bitline, polarity and round, one execute per
command) against one pulse_one per device-pulse, on the simulated ArC TWO's clock
(drivers/arc2/spec.py: libarc2 0.6.0's command sequences and delays).

Rows: a 32x32 tile pulsed with counts in -3..3 (per device-pulse), and one Residual
Learning v2 step on a 32x32 layer (W and P on two ArC TWOs: a socket holds one 32x32
array); a step's reads (read_all) are the same in every method, so its pulses are also
timed on their own. The pulse_one baselines: chained into one execute per command, and
executed one by one (as a GUI pulses a single device).
Usage: ``.venv/bin/python benchmarks/station_arc2.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from drivers.arc2 import sim  # noqa: E402
from drivers.arc2.backend import Arc2Tile, pulse_program, sim_url  # noqa: E402
from hil.backend import Backend, Tile, open_backend  # noqa: E402

DEVICES = "sim://?model=power&gamma=0.5&tau=0.6&d2d=0.2&c2c=0.1&seed=7"
METHODS = ("grouped", "pulse_one chained", "pulse_one + execute each")


def pulse_one_each(tile: Arc2Tile, n: torch.Tensor, execute_each: bool) -> None:
    """The baseline: one pulse_one per device-pulse (in the grouped program's order)."""
    be = tile.arc
    counts = n.cpu().numpy().astype(np.int64)
    be.interlock.check_counts(tile.name, tile.place.row, tile.place.col, counts)
    inst = be.instrument
    for col, sign, rows in pulse_program(counts):
        volts, nanos = be.shape("potentiate" if sign > 0 else "depress")
        for r in rows:
            inst.pulse_one(tile.bit_ch[col], int(tile.word_ch[r]), volts, nanos)
            if execute_each:
                inst.execute().wait()
    if not execute_each:
        inst.execute().wait()


@contextmanager
def pulse_method(method: str) -> Iterator[dict[str, float]]:
    """Route Arc2Tile pulses through ``method``; yields the device-pulses and instrument
    seconds spent in pulse commands."""
    spent = {"device_pulses": 0, "seconds": 0.0}
    grouped, public = Arc2Tile._pulse, Arc2Tile.pulse
    if method != "grouped":
        Arc2Tile._pulse = lambda self, n: pulse_one_each(self, n, method.endswith("each"))

    def timed(tile: Arc2Tile, n: torch.Tensor) -> None:
        clock = sim.clock(tile.arc.instrument)
        t0 = clock.ns
        public(tile, n)
        spent["device_pulses"] += int(n.abs().sum())
        spent["seconds"] += (clock.ns - t0) * 1e-9
    Arc2Tile.pulse = timed
    try:
        yield spent
    finally:
        Arc2Tile._pulse, Arc2Tile.pulse = grouped, public


class TwoSockets(Backend):
    """A layer's W and P tiles on two ArC TWOs (each socket holds one 32x32 array)."""

    def __init__(self, url: str):
        super().__init__(url)
        self.sockets = {"W": open_backend(url), "P": open_backend(url)}
        self.capabilities = self.sockets["W"].capabilities

    def _allocate(self, name: str, rows: int, cols: int) -> Tile:
        return self.sockets[name.rsplit(".", 1)[-1]].allocate(name, rows, cols)

    def clocks(self) -> list[sim.InstrumentClock]:
        return [sim.clock(b.instrument) for b in self.sockets.values()]

    def close(self) -> None:
        for b in self.sockets.values():
            b.close()
        super().close()


def measured(clocks: list[sim.InstrumentClock], fn: Callable[[], Any]) -> tuple[int, float]:
    """(instrument calls, modelled instrument seconds) that ``fn`` costs."""
    before = [(c.total_calls, c.ns) for c in clocks]
    fn()
    calls = sum(c.total_calls - b[0] for c, b in zip(clocks, before, strict=True))
    ns = sum(c.ns - b[1] for c, b in zip(clocks, before, strict=True))
    return calls, ns * 1e-9


def device_pulse_rows(size: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """One pulse command of counts in -3..3 on every device of a size x size tile."""
    counts = torch.from_numpy(np.random.default_rng(seed).integers(-3, 4, (size, size))
                              .astype(np.int32))
    rows = []
    for method in METHODS:
        with open_backend(sim_url(DEVICES)) as be, pulse_method(method) as spent:
            tile = be.allocate("t", size, size)
            calls, secs = measured([sim.clock(be.instrument)], lambda t=tile: t.pulse(counts))
        rows.append(_row(f"pulse {size}x{size}, n in -3..3", method, calls, secs, spent))
    return _ratios(rows)


def rlv2_step_rows(size: int = 32, warmup: int = 3) -> list[dict[str, Any]]:
    """One RLv2 step (weight() reads, P pulses, P read, W transfer pulses) after a warm-up,
    from the same state for every method."""
    from hil.algorithms import ResidualLearningV2

    rows = []
    for method in METHODS:
        be = TwoSockets(sim_url(DEVICES))
        try:
            alg = ResidualLearningV2(be, (size, size), lr=0.1, transfer_lr=0.3, gamma=0.5,
                                     seed=3, prefix="fc1")
            target = torch.linspace(-0.3, 0.3, size * size).reshape(size, size)
            for _ in range(warmup):
                alg.step(alg.weight() - target)
            with pulse_method(method) as spent:
                calls, secs = measured(be.clocks(),
                                       lambda alg=alg, t=target: alg.step(alg.weight() - t))
        finally:
            be.close()
        rows.append(_row(f"RLv2 step {size}x{size} layer", method, calls, secs, spent))
    return _ratios(rows)


def _row(case: str, method: str, calls: int, secs: float, spent: dict[str, float]
         ) -> dict[str, Any]:
    n = int(spent["device_pulses"])
    return {"case": case, "method": method, "device_pulses": n, "calls": calls,
            "instrument_s": secs, "pulse_s": spent["seconds"],
            "us_per_device_pulse": spent["seconds"] / max(n, 1) * 1e6}


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = {r["method"]: r for r in rows}
    for r in rows:
        for key, ref in (("chained", "pulse_one chained"), ("each", "pulse_one + execute each")):
            r[f"time_vs_{key}"] = r["instrument_s"] / base[ref]["instrument_s"]
            r[f"pulse_time_vs_{key}"] = r["pulse_s"] / base[ref]["pulse_s"]
    return rows


def rows() -> list[dict[str, Any]]:
    """All rows: per device-pulse on a 32x32 tile, and one RLv2 step on a 32x32 layer."""
    return device_pulse_rows() + rlv2_step_rows()


def main() -> None:
    torch.set_num_threads(1)
    out = rows()
    print(f"{'case':28} {'method':25} {'dev-pulses':>10} {'calls':>6} {'instr. s':>9} "
          f"{'pulse s':>8} {'us/dev-pulse':>12}")
    for r in out:
        print(f"{r['case']:28} {r['method']:25} {r['device_pulses']:>10} {r['calls']:>6} "
              f"{r['instrument_s']:>9.4f} {r['pulse_s']:>8.4f} "
              f"{r['us_per_device_pulse']:>12.2f}")
    for r in out:
        if r["method"] == "grouped":
            print(f"{r['case']}: grouped pulses take {r['pulse_time_vs_chained']:.3f} of the "
                  f"pulse_one time chained, {r['pulse_time_vs_each']:.4f} executed one by one "
                  f"(whole: {r['time_vs_chained']:.3f}, {r['time_vs_each']:.4f})")


if __name__ == "__main__":
    main()
