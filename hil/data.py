"""Data sets for training runs: sklearn's digits (offline), MNIST IDX files, least squares.

Each loader returns a :class:`Dataset` of float32 inputs (scaled to [0, 1] for images)
and int64 labels (or float targets for regression), split into train and test.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Dataset:
    """Train and test tensors plus what the model needs to know about them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_inputs: int
    n_outputs: int
    task: str  # 'classification' or 'regression'
    image_shape: tuple[int, int, int] | None = None  # (channels, height, width) of images

    def resized(self, side: int) -> Dataset:
        """The same images resized (bilinear) to ``side`` x ``side`` (sklearn's 8x8 digits
        brought to MNIST's 28x28 for the paper's CNN); inputs stay flat, in [0, 1]."""
        if self.image_shape is None:
            raise ValueError("resized: this data set holds no images")
        c = self.image_shape[0]
        return Dataset(resize_images(self.x_train, self.image_shape, side), self.y_train,
                       resize_images(self.x_test, self.image_shape, side), self.y_test,
                       n_inputs=c * side * side, n_outputs=self.n_outputs, task=self.task,
                       image_shape=(c, side, side))


def resize_images(x: torch.Tensor, shape: tuple[int, int, int], side: int) -> torch.Tensor:
    """Flat images ``x`` [N, C*H*W] of ``shape`` (C, H, W) resized by bilinear interpolation
    to [N, C*side*side]."""
    if x.shape[0] == 0:
        return x.new_zeros(0, shape[0] * side * side)
    img = x.reshape(-1, *shape)
    out = torch.nn.functional.interpolate(img, size=(side, side), mode="bilinear",
                                          align_corners=False)
    return out.clamp(0.0, 1.0).flatten(1)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or raw, into a numpy array."""
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(dims)) if dims else 1
    body = raw[4 + 4 * ndim:]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"{path}: IDX body has {len(body)} bytes, header implies "
                         f"{count * dtype.itemsize}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzip when the name ends in .gz); used by tests."""
    path = Path(path)
    codes = {np.dtype(v).str.lstrip("<>|="): k for k, v in _IDX_DTYPES.items()}
    arr = np.asarray(array)
    key = arr.dtype.str.lstrip("<>|=")
    if key not in codes:
        raise ValueError(f"dtype {arr.dtype} has no IDX code")
    big = arr.astype(np.dtype(_IDX_DTYPES[codes[key]]))
    data = bytes([0, 0, codes[key], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data += big.tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"{directory}: no {stem}[.gz] (MNIST IDX files)")


def load_mnist(directory: str | Path, limit_train: int | None = None,
               limit_test: int | None = None) -> Dataset:
    """MNIST from the four standard IDX files in ``directory``, flattened to 784 in [0, 1]."""
    d = Path(directory)
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(d, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(d, f"{prefix}-labels-idx1-ubyte"))
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{d}: {split} images and labels differ in count")
        limit = limit_train if split == "train" else limit_test
        images, labels = images[:limit], labels[:limit]
        x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
        parts[split] = (x, torch.from_numpy(labels.astype(np.int64)))
    n_in = parts["train"][0].shape[1]
    shape = tuple(images.shape[1:]) if images.ndim == 3 else None
    return Dataset(*parts["train"], *parts["test"], n_inputs=n_in, n_outputs=10,
                   task="classification", image_shape=(1, *shape) if shape else None)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """sklearn's 1797 real 8x8 handwritten digits, 64 inputs scaled to [0, 1], seeded split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(x.shape[0], generator=gen)
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    return Dataset(x[train], y[train], x[test], y[test], n_inputs=64, n_outputs=10,
                   task="classification", image_shape=(1, 8, 8))


def least_squares(n_train: int = 512, n_test: int = 128, n_inputs: int = 16,
                  n_outputs: int = 4, noise: float = 0.01, seed: int = 0) -> Dataset:
    """Synthetic linear regression y = x A^T + noise, with A ~ 0.3 N(0, 1), x ~ U[0, 1]."""
    gen = torch.Generator().manual_seed(int(seed))
    a = 0.3 * torch.randn(n_outputs, n_inputs, generator=gen)
    x = torch.rand(n_train + n_test, n_inputs, generator=gen)
    y = x @ a.t() + noise * torch.randn(n_train + n_test, n_outputs, generator=gen)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], n_inputs=n_inputs,
                   n_outputs=n_outputs, task="regression")
