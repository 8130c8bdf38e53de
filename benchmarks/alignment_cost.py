"""What alignment recording costs: a measured training step, a step between measurements and a measurement on
its own, each divided by the time of a plain training step of the same model, measured side by side in one run.

    python benchmarks/alignment_cost.py                      # CPU (and CUDA too when present)
    python benchmarks/alignment_cost.py --rules fa --models mlp

Models and batches as in step_time.py (MLP 784-1000-1000-10 and a LeNet-5-style CNN, batch 128). Per model and
rule, each round times, in a fresh random order:
  step          a training step (forward, cross-entropy, backward, SGD);
  off           the training step inside ``recorder.step()`` on a step that is not measured (the cost when off);
  measured      the training step inside ``recorder.step()`` on a measured step: the step's own pass, backprop's
                reference pass, the comparisons, one line to disk (what fbalign.train does every log.every steps);
  measured+pbp  the same with pseudo_backprop=True (adds a pseudo-inverse of every Linear weight);
  record        ``recorder.record()`` on its own: the rule's pass and backprop's, the comparisons, one line.
The table shows median ms and the median over rounds of each time divided by the same round's step time, so a
measured step's extra cost is (measured × step) − 1 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from step_time import MODELS, interleaved_times
from torch import nn

import fbalign
from fbalign.metrics import AlignmentRecorder


def bench(model_name: str, rule: str, device: torch.device, batch: int, steps: int, rounds: int,
          folder: Path) -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    model = fbalign.convert(MODELS[model_name]().to(device), rule, seed=0)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.functional.cross_entropy
    every = 10**9  # so that step 1 is never a measuring step, and step 0 always is
    recorder = AlignmentRecorder(model, loss_fn, every, folder / f"{model_name}-{rule}.jsonl")
    with_pbp = AlignmentRecorder(model, loss_fn, every, folder / f"{model_name}-{rule}-pbp.jsonl",
                                 pseudo_backprop=True)

    def step(around: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        with around():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
        optimizer.step()

    tasks = {"step": step, "off": lambda: step(lambda: recorder.step(1, x, y)),
             "measured": lambda: step(lambda: recorder.step(0, x, y)),
             "measured+pbp": lambda: step(lambda: with_pbp.step(0, x, y)),
             "record": lambda: recorder.record(0, x, y)}
    for task in tasks.values():  # warm up
        task()
    repeats = {name: steps if name in ("step", "off") else max(1, steps // 3) for name in tasks}
    times = interleaved_times(tasks, repeats, rounds, device)
    recorder.close()
    with_pbp.close()
    return {name: (statistics.median(ts) * 1e3, statistics.median(t / s for t, s in zip(ts, times["step"])))
            for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (cpu, plus cuda when present)")
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--rules", default="fa,brsf")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])) if args.device == "all" else [args.device]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {args.batch}, {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as folder:
        for device_name in devices:
            device = torch.device(device_name)
            label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
            print(f"\n{label}\n| model | rule | step ms | off × step | measured × step | measured+pbp × step "
                  "| record × step |\n|---|---|---|---|---|---|---|")
            for model_name in args.models.split(","):
                for rule in args.rules.split(","):
                    r = bench(model_name, rule, device, args.batch, args.steps, args.rounds, Path(folder))
                    print(f"| {model_name} | {rule} | {r['step'][0]:.2f} | {r['off'][1]:.3f} | "
                          f"{r['measured'][1]:.2f} | {r['measured+pbp'][1]:.2f} | {r['record'][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
