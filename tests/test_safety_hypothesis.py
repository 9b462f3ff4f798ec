"""Property test of the interlock end to end: random step sequences of random algorithms
(gradients and layer inputs/errors with NaN, inf, huge and tiny values) go through
visa:// to the virtual chip, whose firmware log is the witness: no command beyond the
per-command limit, no step beyond the per-step budget on any device, and a refused step
sent nothing to the tile it was refused on (nothing at all for a non-finite value)."""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.profile import load_profile
from drivers.virtual_chip import VirtualChip
from hil.algorithms import make_algorithm
from hil.backend import open_backend
from hil.errors import NonFiniteError, SafetyLimitError

PER_COMMAND, BUDGET = 40, 100
ROWS, COLS = 2, 3
PROFILE = {
    "name": "hypothesis",
    "chip": {"idn_contains": "virtual-chip", "pulse_dtype": "int16"},
    "pulses": {"potentiate": {"amplitude_v": 1.0, "width_s": 1e-6, "compliance_a": 1e-4},
               "depress": {"amplitude_v": -1.0, "width_s": 1e-6, "compliance_a": 1e-4}},
    "arrays": [{"rows": 1024, "cols": 16}],
    "limits": {"max_amplitude_v": 1.5, "max_width_s": 2e-6, "max_compliance_a": 2e-4,
               "max_pulses_per_command": PER_COMMAND, "max_pulses_per_step": BUDGET,
               "allowed_rows": [0, 1023], "allowed_cols": [0, 15]},
}
NAMES = itertools.count()


@pytest.fixture(scope="module")
def station(tmp_path_factory):
    """One virtual chip (the emulator with 31-slot pulse trains) and one visa:// host."""
    path = tmp_path_factory.mktemp("profile") / "hypothesis.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    with VirtualChip("sim://?seed=5&train_length=31", profile=str(path)) as chip:
        chip.firmware.count_log = []
        be = open_backend(chip.url)
        orig = be.step

        @contextmanager
        def marked():  # the step boundaries, in the chip's own log
            if not be.interlock.in_step:
                chip.firmware.mark("STEP")
            with orig():
                yield

        be.step = marked
        try:
            yield be, chip.firmware
        finally:
            be.close()


special = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e38,
                           1e-30, -1e-30, 0.0, 1e6])
wild = st.floats(allow_nan=True, allow_infinity=True)


def vector(n: int) -> st.SearchStrategy[list[float]]:
    """Mostly ordinary values (so that many steps pulse), else one special among them,
    else anything at all."""
    ordinary = st.lists(st.floats(-0.2, 0.2), min_size=n, max_size=n)
    one_special = st.tuples(ordinary, st.integers(0, n - 1), special).map(
        lambda t: t[0][:t[1]] + [t[2]] + t[0][t[1] + 1:])
    return st.one_of(ordinary, ordinary, one_special,
                     st.lists(st.one_of(special, wild), min_size=n, max_size=n))


grad_step = st.tuples(st.just("grad"), vector(ROWS * COLS))
xd_step = st.integers(1, 4).flatmap(lambda b: st.tuples(
    st.just("xd"), vector(b * COLS), vector(b * ROWS)))
steps = st.lists(st.tuples(st.one_of(grad_step, xd_step),
                           st.sampled_from([1.0, 1.0, 1.0, 0.5, float("inf"), float("nan")])),
                 min_size=1, max_size=5)


def entries_since(fw, start: int):
    return [(kind, name) for kind, name, _ in fw.count_log[start:] if kind != "STEP"]


@settings(max_examples=40, deadline=timedelta(seconds=10),
          suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["analog_sgd", "tiki_taka", "rlv2"]),
       update=st.sampled_from(["pulse", "auto"]),
       max_pulses=st.one_of(st.none(), st.integers(1, BUDGET)),
       lr=st.floats(1e-4, 2.0), transfer_lr=st.floats(0.01, 1.0), plan=steps)
def test_no_step_sequence_gets_past_the_interlock(station, name, update, max_pulses, lr,
                                                  transfer_lr, plan):
    be, fw = station
    alg = make_algorithm(name, be, (ROWS, COLS), lr=lr, transfer_lr=transfer_lr, gamma=0.1,
                         update=update, max_pulses=max_pulses, prefix=f"h{next(NAMES)}")
    for (kind, *data), lr_scale in plan:
        start = len(fw.count_log)
        try:
            if kind == "grad":
                alg.step(torch.tensor(data[0], dtype=torch.float32).reshape(ROWS, COLS),
                         lr_scale=lr_scale)
            else:
                x = torch.tensor(data[0], dtype=torch.float32).reshape(-1, COLS)
                d = torch.tensor(data[1], dtype=torch.float32).reshape(-1, ROWS)
                alg.step(x=x, d=d, lr_scale=lr_scale)
        except NonFiniteError:
            assert entries_since(fw, start) == [], "a non-finite step sent pulses"
        except SafetyLimitError as exc:
            assert exc.tile is not None, exc
            sent = [tile for _, tile in entries_since(fw, start)]
            assert exc.tile not in sent, f"{exc} but {exc.tile} received pulses"
    # the witness: every command and every step's per-device totals within the profile
    totals: dict[str, np.ndarray] = {}
    for kind, tile, counts in fw.count_log:
        if kind == "STEP":
            totals = {}
            continue
        if kind == "PULSE":
            assert int(counts.max()) <= PER_COMMAND
        totals[tile] = totals.get(tile, 0) + counts
        assert int(totals[tile].max()) <= BUDGET, f"{tile}: {int(totals[tile].max())} in a step"
    for tile in alg.tiles.values():
        assert np.isfinite(fw.backend.tile(tile.name).read().numpy()).all()


def test_profile_of_the_property_test_is_valid(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    assert load_profile(str(path)).limits.max_pulses_per_step == BUDGET
