"""Response families: shapes at the bounds, F/G, symmetric points (closed form vs numeric)."""

from __future__ import annotations

import pytest
import torch

from hil.response import (
    ExpResponse,
    LinearResponse,
    MixedResponse,
    PowerResponse,
    Response,
    TabulatedResponse,
    make_response,
)

FAMILIES = ["linear", "power", "exp"]


def population(family: str, n: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tau_min = -0.4 - 0.4 * torch.rand(n, generator=g)
    tau_max = 0.4 + 0.4 * torch.rand(n, generator=g)
    gamma = 0.3 + 2.5 * torch.rand(n, generator=g)
    asym = 0.8 * torch.rand(n, generator=g) - 0.4
    return make_response(family, tau_min=tau_min, tau_max=tau_max, gamma=gamma, asym=asym)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_at_the_bounds_and_positive_inside(family):
    r = population(family)
    assert torch.allclose(r.q_plus(r.tau_max), torch.zeros_like(r.tau_max), atol=1e-6)
    assert torch.allclose(r.q_minus(r.tau_min), torch.zeros_like(r.tau_min), atol=1e-6)
    for frac in (0.1, 0.5, 0.9):
        w = r.tau_min + frac * (r.tau_max - r.tau_min)
        assert bool((r.q_plus(w) > 0).all()) and bool((r.q_minus(w) > 0).all())


def test_family_formulas_with_symmetric_bounds():
    w = torch.linspace(-0.59, 0.59, 101)
    tau, g, a = 0.6, 0.5, 0.2
    lin = LinearResponse(-tau, tau, asym=a)
    assert torch.allclose(lin.q_plus(w), (1 + a) * (1 - w / tau), atol=1e-6)
    assert torch.allclose(lin.q_minus(w), (1 - a) * (1 + w / tau), atol=1e-6)
    pw = PowerResponse(-tau, tau, gamma=g)
    assert torch.allclose(pw.q_plus(w), (1 - w / tau) ** g, atol=1e-6)
    ex = ExpResponse(-tau, tau, gamma=2.0)
    ref = (torch.exp(2.0 * (1 + w / tau)) - 1) / (torch.exp(torch.tensor(2.0)) - 1)
    assert torch.allclose(ex.q_minus(w), ref, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_F_G_and_update(family):
    r = population(family)
    w = 0.5 * (r.tau_min + r.tau_max) + 0.1
    assert torch.allclose(r.F(w) + r.G(w), r.q_minus(w), atol=1e-6)
    assert torch.allclose(r.F(w) - r.G(w), r.q_plus(w), atol=1e-6)
    delta = torch.full_like(w, 1e-3)
    # a positive change uses q+, a negative one q-
    assert torch.allclose(r.update(w, delta) - w, delta * r.q_plus(w), atol=1e-7)
    assert torch.allclose(r.update(w, -delta) - w, -delta * r.q_minus(w), atol=1e-7)
    assert torch.allclose(r.saturation(w), (r.G(w).abs() / r.F(w)).sqrt())


@pytest.mark.parametrize("family", FAMILIES)
def test_symmetric_point_closed_form_matches_bisection(family):
    r = population(family)
    ws = r.symmetric_point()
    numeric = Response.symmetric_point(r)
    assert torch.allclose(ws, numeric, atol=1e-5)
    assert torch.allclose(r.q_plus(ws), r.q_minus(ws), atol=1e-4)
    assert bool(((ws > r.tau_min) & (ws < r.tau_max)).all())
    assert torch.allclose(r.G(ws), torch.zeros_like(ws), atol=1e-4)


def test_linear_symmetric_point_is_a_tau():
    for a in (-0.3, 0.0, 0.1, 0.25):
        r = LinearResponse(-0.6, 0.6, asym=a)
        assert float(r.symmetric_point()) == pytest.approx(a * 0.6, abs=1e-7)


def test_linear_ignores_gamma():
    a = LinearResponse(-1.0, 1.0, gamma=3.0)
    b = LinearResponse(-1.0, 1.0)
    w = torch.linspace(-1, 1, 11)
    assert torch.equal(a.q_plus(w), b.q_plus(w))


def test_tabulated_interpolates_and_saturates():
    grid = torch.linspace(-1, 1, 5)
    qp = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0])
    qm = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0])
    r = TabulatedResponse(grid, qp, qm)
    w = torch.tensor([-1.0, -0.75, 0.0, 0.25, 1.0])
    assert torch.allclose(r.q_plus(w), torch.tensor([2.0, 1.75, 1.0, 0.75, 0.0]))
    assert torch.allclose(r.q_minus(w), torch.tensor([0.0, 0.25, 1.0, 1.25, 2.0]))
    assert float(r.symmetric_point()) == pytest.approx(0.0, abs=1e-6)
    lin = LinearResponse(-1.0, 1.0)
    ws = torch.linspace(-0.99, 0.99, 9)
    assert torch.allclose(r.q_plus(ws), lin.q_plus(ws), atol=1e-6)


def test_tabulated_non_monotonic_symmetric_point():
    grid = torch.linspace(-1, 1, 9)
    qp = torch.tensor([1.0, 1.2, 0.8, 0.9, 0.6, 0.5, 0.3, 0.2, 0.0])
    qm = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.7, 0.6, 0.9, 1.0, 1.0])
    r = TabulatedResponse(grid, qp, qm)
    ws = r.symmetric_point()
    assert float(r.G(ws)) == pytest.approx(0.0, abs=1e-5)


def test_mixed_picks_per_device():
    idx = torch.tensor([0, 1, 1, 0])
    m = MixedResponse([LinearResponse(-1.0, 1.0, asym=0.2),
                       PowerResponse(-0.5, 0.5, gamma=2.0)], idx)
    w = torch.tensor([0.1, 0.1, -0.2, -0.3])
    lin, pw = m.members
    expect = torch.where(idx == 0, lin.q_plus(w), pw.q_plus(w))
    assert torch.allclose(m.q_plus(w), expect)
    assert torch.allclose(m.symmetric_point(), torch.tensor([0.2, 0.0, 0.0, 0.2]), atol=1e-6)
    assert torch.equal(m.tau_max, torch.tensor([1.0, 0.5, 0.5, 1.0]))


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="tau_max"):
        LinearResponse(1.0, -1.0)
    with pytest.raises(ValueError, match="asymmetry"):
        PowerResponse(-1.0, 1.0, asym=1.0)
    with pytest.raises(ValueError, match="unknown response family"):
        make_response("cubic")
