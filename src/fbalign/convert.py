"""Turn any ``nn.Module`` into a model trained with a feedback rule, in one line, and list what was done."""

from __future__ import annotations

import copy
import warnings
from typing import Any, TypeVar

import numpy as np
from torch import nn

from . import nn as fbnn
from . import rules
from .rules import FeedbackRule

__all__ = ["convert", "summary", "unconverted", "UnconvertedModuleWarning"]

_M = TypeVar("_M", bound=nn.Module)

_CONVERTIBLE: dict[type[nn.Module], type[fbnn.FeedbackLayer]] = {
    nn.Linear: fbnn.Linear,
    nn.Conv1d: fbnn.Conv1d,
    nn.Conv2d: fbnn.Conv2d,
    nn.Conv3d: fbnn.Conv3d,
}

# Modules whose weights torch applies inside its own functional code or fused kernels: fbalign cannot
# reroute their error, so they keep exact backprop and the user is told.
_FUNCTIONAL_WEIGHTS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.MultiheadAttention, "its projections are applied inside F.multi_head_attention_forward, so the error still "
                            "goes down through their exact transposes; build attention from nn.Linear to convert it"),
    (nn.RNNBase, "its weights run inside a fused recurrent kernel, so the error still goes down through their "
                 "exact transposes; write the recurrence with nn.Linear cells to convert it"),
    (nn.RNNCellBase, "its weights are applied by a fused cell kernel with exact transposes; "
                     "write the cell with nn.Linear to convert it"),
    (nn.Embedding, "its weights are looked up by index: they learn from the error that reaches them, and no error "
                   "goes below them, so there is nothing to convert"),
    (nn.EmbeddingBag, "its weights are looked up by index: they learn from the error that reaches them, and no "
                      "error goes below them, so there is nothing to convert"),
    (nn.Bilinear, "bilinear weights have no feedback rule here; the error goes down through them exactly"),
    (nn.modules.conv._ConvTransposeNd, "transposed convolutions have no feedback rule here; the error goes down "
                                       "through them exactly"),
)

# Layers whose parameters act elementwise or per channel: no weight transport, exact gradients are local.
_ELEMENTWISE = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.PReLU)


class UnconvertedModuleWarning(UserWarning):
    """``convert`` met modules whose weights it cannot give a feedback rule."""


def _convertible(module: nn.Module) -> type[fbnn.FeedbackLayer] | None:
    if isinstance(module, fbnn.FeedbackLayer):
        return type(module)
    for torch_type, ours in _CONVERTIBLE.items():
        # A subclass with its own forward may do anything with its weight; leave it to the user.
        if isinstance(module, torch_type) and type(module).forward is torch_type.forward:
            return ours
    return None


def _functional_reason(module: nn.Module) -> str | None:
    for kind, reason in _FUNCTIONAL_WEIGHTS:
        if isinstance(module, kind):
            return reason
    return None


def unconverted(model: nn.Module) -> dict[str, str]:
    """Modules of ``model`` with weights that no feedback rule governs, mapped to the reason.

    Children of a reported module are not listed separately (MultiheadAttention's ``out_proj`` belongs to it).
    """
    found: dict[str, str] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            reason = _functional_reason(child)
            if reason is not None:
                found[path] = f"{type(child).__name__}: {reason}"
                continue
            if _convertible(child) is not None:
                continue
            if not isinstance(child, _ELEMENTWISE):
                if any(p.dim() >= 2 for p in child.parameters(recurse=False)):
                    found[path] = (f"{type(child).__name__}: a custom module whose own weights are used by its "
                                   "own code, so the error goes down through them exactly; build it from "
                                   "nn.Linear/nn.Conv or convert it yourself")
            walk(child, path + ".")

    walk(model, "")
    return found


def _layer_seed(seed: int, index: int) -> int:
    """Independent, reproducible per-layer seeds from one user seed."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1)[0])


def convert(model: _M, rule: str | FeedbackRule = "fa", *, inplace: bool = False, seed: int | None = None,
            **options: Any) -> _M:
    """Convert every ``Linear`` and ``Conv1d/2d/3d`` in ``model``'s module tree to the feedback ``rule``.

    Works through any nesting (Sequential, custom modules, ModuleList/ModuleDict); a layer used in several
    places stays shared. Already-converted layers get the new rule. Parameters are shared with the original
    layers (so with ``inplace=True`` an existing optimizer keeps working); forward outputs are unchanged.

    Args:
        model: any module.
        rule: rule name (see :func:`fbalign.rules.available`) or rule object.
        inplace: modify ``model`` itself instead of a deep copy.
        seed: seeds every layer's feedback (each layer gets its own stream derived from ``seed`` and its
            position); None draws from torch's global RNG. Ignored by rules that use no randomness, so one
            call can loop over rules.
        **options: the rule's options, e.g. ``init='gaussian'``.

    Returns:
        The converted model. Modules whose weights cannot be converted (MultiheadAttention, RNNs, Embedding,
        custom modules with their own weight matrices) are named in an :class:`UnconvertedModuleWarning`.
    """
    template = rules.get(rule, **options)
    uses_seed = "seed" in template.__dataclass_fields__
    if not inplace:
        model = copy.deepcopy(model)
    done: dict[int, nn.Module] = {}

    def layer_rule() -> FeedbackRule:
        if seed is None or not uses_seed:
            return template
        return rules.get(template, seed=_layer_seed(seed, len(done)))

    def walk(module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            if _functional_reason(child) is not None:
                continue
            target = _convertible(child)
            if target is None:
                walk(child)
                continue
            if id(child) not in done:
                if isinstance(child, fbnn.FeedbackLayer):
                    done[id(child)] = child.set_rule(layer_rule())
                else:
                    done[id(child)] = target.from_module(child, layer_rule())
            setattr(module, name, done[id(child)])

    single = _convertible(model)
    if single is not None:
        raise TypeError(f"convert() takes a model that contains layers; to convert a single {type(model).__name__} "
                        f"use fbalign.nn.{single.__name__}.from_module(layer, rule)")
    fbnn.ModelWiring.remove(model)  # a previous rule's model-level machinery (dfa's) goes with it
    walk(model)
    template.setup_model(model)
    skipped = unconverted(model)
    if skipped:
        listed = "\n".join(f"  {name}: {why}" for name, why in skipped.items())
        warnings.warn(f"convert(): {len(skipped)} module(s) keep exact backprop (weight transport):\n{listed}",
                      UnconvertedModuleWarning, stacklevel=2)
    return model


def summary(model: nn.Module) -> str:
    """A table of every layer with its rule and feedback buffers, then the modules no rule governs."""
    rows = [("layer", "type", "weight", "rule", "rule buffers")]
    for name, module in model.named_modules():
        if isinstance(module, fbnn.FeedbackLayer):
            buffers = ", ".join(f"{b}{tuple(getattr(module, b).shape)}" for b in module._rule_buffers) or "-"
            rows.append((name, type(module).__name__, str(tuple(module.weight.shape)), str(module.rule), buffers))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_layers = len(rows) - 1
    lines.append(f"{n_layers} feedback layer(s)")
    lines.extend(wiring.describe() for wiring in fbnn.ModelWiring.installed(model))
    skipped = unconverted(model)
    if skipped:
        lines.append(f"{len(skipped)} module(s) with exact backprop (weight transport):")
        lines.extend(f"  {name}: {why}" for name, why in skipped.items())
    return "\n".join(lines)
