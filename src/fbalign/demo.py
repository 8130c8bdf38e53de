"""`fbalign demo`: one small network trained with backprop, feedback alignment and sign symmetry, side by side.

The same MLP (same initial weights, same data order) is converted to each rule and trained with plain SGD on
Fashion-MNIST; the test errors are printed as a table.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from tqdm import tqdm

import fbalign

from .data import DATA_HINT, TensorDataset, load_mnist_format

DEFAULT_RULES = ("backprop", "fa", "usf", "frsf", "brsf")


def mlp(widths: list[int]) -> nn.Sequential:
    """Flatten, then Linear-ReLU blocks with ``widths`` (first = input size, last = classes, no final ReLU)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@torch.no_grad()
def test_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    """Percentage of ``x`` misclassified by ``model`` (argmax of the output)."""
    model.eval()
    wrong = sum(int((model(x[i:i + batch_size]).argmax(1) != y[i:i + batch_size]).sum())
                for i in range(0, len(x), batch_size))
    return 100.0 * wrong / len(x)


def train_classifier(model: nn.Module, data: TensorDataset, *, epochs: int, lr: float, batch_size: int,
                     seed: int, desc: str = "") -> float:
    """SGD with momentum 0.9 on cross-entropy; returns the final test error in percent."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    order = torch.Generator().manual_seed(seed)
    n = len(data.train_x)
    with tqdm(total=epochs * (n // batch_size), desc=desc, leave=False, unit="step") as bar:
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(n, generator=order)
            for i in range(0, n - batch_size + 1, batch_size):
                idx = perm[i:i + batch_size]
                loss = nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {bar.n}; lower the "
                                             f"learning rate (now {lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
    return test_error(model, data.test_x, data.test_y)


def run(rules: list[str], *, data_dir: str | None, epochs: int, hidden: list[int], lr: float, batch_size: int,
        train_size: int | None, seed: int) -> dict[str, float]:
    """Train one MLP per rule from the same start; return {rule: test error %}."""
    data = load_mnist_format(data_dir, "fashion-mnist")
    if train_size is not None:
        data.train_x, data.train_y = data.train_x[:train_size], data.train_y[:train_size]
    torch.manual_seed(seed)
    base = mlp([28 * 28, *hidden, data.num_classes])
    errors = {}
    for rule in rules:
        model = fbalign.convert(base, rule, seed=seed)
        start = time.perf_counter()
        errors[rule] = train_classifier(model, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                        desc=rule)
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
