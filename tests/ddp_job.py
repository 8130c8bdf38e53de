"""Run under torchrun by tests/test_ddp.py (not a test itself): train every rule of RULES on 2 ranks; rank 0 saves
the final weights and buffers to OUT. Then each rank seeds fa's B differently, which every rank must refuse."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from fbalign.train import train

RULES = ["fa", "brsf", "dfa", "kp"]
CONFIG = {"epochs": 1, "batch_size": 32, "threads": 1, "model": {"name": "mlp", "hidden": [24, 16]},
          "data": {"name": "digits", "train_size": 640},
          "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-3},
          "log": {"progress": False}}


def main(out: str) -> None:
    dist.init_process_group("gloo")  # train() joins this group rather than starting its own
    rank = dist.get_rank()
    states = {}
    for rule in RULES:
        result = train(CONFIG, rule=rule)
        states[rule] = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
        states[rule + ":history"] = result.history
    if rank == 0:
        torch.save(states, out)
    try:  # each rank seeds fa's B differently: every rank must refuse
        train(CONFIG, rule={"name": "fa", "seed": 10 + rank})
    except RuntimeError as e:
        print(f"rank {rank} refused: {e}", flush=True)
    else:
        print(f"rank {rank} trained", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # as fbalign's own entry point under torchrun (fbalign/__main__.py): skip the C++ static destructors, one of
    # which aborts about one exit of a gloo rank in 20
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
