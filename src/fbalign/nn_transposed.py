"""Transposed convolutions and Bilinear with a learning rule (re-exported by :mod:`fbalign.nn`).

Kept apart from :mod:`fbalign.nn` only for size: they are ordinary :class:`~fbalign.nn.FeedbackLayer` subclasses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional, rules
from .nn import FeedbackLayer
from .rules import FeedbackRule

__all__ = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Bilinear"]


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
                {"__init__": __init__, "__doc__": _conv_transpose_doc(n), "__module__": "fbalign.nn",
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
