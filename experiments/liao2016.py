"""Liao, Leibo & Poggio (2016), "How Important Is Weight Symmetry in Backpropagation?" (AAAI-16; arXiv
1510.05067), with fbalign's own rules, models and training loop.

Experiments (the names ``fbalign reproduce liao2016 --only`` takes):

===========  ================================================================================================
magnitudes   BP vs uSF vs frSF vs brSF vs fixed random feedback (FA), with BatchNorm and SGD: magnitudes of the
             feedback do not matter, random magnitudes with concordant signs match SGD, FA does not
concordance  test error against the sign-concordance probability p (uSF; frSF too at full scale): signs matter
bn_bm        BatchNorm on/off × Batch Manhattan on/off for every rule, with the paper's bare sign(W) feedback:
             which cells collapse (NaN/Inf or chance-level error), and the error's size at initialization
===========  ================================================================================================

Every cell of every experiment is trained the same way: :func:`fbalign.train.train` on a model from
:mod:`fbalign.models` (a 3×256 ReLU MLP and LeNet-5, with ``batchnorm=`` as the cell says) converted to the cell's
rule, the same epochs, batch size, momentum and cosine schedule, and a learning rate chosen from the same grid of
decades (one grid for SGD, one for Batch Manhattan) by the final validation error of seed 0; the other seeds then
train at that rate. A run that diverges (:class:`fbalign.train.DivergedError`) or ends within ``CHANCE_MARGIN``
points of chance error is *collapsed*; a cell is collapsed when most of its seeds are.

Sizes come from the tables below, chosen by ``ctx.scale`` (tests shrink them): ``TRAINING`` (data, budget, seeds,
learning-rate grids) and one table per experiment (models, rules, concordance levels).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

import fbalign
from fbalign.checkpoint import atomic_write_text
from fbalign.config import load_config
from fbalign.data import TensorDataset
from fbalign.runner import Stop, run
from fbalign.train import (
    CHECKPOINT,
    DivergedError,
    RunDirectoryError,
    TrainResult,
    build_model,
    load_data,
    train,
    train_ensemble,
)

from .common import Claim, Context, Experiment, Report, ReproductionError, fmt, load_results, welch_p
from .toolkit import new_figure, summary

TITLE = ("Liao, Leibo & Poggio (2016), *How Important Is Weight Symmetry in Backpropagation?*, AAAI-16 "
         "(arXiv 1510.05067)")

INTRODUCTION = (
    "The paper's three findings, each on a 3×256 ReLU MLP and on LeNet-5, trained by `fbalign.train.train` with "
    "fbalign's rules: backprop (`backprop`, plain SGD's gradient), uniform sign-concordant feedback V = sign(W) "
    "(`usf`), fixed and batchwise random magnitudes V = M∘sign(W) (`frsf`, `brsf`) and fixed random feedback "
    "(`fa`, the paper's RndF). Quick mode trains on scikit-learn's 8×8 digits (LeNet-5 sees them resized to "
    "28×28), full mode on Fashion-MNIST; `--data mnist --data-dir DIR` (or `fashion-mnist`, `digits`) chooses "
    "another (with `--quick`, Fashion-MNIST and MNIST train on 10,000 of their training examples), and each section "
    "names the data it used. The paper used 15 data sets and larger conv nets; here two "
    "small nets stand in for them, so numbers are compared by standing (which rule beats which, which cell "
    "collapses), not digit by digit. **Learning rates**: every cell (model × rule × BatchNorm × optimizer) picks "
    "its rate from the same grid of decades by the final validation error of seed 0 (a held-out part of the "
    "training set); its other seeds train at that rate; the paper tuned by hand per method. Means ± sd are over "
    "seeds (seed 0 included); the test set is never used to choose anything.")

# The paper's claims (abstract and results), for the comparison tables.
PAPER = {
    "magnitudes": "magnitudes of the feedback do not matter: uSF ≈ frSF ≈ brSF",
    "random_magnitudes": "random magnitudes with 100% concordant signs (frSF, brSF) match or beat SGD",
    "fa": "fixed random feedback (RndF) beats chance but not SGD",
    "signs": "signs matter: the more concordant, the better",
    "bn_bm": "BN and/or BM are indispensable: without both, asymmetric BP fails (gradients explode or vanish)",
}

RULES = ("backprop", "usf", "frsf", "brsf", "fa")
SIGN_RULES = ("usf", "frsf", "brsf")
LABELS = {"backprop": "BP", "usf": "uSF", "frsf": "frSF", "brsf": "brSF", "fa": "FA (RndF)"}
MODEL_LABELS = {"mlp": "MLP 3×256", "lenet5": "LeNet-5"}
COLORS = {"backprop": "black", "usf": "tab:blue", "frsf": "tab:orange", "brsf": "tab:red", "fa": "tab:green",
          "mlp": "tab:blue", "lenet5": "tab:orange"}

# The training budget and learning-rate policy of every cell, per scale.
TRAINING: dict[str, dict[str, Any]] = {
    "quick": {"data": "digits", "epochs": {"mlp": 20, "lenet5": 10}, "batch_size": 32, "seeds": 3,
              "hidden": [256, 256, 256], "checkpoints": False, "workers": None,
              # --quick --data fashion-mnist (or mnist): the quick budget on 10,000 training examples
              "train_size": {"digits": None, "fashion-mnist": 10_000, "mnist": 10_000},
              "lr_grid": {"sgd": (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0), "bm": (1e-5, 1e-4, 1e-3, 1e-2)}},
    "full": {"data": "fashion-mnist", "epochs": {"mlp": 20, "lenet5": 20}, "batch_size": 64, "seeds": 5,
             "hidden": [256, 256, 256], "checkpoints": True, "workers": None,
             "train_size": {"digits": None, "fashion-mnist": None, "mnist": None},
             "lr_grid": {"sgd": (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0), "bm": (1e-5, 1e-4, 1e-3, 1e-2)}},
    # the tests' size: seconds per experiment, in this process
    "tiny": {"data": "digits", "epochs": {"mlp": 2, "lenet5": 1}, "batch_size": 64, "seeds": 2, "hidden": [32, 32],
             "checkpoints": False, "train_size": {"digits": 512, "fashion-mnist": 512, "mnist": 512}, "workers": 1,
             "lr_grid": {"sgd": (1e-2, 1e-1), "bm": (1e-3,)}},
}
VALIDATION = {"digits": 300, "fashion-mnist": 10_000, "mnist": 10_000}  # training examples held out for tuning
MOMENTUM = 0.9  # SGD's and Batch Manhattan's (which applies it to the sign, as in Xiao et al.'s code)
CHANCE_MARGIN = 10.0  # a run whose test error is within this many points of chance's has collapsed
SIGNIFICANCE = 0.05  # Welch t-tests over seeds
# Its experiments train their conditions in worker processes (fbalign.runner): reproduce runs them one at a time.
TRAINS_IN_PROCESSES = True
JOBS: int | None = None  # training processes, overriding the scale row's "workers" (None: one per CPU core)
# Models whose runs of a cell train as one fbalign ensemble on the CPU too (on a GPU all do). None: on 2 cores a
# cell's 6 learning rates as one ensemble are no faster than one after another (benchmarks/ensemble_training.py,
# one thread: the 3×256 MLP 1.03×, LeNet-5 0.94×, whose grouped convolution is slower on a CPU than 6 separate
# ones), and the whole quick reproduction took 766 s with the MLP cells as ensembles against 717 s without.
ENSEMBLES_ON_CPU: tuple[str, ...] = ()

MAGNITUDE_SCALE = {"quick": {"models": ("mlp", "lenet5"), "rules": RULES},
                   "full": {"models": ("mlp", "lenet5"), "rules": RULES},
                   "tiny": {"models": ("mlp",), "rules": RULES}}
CONCORDANCE_SCALE = {"quick": {"models": ("mlp", "lenet5"), "rules": ("usf",), "p": (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)},
                     "full": {"models": ("mlp", "lenet5"), "rules": ("usf", "frsf"),
                              "p": (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)},
                     "tiny": {"models": ("mlp",), "rules": ("usf",), "p": (0.5, 0.75, 1.0)}}
GRID_SCALE = {"quick": {"models": ("mlp", "lenet5"), "rules": RULES},
              "full": {"models": ("mlp", "lenet5"), "rules": RULES},
              "tiny": {"models": ("mlp",), "rules": ("backprop", "usf", "frsf")}}

# The paper's feedback for the BN × BM grid: the bare sign(W) (fbalign's sign rules scale it by rms(W) unless
# scale is set), with magnitudes M in [0, 1] for frsf and brsf. backprop and fa are as everywhere.
PAPER_VARIANT: dict[str, Any] = {"backprop": "backprop", "usf": {"name": "usf", "scale": 1.0},
                                 "frsf": {"name": "frsf", "scale": 1.0}, "brsf": {"name": "brsf", "scale": 1.0},
                                 "fa": "fa"}
# The 2×2 grid: cell id -> (label, BatchNorm, optimizer family).
GRID_CELLS = {"bn-bm": ("BN + BM", True, "bm"), "bn-sgd": ("BN + SGD", True, "sgd"),
              "nobn-bm": ("BM, no BN", False, "bm"), "nobn-sgd": ("neither (SGD, no BN)", False, "sgd")}
NEITHER = "nobn-sgd"  # the cell with neither BN nor BM
OUTCOME = "outcome.json"


# ------------------------------------------------------------------------------------------------ one cell

@dataclass(frozen=True)
class Cell:
    """One condition: a model, a rule (a name or a rule table), BatchNorm or not, and the optimizer family
    (``'sgd'`` or ``'bm'``); ``key`` names its folder."""

    key: str
    model: str
    rule: str | dict[str, Any]
    batchnorm: bool
    optimizer: str


def data_name(ctx: Context) -> str:
    """The data set this reproduction trains on: ``--data``, else the scale's default."""
    name = ctx.data or TRAINING[ctx.scale]["data"]
    if name not in VALIDATION:
        raise ValueError(f"liao2016 trains on {', '.join(VALIDATION)}; --data {name!r} is not one of them")
    return name


def data_section(ctx: Context, model: str, setup: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``[data]`` table of a run: a validation split for tuning, inputs standardized, digits resized to 28×28
    for LeNet-5 (which takes 28 or 32 pixels); ``setup`` is a ``TRAINING`` row (None: the scale's)."""
    name, setup = data_name(ctx), setup or TRAINING[ctx.scale]
    section: dict[str, Any] = {"name": name, "validation": VALIDATION[name], "normalize": True}
    if name == "digits" and model == "lenet5":
        section["size"] = 28
    if ctx.data_dir is not None and name != "digits":
        section["dir"] = ctx.data_dir
    if setup["train_size"].get(name) is not None:
        section["train_size"] = setup["train_size"][name]
    return section


def cell_config(ctx: Context, cell: Cell, lr: float, seed: int, setup: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """The full training configuration of one run of ``cell``: the same budget for every cell (``setup``: a
    ``TRAINING`` row; None: the scale's)."""
    setup = setup or TRAINING[ctx.scale]
    model: dict[str, Any] = {"name": cell.model, "batchnorm": cell.batchnorm}
    if cell.model == "mlp":
        model["hidden"] = list(setup["hidden"])
    return {"name": f"liao2016-{cell.key}", "seed": seed, "device": str(ctx.device),
            "epochs": setup["epochs"][cell.model], "batch_size": setup["batch_size"], "threads": 1,
            "rule": cell.rule, "model": model, "data": data_section(ctx, cell.model, setup),
            "optimizer": {"name": cell.optimizer, "lr": lr, "momentum": MOMENTUM},
            "schedule": {"name": "cosine"}, "log": {"progress": False}}


@functools.lru_cache(maxsize=4)
def _prepared(data_json: str) -> TensorDataset:
    """A data set as ``[data]`` describes it, loaded once per process."""
    return load_data(load_config({"data": json.loads(data_json)}))


def _train_group(group: dict[str, Any], stop: Stop) -> list[dict[str, Any]] | None:
    """Train a group of runs of one cell (a worker's job): the learning-rate grid at seed 0, or the other seeds at
    the chosen rate. With ``ensemble`` set they train side by side as one :func:`fbalign.train.train_ensemble`
    (each member as its run alone trains), else one after another. Each run's outcome is also kept in
    ``folder/outcome.json`` so that a resumed reproduction reuses it; a divergence is an outcome, not an error.
    None: ``stop`` stopped the group (its checkpoint stays for --resume)."""
    jobs = group["jobs"]
    done = {}
    for index, job in enumerate(jobs):
        if (Path(job["folder"]) / OUTCOME).exists():
            if not group["resume"]:
                raise ReproductionError(f"{job['folder']} holds a finished run; add --resume to reuse it, or "
                                        "--overwrite")
            done[index] = json.loads((Path(job["folder"]) / OUTCOME).read_text())
    todo = [index for index in range(len(jobs)) if index not in done]
    if not todo:
        return [done[index] for index in range(len(jobs))]
    data = _prepared(json.dumps(jobs[todo[0]]["config"]["data"], sort_keys=True))
    try:
        if group["ensemble"] and len(todo) > 1:
            folder = Path(group["folder"]) if group["checkpoints"] else None
            start = time.perf_counter()
            results = train_ensemble([jobs[index]["config"] for index in todo], data=data, run_dir=folder,
                                     resume=group["resume"] and folder is not None, stop=stop)
            if any(result.status == "interrupted" for result in results):
                return None
            seconds = (time.perf_counter() - start) / len(todo)  # the members share the ensemble's time
            for index, result in zip(todo, results):
                done[index] = _keep(jobs[index], result, data, seconds, len(todo))
            if folder is not None:
                (folder / CHECKPOINT).unlink(missing_ok=True)
        else:
            for index in todo:  # each outcome kept as soon as it exists: a stop loses no finished run
                folder = Path(jobs[index]["folder"]) if group["checkpoints"] else None
                start = time.perf_counter()
                result = _train_alone(jobs[index]["config"], data, folder, group["resume"], stop)
                if result.status == "interrupted":
                    return None
                done[index] = _keep(jobs[index], result, data, time.perf_counter() - start, 1)
    except RunDirectoryError as e:  # an unfinished run of a killed reproduction
        raise ReproductionError(f"{e}; add --resume to continue it, or --overwrite") from None
    return [done[index] for index in range(len(jobs))]


def _keep(job: dict[str, Any], result: TrainResult, data: TensorDataset, seconds: float, together: int
          ) -> dict[str, Any]:
    """A run's outcome, written to its ``folder/outcome.json`` (its checkpoint removed: the metrics stay)."""
    config, folder = job["config"], Path(job["folder"])
    outcome: dict[str, Any] = {"lr": config["optimizer"]["lr"], "seed": config["seed"],
                               "chance_error": 100.0 * (1.0 - 1.0 / data.num_classes), "trained_with": together}
    if result.status == "diverged":
        outcome.update(status="diverged", message=result.error)
    else:
        final = result.final
        outcome.update(status="finished", val_error=final["val_error"], val_loss=final["val_loss"],
                       test_error=final["test_error"], train_loss=final["train_loss"],
                       train_error=final["train_error"], test_curve=[h["test_error"] for h in result.history])
    outcome["seconds"] = seconds
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / OUTCOME, json.dumps(outcome) + "\n")
    (folder / CHECKPOINT).unlink(missing_ok=True)
    return outcome


def _train_alone(config: dict[str, Any], data: TensorDataset, folder: Path | None, resume: bool, stop: Stop
                 ) -> TrainResult:
    """One run by :func:`fbalign.train.train`, a divergence reported as ``train_ensemble`` reports a member's."""
    try:
        return train(config, data=data, run_dir=folder, resume=resume and folder is not None, stop=stop)
    except DivergedError as e:
        return TrainResult(torch.nn.Module(), load_config(config), status="diverged", error=str(e).split(";")[0])


def _train_all(groups: list[dict[str, Any]], workers: int | None) -> list[dict[str, Any]]:
    """Every group's outcomes, flattened in order, by :func:`fbalign.runner.run` (``workers`` processes; 1: in
    this one). Ctrl-C or SIGTERM stops every run, keeping what finished, and raises KeyboardInterrupt."""
    found = run(_train_group, groups, workers=workers, executor="inline" if workers == 1 else "process")
    if any(outcomes is None for outcomes in found):  # a group stopped without the runner seeing a signal
        raise KeyboardInterrupt("a training run was stopped; continue with --resume")
    return [outcome for outcomes in found for outcome in outcomes]


def trains_as_ensemble(ctx: Context, model: str) -> bool:
    """Whether a cell's runs of ``model`` train side by side as one ensemble: always on a GPU; on the CPU only
    where that is faster than one after another (``ENSEMBLES_ON_CPU``)."""
    return ctx.device.type != "cpu" or model in ENSEMBLES_ON_CPU


def collapse_kind(outcome: dict[str, Any]) -> str | None:
    """``'diverged'`` (NaN/Inf loss), ``'chance'`` (test error within ``CHANCE_MARGIN`` of chance), or None."""
    if outcome["status"] == "diverged":
        return "diverged"
    return "chance" if outcome["test_error"] >= outcome["chance_error"] - CHANCE_MARGIN else None


def _choose(tuning: Sequence[dict[str, Any]]) -> int:
    """The grid point with the lowest final validation error (validation loss breaks ties); diverged runs never
    win; when every rate diverged, the smallest."""
    finished = [i for i, o in enumerate(tuning) if o["status"] == "finished"]
    if not finished:
        return 0

    def key(i: int) -> tuple[float, float]:
        loss = tuning[i]["val_loss"]
        return tuning[i]["val_error"], loss if math.isfinite(loss) else math.inf

    return min(finished, key=key)


def run_cells(ctx: Context, experiment: str, cells: Sequence[Cell], setup: dict[str, Any] | None = None
              ) -> dict[str, dict[str, Any]]:
    """Train every cell: each rate of its optimizer's grid at seed 0, then the other seeds at the chosen rate, all
    with the budget of ``setup`` (a ``TRAINING`` row; None: the scale's).

    Returns, per cell key: the settings, the tuning runs, the chosen rate (and whether it lies at the grid's edge),
    every seed's outcome, test error mean ± sd over the seeds that did not diverge, and which runs collapsed.
    """
    setup = setup or TRAINING[ctx.scale]
    seeds = ctx.runs(setup["seeds"], setup["seeds"])
    grids = setup["lr_grid"]

    def group(cell: Cell, name: str, runs: list[tuple[float, int]]) -> dict[str, Any]:
        folder = ctx.folder(experiment, cell.key)
        return {"jobs": [{"config": cell_config(ctx, cell, lr, seed, setup),
                          "folder": str(folder / f"lr{lr:g}-seed{seed}")} for lr, seed in runs],
                "folder": str(folder / name), "ensemble": trains_as_ensemble(ctx, cell.model),
                "checkpoints": setup["checkpoints"], "resume": ctx.resume}

    # One process per core on the CPU, one on a GPU (its runs share it badly); the scale row or JOBS may say.
    workers = JOBS or setup.get("workers") or (1 if ctx.device.type != "cpu" else None)
    tuned = iter(_train_all([group(cell, "tuning", [(lr, 0) for lr in grids[cell.optimizer]]) for cell in cells],
                            workers))
    tuning = {cell.key: [next(tuned) for _ in grids[cell.optimizer]] for cell in cells}
    chosen = {cell.key: grids[cell.optimizer][_choose(tuning[cell.key])] for cell in cells}
    trained = iter(_train_all([group(cell, "seeds", [(chosen[cell.key], seed) for seed in range(1, seeds)])
                               for cell in cells if seeds > 1], workers))
    results = {}
    for cell in cells:
        grid = list(grids[cell.optimizer])
        best = grid.index(chosen[cell.key])
        runs = [tuning[cell.key][best]] + [next(trained) for _ in range(1, seeds)]
        kinds = [collapse_kind(o) for o in runs]
        results[cell.key] = {
            "model": cell.model, "rule": cell.rule if isinstance(cell.rule, str) else cell.rule["name"],
            "rule_options": cell.rule, "batchnorm": cell.batchnorm, "optimizer": cell.optimizer,
            "lr": chosen[cell.key], "grid": grid, "at_grid_edge": best in (0, len(grid) - 1),
            "tuning": [{k: o.get(k) for k in ("lr", "status", "val_error", "test_error")} for o in tuning[cell.key]],
            "rates_that_train": sum(collapse_kind(o) is None for o in tuning[cell.key]),
            "runs": runs, "collapse": kinds, "collapsed_runs": sum(k is not None for k in kinds),
            "collapsed": sum(k is not None for k in kinds) > len(runs) / 2,
            "test_error": summary([o["test_error"] for o in runs if o["status"] == "finished"]),
        }
    return results


def _settings(ctx: Context) -> dict[str, Any]:
    setup = TRAINING[ctx.scale]
    name = data_name(ctx)
    return {"data": name, "validation": VALIDATION[name], "epochs": dict(setup["epochs"]),
            "batch_size": setup["batch_size"], "hidden": list(setup["hidden"]),
            "seeds": ctx.runs(setup["seeds"], setup["seeds"]), "momentum": MOMENTUM, "schedule": "cosine",
            "lr_grid": {k: list(v) for k, v in setup["lr_grid"].items()}, "chance_margin": CHANCE_MARGIN,
            "train_size": setup["train_size"].get(name)}


def _errors(cell: dict[str, Any]) -> list[float]:
    return cell["test_error"]["runs"]


def _mean_sd(cell: dict[str, Any]) -> str:
    s = cell["test_error"]
    text = "–" if s["n"] == 0 else f"{s['mean']:.2f} ± {s['sd']:.2f}"
    diverged = sum(k == "diverged" for k in cell["collapse"])
    return text + (f" ({diverged} diverged)" if diverged else "")


def _lr_note(cell: dict[str, Any]) -> str:
    return f"{cell['lr']:g}" + (" (edge)" if cell["at_grid_edge"] else "")


def _settings_text(s: dict[str, Any], what: str) -> str:
    grids = "; ".join(f"{k.upper()} {', '.join(f'{v:g}' for v in grid)}" for k, grid in s["lr_grid"].items())
    size = f"; training on the first {s['train_size']} of the rest" if s.get("train_size") else ""
    return (f"**Set-up** ({what}): {s['data']} ({s['validation']} training examples held out for validation"
            f"{size}), {s['epochs']['mlp']} epochs for the MLP (hidden {s['hidden']}) and "
            f"{s['epochs'].get('lenet5', '–')} for LeNet-5, batch {s['batch_size']}, momentum {s['momentum']}, "
            f"cosine schedule, {s['seeds']} seeds per cell. Learning-rate grids: {grids}; each cell takes the rate "
            "with the lowest final validation error of seed 0 ('edge': the best rate lies at the grid's edge). "
            f"A run has *collapsed* when it diverged or its test error is within {s['chance_margin']:g} points of "
            "chance.")


# ------------------------------------------------------------------------------------------------ magnitudes

def run_magnitudes(ctx: Context) -> dict[str, Any]:
    """BP, uSF, frSF, brSF and FA with BatchNorm and SGD, fbalign's default (rms(W)-scaled) sign rules."""
    scale = MAGNITUDE_SCALE[ctx.scale]
    cells = [Cell(f"{m}-{r}", m, r, True, "sgd") for m in scale["models"] for r in scale["rules"]]
    found = run_cells(ctx, "magnitudes", cells)
    results: dict[str, Any] = {"settings": _settings(ctx), "models": list(scale["models"]),
                               "rules": list(scale["rules"]), "cells": found, "tests": {}}
    for m in scale["models"]:
        cell = {r: found[f"{m}-{r}"] for r in scale["rules"]}
        tests: dict[str, Any] = {}
        signs = [r for r in SIGN_RULES if r in cell]
        tests["sign_rule_p"] = {f"{a} vs {b}": welch_p(_errors(cell[a]), _errors(cell[b]))
                                for i, a in enumerate(signs) for b in signs[i + 1:]}
        means = [cell[r]["test_error"]["mean"] for r in signs]
        tests["sign_rule_spread"] = float(max(means) - min(means)) if means else math.nan
        if "backprop" in cell:
            bp = cell["backprop"]
            tests["vs_bp"] = {r: {"difference": cell[r]["test_error"]["mean"] - bp["test_error"]["mean"],
                                  "p": welch_p(_errors(cell[r]), _errors(bp))}
                              for r in cell if r != "backprop"}
        results["tests"][m] = tests
    return results


def plot_magnitudes(results: dict[str, Any], ctx: Context) -> None:
    figure, ax = new_figure(6.4, 3.6)
    rules, models = results["rules"], results["models"]
    width = 0.8 / len(models)
    x = np.arange(len(rules))
    for j, m in enumerate(models):
        cells = [results["cells"][f"{m}-{r}"] for r in rules]
        means = [c["test_error"]["mean"] for c in cells]
        sds = [c["test_error"]["sd"] for c in cells]
        offset = x + (j - (len(models) - 1) / 2) * width
        ax.bar(offset, means, width * 0.92, yerr=sds, capsize=3, color=COLORS.get(m), alpha=0.75,
               label=MODEL_LABELS.get(m, m))
        for xi, c in zip(offset, cells):
            values = c["test_error"]["runs"]
            ax.plot([xi] * len(values), values, "k.", markersize=3)
    ax.set_xticks(x, [LABELS[r] for r in rules])
    s = results["settings"]
    subset = f" ({s['train_size']} training examples)" if s.get("train_size") else ""
    ax.set(ylabel="test error (%)", title=f"{s['data']}{subset}: BN + SGD, mean ± sd over seeds")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    results["figure"] = ctx.save_figure(figure, "magnitudes.png")


def claims_magnitudes(results: dict[str, Any]) -> list[Claim]:
    """The paper's magnitudes claims against ours, per model: the sign rules alike, random magnitudes not worse
    than BP, FA above chance but below BP (two-sided Welch tests over seeds at ``SIGNIFICANCE``)."""
    rows = []
    for m in results["models"]:
        tests, cells, label = results["tests"][m], {r: results["cells"][f"{m}-{r}"] for r in results["rules"]}, \
            MODEL_LABELS.get(m, m)
        pairs = tests["sign_rule_p"]
        if pairs:
            rows.append(Claim(f"{label}: uSF / frSF / brSF", " / ".join(
                f"{cells[r]['test_error']['mean']:.2f}" for r in SIGN_RULES if r in cells)
                + f" (spread {tests['sign_rule_spread']:.2f})", PAPER["magnitudes"],
                f"no pair differs at Welch p < {SIGNIFICANCE} (p: "
                + ", ".join(f"{k} {fmt(p, 2)}" for k, p in pairs.items()) + ")",
                not any(p < SIGNIFICANCE for p in pairs.values())))
        vs_bp = tests.get("vs_bp", {})
        for r in ("frsf", "brsf"):
            if r in vs_bp:
                d = vs_bp[r]
                rows.append(Claim(f"{label}: {LABELS[r]} − BP (points)", f"{d['difference']:+.2f}",
                                  PAPER["random_magnitudes"],
                                  f"not worse at Welch p < {SIGNIFICANCE} (p {fmt(d['p'], 2)})",
                                  not (d["difference"] > 0 and d["p"] < SIGNIFICANCE)))
        if "fa" in vs_bp:
            d, fa = vs_bp["fa"], cells["fa"]
            beats_chance = not fa["collapsed"]
            worse = d["difference"] > 0 and d["p"] < SIGNIFICANCE
            # Worse than BP but not significantly so at this number of seeds: no verdict either way.
            verdict = None if beats_chance and d["difference"] > 0 and not worse else beats_chance and worse
            rows.append(Claim(f"{label}: FA − BP (points)", f"{d['difference']:+.2f} (FA {_mean_sd(fa)}, chance "
                              f"{fa['runs'][0]['chance_error']:.0f})", PAPER["fa"],
                              f"not collapsed, and worse than BP at Welch p < {SIGNIFICANCE} (p {fmt(d['p'], 2)}; "
                              + ("beats chance" if beats_chance else "collapsed") + ")", verdict))
    return rows


def report_magnitudes(results: dict[str, Any], section: Report, ctx: Context) -> None:
    s = results["settings"]
    section.figure(results["figure"], "Test error of each rule with BatchNorm and SGD (dots: seeds). uSF, frSF "
                   "and brSF are fbalign's defaults here: V = sign(W)[∘M] scaled by rms(W), so every rule's feedback "
                   "has the weights' size and only the magnitudes' *pattern* differs (the paper's bare sign(W) is in "
                   "the BN × BM section).")
    section.text(_settings_text(s, "every cell of this section has BatchNorm and SGD"))
    header = ["rule"] + [f"{MODEL_LABELS.get(m, m)}: test error (%)" for m in results["models"]] + \
        [f"{MODEL_LABELS.get(m, m)}: lr" for m in results["models"]]
    rows = [[LABELS[r]] + [_mean_sd(results["cells"][f"{m}-{r}"]) for m in results["models"]]
            + [_lr_note(results["cells"][f"{m}-{r}"]) for m in results["models"]] for r in results["rules"]]
    section.table(header, rows)
    section.claims(claims_magnitudes(results))
    section.text(
        f"Verdicts use two-sided Welch t-tests over the seeds at p < {SIGNIFICANCE}: with {s['seeds']} seeds "
        "only large differences are detectable, so ✓ on 'do not matter' means 'no difference this run can see'. "
        "Where a row shows ✗ the numbers beside it are the evidence; they were not tuned away.")


# ------------------------------------------------------------------------------------------------ concordance

def run_concordance(ctx: Context) -> dict[str, Any]:
    """Test error against the sign-concordance probability p, with BatchNorm and SGD (as in ``magnitudes``)."""
    scale = CONCORDANCE_SCALE[ctx.scale]
    cells = [Cell(f"{m}-{r}-p{p:g}", m, {"name": r, "concordance": p}, True, "sgd")
             for m in scale["models"] for r in scale["rules"] for p in scale["p"]]
    found = run_cells(ctx, "concordance", cells)
    magnitudes = load_results(ctx.out_dir).get("experiments", {}).get("magnitudes", {}).get("cells", {})
    results: dict[str, Any] = {"settings": _settings(ctx), "models": list(scale["models"]),
                               "rules": list(scale["rules"]), "p": list(scale["p"]), "cells": found, "curves": {},
                               "references": {}}
    for m in scale["models"]:
        for r in scale["rules"]:
            cells = [found[f"{m}-{r}-p{p:g}"] for p in scale["p"]]
            means = [c["test_error"]["mean"] for c in cells]
            low, high = cells[int(np.argmin(scale["p"]))], cells[int(np.argmax(scale["p"]))]
            same = magnitudes.get(f"{m}-{r}")
            results["curves"][f"{m}-{r}"] = {
                "p": list(scale["p"]), "mean": means, "sd": [c["test_error"]["sd"] for c in cells],
                "spearman": float(stats.spearmanr(scale["p"], means).statistic) if len(means) > 2 else math.nan,
                "lowest_minus_highest": low["test_error"]["mean"] - high["test_error"]["mean"],
                "lowest_vs_highest_p": welch_p(_errors(low), _errors(high)),
                # p = 1 is the plain rule: the same runs as magnitudes' cell, bit for bit, when that ran here.
                "p1_equals_plain_rule": (None if same is None or 1.0 not in scale["p"] else
                                         _errors(found[f"{m}-{r}-p1"]) == _errors(same)),
            }
        results["references"][m] = {r: magnitudes[f"{m}-{r}"]["test_error"] for r in ("backprop", "fa")
                                    if f"{m}-{r}" in magnitudes}
    return results


def plot_concordance(results: dict[str, Any], ctx: Context) -> None:
    models = results["models"]
    figure, axes = new_figure(4.2 * len(models), 3.5, len(models))
    axes = np.atleast_1d(axes)
    for ax, m in zip(axes, models):
        for r in results["rules"]:
            curve = results["curves"][f"{m}-{r}"]
            ax.errorbar(curve["p"], curve["mean"], yerr=curve["sd"], marker="o", capsize=3, color=COLORS[r],
                        label=LABELS[r])
        for r, style in (("backprop", "--"), ("fa", ":")):
            ref = results["references"].get(m, {}).get(r)
            if ref is not None:
                ax.axhline(ref["mean"], color=COLORS[r], linestyle=style, linewidth=1, label=f"{LABELS[r]} (reference)")
        ax.set(xlabel="sign concordance p", ylabel="test error (%)", title=MODEL_LABELS.get(m, m))
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="x-small")
    results["figure"] = ctx.save_figure(figure, "concordance.png")


def report_concordance(results: dict[str, Any], section: Report, ctx: Context) -> None:
    s = results["settings"]
    rules = ", ".join(LABELS[r] for r in results["rules"])
    section.figure(results["figure"], f"Test error against the probability p that a feedback element has its "
                   f"weight's sign ({rules}; the disagreeing elements are drawn once per seed), mean ± sd over "
                   "seeds; lines: BP and FA from the magnitudes section (same set-up).")
    section.text(_settings_text(s, f"{rules} with `concordance=p`, BatchNorm and SGD, as in the magnitudes "
                                "section; every p is a cell with its own tuned rate"))
    header = ["p"] + [f"{MODEL_LABELS.get(m, m)} {LABELS[r]}" for m in results["models"] for r in results["rules"]]
    rows = [[p] + [f"{_mean_sd(results['cells'][f'{m}-{r}-p{p:g}'])} @ {_lr_note(results['cells'][f'{m}-{r}-p{p:g}'])}"
                   for m in results["models"] for r in results["rules"]] for p in results["p"]]
    section.table(header, rows)
    section.claims(claims_concordance(results))


def claims_concordance(results: dict[str, Any]) -> list[Claim]:
    """Signs matter: per model and rule, the error falls steadily with p (Spearman ρ ≤ −0.8) and is higher at the
    lowest p than at the highest (Welch); p = 1 reproduces the plain rule's runs bit for bit."""
    rows = []
    for key, curve in results["curves"].items():
        m, r = key.split("-", 1)
        label = f"{MODEL_LABELS.get(m, m)}, {LABELS[r]}"
        significant = curve["lowest_minus_highest"] > 0 and curve["lowest_vs_highest_p"] < SIGNIFICANCE
        # Higher error at low p but not significantly so at this number of seeds: no verdict either way.
        verdict = None if curve["lowest_minus_highest"] > 0 and not significant else significant
        rows.append(Claim(f"{label}: Spearman ρ(p, error)", curve["spearman"], PAPER["signs"],
                          "ρ ≤ −0.8 (falls steadily)", curve["spearman"] <= -0.8))
        rows.append(Claim(f"{label}: error(p={min(curve['p']):g}) − error(p={max(curve['p']):g}) (points)",
                          f"{curve['lowest_minus_highest']:+.2f}", "> 0",
                          f"> 0 at Welch p < {SIGNIFICANCE} (p {fmt(curve['lowest_vs_highest_p'], 2)})", verdict))
        if curve["p1_equals_plain_rule"] is not None:
            rows.append(Claim(f"{label}: p = 1 runs equal the magnitudes section's {LABELS[r]} runs",
                              curve["p1_equals_plain_rule"], True, "bit for bit: concordance=1 is the plain rule",
                              curve["p1_equals_plain_rule"]))
    return rows


# ------------------------------------------------------------------------------------------------ BN × BM

def gradient_at_init(ctx: Context, cell: Cell, examples: int = 256) -> dict[str, list[float]]:
    """How the rule's weight gradients compare with backprop's at initialization, layer by layer (input first),
    on the first ``examples`` training examples: ‖g_rule‖ / ‖g_BP‖ and the angle between them (degrees)."""
    raw = cell_config(ctx, cell, lr=TRAINING[ctx.scale]["lr_grid"][cell.optimizer][0], seed=0)
    data = _prepared(json.dumps(raw["data"], sort_keys=True))
    model = build_model(load_config(raw), data).train()
    x, y = data.train_x[:examples], data.train_y[:examples]
    weights = [layer.weight for _, layer in fbalign.feedback_layers(model)]

    def gradients() -> list[torch.Tensor]:
        torch.manual_seed(0)  # brsf draws its magnitudes in the forward pass
        return [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(x), y), weights)]

    rule = gradients()
    with fbalign.exact_backprop(model):
        exact = gradients()
    ratio = [float(a.norm() / b.norm()) for a, b in zip(rule, exact)]
    angle = [math.degrees(math.acos(max(-1.0, min(1.0, float(F.cosine_similarity(
        a.flatten().double(), b.flatten().double(), 0)))))) for a, b in zip(rule, exact)]
    return {"norm_ratio": ratio, "angle": angle}


def run_bn_bm(ctx: Context) -> dict[str, Any]:
    """The 2×2 grid BatchNorm × Batch Manhattan for every rule, with the paper's bare sign(W) feedback."""
    scale = GRID_SCALE[ctx.scale]
    cells = [Cell(f"{m}-{r}-{g}", m, PAPER_VARIANT[r], bn, opt)
             for m in scale["models"] for r in scale["rules"] for g, (_, bn, opt) in GRID_CELLS.items()]
    found = run_cells(ctx, "bn_bm", cells)
    results: dict[str, Any] = {"settings": _settings(ctx), "models": list(scale["models"]),
                               "rules": list(scale["rules"]), "grid": list(GRID_CELLS),
                               "grid_labels": {g: label for g, (label, _, _) in GRID_CELLS.items()},
                               "cells": found, "init": {}, "verdicts": {}}
    for m in scale["models"]:
        for r in scale["rules"]:
            for bn in (True, False):
                results["init"][f"{m}-{r}-{'bn' if bn else 'nobn'}"] = gradient_at_init(
                    ctx, Cell("init", m, PAPER_VARIANT[r], bn, "sgd"))
            grid = {g: found[f"{m}-{r}-{g}"] for g in GRID_CELLS}
            results["verdicts"][f"{m}-{r}"] = {
                "neither_collapsed": grid[NEITHER]["collapsed"],
                "cells_that_train": [g for g in grid if g != NEITHER and not grid[g]["collapsed"]],
                "collapsed_cells": [g for g in grid if grid[g]["collapsed"]]}
        # How much of the learning-rate grid trains (seed 0 not collapsed), per grid cell: sign rules vs BP.
        results["verdicts"][f"{m}-rate_share"] = {
            group: {g: float(np.mean([found[f"{m}-{r}-{g}"]["rates_that_train"] / len(found[f"{m}-{r}-{g}"]["grid"])
                                      for r in members])) for g in GRID_CELLS}
            for group, members in (("sign rules", [r for r in scale["rules"] if r in SIGN_RULES]),
                                   ("backprop", [r for r in scale["rules"] if r == "backprop"])) if members}
        # The magnitudes finding in the paper's own variant: bare sign rules with BN + BM, against SGD (BP, BN).
        signs = [r for r in scale["rules"] if r in SIGN_RULES]
        results["verdicts"][f"{m}-paper_variant"] = {
            "pairs": {f"{a} vs {b}": welch_p(_errors(found[f"{m}-{a}-bn-bm"]), _errors(found[f"{m}-{b}-bn-bm"]))
                      for i, a in enumerate(signs) for b in signs[i + 1:]},
            "vs_sgd": ({r: {"difference": found[f"{m}-{r}-bn-bm"]["test_error"]["mean"]
                            - found[f"{m}-backprop-bn-sgd"]["test_error"]["mean"],
                            "p": welch_p(_errors(found[f"{m}-{r}-bn-bm"]), _errors(found[f"{m}-backprop-bn-sgd"]))}
                        for r in signs if r != "usf"} if "backprop" in scale["rules"] else {})}
    return results


def plot_bn_bm(results: dict[str, Any], ctx: Context) -> None:
    from matplotlib.colors import LogNorm

    models, rules, grid = results["models"], results["rules"], results["grid"]
    figure, axes = new_figure(4.6 * len(models) + 0.8, 0.6 * len(rules) + 1.5, len(models))
    axes = np.atleast_1d(axes)
    chance = next(iter(results["cells"].values()))["runs"][0]["chance_error"]
    means = [c["test_error"]["mean"] for c in results["cells"].values() if c["test_error"]["n"]]
    # A log scale: the cells that train differ by a point or two, the collapsed ones sit near chance.
    norm = LogNorm(vmin=max(0.1, min(means, default=1.0) * 0.8), vmax=chance)
    image = None
    for ax, m in zip(axes, models):
        cells = [[results["cells"][f"{m}-{r}-{g}"] for g in grid] for r in rules]
        values = np.array([[c["test_error"]["mean"] if c["test_error"]["n"] else chance for c in row]
                           for row in cells])
        image = ax.imshow(np.clip(values, norm.vmin, chance), cmap="viridis_r", norm=norm, aspect="auto")
        for i, row in enumerate(cells):
            for j, c in enumerate(row):
                s = c["test_error"]
                text = f"{s['mean']:.1f}±{s['sd']:.1f}" if s["n"] else "NaN"
                if c["collapsed_runs"]:
                    text += f"\ncollapsed {c['collapsed_runs']}/{len(c['runs'])}"
                dark = norm(max(values[i, j], norm.vmin)) > 0.5
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black",
                        fontweight="bold" if c["collapsed"] else "normal")
        ax.set_xticks(range(len(grid)), [results["grid_labels"][g].replace(" (", "\n(") for g in grid], fontsize=8)
        ax.set_yticks(range(len(rules)), [LABELS[r] for r in rules], fontsize=8)
        ax.set_title(f"{MODEL_LABELS.get(m, m)}: test error (%)", fontsize=9)
    if image is not None:
        bar = figure.colorbar(image, ax=list(axes), shrink=0.9, label="test error (%), log scale")
        ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 90) if norm.vmin <= t <= chance]
        bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
        bar.minorticks_off()
    results["figure"] = ctx.save_figure(figure, "bn_bm.png")


def report_bn_bm(results: dict[str, Any], section: Report, ctx: Context) -> None:
    s, labels = results["settings"], results["grid_labels"]
    section.figure(results["figure"], "BatchNorm (BN) × Batch Manhattan (BM; else SGD) for every rule, test "
                   "error mean ± sd over seeds; 'collapsed k/n': k of n seeds diverged or ended near chance. The sign "
                   "rules are the paper's bare V = sign(W) (uSF) and M∘sign(W), M in [0, 1] (frSF, brSF): "
                   "`usf(scale=1)`, not fbalign's default rms(W)-scaled sign.")
    section.text(_settings_text(s, "the sign rules with scale=1; each of the four cells of a rule tunes its own "
                                "rate on the grid of its optimizer"))
    for m in results["models"]:
        section.text(f"**{MODEL_LABELS.get(m, m)}** (test error %, mean ± sd @ chosen rate; then how many rates of "
                     "the grid trained, i.e. their seed-0 run did not collapse):")
        rows = []
        for r in results["rules"]:
            row: list[Any] = [LABELS[r]]
            for g in results["grid"]:
                c = results["cells"][f"{m}-{r}-{g}"]
                flag = f" **collapsed {c['collapsed_runs']}/{len(c['runs'])}**" if c["collapsed_runs"] else ""
                row.append(f"{_mean_sd(c)}{flag} @ {_lr_note(c)}; {c['rates_that_train']}/{len(c['grid'])}")
            rows.append(row)
        section.table(["rule", *(labels[g] for g in results["grid"])], rows)
    section.text("**The error's size at initialization.** ‖∇W‖ under the rule over backprop's for the first "
                 "(lowest) layer, and the angle between them, on 256 training examples (the output layer's gradient "
                 "is exact under every rule, ratio 1):")
    rows = []
    for m in results["models"]:
        for r in results["rules"]:
            bn, nobn = results["init"][f"{m}-{r}-bn"], results["init"][f"{m}-{r}-nobn"]
            rows.append([MODEL_LABELS.get(m, m), LABELS[r], nobn["norm_ratio"][0], nobn["angle"][0],
                         bn["norm_ratio"][0], bn["angle"][0]])
    section.table(["model", "rule", "no BN: norm ratio", "no BN: angle (°)", "BN: norm ratio", "BN: angle (°)"], rows)
    section.claims(claims_bn_bm(results))
    signs = [(m, r) for m in results["models"] for r in results["rules"] if r in SIGN_RULES]
    if signs:
        collapsed = [f"{MODEL_LABELS.get(m, m)} {LABELS[r]}" for m, r in signs
                     if results["verdicts"][f"{m}-{r}"]["neither_collapsed"]]
        ratios = [results["init"][f"{m}-{r}-nobn"]["norm_ratio"][0] for m, r in signs]
        rates = {g: sorted({results["cells"][f"{m}-{r}-{g}"]["lr"] for m, r in signs}) for g in (NEITHER, "bn-sgd")}
        section.text(
            f"**Reading.** The paper's claim concerns the sign rules: ✓ where the cell with neither BN nor BM "
            f"collapsed and a cell with BN or BM trained. Here the 'neither' cell collapsed for "
            f"{len(collapsed)} of {len(signs)} (model, sign rule) pairs ({', '.join(collapsed) or 'none'}). "
            f"The bare sign(W) makes the first layer's gradient {min(ratios):.3g}–{max(ratios):.3g}× backprop's at "
            "initialization, with or without BN (the table above): BN does not shrink the blow-up, it makes each "
            "layer's output independent of its weights' scale, so an oversized step grows ‖W‖ and so shrinks its "
            "own effective rate; BM makes the step's size independent of the gradient's. Without either, only a "
            f"small rate survives: the 'neither' cells chose {', '.join(f'{x:g}' for x in rates[NEITHER])}, "
            f"the BN + SGD cells {', '.join(f'{x:g}' for x in rates['bn-sgd'])}. Where a ✗ stands, a rate of the "
            "grid trained the bare sign rule without BN and BM: on these small nets they are not indispensable, "
            "only the range of rates that work narrows (compare the share rows with backprop's, which narrows "
            "without BN too).")


def claims_bn_bm(results: dict[str, Any]) -> list[Claim]:
    """BN and/or BM are indispensable to the sign rules: the cell with neither collapses, a cell with one trains;
    the weaker form (the share of rates that train); the magnitudes claims again in the paper's bare-sign variant."""
    labels, rows = results["grid_labels"], []
    for m in results["models"]:
        for r in results["rules"]:
            v = results["verdicts"][f"{m}-{r}"]
            neither = results["cells"][f"{m}-{r}-{NEITHER}"]
            label = f"{MODEL_LABELS.get(m, m)}, {LABELS[r]}"
            ours = (f"neither: {_mean_sd(neither)} @ {_lr_note(neither)}"
                    + (" collapsed" if v["neither_collapsed"] else "")
                    + f"; trains with: {'; '.join(labels[g] for g in v['cells_that_train']) or 'none'}")
            if r in SIGN_RULES:
                rows.append(Claim(label, ours, PAPER["bn_bm"], "the cell with neither BN nor BM collapses and one "
                                  f"with BN or BM trains ({neither['rates_that_train']}/{len(neither['grid'])} rates "
                                  "train without BN and BM)", v["neither_collapsed"] and bool(v["cells_that_train"])))
            else:
                rows.append(Claim(label, ours, "not needed (symmetric or small random feedback)",
                                  "collapsed cells: " + ("; ".join(labels[g] for g in v["collapsed_cells"]) or "none"),
                                  None))
        for group, share in results["verdicts"][f"{m}-rate_share"].items():
            rows.append(Claim(f"{MODEL_LABELS.get(m, m)}, {group}: share of the grid's rates that train",
                              "; ".join(f"{labels[g]} {100 * x:.0f}%" for g, x in share.items()),
                              "(a weaker form of the claim: BN/BM widen the range of workable rates)",
                              "compare the sign rules' row with backprop's" if group != "backprop" else "", None))
        variant = results["verdicts"][f"{m}-paper_variant"]
        if variant["pairs"]:
            means = " / ".join(f"{results['cells'][f'{m}-{r}-bn-bm']['test_error']['mean']:.2f}"
                               for r in results["rules"] if r in SIGN_RULES)
            rows.append(Claim(f"{MODEL_LABELS.get(m, m)}, BN + BM, bare sign: uSF / frSF / brSF", means,
                              PAPER["magnitudes"], f"no pair differs at Welch p < {SIGNIFICANCE} (p: "
                              + ", ".join(f"{k} {fmt(p, 2)}" for k, p in variant["pairs"].items()) + ")",
                              not any(p < SIGNIFICANCE for p in variant["pairs"].values())))
        for r, d in variant["vs_sgd"].items():
            rows.append(Claim(f"{MODEL_LABELS.get(m, m)}, {LABELS[r]} (BN + BM) − BP (BN + SGD) (points)",
                              f"{d['difference']:+.2f}", PAPER["random_magnitudes"],
                              f"not worse at Welch p < {SIGNIFICANCE} (p {fmt(d['p'], 2)})",
                              not (d["difference"] > 0 and d["p"] < SIGNIFICANCE)))
    return rows


# ------------------------------------------------------------------------------------------------ experiments

EXPERIMENTS = [
    Experiment("magnitudes", "Magnitudes of the feedback do not matter (BP, uSF, frSF, brSF, FA)", run_magnitudes,
               report_magnitudes, threads=1, claims=claims_magnitudes, plot=plot_magnitudes),
    Experiment("concordance", "Signs matter: error against sign concordance p", run_concordance,
               report_concordance, needs=("magnitudes",), threads=1, claims=claims_concordance, plot=plot_concordance),
    Experiment("bn_bm", "Batch Normalization × Batch Manhattan", run_bn_bm, report_bn_bm, threads=1,
               claims=claims_bn_bm, plot=plot_bn_bm),
]
