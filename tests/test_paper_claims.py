"""PAPER.md's numerical claims on small seeded problems, through the algorithms and sim://.

Scalar problems use a 1 x N tile of N independent replicas (one device each), so the
statistics over replicas and the last half of the run are cheap.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from hil import open_backend
from hil.algorithms import AnalogSGD, ResidualLearning, ResidualLearningV2

N = 300
W_STAR = 0.5


def scalar_run(cls, lr: float, steps: int, sigma: float = 0.5, w0: float | None = None,
               dw_min: float = 1e-3, asym: float = 0.0, n: int = N,
               **kw) -> tuple[float, float]:
    """f = (w - 0.5)^2 / 2, gradient noise sigma, linear response tau = 1 with amplitude
    asymmetry ``asym`` (symmetric point asym * tau). Returns the mean of w_bar and of
    |w_bar - w*| over the replicas and the last half of the run."""
    url = f"sim://?model=linear&tau=1&dw_min={dw_min}&asym={asym}&seed=1"
    with open_backend(url) as be:
        alg = cls(be, (1, n), lr=lr, seed=2, **kw)
        if w0 is not None:
            alg.program_weights(torch.full((1, n), w0))
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


@pytest.mark.parametrize("cls", [ResidualLearning, ResidualLearningV2])
def test_residual_learning_converges_from_away_and_error_shrinks_with_step(cls):
    # claim 3 as convergence: from w = 0 (Analog SGD would stop at 0.353), gamma = 1,
    # beta = alpha, coarse dw_min = 1e-2 to keep it cheap
    errors = []
    for lr, steps in ((0.1, 400), (0.03, 1200)):
        mean, err = scalar_run(cls, lr, steps, w0=0.0, dw_min=1e-2, n=150,
                               transfer_lr=lr, gamma=1.0)
        assert abs(mean - W_STAR) < 0.03, (lr, mean)
        errors.append(err)
    assert errors[1] < 0.7 * errors[0], errors


def test_asymmetric_p_biases_residual_learning_unless_zero_shifted():
    # claim 4's setting: linear response with asymmetry c = 0.3 (symmetric point 0.3, not
    # 0), gradient noise 0.5. P settles where E[g] F(0) = -E|g| G(0) = c E|g|, so W_bar
    # is biased by about c * sigma * sqrt(2 / pi) = 0.12 whatever the step size. Measured
    # here: gamma = 0.4 gives the same bias as gamma = 0 (the paper's claim that gamma > 0
    # alone removes it is not reproduced, RESULTS.md, nor on the paper's least-squares toy,
    # test below); zero-shifting P (G(0) = 0) removes it for both.
    c, sigma = 0.3, 0.5
    predicted = c * sigma * math.sqrt(2 / math.pi)
    for gamma in (0.0, 0.4):
        biased, _ = scalar_run(ResidualLearning, 0.05, 600, sigma, w0=W_STAR, dw_min=1e-2,
                               asym=c, n=200, transfer_lr=0.05, gamma=gamma)
        assert abs((biased - W_STAR) - predicted) < 0.025, (gamma, biased)
        shifted, _ = scalar_run(ResidualLearning, 0.05, 600, sigma, w0=W_STAR, dw_min=1e-2,
                                asym=c, n=200, transfer_lr=0.05, gamma=gamma,
                                zero_shift=True, zero_shift_cycles=200)
        assert abs(shifted - W_STAR) < 0.02, (gamma, shifted)


def _claim4_script():
    """experiments/claim4_lsq.py as a module (the paper's least-squares toy of claim 4)."""
    path = Path(__file__).resolve().parents[1] / "experiments" / "claim4_lsq.py"
    spec = importlib.util.spec_from_file_location("claim4_lsq", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lsq_toy_gamma_damps_but_does_not_remove_the_asymmetry_bias():
    # claim 4 on the paper's toy (D = 50, 100 rows, tau = 3.5, dw_min = 1e-4, W from 1,
    # 1000 steps, alpha = beta = 1/L), c = 0.3, one instance, 8 replicas. Measured
    # (RESULTS.md): with gradient noise sigma = 30, gamma = 0 and 0.4 both settle at the
    # predicted biased point H (W_bar - W*) = c E|g| (the paper's claim that gamma = 0.4
    # is unbiased is not reproduced); without noise gamma = 0.4 converges (~1e-7) and
    # gamma = 0 still rings (~1e-3), at every c (the gain of gamma is damping, not bias).
    c4 = _claim4_script()
    args = argparse.Namespace(replicas=8, steps=1000, tau=3.5, dw_min=1e-4, w0=1.0,
                              lr=1 / (100 * (1 + math.sqrt(0.5)) ** 2), transfer_lr=None,
                              algorithm="rl", noise="gauss", batch=10, zero_shift_cycles=0)
    args.transfer_lr = args.lr
    a, w_star = c4.problem(1, 100, 50)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small per-pulse ops: one thread is faster on a busy machine
    try:
        noisy = {g: c4.run_one(args, a, w_star, 0.3, g, 30.0, 1) for g in (0.0, 0.4)}
        clean = {g: c4.run_one(args, a, w_star, 0.3, g, 0.0, 1) for g in (0.0, 0.4)}
    finally:
        torch.set_num_threads(threads)
    pred = noisy[0.0]["pred_bias"]  # 0.027 for this instance; tail floor at c = 0: 0.003
    for g, r in noisy.items():
        assert 0.8 * pred < r["tail_bias"] < 1.6 * pred, (g, r["tail_bias"], pred)
    assert 0.8 < noisy[0.4]["tail_bias"] / noisy[0.0]["tail_bias"] < 1.25
    assert clean[0.4]["final_err"] < 1e-5 and clean[0.0]["final_err"] > 1e-4, clean
