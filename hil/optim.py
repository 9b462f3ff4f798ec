"""A torch-optimizer-like wrapper: ``loss.backward(); opt.step()`` drives the analog algorithms.

Analog layers get their update from their algorithm (pulses on tiles); every other
parameter (biases, layers left digital) gets plain SGD with ``digital_lr``. The
learning-rate scale (set by a scheduler) multiplies the digital rate and the
algorithms' gradient rate lr; transfer rates stay as configured.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from hil.layers import analog_layers


class AnalogOptimizer:
    """Steps every analog layer of ``model`` and SGD on its digital parameters."""

    def __init__(self, model: nn.Module, digital_lr: float):
        self.layers = analog_layers(model)
        taps = {id(layer.analog_tap) for layer in self.layers}
        params = [p for p in model.parameters() if id(p) not in taps and p.requires_grad]
        self.digital = torch.optim.SGD(params, lr=digital_lr) if params else None
        self.digital_lr = float(digital_lr)
        self.lr_scale = 1.0

    def set_lr_scale(self, scale: float) -> None:
        """Scale the digital rate and the algorithms' gradient rates (a step schedule)."""
        self.lr_scale = float(scale)
        if self.digital is not None:
            for group in self.digital.param_groups:
                group["lr"] = self.digital_lr * self.lr_scale

    def zero_grad(self) -> None:
        if self.digital is not None:
            self.digital.zero_grad(set_to_none=True)
        for layer in self.layers:
            layer.zero_cache()
            layer.analog_tap.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One training step: SGD on the digital parameters, then every analog layer's
        update, all inside one ``backend.step()`` per backend (the per-step budget)."""
        if self.digital is not None:
            self.digital.step()
        with ExitStack() as steps:
            backends = {id(layer.algorithm.backend): layer.algorithm.backend
                        for layer in self.layers}
            for backend in backends.values():
                steps.enter_context(backend.step())
            for layer in self.layers:
                layer.analog_step(self.lr_scale)

    @property
    def clipped_pulses(self) -> int:
        """Pulses the algorithms' max_pulses clip dropped so far (all layers)."""
        return sum(layer.algorithm.clipped_pulses for layer in self.layers)

    def state_dict(self) -> dict[str, Any]:
        return {"lr_scale": self.lr_scale,
                "digital": self.digital.state_dict() if self.digital is not None else None,
                "algorithms": [layer.algorithm.state_dict() for layer in self.layers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_lr_scale(state["lr_scale"])
        if self.digital is not None:
            self.digital.load_state_dict(state["digital"])
        for layer, s in zip(self.layers, state["algorithms"], strict=True):
            layer.algorithm.load_state_dict(s)
