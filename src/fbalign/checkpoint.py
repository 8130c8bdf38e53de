"""Checkpoints that never lose work: atomic writes, and every random stream a resumed run needs.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed over the
old one (``os.replace`` is atomic on POSIX and Windows): a crash or a kill at any moment leaves either the
old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "atomic_write_bytes", "atomic_write_text", "save", "load", "rng_state", "set_rng_state"]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read: truncated, corrupted, or written by another version. The message names
    the file and how to start over."""


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; the rename is durable enough there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, rename)."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save(state)`` to ``path`` atomically."""
    _atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save` (tensors, numbers, strings, lists and dicts only).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CheckpointError: the file is not a checkpoint this version can read (cut short by a full disk or a copy,
            corrupted, or holding objects other than tensors and plain data).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises OSError, RuntimeError, EOFError, UnpicklingError ... by the damage
        raise CheckpointError(f"cannot read the checkpoint {path} ({path.stat().st_size} bytes): it is truncated, "
                              f"corrupted or written by another version ({type(e).__name__}: {e}). Start over by "
                              f"deleting it (rm {path}) or training into a new directory") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint; delete it (rm {path}) "
                              "or train into a new directory")
    return state


def rng_state(*generators: torch.Generator) -> dict[str, Any]:
    """Every random stream of this process: torch's CPU and CUDA default generators (``brsf`` and dropout
    draw from them), Python's ``random``, NumPy's global generator, and ``generators`` (e.g. the data order).

    Stored as tensors and plain lists, so :func:`load` with ``weights_only`` reads it back.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict[str, Any], *generators: torch.Generator) -> None:
    """Restore what :func:`rng_state` captured (``generators`` in the same order)."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if len(generators) != len(state["generators"]):
        raise ValueError(f"checkpoint holds {len(state['generators'])} generator state(s), {len(generators)} given")
    for g, s in zip(generators, state["generators"]):
        g.set_state(s.cpu())
