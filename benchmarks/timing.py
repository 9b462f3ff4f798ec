"""The timing rule every benchmark script here uses: median wall time after warm-up calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_times(fns: list[Callable[[], object]], reps: int, warmup: int = 1,
                 rounds: int = 3) -> list[float]:
    """Median wall time of each of ``fns`` over ``reps`` calls after ``warmup`` untimed ones.

    The functions take turns in ``rounds`` blocks of consecutive calls each, so a slow or
    fast spell of a shared machine falls on all of them alike, while within a block a
    function runs back to back with warm caches, as in a training loop.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    rounds = max(1, min(rounds, reps))
    for r in range(rounds):
        block = reps // rounds + (1 if r < reps % rounds else 0)
        for fn, ts in zip(fns, times, strict=True):
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def median_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    return median_times([fn], reps, warmup, rounds=1)[0]
