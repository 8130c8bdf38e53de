"""Plastic feedback: matrices that learn to mirror the forward weights without reading them.

``kp`` — Kolen–Pollack (Akrout et al. 2019). B (buffer ``feedback``, the weight's shape) receives the same update
as W, and each is decayed towards zero by the same weight decay, so their difference shrinks geometrically:
``V − W ← (1 − lr·λ)(V − W)`` at every optimizer step, whatever the optimizer. B's step is taken automatically
around every ``optimizer.step()`` of any torch optimizer holding the layer's weight (global optimizer step hooks):

    1. before the step:  V ← (1 − lr·λ) · (V − W)       (lr and λ of the weight's param group)
    2. the optimizer updates W as it always does (SGD, momentum, Adam, ...: ΔW)
    3. after the step:   V ← V + W                      (so V_new = V_old + ΔW + lr·λ·(W_old − V_old))

For plain SGD this is exactly Akrout's ``ΔB = −lr·(∂L/∂W + λB)`` (the same gradient step as W, each matrix with its
own decay); with momentum or Adam, B takes W's actual step ΔW. λ is the weight's ``weight_decay`` unless the rule
sets ``decay``; with λ = 0 the offset never shrinks (KP aligns only through the decay), which is warned about. B
changes only at optimizer steps: a forward/backward made to measure something changes nothing, and inside
:func:`fbalign.exact_backprop` no B is updated. A step skipped by ``torch.amp.GradScaler`` (inf/NaN gradients) or a
weight without a gradient leaves B alone. The no-copy trick above keeps the offset in V during the step: no extra
memory.

``wm`` — weight mirrors (Akrout et al. 2019). B is fixed during training (like ``fa``) and learns in separate
*mirror phases*, :func:`mirror`: each layer's input is driven with noise ``x ~ N(0, σ²)``, its output is
``y = W x``, and ``V ← V + η (mean(y xᵀ) − λ V)``. As ``E[y xᵀ] = σ² W``, V converges to ``(σ²/λ) W`` (to W with
the default λ = σ²), using only activity each layer's neurons can see.

    >>> model = fbalign.convert(model, "kp", seed=0)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=1e-3)  # λ: B → W by (1 − lr·λ)/step
    >>> model = fbalign.convert(model, "wm", seed=0)
    >>> fbalign.mirror(model, steps=200)                     # between training epochs
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import nn as fbnn
from .rules import RandomMatrixRule, _check_range, register

__all__ = ["KP", "WM", "mirror"]


@dataclass(frozen=True)
class _PlasticRule(RandomMatrixRule):
    """A random matrix to start from (buffer ``feedback``) that learns afterwards."""

    def setup(self, layer: fbnn.FeedbackLayer) -> None:
        weight = layer.weight.detach()
        start = self.draw(weight.shape, weight)
        layer.add_rule_buffer("feedback", start.to(weight.dtype).to(weight.device))

    def feedback(self, layer: fbnn.FeedbackLayer) -> Tensor:
        return layer.feedback


@register
@dataclass(frozen=True)
class KP(_PlasticRule):
    """Kolen–Pollack: B gets W's update plus its own weight decay, so B → W (see :mod:`fbalign.plastic`).

    Args:
        decay: λ, by which the mismatch shrinks, ``V − W ← (1 − lr·λ)(V − W)`` per optimizer step; None
            (default): the ``weight_decay`` of the weight's param group (KP: both matrices decay alike).
        init, scale, seed: B's starting point (see :class:`fbalign.rules.RandomMatrixRule`).
    """

    name: ClassVar[str] = "kp"
    decay: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decay is not None:
            _check_range(self.name, "decay", self.decay, 0.0, math.inf)

    def attach(self, layer: fbnn.FeedbackLayer) -> None:
        _KP_LAYERS.add(layer)
        _install_optimizer_hooks()


@register
@dataclass(frozen=True)
class WM(_PlasticRule):
    """Weight mirrors: B is fixed while training and learns in mirror phases, :func:`mirror` (see
    :mod:`fbalign.plastic`).

    Args:
        init, scale, seed: B's starting point (see :class:`fbalign.rules.RandomMatrixRule`).
    """

    name: ClassVar[str] = "wm"


# --- Kolen–Pollack: B's step around every optimizer step -----------------------------------------------------------

_KP_LAYERS: weakref.WeakSet[fbnn.FeedbackLayer] = weakref.WeakSet()
# Layers whose V holds the shrunk offset V − W while their optimizer steps, by optimizer.
_IN_STEP: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[fbnn.FeedbackLayer]] = weakref.WeakKeyDictionary()


@functools.cache  # once per process: the hooks serve every optimizer
def _install_optimizer_hooks() -> None:
    register_optimizer_step_pre_hook(_before_step)
    register_optimizer_step_post_hook(_after_step)


@torch.no_grad()
def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _KP_LAYERS:
        return
    if optimizer in _IN_STEP:  # the last step raised before finishing: give those V their W back first
        _after_step(optimizer, args, kwargs)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    stepping, undecayed = [], 0
    for layer in list(_KP_LAYERS):
        rule = layer.rule
        group = group_of.get(id(layer.weight))
        if not isinstance(rule, KP) or group is None or layer.weight.grad is None or layer._exact_override:
            continue
        decay = rule.decay if rule.decay is not None else float(group.get("weight_decay", 0.0))
        if decay == 0.0 and not layer.rule_state.get("kp_warned", False):
            layer.rule_state["kp_warned"] = True
            undecayed += 1
        shrink = 1.0 - float(group["lr"]) * decay
        offset = layer.feedback.sub_(layer.weight)
        if shrink != 1.0:
            offset.mul_(shrink)
        stepping.append(layer)
    if stepping:
        _IN_STEP[optimizer] = stepping
    if undecayed:
        warnings.warn(f"kp: {undecayed} layer(s) have weight decay 0, so their B keeps its initial offset from W "
                      "forever (Kolen–Pollack aligns B with W only through the decay); give the optimizer a "
                      "weight_decay or the rule a decay: fbalign.convert(model, 'kp', decay=...)", stacklevel=4)


@torch.no_grad()
def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for layer in _IN_STEP.pop(optimizer, ()):
        layer.feedback.add_(layer.weight)


# --- Weight mirrors ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def mirror(model: nn.Module, steps: int, *, batch_size: int = 128, noise_std: float = 1.0, lr: float = 0.1,
           decay: float | None = None, generator: torch.Generator | None = None) -> None:
    """A mirror phase: every ``wm`` layer of ``model`` learns its feedback from noise, ``steps`` times.

    Each step draws ``x ~ N(0, noise_std²)`` of shape ``(batch_size, fan_in)`` per layer (per group of a grouped
    convolution: a convolution is mirrored on noise patches, its kernel applied at one position), computes
    ``y = W x`` (no bias: it does not correlate with the noise) and updates
    ``V ← V + lr · (mean_batch(y xᵀ) − decay · V)``. ``E[y xᵀ] = noise_std² · W``, so V moves towards
    ``(noise_std² / decay) · W``; the default ``decay = noise_std²`` makes that W itself, the mismatch shrinking by
    ``(1 − lr · decay)`` per step, up to the noise of the estimate (smaller with larger batches, or smaller ``lr``).

    Only the ``feedback`` buffers change; the weights, their gradients and the optimizer are left alone.

    Args:
        model: a model with ``wm`` layers (``fbalign.convert(model, 'wm')``).
        steps: mirror updates per layer.
        batch_size: noise samples per update.
        noise_std: σ of the driving noise.
        lr: η, the mirror learning rate.
        decay: λ; None: ``noise_std²``.
        generator: draws the noise (its device must be the layers'); None: the default generator of each layer's
            device, so ``torch.manual_seed`` makes a phase reproducible.
    """
    layers = [layer for _, layer in fbnn.feedback_layers(model) if isinstance(layer.rule, WM)]
    if not layers:
        raise ValueError("mirror(): the model has no 'wm' layers; convert it first: fbalign.convert(model, 'wm')")
    if steps < 0 or batch_size < 1 or noise_std <= 0 or lr <= 0:
        raise ValueError(f"mirror(): need steps >= 0, batch_size >= 1, noise_std > 0 and lr > 0; got steps={steps}, "
                         f"batch_size={batch_size}, noise_std={noise_std}, lr={lr}")
    decay = noise_std ** 2 if decay is None else decay
    if decay < 0 or lr * decay >= 2:
        raise ValueError(f"mirror(): lr · decay = {lr * decay} must lie in [0, 2) for the mirror to converge")
    for layer in layers:
        weight = layer.weight.detach()
        groups = getattr(layer, "groups", 1)
        w = weight.reshape(groups, weight.shape[0] // groups, -1)          # (groups, out per group, fan_in)
        v = layer.feedback.view(w.shape)
        for _ in range(steps):
            x = torch.randn(batch_size, groups, w.shape[-1], generator=generator, device=w.device, dtype=w.dtype)
            x.mul_(noise_std)
            y = torch.einsum("bgi,goi->bgo", x, w)
            v.mul_(1.0 - lr * decay).add_(torch.einsum("bgo,bgi->goi", y, x), alpha=lr / batch_size)
