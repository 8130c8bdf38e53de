"""Turn any ``nn.Module`` into a model trained with a feedback rule, in one line, and list what was done."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from torch import nn

from . import nn as fbnn
from . import recurrent, rules
from .attention import MultiheadAttention
from .rules import FeedbackRule

__all__ = ["convert", "summary", "unconverted", "UnconvertedModuleWarning"]

_M = TypeVar("_M", bound=nn.Module)

_CONVERTIBLE: dict[type[nn.Module], type[fbnn.FeedbackLayer]] = {
    nn.Linear: fbnn.Linear,
    nn.Conv1d: fbnn.Conv1d,
    nn.Conv2d: fbnn.Conv2d,
    nn.Conv3d: fbnn.Conv3d,
    nn.ConvTranspose1d: fbnn.ConvTranspose1d,
    nn.ConvTranspose2d: fbnn.ConvTranspose2d,
    nn.ConvTranspose3d: fbnn.ConvTranspose3d,
    nn.Bilinear: fbnn.Bilinear,
}

# Modules whose weights torch applies inside its own functional code or fused kernels: fbalign cannot
# reroute their error, so they keep exact backprop and the user is told.
_FUNCTIONAL_WEIGHTS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.MultiheadAttention, "a subclass with its own forward: its projections are applied by its own code, so the "
                            "error still goes down through their exact transposes; convert the plain module, or "
                            "build it from fbalign.attention.MultiheadAttention"),
    (nn.RNNBase, "a subclass with its own forward: its weights run inside a fused recurrent kernel, so the error "
                 "still goes down through their exact transposes; use fbalign.recurrent's modules"),
    (nn.RNNCellBase, "a subclass with its own forward: its weights are applied by a fused cell kernel with exact "
                     "transposes; use fbalign.recurrent's cells"),
    (nn.Embedding, "its weights are looked up by index: they learn from the error that reaches them, and no error "
                   "goes below them, so there is nothing to convert"),
    (nn.EmbeddingBag, "its weights are looked up by index: they learn from the error that reaches them, and no "
                      "error goes below them, so there is nothing to convert"),
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
    if getattr(module, "replaces", None) is not None:  # fbalign's own attention or recurrent module
        return None
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
            if reason is not None and _restructurable(child):
                reason = ("no rule was chosen for it, so its weights keep torch's exact backprop; convert it to give "
                          "them a rule")
            if reason is not None:
                found[path] = f"{type(child).__name__}: {reason}"
                continue
            if _convertible(child) is not None:
                continue
            if not isinstance(child, _ELEMENTWISE) and getattr(child, "replaces", None) is None:
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


Pattern = str | type | tuple
RuleSpec = str | FeedbackRule | tuple


class _Plan:
    """Which rule each layer gets under a rule or a ``{pattern: rule}`` mapping (see :func:`convert`)."""

    def __init__(self, rule: RuleSpec | Mapping[Pattern, RuleSpec], options: dict[str, Any]) -> None:
        if isinstance(rule, Mapping):
            if options:
                raise TypeError(f"convert(): with a mapping of rules give each rule's options in the mapping, "
                                f"{{pattern: (rule, {{...}})}}, not as keywords ({', '.join(options)})")
            if not rule:
                raise ValueError("convert(): the mapping of rules is empty; give at least one {pattern: rule}")
            entries = [(pattern, self._template(spec)) for pattern, spec in rule.items()]
            for pattern, _ in entries:
                self._check_pattern(pattern)
        else:
            entries = [("*", rules.get(rule, **options))]
        # "*" is the default: it applies where no other pattern does, wherever it stands in the mapping.
        self.entries = [e for e in entries if e[0] != "*"] + [e for e in entries if e[0] == "*"]
        self.used: set[int] = set()

    @staticmethod
    def _template(spec: RuleSpec) -> FeedbackRule:
        if isinstance(spec, tuple):
            if len(spec) != 2 or not isinstance(spec[1], Mapping):
                raise TypeError(f"convert(): a rule with options is written (rule, {{option: value}}), not {spec!r}")
            return rules.get(spec[0], **spec[1])
        return rules.get(spec)

    @staticmethod
    def _check_pattern(pattern: Pattern) -> None:
        kinds = pattern if isinstance(pattern, tuple) else (pattern,)
        for kind in kinds:
            if not (isinstance(kind, str) or (isinstance(kind, type) and issubclass(kind, nn.Module))):
                raise TypeError(f"convert(): pattern {pattern!r} must be a module-name glob (str), an nn.Module "
                                "class, or a tuple of them")

    @staticmethod
    def _matches(pattern: Pattern, name: str, module: nn.Module) -> bool:
        if isinstance(pattern, tuple):
            return any(_Plan._matches(p, name, module) for p in pattern)
        if isinstance(pattern, str):
            return fnmatch.fnmatchcase(name, pattern)
        # A rebuilt attention or recurrent module still matches the torch class it replaces.
        return isinstance(module, pattern) or issubclass(getattr(module, "replaces", type(None)), pattern)

    def rule_for(self, lineage: list[tuple[str, nn.Module]]) -> FeedbackRule | None:
        """The rule of the first pattern matching the layer (last in ``lineage``) or a module containing it."""
        for index, (pattern, template) in enumerate(self.entries):
            if any(self._matches(pattern, name, module) for name, module in lineage):
                self.used.add(index)
                return template
        return None

    def note(self, name: str, module: nn.Module) -> None:
        """Record the patterns that match ``module`` (to name those that match nothing)."""
        for index, (pattern, _) in enumerate(self.entries):
            if index not in self.used and self._matches(pattern, name, module):
                self.used.add(index)

    def unused(self) -> list[Pattern]:
        return [pattern for index, (pattern, _) in enumerate(self.entries) if index not in self.used]


def _restructurable(module: nn.Module) -> Any:
    """How to rebuild ``module`` from ``nn.Linear`` children (attention, recurrent nets), or None."""
    for torch_type, build in _restructurers().items():
        if isinstance(module, torch_type) and type(module).forward is torch_type.forward:
            return build
    return None


def _restructure(module: nn.Module) -> nn.Module | None:
    """The same module rebuilt from ``nn.Linear`` children (sharing its Parameters), or None."""
    build = _restructurable(module)
    return None if build is None else build(module)


def _restructurers() -> dict[type[nn.Module], Any]:
    return {nn.MultiheadAttention: MultiheadAttention.from_module, **recurrent.RESTRUCTURE}


def convert(model: _M, rule: RuleSpec | Mapping[Pattern, RuleSpec] = "fa", *, inplace: bool = False,
            seed: int | None = None, **options: Any) -> _M:
    """Give every layer with weights in ``model``'s module tree a feedback rule: ``Linear``, ``Conv1d/2d/3d``,
    ``ConvTranspose1d/2d/3d``, ``Bilinear``, the projections of ``MultiheadAttention`` (and so of every
    ``nn.Transformer*`` module) and the weights of ``RNN``/``LSTM``/``GRU`` and their cells.

    Works through any nesting (Sequential, custom modules, ModuleList/ModuleDict); a layer used in several
    places stays shared. Already-converted layers get the new rule. Parameters are shared with the original
    layers (so with ``inplace=True`` an existing optimizer keeps working); forward outputs are unchanged.
    Attention and recurrent modules are rebuilt from ``nn.Linear`` children (:mod:`fbalign.attention`,
    :mod:`fbalign.recurrent`) that then take the rule like any Linear.

    Args:
        model: any module.
        rule: a rule name (see :func:`fbalign.rules.available`) or rule object, or a mapping
            ``{pattern: rule or (rule, {option: value})}`` choosing the rule per layer. A pattern is a module-name
            glob as in ``model.named_modules()`` (``"head"``, ``"encoder.layers.*.linear1"``), an ``nn.Module``
            class (``nn.Conv2d``, ``nn.MultiheadAttention``) or a tuple of them; it governs the modules it matches
            and everything inside them. The first matching pattern wins; ``"*"`` is the default wherever it stands;
            a layer no pattern matches stays as it is; ``"backprop"`` keeps exact backprop. A pattern that matches
            no module raises ``ValueError`` naming it.
        inplace: modify ``model`` itself instead of a deep copy.
        seed: seeds every layer's feedback (each layer gets its own stream derived from ``seed`` and its
            position); None draws from torch's global RNG. Ignored by rules that use no randomness, so one
            call can loop over rules.
        **options: the rule's options, e.g. ``init='gaussian'`` (with a single rule only).

    Returns:
        The converted model. Modules whose weights cannot be converted (Embedding, custom modules with their own
        weight matrices, subclasses with their own forward) are named in an :class:`UnconvertedModuleWarning`.

    Example::

        >>> fbalign.convert(model, {"head": "backprop", nn.MultiheadAttention: "backprop", "*": "usf"})
    """
    single = _convertible(model)
    if single is not None:
        raise TypeError(f"convert() takes a model that contains layers; to convert a single {type(model).__name__} "
                        f"use fbalign.nn.{single.__name__}.from_module(layer, rule)")
    plan = _Plan(rule, options)
    if not inplace:
        model = copy.deepcopy(model)

    # First decide everything (so a bad mapping changes nothing), then apply.
    restructured: dict[int, nn.Module] = {}
    layers: dict[int, tuple[nn.Module, FeedbackRule]] = {}
    edits: list[tuple[nn.Module, str, nn.Module]] = []
    left_by_choice: set[str] = set()  # attention/recurrent modules no pattern chose: no warning for them

    def governs(module: nn.Module, lineage: list[tuple[str, nn.Module]]) -> bool:
        """Whether some layer inside ``module`` (or itself) gets a rule; plans it when so."""
        name = lineage[-1][0]
        plan.note(name, module)
        if _functional_reason(module) is not None and _restructure(module) is None:
            return False
        target = _convertible(module)
        if target is not None:
            chosen = plan.rule_for(lineage)
            if chosen is not None and id(module) not in layers:
                layers[id(module)] = (module, chosen)
            return chosen is not None or id(module) in layers
        any_rule = False
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if id(child) in restructured:
                edits.append((module, child_name, restructured[id(child)]))
                any_rule = True
                continue
            rebuilt = _restructure(child)
            if rebuilt is not None:
                if governs(rebuilt, [*lineage, (path, rebuilt)]):
                    restructured[id(child)] = rebuilt
                    edits.append((module, child_name, rebuilt))
                    any_rule = True
                else:
                    left_by_choice.add(path)
                continue
            any_rule |= governs(child, [*lineage, (path, child)])
        return any_rule

    governs(model, [("", model)])
    unused = plan.unused()
    if unused:
        raise ValueError(f"convert(): pattern(s) {', '.join(map(repr, unused))} match no module of the model; "
                         "patterns are names as in model.named_modules() (globs allowed) or module classes")

    for parent, child_name, rebuilt in edits:
        setattr(parent, child_name, rebuilt)
    fbnn.ModelWiring.remove(model)  # a previous rule's model-level machinery (dfa's) goes with it
    converted: dict[int, nn.Module] = {}
    for index, (layer, template) in enumerate(layers.values()):
        chosen = template
        if seed is not None and "seed" in template.__dataclass_fields__:
            chosen = rules.get(template, seed=_layer_seed(seed, index))
        if isinstance(layer, fbnn.FeedbackLayer):
            converted[id(layer)] = layer.set_rule(chosen)
        else:
            converted[id(layer)] = _convertible(layer).from_module(layer, chosen)  # type: ignore[union-attr]

    def replace(module: nn.Module) -> None:
        for child_name, child in list(module.named_children()):
            if id(child) in converted:
                setattr(module, child_name, converted[id(child)])
            else:
                replace(child)

    replace(model)
    setups: dict[type, FeedbackRule] = {}
    for _, template in plan.entries:
        setups.setdefault(type(template), template)
    for template in setups.values():
        if any(type(r) is type(template) for _, r in layers.values()):
            template.setup_model(model)
    skipped = {name: why for name, why in unconverted(model).items() if name not in left_by_choice}
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
    plain = [name for name, module in model.named_modules()
             if name and not isinstance(module, fbnn.FeedbackLayer) and _convertible(module) is not None]
    if plain:
        lines.append(f"{len(plain)} layer(s) left as torch's (exact backprop): {', '.join(plain)}")
    lines.extend(wiring.describe() for wiring in fbnn.ModelWiring.installed(model))
    skipped = unconverted(model)
    if skipped:
        lines.append(f"{len(skipped)} module(s) with exact backprop (weight transport):")
        lines.extend(f"  {name}: {why}" for name, why in skipped.items())
    return "\n".join(lines)
