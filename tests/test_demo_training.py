"""hil demo's training comparison, in a reduced mode (2 epochs of 60 samples): every run
leaves its files, Analog SGD goes through the SCPI driver to a virtual chip, the table
reads in 80 columns and quotes the runs' own numbers, and the symmetric points it measures
against are the devices' (a zero-shifted P sits at them, digital weights do not)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from rich.console import Console

from hil.cli.demo_cmds import STEPS, step_rule, training_comparison
from hil.cli.demo_training import (
    COMPARISON,
    CONTENDERS,
    Contender,
    demo_config,
    population_url,
    sparkline,
)
from hil.runs import RUN_FILE
from hil.runstore import read_metrics

EPOCHS, LIMIT = 2, 60


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from hil.cli.demo_training import compare_algorithms

    out = tmp_path_factory.mktemp("demo") / "training"
    console = Console(width=80, record=True)
    outcomes = compare_algorithms(console, out, seed=0, epochs=EPOCHS, limit_train=LIMIT)
    return out, outcomes, console.export_text()


def test_every_run_leaves_its_files_and_the_figure(demo):
    out, outcomes, _ = demo
    assert [o.contender for o in outcomes] == list(CONTENDERS)
    png = (out / COMPARISON).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    for o in outcomes:
        metrics = read_metrics(out / o.contender.algorithm / RUN_FILE)
        assert len(metrics["test_acc"]) == EPOCHS
        np.testing.assert_array_equal(o.accuracy, metrics["test_acc"])
        assert 0.0 <= o.final_accuracy <= 1.0
    chip = [o for o in outcomes if o.contender.chip]
    assert [o.contender.algorithm for o in chip] == ["analog_sgd"]
    assert chip[0].backend.startswith("visa://TCPIP0::127.0.0.1::")
    assert all(o.backend.startswith("sim://") for o in outcomes if not o.contender.chip)


def test_table_fits_80_columns_and_quotes_the_runs(demo):
    _, outcomes, text = demo
    start = text.index("final test accuracy")
    table = text[start:text.index("digital SGD's weights are measured")]
    lines = table.splitlines()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for o in outcomes:
        label = o.contender.label + (" (chip)" if o.contender.chip else "")
        row = next(line for line in lines if line.strip().startswith(label))
        assert f"{100 * o.final_accuracy:.1f}%" in row
        assert sparkline(o.accuracy) in row
        w = [f"{np.abs(off).mean():.3f}" for off in o.layer_offsets("W")]
        assert re.search(rf"{w[0]}\s+{w[-1]}\s*$", row), row
    assert sum("P (gradient)" in line for line in lines) == 2  # Tiki-Taka and RLv2
    summary = text[text.index("ends "):]
    by = {o.contender.algorithm: o for o in outcomes}
    best = max(by["tiki_taka"].final_accuracy, by["rlv2"].final_accuracy)
    assert f"{100 * (best - by['analog_sgd'].final_accuracy):+.1f} points" in summary


def test_offsets_are_against_the_devices_symmetric_points(demo):
    _, outcomes, _ = demo
    by = {o.contender.algorithm: o for o in outcomes}
    for name in ("tiki_taka", "rlv2"):  # P was zero-shifted: it starts at its w_sym
        o = by[name]
        assert o.roles() == ["W", "P"]
        assert o.mean_distance("P") < 0.1 < o.mean_distance("W")
    # the population's w_sym is near +0.41; the digital weights stay near 0
    assert by["digital"].mean_distance() > 0.25
    assert by["digital"].roles() == ["W"] and by["analog_sgd"].roles() == ["W"]


def test_configs_differ_only_in_the_algorithm():
    cfgs = [demo_config(c, population_url(3), seed=3, epochs=4, limit_train=100)
            for c in CONTENDERS]
    dumps = [c.model_dump() for c in cfgs]
    for d in dumps:
        assert d["seed"] == 3 and "seed=3" in d["backend"]
        assert d["model"] == dumps[0]["model"] and d["data"] == dumps[0]["data"]
        assert d["train"] == dumps[0]["train"]
        assert d["algorithm"]["lr"] == dumps[0]["algorithm"]["lr"]
    rl = demo_config(Contender("x", "rlv2"), "sim://", seed=0, epochs=1, limit_train=10)
    assert rl.algorithm.zero_shift and rl.algorithm.gamma > 0


def test_sparkline_uses_a_fixed_scale():
    assert sparkline(np.array([0.0, 0.5, 1.0])) == "▁▅█"
    assert sparkline(np.array([-1.0, 2.0])) == "▁█"


def test_every_step_title_fits_80_columns():
    assert training_comparison in STEPS
    console = Console(width=80, record=True)
    for k, step in enumerate(STEPS, start=1):
        console.rule(step_rule(k, len(STEPS), step))
    text = console.export_text()
    assert "…" not in text and len(text.splitlines()) == len(STEPS), text
