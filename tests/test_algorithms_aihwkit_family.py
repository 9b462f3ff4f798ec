"""Chopped TTv2, AGAD and mixed precision (aihwkit's ChoppedTransferCompound,
DynamicTransferCompound and MixedPrecisionCompound): their equations checked exactly on an
ideal backend, the fixed points they reach on the scalar toy of PAPER.md, the threshold
transfer's options, checkpoint/resume bit for bit, ``hil train`` YAML, and the same run
over visa:// to the virtual chip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from test_algorithms import ExactBackend
from test_paper_claims import W_STAR, scalar_run

from hil import open_backend
from hil.algorithms import (
    AGAD,
    AnalogSGD,
    ChoppedTTv2,
    MixedPrecision,
    TTv2,
    make_algorithm,
)
from hil.algorithms.residual import _TwoTile
from hil.cli import main
from hil.config import load_config
from hil.errors import NonFiniteError
from hil.runs import CHECKPOINT, train_run


# -- the threshold transfer's options (shared by TTv2, RLv2, c-TTv2, AGAD) ------------------
@pytest.mark.parametrize("forget", [False, True])
def test_threshold_transfer_options_match_the_equations(forget):
    """buffer_granularity g, max_steps m, momentum mu, buffer_cap: n = clip(trunc(H /
    (g dw)), -m, m) pulses where |H| >= g dw; then H -= (1 - mu) n g dw (capped) or, with
    forget_buffer, H <- mu H where it fired."""
    dw, b, g, m, mu, cap = 0.01, 1.0, 2.0, 3, 0.25, 1.5
    alg = TTv2(ExactBackend(dw=dw), (1, 4), lr=1.0, transfer_lr=b, buffer_granularity=g,
               max_steps=m, momentum=mu, forget_buffer=forget, buffer_cap=cap)
    h, w = torch.zeros(1, 4), torch.zeros(1, 4)
    for grad in (torch.tensor([[-0.25, 0.05, -0.021, 0.0]]), torch.tensor([[0.0, 0.1, 0.0, -0.3]])):
        alg.step(grad)
        h = h + b * alg.read("P")
        thr = g * dw
        fire = h.abs() >= thr
        n = torch.where(fire, torch.trunc(h / thr).clamp(-m, m), torch.zeros_like(h))
        if forget:
            h = torch.where(fire, mu * h, h)
        else:
            h = (h - (1 - mu) * n * thr).clamp(-cap * m * thr, cap * m * thr)
        w = w + n * dw
        assert torch.allclose(alg.H, h, atol=1e-6)
        assert torch.allclose(alg.read("W"), w, atol=1e-6)
    assert max(int(c.abs().max()) for c in alg.tiles["W"].commands) == m  # clipped at m
    for bad in (dict(max_steps=0), dict(momentum=1.5), dict(buffer_granularity=0.0),
                dict(buffer_cap=-1.0), dict(max_steps=1.5)):
        with pytest.raises(ValueError):
            TTv2(ExactBackend(), (1, 2), lr=0.1, transfer_lr=0.1, **bad)


@pytest.mark.parametrize("cls", [TTv2, ChoppedTTv2, AGAD])
def test_threshold_counts_in_w_dw_min_for_ttv2_and_in_p_dw_min_for_the_chopped(cls):
    """aihwkit: BufferedTransferCompound's threshold is thres_scale x the slow device's
    (W's) dw_min, the chopped compounds' buffer_granularity x the fast one's (P's)."""
    kw = {} if cls is TTv2 else dict(in_chop_prob=0.5)
    alg = cls(ExactBackend(dw=0.01), (1, 1), lr=1.0, transfer_lr=0.75, forget_buffer=False,
              **kw)
    alg.tiles["P"].dw_min = 0.02  # P's pulses twice W's
    alg.tiles["P"].w[:] = 0.02
    alg.step(torch.zeros(1, 1))  # H = 0.75 x 0.02 = 0.015: over W's dw_min, under P's
    fired = 0.01 if cls is TTv2 else 0.0  # TTv2 fires and H gives back W's dw_min
    assert float(alg.H) == pytest.approx(0.015 - fired)


# -- chopped TTv2 ---------------------------------------------------------------------------
def test_chopped_ttv2_writes_chopped_gradients_and_unchops_the_transfer():
    """P <- P - lr (c_out c_in^T) grad; H <- H + b c_out c_in P (forget_buffer: H reset to
    0 where it fired); the x, d path chops x by c_in and d by c_out (the same P)."""
    dw, lr, b = 0.001, 0.5, 0.2
    grads = [torch.tensor([[0.02, -0.01, 0.004], [-0.03, 0.0, 0.011]]),
             torch.tensor([[0.001, 0.02, -0.006], [0.01, -0.02, 0.0]])]
    alg = ChoppedTTv2(ExactBackend(dw=dw), (2, 3), lr=lr, transfer_lr=b, in_chop_prob=0.0)
    alg.in_chopper[:] = [False, True, False]
    alg.out_chopper[:] = [True, False]
    sign = torch.tensor([[-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])
    p, h, w = torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)
    for grad in grads:
        alg.step(grad)
        p = p - lr * sign * grad
        assert torch.allclose(alg.read("P"), p, atol=dw / 2 + 1e-7)  # stochastic rounding
        p = alg.read("P")
        h = h + b * sign * p
        fire = h.abs() >= dw
        w = w + torch.where(fire, torch.sign(h), torch.zeros_like(h)) * dw
        h = torch.where(fire, torch.zeros_like(h), h)
        assert torch.allclose(alg.H, h, atol=1e-7) and torch.allclose(alg.read("W"), w)
    assert alg.weight() is not None and torch.equal(alg.weight(), alg.read("W"))
    # x, d: the dense gradient d^T x of the chopped inputs is the chopped gradient
    x, d = torch.tensor([[1.0, -0.5, 0.25]]), torch.tensor([[0.2, -0.4]])
    dense = ChoppedTTv2(ExactBackend(dw=1e-6), (2, 3), lr=1.0, transfer_lr=0.0,
                        in_chop_prob=0.0)
    dense.in_chopper[:], dense.out_chopper[:] = alg.in_chopper, alg.out_chopper
    dense.step(x=x, d=d)
    assert torch.allclose(dense.read("P"), -sign * (d.t() @ x), atol=1e-5)


def test_chopper_flips_regular_random_and_output():
    """Regular: all input choppers flip together once every max(ceil(1/p), 2) full
    cycles; random: each after its column's transfer with probability p; the output
    choppers after the last column with out_chop_prob."""
    reg = ChoppedTTv2(ExactBackend(), (2, 3), lr=0.1, transfer_lr=0.1, transfer="column",
                      in_chop_prob=0.3, in_chop_random=False)
    assert reg.period == 4
    states = []
    for _ in range(3 * 12):  # 12 full cycles, one column a step
        reg.step(torch.zeros(2, 3))
        states.append(reg.in_chopper.copy())
    assert reg.transfer_count == 12
    flips = [k for k in range(1, len(states)) if not np.array_equal(states[k], states[k - 1])]
    assert flips == [9, 10, 11, 21, 22, 23, 33, 34, 35][:len(flips)] and len(flips) == 9
    rnd = ChoppedTTv2(ExactBackend(), (40, 200), lr=0.1, transfer_lr=0.1, in_chop_prob=0.1,
                      out_chop_prob=0.5, seed=4)
    n_in = n_out = 0
    for _ in range(50):
        before_in, before_out = rnd.in_chopper.copy(), rnd.out_chopper.copy()
        rnd.step(torch.zeros(40, 200))
        n_in += int((rnd.in_chopper != before_in).sum())
        n_out += int((rnd.out_chopper != before_out).sum())
    assert abs(n_in / (50 * 200) - 0.1) < 4 * math.sqrt(0.09 / 10_000)
    assert abs(n_out / (50 * 40) - 0.5) < 4 * math.sqrt(0.25 / 2000)
    for bad in (dict(in_chop_prob=1.5), dict(out_chop_prob=-0.1), dict(in_chop_prob=math.nan)):
        with pytest.raises(ValueError, match="must lie in"):
            ChoppedTTv2(ExactBackend(), (1, 2), lr=0.1, transfer_lr=0.1, **bad)


# -- AGAD -----------------------------------------------------------------------------------
def agad_reference(reads: list[np.ndarray], b: float, n: int, tail: float, dw: float
                   ) -> tuple[list[np.ndarray], np.ndarray]:
    """DynamicTransferCompound's transfer for one column of one device, full cycles, as
    its docstring and source state it: returns the pulses and the final buffer."""
    s = min(tail / n, 1.0)
    mean = ref = h = 0.0
    chop, switched, count, pulses = 1.0, False, 0, []
    for val in reads:
        sample = count % n + 1
        if switched:
            ref = mean
        switched = False
        h += b * chop * (val - ref)
        fired = abs(h) >= dw
        pulses.append(float(np.sign(h)) if fired and count > n else 0.0)
        if fired:
            h = 0.0  # forget_buffer with momentum 0
        mean = mean * (1 - s) + val * s
        if sample == n:
            chop, switched = -chop, True
        count += 1
    return pulses, np.float32(h)


def test_agad_tracks_the_reference_from_the_reads_of_p():
    """Per transfer: the reference takes the running mean of P's reads when the chopper
    has just flipped; H gets b c (read - reference); no pulse reaches W in the first n
    cycles; then P's constant offset never enters H (a P that sits still fires nothing)."""
    dw, b, p_prob, tail = 0.01, 0.5, 0.25, 2.0
    alg = AGAD(ExactBackend(dw=dw), (1, 1), lr=1.0, transfer_lr=b, in_chop_prob=p_prob,
               tail_weightening=tail)
    assert alg.period == 4 and not alg.in_chop_random and alg.forget_buffer
    gen = torch.Generator().manual_seed(0)
    reads, pulses = [], []
    for _ in range(30):
        g = torch.randn(1, 1, generator=gen) * 0.02
        before = alg.read("W")
        alg.step(g)
        reads.append(float(alg.read("P")))
        pulses.append(float((alg.read("W") - before) / dw))
    want, h = agad_reference(reads, b, 4, tail, dw)
    assert pulses == pytest.approx(want, abs=1e-4) and any(want)
    assert float(alg.H) == pytest.approx(float(h), abs=1e-6)
    still = AGAD(ExactBackend(dw=dw), (1, 3), lr=1.0, transfer_lr=b, in_chop_prob=0.5)
    still.tiles["P"].w[:] = 0.3  # an offset (a symmetric point away from 0), no gradient
    for _ in range(40):
        still.step(torch.zeros(1, 3))
    assert float(still.read("W").abs().max()) == 0.0 and torch.allclose(
        still.reference, torch.full((1, 3), 0.3))
    with pytest.raises(ValueError, match="in_chop_prob > 0"):
        AGAD(ExactBackend(), (1, 2), lr=0.1, transfer_lr=0.1, in_chop_prob=0.0)
    with pytest.raises(ValueError, match="no output choppers"):
        AGAD(ExactBackend(), (1, 2), lr=0.1, transfer_lr=0.1, out_chop_prob=0.1)


# -- mixed precision ------------------------------------------------------------------------
def test_mixed_precision_accumulates_digitally_and_transfers_whole_pulses_row_by_row():
    dw = 0.01
    alg = MixedPrecision(ExactBackend(dw=dw), (3, 2), lr=1.0, transfer_every=2,
                         n_rows_per_transfer=2)
    g1 = torch.tensor([[0.013, -0.025], [0.0, 0.049], [-0.031, 0.002]])
    alg.step(g1)  # step 1: accumulate only
    assert torch.equal(alg.chi, -g1) and float(alg.read("W").abs().max()) == 0.0
    alg.step(g1)  # step 2: rows 0 and 1 transfer trunc(chi / dw) pulses, keep the rest
    chi = -2 * g1
    n = torch.trunc(chi / dw)
    assert torch.allclose(alg.read("W")[:2], n[:2] * dw, atol=1e-7)
    assert float(alg.read("W")[2].abs().max()) == 0.0 and alg.row == 2
    assert torch.allclose(alg.chi[:2], chi[:2] - n[:2] * dw, atol=1e-7)
    assert torch.allclose(alg.chi[2], chi[2])
    alg.step(torch.zeros(3, 2))
    alg.step(torch.zeros(3, 2))  # rows 2 and 0 (cycling)
    assert torch.allclose(alg.read("W")[2], n[2] * dw, atol=1e-7) and alg.row == 1
    # granularity x transfer_lr / dw_min pulses a whole step of chi
    half = MixedPrecision(ExactBackend(dw=dw), (1, 2), lr=1.0, granularity=0.02,
                          transfer_lr=0.5)
    half.step(torch.tensor([[-0.065, 0.041]]))
    assert torch.allclose(half.read("W"), torch.tensor([[0.03, -0.02]]), atol=1e-7)
    assert torch.allclose(half.chi, torch.tensor([[0.005, -0.001]]), atol=1e-7)
    # x, d with bins: each sample quantized to k max|v| / (bins // 2) before the product
    q = MixedPrecision(ExactBackend(dw=1.0), (2, 3), lr=1.0, n_x_bins=4, n_d_bins=2,
                       stoc_round_x=False, stoc_round_d=False)
    x, d = torch.tensor([[0.9, -0.2, 0.5]]), torch.tensor([[0.3, -0.1]])
    q.step(x=x, d=d)
    qx, qd = torch.tensor([[0.9, 0.0, 0.45]]), torch.tensor([[0.3, 0.0]])
    assert torch.allclose(q.chi, -(qd.t() @ qx), atol=1e-6)
    with pytest.raises(ValueError, match="update='outer' does not apply"):
        MixedPrecision(ExactBackend(), (1, 2), lr=0.1, update="outer")
    with pytest.raises(ValueError, match="n_x_bins"):
        MixedPrecision(ExactBackend(), (1, 2), lr=0.1, n_x_bins=1)
    with pytest.raises(NonFiniteError):
        MixedPrecision(ExactBackend(), (1, 2), lr=0.1).step(torch.tensor([[math.nan, 0.0]]))


# -- fixed points on the scalar toy ---------------------------------------------------------
@pytest.mark.slow
def test_chopping_removes_the_asymmetry_bias_that_analog_sgd_and_ttv2_keep():
    """Asymmetric devices (linear, asym 0.3: symmetric point 0.3), gradient noise 0.5,
    started at w* = 0.5. Analog SGD drifts to its implicit-penalty point (below w*), TTv2
    (P read as it is) settles about 0.1 above w*, c-TTv2's choppers remove most of that
    (P's offset enters H with alternating signs; what remains comes from those random
    pulses on W's own asymmetric devices), AGAD's tracked reference removes the offset
    itself: within 0.02 of w*."""
    common = dict(w0=W_STAR, dw_min=1e-2, asym=0.3, n=60)
    chop = dict(transfer_lr=0.003, in_chop_prob=0.02)
    sgd, _ = scalar_run(AnalogSGD, 0.2, 1000, 0.5, **common)
    ttv2, _ = scalar_run(TTv2, 0.2, 1000, 0.5, transfer_lr=0.003, **common)
    ctt, _ = scalar_run(ChoppedTTv2, 0.2, 1000, 0.5, **chop, **common)
    agad, _ = scalar_run(AGAD, 0.2, 1000, 0.5, **chop, **common)
    assert sgd - W_STAR < -0.04, sgd
    assert ttv2 - W_STAR > 0.07, ttv2
    assert abs(ctt - W_STAR) < 0.045 and abs(ctt - W_STAR) < 0.5 * (ttv2 - W_STAR), ctt
    assert abs(agad - W_STAR) < 0.02, agad


@pytest.mark.slow
def test_mixed_precision_bias_shrinks_as_chi_averages_more_steps():
    """transfer_every 1 writes every step's noise as pulses: Analog SGD's bias; averaging
    k steps in chi first cuts the pulses' noise (about as 1 / sqrt(k)) and the bias with
    it; without gradient noise it converges exactly."""
    common = dict(dw_min=1e-2, asym=0.3, n=60)
    b1, _ = scalar_run(MixedPrecision, 0.05, 1000, 0.5, w0=W_STAR, **common)
    b16, _ = scalar_run(MixedPrecision, 0.05, 1000, 0.5, w0=W_STAR, transfer_every=16,
                        **common)
    assert b1 - W_STAR < -0.04 and abs(b16 - W_STAR) < 0.5 * abs(b1 - W_STAR), (b1, b16)
    exact, err = scalar_run(MixedPrecision, 0.1, 1000, 0.0, w0=0.0, **common)
    assert abs(exact - W_STAR) < 3e-3 and err < 5e-3


# -- state, resume, make_algorithm ------------------------------------------------------------
SIM = "sim://?model=power&gamma=0.5&tau=0.6&c2c=0.1&read_noise=0.002&seed=5"
KW = {"chopped_ttv2": dict(transfer_lr=0.3, transfer="column", in_chop_prob=0.3,
                           out_chop_prob=0.2),
      "agad": dict(transfer_lr=0.3, in_chop_prob=0.5, in_chop_random=True),
      "mixed_precision": dict(transfer_every=2, n_rows_per_transfer=3, random_row=True,
                              n_x_bins=6, n_d_bins=4)}


@pytest.mark.parametrize("name", list(KW))
def test_resume_from_state_dict_is_bit_identical(name):
    """Run 24 steps straight, or 12, a checkpoint (state_dict through torch.save and a
    weights-only load, the emulator's snapshot), a fresh backend and algorithm, 12 more:
    the same weights, buffers and choppers bit for bit (x, d path: pulse trains)."""
    import io

    def build(be):
        return make_algorithm(name, be, (5, 4), lr=0.05, seed=7, prefix="fc", **KW[name])

    def steps(alg, k, start):
        for i in range(start, start + k):
            gen = torch.Generator().manual_seed(i)
            alg.step(x=torch.randn(3, 4, generator=gen), d=torch.randn(3, 5, generator=gen))

    with open_backend(SIM) as be:
        straight = build(be)
        steps(straight, 24, 0)
        want = (straight.read("W"), straight.state_dict())
    with open_backend(SIM) as be:
        first = build(be)
        steps(first, 12, 0)
        buf = io.BytesIO()
        torch.save({"alg": first.state_dict(), "be": be.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    with open_backend(SIM) as be:
        be.load_state_dict(saved["be"])
        again = build(be)
        again.load_state_dict(saved["alg"])
        steps(again, 12, 12)
        assert torch.equal(again.read("W"), want[0])
        got = again.state_dict()
    for key, value in want[1].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, got[key]), key
        elif key != "gen":
            assert value == got[key], key
    assert torch.equal(want[1]["gen"], got["gen"])


def test_make_algorithm_refuses_options_of_other_algorithms():
    be = ExactBackend()
    for name, kw in (("rlv2", dict(in_chop_prob=0.1)), ("agad", dict(out_chop_prob=0.1)),
                     ("tiki_taka", dict(max_steps=2)), ("ttv2", dict(n_x_bins=4)),
                     ("analog_sgd", dict(granularity=0.1))):
        with pytest.raises(ValueError, match="applies to"):
            make_algorithm(name, be, (2, 2), lr=0.1, transfer_lr=0.1, **kw)
    mp = make_algorithm("mixed_precision", be, (2, 2), lr=0.1, transfer_lr=1.0, gamma=0.3,
                        transfer="column", zero_shift=True, prefix="mp")
    assert isinstance(mp, MixedPrecision) and set(mp.tiles) == {"W"}
    with pytest.raises(ValueError, match="columns_per_transfer applies"):
        make_algorithm("ttv2", be, (2, 2), lr=0.1, transfer_lr=0.1, columns_per_transfer=2,
                       prefix="t")


def test_columns_per_transfer_transfers_k_columns_a_step_in_order():
    alg = ChoppedTTv2(ExactBackend(), (2, 5), lr=0.1, transfer_lr=0.1, transfer="column",
                      columns_per_transfer=3, in_chop_prob=0.0)
    alg.step(torch.zeros(2, 5))
    assert alg.column == 3 and alg.transfer_count == 0
    alg.step(torch.zeros(2, 5))
    assert alg.column == 1 and alg.transfer_count == 1


@pytest.mark.parametrize("cls,kw", [
    (ChoppedTTv2, dict(in_chop_prob=1.0, in_chop_random=True)),  # flips after every read
    (AGAD, dict(in_chop_prob=0.5)),  # n = 2: flips after every 2nd full cycle
])
def test_transfer_unit_sample_interleaves_updates_and_transfers_as_aihwkit(cls, kw):
    """transfer_unit='sample' (aihwkit's units_in_mbatch=False, one column a sample): sample
    k's update of P, then one column's transfer, then sample k + 1's update: each transfer
    reads P part-way through the batch, and a chopper flip at a transfer changes the sign
    of the later samples' pulses in the same batch. 'step' updates with the whole batch
    first (one command) and then transfers."""
    dw = 0.01
    alg = cls(ExactBackend(dw=dw), (1, 1), lr=1.0, transfer_lr=0.1, transfer="column",
              transfer_unit="sample", **kw)
    reads, signs = [], []
    transfer, transfer_p = alg._transfer, alg.transfer_p

    def logged_read(cols):
        p = transfer_p(cols)
        reads.append(float(p))
        return p

    def logged_transfer(cols, p=None):
        transfer(cols, p)
        signs.append(-1 if alg.in_chopper[0] else 1)  # the sign after this transfer
    alg.transfer_p, alg._transfer = logged_read, logged_transfer
    x, d = torch.ones(6, 1), torch.full((6, 1), -0.05)  # each sample wants P += 0.05
    alg.step(x=x, d=d)  # one step of a batch of 6
    cmds = [int(c) for c in alg.tiles["P"].commands]
    want = [5 * s for s in [1] + signs[:-1]]  # each sample under the sign then in force
    assert cmds == want and len(set(want)) == 2  # the sign did change mid-batch
    assert reads == pytest.approx(list(np.cumsum(want) * dw), abs=1e-7)  # partial batch
    assert alg.sample_count == 6 and alg.step_count == 1
    whole = cls(ExactBackend(dw=dw), (1, 1), lr=1.0, transfer_lr=0.1, transfer="column",
                **kw)
    whole.step(x=x, d=d)
    assert [int(c) for c in whole.tiles["P"].commands] == [30]


def test_transfer_unit_sample_counts_samples_across_steps_and_validates():
    alg = TTv2(ExactBackend(), (2, 5), lr=0.1, transfer_lr=0.1, transfer="column",
               transfer_every=3, transfer_unit="sample")
    x, d = torch.zeros(2, 5), torch.zeros(2, 2)
    columns = []
    for _ in range(4):  # 2 samples a step: transfers after samples 3, 6 (steps 2, 3)
        alg.step(x=x, d=d)
        columns.append(alg.column)
    assert columns == [0, 1, 2, 2] and alg.sample_count == 8
    assert alg.state_dict()["sample_count"] == 8
    with pytest.raises(ValueError, match="needs step\\(x=, d=\\)"):
        alg.step(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="3 samples but d holds 2"):
        alg.step(x=torch.zeros(3, 5), d=d)
    with pytest.raises(ValueError, match="transfer_unit must be"):
        TTv2(ExactBackend(), (2, 2), lr=0.1, transfer_lr=0.1, transfer_unit="batch")
    with pytest.raises(ValueError, match="applies to"):
        make_algorithm("mixed_precision", ExactBackend(), (2, 2), lr=0.1,
                       transfer_unit="sample")
    # a non-finite sample anywhere in the batch: refused before the first sample's pulses
    bad = ChoppedTTv2(ExactBackend(), (1, 2), lr=1.0, transfer_lr=0.1, transfer="column",
                      transfer_unit="sample")
    with pytest.raises(NonFiniteError):
        bad.step(x=torch.tensor([[1.0, 0.0], [math.nan, 0.0]]), d=torch.ones(2, 1))
    assert all(t.commands == [] for t in bad.tiles.values()) and bad.sample_count == 0


@pytest.mark.parametrize("name", ["chopped_ttv2", "agad"])
def test_transfer_unit_sample_at_batch_one_is_the_step_form(name):
    """With one sample a step both units give the same run bit for bit (outer_update on
    sim://, transfer reads through the periphery)."""
    def run(unit: str) -> list[torch.Tensor]:
        with open_backend("sim://?seed=3&model=power&gamma=0.5&c2c=0.1") as be:
            a = make_algorithm(name, be, (4, 6), lr=0.1, transfer_lr=0.5, transfer="column",
                               transfer_read="mvm", in_chop_prob=0.3, seed=5,
                               update="outer", transfer_unit=unit)
            g = torch.Generator().manual_seed(0)
            for _ in range(40):
                a.step(x=torch.randn(1, 6, generator=g), d=torch.randn(1, 4, generator=g))
            return [a.read("W"), a.read("P"), a.H.clone()]

    assert all(torch.equal(u, v) for u, v in zip(run("step"), run("sample"), strict=True))


# -- hil train ------------------------------------------------------------------------------
TRAIN = {
    "name": "tiny", "seed": 1, "backend": "sim://?model=power&gamma=0.5&tau=0.6&c2c=0.1&seed=3",
    "model": {"hidden": [8], "activation": "tanh"},
    "data": {"name": "digits", "limit_train": 60, "limit_test": 40},
    "train": {"epochs": 2, "batch_size": 10, "checkpoint_every": 4},
}
ALGS = {
    "chopped_ttv2": {"name": "chopped_ttv2", "lr": 0.1, "transfer_lr": 0.2,
                     "transfer": "column", "columns_per_transfer": 2, "in_chop_prob": 0.3,
                     "out_chop_prob": 0.1},
    "agad": {"name": "agad", "lr": 0.1, "transfer_lr": 0.2, "in_chop_prob": 0.5,
             "tail_weightening": 2.0, "forget_buffer": False, "buffer_cap": 4.0,
             "transfer": "column", "transfer_unit": "sample"},
    "mixed_precision": {"name": "mixed_precision", "lr": 0.1, "transfer_every": 2,
                        "n_x_bins": 8, "n_d_bins": 4},
}


@pytest.mark.parametrize("name", list(ALGS))
def test_hil_train_yaml_runs_and_resumes_bit_identical(tmp_path, name):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**TRAIN, "algorithm": ALGS[name]}))
    cfg = load_config(path)
    if name == "mixed_precision":
        assert cfg.algorithm.transfer_lr == 1.0  # its default, not the two-tile one
    full = train_run(cfg, tmp_path / "full", progress=False)
    assert full.completed and full.global_step == 12
    cut = train_run(cfg, tmp_path / "cut", progress=False, stop_after_steps=10)
    assert not cut.completed
    resumed = train_run(cfg, tmp_path / "cut", progress=False, resume=True)
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    for tile, entry in a["backend"].items():
        assert torch.equal(entry["w"], b["backend"][tile]["w"]), tile
    for sa, sb in zip(a["optimizer"]["algorithms"], b["optimizer"]["algorithms"], strict=True):
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), key
    assert resumed.metrics["test_acc"].tolist() == full.metrics["test_acc"].tolist()


@pytest.mark.parametrize("algorithm,field", [
    ({"name": "rlv2", "in_chop_prob": 0.1}, "algorithm.in_chop_prob"),
    ({"name": "agad", "out_chop_prob": 0.1}, "algorithm.out_chop_prob"),
    ({"name": "mixed_precision", "n_x_bins": 1}, "algorithm.n_x_bins"),
    ({"name": "chopped_ttv2", "columns_per_transfer": 4}, "algorithm.columns_per_transfer"),
    ({"name": "mixed_precision", "transfer_unit": "sample"}, "algorithm.transfer_unit"),
    ({"name": "agad", "transfer_unit": "batch"}, "algorithm.transfer_unit"),
    ({"name": "chopped_ttv2", "in_chop_prob": 2.0}, "algorithm.in_chop_prob"),
    ({"name": "agad", "forget_buffer": "yes"}, "algorithm.forget_buffer"),
])
def test_bad_option_is_one_line_exit_2(tmp_path, capsys, algorithm, field):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**TRAIN, "algorithm": algorithm}))
    with pytest.raises(SystemExit) as exc:
        main(["train", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err, err
    assert not (tmp_path / "out").exists()


# -- any backend: the virtual chip over visa:// -----------------------------------------------
@pytest.mark.parametrize("name", list(KW))
def test_same_run_bit_identical_on_sim_and_over_visa(name):
    """The chip driver has no outer_update: the dense gradient path, single pulses, one
    column at a time (pulse_columns), reads: the same weights bit for bit."""
    from drivers.virtual_chip import running

    url = "sim://?model=power&gamma=0.5&tau=0.6&d2d=0.2&c2c=0.1&seed=7"  # no read noise:
    # sim:// draws read noise for the columns read, the chip driver for the whole tile

    def run(u):
        with open_backend(u) as be:
            alg = make_algorithm(name, be, (4, 6), lr=0.1, seed=3, prefix="fc1",
                                 update="pulse", **KW[name])
            target = torch.linspace(-0.3, 0.3, 24).reshape(4, 6)
            for _ in range(12):
                alg.step(alg.weight() - target)
            return alg.read("W")

    ref = run(url)
    with running(url, "scpi", "tcp") as visa:
        assert visa.startswith("visa://")
        assert torch.equal(run(visa), ref)


# -- safety: the station's per-step budget, non-finite inputs -----------------------------------
def test_budget_refuses_or_clips_before_any_command():
    """A station's max_pulses_per_step bounds mixed precision's whole-pulse transfer and the
    chopped transfers' max_steps: refused before the first command (SafetyLimitError), or
    clipped by design with max_pulses (counted in clipped_pulses); non-finite x or d is
    refused with nothing sent."""
    from hil import Capabilities
    from hil.errors import SafetyLimitError

    def station(dw=0.01):
        be = ExactBackend(dw=dw)
        be.capabilities = Capabilities(max_pulses_per_step=2)
        return be

    mp = MixedPrecision(station(), (1, 2), lr=1.0)
    with pytest.raises(SafetyLimitError, match="max_pulses_per_step=2"):
        mp.step(torch.tensor([[-0.05, 0.0]]))  # 5 pulses wanted
    assert mp.tiles["W"].commands == []
    clip = MixedPrecision(station(), (1, 2), lr=1.0, max_pulses=2)
    clip.step(torch.tensor([[-0.05, 0.0]]))
    assert torch.allclose(clip.read("W"), torch.tensor([[0.02, 0.0]])) and \
        clip.clipped_pulses == 3
    ctt = ChoppedTTv2(station(), (1, 2), lr=1.0, transfer_lr=1.0, max_steps=3,
                      forget_buffer=False)
    ctt.tiles["P"].w[:] = 0.05
    with pytest.raises(SafetyLimitError):
        ctt.step(torch.zeros(1, 2))
    assert ctt.tiles["W"].commands == []
    for alg in (MixedPrecision(ExactBackend(), (1, 2), lr=1.0, prefix="a"),
                AGAD(ExactBackend(), (1, 2), lr=1.0, transfer_lr=0.1, prefix="b")):
        with pytest.raises(NonFiniteError):
            alg.step(x=torch.tensor([[math.inf, 0.0]]), d=torch.tensor([[1.0]]))
        assert all(t.commands == [] for t in alg.tiles.values())


def test_mixed_precision_refuses_an_update_that_breaks_chi_and_keeps_chi():
    """chi is checked once after the update, before it is kept: a gradient that is finite
    but overflows chi (NonFiniteError), or a chi beyond any pulse command (2^31 granules:
    SafetyLimitError, never wrapped to int32), is refused with chi as it was and nothing
    sent; a NaN gradient is named as the gradient."""
    from hil.errors import SafetyLimitError

    mp = MixedPrecision(ExactBackend(dw=0.01), (1, 2), lr=1.0, granularity=1e30,
                        transfer_every=5)
    mp.step(torch.tensor([[-3e38, 0.0]]))  # chi = 3e38: finite, within 2^31 granules
    before = mp.chi.clone()
    with pytest.raises(NonFiniteError, match="chi would not be finite"):
        mp.step(torch.tensor([[-3e38, 0.0]]))  # 6e38 overflows float32
    with pytest.raises(NonFiniteError, match="gradient"):
        mp.step(torch.tensor([[0.0, math.nan]]))
    assert torch.equal(mp.chi, before)
    big = MixedPrecision(ExactBackend(dw=0.01), (1, 2), lr=1.0)
    with pytest.raises(SafetyLimitError, match="beyond any pulse command"):
        big.step(x=torch.tensor([[1.0, 0.0]]), d=torch.tensor([[-3e7]]))  # 3e9 granules
    assert torch.equal(big.chi, torch.zeros(1, 2)) and big.tiles["W"].commands == []


def test_a_run_configured_before_these_options_still_resumes():
    """A checkpoint's config from before the new options (none of their keys) matches a
    config that leaves them unset: no 'differs from the run's config' refusal."""
    from hil.config import parse_config
    from hil.runs import config_changes

    cfg = parse_config({**TRAIN, "algorithm": {"name": "rlv2", "lr": 0.1}})
    old = cfg.model_dump()
    for key in ("buffer_granularity", "in_chop_prob", "granularity", "columns_per_transfer",
                "transfer_unit"):
        del old["algorithm"][key]
    assert config_changes(old, cfg.model_dump()) == []


@pytest.mark.parametrize("name", ["chopped_ttv2", "agad"])
def test_full_transfer_fused_with_pulse_read_matches_pulse_then_read(name, monkeypatch):
    """A full exact transfer fuses P's gradient pulses and its read (Tile.pulse_read); the
    chopped transfers take that read and end bit for bit where pulse-then-read ends."""
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        b = open_backend("sim://?seed=3&model=power&asym=0.3&c2c=0.1")
        a = make_algorithm(name, b, (4, 6), lr=0.1, transfer="full", transfer_lr=0.5,
                           in_chop_prob=0.3, seed=5)
        g = torch.Generator().manual_seed(0)
        for _ in range(12):
            a.step(torch.randn(4, 6, generator=g))
        return a.weight(), a.H.clone()

    fused = run()
    monkeypatch.setattr(_TwoTile, "_fused", lambda self, x, d: False)
    assert all(torch.equal(u, v) for u, v in zip(fused, run(), strict=True))
