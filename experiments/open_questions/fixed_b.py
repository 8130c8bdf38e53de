"""Which fixed B is best, and at what scale: six kinds of fixed feedback at the same rms, and the rms of a uniform B
swept, on the linear and nonlinear teachers and the image task."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

import fbalign
from fbalign.data import TensorDataset

from ..common import Claim, Context, Report, fmt, welch_p
from ..toolkit import mean_sd, panel_letter, pm, stream_seed
from .shared import (
    _GRIDS,
    _TINY_IMAGE,
    FEEDBACK,
    LILLICRAP_RMS,
    TASK_LABELS,
    _final_values,
    _lr_rule_text,
    _teacher_rule_text,
    fixed_feedback,
    image_data,
    image_settings,
    image_student,
    run_conditions,
    sizes,
    teacher_student,
)

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

    jobs = {(task, name): {"task": task, "examples": size[f"{task}_examples"], "prefix": size[f"{task}_prefix"],
                           "make": functools.partial(fixed_b_model, task=task, name=name, rms=LILLICRAP_RMS)}
            for task in ("linear", "nonlinear") for name in conditions}
    jobs.update({("image", name): {
        "task": "image", "folder": ("fixed-b", name.replace(" ×", "-x")), "on_device": True,
        "make": functools.partial(fixed_b_model, task="image", name=name, hidden=size["image_hidden"])}
        for name in conditions})
    found = run_conditions(ctx, size, jobs)  # the three tasks in one pool of workers (see run_conditions)
    for task in ("linear", "nonlinear", "image"):
        results["tasks"][task] = {name: found[(task, name)] for name in conditions}
    results["headline"] = _fixed_b_headline(results)
    return results


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
        panel_letter(top, "abc"[column])
        means, sds = zip(*(mean_sd(_final_values(task, found["uniform" if m == 1.0 else f"uniform ×{m:g}"]))
                           for m in multipliers))
        bottom.errorbar(multipliers, means, yerr=sds, fmt="o-", color="tab:green", capsize=3,
                        label="uniform B, own tuned η")
        bottom.axhline(bp_mean, color="black", linewidth=1.0, label="backprop")
        bottom.set(xscale="log", xlabel="rms of B / reference rms", ylabel=ylabel)
        bottom.legend(fontsize="x-small")
        panel_letter(bottom, "def"[column])
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
