"""Linear and convolution ops whose error goes down through a given feedback matrix.

The forward pass is torch's own (``F.linear``, ``F.conv*d``; for E stacked Linear layers, an ensemble's, one
``torch.baddbmm``). The backward pass computes the weight and
bias gradients exactly as autograd would, and the input gradient with ``feedback`` in place of the weight:

* linear: ``grad_input = grad_output @ feedback`` (``feedback`` has the weight's shape ``(out, in)``,
  so in Lillicrap et al.'s notation the matrix carrying the error down is ``B = feedback.T``);
* convolution: the transposed convolution of ``grad_output`` with ``feedback`` (same shape as the kernel).

``feedback=None`` sends no error below the op: the input gets no gradient. ``feedback_nonlinearity=f`` makes
the feedback path nonlinear: the input receives ``f(grad_output @ feedback)`` (``f`` of the transposed
convolution), elementwise. Instead of a matrix, ``send_down=g``, a callable ``(grad_output, input) -> grad_input``,
computes the input's gradient itself (how direct feedback alignment sends the output error); the op then computes
only the weight and bias gradients.

Example::

    >>> x = torch.randn(32, 784, requires_grad=True)
    >>> w = torch.randn(100, 784, requires_grad=True)
    >>> b = torch.rand(100, 784)                         # fixed feedback, the weight's shape
    >>> fbalign.functional.linear(x, w, None, b).sum().backward()
    >>> torch.allclose(x.grad, torch.ones(32, 100) @ b)  # the error went down through b, not w
    True

With ``feedback is weight`` both ops reproduce autograd to float tolerance; the tests check this.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["linear", "conv", "autocast_args"]

Nonlinearity = Callable[[Tensor], Tensor]
SendDown = Callable[[Tensor, Tensor], Tensor]
"""``(grad_output, input) -> grad_input``: an input gradient computed without a feedback matrix (see dfa)."""


def _send_down_argument(feedback: Tensor | SendDown | None, send_down: SendDown | None
                        ) -> tuple[Tensor | None, SendDown | None]:
    """Check that ``feedback`` is a tensor or None and ``send_down`` a callable or None, not both given; accept a
    callable ``feedback`` (the old way to pass ``send_down``) with a DeprecationWarning."""
    if feedback is not None and not isinstance(feedback, Tensor):
        if not callable(feedback):
            raise TypeError(f"feedback must be a tensor of the weight's shape or None, not {type(feedback).__name__}")
        warnings.warn("passing a callable as feedback is deprecated; pass it as send_down=", DeprecationWarning,
                      stacklevel=3)
        feedback, send_down = None, feedback if send_down is None else send_down
    if send_down is not None:
        if not callable(send_down):
            raise TypeError(f"send_down must be a callable (grad_output, input) -> grad_input, not "
                            f"{type(send_down).__name__}")
        if feedback is not None:
            raise ValueError("give feedback (a matrix the error goes through) or send_down (a function computing the "
                             "input's gradient), not both")
    return feedback, send_down


def autocast_args(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast floating tensors to the autocast dtype when autocast is on for the first tensor's device.

    The custom backward below multiplies saved tensors together, so they must share one dtype. Casting
    before ``Function.apply`` (rather than inside it) lets autograd carry the gradient back through the
    cast to the float32 master weight, exactly as autocast does for ``F.linear``.
    """
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


# Old-style Functions (forward takes ctx): the setup_context style costs more per call, which shows on a
# small network's step.
class _FeedbackLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | None,
                send_down: SendDown | None, feedback_scale: Tensor | float | None,
                nonlinearity: Nonlinearity | None) -> Tensor:
        ctx.has_bias = bias is not None
        ctx.has_feedback = feedback is not None
        ctx.stacked = weight.dim() == 3
        ctx.send_down = send_down
        ctx.feedback_scale = feedback_scale
        ctx.nonlinearity = nonlinearity
        ctx.save_for_backward(input, feedback)
        if weight.dim() == 2:
            return F.linear(input, weight, bias)
        # E stacked layers (fbalign.stacked): input (E, N, in), weight (E, out, in), one batched matmul
        return torch.bmm(input, weight.mT) if bias is None else torch.baddbmm(bias.unsqueeze(1), input, weight.mT)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, feedback = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0] and ctx.send_down is not None:
            grad_input = ctx.send_down(grad_output, input)
        elif ctx.needs_input_grad[0] and ctx.has_feedback:
            scale, times = ctx.feedback_scale, torch.bmm if ctx.stacked else torch.matmul
            if scale is None:
                grad_input = times(grad_output, feedback)
            elif grad_output.numel() // grad_output.shape[-1] <= feedback.shape[-2]:
                grad_input = times(grad_output, feedback).mul_(scale)  # scale the smaller of the two
            else:
                grad_input = times(grad_output, feedback * scale)
            if ctx.nonlinearity is not None:
                grad_input = ctx.nonlinearity(grad_input)
        if ctx.stacked:  # (E, N, out): one bmm for all E members
            if ctx.needs_input_grad[1]:
                # one example per member (the online tasks): an outer product, which a broadcast multiply does in a
                # fraction of a batched matmul's time with inner dimension 1
                grad_weight = (grad_output.mT * input if input.shape[1] == 1 else
                               torch.bmm(grad_output.mT, input))
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad_output.sum(1)
            return grad_input, grad_weight, grad_bias, None, None, None, None
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = flat_grad.t().mm(input.reshape(-1, input.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def linear(input: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | None,
           feedback_scale: Tensor | float | None = None, feedback_nonlinearity: Nonlinearity | None = None, *,
           send_down: SendDown | None = None) -> Tensor:
    """``F.linear`` whose error reaches ``input`` through ``feedback · feedback_scale`` instead of ``weight``.

    Shapes: input ``(*, in)``, weight and feedback ``(out, in)``, bias ``(out,)``, output ``(*, out)``; or E
    stacked layers (:mod:`fbalign.stacked`): input ``(E, N, in)``, weight and feedback ``(E, out, in)``, bias
    ``(E, out)``, output ``(E, N, out)``, member ``e``'s error going down through ``feedback[e]``;
    ``feedback_scale`` is a number or a 0-dim tensor, applied to whichever of the error or the matrix is
    smaller. ``feedback`` receives no gradient. ``feedback_nonlinearity``, when given, maps the error after the
    matrix: ``grad_input = f(grad_output @ feedback)``. ``send_down`` (with ``feedback=None``) computes
    ``grad_input`` itself from ``(grad_output, input)``.
    """
    feedback, send_down = _send_down_argument(feedback, send_down)
    if weight.dim() == 3 and input.dim() != 3:
        raise ValueError(f"a stacked weight {tuple(weight.shape)} (E, out, in) takes an input (E, N, in), not "
                         f"{tuple(input.shape)}")
    if feedback is not None:
        if feedback.shape != weight.shape:
            raise ValueError(f"feedback has shape {tuple(feedback.shape)} but the weight has {tuple(weight.shape)}")
        input, weight, bias, feedback = autocast_args(input, weight, bias, feedback)
    else:
        input, weight, bias = autocast_args(input, weight, bias)
    return _FeedbackLinear.apply(input, weight, bias, feedback, send_down, feedback_scale, feedback_nonlinearity)


_CONV_FORWARD = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _FeedbackConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | None,
                send_down: SendDown | None, stride: tuple[int, ...], padding: tuple[int, ...],
                dilation: tuple[int, ...], groups: int, nonlinearity: Nonlinearity | None) -> Tensor:
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.nonlinearity = nonlinearity
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.has_feedback = feedback is not None
        ctx.send_down = send_down
        # Without a feedback kernel the weight only fills convolution_backward's weight slot (values unused).
        ctx.save_for_backward(input, feedback if ctx.has_feedback else weight)
        return _CONV_FORWARD[weight.dim() - 2](input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, feedback = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        mask = [
            ctx.needs_input_grad[0] and ctx.has_feedback,
            ctx.needs_input_grad[1],
            ctx.bias_sizes is not None and ctx.needs_input_grad[2],
        ]
        # The weight gradient depends only on input and grad_output, so one call with the feedback kernel
        # in the weight's slot gives the exact weight gradient and the feedback-driven input gradient.
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output, input, feedback, ctx.bias_sizes, list(stride), list(padding), list(dilation), False,
            [0] * len(stride), groups, mask,
        )
        if grad_input is not None and ctx.nonlinearity is not None:
            grad_input = ctx.nonlinearity(grad_input)
        if ctx.send_down is not None and ctx.needs_input_grad[0]:
            grad_input = ctx.send_down(grad_output, input)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    feedback: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int = 1,
    feedback_scale: Tensor | float | None = None,
    feedback_nonlinearity: Nonlinearity | None = None,
    *,
    send_down: SendDown | None = None,
) -> Tensor:
    """``F.conv{1,2,3}d`` (chosen by ``weight.dim()``) whose error reaches ``input`` through
    ``feedback · feedback_scale`` (then ``feedback_nonlinearity``, elementwise, when given).

    Shapes: input ``(N, C_in, *spatial)`` or unbatched ``(C_in, *spatial)``, weight and feedback
    ``(C_out, C_in / groups, *kernel)``. ``padding`` is numeric and symmetric; callers pad asymmetric or
    non-zero padding explicitly first (as ``nn.Conv2d`` does). ``send_down`` (with ``feedback=None``) computes the
    input's gradient itself from ``(grad_output, input)`` (``input`` batched, as the op sees it).
    """
    feedback, send_down = _send_down_argument(feedback, send_down)
    if weight.dim() == 3 and input.dim() != 3:
        raise ValueError(f"a stacked weight {tuple(weight.shape)} (E, out, in) takes an input (E, N, in), not "
                         f"{tuple(input.shape)}")
    if feedback is not None:
        if feedback.shape != weight.shape:
            raise ValueError(f"feedback has shape {tuple(feedback.shape)} but the kernel has {tuple(weight.shape)}")
        if feedback_scale is not None:
            feedback = feedback * feedback_scale  # kernels are small next to the error maps
    unbatched = input.dim() == weight.dim() - 1
    if unbatched:
        input = input.unsqueeze(0)
    if feedback is not None:
        input, weight, bias, feedback = autocast_args(input, weight, bias, feedback)
    else:
        input, weight, bias = autocast_args(input, weight, bias)
    out = _FeedbackConv.apply(input, weight, bias, feedback, send_down, tuple(stride), tuple(padding),
                              tuple(dilation), groups, feedback_nonlinearity)
    return out.squeeze(0) if unbatched else out


# --- transposed convolution and bilinear (fbalign.nn.ConvTranspose1d/2d/3d, fbalign.nn.Bilinear) -------------------

class _FeedbackConvTranspose(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | SendDown | None,
                stride: tuple[int, ...], padding: tuple[int, ...], output_padding: tuple[int, ...], groups: int,
                dilation: tuple[int, ...], nonlinearity: Nonlinearity | None) -> Tensor:
        ctx.conv_args = (stride, padding, output_padding, groups, dilation)
        ctx.nonlinearity = nonlinearity
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.has_feedback = isinstance(feedback, Tensor)
        ctx.send_down = None if feedback is None or ctx.has_feedback else feedback
        ctx.save_for_backward(input, feedback if ctx.has_feedback else weight)
        return torch.convolution(input, weight, bias, list(stride), list(padding), list(dilation), True,
                                 list(output_padding), groups)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, feedback = ctx.saved_tensors
        stride, padding, output_padding, groups, dilation = ctx.conv_args
        mask = [ctx.needs_input_grad[0] and ctx.has_feedback, ctx.needs_input_grad[1],
                ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
        # As for _FeedbackConv: the feedback kernel in the weight's slot; the weight gradient stays exact.
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output, input, feedback, ctx.bias_sizes, list(stride), list(padding), list(dilation), True,
            list(output_padding), groups, mask)
        if grad_input is not None and ctx.nonlinearity is not None:
            grad_input = ctx.nonlinearity(grad_input)
        if ctx.send_down is not None and ctx.needs_input_grad[0]:
            grad_input = ctx.send_down(grad_output, input)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def conv_transpose(input: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | SendDown | None,
                   stride: Sequence[int], padding: Sequence[int], output_padding: Sequence[int], groups: int = 1,
                   dilation: Sequence[int] = (1,), feedback_scale: Tensor | float | None = None,
                   feedback_nonlinearity: Nonlinearity | None = None) -> Tensor:
    """``F.conv_transpose{1,2,3}d`` whose error reaches ``input`` through ``feedback · feedback_scale``: the input
    gradient is the convolution of the error with ``feedback`` in place of the kernel.

    Shapes: input ``(N, C_in, *spatial)`` or unbatched, weight and feedback ``(C_in, C_out / groups, *kernel)``.
    """
    if isinstance(feedback, Tensor):
        if feedback.shape != weight.shape:
            raise ValueError(f"feedback has shape {tuple(feedback.shape)} but the kernel has {tuple(weight.shape)}")
        if feedback_scale is not None:
            feedback = feedback * feedback_scale
    unbatched = input.dim() == weight.dim() - 1
    if unbatched:
        input = input.unsqueeze(0)
    if isinstance(feedback, Tensor):
        input, weight, bias, feedback = autocast_args(input, weight, bias, feedback)
    else:
        input, weight, bias = autocast_args(input, weight, bias)
    n = weight.dim() - 2
    expand = (lambda v: tuple(v) * n if len(tuple(v)) == 1 else tuple(v))  # noqa: E731
    out = _FeedbackConvTranspose.apply(input, weight, bias, feedback, expand(stride), expand(padding),
                                       expand(output_padding), groups, expand(dilation), feedback_nonlinearity)
    return out.squeeze(0) if unbatched else out


class _FeedbackBilinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, joined: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | SendDown | None,
                feedback_scale: Tensor | float | None, nonlinearity: Nonlinearity | None) -> Tensor:
        ctx.has_bias = bias is not None
        ctx.send_down = None if feedback is None or isinstance(feedback, Tensor) else feedback
        ctx.has_feedback = isinstance(feedback, Tensor)
        ctx.feedback_scale, ctx.nonlinearity = feedback_scale, nonlinearity
        ctx.save_for_backward(joined, weight, feedback if ctx.has_feedback else None)
        x1, x2 = joined.split([weight.shape[1], weight.shape[2]], dim=-1)
        return F.bilinear(x1, x2, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        joined, weight, feedback = ctx.saved_tensors
        x1, x2 = joined.split([weight.shape[1], weight.shape[2]], dim=-1)
        grad_joined = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0] and ctx.send_down is not None:
            grad_joined = ctx.send_down(grad_output, joined)
        elif ctx.needs_input_grad[0] and ctx.has_feedback:
            matrix = feedback if ctx.feedback_scale is None else feedback * ctx.feedback_scale
            grad_x1 = torch.einsum("...o,oij,...j->...i", grad_output, matrix, x2)
            grad_x2 = torch.einsum("...o,oij,...i->...j", grad_output, matrix, x1)
            grad_joined = torch.cat([grad_x1, grad_x2], dim=-1)
            if ctx.nonlinearity is not None:
                grad_joined = ctx.nonlinearity(grad_joined)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.einsum("...o,...i,...j->oij", grad_output, x1, x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_joined, grad_weight, grad_bias, None, None, None


def bilinear(input1: Tensor, input2: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | SendDown | None,
             feedback_scale: Tensor | float | None = None,
             feedback_nonlinearity: Nonlinearity | None = None) -> Tensor:
    """``F.bilinear`` whose error reaches both inputs through ``feedback · feedback_scale`` in place of the weight:
    ``grad_input1 = g · V · x2``, ``grad_input2 = g · V · x1`` (V has the weight's shape ``(out, in1, in2)``).

    Shapes: inputs ``(*, in1)`` and ``(*, in2)``, output ``(*, out)``. A callable ``feedback`` receives
    ``(grad_output, joined)`` with ``joined = cat([input1, input2], -1)`` and returns its gradient.
    """
    return bilinear_joined(torch.cat([input1, input2], dim=-1), weight, bias, feedback, feedback_scale,
                           feedback_nonlinearity)


def bilinear_joined(joined: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | SendDown | None,
                    feedback_scale: Tensor | float | None = None,
                    feedback_nonlinearity: Nonlinearity | None = None) -> Tensor:
    """:func:`bilinear` on ``cat([input1, input2], -1)`` (how ``fbalign.nn.Bilinear`` hands its inputs to a rule)."""
    if isinstance(feedback, Tensor) and feedback.shape != weight.shape:
        raise ValueError(f"feedback has shape {tuple(feedback.shape)} but the weight has {tuple(weight.shape)}")
    if isinstance(feedback, Tensor):
        joined, weight, bias, feedback = autocast_args(joined, weight, bias, feedback)
    else:
        joined, weight, bias = autocast_args(joined, weight, bias)
    return _FeedbackBilinear.apply(joined, weight, bias, feedback, feedback_scale, feedback_nonlinearity)


__all__ += ["conv_transpose", "bilinear", "bilinear_joined"]
