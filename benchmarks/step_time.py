"""Training-step time of each rule divided by plain autograd backprop's, measured side by side in one run.

    python benchmarks/step_time.py                 # CPU (and CUDA too when present)
    python benchmarks/step_time.py --device cuda --rules fa,brsf

Models (batch 128): the MLP 784-1000-1000-10 (ReLU) and a LeNet-5-style CNN on 1×28×28 inputs. A step is
forward, cross-entropy, backward and an SGD step. "torch" is the unconverted model; every rule converts a
copy of it. Each round times every model for a few steps, in a fresh random order, so that drift in machine
speed hits all of them alike; the table shows the median step time over rounds and the median over rounds of
the ratio to torch's step time in the same round (robust to the noisy neighbours of a shared VM).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import fbalign

DEFAULT_RULES = "backprop,fa,usf,frsf,brsf,shallow"


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(),
                         nn.Linear(1000, 10))


def lenet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84),
                         nn.ReLU(), nn.Linear(84, 10))


MODELS = {"mlp": mlp, "lenet": lenet}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def peak_memory(step, device: torch.device) -> float:
    """Peak bytes allocated during one step (CUDA only), in MiB."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def interleaved_times(tasks: dict[str, Callable[[], object]], repeats: dict[str, int], rounds: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each task, one entry per round; each round runs every task ``repeats[name]`` times in a
    fresh random order, so that drift in machine speed hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in tasks}
    order = list(tasks)
    shuffle = random.Random(0)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats[name]):
                tasks[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) / repeats[name])
    return times


def bench(model_name: str, rules: list[str], device: torch.device, batch: int, steps: int, rounds: int,
          warmup: int) -> list[tuple[str, float, float, float]]:
    torch.manual_seed(0)
    base = MODELS[model_name]().to(device)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps_by_name = {"torch": make_step(copy.deepcopy(base), x, y)}
    for rule in rules:
        steps_by_name[rule] = make_step(fbalign.convert(base, rule, seed=0), x, y)
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    memory = {name: peak_memory(step, device) for name, step in steps_by_name.items()}
    times = interleaved_times(steps_by_name, {name: steps for name in steps_by_name}, rounds, device)
    ref_mem = memory["torch"]
    rows = []
    for name, ts in times.items():
        ratio = statistics.median(t / r for t, r in zip(ts, times["torch"]))
        rows.append((name, statistics.median(ts) * 1e3, ratio,
                     memory[name] / ref_mem if ref_mem == ref_mem else float("nan")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (cpu, plus cuda when present)")
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--rules", default=DEFAULT_RULES)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if args.device == "all":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    rules = [r for r in args.rules.split(",") if r]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {args.batch}, "
          f"{args.rounds} rounds × {args.steps} steps")
    for device_name in devices:
        device = torch.device(device_name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        for model_name in args.models.split(","):
            rows = bench(model_name, rules, device, args.batch, args.steps, args.rounds, args.warmup)
            print(f"\n{model_name} on {label}\n| rule | ms/step | × torch | peak memory × torch |\n|---|---|---|---|")
            for name, ms, ratio, mem in rows:
                print(f"| {name} | {ms:.3f} | {ratio:.3f} | {mem:.2f} |", flush=True)


if __name__ == "__main__":
    main()
