"""What the four open questions share: the scale rows' common entries, the teacher and image tasks, tuning a
condition's rate on seed 0 and replicating it over the seeds, and running conditions side by side
(:mod:`fbalign.runner`)."""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
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
from fbalign.metrics import load_records, measure_alignment, nse
from fbalign.models import build as build_model
from fbalign.runner import Stop, run
from fbalign.train import DivergedError, train, train_ensemble

from ..common import Context, fmt
from ..lillicrap2016 import FEEDBACK_RANGE, TASK_SEED, TEST, VALIDATION, WEIGHT_RANGE
from ..toolkit import HALF_DECADES, pick_best, stream_task, student, tuning_score

# Keys of the random streams (see toolkit.stream_seed): initial weights use toolkit.INIT = 1.
FEEDBACK = 2  # every run's fixed or starting B
IMAGE_LR_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)  # SGD momentum 0.9: the grid every image condition is tuned on
TEACHER_ETA_GRID = HALF_DECADES  # η per example, 1e-5 … 1 in half decades: the grid every teacher condition is tuned on
IMAGE_BATCH = 128
IMAGE_MOMENTUM = 0.9
# plastic: Akrout et al.'s optimizer, plain SGD (their rate, 0.05, lies inside the grid). With momentum 0.9, W moves
# so much further per step that one weight-mirror step (lr 0.01) per training step leaves B lagging behind W.
PLASTIC_LR_GRID = (0.01, 0.03, 0.1, 0.3)
PLASTIC_MOMENTUM = 0.0
LILLICRAP_RMS = FEEDBACK_RANGE / math.sqrt(3.0)  # element rms of Lillicrap's B ~ U[-0.5, 0.5]

# Every row has the seeds, the data and the training budget; "tiny" is the tests' (seconds, in this process).
_TINY_IMAGE = {"image_train": 600, "image_validation": 150, "epochs": 1, "tune_epochs": 1, "data": "digits",
               "lr_grid": (0.03, 0.1), "eta_grid": (1e-3, 1e-2, 1e-1), "workers": 1}
_GRIDS = {"lr_grid": IMAGE_LR_GRID, "eta_grid": TEACHER_ETA_GRID, "workers": None}

KP_DECAY = 1.0  # kp's λ: the mismatch B − W shrinks by (1 − lr·λ) per step (W itself is not decayed)
MIRROR_LR = 0.01  # wm: one mirror step after every training step (as Akrout et al.'s code), mismatch ×(1 − 0.01)
MIRROR_BATCH = 128
JOBS: int | None = None  # processes training conditions side by side, overriding a row's "workers" (None: per core)
# Whether a condition's image runs (its rate grid, its seeds) train as one fbalign ensemble on the CPU too (on a GPU
# they do). Off: see README (measured on 2 cores, the image MLPs' steps are arithmetic, which stacking does not cut).
ENSEMBLES_ON_CPU = False

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


# A condition's relative cost, for the order its job starts in (longest first, so that no worker idles at the end
# behind one long job): seconds measured at quick scale on one core (an image MLP condition about 6.5 s, a nonlinear
# teacher condition 2.6 s, a linear one 0.5 s). A job's own "cost" overrides it.
TASK_COST = {"image": 6.5, "nonlinear": 2.6, "linear": 0.5}


def run_conditions(ctx: Context, size: dict[str, Any], conditions: dict[Any, dict[str, Any]], *,
                   on_device: bool = False, workers: int | None = None) -> dict[Any, dict[str, Any]]:
    """Run every condition (a job for :func:`run_condition`: ``make``, a picklable ``make(data=, seed=)``
    returning the converted network, and ``task`` with its settings) and return the results by name, in order.

    The conditions run side by side in ``workers`` processes by :func:`fbalign.runner.run` (None: ``JOBS``, else
    the size row's ``workers``, else one per core), each on one thread, the costliest first (``TASK_COST``, or a
    job's ``cost``). Conditions that train on the device (a job's ``on_device``, default the call's) run one at a
    time on a GPU, before the others; on the CPU every condition shares one pool. Every condition seeds all it
    draws, so the numbers are those of a serial run. Ctrl-C or SIGTERM stops them all, keeping every finished
    training run for ``--resume``.
    """
    on_gpu = ctx.device.type != "cpu"
    device = [name for name, job in conditions.items() if on_gpu and job.get("on_device", on_device)]
    found: dict[Any, dict[str, Any]] = {}
    for names, one_at_a_time in ((device, True), ([name for name in conditions if name not in device], False)):
        if not names:
            continue
        names = sorted(names, key=lambda name: -conditions[name].get("cost", TASK_COST[conditions[name]["task"]]))
        count = workers or JOBS or size.get("workers") or (1 if one_at_a_time else None)
        jobs = [{"ctx": ctx, "size": size, **conditions[name]} for name in names]
        results = run(run_condition, jobs, workers=count, executor="inline" if count == 1 else "process")
        if any(f is None for f in results):  # a training run was stopped without the runner seeing a signal
            raise KeyboardInterrupt("training was stopped; continue with --resume")
        found.update(zip(names, results))
    return {name: found[name] for name in conditions}


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


def train_online_together(models: Sequence[nn.Module], data: TensorDataset, *, examples: int,
                          etas: Sequence[float], batch_size: int, evaluations: int,
                          score_on: str = "test") -> list[dict[str, list[float]] | None]:
    """Train ``models`` (one architecture, one rule; their seeds differ) side by side as one
    :class:`fbalign.Ensemble` on the first ``examples`` points of the stream, member ``e`` at ``etas[e]`` per example,
    as :func:`toolkit.train_online` trains one: ``batch_size`` points per SGD step on the batch-mean ½‖e‖².

    Returns per member ``examples`` and ``nse`` on ``score_on`` at ``evaluations + 1`` evenly spaced points, or None
    for a member that diverged (its NSE or weights became NaN/Inf; the others train on).
    """
    with warnings.catch_warnings():  # a diverging member is expected on a tuning grid: it is recorded, not warned
        warnings.simplefilter("ignore", fbalign.ensemble.MemberDivergedWarning)
        return _train_online_together(models, data, examples=examples, etas=etas, batch_size=batch_size,
                                      evaluations=evaluations, score_on=score_on)


def _train_online_together(models: Sequence[nn.Module], data: TensorDataset, *, examples: int,
                           etas: Sequence[float], batch_size: int, evaluations: int,
                           score_on: str) -> list[dict[str, list[float]] | None]:
    top = max(etas)
    ensemble = fbalign.Ensemble(models, lr_scale=[eta / top for eta in etas])
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=top * batch_size)
    steps = examples // batch_size
    score_x, score_y = data.splits()[score_on]
    evaluate_at = set(np.unique(np.linspace(0, steps, evaluations + 1).round().astype(int)).tolist())
    curves: list[dict[str, list[float]]] = [{"examples": [], "nse": []} for _ in models]
    diverged: set[int] = set()
    for step in range(steps + 1):
        if step in evaluate_at:
            with torch.no_grad():
                outputs = ensemble(score_x)
            for e, curve in enumerate(curves):
                curve["examples"].append(step * batch_size)
                curve["nse"].append(float(nse(outputs[e], score_y)))
                if not math.isfinite(curve["nse"][-1]) or e in ensemble.diverged:
                    diverged.add(e)
        if step == steps:
            break
        x, y = data.train_x[step * batch_size:(step + 1) * batch_size], data.train_y[step * batch_size:(step + 1) *
                                                                                       batch_size]
        optimizer.zero_grad(set_to_none=True)
        # the members' batch-mean losses summed: each member's gradient is its own loss's
        (0.5 * (y - ensemble(x)).square().sum(-1).mean(-1)).sum().backward()
        optimizer.step()
    return [None if e in diverged else curve for e, curve in enumerate(curves)]


def teacher_condition(make: Callable[[int], nn.Module], data: TensorDataset, *, examples: int, prefix: int,
                      batch_size: int, seeds: int, grid: Sequence[float] = TEACHER_ETA_GRID) -> dict[str, Any]:
    """Tune η for ``make(0)`` on ``grid`` (every η at once, one ensemble member each, on the stream's first
    ``prefix`` examples, scored like :func:`toolkit.tune_eta` on the validation points), then train ``make(seed)``
    for every seed on the whole stream at that η (one ensemble); the test NSE along the way.

    Returns ``eta``, ``tuning``, ``final`` (test NSE per seed, NaN where a run diverged), ``speed`` (mean log10
    test NSE over the run, per seed: lower learns faster) and ``curve`` (examples, mean and sd of log10 NSE).
    """
    tried = train_online_together([make(0) for _ in grid], data, examples=prefix, etas=grid, batch_size=batch_size,
                                  evaluations=10, score_on="val")
    best = pick_best(grid, [math.inf if c is None else tuning_score(c) for c in tried])
    tuning = {"eta": best["value"], "grid": best["grid"], "scores": best["scores"], "prefix": prefix,
              "at_grid_edge": best["at_grid_edge"]}
    finals, speeds, logs, points = [], [], [], None
    for curve in train_online_together([make(seed) for seed in range(seeds)], data, examples=examples,
                                       etas=[tuning["eta"]] * seeds, batch_size=batch_size, evaluations=50):
        if curve is None:
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


def image_config(ctx: Context, *, lr: float, epochs: int, seed: int, momentum: float = IMAGE_MOMENTUM,
                 align_every: int = 0) -> dict[str, Any]:
    """The training configuration of an image run: SGD with ``momentum``, batch 128, cross-entropy, the model
    already converted; with ``align_every``, alignment recorded every that many steps."""
    return {"epochs": epochs, "batch_size": IMAGE_BATCH, "seed": seed, "device": str(ctx.device),
            "loss": "cross_entropy", "rule": "torch",  # the model comes converted
            "optimizer": {"name": "sgd", "lr": lr, "momentum": momentum},
            "log": {"progress": False, "every": align_every or 100, "alignment": bool(align_every)}}


def trains_together(ctx: Context, models: Sequence[nn.Module]) -> bool:
    """Whether runs of these models train side by side as one :func:`fbalign.train.train_ensemble`: on a GPU (on
    the CPU when ``ENSEMBLES_ON_CPU``), with more than one run, and without weight mirrors (their mirror phase
    follows each training step of one model: :func:`mirror_after_every_step`)."""
    wm = any(isinstance(layer.rule, fbalign.plastic.WM) for _, layer in fbalign.feedback_layers(models[0]))
    return (ctx.device.type != "cpu" or ENSEMBLES_ON_CPU) and len(models) > 1 and not wm


def train_images(ctx: Context, models: Sequence[nn.Module], data: TensorDataset, run_dir: Path, *,
                 lrs: Sequence[float], seeds: Sequence[int], epochs: int, momentum: float = IMAGE_MOMENTUM,
                 stop: Stop | None = None) -> list[dict[str, Any]] | None:
    """:func:`train_image` for several runs of one condition at once (its rate grid, or its seeds), trained side by
    side as one :func:`fbalign.train.train_ensemble` in ``run_dir`` (continued there with ``--resume``), each
    as it trains alone. Returns what ``train_image`` returns, per run; None when ``stop`` stopped them."""
    configs = [image_config(ctx, lr=lr, epochs=epochs, seed=seed, momentum=momentum) for lr, seed in zip(lrs, seeds)]
    results = train_ensemble(configs, models=models, data=data, run_dir=run_dir, resume=ctx.resume, stop=stop)
    if any(result.status == "interrupted" for result in results):
        return None
    return [{"history": result.history, "records": [], "diverged": result.status == "diverged"}
            for result in results]


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
    config = image_config(ctx, lr=lr, epochs=epochs, seed=seed, momentum=momentum, align_every=align_every)
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
    tuned = _train_runs(ctx, make, data, folder, "tuning", [(f"tune-lr{lr:g}", lr, 0) for lr in grid],
                        epochs=tune_epochs, momentum=momentum, stop=stop)
    if tuned is None:
        return None
    scores = [math.inf if run["diverged"] else run["history"][-1]["val_error"] for run in tuned]
    tuning = pick_best(grid, scores)
    lr = tuning["value"]
    finals, trains, bests, curves, records = [], [], [], [], []
    runs = _train_runs(ctx, make, data, folder, "seeds", [(f"seed{seed}", lr, seed) for seed in range(seeds)],
                       epochs=epochs, momentum=momentum, align_every=align_every, stop=stop)
    if runs is None:
        return None
    for seed_run in runs:
        if seed_run["diverged"]:
            finals.append(math.nan)
            trains.append(math.nan)
            bests.append(math.nan)
        else:
            history = seed_run["history"]
            finals.append(history[-1]["test_error"])
            trains.append(history[-1]["train_error"])
            bests.append(min(history, key=lambda h: h["val_error"])["test_error"])
            curves.append([h["test_error"] for h in history])
        records.append(seed_run["records"])
    stacked = np.asarray(curves) if curves else np.full((1, epochs), math.nan)
    return {"lr": lr, "momentum": momentum, "tuning": {"grid": list(grid), "val_error": scores, "epochs": tune_epochs,
                                                     "at_grid_edge": tuning["at_grid_edge"]},
            "final": finals, "final_train": trains, "best": bests,
            "curve": {"epochs": list(range(1, epochs + 1)), "mean": stacked.mean(0),
                      "sd": stacked.std(0, ddof=1) if len(stacked) > 1 else np.zeros(stacked.shape[1])},
            "records": records if align_every else []}


def _train_runs(ctx: Context, make: Callable[[int], nn.Module], data: TensorDataset, folder: Path, together: str,
                runs: Sequence[tuple[str, float, int]], *, epochs: int, momentum: float, align_every: int = 0,
                stop: Stop | None) -> list[dict[str, Any]] | None:
    """Train a condition's ``runs`` (each its folder's name, learning rate and seed) as one ensemble in
    ``folder/together`` where :func:`trains_together` says so and no alignment is recorded, else one after another
    by :func:`train_image`; what ``train_image`` returns, per run (None: ``stop`` stopped them)."""
    models = [make(seed) for _, _, seed in runs]
    if trains_together(ctx, models) and not align_every:
        return train_images(ctx, models, data, folder / together, lrs=[lr for _, lr, _ in runs],
                            seeds=[seed for _, _, seed in runs], epochs=epochs, momentum=momentum, stop=stop)
    found = []
    for (name, lr, seed), model in zip(runs, models):
        found.append(train_image(ctx, model, data, folder / name, lr=lr, epochs=epochs, seed=seed,
                                 align_every=align_every, momentum=momentum, stop=stop))
        if found[-1] is None:
            return None
    return found


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


def _metric(task: str) -> str:
    return "error" if task == "image" else "nse"


def _final_values(task: str, condition: dict[str, Any]) -> list[float]:
    """What a condition is ranked by: log10 of the final test NSE (teacher tasks), test error % (image)."""
    if task == "image":
        return condition["final"]
    return [math.log10(v) if math.isfinite(v) and v > 0 else math.nan for v in condition["final"]]


def _angle_series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _keep_keys(runs: list[list[dict[str, Any]]], prefixes: tuple[str, ...]) -> list[list[dict[str, Any]]]:
    """Every run's alignment records with only ``step`` and the keys starting with ``prefixes`` (results.json
    keeps what the report uses; the run directories keep everything)."""
    return [[{k: v for k, v in r.items() if k == "step" or k.startswith(prefixes)} for r in records]
            for records in runs]
