"""BP / FA / DFA / KP with more and more hidden layers on the image task: test error against depth, and the
alignment of the lowest hidden layer's update."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from torch import nn

import fbalign
from fbalign.data import TensorDataset

from ..common import Claim, Context, Report, fmt
from ..toolkit import mean_sd, new_figure, panel_letter, stream_seed
from .shared import (
    _GRIDS,
    _TINY_IMAGE,
    FEEDBACK,
    KP_DECAY,
    RULE_COLORS,
    RULE_LABELS,
    _angle_series,
    _keep_keys,
    _lr_rule_text,
    image_data,
    image_settings,
    image_student,
    run_conditions,
    sizes,
)

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
    figure, axes = new_figure(13.0, 3.8, 3)
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
        panel_letter(ax, letter)
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
