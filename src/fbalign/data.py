"""Data sets as tensors: MNIST-format IDX files (Fashion-MNIST from Debian, MNIST from any directory),
scikit-learn's digits, and Lillicrap et al.'s synthetic teacher tasks.

Small data sets live whole on the training device, so a training loop slices tensors instead of running a
DataLoader (no per-batch Python data-loading overhead). :func:`load` builds any of them by name and
:func:`prepare` resizes, normalizes, subsamples and splits off a validation set.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DataSplits", "TensorDataset", "read_idx", "load_mnist_format", "load_digits", "linear_teacher",
           "nonlinear_teacher", "load", "prepare", "DATASETS", "FASHION_MNIST_DIR", "DATA_HINT",
           "load_cifar", "cifar_directory", "augment", "augment_batch", "CIFAR_ENV"]

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
class DataSplits:
    """A data set's train and test splits (and optionally a validation split), inputs and targets as tensors.

    Classification (``num_classes`` set): ``train_x (N, *features)`` float32, ``train_y (N,)`` int64 labels.
    Regression (``num_classes`` None): ``train_y (N, outputs)`` float32 targets. Likewise for test and val.
    ``extras`` holds task facts such as a teacher's weights.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int | None
    val_x: Tensor | None = None
    val_y: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.train_x.shape[1:])

    @property
    def num_outputs(self) -> int:
        """Model outputs the task needs: the classes, or the target dimensions."""
        return self.num_classes if self.num_classes is not None else int(self.train_y.shape[1])

    @property
    def is_classification(self) -> bool:
        return self.num_classes is not None

    def splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{'train': (x, y), 'val': (x, y), 'test': (x, y)}``, without val when there is none."""
        out = {"train": (self.train_x, self.train_y)}
        if self.val_x is not None and self.val_y is not None:
            out["val"] = (self.val_x, self.val_y)
        out["test"] = (self.test_x, self.test_y)
        return out

    def to(self, device: torch.device | str) -> DataSplits:
        """A copy with every tensor on ``device`` (no copy for tensors already there)."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self, train_x=move(self.train_x), train_y=move(self.train_y), test_x=move(self.test_x),
            test_y=move(self.test_y), val_x=move(self.val_x), val_y=move(self.val_y),
            extras={k: v.to(device) for k, v in self.extras.items()})


TensorDataset = DataSplits
"""Deprecated alias of :class:`DataSplits` (kept for one release; it is not torch's ``TensorDataset``)."""


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


_TORCHVISION_NAMES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _find(directory: Path, stem: str, name: str) -> Path | None:
    # Plain or .gz, in the directory itself or in torchvision's raw layout (DIR/<Name>/raw/), the data set's
    # own torchvision folder first (a root may hold both MNIST/ and FashionMNIST/).
    candidates = [directory, directory / "raw", directory / _TORCHVISION_NAMES[name] / "raw",
                  *sorted(directory.glob("*/raw"))]
    for folder in candidates:
        for file in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
            if (folder / file).is_file():
                return folder / file
    return None


def load_mnist_format(directory: str | os.PathLike | None = None, name: str = "fashion-mnist") -> DataSplits:
    """Load MNIST or Fashion-MNIST from a directory of IDX files.

    ``directory=None`` means Debian's Fashion-MNIST (``/usr/share/datasets/fashion-mnist``). The files may be
    plain or gzipped, in ``directory`` itself or in torchvision's layout (``directory/MNIST/raw/``). Images
    become float32 ``(N, 1, 28, 28)`` in [0, 1]. A missing file raises ``FileNotFoundError`` that says how to
    get it.
    """
    if name not in DATA_HINT:
        raise ValueError(f"unknown MNIST-format data set {name!r}; choose one of {', '.join(DATA_HINT)}")
    if directory is None and name != "fashion-mnist":
        raise FileNotFoundError(f"{name}: no directory given; {DATA_HINT[name]}")
    folder = Path(directory) if directory is not None else FASHION_MNIST_DIR
    arrays = {}
    for split, stems in _SPLITS.items():
        for kind, stem in zip(("x", "y"), stems):
            path = _find(folder, stem, name)
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

    return DataSplits(name, images(arrays["trainx"]), labels(arrays["trainy"]), images(arrays["testx"]),
                      labels(arrays["testy"]), num_classes=10)


def load_digits(test_size: int = 360, seed: int = 0) -> DataSplits:
    """scikit-learn's 8×8 handwritten digits (1797 images, shipped with scikit-learn: nothing to download).

    Images become float32 ``(N, 1, 8, 8)`` in [0, 1]; ``test_size`` of them, drawn with ``seed``, are the test
    split.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    if not 0 < test_size < len(x):
        raise ValueError(f"digits: test_size={test_size} must lie between 1 and {len(x) - 1}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size].sort().values, order[test_size:].sort().values
    return DataSplits("digits", x[train], y[train], x[test], y[test], num_classes=10)


def _split_inputs(x: Tensor, y: Tensor, n_train: int, name: str, extras: dict[str, Tensor],
                  dtype: torch.dtype | str) -> DataSplits:
    named = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype  # 'float64' from a TOML config
    if not isinstance(named, torch.dtype) or not named.is_floating_point:
        raise ValueError(f"{name}: dtype={dtype!r} is not a floating-point type; use torch.float32 or torch.float64 "
                         "('float32' or 'float64' in a config)")
    dtype = named
    x, y = x.to(dtype), y.to(dtype)
    extras = {k: v.to(dtype) for k, v in extras.items()}
    return DataSplits(name, x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes=None, extras=extras)


def _check_sizes(name: str, n_train: int, n_test: int) -> None:
    if n_train < 1 or n_test < 1:
        raise ValueError(f"{name}: n_train={n_train} and n_test={n_test} must both be at least 1")


def linear_teacher(n_train: int = 400_000, n_test: int = 5000, in_dim: int = 30, out_dim: int = 10,
                   seed: int = 0, dtype: torch.dtype | str = torch.float32) -> DataSplits:
    """Lillicrap et al.'s linear task (Fig. 1): ``y* = T·x`` with ``T (out_dim × in_dim) ~ U[-1, 1]`` fixed
    and ``x ~ N(0, I)``.

    Shapes: ``train_x (n_train, in_dim)``, ``train_y (n_train, out_dim)``; the ``n_test`` held-out points
    follow from the same stream. ``extras['T']`` is the teacher. One ``seed`` gives one task and one data
    sequence (drawn in float64 on the CPU, so it is the same on every machine); ``dtype=torch.float64`` keeps
    that precision (the targets are then exact to float64 rounding, so errors can be driven to ~1e-30).
    """
    _check_sizes("linear-teacher", n_train, n_test)
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.empty(out_dim, in_dim, dtype=torch.float64).uniform_(-1.0, 1.0, generator=gen)
    x = torch.randn(n_train + n_test, in_dim, generator=gen, dtype=torch.float64)
    return _split_inputs(x, x @ teacher.T, n_train, "linear-teacher", {"T": teacher}, dtype)


def nonlinear_teacher(n_train: int = 400_000, n_test: int = 5000,
                      widths: tuple[int, ...] | list[int] = (30, 20, 10, 10),
                      weight_range: float = 1.0, seed: int = 0,
                      dtype: torch.dtype | str = torch.float32) -> DataSplits:
    """Lillicrap et al.'s nonlinear task (Fig. 2d): a fixed random teacher 30-20-10-10,
    ``y* = W2·tanh(W1·tanh(W0·x + b0) + b1) + b2``, with ``x ~ N(0, I)``.

    The teacher's weights and biases are drawn from ``U[-weight_range, weight_range]``; tanh after every layer
    but the last. ``extras`` holds ``W0, b0, W1, b1, ...``. Shapes and ``dtype`` as for :func:`linear_teacher`.

    Lillicrap et al. say only that the teacher's parameters were "chosen at random"; U[-1, 1] is the range they
    give for the linear task's teacher T. With it the tanh units work in their nonlinear range (pre-activations
    of standard deviation ≈ 3 in the first layer), so a 30-20-10 student cannot fit the function exactly while
    a 30-20-10-10 one can: depth matters, as in the paper's Fig. 2d.
    """
    _check_sizes("nonlinear-teacher", n_train, n_test)
    if len(widths) < 2:
        raise ValueError(f"nonlinear-teacher: widths={list(widths)} needs at least an input and an output width")
    gen = torch.Generator().manual_seed(seed)
    extras: dict[str, Tensor] = {}
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        w = torch.empty(n_out, n_in, dtype=torch.float64).uniform_(-weight_range, weight_range, generator=gen)
        b = torch.empty(n_out, dtype=torch.float64).uniform_(-weight_range, weight_range, generator=gen)
        layers.append((w, b))
        extras[f"W{i}"], extras[f"b{i}"] = w, b
    x = torch.randn(n_train + n_test, widths[0], generator=gen, dtype=torch.float64)
    h = x
    for i, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if i < len(layers) - 1:
            h = torch.tanh(h)
    return _split_inputs(x, h, n_train, "nonlinear-teacher", extras, dtype)


def _mnist(name: str):
    def loader(dir: str | os.PathLike | None = None) -> DataSplits:
        return load_mnist_format(dir, name)

    loader.__doc__ = f"{name} from a directory of IDX files (``dir``; see :func:`load_mnist_format`)."
    return loader


# name -> loader; a loader's keyword arguments are the data set's options (``seed`` is passed when it takes one).
DATASETS: dict[str, Any] = {
    "fashion-mnist": _mnist("fashion-mnist"),
    "mnist": _mnist("mnist"),
    "digits": load_digits,
    "linear-teacher": linear_teacher,
    "nonlinear-teacher": nonlinear_teacher,
}


def load(name: str, **options: Any) -> DataSplits:
    """Load the data set called ``name`` (one of :data:`DATASETS`) with its options, on the CPU.

    Raises ``ValueError`` naming the valid data sets or options, ``FileNotFoundError`` saying how to get
    missing files.
    """
    from ._util import check_options

    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    check_options(DATASETS[name], options, f"data set {name!r}")
    return DATASETS[name](**options)


def prepare(data: DataSplits, *, size: int | None = None, resize: Literal["bilinear", "pad"] = "bilinear",
            validation: int = 0, train_size: int | None = None, normalize: bool = False,
            seed: int = 0) -> DataSplits:
    """Make a data set ready for training, in this order:

    1. ``validation``: hold out that many training examples (drawn with ``seed``) as the validation split.
    2. ``train_size``: keep only the first ``train_size`` of the remaining training examples.
    3. ``size``: images become ``size × size``, by bilinear interpolation or by zero-padding evenly
       (``resize='pad'``, e.g. 28 → 32 as for LeNet-5); only the examples kept are resized.
    4. ``normalize``: standardize inputs with the mean and standard deviation (per channel for images) of
       the training split, applied to every split.
    """
    splits = {k: list(v) for k, v in data.splits().items()}
    x, y = splits["train"]
    if validation:
        if "val" in splits:
            raise ValueError(f"{data.name} already has a validation split; set data.validation = 0")
        if not 0 < validation < len(x):
            raise ValueError(f"validation={validation} must lie between 1 and {len(x) - 1} (the training examples)")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        held, kept = order[:validation].sort().values, order[validation:].sort().values
        splits["val"] = [x[held], y[held]]
        x, y = x[kept], y[kept]
    if train_size is not None:
        if not 0 < train_size <= len(x):
            raise ValueError(f"train_size={train_size} must lie between 1 and {len(x)} (the training examples)")
        x, y = x[:train_size], y[:train_size]
    splits["train"] = [x, y]
    if size is not None:
        if data.train_x.dim() != 4:
            raise ValueError(f"{data.name}: size={size} resizes images, but the inputs have shape "
                             f"{data.input_shape}; remove data.size")
        if resize not in ("bilinear", "pad"):
            raise ValueError(f"resize={resize!r}; choose 'bilinear' or 'pad'")
        for xy in splits.values():
            xy[0] = _resize(xy[0], size, resize)
    if normalize:
        x = splits["train"][0]
        dims = [d for d in range(x.dim()) if d != 1] if x.dim() == 4 else [0]
        mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True).clamp_min(1e-8)
        for xy in splits.values():
            xy[0] = (xy[0] - mean) / std
    val = splits.get("val", [None, None])
    return dataclasses.replace(data, train_x=splits["train"][0], train_y=splits["train"][1], test_x=splits["test"][0],
                               test_y=splits["test"][1], val_x=val[0], val_y=val[1])


def _resize(x: Tensor, size: int, how: str) -> Tensor:
    height, width = x.shape[-2:]
    if (height, width) == (size, size):
        return x
    if how == "pad":
        if size < max(height, width) or (size - height) % 2 or (size - width) % 2:
            raise ValueError(f"resize='pad' cannot turn {height}×{width} images into {size}×{size} evenly; "
                             "use resize='bilinear'")
        dh, dw = (size - height) // 2, (size - width) // 2
        return F.pad(x, (dw, dw, dh, dh))
    out = torch.empty(len(x), x.shape[1], size, size, dtype=x.dtype)
    for i in range(0, len(x), 10_000):  # in chunks: bounded temporary memory
        out[i:i + 10_000] = F.interpolate(x[i:i + 10_000], size=(size, size), mode="bilinear", align_corners=False,
                                          antialias=size < min(height, width))
    return out


# CIFAR lives in its own module (size); its loaders register themselves in DATASETS.
from .cifar import CIFAR_ENV, augment, augment_batch, cifar_directory, load_cifar  # noqa: E402
