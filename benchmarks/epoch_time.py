"""Wall time of one training epoch with each rule divided by plain PyTorch's, through the same training loop.

    python benchmarks/epoch_time.py                       # LeNet-5 on 32×32 Fashion-MNIST, batch 64, CPU
    python benchmarks/epoch_time.py --rules fa,brsf --rounds 5 --device cuda

Every model is built from the same config by ``fbalign.train.train`` and trained on the same device-resident
data; "torch" is the unconverted LeNet-5 (``rule = "torch"``). Each round trains one epoch of every model, in
a fresh random order, so that drift in machine speed hits all of them alike; the table shows the median epoch
time over rounds (training only, evaluation excluded) and the median over rounds of the ratio to torch's
epoch time in the same round.
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import torch

from fbalign.config import load_config
from fbalign.train import load_data, train

CONFIG = Path(__file__).parent.parent / "configs" / "fashion_mnist_lenet.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--rules", default="backprop,fa,usf,frsf,brsf")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.config, [*args.overrides, f"device={args.device}", "epochs=1", "log.progress=false",
                                    "log.every=0"])
    data = load_data(cfg)
    names = ["torch", *[r for r in args.rules.split(",") if r]]
    times: dict[str, list[float]] = {n: [] for n in names}
    order = list(names)
    shuffle = random.Random(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {cfg.model.name} on {cfg.data.name} "
          f"({len(data.train_x)} training examples, batch {cfg.batch_size}), device {args.device}, "
          f"{args.rounds} rounds")
    train(cfg, data=data, rule="torch", handle_signals=False)  # warm-up: first-call costs (imports, allocator)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for name in order:
            result = train(cfg, data=data, rule=name, handle_signals=False)
            times[name].append(result.final["epoch_time"])
    print("\n| rule | s / epoch | × torch |\n|---|---|---|")
    for name in names:
        ratio = statistics.median(t / r for t, r in zip(times[name], times["torch"]))
        print(f"| {name} | {statistics.median(times[name]):.2f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
