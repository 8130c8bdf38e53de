"""A learning-rate grid through the training loop: ``fbalign.train.train_ensemble`` (the E runs as one ensemble)
against ``fbalign.train.train`` (the same E runs one after another), side by side in one run.

    python benchmarks/ensemble_training.py                          # the cases below, CPU, 1 thread
    python benchmarks/ensemble_training.py --device cuda --threads 2
    python benchmarks/ensemble_training.py --cases liao-mlp --rates 6 --epochs 3 --rounds 5

Cases (the reproductions' cells):

* ``liao-mlp``: liao2016's 3×256 ReLU MLP with BatchNorm, usf, on scikit-learn's digits (1,497 training images),
  batch 32, SGD with momentum 0.9 and a cosine schedule.
* ``liao-lenet``: the same with LeNet-5 on the digits resized to 28×28.
* ``image-mlp``: open-questions' 784-256-256-10 tanh MLP, fa, on 10,000 Fashion-MNIST images, batch 128 (skipped
  when the Debian data package is not installed).

Each round trains the grid both ways, in a fresh random order, so drift in machine speed hits both alike; the
table shows the median over rounds of the wall time (evaluation included: it is part of a run) and of the ratio
one-after-another / ensemble within a round. (That both ways train each run alike is tested, in float64:
tests/test_train_ensemble.py; in float32 the highest rates are chaotic enough that rounding alone moves them.)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fbalign.data import load_digits, prepare
from fbalign.train import train, train_ensemble

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
LIAO = {"batch_size": 32, "loss": "cross_entropy", "rule": "usf",
        "optimizer": {"name": "sgd", "momentum": 0.9}, "schedule": {"name": "cosine"}, "log": {"progress": False}}
CASES: dict[str, dict[str, Any]] = {
    "liao-mlp": {**LIAO, "model": {"name": "mlp", "hidden": [256, 256, 256], "batchnorm": True}},
    "liao-lenet": {**LIAO, "model": {"name": "lenet5", "batchnorm": True}},
    "image-mlp": {"batch_size": 128, "loss": "cross_entropy", "rule": "fa",
                  "model": {"name": "mlp", "hidden": [256, 256], "activation": "tanh"},
                  "optimizer": {"name": "sgd", "momentum": 0.9}, "log": {"progress": False}},
}


def case_data(case: str) -> Any:
    if case == "image-mlp":
        from fbalign.data import load

        return prepare(load("fashion-mnist", dir=str(FASHION_MNIST)), validation=5000, train_size=10_000,
                       normalize=True, seed=0)
    return prepare(load_digits(), validation=300, normalize=True, seed=0, size=28 if case == "liao-lenet" else None)


def measure(configs: list[dict[str, Any]], data: Any, rounds: int) -> tuple[dict[str, list[float]], float]:
    """Seconds per round of each way, and the median ratio one-after-another / ensemble within a round."""
    ways = {"alone": lambda: [train(c, data=data, handle_signals=False) for c in configs],
            "ensemble": lambda: train_ensemble(configs, data=data, handle_signals=False)}
    ways["ensemble"]()  # warm-up: first-call costs
    times: dict[str, list[float]] = {way: [] for way in ways}
    ratios = []
    for _ in range(rounds):
        for way in random.sample(list(ways), len(ways)):
            start = time.perf_counter()
            ways[way]()
            times[way].append(time.perf_counter() - start)
        ratios.append(times["alone"][-1] / times["ensemble"][-1])
    return times, statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--rates", type=int, default=6, help="E, learning rates in the grid (default 6)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the "
                        "reproductions' worker processes)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rates = [10.0 ** k for k in range(-args.rates + 1, 1)][-args.rates:]  # 1e-5 … 1 for 6, as liao2016's grid
    print(f"{args.rates} learning rates ({rates[0]:g} … {rates[-1]:g}), {args.epochs} epochs, on {args.device} "
          f"({args.threads} CPU threads), median of {args.rounds} rounds")
    print(f"{'case':<11} {'one after another':>18} {'ensemble':>10} {'speed-up':>9}")
    for case in args.cases.split(","):
        if case == "image-mlp" and not FASHION_MNIST.exists():
            print(f"{case:<11} skipped: no {FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
            continue
        data = case_data(case)
        configs = [{**CASES[case], "epochs": args.epochs, "device": args.device, "seed": 0, "threads": args.threads,
                    "optimizer": {**CASES[case]["optimizer"], "lr": lr}} for lr in rates]
        times, ratio = measure(configs, data, args.rounds)
        print(f"{case:<11} {statistics.median(times['alone']):>16.2f} s {statistics.median(times['ensemble']):>8.2f} s "
              f"{ratio:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
