"""The timing rule every benchmark script here uses: median wall time after warm-up calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_times(fns: list[Callable[[], object]], reps: int, warmup: int = 1) -> list[float]:
    """Median wall time of each of ``fns`` over ``reps`` calls after ``warmup`` untimed ones.

    The functions take turns (one call of each per round), so a slow or a fast spell of a
    shared machine falls on all of them alike and their ratios stay fair.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def median_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    return median_times([fn], reps, warmup)[0]
