"""`fbalign demo`: one small network trained with backprop, feedback alignment and sign symmetry, side by side.

The same MLP (same initial weights, same data order) is converted to each rule and trained with SGD
(momentum 0.9) on Fashion-MNIST by :func:`fbalign.train.train`; the test errors are printed as a table.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import fbalign

from .data import load_mnist_format, prepare
from .train import train

__all__ = ["run", "add_parser", "main"]

DEFAULT_RULES = ("backprop", "fa", "usf", "frsf", "brsf")


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


# --- deprecated: library helpers this module used to export (kept for one release) -------------------------------

def _mlp(widths: list[int]) -> Any:
    from .models import MLP

    return MLP((widths[0],), widths[-1], hidden=widths[1:-1])


def _test_error(model: Any, x: Any, y: Any, batch_size: int = 2000) -> float:
    from torch.nn.functional import cross_entropy

    from .train import evaluate

    return evaluate(model, x, y, cross_entropy, classification=True, batch_size=batch_size)["error"]


def _train_classifier(model: Any, data: Any, *, epochs: int, lr: float, batch_size: int, seed: int,
                      desc: str = "") -> float:
    from .config import PLAIN_TORCH

    result = train(model=model, data=data, rule=PLAIN_TORCH, epochs=epochs, batch_size=batch_size, seed=seed,
                   optimizer={"name": "sgd", "lr": lr, "momentum": 0.9}, log={"progress": bool(desc)})
    return result.final["test_error"]


def _data_hint() -> Any:
    from .data import DATA_HINT

    return DATA_HINT


_DEPRECATED = {
    "mlp": (_mlp, "fbalign.models.MLP(input_shape, num_outputs, hidden=...)"),
    "test_error": (_test_error, "fbalign.train.evaluate(model, x, y, loss_fn, classification=True)['error']"),
    "train_classifier": (_train_classifier, "fbalign.train.train(model=model, data=data, rule='torch', ...)"),
    "DATA_HINT": (_data_hint, "fbalign.data.DATA_HINT"),
}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        helper, instead = _DEPRECATED[name]
        warnings.warn(f"fbalign.demo.{name} is deprecated; use {instead}", DeprecationWarning, stacklevel=2)
        return helper() if name == "DATA_HINT" else helper
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
