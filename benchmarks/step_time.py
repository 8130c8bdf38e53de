"""Training-step time and peak memory of each rule divided by plain autograd backprop's, measured side by side.

    python benchmarks/step_time.py                 # CPU (and CUDA too when present)
    python benchmarks/step_time.py --device cuda --rules fa,brsf,dfa --models mlp,lenet,resnet
    python benchmarks/step_time.py --rules dfa,dfa:resolution=2,fa:feedback_nonlinearity=tanh   # rule options

Models (batch 128): the MLP 784-1000-1000-10 (ReLU), a LeNet-5-style CNN on 1×28×28 inputs, and (on request) a
small ResNet with BatchNorm and skip connections on 1×28×28. A step is forward, cross-entropy, backward and an SGD
step (momentum 0.9, weight decay 1e-4, so kp's B takes its step too). "torch" is the unconverted model; every rule
converts a copy of it. Each round times every model for a few steps, in a fresh random order, so that drift in
machine speed hits all of them alike; the table shows the median step time over rounds and the median over rounds
of the ratio to torch's step time in the same round (robust to the noisy neighbours of a shared VM).

Peak memory: the most bytes allocated at once during one step, above those live when it starts (the parameters,
the optimizer's state and the batch). On CUDA, ``torch.cuda.max_memory_allocated``. torch's CPU allocator keeps no
statistics, so on the CPU the step runs once under ``torch.profiler.profile(profile_memory=True)``, which records
every allocation and free the CPU allocator makes, with its size, in order; the peak of their running sum is the
step's peak. Both count tensor memory only (not the allocator's cache or Python objects).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

import fbalign

DEFAULT_RULES = "backprop,fa,usf,frsf,brsf,dfa,kp,wm,shallow"


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(),
                         nn.Linear(1000, 10))


def lenet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84),
                         nn.ReLU(), nn.Linear(84, 10))


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_in, n_out, 3, stride, 1, bias=False), nn.BatchNorm2d(n_out), nn.ReLU(),
                                  nn.Conv2d(n_out, n_out, 3, 1, 1, bias=False), nn.BatchNorm2d(n_out))
        self.skip = (nn.Identity() if stride == 1 and n_in == n_out else
                     nn.Sequential(nn.Conv2d(n_in, n_out, 1, stride, bias=False), nn.BatchNorm2d(n_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet() -> nn.Module:
    """A ResNet-8-style CNN (16-32-64 channels, BatchNorm, skips) for 1×28×28 inputs."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         _Block(16, 16, 1), _Block(16, 32, 2), _Block(32, 64, 2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10))


MODELS = {"mlp": mlp, "lenet": lenet, "resnet": resnet}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def peak_memory(step, device: torch.device) -> float:
    """Peak bytes allocated during one step above those live at its start, in MiB (see the module docstring)."""
    step.optimizer.zero_grad(set_to_none=True)  # last step's gradients are freed before, not during, the step
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as file:
            events = json.load(file)["traceEvents"]
    changes = sorted((e["ts"], e["args"]["Bytes"]) for e in events
                     if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    live = peak = 0
    for _, size in changes:
        live += size
        peak = max(peak, live)
    return peak / 2**20


def _option(text: str) -> tuple[str, object]:
    """``"name=value"`` with the value read as a number when it is one."""
    name, _, value = text.partition("=")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


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
    for spec in rules:
        rule, _, option_text = spec.partition(":")  # e.g. "dfa:resolution=2"
        options = dict(_option(item) for item in option_text.split(":") if item)
        try:
            converted = fbalign.convert(base, rule, seed=0, **options)
        except ValueError as error:  # a rule that does not apply to this model (pbp on convolutions)
            print(f"{model_name}: skipping {spec}: {error}", flush=True)
            continue
        steps_by_name[spec] = make_step(converted, x, y)
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    memory = {name: peak_memory(step, device) for name, step in steps_by_name.items()}
    times = interleaved_times(steps_by_name, {name: steps for name in steps_by_name}, rounds, device)
    ref_mem = memory["torch"]
    rows = []
    for name, ts in times.items():
        ratio = statistics.median(t / r for t, r in zip(ts, times["torch"]))
        rows.append((name, statistics.median(ts) * 1e3, ratio, memory[name], memory[name] / ref_mem))
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
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 is steadier on a machine shared with other jobs")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
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
            print(f"\n{model_name} on {label}\n| rule | ms/step | × torch | peak MiB | peak memory × torch |\n"
                  "|---|---|---|---|---|")
            for name, ms, ratio, mib, mem in rows:
                print(f"| {name} | {ms:.3f} | {ratio:.3f} | {mib:.2f} | {mem:.3f} |", flush=True)


if __name__ == "__main__":
    main()
