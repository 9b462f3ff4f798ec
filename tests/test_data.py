"""Data loaders: real digits, the MNIST IDX reader on small files written here, least squares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hil.data import least_squares, load_digits, load_mnist, read_idx, write_idx


def test_digits_are_real_scaled_and_split_by_seed():
    ds = load_digits(test_fraction=0.2, seed=0)
    assert ds.n_inputs == 64 and ds.n_outputs == 10
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == 1797
    assert ds.x_test.shape[0] == 359
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    assert set(ds.y_train.unique().tolist()) == set(range(10))
    again = load_digits(test_fraction=0.2, seed=0)
    assert torch.equal(ds.x_test, again.x_test)
    assert not torch.equal(ds.x_test, load_digits(test_fraction=0.2, seed=1).x_test)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    assert np.array_equal(read_idx(path), arr)
    f = np.array([1.5, -2.0], dtype=np.float32)
    write_idx(tmp_path / "f.idx", f)
    assert np.array_equal(read_idx(tmp_path / "f.idx"), f)


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match="header implies"):
        read_idx(tmp_path / "short")


def test_mnist_reader_on_small_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", 12, True), ("t10k", 5, False)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        if prefix == "train":
            first = images[0]
    ds = load_mnist(tmp_path, limit_train=10)
    assert ds.x_train.shape == (10, 784) and ds.x_test.shape == (5, 784)
    assert ds.y_train.dtype == torch.int64
    assert torch.allclose(ds.x_train[0], torch.from_numpy(first.reshape(-1) / 255.0).float())
    with pytest.raises(FileNotFoundError):
        load_mnist(tmp_path / "missing")


def test_least_squares_is_linear_and_seeded():
    ds = least_squares(n_train=50, n_test=10, n_inputs=3, n_outputs=2, noise=0.0, seed=4)
    sol = torch.linalg.lstsq(ds.x_train, ds.y_train).solution
    assert torch.allclose(ds.x_test @ sol, ds.y_test, atol=1e-4)
    assert torch.equal(ds.x_train, least_squares(50, 10, 3, 2, 0.0, seed=4).x_train)
    assert ds.task == "regression"
