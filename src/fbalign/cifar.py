"""CIFAR-10 and CIFAR-100 from the python-pickle release, and the training-time augmentations used with them
(random padded crop, horizontal flip) on tensors on the training device. Registered in :data:`fbalign.data.DATASETS`
as ``cifar10`` and ``cifar100``; every name here is also importable from :mod:`fbalign.data`.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import DATASETS, TensorDataset, prepare

CIFAR_ENV = "FBALIGN_CIFAR_DIR"
"""Environment variable naming the directory of the CIFAR releases when no ``dir`` is given."""

# name -> (release folder, training files, test files, label key, classes, download address)
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", 10,
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), b"fine_labels", 100,
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def _cifar_hint(name: str) -> str:
    folder, *_, url = _CIFAR[name]
    return (f"download the python version of {name} ({url}), unpack it (`tar xzf {url.rsplit('/', 1)[1]}`) and pass "
            f"the directory that holds {folder}/ as data.dir (or --data-dir), or set {CIFAR_ENV}")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays, lists, dicts, strings and numbers only: a pickle is a program, and a data file has
    no business running anything else."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch: images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64, each checked."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, ImportError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); download the release again"
                         ) from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path} is not a CIFAR batch: expected a dict with keys b'data' and {label_key!r}, "
                         f"found {keys}")
    images = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' should be uint8 of shape (N, 3072), found {images.dtype} "
                         f"{images.shape} (truncated or corrupt?)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {labels.size} labels (truncated or corrupt?)")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"{path}: labels must lie in 0..{classes - 1}, found {labels.min()}..{labels.max()}")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def cifar_directory(dir: str | os.PathLike | None, name: str = "cifar10") -> Path:
    """The release folder of ``name`` (``cifar-10-batches-py/`` or ``cifar-100-python/``): ``dir`` itself or its
    subfolder of that name; ``dir=None`` reads the environment variable :data:`CIFAR_ENV`. A missing folder raises
    ``FileNotFoundError`` saying where the files must be and how to get them."""
    if name not in _CIFAR:
        raise ValueError(f"unknown CIFAR data set {name!r}; choose one of {', '.join(_CIFAR)}")
    folder_name, train_files, test_files, *_ = _CIFAR[name]
    if dir is None:
        dir = os.environ.get(CIFAR_ENV)
        if not dir:
            raise FileNotFoundError(f"{name}: no directory given (data.dir, --data-dir, or {CIFAR_ENV}); "
                                    + _cifar_hint(name))
    base = Path(dir).expanduser()
    for folder in (base / folder_name, base):
        if (folder / train_files[0]).is_file():
            return folder
    raise FileNotFoundError(f"{name}: no {folder_name}/{train_files[0]} under {base} (the files must be "
                            f"{base / folder_name}/{{{', '.join(train_files + test_files)}}}); " + _cifar_hint(name))


def load_cifar(dir: str | os.PathLike | None = None, name: str = "cifar10", val_size: int = 5000,
               seed: int = 0) -> TensorDataset:
    """CIFAR-10 or CIFAR-100 (``name``) from the python-pickle release in ``dir`` (see :func:`cifar_directory`).

    Images become float32 ``(N, 3, 32, 32)`` in [0, 1]; labels int64 (CIFAR-100: the 100 fine labels).
    ``val_size`` training images, drawn with ``seed``, become the validation split (BioTorch's 45k/5k by default;
    0: none). Standardize per channel with :func:`prepare` (``normalize=True``, the training split's statistics)
    and augment training batches with :func:`augment`. Every file of the release must be present and whole: a
    missing one raises ``FileNotFoundError``, a truncated or corrupt one ``ValueError`` naming it.
    """
    folder = cifar_directory(dir, name)
    _, train_files, test_files, label_key, classes, _ = _CIFAR[name]
    splits = {}
    for split, files in (("train", train_files), ("test", test_files)):
        parts = []
        for file in files:
            if not (folder / file).is_file():
                raise FileNotFoundError(f"{name}: {folder / file} is missing (the release has "
                                        f"{', '.join(train_files + test_files)}); " + _cifar_hint(name))
            parts.append(_read_cifar_batch(folder / file, label_key, classes))
        splits[split] = (torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0),
                         torch.from_numpy(np.concatenate([p[1] for p in parts])))
    data = TensorDataset(name, *splits["train"], *splits["test"], num_classes=classes)
    return prepare(data, validation=val_size, seed=seed) if val_size else data


def _cifar(name: str):
    def loader(dir: str | os.PathLike | None = None, val_size: int = 5000, seed: int = 0) -> TensorDataset:
        return load_cifar(dir, name, val_size=val_size, seed=seed)

    loader.__doc__ = f"{name} from the python-pickle release in ``dir`` (see :func:`load_cifar`)."
    return loader


DATASETS["cifar10"] = _cifar("cifar10")
DATASETS["cifar100"] = _cifar("cifar100")


def augment(x: Tensor, *, crop_padding: int = 4, flip: bool = True,
            generator: torch.Generator | None = None) -> Tensor:
    """He et al.'s CIFAR augmentation on a batch, on the batch's device (no DataLoader, no per-image Python):
    each image is zero-padded by ``crop_padding`` pixels, cropped back to its size at a random offset, and
    mirrored left-right with probability ½ when ``flip``.

    Shapes: ``x (N, C, H, W)`` → ``(N, C, H, W)``. ``generator`` (on ``x``'s device) draws the offsets and flips.
    """
    if x.dim() != 4:
        raise ValueError(f"augment() takes images (N, C, H, W), got shape {tuple(x.shape)}; data.augment is for "
                         "image data sets")
    n, _, height, width = x.shape
    p = crop_padding
    rows = torch.arange(height, device=x.device).expand(n, height)
    cols = torch.arange(width, device=x.device).expand(n, width)
    if flip:
        flipped = torch.rand(n, 1, generator=generator, device=x.device) < 0.5
        cols = torch.where(flipped, width - 1 - cols, cols)
    if p:
        x = F.pad(x, (p, p, p, p))
        rows = rows + torch.randint(0, 2 * p + 1, (n, 1), generator=generator, device=x.device)
        cols = cols + torch.randint(0, 2 * p + 1, (n, 1), generator=generator, device=x.device)
    picked = x.gather(2, rows[:, None, :, None].expand(n, x.shape[1], height, x.shape[3]))
    return picked.gather(3, cols[:, None, None, :].expand(n, x.shape[1], height, width))


def augment_batch(x: Tensor, enabled: bool, *, seed: int, step: int) -> Tensor:
    """The training loop's augmentation hook: ``x`` augmented with :func:`augment` when ``enabled`` (config key
    ``data.augment``), else ``x`` itself. The draws depend only on (``seed``, ``step``), so a resumed run augments
    its remaining steps exactly as an uninterrupted one would, with no generator state to checkpoint."""
    if not enabled:
        return x
    generator = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + step)
    return augment(x, generator=generator)
