"""Analog training algorithms over tiles of any backend, independent of autograd (PAPER.md)."""

from __future__ import annotations

from typing import Any

from hil.algorithms.base import AnalogAlgorithm, stochastic_round
from hil.algorithms.chopped import AGAD, ChoppedTTv2
from hil.algorithms.mixed import MixedPrecision
from hil.algorithms.options import OPTIONS
from hil.algorithms.residual import ResidualLearning, ResidualLearningV2, TikiTaka, TTv2
from hil.algorithms.sgd import AnalogSGD
from hil.backend import Backend

ALGORITHMS: dict[str, type[AnalogAlgorithm]] = {
    "analog_sgd": AnalogSGD,
    "tiki_taka": TikiTaka,
    "residual": ResidualLearning,
    "rlv2": ResidualLearningV2,
    "ttv2": TTv2,
    "chopped_ttv2": ChoppedTTv2,
    "agad": AGAD,
    "mixed_precision": MixedPrecision,
}


def make_algorithm(name: str, backend: Backend, shape: tuple[int, int], **kw: Any
                   ) -> AnalogAlgorithm:
    """Build an algorithm by its config name (one of ``ALGORITHMS``)."""
    try:
        cls = ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r} (one of {', '.join(ALGORITHMS)})") from None
    for key in OPTIONS.keys() & kw.keys():
        if name not in OPTIONS[key]:
            raise ValueError(f"{key} applies to {', '.join(OPTIONS[key])}, not {name!r}")
    if cls is AnalogSGD or cls is MixedPrecision:  # one tile: no P, no transfer of P
        keep = ("transfer_lr", "transfer_every") if cls is MixedPrecision else ()
        for key in ("transfer_lr", "gamma", "transfer_every", "transfer", "zero_shift",
                    "columns_per_transfer",
                    "zero_shift_cycles", "transfer_read", "transfer_write", "mvm_read"):
            if key not in keep:
                kw.pop(key, None)
    elif not issubclass(cls, ResidualLearning) and kw.pop("transfer_write", "counts") \
            != "counts":  # the buffered variants' threshold transfer is one pulse
        raise ValueError(f"transfer_write applies to tiki_taka and residual, not {name!r} "
                         "(its threshold transfer writes single pulses)")
    return cls(backend, shape, **kw)


__all__ = ["AGAD", "ALGORITHMS", "OPTIONS", "AnalogAlgorithm", "AnalogSGD", "ChoppedTTv2",
           "MixedPrecision", "ResidualLearning",
           "ResidualLearningV2", "TTv2", "TikiTaka", "make_algorithm", "stochastic_round"]
