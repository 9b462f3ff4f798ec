"""Analog SGD: the gradient goes straight onto the weight tile as pulses (PAPER.md)."""

from __future__ import annotations

import torch

from hil.algorithms.base import AnalogAlgorithm


class AnalogSGD(AnalogAlgorithm):
    """W <- W - lr * grad, applied as pulses, so the device response shapes every step.

    In expectation W' = W - lr grad F(W) - lr |grad| G(W): the implicit penalty of
    PAPER.md claim 1 pulls W toward the symmetric point.
    """

    roles = ("W",)

    def weight(self) -> torch.Tensor:
        return self.read("W")

    def _apply(self, grad, x, d, lr: float) -> None:
        self.gradient_update(self.tiles["W"], lr, grad, x, d)
