"""The analog training algorithms: pulse rounding, the update paths, the transfers of
PAPER.md checked exactly on an ideal backend, schedules, zero-shifting and state."""

from __future__ import annotations

import pytest
import torch

from hil import Backend, Capabilities, Tile, open_backend
from hil.algorithms import (
    AnalogSGD,
    ResidualLearning,
    ResidualLearningV2,
    TikiTaka,
    TTv2,
    make_algorithm,
    stochastic_round,
)
from hil.errors import BackendError, UnsupportedOperation


class ExactTile(Tile):
    """Ideal devices: every pulse moves the weight by exactly dw_min; logs each command."""

    def __init__(self, backend, name, rows, cols):
        super().__init__(backend, name, rows, cols, backend.dw)
        self.w = torch.zeros(rows, cols)
        self.commands: list[torch.Tensor] = []

    def read(self) -> torch.Tensor:
        return self.w.clone()

    def _pulse(self, n: torch.Tensor) -> None:
        self.commands.append(n.clone())
        self.w = self.w + n.float() * self.dw_min


class ExactBackend(Backend):
    def __init__(self, dw: float = 0.01, limit: int = 2**31 - 1):
        super().__init__("exact://")
        self.dw = dw
        self.capabilities = Capabilities(max_pulses_per_command=limit)

    def _allocate(self, name, rows, cols):
        return ExactTile(self, name, rows, cols)


def test_stochastic_round_is_unbiased_and_seeded():
    x = torch.full((200_000,), 2.3)
    a = stochastic_round(x, torch.Generator().manual_seed(1))
    b = stochastic_round(x, torch.Generator().manual_seed(1))
    assert a.dtype == torch.int32 and torch.equal(a, b)
    assert set(a.unique().tolist()) == {2, 3}
    assert abs(a.float().mean().item() - 2.3) < 0.005
    neg = stochastic_round(torch.full((100_000,), -0.25), torch.Generator().manual_seed(2))
    assert set(neg.unique().tolist()) == {-1, 0}
    assert abs(neg.float().mean().item() + 0.25) < 0.005


def test_analog_sgd_pulses_minus_lr_grad_over_dw_min():
    be = ExactBackend(dw=0.01)
    alg = AnalogSGD(be, (2, 3), lr=0.1, prefix="fc")
    grad = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    alg.step(grad)
    n = be.tile("fc.W").commands[-1]
    assert torch.equal(n, torch.tensor([[-10, 20, -5], [0, -30, 10]], dtype=torch.int32))
    assert torch.allclose(alg.weight(), -0.1 * grad)


def test_pulses_are_split_at_the_backend_limit():
    be = ExactBackend(dw=0.01, limit=4)
    alg = AnalogSGD(be, (1, 2), lr=1.0)
    alg.step(torch.tensor([[-0.1, 0.03]]))  # 10 and -3 pulses
    cmds = be.tile("layer.W").commands
    assert all(int(c.abs().max()) <= 4 for c in cmds)
    assert torch.equal(sum(cmds), torch.tensor([[10, -3]], dtype=torch.int32))


def test_residual_learning_transfer_and_weight_match_the_equations():
    be = ExactBackend(dw=0.001)
    alg = ResidualLearning(be, (1, 2), lr=0.5, transfer_lr=0.2, gamma=0.5)
    grad = torch.tensor([[0.4, -0.2]])
    alg.step(grad)
    p = -0.5 * grad  # P_1 = -alpha g
    assert torch.allclose(alg.read("P"), p, atol=1e-6)
    # W_1 = beta P_1 up to one stochastic-rounding pulse
    assert torch.allclose(alg.read("W"), 0.2 * p, atol=1e-3 + 1e-6)
    assert torch.allclose(alg.weight(), alg.read("W") + 0.5 * alg.read("P"))
    tt = TikiTaka(ExactBackend(), (1, 2), lr=0.5, transfer_lr=0.2)
    assert tt.gamma == 0.0


@pytest.mark.parametrize("cls,decay", [(ResidualLearningV2, True), (TTv2, False)])
def test_buffered_threshold_transfer_is_exact(cls, decay):
    dw, beta = 0.01, 0.3
    be = ExactBackend(dw=dw)
    alg = cls(be, (1, 3), lr=1.0, transfer_lr=beta)
    h = torch.zeros(1, 3)
    w = torch.zeros(1, 3)
    grads = [torch.tensor([[-0.05, 0.02, 0.0]]), torch.tensor([[-0.01, 0.03, -0.004]])]
    for g in grads:
        alg.step(g)
        p = alg.read("P")
        h = (1 - beta) * h + beta * p if decay else h + beta * p
        fire = torch.where(h.abs() >= dw, torch.sign(h), torch.zeros_like(h))
        h = h - fire * dw
        w = w + fire * dw
        assert torch.allclose(alg.H, h, atol=1e-6)
        assert torch.allclose(alg.read("W"), w, atol=1e-6)
    assert int(be.tile("layer.W").commands[-1].abs().max()) <= 1  # one pulse per transfer
    if cls is TTv2:
        assert torch.equal(alg.weight(), alg.read("W"))  # gradient taken at W


def test_column_schedule_cycles_columns_every_k_steps():
    be = ExactBackend(dw=0.001)
    alg = ResidualLearning(be, (2, 3), lr=1.0, transfer_lr=1.0, transfer="column",
                           transfer_every=2)
    g = -0.1 * torch.ones(2, 3)
    touched = []
    for _ in range(6):
        before = alg.read("W").clone()
        alg.step(g)
        touched.append((alg.read("W") - before).abs().sum(0).gt(0).nonzero().flatten().tolist())
    assert touched == [[], [0], [], [1], [], [2]]
    assert alg.column == 0


def test_pulse_train_transfer_writes_transfer_lr_p_into_its_column_only():
    """transfer_write='pulse_train': W[:, j] += transfer_lr * P[:, j] through outer_update
    (one one-hot sample), near-linear devices: the mean over 400 transfers matches, the
    other columns stay put; 'counts' is the default and a bad value one clear error."""
    url = "sim://?model=linear&tau=100&dw_min=1e-3&io=ideal&seed=4"
    with open_backend(url) as sim:
        alg = TikiTaka(sim, (4, 3), lr=0.1, transfer_lr=0.5, transfer="column",
                       transfer_write="pulse_train")
        p = torch.tensor([[0.02], [-0.01], [0.004], [0.0]])
        alg.tiles["P"].w[:, 1:2] = p
        alg.column = 1
        for _ in range(400):
            alg._transfer(alg._columns())
            alg.column = 1
        w = alg.read("W")
        assert torch.allclose(w[:, 1:2] / 400, 0.5 * p, atol=6e-4)  # ~4 SE
        assert float(w[:, 1].abs().max()) > 3.0 and float(w[:, [0, 2]].abs().max()) == 0.0
    assert TikiTaka(ExactBackend(), (2, 2), lr=0.1, transfer_lr=0.1).transfer_write == "counts"
    with pytest.raises(ValueError, match="transfer_write must be"):
        TikiTaka(ExactBackend(), (2, 2), lr=0.1, transfer_lr=0.1, transfer_write="train")
    with pytest.raises(ValueError, match="declares no outer_update"):
        TikiTaka(ExactBackend(), (2, 2), lr=0.1, transfer_lr=0.1, transfer_write="pulse_train")


def test_transfer_read_through_the_periphery():
    """transfer_read='mvm' reads P's columns with one-hot MVMs: exactly read_p's columns
    with ideal I/O, within the ADC's resolution (24 / 510) and noise through the paper's."""
    for io, tol in (("ideal", 0.0), ("paper", 24 / 510 + 4 * 0.06)):
        with open_backend(f"sim://?model=linear&tau=0.6&io={io}&seed=2") as sim:
            alg = ResidualLearningV2(sim, (5, 4), lr=0.1, transfer_lr=0.1, gamma=0.1,
                                     transfer_read="mvm")
            alg.tiles["P"].w.uniform_(-0.3, 0.3)
            got, want = alg.transfer_p(slice(1, 3)), alg.read_p(slice(1, 3))
            assert got.shape == (5, 2)
            assert float((got - want).abs().max()) <= tol + 1e-7
    with open_backend("sim://?seed=1") as sim:  # by config name, as hil train builds them
        tt = make_algorithm("tiki_taka", sim, (3, 2), lr=0.1, transfer_lr=0.1,
                            transfer_read="mvm", transfer_write="pulse_train", prefix="a")
        assert (tt.transfer_read, tt.transfer_write) == ("mvm", "pulse_train")
        assert make_algorithm("analog_sgd", sim, (3, 2), lr=0.1, transfer_read="mvm",
                              prefix="b").lr == 0.1
        with pytest.raises(ValueError, match="transfer_write applies to tiki_taka"):
            make_algorithm("rlv2", sim, (3, 2), lr=0.1, transfer_lr=0.1, prefix="c",
                           transfer_write="pulse_train")
    with pytest.raises(ValueError, match="declares no mvm"):
        TikiTaka(ExactBackend(), (2, 2), lr=0.1, transfer_lr=0.1, transfer_read="mvm")
    with pytest.raises(ValueError, match="transfer_read must be"):
        TikiTaka(ExactBackend(), (2, 2), lr=0.1, transfer_lr=0.1, transfer_read="adc")


def test_mvm_read_summed_reads_the_weighted_sum_as_one_array():
    """mvm_read='summed' reads W + gamma P through one periphery pass (backend.mvm_sum):
    with ideal I/O it is weight() x; through the paper's periphery it is one noise draw and
    one ADC, a single tile.mvm of the summed weights (float rounding of the sum apart: at
    most one ADC level, rarely)."""
    x = torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with open_backend("sim://?model=linear&tau=0.6&io=ideal&seed=3") as sim:
        alg = ResidualLearningV2(sim, (3, 5), lr=0.1, transfer_lr=0.1, gamma=0.25,
                                 mvm_read="summed")
        alg.tiles["P"].w.uniform_(-0.3, 0.3)
        assert torch.allclose(alg.mvm(x), x @ alg.weight().t(), atol=1e-6)
        assert torch.allclose(alg.mvm(alg.mvm(x), transpose=True),
                              alg.mvm(x) @ alg.weight(), atol=1e-6)
    outs = {}
    for how in ("summed", "copy"):
        with open_backend("sim://?model=linear&tau=0.6&io=paper&seed=3") as sim:
            alg = ResidualLearningV2(sim, (3, 5), lr=0.1, transfer_lr=0.1, gamma=0.25,
                                     mvm_read="summed", prefix="L")
            alg.tiles["P"].w.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(1))
            if how == "summed":
                outs[how] = alg.mvm(x)
            else:  # the summed weights on W itself, read by W's own mvm (same noise stream)
                w = alg.tiles["W"]
                w.w = (w.w + 0.25 * alg.tiles["P"].w).contiguous()
                outs[how] = w.mvm(x)
    level = 2 * 12.0 / (2**9 - 2) * x.abs().amax(dim=1, keepdim=True)
    diff = (outs["summed"] - outs["copy"]).abs()
    assert bool((diff <= level * 1.0001).all()) and float((diff > 0).float().mean()) < 0.1
    with open_backend("sim://?seed=1") as sim:  # by config name; AnalogSGD ignores it
        alg = make_algorithm("rlv2", sim, (3, 2), lr=0.1, transfer_lr=0.1, gamma=0.1,
                             mvm_read="summed", prefix="a")
        assert alg.mvm_read == "summed"
        assert make_algorithm("analog_sgd", sim, (3, 2), lr=0.1, mvm_read="summed",
                              prefix="b").mvm_read == "tiles"
        other = ResidualLearning(sim, (2, 2), lr=0.1, transfer_lr=0.1, gamma=0.1, prefix="c")
        with pytest.raises(BackendError, match="the first term's"):
            sim.mvm_sum([(alg.tiles["W"], 1.0), (other.tiles["P"], 0.1)], x[:, :2])
    with pytest.raises(ValueError, match="declares no mvm_sum"):
        ResidualLearning(ExactBackend(), (2, 2), lr=0.1, transfer_lr=0.1, mvm_read="summed")
    exact = ExactBackend()
    with pytest.raises(UnsupportedOperation, match="weighted sum"):  # the contract's default
        exact.mvm_sum([(exact.allocate("w", 2, 2), 1.0)], torch.ones(1, 2))
    with pytest.raises(ValueError, match="mvm_read must be"):
        ResidualLearning(ExactBackend(), (2, 2), lr=0.1, transfer_lr=0.1, mvm_read="sum")


def test_outer_update_path_and_dense_fallback_agree_in_expectation():
    x = torch.tensor([[1.0, 0.5, -0.25]])
    d = torch.tensor([[0.2, -0.4]])
    expected = -0.5 * d.t() @ x
    # ideal backend without outer_update: dense gradient d^T x as pulses
    be = ExactBackend(dw=1e-4)
    alg = AnalogSGD(be, (2, 3), lr=0.5)
    alg.step(x=x, d=d)
    assert torch.allclose(alg.weight(), expected, atol=2e-4)
    # the emulator's stochastic pulse trains: the batch of 800 copies of (x, d / 800) has
    # the same sum (at most 12.5 pulses a sample, within the train length); the counts
    # are about Poisson, so the spread is sqrt(pulses) * dw_min: 0.002 for the largest
    # entry (10,000 pulses of 2e-5), whatever the batch
    url = "sim://?model=linear&tau=100&dw_min=2e-5&io=ideal&seed=3"
    with open_backend(url) as sim:
        alg = AnalogSGD(sim, (2, 3), lr=0.5)
        assert alg.use_outer(x, d)
        alg.step(x=x.repeat(800, 1), d=d.repeat(800, 1) / 800)
        assert torch.allclose(alg.weight(), expected, atol=0.012)
    pulse_only = AnalogSGD(ExactBackend(), (2, 3), lr=0.5, update="pulse")
    assert not pulse_only.use_outer(x, d)


def test_same_run_is_bit_identical_on_two_backends_and_after_state_restore():
    def run(steps, alg=None, be=None):
        be = be or open_backend("sim://?model=power&gamma=0.5&tau=0.6&c2c=0.1&seed=5")
        alg = alg or make_algorithm("rlv2", be, (4, 5), lr=0.01, transfer_lr=0.3, gamma=0.2,
                                    seed=11, prefix="fc1")
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            alg.step(torch.randn(4, 5, generator=gen))
        return alg, be

    a1, _ = run(10)
    a2, _ = run(10)
    assert torch.equal(a1.weight(), a2.weight()) and torch.equal(a1.H, a2.H)
    state = a1.state_dict()
    a1.step(torch.ones(4, 5))
    a2.load_state_dict(state)
    a2.step(torch.ones(4, 5))
    assert torch.equal(a1.weight(), a2.weight())
    assert a2.step_count == 11


def test_layers_share_a_backend_by_prefix_and_names_are_unique():
    with open_backend("sim://?seed=0") as be:
        AnalogSGD(be, (2, 2), lr=0.1, prefix="fc1")
        ResidualLearningV2(be, (3, 2), lr=0.1, transfer_lr=0.1, prefix="fc2")
        assert set(be.tiles()) == {"fc1.W", "fc2.W", "fc2.P"}
        with pytest.raises(Exception, match="already allocated"):
            AnalogSGD(be, (2, 2), lr=0.1, prefix="fc1")
    with pytest.raises(ValueError, match="unknown algorithm"):
        make_algorithm("adam", ExactBackend(), (1, 1), lr=0.1)


def test_zero_shift_reads_p_relative_to_its_symmetric_point():
    # asym 0.3, tau 1: the symmetric point of every device is at +0.3, not 0
    url = "sim://?model=linear&tau=1&asym=0.3&dw_min=5e-3&seed=2"
    with open_backend(url) as be:
        alg = ResidualLearning(be, (2, 3), lr=0.1, transfer_lr=0.1, gamma=0.5,
                               zero_shift=True, zero_shift_cycles=600)
        assert "layer.P_ref" in be.tiles()
        assert torch.allclose(alg.read("P"), torch.full((2, 3), 0.3), atol=0.02)
        assert alg.read_p().abs().max() < 0.01
        terms = alg.mvm_terms()
        assert [c for _, c in terms] == [1.0, 0.5, -0.5]
