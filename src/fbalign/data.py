"""Data sets as tensors: MNIST-format IDX files (Fashion-MNIST from Debian, MNIST from any directory).

Small data sets live whole on the training device, so a training loop slices tensors instead of running a
DataLoader (no per-batch Python data-loading overhead).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["TensorDataset", "read_idx", "load_mnist_format", "FASHION_MNIST_DIR", "DATA_HINT"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

DATA_HINT = {
    "fashion-mnist": "install it with `sudo apt-get install dataset-fashion-mnist` (IDX files under "
                     f"{FASHION_MNIST_DIR}), or pass a directory holding the four Fashion-MNIST IDX files",
    "mnist": "download the four MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
             "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, plain or .gz) and pass their directory",
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class TensorDataset:
    """Inputs and integer labels of a train and a test split, as tensors.

    Shapes: ``train_x (N, *features)`` float32 in [0, 1], ``train_y (N,)`` int64; likewise for test.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    def to(self, device: torch.device | str) -> TensorDataset:
        return TensorDataset(self.name, self.train_x.to(device), self.train_y.to(device), self.test_x.to(device),
                             self.test_y.to(device), self.num_classes)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed) into an array of its stored shape and type."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {data.size} values (truncated?)")
    return data.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
           "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find(directory: Path, stem: str) -> Path | None:
    # Plain or .gz, in the directory itself or in torchvision's raw layout (DIR/<Name>/raw/).
    candidates = [directory, *sorted(directory.glob("*/raw"))]
    for folder in candidates:
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_mnist_format(directory: str | os.PathLike | None = None, name: str = "fashion-mnist") -> TensorDataset:
    """Load MNIST or Fashion-MNIST from a directory of IDX files.

    ``directory=None`` means Debian's Fashion-MNIST (``/usr/share/datasets/fashion-mnist``). Images become
    float32 ``(N, 1, 28, 28)`` in [0, 1]. A missing file raises ``FileNotFoundError`` that says how to get it.
    """
    if name not in DATA_HINT:
        raise ValueError(f"unknown MNIST-format data set {name!r}; choose one of {', '.join(DATA_HINT)}")
    folder = Path(directory) if directory is not None else FASHION_MNIST_DIR
    arrays = {}
    for split, stems in _SPLITS.items():
        for kind, stem in zip(("x", "y"), stems):
            path = _find(folder, stem)
            if path is None:
                raise FileNotFoundError(f"{name}: no {stem}[.gz] in {folder}; {DATA_HINT[name]}")
            arrays[split + kind] = read_idx(path)
    for split in _SPLITS:
        if len(arrays[split + "x"]) != len(arrays[split + "y"]):
            raise ValueError(f"{name} in {folder}: {split} images and labels differ in number "
                             f"({len(arrays[split + 'x'])} vs {len(arrays[split + 'y'])})")

    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return TensorDataset(name, images(arrays["trainx"]), labels(arrays["trainy"]), images(arrays["testx"]),
                         labels(arrays["testy"]), num_classes=10)
