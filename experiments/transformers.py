"""Feedback rules on a character-level transformer language model, set beside Launay et al. (2020), "Direct
Feedback Alignment Scales to Modern Deep Learning Tasks and Architectures" (NeurIPS 2020; arXiv 2006.12878).

One experiment (``fbalign reproduce transformers --only lm``): a small decoder-only transformer (pre-norm
``nn.TransformerEncoderLayer`` blocks under a causal mask) learns to predict the next character of real English
prose, trained once per condition and seed with everything but the rule the same:

==============  =================================================================================================
backprop        the plain torch model: exact gradients (the reference)
fa              ``fbalign.convert(model, "fa")``: every Linear (and attention's projections, where ``convert``
                converts attention) sends its error down through a fixed random B instead of Wᵀ
usf, frsf       sign symmetry: B = sign(W), and sign(W) with fixed random magnitudes
dfa             layer-level direct feedback alignment: the output error e (at the head's output) reaches every
                converted layer's input through its own fixed random matrix
dfa-points      Launay et al.'s "macro" DFA: e reaches each block's *output* through a fixed random matrix, the
                block trains by backprop from it, and no error passes between blocks
==============  =================================================================================================

Measured per run: validation bits per character (the mean cross-entropy in bits, on held-out documents) through
training, and for every block ∡(Δh, Δh_BP), the angle between the error each block's output receives under the rule
and under backprop on the same batch (Lillicrap et al.'s measure, one vector per sequence, averaged over the batch),
and ∡(ΔW, ΔW_BP), the angle of the block's whole parameter gradient to backprop's.

The corpus is CPython's own documentation: ``pydoc_data.topics`` (see :func:`load_corpus` for why it is fair), or a
UTF-8 text file given with ``--data PATH``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fbalign
from fbalign.checkpoint import atomic_write_text, rng_state, set_rng_state
from fbalign.checkpoint import load as load_checkpoint
from fbalign.checkpoint import save as save_checkpoint
from fbalign.metrics import angle, example_angles

from .common import Context, Experiment, Report, fmt, welch_p

__all__ = ["TITLE", "INTRODUCTION", "EXPERIMENTS", "LM_SCALE", "CONDITIONS", "Corpus", "load_corpus",
           "CharTransformer", "build", "block_alignment", "bits_per_char", "train_run", "run_lm", "report_lm"]

TITLE = ("Feedback rules on a transformer language model, beside Launay, Poli, Boniface & Krzakala (2020), "
         "*Direct Feedback Alignment Scales to Modern Deep Learning Tasks and Architectures* (NeurIPS 2020)")

INTRODUCTION = (
    "Launay et al. trained a 6-block transformer language model on WikiText-103 (byte-pair tokens, GPUs, "
    "100 epochs at most) with direct feedback alignment: it trains, but stays clearly behind backprop. Here a "
    "small decoder-only transformer built from `nn.TransformerEncoderLayer` learns characters of CPython's own "
    "documentation, a corpus every Python installation carries, under backprop, fa, usf, frsf, layer-level dfa "
    "and DFA points at each block (the paper's \"macro\" DFA); we compare validation bits per character and "
    "how each block's error signal lines up with backprop's. Our numbers are in bits per character on another "
    "corpus, so only the standings and the size of the gaps, as cross-entropy ratios, can be set beside the paper's "
    "perplexities.")

# Launay et al. 2020, WikiText-103 perplexity of the 6-block transformer (BP, DFA "macro" and "micro", as quoted from
# the paper's Table 5 in the project's notes; the set-up, 6 blocks of d_model 512, 8 heads, context 128, DFA
# placed before the vocabulary projection, was checked against the authors' code,
# lightonai/dfa-scales-to-modern-deep-learning).
PAPER_PPL = {"backprop": 29.8, "dfa-points": 52.0, "dfa-micro": 93.0}

# Sizes by scale, read with ``ctx.row`` (``tiny`` is the tests'). ``val_chars`` caps the validation text scored
# (None: all of it); ``dfa_points_error`` is where DFA points take the error (see _dfa_points). Quick: lr 1e-2 trains
# backprop fastest of 3e-3 and 1e-2 in 400 steps (2.56 against 3.22 bits per character; DFA points 4.44 against
# 4.62 at step 200).
LM_SCALE: dict[str, dict[str, Any]] = {
    "quick": {"seeds": 2, "layers": 4, "d_model": 64, "heads": 4, "d_ff": 256, "context": 64, "batch": 32,
              "steps": 400, "lr": 1e-2, "warmup": 40, "dropout": 0.0, "eval_every": 50, "val_chars": 32768,
              "probe_batch": 16, "sample_chars": 300, "dfa_points_error": "logits"},
    "full": {"seeds": 5, "layers": 6, "d_model": 256, "heads": 8, "d_ff": 1024, "context": 256, "batch": 64,
             "steps": 20000, "lr": 1e-3, "warmup": 1000, "dropout": 0.1, "eval_every": 500, "val_chars": None,
             "probe_batch": 32, "sample_chars": 600, "dfa_points_error": "logits"},
    "tiny": {"seeds": 2, "layers": 2, "d_model": 16, "heads": 2, "d_ff": 32, "context": 16, "batch": 8, "steps": 12,
             "lr": 3e-3, "warmup": 2, "dropout": 0.0, "eval_every": 6, "val_chars": 1200, "probe_batch": 4,
             "sample_chars": 20, "dfa_points_error": "logits"},
}
CONDITIONS: tuple[str, ...] = ("backprop", "fa", "usf", "frsf", "dfa", "dfa-points")
DEFAULT_CORPUS = "pydoc-topics"
GRAD_CLIP = 1.0
LOG2 = math.log(2.0)


def sizes(ctx: Context) -> dict[str, Any]:
    """The size row for ``ctx.scale`` (:meth:`Context.row`), with ``seeds`` overridden by ``--seeds``."""
    chosen = ctx.row(LM_SCALE)
    chosen["seeds"] = ctx.seeds if ctx.seeds is not None else chosen["seeds"]
    return chosen


# --------------------------------------------------------------------------------------------------- corpus

@dataclass(frozen=True)
class Corpus:
    """A text as character ids: ``train`` and ``val`` are 1-D int64 tensors over ``vocab`` (its characters in
    id order); ``documents`` counts the documents of each split (0 for a file split at 90 %)."""

    name: str
    source: str
    vocab: str
    train: Tensor
    val: Tensor
    sha256: str
    documents: tuple[int, int]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def encode(self, text: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.vocab)}
        return torch.tensor([index[c] for c in text], dtype=torch.int64)


def load_corpus(data: str | None = None) -> Corpus:
    """The text to model: CPython's ``pydoc_data.topics`` by default, or the UTF-8 file at ``data``.

    ``pydoc_data.topics`` holds the Language Reference's topics that ``help()`` shows (statements, expressions, the
    data model, ...): about 465 000 characters of edited technical English in the stdlib of every CPython, so any
    machine that runs fbalign has it, and nothing is downloaded. It is prose with some grammar rules and code
    examples, much like Wikipedia articles mix prose with tables and formulas; 40 % the size of the usual
    tiny-Shakespeare set. Its topics are whole documents: a fixed pseudo-random set of them holding 10 % of the
    characters (see :func:`_hold_out`) is held out for validation, so validation text is unseen documents, not
    neighbouring sentences. A file given instead is split at the
    last line break before 90 % of its characters.

    Raises:
        FileNotFoundError: the file does not exist, or this Python was built without ``pydoc_data``.
        ValueError: the text is too short to train on.
    """
    if data in (None, DEFAULT_CORPUS):
        try:
            from pydoc_data.topics import topics
        except ImportError as e:  # a stripped-down Python; the corpus cannot be fetched at run time
            raise FileNotFoundError("this Python has no pydoc_data.topics (a stripped-down build); give a UTF-8 "
                                    "text file instead: fbalign reproduce transformers --data PATH") from e
        names = sorted(topics)
        held_out = _hold_out(names, [len(topics[n]) for n in names], 0.1)
        train_text = "\n\n".join(topics[n] for n in names if n not in held_out)
        val_text = "\n\n".join(topics[n] for n in names if n in held_out)
        name, source, documents = DEFAULT_CORPUS, "pydoc_data.topics (CPython's stdlib)", (len(names) - len(held_out),
                                                                                            len(held_out))
    else:
        path = Path(data).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--data {data}: no such file; give a UTF-8 text file, or leave --data out to "
                                    f"use {DEFAULT_CORPUS} (CPython's documentation)")
        text = path.read_text(encoding="utf-8")
        cut = text.rfind("\n", 0, int(0.9 * len(text))) + 1 or int(0.9 * len(text))
        train_text, val_text = text[:cut], text[cut:]
        name, source, documents = path.name, str(path.resolve()), (0, 0)
    if len(train_text) < 2000 or len(val_text) < 200:
        raise ValueError(f"the corpus {name} has {len(train_text)} training and {len(val_text)} validation "
                         "characters; a language model needs at least 2000 and 200")
    vocab = "".join(sorted(set(train_text) | set(val_text)))
    index = {c: i for i, c in enumerate(vocab)}
    digest = hashlib.sha256((train_text + "\x00" + val_text).encode("utf-8")).hexdigest()
    return Corpus(name, source, vocab, torch.tensor([index[c] for c in train_text], dtype=torch.int64),
                  torch.tensor([index[c] for c in val_text], dtype=torch.int64), digest, documents)


def _hold_out(names: Sequence[str], lengths: Sequence[int], fraction: float) -> set[str]:
    """Documents to hold out: in a fixed shuffled order, each one that still fits under ``fraction`` of all the
    characters (the topics' sizes are heavy-tailed: the largest is 13 % of the text, the median 0.4 %)."""
    order = list(range(len(names)))
    random.Random(2020).shuffle(order)
    budget, held = fraction * sum(lengths), set()
    for i in order:
        if lengths[i] <= budget:
            held.add(names[i])
            budget -= lengths[i]
    return held


def ngram_bits(corpus: Corpus) -> dict[str, float]:
    """Validation bits per character of add-one-smoothed unigram and bigram models fitted to the training text:
    what a model that uses no context, or one character of it, scores."""
    v = len(corpus.vocab)
    train, val = corpus.train.numpy(), corpus.val.numpy()
    unigram = np.bincount(train, minlength=v) + 1.0
    unigram /= unigram.sum()
    pairs = np.ones((v, v))
    np.add.at(pairs, (train[:-1], train[1:]), 1.0)
    pairs /= pairs.sum(axis=1, keepdims=True)
    return {"unigram": float(-np.log2(unigram[val]).mean()), "bigram": float(-np.log2(pairs[val[:-1], val[1:]]).mean())}


# ---------------------------------------------------------------------------------------------------- model

class CharTransformer(nn.Module):
    """A decoder-only character language model: token and learned position embeddings, ``layers`` pre-norm
    ``nn.TransformerEncoderLayer`` blocks (GELU) under a causal mask, a final LayerNorm and a Linear head.

    Shapes: input ``(N, T)`` character ids with ``T <= context``; output ``(N, T, vocab)`` logits, position t
    predicting character t + 1. The blocks are ``blocks.0`` ... ``blocks.{layers-1}`` (the names DFA points use).
    """

    def __init__(self, vocab: int, context: int, d_model: int, heads: int, d_ff: int, layers: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, d_ff, dropout, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(context),
                             persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"a sequence of {t} characters is longer than the model's context ({self.context})")
        x = self.drop(self.embed(ids) + self.position.weight[:t])
        mask = self.causal_mask[:t, :t]
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def build(condition: str, cfg: dict[str, Any], vocab: int, seed: int) -> nn.Module:
    """A fresh model for ``condition`` (initialised from ``seed``, so every condition starts from the same
    weights), converted to the condition's rule with feedback drawn from ``seed``."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose from {', '.join(CONDITIONS)}")
    torch.manual_seed(seed)
    model = CharTransformer(vocab, cfg["context"], cfg["d_model"], cfg["heads"], cfg["d_ff"], cfg["layers"],
                            cfg["dropout"])
    if condition == "backprop":
        return model
    with warnings.catch_warnings():  # what stays on backprop is recorded by the run (fbalign.unconverted)
        warnings.simplefilter("ignore", fbalign.UnconvertedModuleWarning)
        if condition == "dfa-points":
            return _dfa_points(model, seed, cfg["dfa_points_error"])
        options = {"output": "head"} if condition == "dfa" else {}
        return fbalign.convert(model, condition, seed=seed, **options)


def _dfa_points(model: CharTransformer, seed: int, error_at: str) -> nn.Module:
    """Launay et al.'s macro DFA through :func:`fbalign.dfa_points`: each block's output receives ``e · B_k`` in
    place of the gradient from above, and trains by exact backprop inside. ``error_at='logits'``: ``e`` is the
    error at the model's output (Nøkland's DFA; the final LayerNorm and the head learn from it by backprop);
    ``'features'``: ``e`` is the gradient at the head's input, ``W_headᵀ`` times the logits' error, as in the
    authors' code (their DFA node sits before the vocabulary projection: one layer of weight transport)."""
    if error_at not in ("logits", "features"):
        raise ValueError(f"dfa_points_error={error_at!r}; choose 'logits' or 'features'")
    return fbalign.dfa_points(model, "blocks.*", seed=seed, output="norm" if error_at == "features" else None)


# ------------------------------------------------------------------------------------------------- measures

def sequences(data: Tensor, context: int, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``count`` random windows of ``data``: inputs ``(count, context)`` and next-character targets."""
    starts = torch.randint(len(data) - context - 1, (count,), generator=generator)
    windows = data[starts[:, None] + torch.arange(context + 1)]
    return windows[:, :-1], windows[:, 1:]


def val_windows(data: Tensor, context: int, limit: int | None) -> Tensor:
    """Consecutive, non-overlapping ``(n, context + 1)`` windows over the first ``limit`` characters (None: all),
    each scored on its ``context`` targets; a window's first characters see a short context, as in training."""
    usable = len(data) if limit is None else min(len(data), limit)
    n = (usable - 1) // context
    if n < 1:
        raise ValueError(f"the validation text ({usable} characters) is shorter than one context ({context})")
    return torch.stack([data[i * context: i * context + context + 1] for i in range(n)])


@torch.no_grad()
def bits_per_char(model: nn.Module, windows: Tensor, batch: int, device: torch.device) -> float:
    """Mean cross-entropy in bits per character over ``windows`` (eval mode; the model's mode is restored)."""
    training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for chunk in windows.split(batch):
            chunk = chunk.to(device)
            logits = model(chunk[:, :-1])
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum"))
            count += chunk[:, 1:].numel()
    finally:
        model.train(training)
    return total / count / LOG2


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())


def _block_pass(model: nn.Module, blocks: Sequence[nn.Module], x: Tensor, y: Tensor) -> tuple[list[Tensor],
                                                                                               list[Tensor]]:
    """One forward/backward (``torch.autograd.grad``: no ``.grad`` written): the gradient at every block's output as
    the block's own backward receives it, and every block's parameter gradient flattened into one vector."""
    outputs: list[Tensor] = []

    def keep(module: nn.Module, args: Any, output: Tensor) -> None:
        outputs.append(output)

    # prepend: seen before any hook a rule puts on the block, so this is the tensor the block itself computed.
    handles = [block.register_forward_hook(keep, prepend=True) for block in blocks]
    try:
        with torch.enable_grad():
            loss = _loss(model, x, y)
    finally:
        for handle in handles:
            handle.remove()
    params = [[p for p in block.parameters() if p.requires_grad] for block in blocks]
    flat = [p for group in params for p in group]
    grads = torch.autograd.grad(loss, [*outputs, *flat], allow_unused=True)
    dh = [torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads)]
    rest = iter(grads[len(outputs):])
    dw = [torch.cat([(torch.zeros_like(p) if (g := next(rest)) is None else g).reshape(-1) for p in group])
          for group in params]
    return dh, dw


def block_alignment(model: nn.Module, blocks: Sequence[nn.Module], x: Tensor, y: Tensor,
                    seed: int = 0) -> dict[str, list[float]]:
    """Per block: ∡(Δh, Δh_BP) at its output (degrees, per sequence, averaged over the batch) and ∡(ΔW, ΔW_BP) of
    its parameters, the rule's pass against :func:`fbalign.exact_backprop`'s on the batch ``(x, y)``.

    Both passes draw the same dropout masks (the random streams are forked and seeded alike), write no ``.grad``
    and leave the training's random state as it was. A plain model (no rule) measures 0 everywhere.
    """
    devices = [x.device] if x.device.type == "cuda" else []
    passes = []
    for exact in (False, True):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            with fbalign.exact_backprop(model) if exact else contextlib.nullcontext():
                passes.append(_block_pass(model, blocks, x, y))
    (dh, dw), (dh_bp, dw_bp) = passes
    return {"angle_dh_bp": [float(example_angles(a.flatten(1), b.flatten(1)).nanmean()) for a, b in zip(dh, dh_bp)],
            "angle_grad_bp": [float(angle(a, b)) for a, b in zip(dw, dw_bp)]}


# ------------------------------------------------------------------------------------------------- training

def _schedule(cfg: dict[str, Any]) -> Any:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to a tenth of the rate at ``steps``."""
    warmup, steps = cfg["warmup"], cfg["steps"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
    return factor


def _sample(model: CharTransformer, corpus: Corpus, prompt: str, count: int, device: torch.device,
            seed: int) -> str:
    """``count`` characters drawn from the model after ``prompt`` (temperature 1, a fixed random stream)."""
    generator = torch.Generator().manual_seed(seed)
    ids = corpus.encode(prompt).tolist()
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(count):
                window = torch.tensor([ids[-model.context:]], device=device)
                probs = torch.softmax(model(window)[0, -1].float().cpu(), dim=-1)
                ids.append(int(torch.multinomial(probs, 1, generator=generator)))
    finally:
        model.train(training)
    return corpus.decode(ids)


def train_run(condition: str, seed: int, cfg: dict[str, Any], corpus: Corpus, device: torch.device,
              folder: Path, *, resume: bool = False, sample: bool = False, progress: Any = None) -> dict[str, Any]:
    """Train one model of ``condition`` from ``seed`` and return its numbers (see ``run_lm``).

    AdamW (β = 0.9, 0.99; weight decay 0.01), warm-up and cosine decay, gradient norm clipped to 1, batches of random
    windows of the training text. Every ``eval_every`` steps: validation bits per character and the per-block
    alignment on a fixed probe batch; a checkpoint is written then (atomically), so ``resume`` continues an
    interrupted run, and a finished run's numbers (``<condition>-seed<seed>.json``) are reused. A run whose loss
    turns NaN/Inf stops there and is reported as diverged (its final score NaN).
    """
    name = f"{condition}-seed{seed}"
    done, checkpoint = folder / f"{name}.json", folder / f"{name}.pt"
    made_with = {"settings": {k: v for k, v in cfg.items() if k != "seeds"}, "corpus_sha256": corpus.sha256}
    if resume and done.exists():
        found = json.loads(done.read_text())
        if all(found.get(k) == v for k, v in made_with.items()):
            return found
    model = build(condition, cfg, len(corpus.vocab), seed).to(device)
    blocks = list(model.blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.99), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    batches = torch.Generator().manual_seed(10_000 + seed)
    probe = sequences(corpus.train, cfg["context"], cfg["probe_batch"], torch.Generator().manual_seed(0))
    probe = (probe[0].to(device), probe[1].to(device))
    windows = val_windows(corpus.val, cfg["context"], cfg["val_chars"])
    history: dict[str, list[Any]] = {"step": [], "train_bpc": [], "val_bpc": [], "angle_dh_bp": [],
                                     "angle_grad_bp": []}
    step, seconds, diverged_at = 0, 0.0, None
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint, map_location=device)
        if all(json.loads(state["made_with"]).get(k) == v for k, v in made_with.items()):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["random"], batches)
            history, step, seconds = json.loads(state["history"]), state["step"], state["seconds"]
    model.train()
    running, counted = torch.zeros((), device=device), 0
    start = time.perf_counter() - seconds
    while step < cfg["steps"]:
        x, y = sequences(corpus.train, cfg["context"], cfg["batch"], batches)
        loss = _loss(model, x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        running += loss.detach()
        counted += 1
        step += 1
        if progress is not None:
            progress.update(1)
        if step % cfg["eval_every"] and step < cfg["steps"]:
            continue
        train_bpc = float(running) / counted / LOG2
        running, counted = torch.zeros((), device=device), 0
        if not math.isfinite(train_bpc):
            diverged_at = step
            break
        aligned = block_alignment(model, blocks, *probe, seed=step)
        history["step"].append(step)
        history["train_bpc"].append(train_bpc)
        history["val_bpc"].append(bits_per_char(model, windows, cfg["batch"], device))
        history["angle_dh_bp"].append(aligned["angle_dh_bp"])
        history["angle_grad_bp"].append(aligned["angle_grad_bp"])
        if step < cfg["steps"]:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "random": rng_state(batches),
                             "history": json.dumps(history), "step": step, "seconds": time.perf_counter() - start,
                             "made_with": json.dumps(made_with)}, checkpoint)
    elapsed = time.perf_counter() - start
    final = history["val_bpc"][-1] if diverged_at is None and history["val_bpc"] else math.nan
    result = {"condition": condition, "seed": seed, "steps": step, "diverged_at": diverged_at, "val_bpc": final,
              "history": history, "seconds": elapsed, "seconds_per_step": elapsed / max(step, 1),
              # backprop inside the blocks is what DFA points mean; the plain model has no rule at all
              "unconverted": fbalign.unconverted(model) if condition not in ("backprop", "dfa-points") else {},
              **made_with,
              "summary": fbalign.summary(model) if sample and condition != "backprop" else "",
              "sample": _sample(model, corpus, corpus.decode(corpus.val[:16].tolist()), cfg["sample_chars"], device,
                                seed)
              if sample and diverged_at is None else ""}
    atomic_write_text(done, json.dumps(result, indent=1, allow_nan=True) + "\n")
    checkpoint.unlink(missing_ok=True)
    return result


# ------------------------------------------------------------------------------------------------ experiment

def run_lm(ctx: Context) -> dict[str, Any]:
    """Every condition × seed (seed-major, so an interrupted run has whole seeds), the n-gram baselines, the figure.

    Returns the sizes used, the corpus's description, ``baselines`` (unigram and bigram validation bits per
    character), and ``runs``: per condition and seed the final validation bits per character (``val_bpc``), the
    history (step, train/val bits per character, ∡(Δh, Δh_BP) and ∡(ΔW, ΔW_BP) per block), seconds per step, the
    modules that stayed on backprop, and for seed 0 ``fbalign.summary`` of the model and a sample of its text.
    """
    cfg = sizes(ctx)
    corpus = load_corpus(ctx.data)
    folder = ctx.folder("lm")
    conditions = list(CONDITIONS)
    runs = []
    with ctx.bar(total=len(conditions) * cfg["seeds"] * cfg["steps"], desc="transformer", unit="step") as bar:
        for seed in range(cfg["seeds"]):
            for condition in conditions:
                bar.set_description(f"{condition} seed {seed}")
                runs.append(train_run(condition, seed, cfg, corpus, ctx.device, folder, resume=ctx.resume,
                                      sample=seed == 0, progress=bar))
    results = {"settings": cfg, "conditions": conditions, "baselines": ngram_bits(corpus), "runs": runs,
               "corpus": {"name": corpus.name, "source": corpus.source, "sha256": corpus.sha256,
                          "train_chars": len(corpus.train), "val_chars": len(corpus.val),
                          "val_chars_scored": int(val_windows(corpus.val, cfg["context"], cfg["val_chars"])[:, 1:]
                                                  .numel()),
                          "vocab": len(corpus.vocab), "documents": list(corpus.documents)},
               "parameters": sum(p.numel() for p in build("backprop", cfg, len(corpus.vocab), 0).parameters())}
    results["figure"] = figure_lm(results, ctx)
    return results


def _by_condition(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {c: [] for c in results["conditions"]}
    for run in results["runs"]:
        found[run["condition"]].append(run)
    return found


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def _final_per_block(runs: list[dict[str, Any]], key: str) -> list[float]:
    """The last measurement of ``key`` per block, averaged over the runs that did not diverge."""
    rows = [r["history"][key][-1] for r in runs if r["diverged_at"] is None and r["history"][key]]
    return np.nanmean(np.asarray(rows, dtype=np.float64), axis=0).tolist() if rows else []


def _curve(runs: list[dict[str, Any]], key: str) -> tuple[list[int], np.ndarray]:
    """Steps and the mean over runs of ``key`` (NaN past a run's divergence)."""
    longest = max((r["history"]["step"] for r in runs), key=len, default=[])
    values = np.full((len(runs), len(longest)), np.nan)
    for i, r in enumerate(runs):
        got = np.asarray(r["history"][key], dtype=np.float64)
        values[i, :len(got)] = got if got.ndim == 1 else got.mean(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all runs NaN at a step: NaN
        return longest, np.nanmean(values, axis=0)


COLORS = {"backprop": "black", "fa": "tab:blue", "usf": "tab:green", "frsf": "tab:olive", "dfa": "tab:red",
          "dfa-points": "tab:purple"}


def figure_lm(results: dict[str, Any], ctx: Context) -> str:
    """Validation bits per character through training; ∡(Δh, Δh_BP) and ∡(ΔW, ΔW_BP) per block at the end."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4), layout="constrained")
    curves, dh_axis, dw_axis = figure.subplots(1, 3)
    by_condition = _by_condition(results)
    for condition, runs in by_condition.items():
        steps, mean = _curve(runs, "val_bpc")
        curves.plot(steps, mean, color=COLORS.get(condition), label=condition, marker=".")
        for axis, key in ((dh_axis, "angle_dh_bp"), (dw_axis, "angle_grad_bp")):
            per_block = _final_per_block(runs, key)
            axis.plot(range(len(per_block)), per_block, color=COLORS.get(condition), label=condition, marker="o")
    base = results["baselines"]
    curves.axhline(base["unigram"], color="gray", linestyle=":", label="unigram")
    curves.axhline(base["bigram"], color="gray", linestyle="--", label="bigram")
    curves.set(xlabel="training step", ylabel="validation bits per character",
               title=f"{results['corpus']['name']}: mean of {results['settings']['seeds']} seed(s)")
    curves.set_ylim(top=base["unigram"] + 0.3)
    curves.legend(fontsize=8)
    for axis, what in ((dh_axis, "∡(Δh, Δh_BP) at the block's output"), (dw_axis, "∡(ΔW, ΔW_BP) of the block")):
        axis.set(xlabel="block (0 = nearest the input)", ylabel="degrees", title=what + ", end of training")
        axis.axhline(90, color="gray", linewidth=0.5)
        axis.set_ylim(-3, 120)
        axis.set_xticks(range(results["settings"]["layers"]))
    dh_axis.legend(fontsize=8)
    return ctx.save_figure(figure, "transformers_lm.png")


def _p_text(p: float) -> str:
    return "–" if math.isnan(p) else fmt(p, 2)


def _verdict(ours_worse: bool, p: float) -> bool | None:
    """The paper's ordering holds (True), is reversed (False), both at p < 0.05, or no verdict (None)."""
    if math.isnan(p) or p >= 0.05:
        return None
    return ours_worse


def report_lm(results: dict[str, Any], section: Report, ctx: Context) -> None:
    cfg, corpus, base = results["settings"], results["corpus"], results["baselines"]
    by_condition = _by_condition(results)
    finals = {c: [r["val_bpc"] for r in runs] for c, runs in by_condition.items()}
    means = {c: _mean_sd(v)[0] for c, v in finals.items()}
    bp = finals.get("backprop", [])
    split = (f"{corpus['documents'][0]} topics for training, {corpus['documents'][1]} other whole topics held out"
             if corpus["documents"][1] else "the last 10 % held out")
    section.text(
        f"**Corpus.** `{corpus['name']}` ({corpus['source']}): {corpus['train_chars']:,} training and "
        f"{corpus['val_chars']:,} validation characters ({split}; {corpus['val_chars_scored']:,} scored), "
        f"{corpus['vocab']} distinct characters, sha256 `{corpus['sha256'][:12]}…`. CPython's documentation topics "
        "are edited English prose about a technical subject, with grammar rules and code examples mixed in, as "
        "WikiText's articles mix prose with lists and formulas; they ship with every Python, so the experiment "
        "runs anywhere without a download. The n-gram baselines fitted to the training text score "
        f"{fmt(base['unigram'])} (unigram) and {fmt(base['bigram'])} (bigram) bits per character on the validation "
        "text: a model below the bigram line uses more than the previous character.",
        f"**Set-up.** {cfg['layers']} pre-norm `nn.TransformerEncoderLayer` blocks (d_model {cfg['d_model']}, "
        f"{cfg['heads']} heads, feed-forward {cfg['d_ff']}, GELU, dropout {cfg['dropout']}) under a causal mask, "
        f"learned positions, context {cfg['context']}, {results['parameters']:,} parameters; AdamW (lr "
        f"{cfg['lr']}, β 0.9/0.99, weight decay 0.01), {cfg['warmup']} warm-up steps then cosine decay, gradient "
        f"norm clipped to {GRAD_CLIP}, {cfg['steps']} steps of {cfg['batch']} random windows, {cfg['seeds']} "
        "seed(s) per condition; every condition starts from the same weights for a seed and sees the same "
        f"batches. One learning rate for every rule (not tuned per rule). fa, usf, frsf and dfa convert every "
        "Linear, attention's projections included (`fbalign.convert`); dfa's error is the one at the head's output. "
        "DFA points (`fbalign.dfa_points(model, 'blocks.*')`) give each block's output e·B_k in place of the "
        "gradient from above, e being the error at "
        + ("the logits (no weight transport anywhere; Launay et al.'s code takes it before the vocabulary "
           "projection instead)" if cfg.get("dfa_points_error", "logits") == "logits" else
           "the head's input, as in Launay et al.'s code (the head's transpose carries it there)")
        + f". Angles are measured every {cfg['eval_every']} steps on a fixed batch of {cfg['probe_batch']} "
        "training windows.")
    section.figure(results["figure"], "Left: validation bits per character (mean over seeds) with the unigram and "
                   "bigram baselines. Middle: ∡(Δh, Δh_BP), the angle between the error a block's output receives "
                   "under the rule and under backprop, per sequence, averaged over the probe batch. Right: the angle "
                   "between the block's whole parameter gradient and backprop's.")
    header = ["condition", "val bits/char", "− backprop", "p vs backprop", "cross-entropy ÷ backprop's"]
    header += [f"∡Δh block {i}" for i in range(cfg["layers"])] + ["∡ΔW (mean of blocks)", "s/step"]
    rows = []
    for condition, runs in by_condition.items():
        mean, sd = _mean_sd(finals[condition])
        bad = sum(1 for v in finals[condition] if not math.isfinite(v))
        dw = _final_per_block(runs, "angle_grad_bp")
        rows.append([condition, f"{fmt(mean)} ± {fmt(sd, 2)}" + (f" ({bad} diverged)" if bad else ""),
                     mean - means.get("backprop", math.nan),
                     "" if condition == "backprop" else _p_text(welch_p(finals[condition], bp)),
                     mean / means.get("backprop", math.nan), *(_final_per_block(runs, "angle_dh_bp")
                                                                or [math.nan] * cfg["layers"]),
                     float(np.mean(dw)) if dw else math.nan, _mean_sd([r["seconds_per_step"] for r in runs])[0]])
    section.table(header, rows)
    section.text("s/step: a run's wall time divided by its steps (its evaluations and angle measurements, the same "
                 "for every condition, included); rough where the machine was shared with other jobs.")
    section.heading("Beside Launay et al. (2020)", 3)
    paper_ratio = math.log(PAPER_PPL["dfa-points"]) / math.log(PAPER_PPL["backprop"])
    micro_ratio = math.log(PAPER_PPL["dfa-micro"]) / math.log(PAPER_PPL["backprop"])
    comparison = []
    statements = []
    if "dfa-points" in by_condition:
        dp = finals["dfa-points"]
        learns = means["dfa-points"] < base["unigram"]
        comparison.append(("DFA points learn: they end below the unigram baseline", f"{fmt(means['dfa-points'])} vs "
                           f"{fmt(base['unigram'])} bits/char", f"ppl {PAPER_PPL['dfa-points']}", learns,
                           "the paper's DFA transformer learns (perplexity far below a unigram model's)"))
        uses_context = means["dfa-points"] < base["bigram"]
        comparison.append(("DFA points use context: they end below the bigram baseline",
                           f"{fmt(means['dfa-points'])} vs {fmt(base['bigram'])} bits/char",
                           f"ppl {PAPER_PPL['dfa-points']}", uses_context, "a perplexity of 52 needs context"))
        p = welch_p(dp, bp)
        behind = _verdict(means["dfa-points"] > means["backprop"], p)
        comparison.append(("DFA points stay behind backprop", f"ratio {fmt(means['dfa-points'] / means['backprop'])}"
                           f", p = {_p_text(p)}", f"ratio {fmt(paper_ratio)} (ppl {PAPER_PPL['dfa-points']} vs "
                           f"{PAPER_PPL['backprop']})", behind, "cross-entropy ratios; ours per character, theirs per "
                           "BPE token, so only the direction is compared, not the size"))
        if "dfa" in by_condition:
            p = welch_p(dp, finals["dfa"])
            macro_better = _verdict(means["dfa-points"] < means["dfa"], p)
            comparison.append(("DFA at block outputs beats finer DFA", f"{fmt(means['dfa-points'])} vs "
                               f"{fmt(means['dfa'])} bits/char (layer-level dfa), p = {_p_text(p)}",
                               f"ppl {PAPER_PPL['dfa-points']} (macro) vs {PAPER_PPL['dfa-micro']} (micro, ratio "
                               f"{fmt(micro_ratio)})", macro_better, "our dfa feeds every Linear's input, finer than "
                               "the paper's micro (3 points per block)"))
    if "dfa" in by_condition:
        p = welch_p(finals["dfa"], bp)
        comparison.append(("layer-level DFA stays behind backprop", f"ratio {fmt(means['dfa'] / means['backprop'])}"
                           f", p = {_p_text(p)}", f"micro: ratio {fmt(micro_ratio)}",
                           _verdict(means["dfa"] > means["backprop"], p), "finer than the paper's micro DFA"))
    section.comparison(comparison)
    for quantity, ours, _, agrees, _ in comparison:
        claim = quantity.split(":")[0]
        if agrees is True:
            statements.append(f"we agree that {claim} ({ours})")
        elif agrees is False:
            statements.append(f"we do **not** find that {claim} ({ours})")
        else:
            statements.append(f"we cannot tell at {cfg['seeds']} seed(s) whether {claim} ({ours})")
    late = []
    for condition, runs in by_condition.items():
        steps, curve = _curve(runs, "val_bpc")
        half = len(curve) // 2
        if condition != "backprop" and len(curve) >= 4 and np.isfinite(curve[[half, -1]]).all():
            late.append(f"{condition} {fmt(float(curve[half]))} → {fmt(float(curve[-1]))}")
    section.text("Where we stand: " + "; ".join(statements) + ". "
                 + ("Validation bits per character over the second half of training (still falling means a longer "
                    "run would move the standings): " + ", ".join(late) + ". " if late else "")
                 + "Launay et al. needed tuned optimizers for DFA (Adam "
                 "with β2 = 0.999 and a plateau schedule); we ran every rule with the same untuned AdamW, a small "
                 "model and a short budget, so our gaps are for this setting and say nothing about what tuning "
                 "recovers. The paper has no fa, usf or frsf transformer; their rows above are ours alone.")
    kept = {m: why for runs in by_condition.values() for r in runs for m, why in r["unconverted"].items()}
    lookups = sorted(m for m, why in kept.items() if why.startswith(("Embedding", "EmbeddingBag")))
    transport = sorted(set(kept) - set(lookups))
    section.text("Under every rule, every weight matrix takes the rule (attention's projections included) but "
                 + (", ".join(f"`{m}`" for m in lookups) or "none") + ": embeddings learn from the error that "
                 "reaches them and send none further, so there is no weight transport to replace."
                 + (" **Still on exact backprop (weight transport)**: " + "; ".join(f"`{m}` ({kept[m]})"
                                                                                   for m in transport) + "."
                    if transport else ""))
    samples = [(r["condition"], r["sample"]) for r in results["runs"] if r["sample"]]
    if samples:
        section.text("Text sampled from each seed-0 model after a 16-character prompt from the validation text "
                     "(temperature 1):")
        for condition, text in samples:
            section.text(f"*{condition}*:\n\n```text\n{text}\n```")


EXPERIMENTS = [
    # One thread: these small products gain little from a second, and lose much when the cores are shared.
    Experiment("lm", "Character-level transformer: validation bits per character and ∡(Δh, Δh_BP) per block",
               run_lm, report_lm, threads=1),
]
