"""Sign-concordant feedback (Liao, Leibo & Poggio 2016): ``usf``, ``frsf`` and ``brsf``.

The feedback matrix keeps the signs of the forward weights and forgets (or randomizes) their magnitudes:
``V = sign(W) [∘ M] · k``. See :class:`USF`, :class:`FRSF`, :class:`BRSF`.

    >>> model = fbalign.convert(model, "frsf", seed=0)
    >>> model = fbalign.convert(model, "usf", concordance=0.75, seed=0)   # S_0.75: a quarter of the signs flipped
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from . import MatrixRule, _check_range, _generator, register

if TYPE_CHECKING:
    from ..nn import FeedbackLayer

__all__ = ["USF", "FRSF", "BRSF"]


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
            layer.add_rule_buffer("concordance_sign", flips.to(weight.device))
        if self._magnitudes:
            layer.add_rule_buffer("magnitude", self._initial_magnitude(weight, gen).to(weight.device))

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
        "stored as odd bytes (buffer ``magnitude``, uint8), eight drawn per 64-bit random word. Draws come from the "
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
    def _redraw(magnitude: Tensor) -> None:
        flat = magnitude.view(-1)
        n = flat.numel()
        whole = n // 8 * 8
        words = (flat if whole == n else flat[:whole]).view(torch.int64)
        words.random_()  # all 64 bits of each draw become 8 magnitudes...
        words.bitwise_or_(0x0101010101010101)  # ...each made odd, 8 at a time
        if whole < n:
            flat[whole:].random_(0, 256).bitwise_or_(1)

    def forward(self, layer: FeedbackLayer, input: Tensor) -> Tensor:
        if layer.training and torch.is_grad_enabled() and input.requires_grad:
            self._redraw(layer.magnitude)
        return super().forward(layer, input)
