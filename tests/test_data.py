"""fbalign.data: IDX files read exactly, helpful errors, Debian's Fashion-MNIST when installed."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from fbalign.data import load_mnist_format, read_idx


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def fake_mnist(folder, n_train=6, n_test=4, compress=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, (n,), dtype=np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", x, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", y, compress)
        arrays[split] = (x, y)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    a = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", a, compress)
    path = tmp_path / "a.idx"
    if compress:
        path.rename(tmp_path / "a.idx.gz")
        path = tmp_path / "a.idx.gz"
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and (out == np.arange(24).reshape(2, 3, 4)).all()


def test_read_idx_rejects_bad_and_truncated_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("layout", ["flat", "flat-gz", "torchvision"])
def test_load_mnist_format_layouts(tmp_path, layout):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = fake_mnist(folder, compress=layout == "flat-gz")
    data = load_mnist_format(tmp_path, "mnist")
    assert data.train_x.shape == (6, 1, 28, 28) and data.train_x.dtype == torch.float32
    assert data.test_y.dtype == torch.int64
    torch.testing.assert_close(data.train_x[:, 0] * 255, torch.from_numpy(arrays["train"][0]).float())
    assert torch.equal(data.test_y, torch.from_numpy(arrays["t10k"][1]).long())


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_mnist_format(tmp_path, "fashion-mnist")
    with pytest.raises(FileNotFoundError, match="MNIST IDX files"):
        load_mnist_format(tmp_path, "mnist")
    with pytest.raises(ValueError, match="choose one of"):
        load_mnist_format(tmp_path, "cifar")


def test_debian_fashion_mnist(fashion_mnist_dir):
    data = load_mnist_format(fashion_mnist_dir)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert set(data.train_y.unique().tolist()) == set(range(10))
    assert 0.0 <= data.train_x.min() and data.train_x.max() <= 1.0
