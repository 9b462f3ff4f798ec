"""Resume on hardware and runs that can always be rerun: chip tiles re-attached by name and
shape, a resumed run refused (one line, exit 2) when the chip's devices no longer hold
the checkpoint's weights unless --reprogram, a changed config refused unless --force
(run.h5 records every segment's config), a run that failed on its first step resumable,
and checkpoints loaded with weights_only (unreadable or crafted ones: one line)."""

from __future__ import annotations

import json
import pickle

import h5py
import pytest
import torch
import yaml

from drivers.virtual_chip import VirtualChip
from hil.cli import main
from hil.optim import AnalogOptimizer
from hil.runs import CHECKPOINT, RUN_FILE

CHIP = "sim://?model=power&gamma=0.5&tau=0.6&c2c=0.1&read_noise=0.001&seed=3"
CONFIG = {
    "name": "res", "seed": 1, "backend": "sim://?model=power&gamma=0.5&c2c=0.1&seed=3",
    "model": {"hidden": [4], "activation": "tanh"},
    "data": {"name": "least_squares", "n_inputs": 6, "n_outputs": 2, "limit_train": 40,
             "limit_test": 20},
    "algorithm": {"name": "rlv2", "lr": 0.1, "transfer_lr": 0.2, "gamma": 0.1},
    "train": {"epochs": 2, "batch_size": 10, "checkpoint_every": 3},
}


def hil(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_resume_on_a_chip_reattaches_checks_devices_and_reprograms(tmp_path, cfg, capsys):
    out = tmp_path / "out"
    args = ["train", str(cfg), "--out", str(out), "--quiet"]
    with VirtualChip(CHIP, "scpi", "tcp") as chip:
        assert hil([*args, "--backend", chip.url]) == 0
        # a second run on the same chip finds its tiles there (was: tile already allocated)
        assert hil(["train", str(cfg), "--out", str(tmp_path / "again"), "--quiet",
                    "--backend", chip.url]) == 0
        ckpt = torch.load(out / CHECKPOINT, weights_only=True)
        assert set(ckpt["devices"]) == {"0.W", "0.P", "2.W", "2.P"}
        # the same chip still holds the first run's weights? no: the second run trained them
        capsys.readouterr()
        assert hil([*args, "--backend", chip.url, "--resume"]) == 2
        assert "no longer hold the checkpoint's weights" in one_line(capsys)
    with VirtualChip(CHIP, "scpi", "tcp") as fresh:  # a reset chip: zeroed devices
        assert hil([*args, "--backend", fresh.url, "--resume"]) == 2
        err = one_line(capsys)
        assert "devices" in err and "--reprogram" in err
        assert not fresh.firmware.outputs
        assert hil([*args, "--backend", fresh.url, "--resume", "--reprogram"]) == 0
        assert "reprogrammed tile 0.W" in capsys.readouterr().out
        # now the chip holds them: a plain resume (nothing left to train) is accepted
        assert hil([*args, "--backend", fresh.url, "--resume"]) == 0


def test_resume_with_another_config_is_refused_unless_forced(tmp_path, cfg, capsys):
    out = tmp_path / "out"
    assert hil(["train", str(cfg), "--out", str(out), "--quiet"]) == 0
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**CONFIG, "algorithm": {**CONFIG["algorithm"],
                                                               "lr": 0.3},
                                       "train": {**CONFIG["train"], "epochs": 3}}))
    capsys.readouterr()
    assert hil(["train", str(changed), "--out", str(out), "--quiet", "--resume"]) == 2
    err = one_line(capsys)
    assert "algorithm.lr: 0.1 -> 0.3" in err and "--force" in err
    assert hil(["train", str(changed), "--out", str(out), "--quiet", "--resume",
                "--force"]) == 0
    with h5py.File(out / RUN_FILE, "r") as h5:
        sessions = json.loads(h5.attrs["sessions"])
        assert [s["config"]["algorithm"]["lr"] for s in sessions] == [0.1, 0.3]
        assert h5["metrics"]["epoch"][()].tolist() == [1.0, 2.0, 3.0]
    assert hil(["train", str(cfg), "--out", str(out), "--quiet", "--force"]) == 2
    assert "only with --resume" in one_line(capsys)


def test_a_run_that_fails_on_its_first_step_can_be_resumed(tmp_path, cfg, monkeypatch,
                                                           capsys):
    out = tmp_path / "out"
    real_step = AnalogOptimizer.step

    def broken(self):
        raise RuntimeError("instrument fault on the first step")

    monkeypatch.setattr(AnalogOptimizer, "step", broken)
    with pytest.raises(RuntimeError):
        main(["train", str(cfg), "--out", str(out), "--quiet"])
    monkeypatch.setattr(AnalogOptimizer, "step", real_step)
    assert (out / CHECKPOINT).exists()
    capsys.readouterr()
    assert hil(["train", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "--resume" in one_line(capsys)
    assert hil(["train", str(cfg), "--out", str(out), "--quiet", "--resume"]) == 0
    with h5py.File(out / RUN_FILE, "r") as h5:
        assert h5["metrics"]["epoch"][()].tolist() == [1.0, 2.0]


def test_run_file_without_checkpoint_is_restartable(tmp_path, cfg):
    out = tmp_path / "out"
    out.mkdir()
    with h5py.File(out / RUN_FILE, "w") as h5:
        h5.create_group("metrics").create_dataset("epoch", data=[9.0], maxshape=(None,))
    assert hil(["train", str(cfg), "--out", str(out), "--quiet"]) == 0
    with h5py.File(out / RUN_FILE, "r") as h5:
        assert h5["metrics"]["epoch"][()].tolist() == [1.0, 2.0]


class Crafted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("content", ["empty", "truncated", "random", "crafted", "foreign"])
def test_bad_checkpoint_is_one_line_exit_2(tmp_path, cfg, capsys, content):
    out = tmp_path / "out"
    assert hil(["train", str(cfg), "--out", str(out), "--quiet"]) == 0
    path = out / CHECKPOINT
    good = path.read_bytes()
    marker = tmp_path / "marker"
    data = {"empty": b"", "truncated": good[:len(good) // 2],
            "random": bytes(range(256)) * 40,
            "crafted": pickle.dumps({"config": Crafted(marker)}, protocol=2),
            "foreign": b""}[content]
    if content == "foreign":
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(data)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert hil(["train", str(cfg), "--out", str(out), "--quiet", "--resume"]) == 2
    err = one_line(capsys)
    assert str(path) in err and "checkpoint" in err
    assert not marker.exists()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written


def test_resume_on_a_chip_with_zero_shift_does_not_resettle_p(tmp_path, capsys):
    """The zero-shift setup (alternating pulses on P, P_ref programmed) runs once, at the
    start: a resumed run finds P and P_ref as the checkpoint left them."""
    zs = {**CONFIG, "algorithm": {**CONFIG["algorithm"], "zero_shift": True},
          "train": {**CONFIG["train"], "epochs": 1}}
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(yaml.safe_dump(zs))
    two.write_text(yaml.safe_dump({**zs, "train": {**zs["train"], "epochs": 2}}))
    out = tmp_path / "out"
    with VirtualChip(CHIP, "scpi", "tcp") as chip:
        assert hil(["train", str(one), "--out", str(out), "--quiet",
                    "--backend", chip.url]) == 0
        pulses = chip.firmware.device_pulses
        capsys.readouterr()
        assert hil(["train", str(two), "--out", str(out), "--quiet", "--backend", chip.url,
                    "--resume", "--force"]) == 0, capsys.readouterr().err
        assert chip.firmware.device_pulses > pulses


def test_a_run_begun_on_an_emulator_moves_to_a_chip_only_by_reprogramming(tmp_path, cfg,
                                                                          capsys):
    out = tmp_path / "out"
    three = tmp_path / "three.yaml"
    three.write_text(yaml.safe_dump({**CONFIG, "train": {**CONFIG["train"], "epochs": 3}}))
    assert hil(["train", str(cfg), "--out", str(out), "--quiet"]) == 0  # sim://
    with VirtualChip(CHIP, "scpi", "tcp") as chip:
        capsys.readouterr()
        args = ["train", str(three), "--out", str(out), "--quiet", "--backend", chip.url,
                "--resume", "--force"]
        assert hil(args) == 2
        assert "no longer hold the checkpoint's weights" in one_line(capsys)
        assert hil([*args, "--reprogram"]) == 0
