"""`fbalign demo`: one small network trained with backprop, feedback alignment and sign symmetry, side by side.

The same MLP (same initial weights, same data order) is converted to each rule and trained with SGD
(momentum 0.9) on Fashion-MNIST by :func:`fbalign.train.train`; the test errors are printed as a table.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fbalign

from .config import PLAIN_TORCH
from .data import DATA_HINT, TensorDataset, load_mnist_format, prepare
from .models import MLP
from .train import evaluate, train

DEFAULT_RULES = ("backprop", "fa", "usf", "frsf", "brsf")


def mlp(widths: list[int]) -> nn.Sequential:
    """Flatten, then Linear-ReLU blocks with ``widths`` (first = input size, last = classes, no final ReLU)."""
    return MLP((widths[0],), widths[-1], hidden=widths[1:-1])


def test_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    """Percentage of ``x`` misclassified by ``model`` (argmax of the output)."""
    metrics = evaluate(model, x, y, nn.functional.cross_entropy, classification=True, batch_size=batch_size)
    return metrics["error"]


def train_classifier(model: nn.Module, data: TensorDataset, *, epochs: int, lr: float, batch_size: int, seed: int,
                     desc: str = "") -> float:
    """Train ``model`` as it is (whatever rule its layers have) with SGD, momentum 0.9, on cross-entropy through
    :func:`fbalign.train.train`; return the final test error in percent. ``desc`` labels the progress bar."""
    result = train(model=model, data=data, rule=PLAIN_TORCH, epochs=epochs, batch_size=batch_size, seed=seed,
                   optimizer={"name": "sgd", "lr": lr, "momentum": 0.9}, log={"progress": bool(desc)})
    return result.final["test_error"]


def run(rules: list[str], *, data_dir: str | None, epochs: int, hidden: list[int], lr: float, batch_size: int,
        train_size: int | None, seed: int) -> dict[str, float]:
    """Train one MLP per rule from the same start; return {rule: test error %}."""
    data = prepare(load_mnist_format(data_dir, "fashion-mnist"), train_size=train_size)
    errors = {}
    for rule in rules:
        start = time.perf_counter()
        result = train(data=data, rule=rule, seed=seed, epochs=epochs, batch_size=batch_size,
                       model={"name": "mlp", "hidden": hidden},
                       optimizer={"name": "sgd", "lr": lr, "momentum": 0.9})
        errors[rule] = result.final["test_error"]
        print(f"  {rule:<9} test error {errors[rule]:5.2f}%   ({time.perf_counter() - start:.0f} s)", flush=True)
    return errors


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train a small MLP on Fashion-MNIST with BP, FA and sign symmetry",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", default=",".join(DEFAULT_RULES), help="comma-separated rules (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="directory of Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--hidden", default="256,256", help="hidden widths (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=None, help="use only the first N training images")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    for rule in rules:
        fbalign.rules.get(rule)  # fail on a bad name before any training
    hidden = [int(w) for w in args.hidden.split(",") if w.strip()]
    print(f"fbalign demo: MLP 784-{'-'.join(map(str, hidden))}-10 (ReLU) on Fashion-MNIST, SGD lr {args.lr} "
          f"momentum 0.9, batch {args.batch_size}, {args.epochs} epoch(s), seed {args.seed}")
    try:
        errors = run(rules, data_dir=args.data_dir, epochs=args.epochs, hidden=hidden, lr=args.lr,
                     batch_size=args.batch_size, train_size=args.train_size, seed=args.seed)
    except FileNotFoundError as e:
        print(f"error: {e}")
        return 2
    print("\n| rule | test error (%) |\n|---|---|")
    for rule, err in errors.items():
        print(f"| {rule} | {err:.2f} |")
    return 0


__all__ = ["mlp", "test_error", "train_classifier", "run", "add_parser", "main", "DATA_HINT"]
