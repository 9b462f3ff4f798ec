"""PAPER.md's numerical claims on small seeded problems, through the algorithms and sim://.

Scalar problems use a 1 x N tile of N independent replicas (one device each), so the
statistics over replicas and the last half of the run are cheap.
"""

from __future__ import annotations

import pytest
import torch

from hil import open_backend
from hil.algorithms import AnalogSGD, ResidualLearning, ResidualLearningV2

N = 300
W_STAR = 0.5


def scalar_run(cls, lr: float, steps: int, sigma: float = 0.5, w0: float | None = None,
               **kw) -> tuple[float, float]:
    """f = (w - 0.5)^2 / 2, gradient noise sigma, linear response tau = 1, dw_min = 1e-3.
    Returns the mean of w_bar and of |w_bar - w*| over replicas and the last half."""
    with open_backend("sim://?model=linear&tau=1&dw_min=1e-3&seed=1") as be:
        alg = cls(be, (1, N), lr=lr, seed=2, **kw)
        if w0 is not None:
            alg.program_weights(torch.full((1, N), w0))
        gen = torch.Generator().manual_seed(3)
        tail = []
        for k in range(steps):
            w = alg.weight()
            alg.step((w - W_STAR) + sigma * torch.randn(w.shape, generator=gen))
            if k >= steps // 2:
                tail.append(w)
        t = torch.stack(tail)
    return float(t.mean()), float((t - W_STAR).abs().mean())


def test_analog_sgd_settles_at_the_implicit_penalty_fixed_point_whatever_the_step():
    # claim 1: w~ = 0.5 / (1 + E|g|) ~= 0.353, for alpha = 1e-2 and 3e-3, from w = w*
    for lr, steps in ((1e-2, 600), (3e-3, 1500)):
        mean, _ = scalar_run(AnalogSGD, lr, steps, w0=W_STAR)
        assert abs(mean - 0.353) < 0.02, (lr, mean)


def test_noiseless_analog_gd_converges_exactly():
    # claim 2: without gradient noise the penalty vanishes; from the symmetric point 0
    mean, err = scalar_run(AnalogSGD, 0.1, 300, sigma=0.0)
    assert abs(mean - W_STAR) < 2e-3 and err < 3e-3


@pytest.mark.parametrize("cls", [ResidualLearning, ResidualLearningV2])
def test_residual_learning_stays_at_the_optimum_and_error_shrinks_with_step(cls):
    # claim 3: gamma = 1, beta = alpha / 10; started at w* (where Analog SGD drifts away to
    # 0.353, test above), the stationary error shrinks with alpha (about as sqrt(alpha))
    errors = []
    for lr, steps in ((1e-2, 1000), (3e-3, 2000)):
        mean, err = scalar_run(cls, lr, steps, w0=W_STAR, transfer_lr=lr / 10, gamma=1.0)
        assert abs(mean - W_STAR) < 0.03, (lr, mean)
        errors.append(err)
    assert errors[1] < 0.8 * errors[0], errors
