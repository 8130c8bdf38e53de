"""One model on several processes: DistributedDataParallel under ``torchrun`` (gloo on CPUs, nccl on GPUs).

    torchrun --nproc-per-node 4 -m fbalign train configs/cifar10_resnet.toml     # or: fbalign train ... --nproc 4

:func:`fbalign.train.train` calls :func:`setup` first: under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process
group, and every rank then builds the same data, the same model and the same feedback state from the seed. Each
global batch of ``batch_size`` examples is cut into ``world_size`` equal slices; DDP averages the gradients, and the
losses are means over the batch, so 2 ranks × half a batch take the same step as 1 process with the whole batch.
Feedback state stays identical on every rank without being sent: fa's B comes from the seed, brsf redraws from
the default generator seeded alike on every rank, and kp's and wm's plastic B step on the all-reduced gradients.
:func:`check_same_state` refuses to start when a rank's state differs anyway.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import ConfigError

__all__ = ["Ranks", "setup", "teardown", "check_same_state", "reduce_step", "from_main", "wrap"]


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process started the process group (and ends it)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device, batch_size: int) -> tuple[Ranks, torch.device]:
    """Join the process group ``torchrun`` describes (or use the one already set up); return the ranks and this
    rank's device. A single process (no ``WORLD_SIZE`` > 1) gets ``Ranks()`` and ``device`` unchanged."""
    if not dist.is_available() or (not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) <= 1):
        return Ranks(), device
    owns = not dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            if torch.cuda.device_count() < local_world:
                raise ConfigError(f"torchrun started {local_world} processes on this machine but it has "
                                  f"{torch.cuda.device_count()} GPU(s) for nccl; start at most that many "
                                  "(--nproc-per-node) or train on the CPU with gloo (device = 'cpu')")
        dist.init_process_group(backend)
    elif dist.get_backend() == "nccl" and device.type != "cuda":
        raise ConfigError(f"the process group uses nccl, which needs GPUs, but device = '{device}'; set device = "
                          "'cuda' or start the group with backend='gloo'")
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), local_rank, owns)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if batch_size % ranks.world_size:
        teardown(ranks)
        raise ConfigError(f"batch_size = {batch_size} is the global batch and must split evenly over the "
                          f"{ranks.world_size} processes; choose a multiple of {ranks.world_size}")
    return ranks, device


def teardown(ranks: Ranks) -> None:
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` (itself for one process)."""
    if not ranks.active:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def check_same_state(model: nn.Module, ranks: Ranks) -> None:
    """Refuse to start (``RuntimeError`` on every rank) when a rank's parameters or buffers, the feedback
    matrices among them, differ from rank 0's: the ranks would train different networks."""
    if not ranks.active:
        return
    digests = {name: hashlib.sha1(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
               for name, t in model.state_dict().items()}
    everyone: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(everyone, digests)
    differ = {rank: sorted(k for k in digests if theirs.get(k) != everyone[0].get(k))
              for rank, theirs in enumerate(everyone) if theirs != everyone[0]}
    if differ:
        listed = "; ".join(f"rank {r}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                           for r, names in differ.items())
        raise RuntimeError(f"refusing to train: the model's state differs between ranks ({listed}); every rank "
                           "must build the same model and feedback from the same seed (check that no rank "
                           "overrides seed or rule.seed, and that the code is the same on every machine)")


def reduce_step(loss: Tensor, correct: Tensor, stopping: bool, ranks: Ranks) -> tuple[Tensor, Tensor, bool]:
    """One all-reduce after a step: the whole batch's mean loss, its correct count, and whether any rank stops
    (so every rank stops after the same step)."""
    if not ranks.active:
        return loss, correct, stopping
    both = torch.stack([loss.detach().double(), correct.double(), torch.tensor(float(stopping), dtype=torch.float64,
                                                                                device=loss.device)])
    dist.all_reduce(both)
    return (both[0] / ranks.world_size).to(loss.dtype), both[1].to(correct.dtype), bool(both[2] > 0)


def from_main(ranks: Ranks, work: Any) -> Any:
    """``work()`` on rank 0, its result (or its exception) on every rank."""
    if not ranks.active:
        return work()
    box: list[Any] = [None]
    if ranks.is_main:
        try:
            box[0] = (True, work())
        except Exception as e:
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value
