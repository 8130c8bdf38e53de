"""Learning rules: what the error is multiplied by on its way below a layer, and how that matrix changes.

A rule is one small frozen dataclass whose fields are its options. The layers in :mod:`fbalign.nn` are shared
by every rule: a layer asks its rule for the *feedback matrix* (same shape as the layer's weight) and its
backward pass sends the error down through that matrix instead of the weight (``grad_in = grad_out @ V`` for
a linear layer; Lillicrap et al.'s ``B`` is ``V.T``). The weight's own gradient is always exact.

Rules keep their per-layer state (fixed random matrices, masks, magnitudes) as buffers on the layer, so it is
saved in ``state_dict``, moved by ``.to()`` and never seen by an optimizer.

========  ===================================================================  ============================
name      feedback matrix V (weight's shape)                                   changes
========  ===================================================================  ============================
backprop  W (plain autograd)                                                   follows W
fa        fixed random B (uniform / gaussian / orthogonal / copy of W0)        never
usf       sign(W) · rms(W)                                                     follows W
frsf      M ∘ sign(W) · rms(W) / rms(M), M ~ U[0, 1] drawn once                follows W
brsf      M ∘ sign(W) · rms(W) / rms(M), M redrawn every training step         every step
pbp       (W⁺)ᵀ, the Moore–Penrose pseudo-inverse (linear layers)              follows W
shallow   none: no error passes below the layer                                --
========  ===================================================================  ============================

The sign rules accept ``concordance=p``: each element of V agrees in sign with W with probability ``p``
(Liao et al.'s S_p); the disagreeing set is drawn once.

Every rule whose error passes through a matrix (all but ``shallow``: they subclass :class:`MatrixRule`) takes
``feedback_nonlinearity=f`` and ``feedback_saturation=s``: the backward pathway becomes nonlinear, the error
arriving below is ``s · f((grad_out @ V) / s)`` elementwise. ``f`` is a callable or one of the names in
:data:`NONLINEARITIES` (so TOML configs can set it); ``s`` sets where a saturating ``f`` saturates, in the units of
the gradient (which include the 1 / batch of a mean loss). With ``backprop`` this isolates the nonlinearity from
weight asymmetry.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from torch import nn

    from .nn import FeedbackLayer

__all__ = [
    "FeedbackRule",
    "MatrixRule",
    "RandomMatrixRule",
    "NONLINEARITIES",
    "Backprop",
    "FA",
    "USF",
    "FRSF",
    "BRSF",
    "PBP",
    "Shallow",
    "register",
    "get",
    "available",
]

_RULES: dict[str, type[FeedbackRule]] = {}
_ALIASES = {"bp": "backprop"}


def register(cls: type[FeedbackRule]) -> type[FeedbackRule]:
    """Class decorator: make a rule available by ``cls.name`` to :func:`get`, layers and ``convert``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name` to be registered")
    _RULES[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of the registered rules."""
    return sorted(_RULES)


def get(rule: str | FeedbackRule, **options: object) -> FeedbackRule:
    """Return the rule called ``rule`` with ``options``, or ``rule`` itself (with ``options`` replaced).

    Raises ``ValueError`` naming the valid rules or the rule's valid options.
    """
    if isinstance(rule, FeedbackRule):
        cls, base = type(rule), rule
    elif isinstance(rule, str):
        key = _ALIASES.get(rule.lower(), rule.lower())
        if key not in _RULES:
            raise ValueError(f"unknown rule {rule!r}; valid rules are: {', '.join(available())}")
        cls, base = _RULES[key], None
    else:
        raise TypeError(f"rule must be a rule name or a FeedbackRule, not {type(rule).__name__}")
    valid = [f.name for f in _options(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none"
        raise ValueError(f"rule {cls.name!r} has no option {', '.join(map(repr, unknown))}; its options are: {listed}")
    return dataclasses.replace(base, **options) if base is not None else cls(**options)


def _options(rule: type[FeedbackRule] | FeedbackRule) -> list[dataclasses.Field]:
    """A rule's options in the order users read them: its own first, the shared keyword-only ones last."""
    return sorted(dataclasses.fields(rule), key=lambda f: bool(f.kw_only))


def _check_choice(rule: str, option: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{rule}: {option}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def _check_range(rule: str, option: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    bad = value < low or value > high or (low_open and value == low)
    if bad:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{rule}: {option}={value!r} must lie in {interval}")


def _generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded by ``seed``, or by a draw from torch's global RNG when ``seed`` is None.

    Feedback is drawn on the CPU in float64 and then cast and moved, so one seed gives the same matrix on
    every device and in every dtype (up to rounding).
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return torch.Generator().manual_seed(seed)


def fan_in(weight: Tensor) -> int:
    """Inputs feeding one output unit: ``in_features``, or ``in_channels / groups · prod(kernel)``."""
    return weight[0].numel()


@dataclass(frozen=True)
class FeedbackRule:
    """Base class of every rule. Subclasses set ``name``, declare their options as fields, and override
    :meth:`feedback` (and :meth:`setup` when they keep state, :meth:`forward` when the matrix changes per step).
    """

    name: ClassVar[str] = ""
    # The callable the error passes through after the feedback matrix (set by MatrixRule from its options).
    _nonlinearity: ClassVar[Callable[[Tensor], Tensor] | None] = None

    def setup(self, layer: FeedbackLayer) -> None:
        """Create the rule's per-layer state as buffers on ``layer`` (called once, when the rule is attached)."""

    def attach(self, layer: FeedbackLayer) -> None:
        """Called whenever a layer with this rule comes into being: after :meth:`setup`, and again when the layer
        is deep-copied or unpickled (its buffers come with it). For rules with process-wide bookkeeping (kp's
        optimizer hooks); most rules need nothing."""

    def setup_model(self, model: nn.Module) -> None:
        """Set up what needs the model as a whole (called by ``convert`` once every layer has the rule): dfa
        decides here where the output error comes from. Most rules need nothing."""

    def feedback(self, layer: FeedbackLayer) -> Tensor | None:
        """The matrix the error is multiplied by below ``layer``, in ``layer.weight``'s shape; None: no error passes.

        Pure: reading it changes nothing (measurements rely on this).
        """
        matrix, scale = self.feedback_factors(layer)
        return matrix if matrix is None or scale is None else matrix * scale

    def feedback_factors(self, layer: FeedbackLayer) -> tuple[Tensor | None, Tensor | float | None]:
        """:meth:`feedback` as ``(matrix, scale)`` with ``scale`` a number, a 0-dim tensor or None.

        The backward pass multiplies the error by the scale rather than the matrix when that is cheaper (a
        batch of errors is often much smaller than a weight matrix). Override this or :meth:`feedback`.
        """
        if type(self).feedback is FeedbackRule.feedback:
            raise NotImplementedError(f"{type(self).__name__} must override feedback() or feedback_factors()")
        return self.feedback(layer), None

    def forward(self, layer: FeedbackLayer, input: Tensor) -> Tensor:
        """Run ``layer`` on ``input``. Where no error has to go below the layer (inference, or an input that
        needs no gradient, such as the data), the plain op is exact and cheapest."""
        if not (torch.is_grad_enabled() and input.requires_grad):
            return layer._forward_exact(input)
        return layer._forward_feedback(input, *self.feedback_factors(layer), self._nonlinearity)

    def __str__(self) -> str:
        changed = [f"{f.name}={_option_repr(getattr(self, f.name))}" for f in _options(self)
                   if getattr(self, f.name) != f.default]
        return f"{self.name}({', '.join(changed)})" if changed else self.name


def _option_repr(value: object) -> str:
    if callable(value) and not isinstance(value, type):  # a function's repr carries its address: show its name
        return getattr(value, "__name__", None) or repr(value)
    return repr(value)


NONLINEARITIES: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "hardtanh": F.hardtanh,  # clipped at ±1
    "softsign": F.softsign,  # x / (1 + |x|): saturates slowly
    "relu": torch.relu,      # a rectifying pathway: only positive errors pass
    "sign": torch.sign,      # only the sign passes (the error's size is lost)
}
"""Nonlinearities ``feedback_nonlinearity`` accepts by name (plus ``'identity'``, the same as None)."""



def _softsign_(error: Tensor) -> Tensor:
    return error.div_(error.abs().add_(1.0))


# The same, in place: the backward pass applies them to an error it has just computed, so no copy is needed.
_IN_PLACE: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh_,
    "hardtanh": F.hardtanh_,
    "softsign": _softsign_,
    "relu": torch.relu_,
    "sign": Tensor.sign_,
}


def _saturated(function: Callable[[Tensor], Tensor], saturation: float, error: Tensor) -> Tensor:
    return function(error / saturation) * saturation


def _saturated_in_place(function: Callable[[Tensor], Tensor], saturation: float, error: Tensor) -> Tensor:
    return function(error.div_(saturation)).mul_(saturation)


@dataclass(frozen=True)
class MatrixRule(FeedbackRule):
    """Base of the rules whose error passes below a layer through a matrix: adds a nonlinear feedback path.

    Args:
        feedback_nonlinearity: None (a linear pathway, the default), a name from :data:`NONLINEARITIES`, or a
            callable applied elementwise to the error after the feedback matrix.
        feedback_saturation: ``s`` in ``grad_in = s · f((grad_out @ V) / s)``: the error size at which a
            saturating ``f`` (tanh, hardtanh, softsign) bends; errors much smaller pass almost linearly.
    """

    feedback_nonlinearity: str | Callable[[Tensor], Tensor] | None = field(default=None, kw_only=True)
    feedback_saturation: float = field(default=1.0, kw_only=True)

    def __post_init__(self) -> None:
        _check_range(self.name, "feedback_saturation", self.feedback_saturation, 0.0, math.inf, low_open=True)
        function = self.feedback_nonlinearity
        if isinstance(function, str):
            key = function.lower()
            if key not in NONLINEARITIES and key != "identity":
                raise ValueError(f"{self.name}: feedback_nonlinearity={function!r} is not a known name; use a "
                                 f"callable or one of: {', '.join(sorted(NONLINEARITIES))}, identity")
            function = _IN_PLACE.get(key)
            saturated = _saturated_in_place
        elif function is not None and not callable(function):
            raise TypeError(f"{self.name}: feedback_nonlinearity must be a name, a callable or None, not "
                            f"{type(function).__name__}")
        else:
            saturated = _saturated  # a user's function may not be safe to run in place
        if function is not None and self.feedback_saturation != 1.0:
            function = functools.partial(saturated, function, self.feedback_saturation)
        object.__setattr__(self, "_nonlinearity", function)  # frozen: set once, here


@register
@dataclass(frozen=True)
class Backprop(MatrixRule):
    """Exact backpropagation: the error goes down through W itself (plain autograd; the reference).

    With ``feedback_nonlinearity`` set, the error goes down through W and then the nonlinearity: symmetric
    weights with a nonlinear pathway, the control that separates the two departures from backprop.
    """

    name: ClassVar[str] = "backprop"

    def feedback(self, layer: FeedbackLayer) -> Tensor:
        return layer.weight.detach()

    def forward(self, layer: FeedbackLayer, input: Tensor) -> Tensor:
        if self._nonlinearity is None:
            return layer._forward_exact(input)
        return super().forward(layer, input)


@dataclass(frozen=True)
class RandomMatrixRule(MatrixRule):
    """Base of the rules that start from a random feedback matrix (fa, dfa, kp, wm): its options and its draw.

    Args:
        init: ``'uniform'`` U[-a, a]; ``'gaussian'`` N(0, s²); ``'orthogonal'`` a (semi-)orthogonal matrix of
            the flattened kernel; ``'weight'`` a copy of the weight when the rule is attached (the symmetric
            start of Zipser & Rumelhart, useful as a control; not for dfa, whose matrices have other shapes).
        scale: ``a`` for uniform, ``s`` for gaussian, the gain for orthogonal, a factor for ``'weight'``.
            None (default) gives the matrix the element variance torch's default init gives a weight of its
            shape, 1 / (3 · fan_in): the error arriving below has the size backprop's would have at init, which
            keeps deep nets trainable. Lillicrap et al.'s B ~ U[-0.5, 0.5] is ``init='uniform', scale=0.5``.
        seed: seeds the matrix; None draws from torch's global RNG (so ``torch.manual_seed`` governs it).
    """

    init: Literal["uniform", "gaussian", "orthogonal", "weight"] = "uniform"
    scale: float | None = None
    seed: int | None = None

    _inits: ClassVar[tuple[str, ...]] = ("uniform", "gaussian", "orthogonal", "weight")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(self.name, "init", self.init, self._inits)
        if self.scale is not None:
            _check_range(self.name, "scale", self.scale, 0.0, math.inf, low_open=True)

    def draw(self, shape: torch.Size | tuple[int, ...], weight: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """A float64 CPU matrix of ``shape`` drawn from ``seed`` (or ``generator``); fan_in = prod(shape[1:]).

        Drawn on the CPU in float64 and then cast and moved by the caller, so one seed gives the same matrix on
        every device and in every dtype (up to rounding).
        """
        gen = generator if generator is not None else _generator(self.seed)
        b = torch.empty(shape, dtype=torch.float64)
        std = 1.0 / math.sqrt(3.0 * b[0].numel())
        if self.init == "uniform":
            a = self.scale if self.scale is not None else math.sqrt(3.0) * std
            b.uniform_(-a, a, generator=gen)
        elif self.init == "gaussian":
            b.normal_(0.0, self.scale if self.scale is not None else std, generator=gen)
        elif self.init == "orthogonal":
            rows = b.shape[0]
            gain = self.scale if self.scale is not None else math.sqrt(rows / (3.0 * min(rows, b[0].numel())))
            torch.nn.init.orthogonal_(b.view(rows, -1), gain=gain, generator=gen)
        else:
            if weight is None or weight.shape != b.shape:
                raise ValueError(f"{self.name}: init='weight' copies the weight, so the matrix must have its shape")
            b.copy_(weight).mul_(1.0 if self.scale is None else self.scale)
        return b


@register
@dataclass(frozen=True)
class FA(RandomMatrixRule):
    """Feedback alignment (Lillicrap et al. 2016): a fixed random matrix B of the weight's shape (buffer
    ``feedback``), drawn once.

    Args:
        init, scale, seed: how B is drawn (see :class:`RandomMatrixRule`; by default B has the variance of
            torch's default init of W).
        sparsity: fraction of B's entries set to zero, drawn once (sparse feedback).
    """

    name: ClassVar[str] = "fa"
    sparsity: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range(self.name, "sparsity", self.sparsity, 0.0, 1.0)
        if self.sparsity == 1.0:
            raise ValueError("fa: sparsity=1.0 would remove all feedback; use rule='shallow' for that")

    def setup(self, layer: FeedbackLayer) -> None:
        weight = layer.weight.detach()
        gen = _generator(self.seed)
        b = self.draw(weight.shape, weight, gen)
        if self.sparsity > 0:
            b.mul_(torch.rand(b.shape, generator=gen, dtype=torch.float64) >= self.sparsity)
        layer.register_feedback_buffer("feedback", b.to(weight.dtype).to(weight.device))

    def feedback(self, layer: FeedbackLayer) -> Tensor:
        return layer.feedback


@dataclass(frozen=True)
class _SignRule(MatrixRule):
    """Sign-concordant feedback (Liao, Leibo & Poggio 2016): V = sign(W) [∘ M] · k.

    ``scale=None`` (default) sets k so that ‖V‖ ≈ ‖W‖ (k = rms(W) / rms(M)), recomputed from W every
    step; a number fixes k (``scale=1`` with ``usf`` is the paper's bare sign(W), which relies on Batch
    Normalization or Batch Manhattan to tame its size). ``concordance=p`` flips the sign of each element with
    probability 1 − p, drawn once from ``seed``. sign(0) = 0: a weight that is exactly zero sends nothing back.
    """

    scale: float | None = None
    concordance: float = 1.0
    seed: int | None = None

    # Stored magnitudes are multiplied by _magnitude_unit to lie in [0, 1]; _magnitude_rms is sqrt(E[M²]).
    _magnitudes: ClassVar[bool] = False
    _magnitude_unit: ClassVar[float] = 1.0
    _magnitude_rms: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale is not None:
            _check_range(self.name, "scale", self.scale, 0.0, math.inf, low_open=True)
        _check_range(self.name, "concordance", self.concordance, 0.0, 1.0)

    def setup(self, layer: FeedbackLayer) -> None:
        weight = layer.weight.detach()
        gen = _generator(self.seed)
        if self.concordance < 1.0:
            agree = torch.rand(weight.shape, generator=gen, dtype=torch.float64) < self.concordance
            flips = torch.where(agree, 1.0, -1.0).to(weight.dtype)
            layer.register_feedback_buffer("concordance_sign", flips.to(weight.device))
        if self._magnitudes:
            layer.register_feedback_buffer("magnitude", self._initial_magnitude(weight, gen).to(weight.device))

    def _initial_magnitude(self, weight: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def feedback_factors(self, layer: FeedbackLayer) -> tuple[Tensor, Tensor | float]:
        weight = layer.weight.detach()
        v = torch.sign(weight)
        if self._magnitudes:
            v.mul_(layer.magnitude)
        if self.concordance < 1.0:
            v.mul_(layer.concordance_sign)
        if self.scale is not None:
            return v, self.scale * self._magnitude_unit
        flat = weight.reshape(-1)
        factor = self._magnitude_unit / (self._magnitude_rms * math.sqrt(flat.numel()))
        return v, torch.dot(flat, flat).sqrt_().mul_(factor)  # rms(W) · unit / rms(M), a 0-dim tensor: no sync


@register
@dataclass(frozen=True)
class USF(_SignRule):
    __doc__ = "Uniform sign-concordant feedback: V = sign(W) · k.\n\n" + (_SignRule.__doc__ or "")
    name: ClassVar[str] = "usf"


@register
@dataclass(frozen=True)
class FRSF(_SignRule):
    __doc__ = (
        "Fixed random-magnitude sign-concordant feedback: V = M ∘ sign(W) · k, M ~ U[0, 1] drawn once from "
        "``seed`` (buffer ``magnitude``).\n\n" + (_SignRule.__doc__ or "")
    )
    name: ClassVar[str] = "frsf"
    _magnitudes: ClassVar[bool] = True
    _magnitude_rms: ClassVar[float] = 1.0 / math.sqrt(3.0)

    def _initial_magnitude(self, weight: Tensor, generator: torch.Generator) -> Tensor:
        return torch.rand(weight.shape, generator=generator, dtype=torch.float64).to(weight.dtype)


@register
@dataclass(frozen=True)
class BRSF(_SignRule):
    __doc__ = (
        "Batchwise random-magnitude sign-concordant feedback: V = M ∘ sign(W) · k with M redrawn in place at every "
        "training step (each training-mode forward whose error will pass below the layer).\n\n"
        "M is uniform on the 128 midpoints {1, 3, ..., 255} / 256 of [0, 1] (never 0, so every sign survives), "
        "stored as odd bytes (buffer ``magnitude``, uint8): random bits are what a CPU step pays for, and eight "
        "magnitudes per 64-bit draw keep the redraw cheap; the magnitudes' resolution does not matter (Liao et "
        "al.: magnitudes matter little). Draws come from the "
        "default generator of the layer's device, like ``nn.Dropout``, so ``torch.manual_seed`` makes them "
        "reproducible.\n\n" + (_SignRule.__doc__ or "")
    )
    name: ClassVar[str] = "brsf"
    _magnitudes: ClassVar[bool] = True
    _magnitude_unit: ClassVar[float] = 1.0 / 256.0
    _magnitude_rms: ClassVar[float] = math.sqrt(1.0 / 3.0 - 1.0 / (12.0 * 128**2))  # mean square of the midpoints

    def _initial_magnitude(self, weight: Tensor, generator: torch.Generator) -> Tensor:
        return torch.randint(0, 256, weight.shape, generator=generator, dtype=torch.uint8).bitwise_or_(1)

    @staticmethod
    def _redraw(magnitude: Tensor, generator: torch.Generator | None = None) -> None:
        flat = magnitude.view(-1)
        n = flat.numel()
        whole = n // 8 * 8
        words = (flat if whole == n else flat[:whole]).view(torch.int64)
        words.random_(generator=generator)  # all 64 bits of each draw become 8 magnitudes...
        words.bitwise_or_(0x0101010101010101)  # ...each made odd, 8 at a time
        if whole < n:
            flat[whole:].random_(0, 256, generator=generator).bitwise_or_(1)

    def forward(self, layer: FeedbackLayer, input: Tensor) -> Tensor:
        if layer.training and torch.is_grad_enabled() and input.requires_grad:
            self._redraw(layer.magnitude)
        return super().forward(layer, input)


@register
@dataclass(frozen=True)
class PBP(MatrixRule):
    """Pseudo-backprop: the error goes down through the pseudo-inverse, Δh = W⁺ e (V = (W⁺)ᵀ).

    Lillicrap et al. use it to show that feedback alignment behaves like a second-order method. Defined for
    linear layers only: the pseudo-inverse of a convolution operator is not a kernel of the same shape.
    Costs an SVD of W per step.
    """

    name: ClassVar[str] = "pbp"

    def setup(self, layer: FeedbackLayer) -> None:
        if layer.weight.dim() != 2:
            raise ValueError("pbp is defined for Linear layers only (the pseudo-inverse of a convolution is not "
                             "a kernel); convert the convolutions with another rule")

    def feedback(self, layer: FeedbackLayer) -> Tensor:
        return torch.linalg.pinv(layer.weight.detach()).mT


@register
@dataclass(frozen=True)
class Shallow(FeedbackRule):
    """No error passes below the layer: layers beneath get no gradient; only layers above learn."""

    name: ClassVar[str] = "shallow"

    def feedback(self, layer: FeedbackLayer) -> None:
        return None

