"""Emulator throughput against the machine's limits: memory bandwidth and random-number rate.

Prints, in one run: the measured copy bandwidth; device-pulses/s of Tile.pulse() on a
4096x4096 tile for |n| <= 1 and |n| <= 31, without and with c2c noise; outer_update
throughput (512x512, batch 32, train length 31). Noiseless figures are given as a
fraction of the roofline (the bytes one pass over the tile must stream / the copy
bandwidth); noisy ones against the time torch.randn takes to draw one normal per
pulse and per device; last, the measured engine is compared with the eager kernels.
Usage: ``.venv/bin/python benchmarks/emulator.py [--quick] [--models linear,power]
[--engine native|compiled|eager]``; ``--methods [--device cuda]`` instead compares
outer_update's kernels (compiled sample- and device-major, native) on the same counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import hil
from sim_backend.emulator import apply_pulse_trains, pulse_train_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_time  # noqa: E402


def copy_bandwidth(numel: int, repeats: int) -> float:
    """Bytes/s of dst.copy_(src) on float32 tensors larger than the caches (read + write)."""
    src, dst = torch.randn(numel), torch.empty(numel)
    return 2 * 4 * numel / median_time(lambda: dst.copy_(src), repeats)


def randn_rate(numel: int, repeats: int) -> float:
    """Standard normals per second of torch.randn into a preallocated tensor."""
    out = torch.empty(numel)
    gen = torch.Generator().manual_seed(0)
    return numel / median_time(lambda: torch.randn(numel, generator=gen, out=out), repeats)


def bench_pulse(model: str, nmax: int, c2c: float, side: int, bw: float, rate: float,
                repeats: int, engine: str) -> str:
    url = f"sim://?model={model}&gamma=0.5&tau=0.6&d2d=0.2&c2c={c2c}&engine={engine}&seed=0"
    with hil.open_backend(url) as be:
        tile = be.allocate("bench", side, side)
        gen = torch.Generator().manual_seed(1)
        n = torch.randint(-nmax, nmax + 1, (side, side), generator=gen, dtype=torch.int32)
        pulses = int(n.abs().sum())
        t_compile = time.perf_counter()
        tile.pulse(n)  # compiles the kernels (cached on disk for later runs)
        t_compile = time.perf_counter() - t_compile
        t = median_time(lambda: tile.pulse(n), repeats)
        fp = tile.devices.fused()
        numel = side * side
        line = (f"pulse {model:6s} |n|<={nmax:<2d} c2c={c2c:<4} {pulses / t / 1e6:8.1f} M "
                f"device-pulses/s  ({t * 1e3:7.1f} ms/call, first call {t_compile:5.1f} s)")
        if c2c == 0:
            roof = numel * fp.bytes_per_device / bw
            line += f"  roofline {roof * 1e3:6.1f} ms ({fp.bytes_per_device} B/device): "
            line += f"{roof / t:5.1%} of roofline"
        else:
            t_tile = numel / rate
            t_need = pulses / rate
            line += (f"  randn(tile) {t_tile * 1e3:6.1f} ms: {t / t_tile:4.2f}x;"
                     f" randn(pulses) {t_need * 1e3:7.1f} ms: {t / t_need:4.2f}x")
        return line


def bench_outer(model: str, c2c: float, repeats: int, engine: str) -> str:
    url = f"sim://?model={model}&gamma=0.5&tau=0.6&c2c={c2c}&engine={engine}&seed=0"
    with hil.open_backend(url) as be:
        tile = be.allocate("bench", 512, 512)
        gen = torch.Generator().manual_seed(2)
        x = torch.rand(32, 512, generator=gen) * 2 - 1
        d = torch.rand(32, 512, generator=gen) * 2 - 1
        counts = pulse_train_counts(x, d, 0.01, tile.dw_min, 31,
                                    torch.Generator().manual_seed(3))
        pulses = int(counts.abs().sum())
        t_compile = time.perf_counter()
        tile.outer_update(x, d, 0.01)
        t_compile = time.perf_counter() - t_compile
        t = median_time(lambda: tile.outer_update(x, d, 0.01), repeats)
        return (f"outer_update {model:6s} c2c={c2c:<4} 512x512 batch 32 train 31: "
                f"{t * 1e3:7.1f} ms/call, {pulses / 1e6:4.1f} M pulses/call, "
                f"{pulses / t / 1e6:7.1f} M pulses/s (first call {t_compile:5.1f} s)")


def compare_methods(model: str, c2c: float, repeats: int, device: str) -> str:
    """apply_pulse_trains on the same outer_update counts: the compiled torch kernels
    sample- and device-major, and (CPU) the native kernel."""
    url = f"sim://?model={model}&gamma=0.5&tau=0.6&c2c={c2c}&device={device}&seed=0"
    with hil.open_backend(url) as be:
        tile = be.allocate("bench", 512, 512)
        g = torch.Generator(device=device).manual_seed(2)
        x = torch.rand(32, 512, generator=g, device=device) * 2 - 1
        d = torch.rand(32, 512, generator=g, device=device) * 2 - 1
        counts = pulse_train_counts(x, d, 0.01, tile.dw_min, 31, g, dtype=torch.int8)
        runs = [("sample-major", "compiled", "sample"), ("device-major", "compiled", "device")]
        if device == "cpu":
            runs.append(("native", "native", "auto"))
        t = {label: median_time(lambda e=e, m=m: apply_pulse_trains(
            tile.w, counts, tile.devices, tile.gen, engine=e, method=m), repeats)
             for label, e, m in runs}
    return (f"apply_pulse_trains {model:6s} c2c={c2c:<4} 512x512 batch 32: "
            + ", ".join(f"{k} {v * 1e3:7.1f} ms" for k, v in t.items()))


def agreement(model: str, engine: str) -> str:
    """Largest |engine - eager| after the same noisy pulses and outer_update (same seed)."""
    out = {}
    g = torch.Generator().manual_seed(4)
    n = torch.randint(-31, 32, (128, 128), generator=g, dtype=torch.int32)
    x, d = torch.rand(32, 128, generator=g) * 2 - 1, torch.rand(32, 128, generator=g) * 2 - 1
    for eng in ("eager", engine):
        url = f"sim://?model={model}&gamma=0.5&tau=0.6&d2d=0.2&c2c=0.1&engine={eng}&seed=5"
        with hil.open_backend(url) as be:
            tile = be.allocate("agree", 128, 128)
            tile.pulse(n)
            tile.outer_update(x, d, 0.01)
            out[eng] = tile.read()
    diff = float((out[engine] - out["eager"]).abs().max())
    return f"{engine} vs eager ({model}, c2c 0.1, 128x128): max |dw| = {diff:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024x1024 tile, fewer repeats")
    parser.add_argument("--models", default="linear,power,exp",
                        help="comma-separated response families to measure")
    parser.add_argument("--methods", action="store_true",
                        help="only compare outer_update's kernels on the same counts")
    parser.add_argument("--engine", choices=("auto", "native", "compiled", "eager"),
                        default="auto", help="sim:// engine to measure (native: the C++ "
                        "kernel, CPU only; auto: what a default URL takes)")
    parser.add_argument("--device", default="cpu", help="torch device of the tiles (--methods)")
    args = parser.parse_args()
    models = args.models.split(",")
    if args.methods:
        for model in models:
            for c2c in (0.0, 0.1):
                print(compare_methods(model, c2c, 3, args.device), flush=True)
        return
    side = 1024 if args.quick else 4096
    repeats = 3 if args.quick else 5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"engine={args.engine}")
    bw = copy_bandwidth(side * side, repeats)
    rate = randn_rate(side * side, repeats)
    print(f"copy bandwidth {bw / 1e9:.2f} GB/s (read + write, {side}x{side} float32)")
    print(f"torch.randn {rate / 1e6:.1f} M normals/s "
          f"({side * side / rate * 1e3:.1f} ms for the tile)")
    for model in models:
        for nmax in (1, 31):
            for c2c in (0.0, 0.1):
                print(bench_pulse(model, nmax, c2c, side, bw, rate, repeats, args.engine),
                      flush=True)
    for model in models:
        for c2c in (0.0, 0.1):
            print(bench_outer(model, c2c, repeats, args.engine), flush=True)
    if args.engine not in ("eager", "auto"):
        for model in models:
            print(agreement(model, args.engine), flush=True)


if __name__ == "__main__":
    main()
