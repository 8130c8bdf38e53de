"""E runs trained as one :class:`fbalign.Ensemble` against the same E runs one after another, side by side.

    python benchmarks/ensemble_speed.py                       # both cases, CPU, 2 threads
    python benchmarks/ensemble_speed.py --device cuda         # on a GPU
    python benchmarks/ensemble_speed.py --cases online --members 20 --rule fa --steps 200

Cases (Lillicrap et al. 2016's two networks, ``fa`` by default):

* ``online``: the 30-20-10 linear network (no biases), float64, batch 1: the online tasks of Fig. 1/2d/4.
* ``image``: the 784-1000-10 logistic network (sigmoid hidden and output units, biases), float32, batch 100.

A step is a forward, the half squared error, a backward and an SGD step. "sequential" trains each of the E models
for ``--steps`` steps through ``fbalign.convert`` (what an experiment does one run at a time); "ensemble" trains the
same E models for the same steps as one ensemble, each member on its own batches. "floor" is the same step
written by hand with no fbalign at all: the E members' weights as ``(E, out, in)`` tensors, ``torch.baddbmm`` and
the activations under plain autograd, torch's SGD (backprop, so no feedback matrices): what any autograd-based
design of an ensemble pays at least. "bound" is the step's matrix products alone (their floating-point operations
for all E members) at the rate this device reaches on one large matrix product of the case's dtype, measured in
the same run: no design of the step runs faster, so sequential / bound is the largest speed-up the device allows.
Each round times all three, in a fresh random order, so drift in machine
speed hits them alike; the table shows the median over rounds of the time per step of all E runs and of the
ratios sequential / ensemble and sequential / floor within a round.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import fbalign

CASES = {
    # name: (widths, hidden activation, output activation, bias, dtype, batch)
    "online": ((30, 20, 10), nn.Identity, None, False, torch.float64, 1),
    "image": ((784, 1000, 10), nn.Sigmoid, nn.Sigmoid, True, torch.float32, 100),
}


def network(case: str, seed: int) -> nn.Module:
    widths, hidden, output, bias, dtype, _ = CASES[case]
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out, bias=bias))
        if i < len(widths) - 2:
            layers.append(hidden())
    if output is not None:
        layers.append(output())
    return nn.Sequential(*layers).to(dtype)


def half_sse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """½‖e‖² averaged over the batch, summed over members when there is a member dimension."""
    per_example = 0.5 * (targets - outputs).square().sum(-1)
    return per_example.mean(-1).sum()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sequential(models: list[nn.Module], inputs: torch.Tensor, targets: torch.Tensor, lr: float,
               device: torch.device) -> Callable[[], None]:
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]

    def run() -> None:
        for e, (model, optimizer) in enumerate(zip(models, optimizers)):
            for step in range(inputs.shape[1]):
                optimizer.zero_grad(set_to_none=True)
                half_sse(model(inputs[e, step]), targets[e, step]).backward()
                optimizer.step()
        sync(device)
    return run


def ensemble(models: list[nn.Module], inputs: torch.Tensor, targets: torch.Tensor, lr: float,
             device: torch.device) -> Callable[[], None]:
    ens = fbalign.Ensemble(models)
    optimizer = torch.optim.SGD(ens.parameters(), lr=lr)

    def run() -> None:
        for step in range(inputs.shape[1]):
            optimizer.zero_grad(set_to_none=True)
            half_sse(ens(inputs[:, step]), targets[:, step]).backward()
            optimizer.step()
        sync(device)
    return run


def floor(models: list[nn.Module], inputs: torch.Tensor, targets: torch.Tensor, lr: float,
          device: torch.device) -> Callable[[], None]:
    linears = [[m for m in model.modules() if isinstance(m, nn.Linear)] for model in models]
    weights = [torch.stack([layers[i].weight.detach() for layers in linears]).clone().requires_grad_()
               for i in range(len(linears[0]))]
    biases = [torch.stack([layers[i].bias.detach() for layers in linears]).unsqueeze(1).clone().requires_grad_()
              if linears[0][i].bias is not None else None for i in range(len(linears[0]))]
    activations = [m for m in models[0] if not isinstance(m, nn.Linear)]
    optimizer = torch.optim.SGD([*weights, *[b for b in biases if b is not None]], lr=lr)

    def forward(x: torch.Tensor) -> torch.Tensor:
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            x = torch.bmm(x, weight.mT) if bias is None else torch.baddbmm(bias, x, weight.mT)
            if i < len(activations):
                x = activations[i](x)
        return x

    def run() -> None:
        for step in range(inputs.shape[1]):
            optimizer.zero_grad(set_to_none=True)
            half_sse(forward(inputs[:, step]), targets[:, step]).backward()
            optimizer.step()
        sync(device)
    return run


def step_flops(case: str, members: int) -> float:
    """Floating-point operations of the matrix products of one step of all members: per Linear layer the forward
    and the weight's gradient, and the input's gradient for every layer but the first (its input is data)."""
    widths, _, _, _, _, batch = CASES[case]
    per_member = sum(2 * batch * n_in * n_out * (2 if i == 0 else 3)
                     for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])))
    return members * per_member


def matmul_rate(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Floating-point operations per second of the best of ``repeats`` ``size``×``size`` matrix products."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = math.inf
    for _ in range(repeats + 1):  # the first warms up
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def measure(case: str, members: int, rule: str, steps: int, rounds: int, device: torch.device) -> dict[str, float]:
    widths, _, _, _, dtype, batch = CASES[case]
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(members, steps, batch, widths[0], generator=generator, dtype=dtype).to(device)
    targets = torch.rand(members, steps, batch, widths[-1], generator=generator, dtype=dtype).to(device)
    models = [fbalign.convert(network(case, seed), rule, seed=seed).to(device) for seed in range(members)]
    runs = {"sequential": sequential(models, inputs, targets, 1e-3, device),
            "ensemble": ensemble(models, inputs, targets, 1e-3, device),
            "floor": floor(models, inputs, targets, 1e-3, device)}
    for run in runs.values():  # warm up (allocator, kernels)
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    ratios, floor_ratios = [], []
    for _ in range(rounds):
        order = list(runs)
        random.shuffle(order)
        found = {}
        for name in order:
            start = time.perf_counter()
            runs[name]()
            found[name] = (time.perf_counter() - start) / steps
            times[name].append(found[name])
        ratios.append(found["sequential"] / found["ensemble"])
        floor_ratios.append(found["sequential"] / found["floor"])
    bound = step_flops(case, members) / matmul_rate(dtype, device)
    sequential_time = statistics.median(times["sequential"])
    return {**{name: statistics.median(found) for name, found in times.items()},
            "ratio": statistics.median(ratios), "floor_ratio": statistics.median(floor_ratios),
            "bound": bound, "bound_ratio": sequential_time / bound}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="online,image", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--members", type=int, default=20, help="E, runs per ensemble (default 20)")
    parser.add_argument("--rule", default="fa")
    parser.add_argument("--steps", type=int, default=0, help="steps per round (default: 200 online, 5 image)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{args.members} runs of rule {args.rule!r} on {device} ({args.threads} CPU threads), median of "
          f"{args.rounds} rounds; time per step of all {args.members} runs")
    print(f"{'case':<8} {'sequential':>12} {'ensemble':>12} {'speed-up':>9} {'floor':>12} {'speed-up':>9} "
          f"{'bound':>12} {'speed-up':>9}")
    for case in args.cases.split(","):
        steps = args.steps or (200 if case == "online" else 5)
        found = measure(case, args.members, args.rule, steps, args.rounds, device)
        print(f"{case:<8} {found['sequential'] * 1e3:>10.3f}ms {found['ensemble'] * 1e3:>10.3f}ms "
              f"{found['ratio']:>8.1f}x {found['floor'] * 1e3:>10.3f}ms {found['floor_ratio']:>8.1f}x "
              f"{found['bound'] * 1e3:>10.3f}ms {found['bound_ratio']:>8.1f}x", flush=True)


if __name__ == "__main__":
    main()
