"""Layers holding E members' weights stacked along a leading member dimension, for :class:`fbalign.Ensemble`.

Every tensor here has the member dimension first: inputs ``(E, N, ...)``, weights ``(E, *weight.shape)``, rule
buffers ``(E, *buffer.shape)``. A :class:`StackedLayer` runs all E members' Linear (one batched matmul) or
convolution (one grouped convolution) in one op, and its backward sends each member's error down through that
member's own feedback matrix, which it gets from the member's rule:

* a rule whose feedback is one of the layer's buffers (fa, kp, wm) or its weight (backprop with a nonlinear
  pathway) uses the stacked buffer or weight directly;
* any other rule (usf, frsf, brsf, concordance, pbp) runs its own ``feedback(layer)`` code under
  :func:`torch.func.vmap`, once per step for all members: the rule's code is the one place its matrix is defined;
* ``shallow`` sends nothing down; backprop (and a plain, unconverted layer) is plain autograd;
* members mixing backprop, fa and shallow (:data:`MIXABLE_RULES`) send their error through W, B or 0, chosen per
  member in one ``torch.where``.

brsf's per-step redraw and dfa's output error are the two per-step actions a rule takes besides its matrix; they
are done here per member (brsf from each member's own generator, dfa through :func:`fbalign.dfa._project`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional
from .rules import BRSF, FA, Backprop, FeedbackRule, Shallow

__all__ = ["StackedLayer", "stacked_linear", "MIXABLE_RULES"]

# Rules whose feedback is a stored matrix (W, a fixed B) or nothing: members of one ensemble may mix these (a rule
# comparison as one model). Per member, the matrix is W (backprop), B (fa) or 0 (shallow: the layers below get a
# zero gradient where alone they get none, the same step for optimizers that do not move a weight whose gradient is
# zero, i.e. all but weight decay).
MIXABLE_RULES = (Backprop, FA, Shallow)

def stacked_linear(input: Tensor, weight: Tensor, bias: Tensor | None, feedback: Any = "exact",
                   nonlinearity: functional.Nonlinearity | None = None) -> Tensor:
    """E Linear layers on ``input (E, *, in)`` with ``weight (E, out, in)``, ``bias (E, out)``: ``(E, *, out)``.

    ``feedback``: ``'exact'`` (plain autograd), a tensor ``(E, out, in)`` the error goes down through, None (no
    error goes below), or a callable ``(grad_output, input) -> grad_input`` on the ``(E, N, ...)`` views.
    """
    three_d = input.dim() == 3  # (E, N, in) as it is: no reshape and view nodes in the graph (the online tasks)
    flat = input if three_d else input.reshape(input.shape[0], -1, input.shape[-1])
    if isinstance(feedback, str):
        out = (torch.bmm(flat, weight.mT) if bias is None else torch.baddbmm(bias.unsqueeze(1), flat, weight.mT))
    elif feedback is None or isinstance(feedback, Tensor):
        out = functional.linear(flat, weight, bias, feedback, feedback_nonlinearity=nonlinearity)
    else:
        out = functional.linear(flat, weight, bias, None, feedback_nonlinearity=nonlinearity, send_down=feedback)
    return out if three_d else out.view(*input.shape[:-1], out.shape[-1])


class _MemberView:
    """What a rule's ``feedback(layer)`` reads of a layer (its weight and rule buffers), for one member under vmap."""

    def __init__(self, names: tuple[str, ...], weight: Tensor, *buffers: Tensor) -> None:
        self.weight = weight
        self._rule_buffers = list(names)
        for name, buffer in zip(names, buffers):
            setattr(self, name, buffer)


def _member_feedback(rule: FeedbackRule, names: tuple[str, ...], weight: Tensor, *buffers: Tensor) -> Tensor:
    return rule.feedback(_MemberView(names, weight, *buffers))  # type: ignore[arg-type]


class StackedLayer(nn.Module):
    """E members' copies of one Linear or Conv layer (fbalign's, with any rule, or torch's, trained by backprop).

    Parameters ``weight (E, *shape)`` and ``bias (E, out)``, the rule's buffers stacked likewise under their own
    names, so ``state_dict`` keys match the members'. Forward: ``(E, N, ...) -> (E, N, ...)``.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        first = layers[0]
        object.__setattr__(self, "template", first)  # shapes and conv arguments only (not a submodule)
        self.is_conv = not isinstance(first, nn.Linear)
        rules = [getattr(layer, "rule", None) for layer in layers]
        self.mixed = _mixes(rules)
        self.rule: FeedbackRule | None = None if self.mixed else rules[0]
        self.member_rules = rules
        self._check_alike(layers, rules)
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]).clone())
        self.bias = (None if first.bias is None else
                     nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]).clone()))
        owned = [tuple(getattr(layer, "_rule_buffers", ())) for layer in layers]
        self.buffer_names: tuple[str, ...] = tuple(dict.fromkeys(name for names in owned for name in names))
        for name in self.buffer_names:
            like = next(getattr(layer, name) for layer, names in zip(layers, owned) if name in names)
            self.register_buffer(name, torch.stack([getattr(layer, name) if name in names else torch.zeros_like(like)
                                                    for layer, names in zip(layers, owned)]).clone())
        if self.mixed:  # which members send their error through W; the others through B (fa) or 0 (shallow)
            through_weight = [rule is None or isinstance(rule, Backprop) for rule in rules]
            self.register_buffer("through_weight", torch.tensor(through_weight).view(-1, *[1] * first.weight.dim()),
                                 persistent=False)
        self.generators: list[torch.Generator] | None = None  # brsf's per-member streams, set by the Ensemble
        self.dfa_pass: Any = None  # set by the Ensemble for each forward of a dfa ensemble
        self.is_dfa_source = False
        self.sends_nothing = False
        self.matrix_source = self._matrix_source(first)

    @staticmethod
    def _check_alike(layers: list[nn.Module], rules: list[FeedbackRule | None]) -> None:
        first = layers[0]

        mixed = _mixes(rules)

        def key(layer: nn.Module, rule: FeedbackRule | None) -> tuple:
            options = () if rule is None or mixed else tuple(
                (name, repr(getattr(rule, name))) for name in rule.__dataclass_fields__ if name != "seed")
            kind = () if mixed else (type(rule), tuple(getattr(layer, "_rule_buffers", ())))
            return (type(layer), layer.weight.shape, layer.weight.dtype, layer.bias is None, *kind, options,
                    getattr(layer, "_exact_override", False))
        for index, (layer, rule) in enumerate(zip(layers, rules)):
            if key(layer, rule) != key(first, rules[0]):
                raise ValueError(
                    f"Ensemble: member {index}'s layer {type(layer).__name__}(weight {tuple(layer.weight.shape)}, "
                    f"rule {rule}) differs from member 0's {type(first).__name__}(weight "
                    f"{tuple(first.weight.shape)}, rule {rules[0]}); members must share the architecture and the "
                    "rule with its options (only seeds, and so the random matrices, may differ), or mix only "
                    "backprop, fa and shallow without a feedback nonlinearity")

    def _matrix_source(self, layer: nn.Module) -> str | None:
        """Where the member's feedback matrix lives: a buffer's name, ``'weight'``, or None (computed per step)."""
        rule = self.rule
        if self.mixed:
            return None
        if rule is None or getattr(rule, "name", "") == "dfa":
            return None
        matrix = rule.feedback(layer)  # pure by contract
        if matrix is None:
            self.sends_nothing = True
            return None
        for name in self.buffer_names:
            if matrix is getattr(layer, name):
                return name
        if (matrix.data_ptr() == layer.weight.data_ptr() and matrix.shape == layer.weight.shape
                and matrix.stride() == layer.weight.stride()):
            return "weight"
        return None

    @property
    def members(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"members={self.members}, {self.template.extra_repr()}"

    # --- what goes down -------------------------------------------------------------------------------------------

    def _feedback(self, input: Tensor) -> Any:
        """``'exact'``, None, a stacked matrix ``(E, *weight.shape)``, or a send-down callable (dfa)."""
        rule = self.rule
        if self.mixed:
            if not (torch.is_grad_enabled() and input.requires_grad):
                return "exact"
            return torch.where(self.through_weight, self.weight.detach(), getattr(self, "feedback", 0.0))
        if rule is None or (isinstance(rule, Backprop) and rule._nonlinearity is None):
            return "exact"
        if not (torch.is_grad_enabled() and input.requires_grad):
            return "exact"  # as the rule's own forward: nothing goes below, the plain op is exact
        if rule.name == "dfa":
            return functools.partial(self.dfa_pass.send_down, self)
        if isinstance(rule, BRSF) and self.training:
            self._redraw()
        if self.matrix_source == "weight":
            return self.weight.detach()
        if self.matrix_source is not None:
            return getattr(self, self.matrix_source)
        if self.sends_nothing:
            return None
        buffers = [getattr(self, name) for name in self.buffer_names]
        return torch.func.vmap(functools.partial(_member_feedback, rule, self.buffer_names))(
            self.weight.detach(), *buffers)

    @torch.no_grad()
    def _redraw(self) -> None:
        """brsf's per-step redraw, member ``e`` from its own generator (the draws it makes when trained alone).

        The rule draws from the default generator of the layer's device; each member's generator state is swapped
        in for its draw (and torch's own state restored after), so the rule's redraw code is the one used."""
        magnitude = self.magnitude
        device = magnitude.device
        default = (torch.cuda.default_generators[device.index or 0] if device.type == "cuda"
                   else torch.default_generator)
        own = default.get_state()
        try:
            for member, generator in enumerate(self.generators or []):
                default.set_state(generator.get_state())
                target = magnitude[member]
                if (target.storage_offset() * target.element_size()) % 8:  # the rule views it as int64 words
                    scratch = torch.empty_like(target)
                    BRSF._redraw(scratch)
                    target.copy_(scratch)
                else:
                    BRSF._redraw(target)
                generator.set_state(default.get_state())
        finally:
            default.set_state(own)

    # --- forward --------------------------------------------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        feedback = self._feedback(input)
        nonlinearity = None if self.rule is None else self.rule._nonlinearity
        if not self.is_conv:
            return stacked_linear(input, self.weight, self.bias, feedback, nonlinearity)
        return self._conv(input, feedback, nonlinearity)

    def _conv(self, input: Tensor, feedback: Any, nonlinearity: Any) -> Tensor:
        """The E members' convolutions as one grouped convolution: member e's channels are group block e."""
        conv = self.template
        members, batch = input.shape[:2]
        merged = input.transpose(0, 1).reshape(batch, -1, *input.shape[3:])  # (N, E·C, *spatial)
        weight = self.weight.reshape(-1, *self.weight.shape[2:])
        bias = None if self.bias is None else self.bias.reshape(-1)
        pads = conv._reversed_padding_repeated_twice
        if conv.padding_mode != "zeros" or pads[0::2] != pads[1::2]:
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            merged = F.pad(merged, pads, mode=mode)
            padding: tuple[int, ...] = (0,) * len(conv.stride)
        else:
            padding = tuple(pads[-2::-2])
        groups = conv.groups * members
        if isinstance(feedback, str):
            out = functional._CONV_FORWARD[weight.dim() - 2](merged, weight, bias, conv.stride, padding,
                                                             conv.dilation, groups)
        else:
            if isinstance(feedback, Tensor):
                feedback = feedback.reshape(weight.shape)
            elif feedback is not None:
                feedback = _MergedSendDown(feedback, members)
            options: dict[str, Any] = {"feedback_nonlinearity": nonlinearity}
            if callable(feedback):
                options["send_down"], feedback = feedback, None
            out = functional.conv(merged, weight, bias, feedback, conv.stride, padding, conv.dilation, groups,
                                  **options)
        return out.view(batch, members, -1, *out.shape[2:]).transpose(0, 1)


def _mixes(rules: list[FeedbackRule | None]) -> bool:
    """Whether members' rules differ but all are :data:`MIXABLE_RULES`."""
    kinds = {Backprop if rule is None else type(rule) for rule in rules}
    return len(kinds) > 1 and kinds <= set(MIXABLE_RULES) and all(
        getattr(rule, "_nonlinearity", None) is None for rule in rules)


class _MergedSendDown:
    """A stacked send-down ``(E, N, ...)`` seen through the grouped convolution's merged ``(N, E·C, ...)`` layout."""

    def __init__(self, send_down: Any, members: int) -> None:
        self.send_down, self.members = send_down, members

    def __call__(self, grad_output: Tensor, input: Tensor) -> Tensor:
        def split(t: Tensor) -> Tensor:
            return t.view(t.shape[0], self.members, -1, *t.shape[2:]).transpose(0, 1)
        grad = self.send_down(split(grad_output), split(input))
        return grad.transpose(0, 1).reshape(input.shape)
