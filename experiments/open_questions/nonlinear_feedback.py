"""A nonlinear feedback pathway (tanh, hardtanh, softsign, relu, sign at a saturation s) on fa and on backprop:
the final NSE / test error against the linear pathway, and the step time ratio."""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fbalign
from fbalign.data import TensorDataset

from ..common import Claim, Context, Report, fmt, welch_p
from ..toolkit import half_sse, mean_sd, new_figure, panel_letter, pm, stream_seed
from .shared import (
    _GRIDS,
    _TINY_IMAGE,
    FEEDBACK,
    IMAGE_BATCH,
    LILLICRAP_RMS,
    RULE_COLORS,
    RULE_LABELS,
    _final_values,
    _lr_rule_text,
    _teacher_rule_text,
    arriving_error_rms,
    fixed_feedback,
    image_data,
    image_settings,
    image_student,
    run_conditions,
    sizes,
    teacher_student,
    teacher_task,
)

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
    jobs = {("teacher", name): {
        "task": "nonlinear", "examples": size["examples"], "prefix": size["prefix"],
        "make": functools.partial(path_model, task="nonlinear", rule=rule, nonlinearity=f, saturation=k,
                                  reference=references["teacher"][rule], rms=LILLICRAP_RMS)}
        for name, rule, f, k in conditions}
    jobs.update({("image", name): {
        "task": "image", "folder": ("nonlinear-feedback", name.replace(" ", "-").replace("×", "x")), "on_device": True,
        "make": functools.partial(path_model, task="image", rule=rule, nonlinearity=f, saturation=k,
                                  reference=references["image"][rule], hidden=size["image_hidden"])}
        for name, rule, f, k in conditions})
    found = run_conditions(ctx, size, jobs)  # both tasks in one pool of workers (see run_conditions)
    for task in ("teacher", "image"):
        results[task] = {name: found[(task, name)] for name, _, _, _ in conditions}
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
    figure, axes = new_figure(14.0, 4.4, 3)
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
        panel_letter(ax, letter)
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
