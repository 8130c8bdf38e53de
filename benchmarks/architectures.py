"""The cost of converted attention and recurrent nets against plain torch, measured side by side in one run.

    python benchmarks/architectures.py                    # CPU, 1 thread, every case
    python benchmarks/architectures.py --threads 2 --rounds 10 --cases transformer,lstm

Cases (each timed as median over rounds of the ratio to torch's time in the same round, in a fresh random order per
round, so drift in machine speed hits all alike):

* ``transformer``: a training step (forward, cross-entropy, backward, SGD) of a decoder-only language model, two
  ``nn.TransformerEncoderLayer`` (d=128, 4 heads, ff 512, causal mask) on 16 sequences of 64 tokens, vocabulary 64.
  torch: the plain model (torch's MHA runs ``F.multi_head_attention_forward``, its training path); backprop: the
  model converted with rule ``backprop`` (fbalign's attention module, torch's exact products: the cost of fbalign's
  attention code alone); fa: converted with ``fa``.
* ``lstm``: a training step of a 2-layer LSTM (64 -> 128, 50 steps, batch 32) with a Linear head on the last step.
  torch: ``nn.LSTM``'s fused CPU kernel; backprop and fa: fbalign's loop over time steps. (cuDNN not measured here.)
* ``mha-inference``: ``nn.MultiheadAttention`` forward in eval mode under ``torch.no_grad`` (torch takes its fused
  fast path, ``torch._native_multi_head_attention``) against the converted module's forward (no fast path): what
  bypassing the fast path costs where it applies.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import fbalign


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 128, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.encoder(self.embed(tokens), mask=mask, is_causal=True))


class LastStep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(64, 128, num_layers=2)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][-1])


def _converted(model: nn.Module, rule: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fbalign.UnconvertedModuleWarning)  # the Embedding
        return fbalign.convert(model, rule, seed=0)


def training_steps(case: str) -> dict[str, object]:
    torch.manual_seed(0)
    if case == "transformer":
        base: nn.Module = TinyLM()
        x = torch.randint(0, 64, (16, 64))
        y = torch.randint(0, 64, (16, 64))

        def loss_of(model: nn.Module) -> torch.Tensor:
            return F.cross_entropy(model(x).reshape(-1, 64), y.reshape(-1))
    else:
        base = LastStep()
        x = torch.randn(50, 32, 64)
        y = torch.randint(0, 10, (32,))

        def loss_of(model: nn.Module) -> torch.Tensor:
            return F.cross_entropy(model(x), y)

    steps = {}
    for name in ("torch", "backprop", "fa"):
        model = base if name == "torch" else _converted(base, name)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            loss_of(model).backward()
            opt.step()

        steps[name] = step
    return steps


def inference_calls() -> dict[str, object]:
    torch.manual_seed(0)
    original = nn.MultiheadAttention(128, 4, batch_first=True).eval()
    converted = _converted(nn.Sequential(original), "fa")[0].eval()
    x = torch.randn(16, 64, 128)

    def call(module: nn.Module) -> object:
        def run() -> None:
            with torch.no_grad():
                module(x, x, x, need_weights=False)
        return run

    return {"torch": call(original), "fa": call(converted)}


def measure(calls: dict[str, object], rounds: int, repeats: int) -> dict[str, tuple[float, float]]:
    for run in calls.values():
        run()  # warm up
    times: dict[str, list[float]] = {name: [] for name in calls}
    ratios: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        order = list(calls)
        random.shuffle(order)
        this_round = {}
        for name in order:
            start = time.perf_counter()
            for _ in range(repeats):
                calls[name]()
            this_round[name] = (time.perf_counter() - start) / repeats
        for name, seconds in this_round.items():
            times[name].append(seconds)
            ratios[name].append(seconds / this_round["torch"])
    return {name: (statistics.median(times[name]), statistics.median(ratios[name])) for name in calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="transformer,lstm,mha-inference")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds x {args.repeats} calls")
    print(f"{'case':<15}{'variant':<10}{'ms/call':>10}{'x torch':>10}")
    for case in args.cases.split(","):
        calls = inference_calls() if case == "mha-inference" else training_steps(case)
        for name, (seconds, ratio) in measure(calls, args.rounds, args.repeats).items():
            print(f"{case:<15}{name:<10}{seconds * 1e3:>10.2f}{ratio:>10.2f}")


if __name__ == "__main__":
    main()
