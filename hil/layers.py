"""Analog layers whose weights live on backend tiles, and a converter for existing models.

Forward and backward go through ``algorithm.mvm`` (the tiles' ``mvm``, or the backend's
``mvm_sum``, with the I/O non-idealities) when the backend declares an MVM, else
digitally from ``algorithm.weight()``. The layer
input x and the output gradient d of every call are kept for the optimizer step,
which hands them to the algorithm (rank-1 pulse-train update, or a dense gradient).
The bias stays digital: it is an ordinary torch parameter trained by the digital
optimizer of :class:`hil.optim.AnalogOptimizer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hil.algorithms import AnalogAlgorithm
from hil.backend import Backend

IOMode = Literal["auto", "analog", "digital"]
AlgorithmFactory = Callable[[Backend, tuple[int, int], str], AnalogAlgorithm]


class _AnalogMatmul(torch.autograd.Function):
    """y = x W_bar^T through the layer's tiles; backward d W_bar through the tiles too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tap: torch.Tensor, layer: _AnalogBase) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x)
        return layer._matmul(x, transpose=False)

    @staticmethod
    def backward(ctx: Any, d: torch.Tensor):
        (x,) = ctx.saved_tensors
        layer: _AnalogBase = ctx.layer
        layer._cache.append((x.detach(), d.detach()))
        grad_x = layer._matmul(d, transpose=True) if ctx.needs_input_grad[0] else None
        return grad_x, torch.zeros_like(ctx.layer.analog_tap), None


class _AnalogBase(nn.Module):
    """Holds the algorithm, the I/O mode, a digital bias and the (x, d) cache."""

    def __init__(self, algorithm: AnalogAlgorithm, bias: bool, io: IOMode):
        super().__init__()
        if io not in ("auto", "analog", "digital"):
            raise ValueError(f"io must be 'auto', 'analog' or 'digital', got {io!r}")
        if io == "analog" and not algorithm.backend.capabilities.mvm:
            raise ValueError("io='analog' but the backend declares no mvm")
        self.algorithm = algorithm
        self.io = io
        rows = algorithm.shape[0]
        self.bias = nn.Parameter(torch.zeros(rows)) if bias else None
        # a scalar that requires grad so backward runs even when the input does not
        self.analog_tap = nn.Parameter(torch.zeros(()))
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def analog_io(self) -> bool:
        caps = self.algorithm.backend.capabilities
        return self.io == "analog" or (self.io == "auto" and caps.mvm)

    def _matmul(self, v: torch.Tensor, transpose: bool) -> torch.Tensor:
        if self.analog_io:
            return self.algorithm.mvm(v, transpose=transpose).to(v.device, v.dtype)
        w = self.algorithm.weight().to(v.device, v.dtype)
        return v @ w if transpose else v @ w.t()

    def analog_step(self, lr_scale: float = 1.0) -> None:
        """Hand the cached (x, d) of this step to the algorithm and clear the cache."""
        if not self._cache:
            return
        if len(self._cache) == 1:  # one forward/backward per step: no copy
            x, d = self._cache[0]
        else:
            x = torch.cat([c[0] for c in self._cache])
            d = torch.cat([c[1] for c in self._cache])
        self._cache.clear()
        self.algorithm.step(x=x, d=d, lr_scale=lr_scale)

    def zero_cache(self) -> None:
        self._cache.clear()


class AnalogLinear(_AnalogBase):
    """nn.Linear with its weight on a tile of ``out_features`` x ``in_features`` devices."""

    def __init__(self, in_features: int, out_features: int, algorithm: AnalogAlgorithm,
                 bias: bool = True, io: IOMode = "auto"):
        if algorithm.shape != (out_features, in_features):
            raise ValueError(f"algorithm shape {algorithm.shape} != ({out_features}, "
                             f"{in_features})")
        super().__init__(algorithm, bias, io)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = _AnalogMatmul.apply(x.reshape(-1, self.in_features), self.analog_tap, self)
        y = y.reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.algorithm!r}"


class AnalogConv2d(_AnalogBase):
    """nn.Conv2d as an unfolded MVM: patches [B*L, C*kh*kw] through one tile of
    ``out_channels`` x ``in_channels*kh*kw`` devices (groups=1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 algorithm: AnalogAlgorithm, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                 bias: bool = True, io: IOMode = "auto"):
        k = nn.modules.utils._pair(kernel_size)
        cols = in_channels * k[0] * k[1]
        if algorithm.shape != (out_channels, cols):
            raise ValueError(f"algorithm shape {algorithm.shape} != ({out_channels}, {cols})")
        super().__init__(algorithm, bias, io)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride = nn.modules.utils._pair(stride)
        self.padding = nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        cols = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # [B*L, C*kh*kw]
        y = _AnalogMatmul.apply(cols, self.analog_tap, self)  # [B*L, out]
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) \
            // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) \
            // self.stride[1] + 1
        y = y.reshape(b, oh * ow, self.out_channels).transpose(1, 2).reshape(
            b, self.out_channels, oh, ow)
        return y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, {self.algorithm!r}")


def analog_layers(model: nn.Module) -> list[_AnalogBase]:
    """Every analog layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, _AnalogBase)]


def convert_to_analog(model: nn.Module, backend: Backend, algorithm: AlgorithmFactory | str,
                      *, io: IOMode = "auto", program_init: bool = True,
                      **algorithm_kw: Any) -> nn.Module:
    """Replace every nn.Linear / nn.Conv2d (groups=1) of ``model`` in place by its analog twin.

    ``algorithm`` is a config name (see hil.algorithms.ALGORITHMS, with ``algorithm_kw``
    as its rates) or a factory ``(backend, shape, prefix) -> AnalogAlgorithm``. Tiles are
    named after the module path, so several layers share one backend. With
    ``program_init`` the layer's digital initial weights are write-verified onto W, and
    the digital bias is copied.
    """
    from hil.algorithms import make_algorithm

    def factory(shape: tuple[int, int], prefix: str) -> AnalogAlgorithm:
        if callable(algorithm):
            return algorithm(backend, shape, prefix)
        return make_algorithm(algorithm, backend, shape, prefix=prefix, **algorithm_kw)

    def convert(module: nn.Module, path: str) -> nn.Module:
        for name, child in list(module.named_children()):
            full = f"{path}.{name}" if path else name
            new: _AnalogBase | None = None
            if isinstance(child, nn.Linear):
                alg = factory((child.out_features, child.in_features), full)
                new = AnalogLinear(child.in_features, child.out_features, alg,
                                   bias=child.bias is not None, io=io)
            elif isinstance(child, nn.Conv2d) and child.groups == 1 and \
                    child.padding_mode == "zeros" and not isinstance(child.padding, str):
                k = child.kernel_size
                alg = factory((child.out_channels, child.in_channels * k[0] * k[1]), full)
                new = AnalogConv2d(child.in_channels, child.out_channels, k, alg,
                                   stride=child.stride, padding=child.padding,
                                   dilation=child.dilation, bias=child.bias is not None, io=io)
            if new is None:
                convert(child, full)
                continue
            if program_init:
                new.algorithm.program_weights(child.weight.detach().reshape(alg.shape))
            if child.bias is not None:
                new.bias.data.copy_(child.bias.detach())
            setattr(module, name, new)
        return module

    return convert(model, "")


def init_bound(fan_in: int) -> float:
    """torch's default uniform init bound 1/sqrt(fan_in) (for reference in configs)."""
    return 1.0 / math.sqrt(fan_in)
