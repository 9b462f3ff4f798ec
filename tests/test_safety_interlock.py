"""Runaway pulses: the per-step budget of the interlock, overflow-safe and integer-only
pulse counts, and non-finite values refused before any byte leaves the host. The virtual
chip's firmware (its log, device_pulses and count log) is the witness of what arrived."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import yaml

from drivers.chip_backend import ChipBackend
from drivers.chip_handlers import ScpiHandler, Session
from drivers.firmware import ChipFirmware
from drivers.profile import load_profile
from drivers.safety import Interlock
from drivers.scpi import ScpiLink
from drivers.transport import LoopbackTransport
from hil.algorithms import AnalogSGD, ResidualLearningV2, TikiTaka, stochastic_round
from hil.backend import open_backend
from hil.errors import ConfigError, NonFiniteError, SafetyLimitError
from hil.layers import AnalogLinear
from hil.optim import AnalogOptimizer
from hil.program import program

BUDGET = {
    "name": "budget",
    "chip": {"idn_contains": "virtual-chip", "pulse_dtype": "int16"},
    "pulses": {"potentiate": {"amplitude_v": 1.0, "width_s": 1e-6, "compliance_a": 1e-4},
               "depress": {"amplitude_v": -1.0, "width_s": 1e-6, "compliance_a": 1e-4}},
    "arrays": [{"rows": 16, "cols": 16}],
    "limits": {"max_amplitude_v": 1.5, "max_width_s": 2e-6, "max_compliance_a": 2e-4,
               "max_pulses_per_command": 8, "max_pulses_per_step": 20,
               "allowed_rows": [0, 15], "allowed_cols": [0, 15]},
}
MAX_COMMANDS = 200  # a guard: on the code before the budget a runaway step sent millions


def write_profile(path, **limits):
    data = yaml.safe_load(yaml.safe_dump(BUDGET))
    data["limits"].update(limits)
    for key in [k for k, v in limits.items() if v is None]:
        del data["limits"][key]
    path.write_text(yaml.safe_dump(data))
    return str(path)


class Chip:
    """A driver backend wired in-process to a virtual chip; counts the pulse commands that
    reach the chip and stops a runaway after MAX_COMMANDS (so a failure is quick)."""

    def __init__(self, profile_path: str, backend_url: str = "sim://"):
        self.inner = open_backend(backend_url)
        self.fw = ChipFirmware(self.inner, load_profile(profile_path))
        self.fw.count_log = []
        session = Session(ScpiHandler(self.fw), None)
        self.pulse_commands = 0

        def serve(data: bytes) -> bytes:
            if data.startswith((b"TILE:PULS", b"TILE:OUTER")):
                self.pulse_commands += 1
                if self.pulse_commands > MAX_COMMANDS:
                    raise RuntimeError(f"runaway: more than {MAX_COMMANDS} pulse commands")
            return b"".join(session.feed(data)[0])

        self.be = ChipBackend("loopback://", ScpiLink(LoopbackTransport(serve)),
                              load_profile(profile_path), retries=0)
        orig = self.be.step

        @contextmanager
        def marked():  # step boundaries in the chip's own log, for the per-step witness
            outer = not self.be.interlock.in_step
            if outer:
                self.fw.mark("STEP")
            with orig():
                yield

        self.be.step = marked

    def step_totals(self) -> list[dict[str, np.ndarray]]:
        """Per step (between STEP marks), per tile: the |counts| each device received."""
        steps: list[dict[str, np.ndarray]] = [{}]
        for kind, name, counts in self.fw.count_log:
            if kind == "STEP":
                steps.append({})
                continue
            cur = steps[-1]
            cur[name] = cur.get(name, 0) + counts
        return steps

    def close(self):
        self.be.close()
        self.inner.close()


@pytest.fixture
def budget_profile(tmp_path):
    return write_profile(tmp_path / "budget.yaml")


@pytest.fixture
def chip(budget_profile):
    c = Chip(budget_profile)
    yield c
    c.close()


# -- the profile -------------------------------------------------------------------------
def test_profile_step_budget_defaults_to_one_command_and_is_validated(tmp_path):
    assert load_profile(write_profile(tmp_path / "a.yaml")).limits.max_pulses_per_step == 20
    absent = load_profile(write_profile(tmp_path / "b.yaml", max_pulses_per_step=None))
    assert absent.limits.max_pulses_per_step == absent.limits.max_pulses_per_command == 8
    for bad in (0, -5, 2.5, ".inf"):
        path = tmp_path / "bad.yaml"
        text = write_profile(path)
        path.write_text(open(text).read().replace("max_pulses_per_step: 20",
                                                  f"max_pulses_per_step: {bad}"))
        with pytest.raises(ConfigError, match="max_pulses_per_step"):
            load_profile(str(path))
    assert load_profile("virtual").limits.max_pulses_per_step >= \
        load_profile("virtual").limits.max_pulses_per_command


def test_backend_declares_its_step_budget(chip):
    assert chip.be.capabilities.max_pulses_per_step == 20
    sim = open_backend("sim://")
    assert sim.capabilities.max_pulses_per_step is None
    with sim.step():  # the contract's default: a no-op
        pass
    sim.close()


# -- integer counts, overflow-safe ------------------------------------------------------
@pytest.mark.parametrize("count", [-2**63, 2**63 - 1, -2**31, 2**40])
def test_huge_device_counts_are_refused_not_wrapped(chip, count):
    tile = chip.be.allocate("t", 2, 2)
    with pytest.raises(SafetyLimitError, match="exceeds"):
        tile.pulse_device(0, 0, np.int64(count) if abs(count) < 2**63 else count)
    with pytest.raises(SafetyLimitError, match="exceeds"):
        tile.pulse_device(0, 0, np.int64(-2**63))
    assert chip.fw.device_pulses == 0 and chip.pulse_commands == 0


@pytest.mark.parametrize("count", [0.7, 1.0, True, "3", np.float32(2.0), None])
def test_non_integer_device_counts_are_an_error_never_truncated(chip, count):
    tile = chip.be.allocate("t", 2, 2)
    with pytest.raises(SafetyLimitError, match="must be integers"):
        tile.pulse_device(0, 0, count)
    assert chip.pulse_commands == 0
    tile.pulse_device(1, 1, np.int16(3))
    tile.pulse_device(1, 0, torch.tensor(-2))
    assert chip.fw.device_pulses == 5


def test_int64_minimum_in_a_pulse_map_is_refused(chip):
    tile = chip.be.allocate("t", 2, 2)
    n = torch.zeros(2, 2, dtype=torch.int64)
    n[0, 1] = -2**63
    with pytest.raises(SafetyLimitError, match="exceeds"):
        tile.pulse(n)
    for bad in (torch.full((2, 2), 0.7), torch.ones(2, 2, dtype=torch.bool)):
        with pytest.raises(Exception, match="integer"):
            tile.pulse(bad)
        with pytest.raises(Exception, match="integer"):
            tile.pulse_columns(bad[:, :1], slice(0, 1))
    assert chip.pulse_commands == 0


def test_interlock_check_counts_is_overflow_safe():
    prof = load_profile("virtual")
    lock = Interlock(prof.limits, prof.arrays)
    with pytest.raises(SafetyLimitError, match=str(2**63)):
        lock.check_counts("t", 0, 0, np.array([[-2**63]], np.int64))
    with pytest.raises(SafetyLimitError, match="integers"):
        lock.check_counts("t", 0, 0, np.array([[0.7]]))
    lock.check_counts("t", 0, 0, np.array([[1024, -1024]], np.int64))
    lock.tighten(100)  # what the instrument reports it takes: the lower limit wins
    lock.tighten(5000)
    with pytest.raises(SafetyLimitError, match="exceeds 100 per command"):
        lock.check_counts("t", 0, 0, np.array([[101]], np.int64))


# -- the per-step budget --------------------------------------------------------------------
def test_commands_within_one_step_share_the_budget(chip):
    tile = chip.be.allocate("t", 2, 3)
    eight = torch.full((2, 3), 8, dtype=torch.int32)
    with chip.be.step():
        tile.pulse(eight)
        tile.pulse(-eight)  # |counts| add up: 16
        before = chip.pulse_commands
        with pytest.raises(SafetyLimitError, match="max_pulses_per_step=20"):
            tile.pulse(eight)  # 24 > 20: refused, nothing sent
        assert chip.pulse_commands == before
        one = torch.zeros(2, 3, dtype=torch.int32)
        one[1, 2] = 4
        tile.pulse(one)  # exactly the budget on that device
        with pytest.raises(SafetyLimitError):
            tile.pulse_device(1, 2, 1)
        tile.pulse_device(0, 0, 4)  # another device with room left
        with chip.be.step():  # a nested step joins the outer one
            with pytest.raises(SafetyLimitError):
                tile.pulse_device(0, 0, 1)
    with chip.be.step():  # a new step starts from zero
        tile.pulse(eight)
    for _ in range(2):  # outside a step each command is a step of its own
        chip.fw.mark("STEP")
        tile.pulse(eight)
    totals = chip.step_totals()
    assert max(int(t["t"].max()) for t in totals if "t" in t) == 20


def test_budget_is_per_device_and_per_tile(chip):
    a, b = chip.be.allocate("a", 2, 2), chip.be.allocate("b", 2, 2)
    eight = torch.full((2, 2), 8, dtype=torch.int32)
    with chip.be.step():
        for _ in range(2):
            a.pulse(eight)
            b.pulse(eight)
        left = torch.zeros(2, 2, dtype=torch.int32)
        left[0, 0] = 4
        a.pulse(left)
        with pytest.raises(SafetyLimitError):
            a.pulse_columns(torch.ones(2, 1, dtype=torch.int32), slice(0, 1))
        a.pulse_columns(torch.full((2, 1), 4, dtype=torch.int32), slice(1, 2))


@pytest.mark.parametrize("grad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_sends_nothing(chip, grad):
    alg = AnalogSGD(chip.be, (2, 2), lr=1.0)
    g = torch.zeros(2, 2)
    g[1, 0] = grad
    with pytest.raises(NonFiniteError, match="gradient"):
        alg.step(g)
    assert chip.pulse_commands == 0 and chip.fw.device_pulses == 0
    assert not any(e.startswith("PULSE") for e in chip.fw.log)


@pytest.mark.parametrize("grad", [1e30, -1e30, 1e6, 3.4e38])
def test_absurd_finite_gradient_is_refused_before_the_first_command(chip, grad):
    alg = AnalogSGD(chip.be, (2, 2), lr=1.0)
    with pytest.raises(SafetyLimitError):
        alg.step(torch.full((2, 2), grad))
    assert chip.pulse_commands == 0 and chip.fw.device_pulses == 0


def test_a_step_is_split_into_commands_within_the_budget(chip):
    alg = AnalogSGD(chip.be, (2, 2), lr=1.0)
    dw = alg.tiles["W"].dw_min
    alg.step(torch.full((2, 2), -19.6 * dw))  # 19 or 20 pulses: three commands of <= 8
    assert chip.pulse_commands == 3
    assert 19 * 4 <= chip.fw.device_pulses <= 20 * 4
    with pytest.raises(SafetyLimitError, match="max_pulses_per_step=20"):
        alg.step(torch.full((2, 2), -21 * dw))
    assert chip.pulse_commands == 3


def test_max_pulses_clips_by_design_and_counts_what_it_clipped(chip):
    with pytest.raises(ValueError, match="exceeds the station's max_pulses_per_step"):
        AnalogSGD(chip.be, (2, 2), lr=1.0, max_pulses=21, prefix="x")
    alg = AnalogSGD(chip.be, (2, 2), lr=1.0, max_pulses=20)
    dw = alg.tiles["W"].dw_min
    alg.step(torch.full((2, 2), -1e30))  # finite but absurd: clipped to 20 per device
    assert chip.fw.device_pulses == 80
    assert alg.clipped_pulses > 1e29
    with pytest.raises(NonFiniteError):
        alg.step(torch.full((2, 2), float("nan")))  # clipping never hides a NaN
    assert alg.state_dict()["clipped_pulses"] == alg.clipped_pulses
    before = alg.clipped_pulses
    alg.step(torch.full((2, 2), -5 * dw))
    assert alg.clipped_pulses == before


@pytest.mark.parametrize("where", ["x", "d"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_layer_input_or_error_sends_nothing(chip, where, value):
    alg = TikiTaka(chip.be, (2, 3), lr=0.1, transfer_lr=0.1)
    x, d = torch.ones(4, 3), torch.ones(4, 2)
    (x if where == "x" else d)[2, 1] = value
    with pytest.raises(NonFiniteError):
        alg.step(x=x, d=d)
    assert chip.pulse_commands == 0


def test_outer_update_is_charged_with_its_bound(tmp_path):
    """A rank-1 update of B samples may apply B x train_length pulses to a device."""
    c = Chip(write_profile(tmp_path / "p.yaml", max_pulses_per_command=40,
                           max_pulses_per_step=70), "sim://?train_length=31")
    try:
        tile = c.be.allocate("t", 2, 3)
        with pytest.raises(NonFiniteError):
            tile.outer_update(torch.ones(1, 3), torch.full((1, 2), float("nan")), 0.1)
        with pytest.raises(NonFiniteError):
            tile.outer_update(torch.ones(1, 3), torch.ones(1, 2), float("inf"))
        tile.outer_update(torch.ones(2, 3), torch.ones(2, 2), 0.1)  # 62 <= 70
        with c.be.step():
            tile.outer_update(torch.ones(2, 3), torch.ones(2, 2), 0.1)
            with pytest.raises(SafetyLimitError):
                tile.outer_update(torch.ones(1, 3), torch.ones(1, 2), 0.1)  # 93 > 70
            x = torch.zeros(1, 3)
            x[0, 0] = 1.0  # only column 0 fires: the other columns have room
            tile.outer_update(torch.tensor([[0.0, 1.0, 0.0]]), torch.ones(1, 2), 0.0)
        with pytest.raises(SafetyLimitError):
            tile.outer_update(torch.ones(3, 3), torch.ones(3, 2), 0.1)  # 93 in one command
        assert c.pulse_commands == 3
        assert max(int(t["t"].max()) for t in c.step_totals() if "t" in t) <= 70
    finally:
        c.close()


def test_optimizer_step_is_one_step_of_the_backend(chip):
    calls = []
    orig = chip.be.step

    @contextmanager
    def counting():
        calls.append(chip.be.interlock.in_step)
        with orig():
            yield

    chip.be.step = counting
    layer = AnalogLinear(3, 2, ResidualLearningV2(chip.be, (2, 3), lr=0.001, transfer_lr=0.1,
                                                    update="pulse"),
                         bias=False)
    opt = AnalogOptimizer(layer, 0.1)
    layer(torch.ones(4, 3)).sum().backward()
    opt.step()
    assert calls == [False, True]  # the optimizer's step, and the algorithm's inside it
    assert opt.clipped_pulses == 0


# -- numbers that must be finite -----------------------------------------------------------
def test_stochastic_round_refuses_non_finite_and_unrepresentable_counts():
    gen = torch.Generator().manual_seed(0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteError):
            stochastic_round(torch.tensor([0.5, bad]), gen)
    for huge in (2.0**31, -2.0**31, 1e30):
        with pytest.raises(SafetyLimitError, match="beyond"):
            stochastic_round(torch.tensor([huge]), gen)
    top = torch.tensor([2.0**31 - 2], dtype=torch.float64)
    assert stochastic_round(top, gen).item() == 2**31 - 2


@pytest.mark.parametrize("kw", [{"lr": float("nan")}, {"lr": float("inf")},
                                {"transfer_lr": float("inf")}, {"gamma": float("nan")}])
def test_non_finite_rates_are_refused(kw):
    be = open_backend("sim://")
    args = {"lr": 0.1, "transfer_lr": 0.1, "gamma": 0.1, **kw}
    with pytest.raises(NonFiniteError):
        ResidualLearningV2(be, (2, 2), **args)
    alg = AnalogSGD(be, (2, 2), lr=0.1, prefix="sgd")
    with pytest.raises(NonFiniteError):
        alg.step(torch.ones(2, 2), lr_scale=float("inf"))
    be.close()


@pytest.mark.parametrize("target", [float("nan"), float("inf")])
def test_program_refuses_non_finite_targets(chip, target):
    tile = chip.be.allocate("t", 2, 2)
    t = torch.zeros(2, 2)
    t[0, 1] = target
    with pytest.raises(NonFiniteError, match="target"):
        program(tile, t)
    with pytest.raises(NonFiniteError, match="target"):
        program(tile, target)
    with pytest.raises(NonFiniteError, match="tolerance"):
        program(tile, 0.0, tol=float("nan"))
    assert chip.pulse_commands == 0


def test_program_rounds_stay_within_the_budget(chip):
    tile = chip.be.allocate("t", 2, 2)
    res = program(tile, 0.05, max_iter=30)  # 50 dw_min away: rounds of <= 20 pulses
    assert res.pulses > 0
    assert max(int(t["t"].max()) for t in chip.step_totals() if "t" in t) <= 20


def test_clipped_pulses_are_a_column_of_the_run_file(tmp_path):
    from hil.config import parse_config
    from hil.runs import train_run
    from hil.runstore import read_metrics

    cfg = parse_config({
        "name": "clip", "seed": 0, "backend": "sim://?seed=1",
        "model": {"hidden": [4], "activation": "tanh"},
        "data": {"name": "digits", "limit_train": 20, "limit_test": 10},
        "algorithm": {"name": "analog_sgd", "lr": 5.0, "max_pulses": 2, "update": "pulse"},
        "train": {"epochs": 2, "batch_size": 10}})
    result = train_run(cfg, tmp_path / "run", progress=False)
    clipped = read_metrics(tmp_path / "run" / "run.h5")["clipped_pulses"]
    assert len(clipped) == 2 and 0 < clipped[0] <= clipped[1]
    assert result.completed
