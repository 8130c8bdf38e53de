"""fbalign.checkpoint: a crash during a write never tears the file; every random stream comes back."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fbalign import checkpoint


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_atomic_text_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    checkpoint.atomic_write_text(path, "first\n")
    checkpoint.atomic_write_text(path, "second\n")
    assert path.read_text() == "second\n"


def test_rng_state_round_trip_restores_every_stream(tmp_path):
    order = torch.Generator().manual_seed(7)
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.randperm(10, generator=order)
    checkpoint.save({"rng": checkpoint.rng_state(order)}, tmp_path / "rng.pt")

    def draws():
        return (torch.rand(4).tolist(), random.random(), float(np.random.rand()),
                torch.randperm(10, generator=order).tolist())

    expected = draws()
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    order.manual_seed(99)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"], order)
    assert draws() == expected
    with pytest.raises(ValueError, match="1 generator state"):
        checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])


def test_an_unreadable_checkpoint_names_the_file_and_how_to_start_over(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save({"step": 3, "w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:200])  # cut short, as by a full disk
    with pytest.raises(checkpoint.CheckpointError, match=rf"cannot read the checkpoint {path} .*truncated.*rm {path}"):
        checkpoint.load(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        checkpoint.load(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "missing.pt")
