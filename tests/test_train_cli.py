"""``hil train``: config validation (one line, exit 2, nothing written), the run file,
curves and checkpoints, and --resume reaching the same final weights bit for bit."""

from __future__ import annotations

import json

import h5py
import pytest
import torch
import yaml

from hil import __version__
from hil.cli import main
from hil.config import load_config
from hil.runs import CHECKPOINT, CURVES, RUN_FILE, train_run

BACKEND = "sim://?model=power&gamma=0.5&tau=0.6&c2c=0.1&seed=3"
CONFIG = {
    "name": "tiny", "seed": 1, "backend": BACKEND,
    "model": {"hidden": [8], "activation": "tanh"},
    "data": {"name": "digits", "limit_train": 60, "limit_test": 40},
    "algorithm": {"name": "rlv2", "lr": 0.1, "transfer_lr": 0.2, "gamma": 0.1},
    "train": {"epochs": 2, "batch_size": 10, "checkpoint_every": 4},
}


CNN = {"kind": "cnn", "channels": [16, 32], "kernel_size": 5, "pool": 2, "hidden": [8],
       "activation": "tanh"}


def write(tmp_path, cfg, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("patch,field", [
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"algorithm": {"name": "adam"}}, "algorithm.name"),
    ({"model": {"hidden": [8], "widht": 3}}, "model.widht"),
    ({"backend": "nonsense"}, "backend"),
    ({"backend": "sim://?model=power&bogus=1"}, "backend"),
    ({"algorithm": {"name": "rlv2", "mvm_read": "sum"}}, "algorithm.mvm_read"),
    # the cnn (tests/test_cnn.py): geometry, data and field checks
    ({"model": CNN}, "model.channels: a 8x8 image has no pixel left"),
    ({"model": CNN, "data": {"name": "least_squares"}}, "model.kind: cnn needs images"),
    ({"data": {"name": "least_squares", "image_size": 28}}, "data.image_size: least_squares"),
    ({"model": CNN, "data": {"image_size": 0}}, "data.image_size"),
    ({"model": {**CNN, "kind": "cnn2d"}}, "model.kind"),
    ({"model": {**CNN, "channels": []}}, "model: Value error, channels: a cnn needs at least"),
    ({"model": {**CNN, "channels": [16, 0]}}, "model.channels"),
    ({"model": {**CNN, "kernel_size": 0}}, "model.kernel_size"),
    ({"model": {**CNN, "pool": 2.5}}, "model.pool"),
    ({"model": {**CNN, "kernel_size": 13}, "data": {"image_size": 28}}, "stage 2 (kernel 13"),
    ({"model": {"hidden": [8], "channels": [4]}}, "channels applies to kind: cnn only"),
    ({"model": {**CNN, "activation": "gelu"}}, "model.activation"),
])
def test_bad_config_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, patch, field):
    cfg = {**CONFIG, **patch}
    path = write(tmp_path, cfg)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["train", str(path), "--out", str(out), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and field in err
    assert not out.exists()


def test_unreadable_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: {hidden: [8\n")
    with pytest.raises(SystemExit) as exc:
        main(["train", str(path), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "line" in err


def test_train_writes_run_file_curves_and_checkpoint(tmp_path, capsys):
    path = write(tmp_path, CONFIG)
    out = tmp_path / "out"
    main(["train", str(path), "--out", str(out), "--quiet"])
    assert (out / CURVES).stat().st_size > 1000
    with h5py.File(out / RUN_FILE, "r") as h5:
        assert h5.attrs["hil_version"] == __version__
        assert json.loads(h5.attrs["config"])["algorithm"]["name"] == "rlv2"
        m = h5["metrics"]
        assert m["epoch"][()].tolist() == [1.0, 2.0]
        assert m["test_acc"].maxshape == (None,) and m["test_acc"].chunks is not None
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    assert ckpt["position"]["epoch"] == 2 and ckpt["backend"] is not None
    assert {"0.W", "0.P", "2.W", "2.P"} <= set(ckpt["backend"])
    assert "H" in ckpt["optimizer"]["algorithms"][0]
    # a second run into the same directory is refused; --backend overrides the config
    with pytest.raises(SystemExit):
        main(["train", str(path), "--out", str(out), "--quiet"])
    main(["train", str(path), "--out", str(tmp_path / "lin"), "--quiet",
          "--backend", "sim://?model=linear&tau=1&seed=0"])
    with h5py.File(tmp_path / "lin" / RUN_FILE, "r") as h5:
        assert "model=linear" in json.loads(h5.attrs["config"])["backend"]


def test_killed_run_resumes_to_bit_identical_final_weights(tmp_path):
    # W + gamma P read as one array (mvm_read: summed), H kept transposed: both resume
    summed = {**CONFIG, "algorithm": {**CONFIG["algorithm"], "mvm_read": "summed"}}
    cfg = load_config(write(tmp_path, summed))
    assert cfg.algorithm.mvm_read == "summed"
    full = train_run(cfg, tmp_path / "full", progress=False)
    assert full.completed and full.global_step == 12
    # killed after step 10 (checkpoints at 4, 6 = end of epoch 1, and 8): resume from 8
    cut = train_run(cfg, tmp_path / "cut", progress=False, stop_after_steps=10)
    assert not cut.completed
    resumed = train_run(cfg, tmp_path / "cut", progress=False, resume=True)
    assert resumed.completed and resumed.global_step == 12
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    for name, tile in a["backend"].items():
        assert torch.equal(tile["w"], b["backend"][name]["w"]), name
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["algorithms"], b["optimizer"]["algorithms"], strict=True):
        assert torch.equal(sa["H"], sb["H"]) and sa["step"] == sb["step"]
    for key, value in full.metrics.items():
        if key != "epoch_seconds":
            assert value.tolist() == resumed.metrics[key].tolist(), key
    with pytest.raises(Exception, match="no checkpoint"):
        train_run(cfg, tmp_path / "nothing", progress=False, resume=True)


def test_digital_baseline_and_least_squares_run(tmp_path):
    cfg = load_config(write(tmp_path, {
        "name": "ls", "data": {"name": "least_squares", "n_inputs": 4, "n_outputs": 2},
        "model": {"hidden": []}, "algorithm": {"name": "digital", "lr": 0.2},
        "train": {"epochs": 3, "batch_size": 32}}))
    res = train_run(cfg, tmp_path / "ls", progress=False)
    loss = res.metrics["test_loss"]
    assert res.final_accuracy is None and loss[-1] < loss[0]
