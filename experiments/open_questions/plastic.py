"""Plastic feedback (Kolen–Pollack, weight mirrors) against a fixed B (fa) and backprop on the image task:
learning speed and ∡(B, Wᵀ) per layer over training (Akrout et al. 2019)."""

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
from ..toolkit import mean_sd, new_figure, panel_letter, pm, stream_seed
from .shared import (
    _GRIDS,
    _TINY_IMAGE,
    FEEDBACK,
    IMAGE_LR_GRID,
    IMAGE_MOMENTUM,
    KP_DECAY,
    MIRROR_BATCH,
    MIRROR_LR,
    PLASTIC_LR_GRID,
    PLASTIC_MOMENTUM,
    RULE_COLORS,
    RULE_LABELS,
    TASK_COST,
    _angle_series,
    _keep_keys,
    _lr_rule_text,
    image_data,
    image_settings,
    image_student,
    run_conditions,
    sizes,
)

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
        # wm's mirror steps and kp's coupled B cost more: 21 s and 18 s against 13 s at quick scale (start first)
        return {"task": "image", "folder": ("plastic", folder), "align_every": size["align_every"], "grid": grid,
                "momentum": momentum, "cost": TASK_COST["image"] * {"wm": 1.6, "kp": 1.4}.get(rule, 1.0),
                "make": functools.partial(plastic_model, hidden=size["hidden"], rule=rule)}

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
    return results


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
    figure, axes = new_figure(4.4 * (1 + len(layers)), 4.0, 1 + len(layers))
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
    panel_letter(axes[0], "a")
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
        panel_letter(ax, "bcdefg"[i])
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
