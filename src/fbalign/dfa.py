"""Direct feedback alignment (Nøkland 2016): the output error goes straight to every layer through the layer's own
fixed random matrix.

    >>> model = fbalign.convert(model, "dfa", seed=0)            # the error comes from the last Linear
    >>> model = fbalign.convert(model, "dfa", output="head.fc")  # ...or from the Linear you name
    >>> print(fbalign.summary(model))                            # says which
    >>> loss_fn(model(x), y).backward(); optimizer.step()        # an ordinary training loop

**Where the output error comes from.** ``e`` is the gradient of the loss with respect to the output of the *error
source*, a Linear layer: by default the last dfa layer of the model in module order (a classifier's output layer,
for which ``e = softmax(y) − onehot`` under cross-entropy on its logits), or the one named by ``output=``.
:func:`fbalign.summary` names it. The source's own weights learn from ``e`` exactly (the delta rule).

**How it travels.** Every dfa layer sends ``φ(e · B_l)`` to its *input* in place of the error through its weight,
where ``B_l`` (buffer ``direct_feedback``, shape ``(n_err, in_features)``) is random and fixed. Autograd carries
that signal through whatever lies below (the nonlinearity's derivative, BatchNorm, pooling, reshapes) to the output
of the next layer down, whose weights therefore learn from ``(B_l e) ∘ f′`` — Nøkland's hidden-layer update. No
error passes through a forward weight's transpose, so a dfa step skips backprop's input-gradient products and needs
no memory beyond backprop's but the small ``e · B_l`` signals. ``φ`` is the rule's ``feedback_nonlinearity``
(identity by default).

**Convolutions.** A convolution's input is a ``(C, *spatial)`` map per example. The error reaches it as a
``C × r × r`` map (``resolution=r``, default 2; buffer ``(n_err, C, r, r)``) enlarged to the input's size by
nearest-neighbour upsampling, or with ``resolution=1`` as one signal per channel (buffer ``(n_err, C, 1, 1)``)
broadcast over positions as a stride-0 view that costs no memory. Either way each position gets its cell's value
divided by the number of positions in the cell — the error the input would get through an average pool to
``r × r`` followed by ``B_l`` — because a kernel's gradient sums over positions, and an undivided broadcast signal
would make it grow with the map. A map smaller than ``r × r`` gets the average of the cells over each position.
(The alternative, a matrix onto every position of every map, ``n_err × C·H·W``, applied by a transposed
convolution, costs more time and memory than backprop's own step.)

**Checks, so that a wrong set-up fails loudly.** In every forward of the model that trains (grad enabled), the
source must run once, after every other dfa layer that needs its error; a dfa layer may not run outside a forward
of the model it is wired to (call the model, not a part of it, or convert the part); a layer whose backward runs
without the output error (the loss does not depend on the source's output) raises. Within
:func:`fbalign.exact_backprop` every layer runs plain autograd.

The matrices are drawn when the model is wired (by ``convert``), since their size depends on the source.
``torch.compile`` runs a dfa model (the hand-off of the error breaks the graph into pieces) with eager's gradients;
activation checkpointing, which re-runs layers outside the model's forward, is refused by the checks above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import nn as fbnn
from .functional import Nonlinearity
from .rules import RandomMatrixRule, _check_range, register

__all__ = ["DFA", "DirectFeedback", "wire", "wiring_of"]

_BUFFER = "direct_feedback"


@register
@dataclass(frozen=True)
class DFA(RandomMatrixRule):
    """Direct feedback alignment: the output error reaches the layer's input through a fixed random matrix.

    Args:
        output: name (as in ``model.named_modules()``) of the Linear layer whose output gradient is the error
            sent to every layer; None (default): the last dfa layer in module order.
        resolution: side ``r`` of the map a convolution's input receives per channel (default 2); 1 is one
            signal per channel, broadcast over positions: the cheapest, but it learns less (see the README).
        init, scale, seed: how each ``B_l`` is drawn (see :class:`fbalign.rules.RandomMatrixRule`; ``'weight'``
            does not apply). By default ``B_l`` has the variance torch's init gives a weight of its shape,
            1 / (3 · fan_in) with fan_in = ``in_features`` or ``C · r^d``: with one hidden layer, dfa and fa with
            the same seed draw the same matrix and compute the same gradients.
    """

    name: ClassVar[str] = "dfa"
    output: str | None = None
    resolution: int = 2

    _inits: ClassVar[tuple[str, ...]] = ("uniform", "gaussian", "orthogonal")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output is not None and not isinstance(self.output, str):
            raise TypeError(f"dfa: output must be a layer name (str) or None, not {type(self.output).__name__}")
        if not isinstance(self.resolution, int) or isinstance(self.resolution, bool):
            raise TypeError(f"dfa: resolution must be an int, not {type(self.resolution).__name__}")
        _check_range(self.name, "resolution", self.resolution, 1, math.inf)

    def setup(self, layer: fbnn.FeedbackLayer) -> None:
        """Nothing per layer: ``B_l``'s size depends on the error source, so :func:`wire` draws it."""

    def setup_model(self, model: nn.Module) -> None:
        wire(model, output=self.output)

    # B_l multiplies the network's output error, not the error at the layer's own output as W does.
    local: ClassVar[bool] = False

    def feedback(self, layer: fbnn.FeedbackLayer) -> Tensor:
        """``B_l``, not of the weight's shape: ``(n_err, in_features)``, or ``(n_err, C_in, r, ...)`` for a
        convolution."""
        return _wiring(layer).matrix(layer)

    def local_feedback(self, layer: fbnn.FeedbackLayer) -> Tensor | None:
        """The error source's ``B`` (it carries the error at the source's own output, like fa's); None elsewhere."""
        return self.feedback(layer) if _wiring(layer).source is layer else None

    def forward(self, layer: fbnn.FeedbackLayer, input: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and input.requires_grad):
            return layer.forward_exact(input)
        return layer.forward_send_down(input, _wiring(layer).send_down(layer, self._nonlinearity))


_WIRING = "dfa_wiring"  # key in layer.rule_state


def wiring_of(layer: nn.Module) -> DirectFeedback | None:
    """The :class:`DirectFeedback` wiring ``layer`` belongs to (set by :func:`wire`), or None when it is not wired
    (or is no fbalign layer).

    For layers that run dfa in their own way (a recurrent cell sending each step its own error)::

        >>> wiring = fbalign.dfa.wiring_of(layer)
        >>> layer.forward_send_down(h, wiring.send_down(layer, layer.rule._nonlinearity))
    """
    return getattr(layer, "rule_state", {}).get(_WIRING)


def _wiring(layer: fbnn.FeedbackLayer) -> DirectFeedback:
    wiring = wiring_of(layer)
    if wiring is None:
        raise RuntimeError("this dfa layer is not wired to an output error: DFA needs the whole model. Convert the "
                           "model that contains it, fbalign.convert(model, 'dfa', inplace=True), or call "
                           "fbalign.dfa.wire(model)")
    return wiring


class _Pass:
    """One forward of the wired model: whether its source has run, and its output error once backward knows it."""

    __slots__ = ("error", "source_ran", "receivers")

    def __init__(self) -> None:
        self.error: Tensor | None = None
        self.source_ran = False
        self.receivers: list[str] = []


class _DirectError:
    """The input gradient of one dfa layer in one forward: ``φ(e · B)`` shaped like the layer's input.

    Passed to the layer's autograd op as its ``send_down``; the op calls it in backward with ``(grad_output,
    input)``. The source's call is the first of its pass and records ``e = grad_output``.
    """

    __slots__ = ("forward_pass", "matrix", "nonlinearity", "is_source", "wiring", "layer_name")

    def __init__(self, forward_pass: _Pass, matrix: Tensor, nonlinearity: Nonlinearity | None, is_source: bool,
                 wiring: DirectFeedback, layer_name: str) -> None:
        self.forward_pass, self.matrix, self.nonlinearity = forward_pass, matrix, nonlinearity
        self.is_source, self.wiring, self.layer_name = is_source, wiring, layer_name

    def __call__(self, grad_output: Tensor, input: Tensor) -> Tensor:
        if self.is_source:
            self.forward_pass.error = grad_output
        error = self.forward_pass.error
        if error is None:
            raise RuntimeError(
                f"dfa: layer '{self.layer_name}' got its error before the output error existed: the loss does not "
                f"depend on the output of the error source '{self.wiring.source_name}' through this layer. DFA "
                "takes the error at the source's output; compute the loss from it (the model's output), or choose "
                "another source with fbalign.convert(model, 'dfa', output=...)")
        return _project(error, self.matrix, input, self.nonlinearity, self.layer_name)


_ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _project(error: Tensor, matrix: Tensor, input: Tensor, nonlinearity: Nonlinearity | None,
             layer_name: str) -> Tensor:
    """``φ(e · B)`` shaped like ``input``: broadcast over the dimensions the error lacks (positions of a map,
    or the middle dimensions of a ``(N, *, in)`` input when the error is ``(N, n_err)``)."""
    n_err = matrix.shape[0]
    lead = error.shape[:-1]
    signal = error.reshape(-1, n_err).matmul(matrix.reshape(n_err, -1).to(error.dtype))
    if nonlinearity is not None:
        signal = nonlinearity(signal)
    signal = signal.to(input.dtype)
    if matrix.dim() == 2:  # a Linear layer's input (*, in_features)
        target_lead = input.shape[:-1]
        if lead == target_lead:
            return signal.view(input.shape)
        if len(lead) == 1 and len(target_lead) > 1 and lead[0] == target_lead[0]:
            return signal.view(lead[0], *[1] * (len(target_lead) - 1), -1).expand(input.shape)
    elif len(lead) <= 1 and signal.shape[0] == input.shape[0]:  # a convolution's input (N, C, *spatial)
        # As through an average pool to the matrix's r × r cells: each position gets its cell's value divided by
        # the cell's size, so the signal summed over a map does not grow with the map (no blow-up of the
        # kernels' gradients, which sum over positions).
        low = signal.view(input.shape[0], *matrix.shape[1:])
        spatial = tuple(input.shape[2:])
        cells = tuple(min(r, size) for r, size in zip(matrix.shape[2:], spatial))
        if cells != tuple(matrix.shape[2:]):  # a map smaller than r × r: average the cells that share a position
            low = _ADAPTIVE_AVG_POOL[len(spatial)](low, cells)
        low = low.div_(math.prod(spatial) / math.prod(cells))
        if all(c == 1 for c in cells):
            return low.expand(input.shape)  # a stride-0 view: one value per channel, no memory
        return F.interpolate(low, size=spatial, mode="nearest")
    raise RuntimeError(
        f"dfa: the output error has shape {tuple(error.shape)} but layer '{layer_name}' has input shape "
        f"{tuple(input.shape)}; the error must have the same leading (batch, ...) dimensions as the layer's input, "
        "or only the batch dimension (it is then broadcast over the rest)")


class DirectFeedback(fbnn.ModelWiring):
    """The wiring of a dfa model: which layer is the error source, and one :class:`_Pass` per forward of the model.

    Installed by :func:`wire` as forward hooks on the model; the model's dfa layers hold a reference to it.
    """

    def __init__(self, layers: list[tuple[str, fbnn.FeedbackLayer]], source_name: str) -> None:
        self.layers = layers
        self.source_name = source_name
        self.source = dict(layers)[source_name]
        self._passes: list[_Pass] = []  # a stack: a model may call itself

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_passes": []}  # copies and pickles start with no forward in flight

    @staticmethod
    def matrix(layer: fbnn.FeedbackLayer) -> Tensor:
        """``layer``'s ``B_l`` (its rule buffer)."""
        return getattr(layer, _BUFFER)

    def name_of(self, layer: nn.Module) -> str:
        return next((name for name, other in self.layers if other is layer), type(layer).__name__)

    def before_forward(self, model: nn.Module, args: tuple) -> None:
        self._passes.append(_Pass())

    def after_forward(self, model: nn.Module, args: tuple, output: Any) -> None:
        if not self._passes:
            return
        done = self._passes.pop()
        if output is not None and done.receivers and not done.source_ran:
            raise RuntimeError(
                f"dfa: layers {', '.join(repr(n) for n in done.receivers)} ran in this forward but the error "
                f"source '{self.source_name}' did not run with gradient enabled, so they could never receive the "
                "output error; choose the layer whose output the loss sees: fbalign.convert(model, 'dfa', "
                "output=...)")

    def send_down(self, layer: fbnn.FeedbackLayer, nonlinearity: Nonlinearity | None) -> _DirectError:
        """Register ``layer``'s training forward with the current pass; return what its backward sends down."""
        name = self.name_of(layer)
        if not self._passes:
            raise RuntimeError(
                f"dfa: layer '{name}' ran outside a forward of the model it is wired to, so there is no output "
                f"error for it (it comes from '{self.source_name}'). Train by calling the model itself, or convert "
                "the part you call: fbalign.convert(part, 'dfa', inplace=True)")
        current = self._passes[-1]
        if current.source_ran:
            raise RuntimeError(
                f"dfa: layer '{name}' ran after the error source '{self.source_name}' in the same forward, so the "
                "error cannot reach it. The source must be the last dfa layer to run: name the model's output "
                "layer with fbalign.convert(model, 'dfa', output=...)")
        is_source = layer is self.source
        if is_source:
            current.source_ran = True
        else:
            current.receivers.append(name)
        return _DirectError(current, self.matrix(layer), nonlinearity, is_source, self, name)

    def describe(self) -> str:
        n_err = self.source.weight.shape[0]
        return (f"dfa: the output error is the gradient at the output of '{self.source_name}' ({n_err} units); it "
                f"reaches each of {len(self.layers)} dfa layer(s) through the layer's {_BUFFER} matrix")


def wire(model: nn.Module, output: str | None = None) -> DirectFeedback:
    """Wire ``model``'s dfa layers to its output error: choose the source, draw every ``B_l``, install the hooks.

    ``convert(model, 'dfa')`` calls this; call it yourself after building a model from ``fbalign.nn`` layers with
    ``rule='dfa'``, or after changing layers' rules by hand. Rewiring redraws the matrices from each layer's seed.

    Args:
        model: the module whose forward produces the output the loss sees.
        output: name of the Linear layer whose output gradient is the error (default: the last dfa layer).
    """
    layers = [(name, layer) for name, layer in fbnn.feedback_layers(model) if isinstance(layer.rule, DFA)]
    if not layers:
        raise ValueError("dfa: the model has no dfa layers to wire; convert it with fbalign.convert(model, 'dfa')")
    names = [name for name, _ in layers]
    source_name = names[-1] if output is None else output
    if source_name not in names:
        raise ValueError(f"dfa: output={output!r} is not a dfa layer of the model; its dfa layers are: "
                         f"{', '.join(names)}")
    source = dict(layers)[source_name]
    if not isinstance(source, nn.Linear):
        raise ValueError(f"dfa: the error source '{source_name}' is a {type(source).__name__}; the output error must "
                         "come from a Linear layer (a classifier's or regressor's output layer): name one with "
                         "output=...")
    DirectFeedback.remove(model)
    wiring = DirectFeedback(layers, source_name)
    n_err = source.out_features
    for _, layer in layers:
        rule: DFA = layer.rule  # type: ignore[assignment]
        weight = layer.weight.detach()
        if isinstance(layer, nn.Linear):
            shape: tuple[int, ...] = (n_err, layer.in_features)
        else:
            shape = (n_err, layer.in_channels, *[rule.resolution] * (weight.dim() - 2))
        layer.add_rule_buffer(_BUFFER, rule.draw(shape).to(weight.dtype).to(weight.device))
        layer.rule_state[_WIRING] = wiring
    wiring.install(model)
    return wiring
