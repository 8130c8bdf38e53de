"""What the paper reproductions share beyond the machinery of :mod:`.common`: online learning from a data stream,
students drawn from named random streams, grid tuning then replication, summary statistics and figure set-up.

Online learning (Lillicrap et al. 2016's teacher tasks, the open questions' teacher tasks)::

    data = stream_task(linear_teacher(n_train=examples + 1000, seed=2016), examples)  # stream, then validation
    make = lambda seed: fbalign.convert(student((30, 20, 10), "linear", bias=False, seed=seed), "fa")
    tuning = tune_eta(lambda: make(0), "fa", data, examples=800)        # the grid on a prefix, scored on val
    curves = [train_online(make(s), "fa", data, examples=examples, eta=tuning["eta"]) for s in range(20)]

Statistics: :func:`mean_sd` and :func:`summary` over the finite values, :func:`pm` for a table's ``mean ± sd``,
:func:`welch` (t, p, df of Welch's two-sided test; :func:`~.common.welch_p` for the p-value alone).

Grid tuning then replication, "tune seed 0 over a grid, then repeat the seeds at the best value", is
:func:`tune_then_replicate`; :func:`pick_best` is its scoring step alone.

Many runs as one model: :func:`train_online_ensemble` trains E students of one architecture and rule (seeds, or
one seed at every rate of a grid) on the same stream as one :class:`fbalign.Ensemble`, each member as it would
train alone in :func:`train_online` (to rounding: a batched matmul sums in another order); ``tune_eta(...,
ensemble=True)`` runs its grid that way, and :func:`tune_etas` the grids of several rules (backprop, fa, shallow,
which one ensemble may mix) at once.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

import fbalign
from fbalign.data import TensorDataset
from fbalign.metrics import measure_alignment, nse
from fbalign.models import MLP
from fbalign.train import DivergedError

from .common import fmt, welch_p

__all__ = ["HALF_DECADES", "NP_SIGMA", "INIT", "new_figure", "panel_letter", "mean_sd", "summary", "pm", "welch",
           "welch_p", "pick_best", "tune_then_replicate", "half_sse", "stream_seed", "student", "output_layer",
           "stream_task", "train_online", "train_online_ensemble", "tune_eta", "tune_etas", "first_below",
           "stays_below"]

_R = TypeVar("_R")

HALF_DECADES = tuple(10.0 ** (k / 2) for k in range(-10, 1))  # learning rates 1e-5 … 1 in half decades
NP_SIGMA = 1e-3  # node perturbation's noise (Lillicrap et al. 2016)
INIT = 1  # key of the initial-weight streams (see stream_seed)


# ------------------------------------------------------------------------------------------------ figures

def new_figure(width: float, height: float, panels: int = 1) -> tuple[Any, Any]:
    """A matplotlib Figure (no pyplot state) of ``width × height`` inches, constrained layout, with one row of
    ``panels`` axes: the Axes itself for one panel, an array of them for more."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(1, panels) if panels > 1 else figure.add_subplot()


def panel_letter(ax: Any, letter: str) -> None:
    """The paper's panel letter, bold at the axes' top left."""
    ax.set_title(letter, loc="left", fontweight="bold")


# ------------------------------------------------------------------------------------------------ statistics

def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) of the finite values: (NaN, NaN) for none, sd NaN for one."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(finite) == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if len(finite) > 1 else math.nan


def summary(values: Sequence[float]) -> dict[str, Any]:
    """``mean``, ``sd`` (:func:`mean_sd`), ``n`` (finite values) and ``runs`` (all values) for results.json."""
    mean, sd = mean_sd(values)
    return {"mean": mean, "sd": sd, "n": sum(1 for v in values if v is not None and math.isfinite(v)),
            "runs": [float(v) for v in values]}


def pm(values: Sequence[float] | dict[str, Any], digits: int = 3) -> str:
    """``mean ± sd`` for a table, of values or of a :func:`summary`; the mean alone for one value; ``(k/n
    diverged)`` appended when k values are not finite."""
    if isinstance(values, dict):
        values = values["runs"]
    mean, sd = mean_sd(values)
    bad = sum(1 for v in values if v is None or not math.isfinite(v))
    text = fmt(mean, digits) if math.isnan(sd) else f"{fmt(mean, digits)} ± {fmt(sd, 2)}"
    return text + (f" ({bad}/{len(values)} diverged)" if bad else "")


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Welch's two-sided t-test of ``a`` against ``b`` (finite values): ``t`` (positive when a's mean is the
    larger), ``p`` and ``df``; all NaN when it is undefined (fewer than two values in either, or no spread)."""
    a = [v for v in a if math.isfinite(v)]
    b = [v for v in b if math.isfinite(v)]
    if math.isnan(welch_p(a, b)):
        return {"t": math.nan, "p": math.nan, "df": math.nan}
    with warnings.catch_warnings():  # near-identical samples: scipy warns of precision loss, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    return {"t": float(result.statistic), "p": float(result.pvalue), "df": float(result.df)}


# ------------------------------------------------------------------------------------------------ grids

def pick_best(grid: Sequence[float], scores: Sequence[float]) -> dict[str, Any]:
    """The grid value with the lowest score (NaN and +inf, e.g. a diverged run, never win): ``value``, ``grid``,
    ``scores`` and ``at_grid_edge`` (the best lies at the grid's end, so maybe beyond it)."""
    if len(grid) != len(scores) or not grid:
        raise ValueError(f"pick_best: {len(grid)} grid values and {len(scores)} scores; they must match and not "
                         "be empty")
    ranked = [s if math.isfinite(s) else math.inf for s in scores]
    best = int(np.argmin(ranked))
    return {"value": grid[best], "grid": list(grid), "scores": [float(s) for s in scores],
            "at_grid_edge": best in (0, len(grid) - 1)}


def tune_then_replicate(grid: Sequence[float], tune: Callable[[Sequence[float]], Sequence[float]],
                        replicate: Callable[[float], _R]) -> tuple[dict[str, Any], _R]:
    """Tune over ``grid``, then repeat at the best value: ``tune(grid)`` returns a score per value (lower wins;
    typically seed 0 trained at each value, which an ensemble does at once), ``replicate(best)`` runs the seeds.
    Returns :func:`pick_best`'s record and what ``replicate`` returned."""
    tuning = pick_best(grid, tune(grid))
    return tuning, replicate(tuning["value"])


# ------------------------------------------------------------------------------------------------ online tasks

def half_sse(outputs: Tensor, targets: Tensor) -> Tensor:
    """The loss ``L = ½‖e‖²``, ``e = y* − y``, averaged over the batch."""
    return 0.5 * (targets - outputs).square().sum(-1).mean()


def stream_seed(*key: int) -> int:
    """A seed for the random stream named by ``key`` (e.g. ``(INIT, run)``), independent of every other key's:
    a task, a network's initial weights and its feedback never share draws."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def student(widths: Sequence[int], activation: str, *, bias: bool, seed: int, init_range: float | None = None,
            dtype: torch.dtype = torch.float64, output_activation: str | None = None) -> nn.Sequential:
    """An MLP with ``widths`` (input, hidden..., output), its weights drawn from the stream of run ``seed``:
    ``U[-init_range, init_range]`` (biases too), or torch's default initialization when ``init_range`` is None."""
    torch.manual_seed(stream_seed(INIT, seed))
    model = MLP((widths[0],), widths[-1], hidden=list(widths[1:-1]), activation=activation, bias=bias,
                output_activation=output_activation)
    if init_range is not None:
        generator = torch.Generator().manual_seed(stream_seed(INIT, seed))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.empty(parameter.shape, dtype=torch.float64).uniform_(
                    -init_range, init_range, generator=generator))
    return model.to(dtype)


def output_layer(model: nn.Module) -> str:
    """The name of the model's last Linear layer: its input is the hidden layer ``h`` the angles are of."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def stream_task(data: TensorDataset, examples: int) -> TensorDataset:
    """The first ``examples`` training points are the data stream; the rest are the validation points."""
    if len(data.train_x) <= examples:
        raise ValueError(f"{data.name} has {len(data.train_x)} training points; the stream needs {examples} plus "
                         "validation points")
    return dataclasses.replace(data, train_x=data.train_x[:examples], train_y=data.train_y[:examples],
                               val_x=data.train_x[examples:], val_y=data.train_y[examples:])


def train_online(model: nn.Module, algorithm: str, data: TensorDataset, *, examples: int, eta: float,
                 batch_size: int = 1, evaluations: int = 100, score_on: str = "test", seed: int = 0,
                 angle_every: int = 0, probe: tuple[Tensor, Tensor] | None = None,
                 bar: Any = None) -> dict[str, list[float]]:
    """Train ``model`` (converted to its rule; ``algorithm='np'``: by node perturbation) on the first ``examples``
    points of ``data``'s stream, in order, ``batch_size`` points per SGD step at learning rate ``eta`` per example
    (the batch-mean loss ½‖e‖² at ``eta · batch_size``, so ``eta`` means the same for every batch size).

    Returns ``examples`` (points seen) and ``nse`` on the ``score_on`` split (``'test'`` or ``'val'``) at
    ``evaluations + 1`` evenly spaced points of training; with ``angle_every``, ``angle_step`` and ``angle``:
    ∡(Δh, Δh_BP) at the output layer's input on the training batch before each ``angle_every``-th step; with
    ``probe``, ``angle_bp`` and ``angle_pbp`` (∡ to pseudo-backprop's W⁺e) on that batch at every evaluation.

    Raises:
        DivergedError: the NSE became NaN or infinite (the learning rate is too large).
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=eta * batch_size)
    perturbation = fbalign.NodePerturbation(model, sigma=NP_SIGMA, seed=seed) if algorithm == "np" else None
    score_x, score_y = data.splits()[score_on]
    out_name = output_layer(model)
    curve: dict[str, list[float]] = {"examples": [], "nse": []}
    if angle_every:
        curve["angle_step"], curve["angle"] = [], []
    if probe is not None:
        curve["angle_bp"], curve["angle_pbp"] = [], []

    def evaluate(step: int) -> None:
        with torch.no_grad():
            score = float(nse(model(score_x), score_y))
        if not math.isfinite(score):
            raise DivergedError(f"{algorithm}: the NSE became {score} after {step * batch_size} examples at "
                                f"learning rate {eta:g} per example; lower it")
        curve["examples"].append(step * batch_size)
        curve["nse"].append(score)
        if probe is not None:
            measured = measure_alignment(model, half_sse, *probe, pseudo_backprop=True)
            curve["angle_bp"].append(measured[f"angle_dh_bp/{out_name}"])
            curve["angle_pbp"].append(measured[f"angle_dh_pbp/{out_name}"])

    def train_step(step: int, x: Tensor, y: Tensor) -> None:
        if angle_every and step % angle_every == 0:
            curve["angle_step"].append(step * batch_size)
            curve["angle"].append(measure_alignment(model, half_sse, x, y)[f"angle_dh_bp/{out_name}"])
        optimizer.zero_grad(set_to_none=True)
        if perturbation is not None:
            perturbation.backward(x, lambda out, y=y: 0.5 * (y - out).square().sum(-1))
        else:
            half_sse(model(x), y).backward()
        optimizer.step()

    _stream(data, examples // batch_size, batch_size, evaluations, evaluate, train_step, bar)
    return curve


def _stream(data: TensorDataset, steps: int, batch_size: int, evaluations: int, evaluate: Callable[[int], None],
            train_step: Callable[[int, Tensor, Tensor], None], bar: Any) -> None:
    """The online loop of :func:`train_online` and :func:`train_online_ensemble`: ``train_step(step, x, y)`` on
    each ``batch_size`` points of ``data``'s training stream in order, ``evaluate(step)`` at ``evaluations + 1``
    evenly spaced steps (the first and the last included), the progress ``bar`` moved at each evaluation."""
    evaluate_at = set(np.unique(np.linspace(0, steps, evaluations + 1).round().astype(int)).tolist())
    done = 0
    for step in range(steps + 1):
        if step in evaluate_at:
            evaluate(step)
            if bar is not None:
                bar.update(step - done)
                done = step
        if step == steps:
            break
        batch = slice(step * batch_size, (step + 1) * batch_size)
        train_step(step, data.train_x[batch], data.train_y[batch])


def train_online_ensemble(models: Sequence[nn.Module], data: TensorDataset, *, examples: int,
                          etas: float | Sequence[float], batch_size: int = 1, evaluations: int = 100,
                          score_on: str = "test", probe: tuple[Tensor, Tensor] | None = None,
                          bar: Any = None) -> list[dict[str, Any]]:
    """:func:`train_online` for E models at once: ``models`` (one architecture and rule, e.g. seeds, or copies of
    one seed for a learning-rate grid) train on the same stream as one :class:`fbalign.Ensemble`, member ``e`` at
    ``etas[e]`` per example (one number: all alike). Node perturbation is not a rule an ensemble runs: use
    :func:`train_online` for it.

    Returns one curve per member, as :func:`train_online` returns it (``examples``, ``nse``; with ``probe``,
    ``angle_bp`` and ``angle_pbp``), plus ``diverged``: None, or the message of the member that diverged; its NSE
    is NaN from the first evaluation after it diverged (the others train on).
    """
    etas = [float(etas)] * len(models) if isinstance(etas, (int, float)) else [float(e) for e in etas]
    if len(etas) != len(models) or not all(e > 0 for e in etas):
        raise ValueError(f"train_online_ensemble: {len(models)} models need as many learning rates > 0; got {etas}")
    top = max(etas)
    ensemble = fbalign.Ensemble(models, lr_scale=[eta / top for eta in etas], seeds=list(range(len(models))))
    with warnings.catch_warnings():  # a diverged member is recorded in its curve (expected at a grid's top end)
        warnings.simplefilter("ignore", fbalign.MemberDivergedWarning)
        return _train_ensemble(ensemble, models, data, etas, examples=examples, batch_size=batch_size,
                               evaluations=evaluations, score_on=score_on, probe=probe, bar=bar)


def _train_ensemble(ensemble: Any, models: Sequence[nn.Module], data: TensorDataset, etas: list[float], *,
                    examples: int, batch_size: int, evaluations: int, score_on: str,
                    probe: tuple[Tensor, Tensor] | None, bar: Any) -> list[dict[str, Any]]:
    top = max(etas)
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=top * batch_size)
    score_x, score_y = data.splits()[score_on]
    target = score_y.double()
    spread = (target - target.mean(0)).square().sum()
    out_name = output_layer(models[0])
    curves: list[dict[str, Any]] = [{"examples": [], "nse": [], "diverged": None} for _ in models]
    for curve in curves if probe is not None else ():
        curve["angle_bp"], curve["angle_pbp"] = [], []

    def evaluate(step: int) -> None:
        with torch.no_grad():
            scores = ((target - ensemble(score_x).double()).square().sum((1, 2)) / spread).tolist()
        members = ensemble.members() if probe is not None else None
        for index, (curve, score) in enumerate(zip(curves, scores)):
            if index in ensemble.diverged or not math.isfinite(score):
                curve["diverged"] = curve["diverged"] or ensemble.diverged.get(
                    index, f"member {index}: the NSE became {score} after {step * batch_size} examples")
                score = math.nan
            curve["examples"].append(step * batch_size)
            curve["nse"].append(score)
            if members is not None:
                measured = (measure_alignment(members[index], half_sse, *probe, pseudo_backprop=True)
                            if curve["diverged"] is None else {})
                curve["angle_bp"].append(measured.get(f"angle_dh_bp/{out_name}", math.nan))
                curve["angle_pbp"].append(measured.get(f"angle_dh_pbp/{out_name}", math.nan))

    def train_step(step: int, x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        # The sum of the members' losses: each member's gradient is that of its own ½‖e‖² (batch mean).
        (0.5 * (y - ensemble(x)).square().sum(-1).mean(-1).sum()).backward()
        optimizer.step()

    _stream(data, examples // batch_size, batch_size, evaluations, evaluate, train_step, bar)
    return curves


def tuning_score(curve: dict[str, list[float]]) -> float:
    """A tuning run's score: the mean log10 NSE over its evaluations after the first (lower learns faster)."""
    return float(np.mean(np.log10(np.maximum(curve["nse"][1:], 1e-300))))


def tune_eta(make_model: Callable[[], nn.Module], algorithm: str, data: TensorDataset, *, examples: int,
             batch_size: int = 1, grid: Sequence[float] = HALF_DECADES, bar: Any = None,
             ensemble: bool = False) -> dict[str, Any]:
    """Pick the learning rate per example from ``grid`` that learns fastest on a prefix of the stream.

    Each ``eta`` trains a fresh ``make_model()`` on the first ``examples`` points of the stream; its score
    (:func:`tuning_score`) is the mean of log10 NSE on the validation points (held out from the stream) over ten
    evenly spaced points of that prefix, so the rate that gets low soonest and stays there wins; a rate that
    diverges scores +inf. This is Lillicrap et al.'s "manual search for the speed of learning", made mechanical
    and the same for every algorithm. Returns ``eta``, ``grid``, ``scores``, ``prefix`` and ``at_grid_edge``.

    With ``ensemble`` the whole grid trains as one :class:`fbalign.Ensemble` (:func:`tune_etas`; not for node
    perturbation, ``algorithm='np'``).
    """
    if ensemble and algorithm != "np":
        return tune_etas({algorithm: make_model}, data, examples=examples, batch_size=batch_size, grid=grid,
                         bar=bar)[algorithm]

    found = []
    for eta in grid:
        try:
            found.append(tuning_score(train_online(make_model(), algorithm, data, examples=examples, eta=eta,
                                                   batch_size=batch_size, evaluations=10, score_on="val")))
        except DivergedError:
            found.append(math.inf)
        if bar is not None:
            bar.update(examples // batch_size)
    return _tuned(pick_best(grid, found), examples)


def tune_etas(makers: dict[str, Callable[[], nn.Module]], data: TensorDataset, *, examples: int,
              batch_size: int = 1, grid: Sequence[float] = HALF_DECADES, bar: Any = None) -> dict[str, Any]:
    """:func:`tune_eta` for several conditions of one architecture at once (their rules may be backprop, fa
    and shallow: :data:`fbalign.stacked.MIXABLE_RULES`): every condition's whole grid is one
    :class:`fbalign.Ensemble`. ``makers`` maps a condition's name to its ``make_model``; returns name →
    :func:`tune_eta`'s record."""
    names = list(makers)
    models = [makers[name]() for name in names for _ in grid]
    curves = train_online_ensemble(models, data, examples=examples, etas=list(grid) * len(names),
                                   batch_size=batch_size, evaluations=10, score_on="val")
    if bar is not None:
        bar.update(len(models) * (examples // batch_size))
    scores = [math.inf if c["diverged"] else tuning_score(c) for c in curves]
    return {name: _tuned(pick_best(grid, scores[i * len(grid):(i + 1) * len(grid)]), examples)
            for i, name in enumerate(names)}


def _tuned(best: dict[str, Any], examples: int) -> dict[str, Any]:
    return {"eta": best["value"], "grid": best["grid"], "scores": best["scores"], "prefix": examples,
            "at_grid_edge": best["at_grid_edge"]}


def first_below(examples: Sequence[float], values: Sequence[float], level: float) -> float | None:
    """The first number of examples at which ``values`` fell to ``level`` or below (None: never)."""
    return next((float(n) for n, v in zip(examples, values) if v <= level), None)


def stays_below(examples: Sequence[int], lower: Sequence[float], upper: Sequence[float]) -> int | None:
    """The first number of examples from which ``lower < upper`` at every later evaluation (None: not at the end)."""
    below = np.asarray(lower) < np.asarray(upper)
    if not below[-1]:
        return None
    first = len(below) - int(np.argmin(below[::-1])) if not below.all() else 0
    return int(examples[first])
