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

import copy
import warnings
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

# The names of a module's forward/backward hook dicts, read off a fresh nn.Module rather than copied from torch's
# source, so a torch that adds one is followed (tests/test_nn.py fails loudly if the ones relied on disappear).
_HOOK_DICTS = tuple(name for name, value in vars(nn.Module()).items()
                    if name.startswith(("_forward", "_backward")) and isinstance(value, dict))


class FeedbackLayer(nn.Module):
    """Base of every fbalign layer: holds the rule and its per-layer state, and lets the rule run ``forward``.

    The contract between layers and rules. A layer (subclass) implements three ways to run its op:

    * :meth:`forward_exact` ``(input)``: torch's own op, plain autograd;
    * :meth:`forward_feedback` ``(input, feedback, scale, nonlinearity)``: the same output, with the error reaching
      ``input`` through ``feedback · scale`` (a tensor of the weight's shape, or None: no error) and then
      ``nonlinearity``, elementwise (see :mod:`fbalign.functional`);
    * :meth:`forward_send_down` ``(input, send_down)``: the same output, with ``input``'s gradient computed by
      ``send_down(grad_output, input)`` (dfa).

    A rule (see :class:`fbalign.rules.FeedbackRule`) calls these from its ``forward`` and keeps its state on the
    layer: tensors with :meth:`add_rule_buffer` (in ``state_dict``, moved by ``.to()``, removed with the rule),
    other objects in :attr:`rule_state`. The weight's own gradient is always exact.

    Example::

        >>> layer = fbalign.nn.Linear(4, 3, rule="fa", seed=0)
        >>> {name: tuple(b.shape) for name, b in layer.rule_buffers().items()}
        {'feedback': (3, 4)}
        >>> layer.set_rule("usf").rule_buffers()            # the old rule's buffers go with it
        {}
    """

    weight: Tensor
    bias: Tensor | None
    rule: FeedbackRule
    rule_state: dict[str, Any]
    """Objects (not tensors) a rule keeps per layer, by the rule's own keys: dfa's wiring, kp's warning flag. Not
    saved in ``state_dict``; emptied when the rule is replaced."""
    _rule_buffers: list[str]  # names of the buffers added by the rule
    _exact_override: bool = False  # set by exact_backprop()

    def set_rule(self: _Layer, rule: str | FeedbackRule, **options: Any) -> _Layer:
        """Attach ``rule`` (a name or a rule object) with ``options``, replacing the current rule and its state."""
        new_rule = rules.get(rule, **options)
        for name in getattr(self, "_rule_buffers", ()):
            delattr(self, name)
        self._rule_buffers = []
        self.rule_state = {}
        self.rule = new_rule
        new_rule.setup(self)
        new_rule.attach(self)
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:  # deepcopy and unpickling
        super().__setstate__(state)
        self.__dict__.setdefault("rule_state", {})  # pickled before rule_state existed
        if "rule" in self.__dict__:
            self.rule.attach(self)

    def add_rule_buffer(self, name: str, tensor: Tensor, persistent: bool = True) -> None:
        """Add the rule's buffer ``name``, or replace it: registered like any buffer (``state_dict``, ``.to()``)
        and removed when the rule is replaced."""
        if name in self._buffers and name not in self._rule_buffers:
            raise ValueError(f"{type(self).__name__} already has a buffer {name!r} that is not the rule's; "
                             "choose another name for the rule's buffer")
        self.register_buffer(name, tensor, persistent=persistent)
        if name not in self._rule_buffers:
            self._rule_buffers.append(name)

    def rule_buffers(self) -> dict[str, Tensor]:
        """The rule's buffers, by name, in the order they were added."""
        return {name: getattr(self, name) for name in self._rule_buffers}

    def forward(self, input: Tensor) -> Tensor:
        if self._exact_override:
            return self.forward_exact(input)
        return self.rule.forward(self, input)

    def forward_exact(self, input: Tensor) -> Tensor:
        """Torch's own op on ``input`` (plain autograd: the error goes down through the weight)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_exact(input)")

    def forward_feedback(self, input: Tensor, feedback: Tensor | None, scale: Tensor | float | None = None,
                         nonlinearity: functional.Nonlinearity | None = None) -> Tensor:
        """The op on ``input``, its error going below through ``feedback · scale`` (the weight's shape) and then
        ``nonlinearity``; ``feedback=None``: no error goes below. Weight and bias gradients are exact."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_feedback(input, feedback, scale, "
                                  "nonlinearity)")

    def forward_send_down(self, input: Tensor, send_down: functional.SendDown) -> Tensor:
        """The op on ``input``, with ``input``'s gradient computed by ``send_down(grad_output, input)`` instead of
        through a matrix (how dfa sends the output error). Weight and bias gradients are exact."""
        raise NotImplementedError(f"{type(self).__name__} does not support rules that compute the input gradient "
                                  "themselves (dfa): it must implement forward_send_down(input, send_down)")

    # --- deprecated names, kept for one release ----------------------------------------------------------------

    def register_feedback_buffer(self, name: str, tensor: Tensor, persistent: bool = True) -> None:
        """Deprecated alias of :meth:`add_rule_buffer`."""
        warnings.warn("FeedbackLayer.register_feedback_buffer is deprecated; use add_rule_buffer",
                      DeprecationWarning, stacklevel=2)
        self.add_rule_buffer(name, tensor, persistent)

    def _forward_exact(self, input: Tensor) -> Tensor:
        """Deprecated alias of :meth:`forward_exact`."""
        warnings.warn("FeedbackLayer._forward_exact is deprecated; use forward_exact", DeprecationWarning,
                      stacklevel=2)
        return self.forward_exact(input)

    def _forward_feedback(self, input: Tensor, feedback: Tensor | functional.SendDown | None,
                          feedback_scale: Tensor | float | None = None,
                          feedback_nonlinearity: functional.Nonlinearity | None = None) -> Tensor:
        """Deprecated: :meth:`forward_feedback`, or :meth:`forward_send_down` when ``feedback`` is a callable."""
        warnings.warn("FeedbackLayer._forward_feedback is deprecated; use forward_feedback (a feedback tensor or "
                      "None) or forward_send_down (a callable)", DeprecationWarning, stacklevel=2)
        if feedback is not None and not isinstance(feedback, Tensor):
            return self.forward_send_down(input, feedback)
        return self.forward_feedback(input, feedback, feedback_scale, feedback_nonlinearity)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass written for the old names (``_forward_exact``, ``_forward_feedback``) keeps working."""
        super().__init_subclass__(**kwargs)
        old_exact = cls.__dict__.get("_forward_exact")
        old_feedback = cls.__dict__.get("_forward_feedback")
        if old_exact is not None and "forward_exact" not in cls.__dict__:
            warnings.warn(f"{cls.__qualname__} overrides _forward_exact, which is deprecated: rename it "
                          "forward_exact", DeprecationWarning, stacklevel=2)
            cls.forward_exact = old_exact  # type: ignore[method-assign]
        if old_feedback is not None and "forward_feedback" not in cls.__dict__:
            warnings.warn(f"{cls.__qualname__} overrides _forward_feedback, which is deprecated: implement "
                          "forward_feedback (a feedback tensor or None) and forward_send_down (a callable)",
                          DeprecationWarning, stacklevel=2)

            def forward_feedback(self: FeedbackLayer, input: Tensor, feedback: Tensor | None,
                                 scale: Tensor | float | None = None,
                                 nonlinearity: functional.Nonlinearity | None = None) -> Tensor:
                return old_feedback(self, input, feedback, scale, nonlinearity)

            cls.forward_feedback = forward_feedback  # type: ignore[method-assign]
            if "forward_send_down" not in cls.__dict__:
                def forward_send_down(self: FeedbackLayer, input: Tensor, send_down: functional.SendDown) -> Tensor:
                    return old_feedback(self, input, send_down)

                cls.forward_send_down = forward_send_down  # type: ignore[method-assign]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule}"

    @classmethod
    def from_module(cls: type[_Layer], module: nn.Module, rule: str | FeedbackRule = "fa", **rule_options: Any
                    ) -> _Layer:
        """A converted copy of ``module`` (a torch layer this class extends, e.g. ``nn.Linear`` for
        :class:`Linear`): the same Parameters (so existing optimizers keep working), buffers, hooks and mode."""
        torch_layer = cls.__mro__[cls.__mro__.index(FeedbackLayer) + 1]
        if not isinstance(module, torch_layer):
            raise TypeError(f"{cls.__name__}.from_module takes an {torch_layer.__name__}, not {type(module).__name__}")
        new = copy.copy(module)  # shares everything ...
        for key, value in list(vars(new).items()):
            if isinstance(value, dict):  # ... then gets containers (parameters, hooks, ...) of its own
                vars(new)[key] = value.copy()
        new.__class__ = cls
        return new.set_rule(rule, **rule_options)

    @classmethod
    def _adopt(cls: type[_Layer], new: _Layer, old: nn.Module, rule: str | FeedbackRule, options: dict) -> _Layer:
        """Deprecated: :meth:`from_module` copies ``old`` whole. Kept for subclasses that build ``new`` themselves:
        shares ``old``'s weight and bias, mode and forward/backward hooks."""
        new.weight = old.weight
        new.bias = old.bias
        new.train(old.training)
        for key in _HOOK_DICTS:
            if key in vars(old):
                vars(new)[key] = vars(old)[key].copy()
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
        # The handles follow the model into deep copies and pickles (torch's RemovableHandle keeps its dicts).
        self._handles = [model.register_forward_pre_hook(self.before_forward),
                         model.register_forward_hook(self.after_forward, always_call=True)]

    def __getstate__(self) -> dict[str, Any]:
        # A handle whose model is gone cannot be copied or pickled (it holds weak references to the model's dicts).
        handles = [h for h in self.__dict__.get("_handles", ())
                   if h.hooks_dict_ref() is not None and all(ref() is not None for ref in h.extra_dict_ref)]
        return {**self.__dict__, "_handles": handles}

    def uninstall(self) -> None:
        """Remove the hooks :meth:`install` put on the model."""
        for handle in getattr(self, "_handles", ()):
            handle.remove()
        self._handles = []

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
            for hook in _forward_pre_hooks(module):
                owner = getattr(hook, "__self__", None)
                if isinstance(owner, ModelWiring) and owner not in found:
                    found.append(owner)
        return found

    @classmethod
    def remove(cls, model: nn.Module) -> None:
        """Remove the wirings of this class (every kind, called on ModelWiring) from ``model`` itself."""
        for hook in _forward_pre_hooks(model):
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, cls):
                owner.uninstall()


def _forward_pre_hooks(module: nn.Module) -> list[Any]:
    """The forward pre-hooks registered on ``module``. Torch has no public way to list them, so this reads its
    private dict (tests/test_nn.py fails loudly if torch renames it)."""
    return list(module._forward_pre_hooks.values())


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

    def forward_exact(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)

    def forward_feedback(self, input: Tensor, feedback: Tensor | None, scale: Tensor | float | None = None,
                         nonlinearity: functional.Nonlinearity | None = None) -> Tensor:
        return functional.linear(input, self.weight, self.bias, feedback, scale, nonlinearity)

    def forward_send_down(self, input: Tensor, send_down: functional.SendDown) -> Tensor:
        return functional.linear(input, self.weight, self.bias, None, send_down=send_down)


class _ConvNd(FeedbackLayer):
    """Shared by Conv1d/2d/3d: torch's padding handling, then :func:`fbalign.functional.conv`."""

    _conv_forward: Any
    padding_mode: str
    padding: Any
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    _reversed_padding_repeated_twice: list[int]

    def forward_exact(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, self.bias)

    def forward_feedback(self, input: Tensor, feedback: Tensor | None, scale: Tensor | float | None = None,
                         nonlinearity: functional.Nonlinearity | None = None) -> Tensor:
        input, padding = self._padded(input)
        return functional.conv(input, self.weight, self.bias, feedback, self.stride, padding, self.dilation,
                               self.groups, scale, nonlinearity)

    def forward_send_down(self, input: Tensor, send_down: functional.SendDown) -> Tensor:
        input, padding = self._padded(input)
        return functional.conv(input, self.weight, self.bias, None, self.stride, padding, self.dilation,
                               self.groups, send_down=send_down)

    def _padded(self, input: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """``input`` padded as ``nn.ConvNd`` pads it, and the symmetric numeric padding left to the op."""
        pads = self._reversed_padding_repeated_twice
        asymmetric = pads[0::2] != pads[1::2]
        if self.padding_mode != "zeros" or asymmetric:
            # As nn.ConvNd does: pad explicitly (autograd carries the error back through the pad).
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            return F.pad(input, pads, mode=mode), (0,) * len(self.stride)
        return input, tuple(pads[-2::-2])  # left pads, back in dimension order


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


# Transposed convolutions and Bilinear live in their own file (size), and are fbalign.nn layers like these.
from .nn_transposed import Bilinear, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d  # noqa: E402

__all__ += ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Bilinear"]
