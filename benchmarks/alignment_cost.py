"""What alignment recording costs: one measurement, and a step between measurements, each divided by the time of
a training step of the same model, measured side by side in one run.

    python benchmarks/alignment_cost.py                      # CPU (and CUDA too when present)
    python benchmarks/alignment_cost.py --rules fa --models mlp

Models and batches as in step_time.py (MLP 784-1000-1000-10 and a LeNet-5-style CNN, batch 128). Per model and
rule, each round times, in a fresh random order:
  step          a training step (forward, cross-entropy, backward, SGD);
  off           recorder.record() on a step that is not measured, then a training step (the cost when off);
  measure       recorder.record() on a measured step: two forward/backward passes, the comparisons, one line to disk;
  measure+pbp   the same with pseudo_backprop=True (adds a pseudo-inverse of every Linear weight).
The table shows median ms and the median over rounds of each time divided by the same round's step time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from step_time import MODELS, interleaved_times, make_step
from torch import nn

import fbalign
from fbalign.metrics import AlignmentRecorder


def bench(model_name: str, rule: str, device: torch.device, batch: int, steps: int, rounds: int,
          folder: Path) -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    model = fbalign.convert(MODELS[model_name]().to(device), rule, seed=0)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    step = make_step(model, x, y)
    loss_fn = nn.functional.cross_entropy
    every = 10**9  # so that record(1, ...) is never a measuring step
    recorder = AlignmentRecorder(model, loss_fn, every, folder / f"{model_name}-{rule}.jsonl")
    with_pbp = AlignmentRecorder(model, loss_fn, every, folder / f"{model_name}-{rule}-pbp.jsonl",
                                 pseudo_backprop=True)

    def off() -> None:
        recorder.record(1, x, y)
        step()

    tasks = {"step": step, "off": off, "measure": lambda: recorder.record(0, x, y),
             "measure+pbp": lambda: with_pbp.record(0, x, y)}
    for task in tasks.values():  # warm up
        task()
    repeats = {name: steps if name in ("step", "off") else max(1, steps // 5) for name in tasks}
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
            print(f"\n{label}\n| model | rule | step ms | off × step | measure × step | measure+pbp × step |\n"
                  "|---|---|---|---|---|---|")
            for model_name in args.models.split(","):
                for rule in args.rules.split(","):
                    r = bench(model_name, rule, device, args.batch, args.steps, args.rounds, Path(folder))
                    print(f"| {model_name} | {rule} | {r['step'][0]:.2f} | {r['off'][1]:.3f} | "
                          f"{r['measure'][1]:.2f} | {r['measure+pbp'][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
