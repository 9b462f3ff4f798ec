"""Drivers throughput: device-pulses/s on a 256x256 tile through the SCPI path with binary
blocks (visa:// over loopback TCP to the virtual chip), against single-device SCPI commands
and against the emulator called directly, all measured in one run.

Each whole-tile command pulses every device once (+1 or -1), so one command moves 65536
devices; the per-device path sends one TILE:PULS:DEV? command per device. The paths are
measured in interleaved rounds and rated by their median call time, so that a loaded
machine's spikes hit all of them alike.
Usage: ``.venv/bin/python benchmarks/drivers.py [--size 256] [--seconds 6] [--rounds 6]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# this file is called drivers.py: keep its folder off the path so `drivers` is the package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

from drivers.virtual_chip import VirtualChip  # noqa: E402
from hil.backend import open_backend  # noqa: E402

SIM = "sim://?model=power&gamma=0.5&tau=0.6&seed=0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="tile is size x size")
    parser.add_argument("--seconds", type=float, default=6.0, help="time per path, all rounds")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    args = parser.parse_args()
    n = args.size
    gen = torch.Generator().manual_seed(0)
    maps = [torch.where(torch.rand(n, n, generator=gen) < 0.5, 1, -1).to(torch.int32)
            for _ in range(8)]

    with open_backend(SIM) as direct_be, VirtualChip(SIM, "scpi", "tcp",
                                                     timeout_s=600.0) as chip:
        with open_backend(chip.url) as chip_be:
            direct = direct_be.allocate("bench", n, n)
            remote = chip_be.allocate("bench", n, n)
            counter = [0]

            def one_device() -> None:
                i = counter[0] = counter[0] + 1
                remote.pulse_device(i % n, (i // n) % n, 1 if i % 2 else -1)

            paths: dict[str, tuple[Callable[[], None], int]] = {
                "emulator direct (Tile.pulse)": (lambda: direct.pulse(maps[counter[0] % 8]),
                                                 n * n),
                "SCPI, int16 binary block per tile": (
                    lambda: remote.pulse(maps[counter[0] % 8]), n * n),
                "SCPI, one command per device": (one_device, 1),
                "read": (lambda: remote.read(), 0),  # whole-tile float32 block, not a pulse
            }
            times: dict[str, list[float]] = {name: [] for name in paths}
            for fn, _ in paths.values():  # warm-up: kernel compilation, connection
                for _ in range(3):
                    fn()
            for _ in range(args.rounds):
                for name, (fn, _) in paths.items():
                    t_end = time.perf_counter() + args.seconds / args.rounds
                    while time.perf_counter() < t_end:
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
                        counter[0] += 1
    read_s = statistics.median(times.pop("read"))
    paths.pop("read")
    rates = {name: paths[name][1] / statistics.median(times[name]) for name in paths}
    base = rates["emulator direct (Tile.pulse)"]
    block = rates["SCPI, int16 binary block per tile"]
    per_device = rates["SCPI, one command per device"]
    print(f"drivers benchmark: {n}x{n} tile, {os.cpu_count()} CPUs, torch {torch.__version__},"
          f" load average {os.getloadavg()[0]:.1f}")
    print(f"{'path':36s} {'device-pulses/s':>16s} {'median call':>12s} {'calls':>7s} "
          f"{'vs direct':>10s}")
    for name in paths:
        print(f"{name:36s} {rates[name]:16.3e} {statistics.median(times[name]) * 1e3:9.3f} ms "
              f"{len(times[name]):7d} {rates[name] / base:10.3f}")
    print(f"blocks vs per-device commands: {block / per_device:.0f}x; "
          f"whole-tile read (float32 block): {read_s * 1e3:.2f} ms = "
          f"{4 * n * n / read_s / 1e6:.0f} MB/s")
    print(f"target >= 1e6 device-pulses/s with blocks: {'met' if block >= 1e6 else 'NOT met'}")


if __name__ == "__main__":
    main()
