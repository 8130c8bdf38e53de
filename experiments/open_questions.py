"""Open questions about feedback alignment, one experiment each, with fbalign's own rules and measurements.

Experiments (the names ``fbalign reproduce open-questions --only`` takes):

==================  ==============================================================================================
fixed-b             which fixed B is best: uniform / gaussian / orthogonal / sparse / sign(W0) / W0, and its scale,
                    on the linear teacher (30-20-10), the nonlinear teacher (30-20-10-10) and Fashion-MNIST
nonlinear-feedback  a nonlinear feedback pathway (tanh, hardtanh, softsign, relu, sign, saturation s) on fa and on
                    backprop: the final NSE / test error against the linear pathway, and the step time ratio
plastic             plastic feedback (kp, wm) against fixed B (fa) and backprop on Fashion-MNIST: learning speed
                    and ∡(B, Wᵀ) per layer over training (Akrout et al. 2019)
depth               BP / FA / DFA / KP with 2 to 8 hidden layers on Fashion-MNIST: test error against depth, and
                    the alignment of the lowest hidden layer's update
==================  ==============================================================================================

The teacher tasks learn online from one data stream shared by every condition (float64), with the pieces of
:mod:`fbalign.experiments.lillicrap2016` (:func:`student`, :func:`train_online`, :func:`tune_eta`); the image
networks train in :func:`fbalign.train.train` (run directories under the output folder, so ``--resume`` keeps
every finished run of an interrupted reproduction), and angles come from :mod:`fbalign.metrics`.

Learning rates follow one rule everywhere: every condition gets its own rate from a fixed grid, chosen on held-out
data on seed 0's network, and then trains every seed at that rate for the same budget. Teacher tasks: the grid
10^-5 … 1 in half decades, scored by :func:`tune_eta` on a prefix of the stream. Image tasks: ``IMAGE_LR_GRID``
(SGD, momentum 0.9, batch 128), scored by the validation error after ``tune_epochs`` epochs.

Each experiment's sizes are in a table ``<NAME>_SCALE = {"quick": {...}, "full": {...}}`` picked by
``ctx.scale``; the tests shrink them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import fbalign
from fbalign.data import TensorDataset, linear_teacher, load, load_digits, nonlinear_teacher, prepare
from fbalign.metrics import load_records, measure_alignment
from fbalign.models import build as build_model
from fbalign.runner import Stop, run
from fbalign.train import DivergedError, train

from .common import Claim, Context, Experiment, Report, fmt, welch_p
from .lillicrap2016 import (
    ETA_GRID,
    FEEDBACK_RANGE,
    TASK_SEED,
    TEST,
    VALIDATION,
    WEIGHT_RANGE,
    _new_figure,
    _panel_letter,
    half_sse,
    stream_seed,
    stream_task,
    student,
    train_online,
    tune_eta,
)

TITLE = "Open questions about feedback alignment: which fixed B, a nonlinear feedback path, plastic feedback, depth"

INTRODUCTION = (
    "Four questions that the feedback-alignment literature leaves open, each answered by one experiment run with "
    "fbalign's rules, its alignment metrics and its training loop. Every condition gets the same training budget "
    "and its own learning rate, chosen from a fixed grid on held-out data by one rule (see each section); every "
    "number is a mean ± standard deviation over independent seeds (new weights and new B each). The literature's "
    "claims are set beside ours where the anchored papers make one; they were measured on other data (MNIST where "
    "we use Fashion-MNIST), so the comparison is of the direction and size of effects, not of the numbers. The "
    "rates are chosen on short runs (quick mode: one epoch, or a fifth of a teacher stream), so a condition whose "
    "best rate differs over a longer run can rank lower than it would with its best rate; each table gives the "
    "rate chosen and flags rates at the grid's edge.")

# Keys of the random streams (see lillicrap2016.stream_seed): initial weights use lillicrap2016.INIT = 1.
FEEDBACK = 2  # every run's fixed or starting B
IMAGE_LR_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)  # SGD momentum 0.9: the grid every image condition is tuned on
TEACHER_ETA_GRID = ETA_GRID  # η per example, 1e-5 … 1 in half decades: the grid every teacher condition is tuned on
IMAGE_BATCH = 128
IMAGE_MOMENTUM = 0.9
# plastic: Akrout et al.'s optimizer, plain SGD (their rate, 0.05, lies inside the grid). With momentum 0.9, W moves
# so much further per step that one weight-mirror step (lr 0.01) per training step leaves B lagging behind W.
PLASTIC_LR_GRID = (0.01, 0.03, 0.1, 0.3)
PLASTIC_MOMENTUM = 0.0
LILLICRAP_RMS = FEEDBACK_RANGE / math.sqrt(3.0)  # element rms of Lillicrap's B ~ U[-0.5, 0.5]

# ----------------------------------------------------------------------------------------- per-experiment sizes

# Every row has the seeds, the data and the training budget; "tiny" is the tests' (seconds, in this process).
_TINY_IMAGE = {"image_train": 600, "image_validation": 150, "epochs": 1, "tune_epochs": 1, "data": "digits",
               "lr_grid": (0.03, 0.1), "eta_grid": (1e-3, 1e-2, 1e-1), "workers": 1}
_GRIDS = {"lr_grid": IMAGE_LR_GRID, "eta_grid": TEACHER_ETA_GRID, "workers": None}
FIXED_B_SCALE: dict[str, dict[str, Any]] = {
    "quick": {"seeds": 3, "linear_examples": 4000, "linear_prefix": 800,
              "nonlinear_examples": 20_000, "nonlinear_prefix": 4000, "teacher_batch": 10,
              "image_train": 10_000, "image_validation": 5000, "image_hidden": [256, 256], "epochs": 4,
              "tune_epochs": 1, "scales": [0.1, 0.3, 1.0, 3.0, 10.0], "data": None, **_GRIDS},
    "full": {"seeds": 10, "linear_examples": 40_000, "linear_prefix": 4000,
             "nonlinear_examples": 400_000, "nonlinear_prefix": 40_000, "teacher_batch": 10,
             "image_train": None, "image_validation": 5000, "image_hidden": [256, 256], "epochs": 20,
             "tune_epochs": 3, "scales": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0], "data": None, **_GRIDS},
    "tiny": {"seeds": 2, "linear_examples": 200, "linear_prefix": 50, "nonlinear_examples": 200,
             "nonlinear_prefix": 50, "teacher_batch": 10, "image_hidden": [16, 16], "scales": [0.1, 1.0],
             **_TINY_IMAGE},
}
NONLINEAR_SCALE: dict[str, dict[str, Any]] = {
    "quick": {"seeds": 3, "examples": 20_000, "prefix": 4000, "teacher_batch": 10, "image_train": 10_000,
              "image_validation": 5000, "image_hidden": [256, 256], "epochs": 4, "tune_epochs": 1,
              "timing_rounds": 15, "timing_steps": 5, "data": None, **_GRIDS},
    "full": {"seeds": 10, "examples": 400_000, "prefix": 40_000, "teacher_batch": 10, "image_train": None,
             "image_validation": 5000, "image_hidden": [256, 256], "epochs": 20, "tune_epochs": 3,
             "timing_rounds": 40, "timing_steps": 10, "data": None, **_GRIDS},
    "tiny": {"seeds": 2, "examples": 200, "prefix": 50, "teacher_batch": 10, "image_hidden": [16, 16],
             "timing_rounds": 3, "timing_steps": 2, **_TINY_IMAGE},
}
# plastic: lr_grid is plain SGD's (PLASTIC_MOMENTUM), controls_lr_grid the momentum controls'.
PLASTIC_SCALE: dict[str, dict[str, Any]] = {
    "quick": {"seeds": 3, "image_train": 10_000, "image_validation": 5000, "hidden": [500], "epochs": 8,
              "tune_epochs": 1, "align_every": 10, "data": None, **_GRIDS, "lr_grid": PLASTIC_LR_GRID,
              "controls_lr_grid": IMAGE_LR_GRID},
    "full": {"seeds": 5, "image_train": None, "image_validation": 5000, "hidden": [500], "epochs": 50,
             "tune_epochs": 3, "align_every": 50, "data": None, **_GRIDS, "lr_grid": PLASTIC_LR_GRID,
             "controls_lr_grid": IMAGE_LR_GRID},
    "tiny": {"seeds": 2, "hidden": [32], "align_every": 2, **_TINY_IMAGE, "epochs": 6, "lr_grid": (0.1, 0.3),
             "controls_lr_grid": (0.03, 0.1)},
}
DEPTH_SCALE: dict[str, dict[str, Any]] = {
    "quick": {"seeds": 3, "image_train": 10_000, "image_validation": 5000, "width": 256, "depths": [2, 4, 8],
              "epochs": 5, "tune_epochs": 1, "align_every": 50, "rules": ["bp", "fa", "dfa", "kp"], "data": None,
              **_GRIDS},
    "full": {"seeds": 5, "image_train": None, "image_validation": 5000, "width": 256, "depths": [2, 3, 4, 6, 8],
             "epochs": 20, "tune_epochs": 3, "align_every": 100, "rules": ["bp", "fa", "dfa", "kp"], "data": None,
             **_GRIDS},
    "tiny": {"seeds": 2, "width": 16, "depths": [1, 3], "align_every": 2, "rules": ["bp", "fa", "dfa", "kp"],
             **_TINY_IMAGE, "epochs": 2},
}

KP_DECAY = 1.0  # kp's λ: the mismatch B − W shrinks by (1 − lr·λ) per step (W itself is not decayed)
MIRROR_LR = 0.01  # wm: one mirror step after every training step (as Akrout et al.'s code), mismatch ×(1 − 0.01)
MIRROR_BATCH = 128
JOBS: int | None = None  # processes training conditions side by side, overriding a row's "workers" (None: per core)

RULE_LABELS = {"bp": "backprop", "fa": "feedback alignment", "dfa": "direct FA", "kp": "Kolen–Pollack",
               "wm": "weight mirrors"}
RULE_COLORS = {"bp": "black", "fa": "tab:green", "dfa": "tab:orange", "kp": "tab:blue", "wm": "tab:purple"}
TASK_LABELS = {"linear": "linear teacher 30-20-10", "nonlinear": "nonlinear teacher 30-20-10-10",
               "image": "image MLP"}


def sizes(table: dict[str, dict[str, Any]], ctx: Context) -> dict[str, Any]:
    """The row of an experiment's size table for ``ctx.scale``, with ``seeds`` overridden by ``--seeds``."""
    chosen = dict(table[ctx.scale])
    chosen["seeds"] = ctx.seeds if ctx.seeds is not None else chosen["seeds"]
    return chosen


# ------------------------------------------------------------------------------------------------ shared pieces

def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN, NaN when none; sd 0 for one value)."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(finite) == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if len(finite) > 1 else 0.0


def pm(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± sd`` of ``values`` for a table (``n/m diverged`` appended when some are not finite)."""
    mean, sd = mean_sd(values)
    bad = sum(1 for v in values if v is None or not math.isfinite(v))
    text = f"{fmt(mean, digits)} ± {fmt(sd, 2)}"
    return text + (f" ({bad}/{len(values)} diverged)" if bad else "")


def hidden_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The converted layers whose feedback carries an error, i.e. all but the first (whose input is the data)."""
    return fbalign.feedback_layers(model)[1:]


def arriving_error_rms(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor,
                       y: Tensor) -> float:
    """The rms of the error that arrives at the inputs of every layer but the first, on the batch ``(x, y)``:
    the size, in the gradient's units, that a feedback saturation is measured against."""
    arrived: list[Tensor] = []

    def keep_input_grad(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if inputs[0].requires_grad:
            inputs[0].register_hook(lambda grad: arrived.append(grad.detach()))

    handles = [layer.register_forward_hook(keep_input_grad) for _, layer in hidden_layers(model)]
    try:
        loss_fn(model(x), y).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return float(torch.cat([g.reshape(-1) for g in arrived]).square().mean().sqrt())


def fixed_feedback(model: nn.Module, kind: str, *, seed: int, rms: float | None = None,
                   multiplier: float = 1.0, **options: Any) -> nn.Module:
    """``model`` converted (in place) to ``fa`` with a fixed B of ``kind``, every layer's B rescaled to the same
    element rms, so that the kinds differ only in structure.

    Kinds: ``uniform``, ``gaussian``, ``orthogonal`` (fbalign's ``fa(init=...)``), ``sparse`` (uniform with half
    the entries zero), ``W0`` (a copy of the initial weights, ``fa(init='weight')``: B = W0ᵀ up to scale),
    ``sign(W0)`` (that copy's signs: a sign-concordant B drawn once, which does not follow W as usf does).

    The rms is ``multiplier · rms`` (``rms`` None: ``1/sqrt(3·fan_in)``, the element rms of torch's default
    initialization of the layer's weight, fbalign's default for B). ``options`` go to the rule (e.g. a
    ``feedback_nonlinearity``).
    """
    draws = {"uniform": {"init": "uniform"}, "gaussian": {"init": "gaussian"},
               "orthogonal": {"init": "orthogonal"}, "sparse": {"init": "uniform", "sparsity": 0.5},
               "W0": {"init": "weight"}, "sign(W0)": {"init": "weight"}}
    if kind not in draws:
        raise ValueError(f"unknown kind of B {kind!r}; choose one of {', '.join(draws)}")
    fbalign.convert(model, "fa", inplace=True, seed=seed, **draws[kind], **options)
    with torch.no_grad():
        for _, layer in fbalign.feedback_layers(model):
            b = layer.feedback
            if kind == "sign(W0)":
                b.sign_()
            target = multiplier * (rms if rms is not None else 1.0 / math.sqrt(3.0 * layer.weight[0].numel()))
            b.mul_(target / b.square().mean().sqrt())
    return model


def fixed_feedback_model(input_shape: Sequence[int], num_outputs: int, *, model: str = "lenet5",
                         kind: str = "uniform", multiplier: float = 1.0, seed: int = 0,
                         **model_options: Any) -> nn.Module:
    """A model factory for ``fbalign train`` (``model.name = "fbalign.experiments.open_questions:fixed_feedback_model"``
    with ``rule = "torch"``): the built-in ``model`` with its weights drawn from ``seed``, converted by
    :func:`fixed_feedback`. It puts the fixed-B question to any configuration, e.g. a B twice the default rms::

        fbalign train configs/fashion_mnist_lenet.toml --set rule=torch \\
            --set 'model.name="fbalign.experiments.open_questions:fixed_feedback_model"' --set model.multiplier=2
    """
    torch.manual_seed(seed)
    built = build_model(model, input_shape=input_shape, num_outputs=num_outputs, **model_options)
    return fixed_feedback(built, kind, seed=seed, multiplier=multiplier)


def run_conditions(ctx: Context, size: dict[str, Any], conditions: dict[str, dict[str, Any]], *,
                   on_device: bool = False, workers: int | None = None) -> dict[str, dict[str, Any]]:
    """Run every condition (a job for :func:`run_condition`: ``make``, a picklable ``make(data=, seed=)``
    returning the converted network, and ``task`` with its settings) and return the results by name, in order.

    The conditions run side by side in ``workers`` processes by :func:`fbalign.runner.run` (None: ``JOBS``, else
    the size row's ``workers``, else one per core; conditions that train on a GPU (``on_device``) one at a time),
    each on one thread. Every condition seeds all it draws, so the numbers are those of a serial run. Ctrl-C or
    SIGTERM stops them all, keeping every finished training run for ``--resume``.
    """
    workers = workers or JOBS or size.get("workers") or (1 if on_device and ctx.device.type != "cpu" else None)
    jobs = [{"ctx": ctx, "size": size, **job} for job in conditions.values()]
    found = run(run_condition, jobs, workers=workers, executor="inline" if workers == 1 else "process")
    if any(f is None for f in found):  # a training run was stopped without the runner seeing a signal
        raise KeyboardInterrupt("training was stopped; continue with --resume")
    return dict(zip(conditions, found))


def run_condition(job: dict[str, Any], stop: Stop) -> dict[str, Any] | None:
    """One condition of :func:`run_conditions`: on a teacher task (``task`` 'linear' or 'nonlinear') by
    :func:`teacher_condition`, on the image task by :func:`image_condition` in ``folder`` (None: stopped)."""
    torch.set_num_threads(1)
    ctx, size, task = job["ctx"], job["size"], job["task"]
    if task == "image":
        data = image_data(ctx, size)
        return image_condition(ctx, ctx.folder(*job["folder"]), lambda seed: job["make"](data=data, seed=seed), data,
                               epochs=size["epochs"], tune_epochs=size["tune_epochs"], seeds=size["seeds"],
                               align_every=job.get("align_every", 0), grid=job.get("grid", size["lr_grid"]),
                               momentum=job.get("momentum", IMAGE_MOMENTUM), stop=stop)
    data = teacher_task(task, job["examples"])
    return teacher_condition(lambda seed: job["make"](data=data, seed=seed), data, examples=job["examples"],
                             prefix=job["prefix"], batch_size=size["teacher_batch"], seeds=size["seeds"],
                             grid=size["eta_grid"])


# ------------------------------------------------------------------------------------------------ teacher tasks

@functools.lru_cache(maxsize=4)
def teacher_task(kind: str, examples: int) -> TensorDataset:
    """Lillicrap's linear (30-20-10) or nonlinear (30-20-10-10) teacher in float64: a stream of ``examples``,
    then ``VALIDATION`` points for tuning, and ``TEST`` held-out points (the same for every condition)."""
    make = linear_teacher if kind == "linear" else nonlinear_teacher
    return stream_task(make(n_train=examples + VALIDATION, n_test=TEST, seed=TASK_SEED, dtype=torch.float64),
                       examples)


def teacher_student(kind: str, seed: int) -> nn.Module:
    """The student for a teacher task: linear 30-20-10 with W ~ U[-0.01, 0.01] (Lillicrap Fig. 1), or
    30-20-10-10 tanh with biases and torch's default initialization (Fig. 2d's deep student)."""
    if kind == "linear":
        return student((30, 20, 10), "linear", bias=False, seed=seed, init_range=WEIGHT_RANGE)
    return student((30, 20, 10, 10), "tanh", bias=True, seed=seed)


def teacher_condition(make: Callable[[int], nn.Module], data: TensorDataset, *, examples: int, prefix: int,
                      batch_size: int, seeds: int, grid: Sequence[float] = TEACHER_ETA_GRID) -> dict[str, Any]:
    """Tune η for ``make(0)`` on ``grid`` (:func:`tune_eta` on the stream's first ``prefix`` examples), then train
    ``make(seed)`` for every seed on the whole stream at that η; the test NSE along the way.

    Returns ``eta``, ``tuning``, ``final`` (test NSE per seed, NaN where a run diverged), ``speed`` (mean log10
    test NSE over the run, per seed: lower learns faster) and ``curve`` (examples, mean and sd of log10 NSE).
    """
    tuning = tune_eta(lambda: make(0), "rule", data, examples=prefix, batch_size=batch_size, grid=grid)
    finals, speeds, logs, points = [], [], [], None
    for seed in range(seeds):
        try:
            curve = train_online(make(seed), "rule", data, examples=examples, eta=tuning["eta"],
                                 batch_size=batch_size, evaluations=50)
        except DivergedError:
            finals.append(math.nan)
            speeds.append(math.nan)
        else:
            log_nse = np.log10(np.maximum(curve["nse"], 1e-300))
            finals.append(curve["nse"][-1])
            speeds.append(float(log_nse[1:].mean()))
            logs.append(log_nse)
            points = curve["examples"]
    stacked = np.asarray(logs) if logs else np.full((1, 1), math.nan)
    return {"eta": tuning["eta"], "tuning": tuning, "final": finals, "speed": speeds,
            "curve": {"examples": points or [], "log10_mean": stacked.mean(0),
                      "log10_sd": stacked.std(0, ddof=1) if len(stacked) > 1 else np.zeros(stacked.shape[1])}}


# ------------------------------------------------------------------------------------------------ image tasks

@functools.lru_cache(maxsize=4)
def _raw_images(name: str, data_dir: str | None) -> TensorDataset:
    return load_digits() if name == "digits" else load(name, dir=data_dir)


def image_data(ctx: Context, size: dict[str, Any]) -> TensorDataset:
    """The image data set (``size['data']``, else ``--data``, else Fashion-MNIST): ``image_validation``
    training examples held out for tuning, the first ``image_train`` of the rest kept (None: all), inputs
    standardized with the training split's statistics; the whole test split."""
    name = size.get("data") or ctx.data or "fashion-mnist"
    return prepare(_raw_images(name, ctx.data_dir), validation=size["image_validation"],
                   train_size=size["image_train"], normalize=True, seed=0)


def image_student(data: TensorDataset, hidden: Sequence[int], activation: str, seed: int) -> nn.Module:
    """An MLP for ``data`` (flattened inputs, ``hidden`` widths, ``activation``), torch's default initialization
    drawn from run ``seed``'s stream, in float32."""
    return student((math.prod(data.input_shape), *hidden, data.num_outputs), activation, bias=True, seed=seed,
                   dtype=torch.float32)


@contextlib.contextmanager
def mirror_after_every_step(model: nn.Module, *, lr: float = MIRROR_LR) -> Iterator[None]:
    """While the block runs, every optimizer step that updates ``model``'s weights is followed by one weight-mirror
    step of its ``wm`` layers (:func:`fbalign.mirror`), as in Akrout et al.'s code. A global optimizer hook, so
    :func:`fbalign.train.train`'s loop runs unchanged; the noise comes from torch's global generator, which
    the loop's checkpoints save, so a resumed run draws what an uninterrupted one would."""
    weights = {id(layer.weight) for _, layer in fbalign.feedback_layers(model)}

    def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if any(id(p) in weights for group in optimizer.param_groups for p in group["params"]):
            fbalign.mirror(model, 1, batch_size=MIRROR_BATCH, lr=lr)

    handle = register_optimizer_step_post_hook(after_step)
    try:
        yield
    finally:
        handle.remove()


def train_image(ctx: Context, model: nn.Module, data: TensorDataset, run_dir: Path, *, lr: float, epochs: int,
                seed: int, align_every: int = 0, momentum: float = IMAGE_MOMENTUM, stop: Stop | None = None
                ) -> dict[str, Any] | None:
    """Train an already converted ``model`` on ``data`` with :func:`fbalign.train.train` (SGD with ``momentum``,
    batch 128, cross-entropy) in ``run_dir`` (continued there with ``--resume``); with ``align_every``, also
    record fbalign.metrics' alignment every that many steps, plus a record at step 0.

    Returns the per-epoch ``history`` and the alignment ``records`` (empty without ``align_every``); ``diverged``
    is True (and the history what was finished) when the loss became NaN/Inf. None when ``stop`` stopped it (its
    checkpoint stays in ``run_dir`` for --resume).
    """
    config = {"epochs": epochs, "batch_size": IMAGE_BATCH, "seed": seed, "device": str(ctx.device),
              "loss": "cross_entropy", "rule": "torch",  # the model comes converted
              "optimizer": {"name": "sgd", "lr": lr, "momentum": momentum},
              "log": {"progress": False, "every": align_every or 100, "alignment": bool(align_every)}}
    initial = None
    if align_every:  # the recorder measures steps every, 2·every, ...: step 0 is measured here
        initial = {"step": 0, **measure_alignment(model, F.cross_entropy, data.train_x[:256], data.train_y[:256])}
    wm = any(isinstance(layer.rule, fbalign.plastic.WM) for _, layer in fbalign.feedback_layers(model))
    try:
        with mirror_after_every_step(model) if wm else contextlib.nullcontext():
            result = train(config, model=model, data=data, run_dir=run_dir, resume=ctx.resume, stop=stop)
    except DivergedError:
        return {"history": [], "records": [], "diverged": True}
    if result.status != "finished":
        return None
    records = load_records(run_dir / "alignment.jsonl") if align_every else []
    return {"history": result.history, "records": ([initial] if initial else []) + records, "diverged": False}


def image_condition(ctx: Context, folder: Path, make: Callable[[int], nn.Module], data: TensorDataset, *,
                    epochs: int, tune_epochs: int, seeds: int, align_every: int = 0,
                    grid: Sequence[float] | None = None, momentum: float | None = None, stop: Stop | None = None
                    ) -> dict[str, Any] | None:
    """Tune the learning rate of ``make(0)`` on ``grid`` (None: ``IMAGE_LR_GRID``; the validation error after
    ``tune_epochs`` epochs; a rate that diverges scores +inf), then train ``make(seed)`` for every seed for
    ``epochs`` epochs at that rate, all with SGD at ``momentum`` (None: ``IMAGE_MOMENTUM``).

    Returns ``lr``, ``tuning``, per seed ``final`` (test error % at the last epoch; NaN where diverged),
    ``final_train`` (training error), ``best`` (test error at the best validation epoch), per-epoch ``curve``
    (mean and sd of the test error) and, with ``align_every``, every seed's alignment ``records``; None when
    ``stop`` stopped a run.
    """
    grid = IMAGE_LR_GRID if grid is None else grid
    momentum = IMAGE_MOMENTUM if momentum is None else momentum
    scores = []
    for lr in grid:
        run = train_image(ctx, make(0), data, folder / f"tune-lr{lr:g}", lr=lr, epochs=tune_epochs, seed=0,
                          momentum=momentum, stop=stop)
        if run is None:
            return None
        scores.append(math.inf if run["diverged"] else run["history"][-1]["val_error"])
    best = int(np.argmin(scores))
    lr = grid[best]
    finals, trains, bests, curves, records = [], [], [], [], []
    for seed in range(seeds):
        run = train_image(ctx, make(seed), data, folder / f"seed{seed}", lr=lr, epochs=epochs, seed=seed,
                          align_every=align_every, momentum=momentum, stop=stop)
        if run is None:
            return None
        if run["diverged"]:
            finals.append(math.nan)
            trains.append(math.nan)
            bests.append(math.nan)
        else:
            history = run["history"]
            finals.append(history[-1]["test_error"])
            trains.append(history[-1]["train_error"])
            bests.append(min(history, key=lambda h: h["val_error"])["test_error"])
            curves.append([h["test_error"] for h in history])
        records.append(run["records"])
    stacked = np.asarray(curves) if curves else np.full((1, epochs), math.nan)
    return {"lr": lr, "momentum": momentum, "tuning": {"grid": list(grid), "val_error": scores, "epochs": tune_epochs,
                                 "at_grid_edge": best in (0, len(grid) - 1)},
            "final": finals, "final_train": trains, "best": bests,
            "curve": {"epochs": list(range(1, epochs + 1)), "mean": stacked.mean(0),
                      "sd": stacked.std(0, ddof=1) if len(stacked) > 1 else np.zeros(stacked.shape[1])},
            "records": records if align_every else []}


def image_settings(size: dict[str, Any], data: TensorDataset, grid: Sequence[float] | None = None,
                   momentum: float | None = None) -> dict[str, Any]:
    return {"data": data.name, "train_examples": len(data.train_x), "validation_examples": len(data.val_x),
            "test_examples": len(data.test_x), "epochs": size["epochs"], "tune_epochs": size["tune_epochs"],
            "lr_grid": list(size["lr_grid"] if grid is None else grid), "batch_size": IMAGE_BATCH,
            "momentum": IMAGE_MOMENTUM if momentum is None else momentum, "seeds": size["seeds"]}


def _lr_rule_text(s: dict[str, Any]) -> str:
    optimizer = f"SGD with momentum {s['momentum']}" if s["momentum"] else "plain SGD (no momentum)"
    return (f"{optimizer}, batch {s['batch_size']}, cross-entropy; each condition's learning "
            f"rate is the one of {', '.join(map(fmt, s['lr_grid']))} with the lowest validation error after "
            f"{s['tune_epochs']} epoch(s) on seed 0 ({s['validation_examples']} held-out training examples), and "
            f"every seed then trains {s['epochs']} epochs at it. Data: {s['data']}, {s['train_examples']} training "
            f"examples, the {s['test_examples']} test images.")


def _teacher_rule_text(prefixes: str, grid: Sequence[float]) -> str:
    return ("Teacher tasks: one example stream shared by every condition, mini-batches of the stated size, float64; "
            f"each condition's η (per example) is the one of the {len(grid)} rates {fmt(min(grid))} … "
            f"{fmt(max(grid))} (half decades) that `tune_eta` picks on a prefix of the stream ({prefixes}; mean "
            f"log10 NSE on {VALIDATION} validation points), on seed 0, and every seed then trains the whole stream at "
            f"it. NSE is measured on {TEST} held-out points.")


# ------------------------------------------------------------------------------------------------ 1. fixed B

FIXED_KINDS = ("uniform", "gaussian", "orthogonal", "sparse", "sign(W0)", "W0")


def fixed_b_model(*, data: TensorDataset, seed: int, task: str, name: str, rms: float | None = None,
                  hidden: Sequence[int] = ()) -> nn.Module:
    """The student of ``task`` (a teacher task's, or an image MLP of ``hidden`` tanh layers) for fixed-B condition
    ``name``: ``bp``, a kind of :func:`fixed_feedback` at ``rms``, or ``'uniform ×m'`` (m times that rms)."""
    model = image_student(data, hidden, "tanh", seed) if task == "image" else teacher_student(task, seed)
    if name == "bp":
        return fbalign.convert(model, "backprop", inplace=True)
    kind, _, multiplier = name.partition(" ×")
    return fixed_feedback(model, kind, seed=stream_seed(FEEDBACK, seed), rms=rms,
                          multiplier=float(multiplier) if multiplier else 1.0)


def run_fixed_b(ctx: Context) -> dict[str, Any]:
    """Which fixed B is best, and at what scale, on the two teacher tasks and the image task."""
    size = sizes(FIXED_B_SCALE, ctx)
    seeds, batch = size["seeds"], size["teacher_batch"]
    scales = [m for m in size["scales"] if m != 1.0]  # multiplier 1 is the uniform kind itself
    conditions = ["bp", *FIXED_KINDS, *(f"uniform ×{m:g}" for m in scales)]
    data_image = image_data(ctx, size)
    results: dict[str, Any] = {"settings": {
        "seeds": seeds, "teacher_batch": batch, "scales": size["scales"], "kinds": list(FIXED_KINDS),
        "linear": {"examples": size["linear_examples"], "prefix": size["linear_prefix"], "rms": LILLICRAP_RMS},
        "nonlinear": {"examples": size["nonlinear_examples"], "prefix": size["nonlinear_prefix"],
                      "rms": LILLICRAP_RMS},
        "image": {**image_settings(size, data_image), "hidden": size["image_hidden"], "activation": "tanh"}},
        "tasks": {}}

    for task in ("linear", "nonlinear"):
        results["tasks"][task] = run_conditions(ctx, size, {name: {
            "task": task, "examples": size[f"{task}_examples"], "prefix": size[f"{task}_prefix"],
            "make": functools.partial(fixed_b_model, task=task, name=name, rms=LILLICRAP_RMS)} for name in conditions})
    results["tasks"]["image"] = run_conditions(ctx, size, {name: {
        "task": "image", "folder": ("fixed-b", name.replace(" ×", "-x")),
        "make": functools.partial(fixed_b_model, task="image", name=name, hidden=size["image_hidden"])}
        for name in conditions}, on_device=True)
    results["headline"] = _fixed_b_headline(results)
    plot_fixed_b(results, ctx)
    return results


def _metric(task: str) -> str:
    return "error" if task == "image" else "nse"


def _final_values(task: str, condition: dict[str, Any]) -> list[float]:
    """What a condition is ranked by: log10 of the final test NSE (teacher tasks), test error % (image)."""
    if task == "image":
        return condition["final"]
    return [math.log10(v) if math.isfinite(v) and v > 0 else math.nan for v in condition["final"]]


def _fixed_b_headline(results: dict[str, Any]) -> dict[str, Any]:
    """Per task: the kinds ranked by their final score, each one's p-value against uniform, and the best scale."""
    headline = {}
    for task, found in results["tasks"].items():
        kinds = {k: mean_sd(_final_values(task, found[k]))[0] for k in results["settings"]["kinds"]}
        ranked = sorted((k for k in kinds if math.isfinite(kinds[k])), key=kinds.__getitem__)
        diverged = {k: sum(1 for v in found[k]["final"] if not math.isfinite(v)) for k in found}
        scales = {1.0: kinds["uniform"]}
        scales.update({m: mean_sd(_final_values(task, found[f"uniform ×{m:g}"]))[0]
                       for m in results["settings"]["scales"] if m != 1.0})
        headline[task] = {
            "ranked": ranked, "mean": kinds, "diverged": {k: n for k, n in diverged.items() if n},
            "p_vs_uniform": {k: welch_p(_final_values(task, found[k]), _final_values(task, found["uniform"]))
                             for k in kinds if k != "uniform"},
            "bp": mean_sd(_final_values(task, found["bp"]))[0],
            "scale_mean": {str(m): v for m, v in sorted(scales.items())},
            "best_scale": min(scales, key=lambda m: scales[m] if math.isfinite(scales[m]) else math.inf),
        }
    return headline


def plot_fixed_b(results: dict[str, Any], ctx: Context) -> None:
    from matplotlib.figure import Figure

    tasks = list(results["tasks"])
    figure = Figure(figsize=(4.0 * len(tasks), 6.4), layout="constrained")
    axes = figure.subplots(2, len(tasks), squeeze=False)
    kinds = results["settings"]["kinds"]
    multipliers = sorted(results["settings"]["scales"])
    for column, task in enumerate(tasks):
        found = results["tasks"][task]
        ylabel = "final test error (%)" if task == "image" else "log10 final test NSE"
        top, bottom = axes[0, column], axes[1, column]
        for i, kind in enumerate(kinds):
            values = _final_values(task, found[kind])
            mean, sd = mean_sd(values)
            top.errorbar([i], [mean], yerr=[sd], fmt="o", color="tab:green", capsize=3)
            bad = sum(1 for v in values if not math.isfinite(v))
            if bad:
                top.annotate(f"{bad} diverged", (i, 0.02), xycoords=("data", "axes fraction"), ha="center",
                             fontsize="x-small", color="tab:red")
            top.plot(np.full(len(values), i) + 0.15, values, ".", color="0.6", markersize=4)
        bp_mean, bp_sd = mean_sd(_final_values(task, found["bp"]))
        top.axhline(bp_mean, color="black", linewidth=1.0, label=f"backprop ({fmt(bp_mean)})")
        top.axhspan(bp_mean - bp_sd, bp_mean + bp_sd, color="black", alpha=0.1, linewidth=0)
        top.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize="small")
        top.set(ylabel=ylabel, title=TASK_LABELS[task] if task != "image" else
                f"{results['settings']['image']['data']} MLP")
        top.legend(fontsize="x-small")
        _panel_letter(top, "abc"[column])
        means, sds = zip(*(mean_sd(_final_values(task, found["uniform" if m == 1.0 else f"uniform ×{m:g}"]))
                           for m in multipliers))
        bottom.errorbar(multipliers, means, yerr=sds, fmt="o-", color="tab:green", capsize=3,
                        label="uniform B, own tuned η")
        bottom.axhline(bp_mean, color="black", linewidth=1.0, label="backprop")
        bottom.set(xscale="log", xlabel="rms of B / reference rms", ylabel=ylabel)
        bottom.legend(fontsize="x-small")
        _panel_letter(bottom, "def"[column])
    results["figure"] = ctx.save_figure(figure, "fixed_b.png")


def report_fixed_b(results: dict[str, Any], section: Report, ctx: Context) -> None:
    s = results["settings"]
    section.text(
        "**Question.** Feedback alignment works with a random B, but which random B works best, and does its "
        "scale matter? Six fixed kinds of B, every layer's B rescaled to the same element rms so that they differ "
        "only in structure: uniform, gaussian, orthogonal, sparse (half the entries zero), sign(W0) (the signs of "
        "the initial weights: sign-concordant at the start, fixed after, unlike usf which follows W) and W0 "
        "(a scaled copy of the initial weights, `fa(init='weight')`: B = W0ᵀ at the start, then W moves away). "
        "The scale sweep multiplies a uniform B's rms by each factor. Reference rms: Lillicrap's U[-0.5, 0.5] "
        f"({fmt(LILLICRAP_RMS)}) on the teacher tasks, 1/√(3·fan_in) (torch's init of W, fbalign's default) on the "
        "image task.")
    section.figure(results["figure"], "Which fixed B. Top: every kind at the same rms (green: mean ± sd over "
                   f"{s['seeds']} seeds, gray: the seeds; black: backprop ± sd). Bottom: the rms of a uniform B "
                   "swept (each point with its own tuned learning rate). Lower is better.")
    for task, found in results["tasks"].items():
        head = results["headline"][task]
        unit = "final test error (%)" if task == "image" else "final test NSE"
        rows = []
        for name, c in found.items():
            rate = c["lr"] if task == "image" else c["eta"]
            edge = c["tuning"]["at_grid_edge"]
            p = head["p_vs_uniform"].get(name, math.nan)
            if task == "image":
                rows.append([name, pm(c["final"]), pm(c["best"]), pm(c["final_train"]), p, rate,
                             "yes" if edge else "no"])
            else:
                geo = 10 ** mean_sd(_final_values(task, c))[0]
                rows.append([name, geo, pm(_final_values(task, c)), pm(c["speed"]), p, rate, "yes" if edge else "no"])
        section.heading(f"{TASK_LABELS[task] if task != 'image' else s['image']['data'] + ' MLP'}", 3)
        if task == "image":
            section.text(f"MLP {s['image']['hidden']} tanh hidden layers. " + _lr_rule_text(s["image"]))
            section.table(["condition", unit, "test error at best validation epoch", "training error (%)",
                           "p vs uniform (Welch)", "learning rate", "at grid edge"], rows)
        else:
            section.text(f"{s[task]['examples']} examples in mini-batches of {s['teacher_batch']}." + (
                " Every condition converges exponentially on this task, so how deep its final NSE goes depends "
                "mostly on the η it was given: one half-decade step of η moves it by several decades. Compare "
                "conditions that got the same η (the kinds mostly did) rather than across the scale sweep."
                if task == "linear" else ""))
            section.table(["condition", f"{unit} (geometric mean)", "log10 final NSE", "log10 NSE averaged over "
                           "the run (speed)", "p vs uniform (Welch)", "η", "at grid edge"], rows)
        ranked = head["ranked"]
        diverged = ", ".join(f"{k} ({n} of {s['seeds']} seeds)" for k, n in head["diverged"].items())
        section.text(f"Ranking of the fixed kinds (best first; runs that diverged at the tuned rate are left out "
                     f"and listed): {', '.join(ranked)}; diverged: {diverged or 'none'}; backprop: "
                     f"{fmt(head['bp'])} ({'log10 NSE' if task != 'image' else '% error'}). Best rms multiplier: "
                     f"×{fmt(head['best_scale'])}.")
    section.text(_teacher_rule_text(f"{s['linear']['prefix']} and {s['nonlinear']['prefix']} examples",
                                    results["tasks"]["linear"]["bp"]["tuning"]["grid"]))
    section.claims(claims_fixed_b(results))
    section.text(_fixed_b_finding(results))


def claims_fixed_b(results: dict[str, Any]) -> list[Claim]:
    """Per task: sparse B nearly as good as dense (Lillicrap 2016; a verdict on the image task: within 1 point),
    sign(W0) better than uniform (Liao 2016; a verdict only at Welch p < 0.05), uniform FA against backprop."""
    rows = []
    for task in results["tasks"]:
        head = results["headline"][task]
        sparse_gap = head["mean"]["sparse"] - head["mean"]["uniform"]
        sign_gap = head["mean"]["sign(W0)"] - head["mean"]["uniform"]
        what = "error points" if task == "image" else "decades of NSE"
        rows.append(Claim(f"{task}: sparse − dense B ({what})", sparse_gap,
                          "+0.3 points (MNIST 2.4% vs 2.1%)" if task == "image" else "– (an MNIST claim)",
                          "Lillicrap et al. 2016: sparse FA learns nearly as well"
                          + ("; < 1 point" if task == "image" else "")
                          + f" (p = {fmt(head['p_vs_uniform']['sparse'])})",
                          None if task != "image" else bool(sparse_gap < 1.0)))
        sign_p = head["p_vs_uniform"]["sign(W0)"]
        # A verdict only where the difference is significant: with few seeds the direction alone is noise.
        rows.append(Claim(f"{task}: sign(W0) − uniform B ({what})", sign_gap, "< 0 (signs matter)",
                          "Liao et al. 2016: the more sign-concordant the feedback, the better (their V follows "
                          f"sign(W); ours is fixed at W0's); < 0 at Welch p < 0.05 (p = {fmt(sign_p)})",
                          bool(sign_gap < 0) if math.isfinite(sign_p) and sign_p < 0.05 else None))
        fa_gap = head["mean"]["uniform"] - head["bp"]
        if task == "linear":
            claim, criterion, verdict = ("≤ 0 (1e-12 vs 1e-11)", "Lillicrap 2016 Fig. 1d: FA at or below BP "
                                         "throughout; ≤ 0", bool(fa_gap <= 0))
        elif task == "nonlinear":
            claim, criterion, verdict = ("≈ 0 (BP 1.05e-3, FA 0.9e-3)", "Lillicrap 2016 Fig. 2d, 4-layer student, "
                                         "after 4e5 examples; here after "
                                         f"{results['settings']['nonlinear']['examples']}; no verdict", None)
        else:
            claim, criterion, verdict = ("+3.9 points (LeNet)", "BioTorch's published Fashion-MNIST 13.06 vs 9.20; "
                                         "another network: no verdict", None)
        rows.append(Claim(f"{task}: uniform FA − backprop ({what})", fa_gap, claim, criterion, verdict))
    return rows


def _fixed_b_finding(results: dict[str, Any]) -> str:
    parts = []
    for task, head in results["headline"].items():
        if not head["ranked"]:
            parts.append(f"{task}: every fixed kind diverged")
            continue
        best, worst = head["ranked"][0], head["ranked"][-1]
        spread = head["mean"][worst] - head["mean"][best]
        significant = [k for k, p in head["p_vs_uniform"].items() if math.isfinite(p) and p < 0.05]
        unit = "points of test error" if task == "image" else "decades of final NSE"
        diverged = f" ({', '.join(head['diverged'])} diverged in some runs)" if head["diverged"] else ""
        parts.append(f"{task}: best {best}, worst {worst} ({fmt(spread)} {unit} apart){diverged}; kinds that differ "
                     f"from uniform at p < 0.05: {', '.join(significant) or 'none'}; best rms ×"
                     f"{fmt(head['best_scale'])}")
    return ("**Finding.** " + "; ".join(parts) + ". With as few seeds as quick mode runs, a difference without "
            "p < 0.05 is not evidence of a difference.")


# ------------------------------------------------------------------------------------------------ 2. nonlinear

# (label, nonlinearity, saturation as a multiple of the arriving error's rms at init; None: 1, unused)
PATHS: tuple[tuple[str, str | None, float | None], ...] = (
    ("linear", None, None), ("tanh", "tanh", 1.0), ("hardtanh", "hardtanh", 1.0), ("softsign", "softsign", 1.0),
    ("relu", "relu", None), ("sign", "sign", 1.0))
SATURATION_SWEEP = (0.01, 0.1, 10.0)  # extra tanh saturations on fa, × the arriving error's rms


def _path_conditions() -> list[tuple[str, str, str | None, float | None]]:
    """(name, rule, nonlinearity, saturation multiple) of every nonlinear-feedback condition."""
    found = [(f"{rule} {label}", rule, f, k) for rule in ("fa", "bp") for label, f, k in PATHS]
    found += [(f"fa tanh s×{k:g}", "fa", "tanh", k) for k in SATURATION_SWEEP]
    return found


def _with_path(model: nn.Module, rule: str, nonlinearity: str | None, saturation: float | None, *,
               seed: int, reference: float, rms: float | None) -> nn.Module:
    """``model`` converted to backprop or fa (uniform B at rms ``rms``) with the feedback pathway ``nonlinearity``
    bending at ``saturation · reference``."""
    options: dict[str, Any] = {"feedback_nonlinearity": nonlinearity}
    if saturation is not None:
        options["feedback_saturation"] = saturation * reference
    if rule == "bp":
        return fbalign.convert(model, "backprop", inplace=True, **options)
    return fixed_feedback(model, "uniform", seed=stream_seed(FEEDBACK, seed), rms=rms, **options)


def path_model(*, data: TensorDataset, seed: int, task: str, rule: str, nonlinearity: str | None,
               saturation: float | None, reference: float, rms: float | None = None,
               hidden: Sequence[int] = ()) -> nn.Module:
    """The student of ``task`` (the nonlinear teacher's, or an image MLP of ``hidden`` tanh layers) with the
    feedback pathway of :func:`_with_path`."""
    model = image_student(data, hidden, "tanh", seed) if task == "image" else teacher_student(task, seed)
    return _with_path(model, rule, nonlinearity, saturation, seed=seed, reference=reference, rms=rms)


def _step_time_ratios(ctx: Context, models: dict[str, nn.Module], x: Tensor, y: Tensor, *, rounds: int,
                      steps: int) -> dict[str, list[float]]:
    """Seconds per training step (forward, cross-entropy, backward, SGD step) of every model, ``rounds`` rounds
    of ``steps`` steps each in a fresh random order (so drift in machine speed hits all alike); one list per
    model, one entry per round."""
    step_of = {}
    for name, model in models.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        step_of[name] = step
        for _ in range(3):  # warm-up: first calls allocate
            step()
    times: dict[str, list[float]] = {name: [] for name in step_of}
    order, shuffle = list(step_of), random.Random(0)
    with ctx.bar(total=rounds, desc="step times", unit="round") as bar:
        for _ in range(rounds):
            shuffle.shuffle(order)
            for name in order:
                start = time.perf_counter()
                for _ in range(steps):
                    step_of[name]()
                times[name].append((time.perf_counter() - start) / steps)
            bar.update()
    return times


def run_nonlinear_feedback(ctx: Context) -> dict[str, Any]:
    """A nonlinear feedback pathway on fa and backprop: the final NSE / error against the linear pathway, on the
    nonlinear teacher and the image task, and the step time against the linear pathway, side by side."""
    size = sizes(NONLINEAR_SCALE, ctx)
    seeds, batch = size["seeds"], size["teacher_batch"]
    conditions = _path_conditions()
    data_teacher = teacher_task("nonlinear", size["examples"])
    data_image = image_data(ctx, size)

    def reference(task: str, rule: str) -> float:
        """The rms of the error arriving below the layers at init (seed 0, linear path, one training batch)."""
        if task == "teacher":
            model = _with_path(teacher_student("nonlinear", 0), rule, None, None, seed=0, reference=1.0,
                               rms=LILLICRAP_RMS)
            return arriving_error_rms(model, half_sse, data_teacher.train_x[:batch], data_teacher.train_y[:batch])
        model = _with_path(image_student(data_image, size["image_hidden"], "tanh", 0), rule, None, None, seed=0,
                           reference=1.0, rms=None)
        return arriving_error_rms(model, F.cross_entropy, data_image.train_x[:IMAGE_BATCH],
                                  data_image.train_y[:IMAGE_BATCH])

    references = {task: {rule: reference(task, rule) for rule in ("fa", "bp")} for task in ("teacher", "image")}
    results: dict[str, Any] = {"settings": {
        "seeds": seeds, "teacher": {"examples": size["examples"], "prefix": size["prefix"], "batch": batch,
                                    "rms": LILLICRAP_RMS},
        "image": {**image_settings(size, data_image), "hidden": size["image_hidden"], "activation": "tanh"},
        "saturation_reference": references, "conditions": [list(c) for c in conditions],
        "timing": {"rounds": size["timing_rounds"], "steps": size["timing_steps"], "batch": IMAGE_BATCH,
                   "threads": torch.get_num_threads(), "device": "cpu"}}}
    results["teacher"] = run_conditions(ctx, size, {name: {
        "task": "nonlinear", "examples": size["examples"], "prefix": size["prefix"],
        "make": functools.partial(path_model, task="nonlinear", rule=rule, nonlinearity=f, saturation=k,
                                  reference=references["teacher"][rule], rms=LILLICRAP_RMS)}
        for name, rule, f, k in conditions})
    results["image"] = run_conditions(ctx, size, {name: {
        "task": "image", "folder": ("nonlinear-feedback", name.replace(" ", "-").replace("×", "x")),
        "make": functools.partial(path_model, task="image", rule=rule, nonlinearity=f, saturation=k,
                                  reference=references["image"][rule], hidden=size["image_hidden"])}
        for name, rule, f, k in conditions}, on_device=True)
    # Step time, side by side: every condition's image MLP on one batch, on the CPU.
    models = {name: _with_path(image_student(data_image, size["image_hidden"], "tanh", 0), rule, f, k, seed=0,
                               reference=references["image"][rule], rms=None)
              for name, rule, f, k in conditions}
    x, y = data_image.train_x[:IMAGE_BATCH], data_image.train_y[:IMAGE_BATCH]
    times = _step_time_ratios(ctx, models, x, y, rounds=size["timing_rounds"], steps=size["timing_steps"])
    results["step_seconds"] = {name: float(np.median(t)) for name, t in times.items()}
    results["step_ratio"] = {name: float(np.median(np.asarray(times[name]) / np.asarray(times[f"{rule} linear"])))
                             for name, rule, _, _ in conditions}
    results["fa_over_bp_linear"] = float(np.median(np.asarray(times["fa linear"]) / np.asarray(times["bp linear"])))
    results["cost"] = _nonlinear_costs(results, conditions)
    plot_nonlinear_feedback(results, ctx)
    return results


def _nonlinear_costs(results: dict[str, Any], conditions: list[tuple[str, str, str | None, float | None]]
                     ) -> dict[str, Any]:
    """Per condition: its final metric over the same rule's linear path (NSE ratio on the teacher task, error
    difference in points on the image task) and Welch p-values against the linear path."""
    cost: dict[str, Any] = {}
    for name, rule, _, _ in conditions:
        teacher, linear_t = results["teacher"][name], results["teacher"][f"{rule} linear"]
        image, linear_i = results["image"][name], results["image"][f"{rule} linear"]
        log_t, log_lin = _final_values("teacher", teacher), _final_values("teacher", linear_t)
        cost[name] = {
            "teacher_nse_ratio": 10 ** (mean_sd(log_t)[0] - mean_sd(log_lin)[0]),
            "teacher_p": welch_p(log_t, log_lin),
            "teacher_diverged": sum(1 for v in teacher["final"] if not math.isfinite(v)),
            "image_error_difference": mean_sd(image["final"])[0] - mean_sd(linear_i["final"])[0],
            "image_p": welch_p(image["final"], linear_i["final"]),
            "image_diverged": sum(1 for v in image["final"] if not math.isfinite(v)),
        }
    return cost


def plot_nonlinear_feedback(results: dict[str, Any], ctx: Context) -> None:
    figure, axes = _new_figure(14.0, 4.4, 3)
    # x positions: every pathway for both rules, then fa's tanh at the other saturations
    labels = [label for label, _, _ in PATHS] + [f"tanh s×{k:g}" for k in SATURATION_SWEEP]
    offsets = {"fa": -0.15, "bp": 0.15}
    for name, rule, _, _ in results["settings"]["conditions"]:
        label = name.partition(" ")[2]
        i, color = labels.index(label) + offsets[rule], RULE_COLORS[rule]
        first = label == "linear"
        for ax, values in ((axes[0], _final_values("teacher", results["teacher"][name])),
                           (axes[1], results["image"][name]["final"])):
            mean, sd = mean_sd(values)
            ax.errorbar([i], [mean], yerr=[sd], fmt="o", color=color, capsize=3,
                        label=RULE_LABELS[rule] if first else None)
        axes[2].bar(i, results["step_ratio"][name], width=0.3, color=color, label=RULE_LABELS[rule] if first else None)
    for ax in axes:
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlabel("feedback pathway")
    axes[0].set(ylabel="log10 final test NSE", title="nonlinear teacher 30-20-10-10")
    axes[1].set(ylabel="final test error (%)", title=f"{results['settings']['image']['data']} MLP")
    axes[2].axhline(1.0, color="0.5", linestyle="--", linewidth=0.8)
    axes[2].set(ylabel="step time / the rule's linear path", title="step time (image MLP, batch 128, CPU)")
    for ax, letter in zip(axes, "abc"):
        ax.legend(fontsize="x-small")
        _panel_letter(ax, letter)
    results["figure"] = ctx.save_figure(figure, "nonlinear_feedback.png")


def report_nonlinear_feedback(results: dict[str, Any], section: Report, ctx: Context) -> None:
    s = results["settings"]
    ref = s["saturation_reference"]
    section.text(
        "**Question.** Does learning survive a nonlinear feedback pathway (each error arriving below a layer "
        "becomes s·f(e/s)), and what does it cost in accuracy and in time? fa (uniform B) and backprop (the "
        "control: symmetric weights, nonlinear pathway), each with the pathways tanh, hardtanh, softsign, relu and "
        "sign; s is the rms of the error arriving below the layers at initialization (seed 0, one training batch, "
        "linear path: teacher fa "
        f"{fmt(ref['teacher']['fa'])}, bp {fmt(ref['teacher']['bp'])}; image fa {fmt(ref['image']['fa'])}, bp "
        f"{fmt(ref['image']['bp'])}), so the typical error at the start sits at the bend; fa's tanh is also run with "
        f"s ×{', ×'.join(f'{k:g}' for k in SATURATION_SWEEP)}. sign passes ±s; relu ignores s.")
    section.figure(results["figure"], "Nonlinear feedback pathways. (a) nonlinear teacher, (b) image task: final "
                   f"score, mean ± sd over {s['seeds']} seeds (right: fa's tanh at other saturations s); (c) step "
                   "time over the same rule's linear path, median over interleaved rounds.")
    rows = []
    for name, c in results["cost"].items():
        rows.append([name, 10 ** mean_sd(_final_values("teacher", results["teacher"][name]))[0],
                     c["teacher_nse_ratio"], c["teacher_p"], pm(results["image"][name]["final"]),
                     c["image_error_difference"], c["image_p"], results["step_ratio"][name],
                     f"{fmt(results['teacher'][name]['eta'])} / {fmt(results['image'][name]['lr'])}"])
    section.table(["condition", "teacher final NSE (geometric mean)", "NSE ÷ linear path", "p (log NSE)",
                   "image test error (%)", "− linear path (points)", "p", "step time ÷ linear path",
                   "η teacher / lr image"], rows)
    section.text(f"Step times: {s['timing']['rounds']} rounds × {s['timing']['steps']} steps of the image MLP "
                 f"({s['image']['hidden']}, batch {s['timing']['batch']}, {s['timing']['threads']} CPU thread(s)), "
                 "every condition in a fresh random order each round; fa's linear path takes "
                 f"{fmt(results['fa_over_bp_linear'])}× backprop's step. Teacher: {s['teacher']['examples']} examples "
                 f"in mini-batches of {s['teacher']['batch']}. " + _lr_rule_text(s["image"]) + " "
                 + _teacher_rule_text(f"{s['teacher']['prefix']} examples",
                                      results["teacher"]["fa linear"]["tuning"]["grid"]))
    section.claims(claims_nonlinear_feedback(results))
    section.text(_nonlinear_finding(results))


def claims_nonlinear_feedback(results: dict[str, Any]) -> list[Claim]:
    """No anchored paper makes a claim here: one row saying so, with the pathways that learned."""
    learned = [n for n, c in results["cost"].items() if "linear" not in n and not _nonlinear_failed(c)]
    return [Claim("nonlinear feedback pathways on FA or BP that learn (within 10× the linear path's NSE and 5 "
                  "points of its error)", ", ".join(learned) or "none", "no anchored claim",
                  "the anchored papers (Lillicrap 2016, Nøkland 2016, Akrout 2019, Liao 2016) report no experiment "
                  "with a nonlinear feedback pathway", None)]


def _nonlinear_failed(cost: dict[str, Any]) -> bool:
    return bool(cost["teacher_diverged"] + cost["image_diverged"] or cost["teacher_nse_ratio"] > 10
                or cost["image_error_difference"] > 5)


def _nonlinear_finding(results: dict[str, Any]) -> str:
    cost = results["cost"]
    learned, failed = [], []
    for name, c in cost.items():
        if "linear" in name:
            continue
        (failed if _nonlinear_failed(c) else learned).append(name)
    slowest = max((n for n in results["step_ratio"] if "linear" not in n), key=lambda n: results["step_ratio"][n])
    return ("**Finding.** Within 10× the linear path's NSE and 5 points of its test error (and no divergence): "
            f"{', '.join(learned) or 'none'}; beyond that: {', '.join(failed) or 'none'}. The costliest pathway in "
            f"time is {slowest} at {fmt(results['step_ratio'][slowest])}× its rule's linear path.")


# ------------------------------------------------------------------------------------------------ 3. plastic

PLASTIC_RULES = ("bp", "fa", "kp", "wm")
MOMENTUM_CONTROLS = ("bp", "fa", "wm")  # also trained with the other experiments' momentum 0.9 (and their grid)
AKROUT_MNIST_ACCURACY = {"bp": 98.50, "fa": 97.80, "wm": 98.49, "kp": 98.45}


def plastic_model(data: TensorDataset, hidden: Sequence[int], rule: str, seed: int) -> nn.Module:
    """Akrout et al.'s network (sigmoid hidden units) for ``data``, converted to ``rule``: B of fa, kp and wm
    starts as fbalign's default uniform draw (rms of torch's init of W)."""
    model = image_student(data, hidden, "sigmoid", seed)
    if rule == "bp":
        return fbalign.convert(model, "backprop", inplace=True)
    options = {"decay": KP_DECAY} if rule == "kp" else {}
    return fbalign.convert(model, rule, inplace=True, seed=stream_seed(FEEDBACK, seed), **options)


def _angle_series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def run_plastic(ctx: Context) -> dict[str, Any]:
    """bp / fa / kp / wm on the image task: test error per epoch and ∡(B, Wᵀ) per layer over training."""
    size = sizes(PLASTIC_SCALE, ctx)
    data = image_data(ctx, size)
    results: dict[str, Any] = {"settings": {**image_settings(size, data, size["lr_grid"], PLASTIC_MOMENTUM),
                                            "hidden": size["hidden"],
                                            "activation": "sigmoid", "align_every": size["align_every"],
                                            "kp_decay": KP_DECAY, "mirror_lr": MIRROR_LR,
                                            "mirror_batch": MIRROR_BATCH}}
    def condition(rule: str, momentum: float, grid: Sequence[float], folder: str) -> dict[str, Any]:
        return {"task": "image", "folder": ("plastic", folder), "align_every": size["align_every"], "grid": grid,
                "momentum": momentum, "make": functools.partial(plastic_model, hidden=size["hidden"], rule=rule)}

    conditions = {rule: condition(rule, PLASTIC_MOMENTUM, size["lr_grid"], rule) for rule in PLASTIC_RULES}
    conditions.update({f"{rule} momentum": condition(rule, IMAGE_MOMENTUM, size["controls_lr_grid"], f"{rule}-momentum")
                       for rule in MOMENTUM_CONTROLS})
    found = run_conditions(ctx, size, conditions, on_device=True)
    for c in found.values():
        c["records"] = _keep_keys(c["records"], ("angle_b_wt/", "angle_dh_bp/", "norm_ratio_b_w/"))
    results["rules"] = {rule: found[rule] for rule in PLASTIC_RULES}
    results["momentum_controls"] = {rule: found[f"{rule} momentum"] for rule in MOMENTUM_CONTROLS}
    results["settings"]["controls"] = {"momentum": IMAGE_MOMENTUM, "lr_grid": list(size["controls_lr_grid"])}
    layers = [name for name, _ in fbalign.feedback_layers(plastic_model(data, size["hidden"], "fa", 0))]
    results["layers"] = layers
    results["alignment"] = _plastic_alignment(results["rules"], layers)
    results["controls_alignment"] = _plastic_alignment(results["momentum_controls"], layers)
    results["speed"] = _plastic_speed(results)
    plot_plastic(results, ctx)
    return results


def _keep_keys(runs: list[list[dict[str, Any]]], prefixes: tuple[str, ...]) -> list[list[dict[str, Any]]]:
    """Every run's alignment records with only ``step`` and the keys starting with ``prefixes`` (results.json
    keeps what the report uses; the run directories keep everything)."""
    return [[{k: v for k, v in r.items() if k == "step" or k.startswith(prefixes)} for r in records]
            for records in runs]


def _plastic_alignment(conditions: dict[str, Any], layers: list[str]) -> dict[str, Any]:
    """Per rule and layer: ∡(B, Wᵀ) and ‖B‖/‖W‖ at the start and the end of training and ∡(Δh, Δh_BP) at the end
    (mean, sd over seeds), and the first step at which ∡(B, Wᵀ) fell below 45° (per seed; None: never)."""
    found: dict[str, Any] = {}
    for rule, c in conditions.items():
        if rule == "bp":
            continue
        per_layer = {}
        for layer in layers:
            starts, ends, below, norms, updates = [], [], [], [], []
            for records in c["records"]:
                steps, angles = _angle_series(records, f"angle_b_wt/{layer}")
                if not angles:
                    continue
                starts.append(angles[0])
                ends.append(angles[-1])
                below.append(next((s for s, a in zip(steps, angles) if a < 45.0), None))
                norms.append(records[-1].get(f"norm_ratio_b_w/{layer}", math.nan))
                updates.append(records[-1].get(f"angle_dh_bp/{layer}", math.nan))
            per_layer[layer] = {"start": mean_sd(starts), "end": mean_sd(ends), "steps_to_45": below,
                                "norm_ratio_end": mean_sd(norms), "angle_dh_bp_end": mean_sd(updates)}
        found[rule] = per_layer
    return found


def _plastic_speed(results: dict[str, Any]) -> dict[str, Any]:
    """Epochs each rule needs for its mean test error to reach fa's final mean test error (None: never), and
    every rule's final error gap to backprop."""
    target = mean_sd(results["rules"]["fa"]["final"])[0]
    bp = mean_sd(results["rules"]["bp"]["final"])[0]
    found = {}
    for rule, c in results["rules"].items():
        curve = c["curve"]
        reach = next((e for e, m in zip(curve["epochs"], curve["mean"]) if m <= target), None)
        found[rule] = {"epochs_to_fa_final": reach, "gap_to_bp": mean_sd(c["final"])[0] - bp}
    return {"fa_final": target, "by_rule": found}


def plot_plastic(results: dict[str, Any], ctx: Context) -> None:
    layers = results["layers"]
    figure, axes = _new_figure(4.4 * (1 + len(layers)), 4.0, 1 + len(layers))
    # every condition: (rule, its results, line style, label); the momentum controls dashed
    lines = [(rule, c, "-", RULE_LABELS[rule]) for rule, c in results["rules"].items()]
    lines += [(rule, c, "--", f"{RULE_LABELS[rule]}, momentum") for rule, c in results["momentum_controls"].items()]
    lines.sort(key=lambda line: line[0] == "kp")  # kp last: backprop's curve lies under it
    for rule, c, style, label in lines:
        curve = c["curve"]
        mean, sd = np.asarray(curve["mean"]), np.asarray(curve["sd"])
        axes[0].plot(curve["epochs"], mean, style, color=RULE_COLORS[rule], label=label)
        if style == "-":
            axes[0].fill_between(curve["epochs"], mean - sd, mean + sd, color=RULE_COLORS[rule], alpha=0.2,
                                 linewidth=0)
    axes[0].set(xlabel="epoch", ylabel="test error (%)", title=f"{results['settings']['data']}, "
                f"{results['settings']['hidden']} sigmoid")
    axes[0].legend(fontsize="x-small")
    _panel_letter(axes[0], "a")
    for i, layer in enumerate(layers):
        ax = axes[1 + i]
        for rule, c, style, label in lines:
            if rule == "bp":
                continue
            for j, records in enumerate(c["records"]):
                steps, angles = _angle_series(records, f"angle_b_wt/{layer}")
                ax.plot(steps, angles, style, color=RULE_COLORS[rule], linewidth=1.0, alpha=0.8,
                        label=label if j == 0 else None)
        ax.set(xlabel="training step", ylabel="∡(B, Wᵀ) (degrees)", ylim=(0, 100),
               title=f"layer {layer}" + (" (input layer: its B is unused)" if i == 0 else ""))
        ax.axhline(90.0, color="0.5", linestyle=":", linewidth=0.8)
        ax.legend(fontsize="x-small")
        _panel_letter(ax, "bcdefg"[i])
    results["figure"] = ctx.save_figure(figure, "plastic.png")


def report_plastic(results: dict[str, Any], section: Report, ctx: Context) -> None:
    s = results["settings"]
    section.text(
        "**Question.** Does plastic feedback (Kolen–Pollack: B gets W's update and the mismatch decays; weight "
        "mirrors: B learns W from noise) learn faster than a fixed B, and how fast does B come to align with Wᵀ? "
        f"Akrout et al.'s network: one hidden layer of {s['hidden'][0]} sigmoid units. kp: λ = {fmt(s['kp_decay'])} "
        "on the mismatch only (B − W shrinks by 1 − lr·λ per step; W is not decayed, so every rule has the same "
        f"optimizer); wm: one mirror step (`fbalign.mirror`, lr {fmt(s['mirror_lr'])}, {s['mirror_batch']} noise "
        "samples) after every training step, as in Akrout et al.'s code, but without their initial mirror phase, so "
        f"that the alignment is seen from a random start. ∡(B, Wᵀ) is recorded every {s['align_every']} steps "
        "(`log.alignment` of fbalign.train). The optimizer is Akrout et al.'s plain SGD; backprop, fa and wm are "
        f"also run with the other experiments' momentum {fmt(s['controls']['momentum'])}, under which W moves much "
        "further per step while wm's mirror still takes one step per training step (the control table below).")
    section.figure(results["figure"], f"Plastic feedback. (a) test error per epoch, mean ± sd over {s['seeds']} "
                   "seeds (dashed: the momentum controls, means only); (b, c) ∡(B, Wᵀ) per layer over training, one "
                   "line per seed.")
    bp = mean_sd(results["rules"]["bp"]["final"])[0]
    rows = [[RULE_LABELS[rule], *_plastic_row(c, results["alignment"].get(rule, {}), bp),
             results["speed"]["by_rule"][rule]["epochs_to_fa_final"]] for rule, c in results["rules"].items()]
    section.table(["rule", "final test error (%)", "at best validation epoch", "− backprop (points)",
                   "∡(B, Wᵀ) start → end", "‖B‖/‖W‖ at the end", "∡(Δh, Δh_BP) at the end", "learning rate",
                   "epochs to fa's final error"], rows)
    section.text(_lr_rule_text(s))
    section.text(f"**Control: momentum {fmt(s['controls']['momentum'])}** (learning rates tuned on "
                 f"{', '.join(map(fmt, s['controls']['lr_grid']))}; '− backprop' is against backprop with momentum):")
    bp_momentum = mean_sd(results["momentum_controls"]["bp"]["final"])[0]
    section.table(["rule", "final test error (%)", "at best validation epoch", "− backprop (points)",
                   "∡(B, Wᵀ) start → end", "‖B‖/‖W‖ at the end", "∡(Δh, Δh_BP) at the end", "learning rate"],
                  [[f"{RULE_LABELS[rule]}, momentum",
                    *_plastic_row(c, results["controls_alignment"].get(rule, {}), bp_momentum)]
                   for rule, c in results["momentum_controls"].items()])
    section.claims(claims_plastic(results))
    section.text(_plastic_finding(results))


def claims_plastic(results: dict[str, Any]) -> list[Claim]:
    """Akrout et al. 2019: KP and WM close at least half of FA's gap to backprop, and their B ends better aligned
    with Wᵀ than fa's, in every layer."""
    akrout = {rule: 100.0 - acc for rule, acc in AKROUT_MNIST_ACCURACY.items()}
    gap = {rule: results["speed"]["by_rule"][rule]["gap_to_bp"] for rule in PLASTIC_RULES}
    rows = [Claim("fa: final test error − backprop (points)", gap["fa"], f"{akrout['fa'] - akrout['bp']:+.2f} (MNIST)",
                  "FA's gap (the reference)", None)]
    for rule in ("kp", "wm"):
        p = welch_p(results["rules"][rule]["final"], results["rules"]["fa"]["final"])
        rows.append(Claim(f"{rule}: final test error − backprop (points)", gap[rule],
                          f"{akrout[rule] - akrout['bp']:+.2f} (MNIST)", "Akrout et al. 2019: KP and WM close FA's "
                          f"gap to BP; at least half of it closed (p vs fa = {fmt(p)})",
                          bool(gap[rule] < gap["fa"] / 2)))
    fa_ends = [a["end"][0] for a in results["alignment"]["fa"].values()]
    for rule in ("kp", "wm"):
        ends = [a["end"][0] for a in results["alignment"][rule].values()]
        rows.append(Claim(f"{rule}: ∡(B, Wᵀ) at the end, per layer (°)", ", ".join(fmt(e) for e in ends), "small",
                          f"every layer below fa's smallest (fa's: {', '.join(fmt(e) for e in fa_ends)})",
                          bool(max(ends) < min(fa_ends))))
    return rows


def _plastic_row(c: dict[str, Any], align: dict[str, Any], bp: float) -> list[Any]:
    """Table cells of one plastic condition: errors, gap to ``bp``, per-layer angles and norm ratios, its rate."""
    angles = "; ".join(f"{layer}: {fmt(a['start'][0])}° → {fmt(a['end'][0])}°" for layer, a in align.items())
    norms = "; ".join(f"{layer}: {fmt(a['norm_ratio_end'][0])}" for layer, a in align.items())
    updates = "; ".join(f"{layer}: {fmt(a['angle_dh_bp_end'][0])}°" for layer, a in align.items()
                        if math.isfinite(a["angle_dh_bp_end"][0]))
    return [pm(c["final"]), pm(c["best"]), mean_sd(c["final"])[0] - bp, angles or "–", norms or "–",
            updates or "–", c["lr"]]


def _plastic_finding(results: dict[str, Any]) -> str:
    by_rule = results["speed"]["by_rule"]
    p = {rule: welch_p(results["rules"][rule]["final"], results["rules"]["fa"]["final"]) for rule in ("kp", "wm")}
    faster = [r for r in ("kp", "wm") if by_rule[r]["gap_to_bp"] < by_rule["fa"]["gap_to_bp"]]
    return (f"**Finding.** fa ends {fmt(by_rule['fa']['gap_to_bp'])} points behind backprop, kp "
            f"{fmt(by_rule['kp']['gap_to_bp'])} (p vs fa {fmt(p['kp'])}), wm {fmt(by_rule['wm']['gap_to_bp'])} "
            f"(p vs fa {fmt(p['wm'])}); better than fixed B: {', '.join(faster) or 'neither'}. fa's final error "
            f"({fmt(results['speed']['fa_final'])}%) is reached by backprop after "
            f"{fmt(by_rule['bp']['epochs_to_fa_final'])} epoch(s), kp after "
            f"{fmt(by_rule['kp']['epochs_to_fa_final'])}, wm after {fmt(by_rule['wm']['epochs_to_fa_final'])} "
            "(– : not within the budget)." + _control_finding(results))


def _control_finding(results: dict[str, Any]) -> str:
    controls, layer = results["momentum_controls"], results["layers"][-1]
    bp = mean_sd(controls["bp"]["final"])[0]
    fa, wm = (mean_sd(controls[rule]["final"])[0] - bp for rule in ("fa", "wm"))
    s = results["settings"]
    tuning_steps = s["tune_epochs"] * (s["train_examples"] // s["batch_size"])
    aligned = [step for step in results["alignment"]["wm"][layer]["steps_to_45"] if step is not None]
    late = not aligned or float(np.mean(aligned)) > tuning_steps / 2
    return (f" With momentum {fmt(s['controls']['momentum'])}, fa ends {fmt(fa)} and wm {fmt(wm)} points behind "
            f"backprop (wm vs fa: p = {fmt(welch_p(controls['wm']['final'], controls['fa']['final']))}). The "
            f"learning rates were chosen after {tuning_steps} steps; wm's ∡(B, Wᵀ) at layer {layer} fell below 45° "
            f"after {fmt(float(np.mean(aligned))) if aligned else 'more than the run'} steps (plain SGD, mean over "
            "seeds)" + (", so for most of its tuning run wm's B was not yet aligned and its rate was chosen while it "
                        "learned much as fa does." if late else "."))


# ------------------------------------------------------------------------------------------------ 4. depth

def depth_model(data: TensorDataset, width: int, depth: int, rule: str, seed: int) -> nn.Module:
    """A tanh MLP with ``depth`` hidden layers of ``width`` units for ``data``, converted to ``rule`` (bp, fa,
    dfa or kp; B at fbalign's default scale; kp with ``KP_DECAY`` on the mismatch)."""
    model = image_student(data, [width] * depth, "tanh", seed)
    if rule == "bp":
        return fbalign.convert(model, "backprop", inplace=True)
    options = {"decay": KP_DECAY} if rule == "kp" else {}
    return fbalign.convert(model, rule, inplace=True, seed=stream_seed(FEEDBACK, seed), **options)


def run_depth(ctx: Context) -> dict[str, Any]:
    """BP / FA / DFA / KP, test error against the number of hidden layers, on the image task."""
    size = sizes(DEPTH_SCALE, ctx)
    data = image_data(ctx, size)
    depths, rules = size["depths"], size["rules"]
    results: dict[str, Any] = {"settings": {**image_settings(size, data), "width": size["width"], "depths": depths,
                                            "rules": rules, "activation": "tanh", "align_every": size["align_every"],
                                            "kp_decay": KP_DECAY}}
    # deepest first: the longest conditions start first, so the workers finish together
    results["runs"] = run_conditions(ctx, size, {f"{rule}-{depth}": {
        "task": "image", "folder": ("depth", f"{rule}-{depth}"), "align_every": size["align_every"],
        "make": functools.partial(depth_model, width=size["width"], depth=depth, rule=rule)}
        for depth in sorted(depths)[::-1] for rule in rules}, on_device=True)
    results["summary"] = _depth_summary(results)
    for c in results["runs"].values():
        c["records"] = _keep_keys(c["records"], ("angle_dh_bp/",))
    plot_depth(results, ctx)
    return results


def _depth_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Per rule and depth: final test and training error (mean, sd) and the angle ∡(Δh, Δh_BP) at the input of
    the second layer (the lowest hidden layer's error) over the last quarter of training (mean over seeds)."""
    summary: dict[str, Any] = {}
    s = results["settings"]
    for rule in s["rules"]:
        summary[rule] = {}
        for depth in s["depths"]:
            c = results["runs"][f"{rule}-{depth}"]
            angles = []
            for records in c["records"]:
                keys = sorted({k for r in records for k in r if k.startswith("angle_dh_bp/")},
                              key=lambda k: int(k.split("/")[1]) if k.split("/")[1].isdigit() else 0)
                if not keys:
                    continue
                _, values = _angle_series(records, keys[0])
                if values:
                    angles.append(float(np.mean(values[-max(1, len(values) // 4):])))
            summary[rule][str(depth)] = {"test": mean_sd(c["final"]), "train": mean_sd(c["final_train"]),
                                         "angle_lowest": mean_sd(angles), "lr": c["lr"],
                                         "diverged": sum(1 for v in c["final"] if not math.isfinite(v))}
    return summary


def plot_depth(results: dict[str, Any], ctx: Context) -> None:
    s = results["settings"]
    figure, axes = _new_figure(13.0, 3.8, 3)
    for rule in s["rules"]:
        rows = [results["summary"][rule][str(d)] for d in s["depths"]]
        for ax, key in zip(axes, ("test", "train", "angle_lowest")):
            mean = np.asarray([r[key][0] for r in rows])
            sd = np.asarray([r[key][1] for r in rows])
            ax.errorbar(s["depths"], mean, yerr=sd, fmt="o-", color=RULE_COLORS[rule], capsize=3,
                        label=RULE_LABELS[rule])
    axes[0].set(ylabel="final test error (%)", title=f"{s['data']}, width {s['width']}, tanh")
    axes[1].set(ylabel="final training error (%)", title="training error (epoch mean)")
    axes[2].set(ylabel="∡(Δh, Δh_BP), lowest hidden layer (°)", ylim=(0, 100),
                title="alignment, last quarter of training")
    axes[2].axhline(90.0, color="0.5", linestyle="--", linewidth=0.8)
    for ax, letter in zip(axes, "abc"):
        ax.set(xlabel="hidden layers")
        ax.set_xticks(s["depths"])
        ax.legend(fontsize="small")
        _panel_letter(ax, letter)
    results["figure"] = ctx.save_figure(figure, "depth.png")


def report_depth(results: dict[str, Any], section: Report, ctx: Context) -> None:
    s = results["settings"]
    section.text(
        f"**Question.** Does FA keep up with backprop as the network gets deeper ({', '.join(map(str, s['depths']))} "
        f"hidden layers of {s['width']} tanh units), and where does DFA stand? Also Kolen–Pollack (λ = "
        f"{fmt(s['kp_decay'])} on the mismatch). Every B at fbalign's default scale (torch's init of W). "
        "Data: the image task (not the nonlinear teacher, whose 10-unit layers leave little to gain from depth).")
    section.figure(results["figure"], f"Depth. (a) final test error, (b) final training error, (c) ∡(Δh, Δh_BP) at "
                   "the input of the second layer (the error the lowest hidden layer learns from), averaged over the "
                   f"last quarter of the records; mean ± sd over {s['seeds']} seeds.")
    header = ["rule", *(f"{d} hidden: test error (%)" for d in s["depths"]), "learning rates", "∡ lowest layer (°)"]
    rows = []
    for rule in s["rules"]:
        by_depth = results["summary"][rule]
        rows.append([RULE_LABELS[rule], *(f"{fmt(by_depth[str(d)]['test'][0])} ± {fmt(by_depth[str(d)]['test'][1], 2)}"
                                          + (f" ({by_depth[str(d)]['diverged']} diverged)"
                                             if by_depth[str(d)]["diverged"] else "") for d in s["depths"]),
                     ", ".join(fmt(by_depth[str(d)]["lr"]) for d in s["depths"]),
                     ", ".join(fmt(by_depth[str(d)]["angle_lowest"][0]) for d in s["depths"])])
    section.table(header, rows)
    section.text(_lr_rule_text(s))
    section.claims(claims_depth(results))
    section.text(_depth_finding(results))


def claims_depth(results: dict[str, Any]) -> list[Claim]:
    """How each rule's gap to backprop changes with depth (the published gaps are at one depth on another
    network: no verdict), and whether depth helps backprop and FA (Lillicrap 2016, Fig. 2d: on another task)."""
    s, summary = results["settings"], results["summary"]
    shallow, deep = str(s["depths"][0]), str(s["depths"][-1])

    def gap(rule: str, depth: str) -> float:
        return summary[rule][depth]["test"][0] - summary["bp"][depth]["test"][0]

    rows = [Claim(f"{rule} − backprop at {shallow} → {deep} hidden layers (points)",
                  f"{fmt(gap(rule, shallow))} → {fmt(gap(rule, deep))}",
                  {"fa": "+3.86 (BioTorch LeNet, FMNIST)", "dfa": "+3.61 (BioTorch LeNet, FMNIST)"}.get(rule, "–"),
                  "the gap at one depth on another network; here: how it changes with depth", None)
            for rule in s["rules"] if rule != "bp"]
    for rule in [r for r in s["rules"] if r in ("bp", "fa")]:
        change = summary[rule][deep]["test"][0] - summary[rule][shallow]["test"][0]
        rows.append(Claim(f"{rule}: test error at {deep} − at {shallow} hidden layers (points)", change,
                          "< 0 (4-layer beats 3-layer on the nonlinear teacher)",
                          "Lillicrap et al. 2016, Fig. 2d: deeper helps both BP and FA, on a task that needs depth; "
                          + ("here too" if change < 0 else "not here, where the same epochs must train a deeper net")
                          + "; another task: no verdict", None))
    return rows


def _depth_finding(results: dict[str, Any]) -> str:
    s, summary = results["settings"], results["summary"]
    shallow, deep = str(s["depths"][0]), str(s["depths"][-1])
    parts = []
    for rule in [r for r in s["rules"] if r != "bp"]:
        before = summary[rule][shallow]["test"][0] - summary["bp"][shallow]["test"][0]
        after = summary[rule][deep]["test"][0] - summary["bp"][deep]["test"][0]
        trend = "widens" if after > before + 0.5 else "narrows" if after < before - 0.5 else "stays within 0.5 points"
        parts.append(f"{rule}'s gap to backprop {trend} ({fmt(before)} → {fmt(after)} points)")
    return (f"**Finding.** From {shallow} to {deep} hidden layers: " + "; ".join(parts) + ".")


# ------------------------------------------------------------------------------------------------ experiments

EXPERIMENTS = [
    Experiment("fixed-b", "Which fixed B is best, and at what scale?", run_fixed_b, report_fixed_b, threads=1),
    Experiment("nonlinear-feedback", "Does a nonlinear feedback pathway still learn, and at what cost?",
               run_nonlinear_feedback, report_nonlinear_feedback, threads=1),
    Experiment("plastic", "Does plastic feedback (KP, WM) learn faster than a fixed B?", run_plastic,
               report_plastic, threads=1),
    Experiment("depth", "Does FA keep up as depth grows, and where does DFA stand?", run_depth, report_depth,
               threads=1),
]
