"""Drop-in layers whose error goes down through the feedback matrix of a learning rule.

``fbalign.nn.Linear`` and ``fbalign.nn.Conv1d/2d/3d`` subclass torch's own layers: same constructor arguments,
same parameters, same forward output, plus ``rule=`` and the rule's options. Only the backward pass differs:
the input gradient goes through ``rule.feedback(layer)`` instead of the weight (see :mod:`fbalign.rules`).

Example::

    >>> layer = fbalign.nn.Linear(784, 1000, rule="fa", seed=0)
    >>> layer
    Linear(in_features=784, out_features=1000, bias=True, rule=fa(seed=0))
    >>> layer.feedback.shape          # a buffer: in state_dict, moved by .to(), not a parameter
    torch.Size([1000, 784])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional, rules
from .rules import FeedbackRule

__all__ = ["FeedbackLayer", "Linear", "Conv1d", "Conv2d", "Conv3d", "feedback_layers", "exact_backprop",
           "ModelWiring"]

_Layer = TypeVar("_Layer", bound="FeedbackLayer")

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


class FeedbackLayer(nn.Module):
    """Mixin shared by every fbalign layer: holds the rule, its buffers, and dispatches ``forward`` to it.

    Subclasses provide ``_forward_exact(input)`` (torch's op) and ``_forward_feedback(input, feedback)``.
    """

    weight: Tensor
    bias: Tensor | None
    rule: FeedbackRule

    def set_rule(self: _Layer, rule: str | FeedbackRule, **options: Any) -> _Layer:
        """Attach ``rule`` (a name or a rule object) with ``options``, replacing the current rule and its buffers."""
        new_rule = rules.get(rule, **options)
        for name in getattr(self, "_rule_buffers", ()):
            delattr(self, name)
        self._rule_buffers: list[str] = []
        self.rule = new_rule
        new_rule.setup(self)
        new_rule.attach(self)
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:  # deepcopy and unpickling
        super().__setstate__(state)
        if "rule" in self.__dict__:
            self.rule.attach(self)

    def register_feedback_buffer(self, name: str, tensor: Tensor, persistent: bool = True) -> None:
        """Register a buffer that belongs to the rule (removed again when the rule is replaced)."""
        self.register_buffer(name, tensor, persistent=persistent)
        self._rule_buffers.append(name)

    _exact_override: bool = False

    def forward(self, input: Tensor) -> Tensor:
        if self._exact_override:
            return self._forward_exact(input)
        return self.rule.forward(self, input)

    def _forward_exact(self, input: Tensor) -> Tensor:
        raise NotImplementedError

    def _forward_feedback(self, input: Tensor, feedback: Tensor | functional.SendDown | None,
                          feedback_scale: Tensor | float | None = None,
                          feedback_nonlinearity: functional.Nonlinearity | None = None) -> Tensor:
        """Forward with the error going below through ``feedback · feedback_scale`` (then the nonlinearity), or
        computed by ``feedback(grad_output, input)`` when it is a callable."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule}"

    @classmethod
    def _adopt(cls: type[_Layer], new: _Layer, old: nn.Module, rule: str | FeedbackRule, options: dict) -> _Layer:
        """Share ``old``'s parameters (so existing optimizers keep working), mode and hooks; attach ``rule``."""
        new.weight = old.weight
        new.bias = old.bias
        new.train(old.training)
        for hooks in _HOOK_DICTS:
            if hasattr(old, hooks):
                setattr(new, hooks, OrderedDict(getattr(old, hooks)))
        return new.set_rule(rule, **options)


def feedback_layers(model: nn.Module) -> list[tuple[str, FeedbackLayer]]:
    """``(name, layer)`` for every fbalign layer of ``model``, in ``named_modules`` order (shared layers once)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FeedbackLayer)]


@contextmanager
def exact_backprop(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block every fbalign layer of ``model`` runs plain autograd (the error goes down through W),
    whatever its rule; rules take no per-step action (``brsf`` draws nothing). Used to compute the backprop
    reference for a model trained with another rule, without copying it.
    """
    layers = [layer for _, layer in feedback_layers(model)]
    previous = [layer._exact_override for layer in layers]
    for layer in layers:
        layer._exact_override = True
    model.__dict__["_exact_depth"] = model.__dict__.get("_exact_depth", 0) + 1  # model-level wirings read it
    try:
        yield model
    finally:
        model.__dict__["_exact_depth"] -= 1
        for layer, before in zip(layers, previous):
            layer._exact_override = before


class ModelWiring:
    """Machinery a rule installs on a whole converted model, as forward hooks on it (dfa: where the output error
    comes from). ``convert()`` removes every wiring from a model before converting it again; ``summary()`` lists
    them with :meth:`describe`.

    Subclasses override :meth:`before_forward`, :meth:`after_forward` (also called when the forward raised, with
    ``output=None``) and :meth:`describe`.
    """

    def install(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self.before_forward)
        model.register_forward_hook(self.after_forward, always_call=True)

    def before_forward(self, model: nn.Module, args: tuple) -> None:
        pass

    def after_forward(self, model: nn.Module, args: tuple, output: Any) -> None:
        pass

    def describe(self) -> str:
        return type(self).__name__

    @staticmethod
    def installed(model: nn.Module) -> list[ModelWiring]:
        """The wirings installed on ``model`` or any of its submodules."""
        found: list[ModelWiring] = []
        for module in model.modules():
            for hook in module._forward_pre_hooks.values():
                owner = getattr(hook, "__self__", None)
                if isinstance(owner, ModelWiring) and owner not in found:
                    found.append(owner)
        return found

    @classmethod
    def remove(cls, model: nn.Module) -> None:
        """Remove the wirings of this class (every kind, called on ModelWiring) from ``model`` itself."""
        for hooks in (model._forward_pre_hooks, model._forward_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), cls)]:
                del hooks[key]
                model._forward_hooks_always_called.pop(key, None)


class Linear(FeedbackLayer, nn.Linear):
    """``nn.Linear`` whose error goes down through the rule's feedback matrix.

    Shapes: input ``(*, in_features)``, output ``(*, out_features)``, feedback ``(out_features, in_features)``.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        rule: a rule name from :func:`fbalign.rules.available` or a rule object (default ``'fa'``).
        **rule_options: the rule's options, e.g. ``seed=0`` or ``init='gaussian'`` for ``fa``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: torch.dtype | None = None, *, rule: str | FeedbackRule = "fa", **rule_options: Any) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.set_rule(rule, **rule_options)

    @classmethod
    def from_module(cls, module: nn.Linear, rule: str | FeedbackRule = "fa", **rule_options: Any) -> Linear:
        """A converted copy of ``module`` sharing its parameters."""
        with torch.device("meta"):  # no init: the parameters come from ``module``; no RNG draws either
            new = cls(module.in_features, module.out_features, module.bias is not None, rule="backprop")
        return cls._adopt(new, module, rule, rule_options)

    def _forward_exact(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)

    def _forward_feedback(self, input: Tensor, feedback: Tensor | functional.SendDown | None,
                          feedback_scale: Tensor | float | None = None,
                          feedback_nonlinearity: functional.Nonlinearity | None = None) -> Tensor:
        return functional.linear(input, self.weight, self.bias, feedback, feedback_scale, feedback_nonlinearity)


class _ConvNd(FeedbackLayer):
    """Shared by Conv1d/2d/3d: torch's padding handling, then :func:`fbalign.functional.conv`."""

    _conv_forward: Any
    padding_mode: str
    padding: Any
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    _reversed_padding_repeated_twice: list[int]

    def _forward_exact(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, self.bias)

    def _forward_feedback(self, input: Tensor, feedback: Tensor | functional.SendDown | None,
                          feedback_scale: Tensor | float | None = None,
                          feedback_nonlinearity: functional.Nonlinearity | None = None) -> Tensor:
        pads = self._reversed_padding_repeated_twice
        asymmetric = pads[0::2] != pads[1::2]
        if self.padding_mode != "zeros" or asymmetric:
            # As nn.ConvNd does: pad explicitly (autograd carries the error back through the pad).
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = F.pad(input, pads, mode=mode)
            padding = (0,) * len(self.stride)
        else:
            padding = tuple(pads[-2::-2])  # left pads, back in dimension order
        return functional.conv(input, self.weight, self.bias, feedback, self.stride, padding, self.dilation,
                               self.groups, feedback_scale, feedback_nonlinearity)

    @classmethod
    def from_module(cls, module: nn.modules.conv._ConvNd, rule: str | FeedbackRule = "fa",
                    **rule_options: Any) -> Any:
        """A converted copy of ``module`` sharing its parameters."""
        with torch.device("meta"):
            new = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                      padding=module.padding, dilation=module.dilation, groups=module.groups,
                      bias=module.bias is not None, padding_mode=module.padding_mode, rule="backprop")
        return cls._adopt(new, module, rule, rule_options)


def _conv_doc(n: int) -> str:
    return f"""``nn.Conv{n}d`` whose error goes down through the rule's feedback kernel.

    Shapes: input ``(N, C_in, *spatial)`` or ``(C_in, *spatial)``; feedback has the kernel's shape
    ``(C_out, C_in / groups, *kernel_size)``. Every ``nn.Conv{n}d`` option works: stride, padding (numbers,
    ``'same'``, ``'valid'``), dilation, groups, bias, padding_mode.

    Args:
        (torch's arguments): as for ``nn.Conv{n}d``.
        rule: a rule name from :func:`fbalign.rules.available` or a rule object (default ``'fa'``).
        **rule_options: the rule's options.
    """


class Conv1d(_ConvNd, nn.Conv1d):
    __doc__ = _conv_doc(1)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device: Any = None, dtype: torch.dtype | None = None, *, rule: str | FeedbackRule = "fa",
                 **rule_options: Any) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.set_rule(rule, **rule_options)


class Conv2d(_ConvNd, nn.Conv2d):
    __doc__ = _conv_doc(2)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device: Any = None, dtype: torch.dtype | None = None, *, rule: str | FeedbackRule = "fa",
                 **rule_options: Any) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.set_rule(rule, **rule_options)


class Conv3d(_ConvNd, nn.Conv3d):
    __doc__ = _conv_doc(3)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device: Any = None, dtype: torch.dtype | None = None, *, rule: str | FeedbackRule = "fa",
                 **rule_options: Any) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.set_rule(rule, **rule_options)


# --- transposed convolutions and Bilinear -------------------------------------------------------------------------

class _ConvTransposeNd(FeedbackLayer):
    """Shared by ConvTranspose1d/2d/3d: torch's output size handling, then :func:`fbalign.functional.conv_transpose`."""

    _output_padding: Any
    padding_mode: str
    padding: Any
    output_padding: Any
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    kernel_size: tuple[int, ...]
    groups: int
    _pending_output_padding: Any = None

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:  # type: ignore[override]
        if self.padding_mode != "zeros":
            raise ValueError("Only 'zeros' padding mode is supported for ConvTranspose (as in torch)")
        n = len(self.kernel_size)
        self._pending_output_padding = self._output_padding(input, output_size, list(self.stride),
                                                            list(self.padding), list(self.kernel_size), n,
                                                            list(self.dilation))
        try:
            return FeedbackLayer.forward(self, input)
        finally:
            self._pending_output_padding = None

    def _padding_now(self) -> tuple[int, ...]:
        pending = self._pending_output_padding
        return tuple(self.output_padding if pending is None else pending)

    def forward_exact(self, input: Tensor) -> Tensor:
        unbatched = input.dim() < self.weight.dim()
        out = torch.convolution(input.unsqueeze(0) if unbatched else input, self.weight, self.bias, list(self.stride),
                                list(self.padding), list(self.dilation), True, list(self._padding_now()), self.groups)
        return out.squeeze(0) if unbatched else out

    def forward_feedback(self, input: Tensor, feedback: Tensor | None, scale: Tensor | float | None = None,
                         nonlinearity: functional.Nonlinearity | None = None) -> Tensor:
        return functional.conv_transpose(input, self.weight, self.bias, feedback, self.stride, self.padding,
                                         self._padding_now(), self.groups, self.dilation, scale, nonlinearity)

    def forward_send_down(self, input: Tensor, send_down: functional.SendDown) -> Tensor:
        return self.forward_feedback(input, send_down)  # type: ignore[arg-type]  # the op takes a callable too

    _forward_exact = forward_exact  # the names rules call before the layer API's rename (_forward_feedback: below)

    @classmethod
    def from_module(cls, module: nn.modules.conv._ConvTransposeNd, rule: str | FeedbackRule = "fa",
                    **rule_options: Any) -> Any:
        """A converted copy of ``module`` sharing its parameters."""
        with torch.device("meta"):
            new = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                      padding=module.padding, output_padding=module.output_padding, groups=module.groups,
                      bias=module.bias is not None, dilation=module.dilation, padding_mode=module.padding_mode,
                      rule="backprop")
        return cls._adopt(new, module, rule, rule_options)


def _conv_transpose_doc(n: int) -> str:
    return f"""``nn.ConvTranspose{n}d`` whose error goes down through the rule's feedback kernel.

    Shapes: input ``(N, C_in, *spatial)`` or ``(C_in, *spatial)``; feedback has the kernel's shape
    ``(C_in, C_out / groups, *kernel_size)``; the input's error is the convolution of the output's error with it.
    Every ``nn.ConvTranspose{n}d`` option works (stride, padding, output_padding, groups, dilation, bias) and
    ``forward(input, output_size=...)``.

    Args:
        (torch's arguments): as for ``nn.ConvTranspose{n}d``.
        rule: a rule name from :func:`fbalign.rules.available` or a rule object (default ``'fa'``).
        **rule_options: the rule's options.
    """


def _conv_transpose_class(n: int, base: type[nn.Module]) -> type:
    def __init__(self: Any, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, output_padding: Any = 0, groups: int = 1, bias: bool = True, dilation: Any = 1,
                 padding_mode: str = "zeros", device: Any = None, dtype: torch.dtype | None = None, *,
                 rule: str | FeedbackRule = "fa", **rule_options: Any) -> None:
        base.__init__(self, in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                      dilation, padding_mode, device, dtype)
        self.set_rule(rule, **rule_options)

    return type(f"ConvTranspose{n}d", (_ConvTransposeNd, base),
                {"__init__": __init__, "__doc__": _conv_transpose_doc(n), "__module__": __name__,
                 "forward": _ConvTransposeNd.forward})


ConvTranspose1d = _conv_transpose_class(1, nn.ConvTranspose1d)
ConvTranspose2d = _conv_transpose_class(2, nn.ConvTranspose2d)
ConvTranspose3d = _conv_transpose_class(3, nn.ConvTranspose3d)


class Bilinear(FeedbackLayer, nn.Bilinear):
    """``nn.Bilinear`` whose error goes down to both inputs through the rule's feedback tensor.

    Shapes: inputs ``(*, in1_features)`` and ``(*, in2_features)``, output ``(*, out_features)``, feedback
    ``(out_features, in1_features, in2_features)``: ``grad_input1 = g · V · x2``, ``grad_input2 = g · V · x1``.
    The rule sees one input, ``cat([input1, input2], -1)``. Layer-level ``dfa`` is not defined for it (two inputs);
    use a rule mapping to give it another rule, or DFA points.

    Args:
        in1_features, in2_features, out_features, bias, device, dtype: as for ``nn.Bilinear``.
        rule: a rule name from :func:`fbalign.rules.available` or a rule object (default ``'fa'``).
        **rule_options: the rule's options.
    """

    def __init__(self, in1_features: int, in2_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None, *, rule: str | FeedbackRule = "fa",
                 **rule_options: Any) -> None:
        super().__init__(in1_features, in2_features, out_features, bias, device, dtype)
        self.set_rule(rule, **rule_options)

    def set_rule(self, rule: str | FeedbackRule, **options: Any) -> Bilinear:
        chosen = rules.get(rule, **options)
        if chosen.name == "dfa":
            raise ValueError("dfa is not defined for Bilinear layers (two inputs, one direct matrix each is not "
                             "implemented); give them another rule with a mapping, e.g. fbalign.convert(model, "
                             "{nn.Bilinear: 'fa', '*': 'dfa'}), or use fbalign.dfa_points")
        return super().set_rule(chosen)

    @classmethod
    def from_module(cls, module: nn.Bilinear, rule: str | FeedbackRule = "fa", **rule_options: Any) -> Bilinear:
        """A converted copy of ``module`` sharing its parameters."""
        with torch.device("meta"):
            new = cls(module.in1_features, module.in2_features, module.out_features, module.bias is not None,
                      rule="backprop")
        return cls._adopt(new, module, rule, rule_options)

    def forward(self, input1: Tensor, input2: Tensor) -> Tensor:  # type: ignore[override]
        if self._exact_override or not torch.is_grad_enabled():
            return F.bilinear(input1, input2, self.weight, self.bias)
        return FeedbackLayer.forward(self, torch.cat([input1, input2], dim=-1))

    def forward_exact(self, input: Tensor) -> Tensor:
        x1, x2 = input.split([self.in1_features, self.in2_features], dim=-1)
        return F.bilinear(x1, x2, self.weight, self.bias)

    def forward_feedback(self, input: Tensor, feedback: Tensor | None, scale: Tensor | float | None = None,
                         nonlinearity: functional.Nonlinearity | None = None) -> Tensor:
        return functional.bilinear_joined(input, self.weight, self.bias, feedback, scale, nonlinearity)

    def forward_send_down(self, input: Tensor, send_down: functional.SendDown) -> Tensor:
        return functional.bilinear_joined(input, self.weight, self.bias, send_down)

    _forward_exact = forward_exact


def _forward_feedback_either(self: Any, input: Tensor, feedback: Any, feedback_scale: Tensor | float | None = None,
                             feedback_nonlinearity: functional.Nonlinearity | None = None) -> Tensor:
    """The pre-rename entry point: a callable ``feedback`` (dfa) goes to ``forward_send_down``."""
    if feedback is not None and not isinstance(feedback, Tensor):
        return self.forward_send_down(input, feedback)
    return self.forward_feedback(input, feedback, feedback_scale, feedback_nonlinearity)


_ConvTransposeNd._forward_feedback = _forward_feedback_either  # type: ignore[method-assign,assignment]
Bilinear._forward_feedback = _forward_feedback_either  # type: ignore[method-assign]


__all__ += ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Bilinear"]
