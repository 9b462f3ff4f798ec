"""The paper's CNN through ``hil train``: the model on AnalogConv2d / AnalogLinear tiles,
images resized for it, one training step on tiny data, and the activation option of both
model kinds (its bad configs: tests/test_train_cli.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from hil.config import load_config, parse_config
from hil.data import load_digits, resize_images, write_idx
from hil.errors import ConfigError
from hil.layers import AnalogConv2d, AnalogLinear, analog_layers
from hil.runs import RUN_FILE, build_model, load_dataset, make_analog, train_run

BACKEND = "sim://?model=power&gamma=0.5&tau=0.6&dw_min=1e-3&seed=0"
PAPER_CNN = {"kind": "cnn", "channels": [16, 32], "kernel_size": 5, "pool": 2,
             "hidden": [128], "activation": "tanh"}
CNN = {
    "name": "tiny-cnn", "seed": 0, "backend": BACKEND, "model": PAPER_CNN,
    "data": {"name": "digits", "image_size": 28, "limit_train": 16, "limit_test": 8},
    "algorithm": {"name": "rlv2", "lr": 0.05, "transfer_lr": 0.05, "gamma": 0.1},
    "train": {"epochs": 1, "batch_size": 8},
}


def write(tmp_path, cfg, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_dump_parses_back_to_the_same_run():
    # run files and checkpoints hold the dump; --backend and --resume parse it again
    for model in ({"kind": "cnn"}, {"hidden": [8]}):
        cfg = parse_config({**CNN, "model": model})
        assert parse_config(cfg.model_dump()) == cfg
    assert parse_config({**CNN, "model": {"kind": "cnn"}}).model.channels == [16, 32]
    assert parse_config({**CNN, "model": {"hidden": [8]}}).model.channels is None


def test_paper_cnn_is_built_on_analog_conv_and_linear_tiles():
    cfg = parse_config({**CNN, "data": {"name": "digits", "image_size": 28}})
    ds = load_dataset(cfg)
    assert ds.image_shape == (1, 28, 28) and ds.x_train.shape[1] == 784
    model = build_model(cfg, ds)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == \
        [(1, 16, (5, 5)), (16, 32, (5, 5))]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(512, 128), (128, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 2
    assert sum(isinstance(m, nn.Tanh) for m in model) == 3
    import hil

    with hil.open_backend(BACKEND) as be:
        make_analog(model, cfg, be, program_init=True)
        layers = analog_layers(model)
        assert [type(m) for m in layers] == [AnalogConv2d, AnalogConv2d, AnalogLinear,
                                              AnalogLinear]
        assert [m.algorithm.shape for m in layers] == [(16, 25), (32, 400), (128, 512),
                                                        (10, 128)]
        out = model(ds.x_test[:3])
        assert out.shape == (3, 10)
        assert torch.allclose(out.exp().sum(-1), torch.ones(3), atol=1e-4)


def test_one_cnn_training_step_through_hil_train(tmp_path):
    small = {**PAPER_CNN, "channels": [4, 8], "hidden": [16]}  # the paper's shapes: above
    cfg = load_config(write(tmp_path, {**CNN, "model": small,
                                       "data": {**CNN["data"], "limit_train": 8}}))
    res = train_run(cfg, tmp_path / "run", progress=False)
    assert res.completed and res.global_step == 1
    assert (tmp_path / "run" / RUN_FILE).exists()
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    # every conv and linear layer's W and P tiles, named after the module path
    assert {"1.W", "1.P", "4.W", "4.P", "8.W", "8.P", "10.W", "10.P"} <= set(ckpt["backend"])
    assert ckpt["position"]["global_step"] == 1 and len(res.metrics["test_acc"]) == 1


def test_images_resize_bilinear_in_range_and_mnist_keeps_its_shape(tmp_path):
    ds = load_digits(seed=0)
    assert ds.image_shape == (1, 8, 8)
    big = ds.resized(28)
    assert big.image_shape == (1, 28, 28) and big.n_inputs == 784
    assert big.x_train.shape == (ds.x_train.shape[0], 784)
    assert float(big.x_train.min()) >= 0.0 and float(big.x_train.max()) <= 1.0
    # a constant image stays constant; resizing back is close to the original
    flat = torch.full((2, 64), 0.25)
    assert torch.allclose(resize_images(flat, (1, 8, 8), 28), torch.full((2, 784), 0.25))
    back = resize_images(big.x_test, (1, 28, 28), 8)
    assert float((back - ds.x_test).abs().mean()) < 0.05
    assert torch.equal(big.y_test, ds.y_test)
    rng = np.random.default_rng(0)  # the MNIST IDX path: 28x28 already, no resize needed
    for prefix, n in (("train", 8), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte",
                  rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte",
                  rng.integers(0, 10, size=n, dtype=np.uint8))
    cfg = parse_config({**CNN, "data": {"name": "mnist", "path": str(tmp_path)}})
    mn = load_dataset(cfg)
    assert mn.image_shape == (1, 28, 28) and mn.x_train.shape == (8, 784)
    with pytest.raises(ValueError, match="no images"):
        load_dataset(parse_config({"data": {"name": "least_squares"}})).resized(28)


@pytest.mark.parametrize("kind", ["fcn", "cnn"])
def test_activation_option_sets_every_hidden_nonlinearity(kind):
    base = CNN if kind == "cnn" else {**CNN, "model": {"hidden": [8]}}
    ds = None
    for act, cls in (("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid), ("relu", nn.ReLU)):
        cfg = parse_config({**base, "model": {**base["model"], "activation": act}})
        ds = ds or load_dataset(cfg)
        model = build_model(cfg, ds)
        acts = [m for m in model if isinstance(m, (nn.Tanh, nn.Sigmoid, nn.ReLU))]
        assert acts and all(isinstance(m, cls) for m in acts), (act, model)
        assert len(acts) == (3 if kind == "cnn" else 1)
    with pytest.raises(ConfigError, match="model.activation"):
        parse_config({**base, "model": {**base["model"], "activation": "Tanh"}})


def test_sweep_files_of_the_claims_expand():
    from hil.sweep.spec import load_sweep

    t8 = load_sweep("experiments/table8_tanh.yaml")
    assert len(t8.cells) == 39
    assert {c.config["model"]["activation"] for c in t8.cells} == {"tanh"}
    c2c = load_sweep("experiments/c2c.yaml")
    assert len(c2c.cells) == 24
    assert {c.config["backend"].split("c2c=")[1] for c in c2c.cells} == {"0.1", "0.3", "0.6",
                                                                         "1.2"}
    cnn = load_sweep("experiments/cnn.yaml")
    assert [c.config["algorithm"]["name"] for c in cnn.cells][:4] == ["digital", "analog_sgd",
                                                                  "tiki_taka", "rlv2"]
    assert {c.config["model"]["kind"] for c in cnn.cells} == {"cnn"}
