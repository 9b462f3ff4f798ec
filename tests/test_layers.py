"""Analog layers, the converter and the optimizer wrapper: forward/backward through the
tiles (analog MVM or digital from the read weights) and updates through the algorithms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hil import open_backend
from hil.algorithms import AnalogSGD, make_algorithm
from hil.layers import AnalogConv2d, AnalogLinear, analog_layers, convert_to_analog
from hil.optim import AnalogOptimizer

IDEAL = "sim://?model=linear&tau=100&dw_min=1e-4&io=ideal&seed=0"


def programmed_linear(be, w: torch.Tensor, io: str = "auto") -> AnalogLinear:
    alg = AnalogSGD(be, tuple(w.shape), lr=0.1, prefix="fc")
    alg.program_weights(w, tol=1e-4)
    return AnalogLinear(w.shape[1], w.shape[0], alg, io=io)


@pytest.mark.parametrize("io", ["analog", "digital"])
def test_linear_forward_and_backward_match_torch(io):
    gen = torch.Generator().manual_seed(0)
    w = 0.3 * torch.randn(4, 6, generator=gen)
    x = torch.rand(5, 6, generator=gen, requires_grad=True)
    with open_backend(IDEAL) as be:
        layer = programmed_linear(be, w, io=io)
        layer.bias.data.copy_(torch.arange(4.0))
        w_read = layer.algorithm.weight()
        y = layer(x)
        y.square().sum().backward()
        x_ref = x.detach().clone().requires_grad_(True)
        y_ref = x_ref @ w_read.t() + torch.arange(4.0)
        y_ref.square().sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-4)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-3)
    (xc, dc), = layer._cache
    assert torch.allclose(dc, 2 * y_ref.detach(), atol=1e-3)
    assert layer.bias.grad is not None  # bias stays digital


def test_paper_io_nonidealities_perturb_the_mvm():
    w = 0.3 * torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    x = torch.rand(32, 16, generator=torch.Generator().manual_seed(2))
    with open_backend("sim://?model=linear&tau=100&dw_min=1e-4&seed=0") as be:
        layer = programmed_linear(be, w)
        exact = x @ layer.algorithm.weight().t() + layer.bias
        y = layer(x)
    err = (y - exact).abs()
    assert 0 < float(err.detach().mean()) < 0.2  # output noise 0.06 and the converters


def test_conv2d_is_an_unfolded_mvm():
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
    x = torch.rand(2, 2, 7, 6, generator=gen)
    with open_backend(IDEAL) as be:
        alg = AnalogSGD(be, (3, 18), lr=0.1, prefix="conv")
        alg.program_weights(conv.weight.detach().reshape(3, 18), tol=1e-4)
        layer = AnalogConv2d(2, 3, 3, alg, stride=2, padding=1)
        layer.bias.data.copy_(conv.bias.detach())
        w = alg.weight().reshape(3, 2, 3, 3)
        y = layer(x)
    assert y.shape == (2, 3, 4, 3)
    assert torch.allclose(y, F.conv2d(x, w, conv.bias.detach(), stride=2, padding=1), atol=1e-4)


def test_convert_to_analog_replaces_layers_and_programs_init_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 5), nn.Tanh(),
                          nn.Linear(5, 3))
    w_init = model[2].weight.detach().clone()
    with open_backend(IDEAL) as be:
        convert_to_analog(model, be, "rlv2", lr=0.1, transfer_lr=0.1, gamma=0.2)
        assert isinstance(model[0], AnalogConv2d) and isinstance(model[4], AnalogLinear)
        assert len(analog_layers(model)) == 3
        assert {"0.W", "0.P", "2.W", "2.P", "4.W", "4.P"} == set(be.tiles())
        assert torch.allclose(model[2].algorithm.read("W"), w_init, atol=2e-4)
        assert model(torch.rand(2, 1, 6, 6)).shape == (2, 3)


@pytest.mark.parametrize("update", ["outer", "pulse"])
def test_optimizer_step_trains_least_squares(update):
    gen = torch.Generator().manual_seed(0)
    a = 0.5 * torch.randn(2, 4, generator=gen)
    x = torch.rand(64, 4, generator=gen)
    y = x @ a.t()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with open_backend("sim://?model=linear&tau=100&dw_min=1e-3&io=ideal&seed=0") as be:
        convert_to_analog(model, be, lambda b, s, p: make_algorithm(
            "analog_sgd", b, s, lr=0.2, prefix=p, update=update))
        opt = AnalogOptimizer(model, digital_lr=0.2)
        first = None
        for _ in range(60):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            first = first if first is not None else float(loss.detach())
        final = float(F.mse_loss(model(x), y).detach())
    assert final < 0.1 * first, (first, final)
    assert model[0].algorithm.step_count == 60


def test_optimizer_state_and_lr_scale_roundtrip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    with open_backend(IDEAL) as be:
        convert_to_analog(model, be, "ttv2", lr=0.1, transfer_lr=0.5, program_init=False)
        opt = AnalogOptimizer(model, digital_lr=0.1)
        opt.set_lr_scale(0.5)
        state = opt.state_dict()
        opt2 = AnalogOptimizer(model, digital_lr=0.1)
        opt2.load_state_dict(state)
    assert opt2.lr_scale == 0.5 and opt2.digital.param_groups[0]["lr"] == 0.05
    assert torch.equal(state["algorithms"][0]["H"], torch.zeros(2, 3))
