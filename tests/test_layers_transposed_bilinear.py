"""fbalign.nn.ConvTranspose1d/2d/3d and Bilinear: torch's outputs, torch's gradients with B = W, others under fa."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fbalign

TRANSPOSED = [
    (nn.ConvTranspose1d, {"stride": 2, "padding": 1, "output_padding": 1}, (2, 4, 5)),
    (nn.ConvTranspose2d, {"stride": 2, "padding": 1, "output_padding": 1, "groups": 2, "dilation": 2}, (2, 4, 5, 4)),
    (nn.ConvTranspose2d, {"bias": False}, (4, 3, 3)),  # unbatched
    (nn.ConvTranspose3d, {"stride": (1, 2, 2), "output_padding": (0, 1, 1)}, (1, 4, 3, 3, 3)),
]


def _check(original, converted, inputs, call):
    grads = []
    for module in (original, converted):
        for x in inputs:
            x.grad = None
        module.zero_grad()
        out = call(module)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        (out * weights).sum().backward()
        grads.append((out, [x.grad.clone() for x in inputs], {k: p.grad.clone() for k, p in module.named_parameters()}))
    return grads


@pytest.mark.parametrize("kind,options,shape", TRANSPOSED)
def test_conv_transpose_equals_torch_with_b_equal_w_and_differs_below_under_fa(kind, options, shape):
    torch.manual_seed(0)
    original = kind(4, 6, 3, **options).double()
    exact = fbalign.convert(nn.Sequential(original), "fa", init="weight")[0]
    fa = fbalign.convert(nn.Sequential(original), "fa", seed=0)[0]
    assert isinstance(exact, fbalign.nn.FeedbackLayer) and isinstance(exact, kind)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    (o0, x0, g0), (o1, x1, g1) = _check(original, exact, [x], lambda m: m(x))
    (_, x2, g2), = _check(original, fa, [x], lambda m: m(x))[1:]
    torch.testing.assert_close(o1, o0)
    torch.testing.assert_close(x1[0], x0[0])
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name])
        torch.testing.assert_close(g2[name], g0[name])  # weight gradients are local
    assert not torch.allclose(x2[0], x0[0])
    # the rule's own feedback kernel, by hand: the input's error is conv(grad_out, B)
    manual = fbalign.convert(nn.Sequential(original), "fa", seed=0)[0]
    assert manual.feedback.shape == original.weight.shape


def test_conv_transpose_output_size_argument():
    torch.manual_seed(0)
    original = nn.ConvTranspose2d(3, 2, 3, stride=2)
    converted = fbalign.nn.ConvTranspose2d.from_module(original, "fa", seed=0)
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    out = converted(x, output_size=[10, 10])
    assert out.shape == (1, 2, 10, 10)
    torch.testing.assert_close(out, original(x, output_size=[10, 10]))
    out.sum().backward()
    assert x.grad is not None and converted.weight.grad is not None


def test_conv_transpose_hand_computed_feedback():
    torch.manual_seed(0)
    layer = fbalign.nn.ConvTranspose1d(2, 3, 2, stride=2, rule="fa", seed=0).double()
    x = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(1, 3, 6, dtype=torch.float64)
    layer(x).backward(grad_out)
    # the input's error is the plain convolution of the error with B (the adjoint of the transposed convolution)
    expected = torch.nn.functional.conv1d(grad_out, layer.feedback, stride=2)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("rule", ["fa", "usf", "frsf", "brsf", "kp", "shallow"])
def test_bilinear_equals_torch_with_b_equal_w_and_takes_every_rule(rule):
    torch.manual_seed(0)
    original = nn.Bilinear(3, 4, 5).double()
    exact = fbalign.convert(nn.Sequential(original), "fa", init="weight")[0]
    x1 = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    (o0, xs0, g0), (o1, xs1, g1) = _check(original, exact, [x1, x2], lambda m: m(x1, x2))
    torch.testing.assert_close(o1, o0)
    for a, b in zip(xs1, xs0):
        torch.testing.assert_close(a, b)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name])
    other = fbalign.convert(nn.Sequential(original), rule, seed=0)[0]
    x1.grad = x2.grad = None
    other(x1, x2).sum().backward()
    if rule == "shallow":
        assert x1.grad is None and x2.grad is None
    else:
        assert not torch.allclose(x1.grad, xs0[0]) and other.weight.grad is not None
    if rule == "fa":  # by hand: grad_x1 = g · B · x2
        g = torch.ones(2, 6, 5, dtype=torch.float64)
        torch.testing.assert_close(x1.grad, torch.einsum("nto,oij,ntj->nti", g, other.feedback, x2))


def test_bilinear_refuses_layer_level_dfa_with_advice():
    with pytest.raises(ValueError, match="dfa is not defined for Bilinear"):
        fbalign.convert(nn.Sequential(nn.Bilinear(2, 2, 2), nn.Linear(2, 2)), "dfa")
    model = fbalign.convert(nn.Sequential(nn.Bilinear(2, 2, 2), nn.Linear(2, 2)), {nn.Bilinear: "fa", "*": "dfa"})
    assert model[0].rule.name == "fa" and model[1].rule.name == "dfa"


def test_conv_transpose_under_layer_level_dfa_gets_the_projected_error_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 2, stride=2), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).double()
    model = fbalign.convert(model, "dfa", seed=0, resolution=1)
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 4, dtype=torch.float64)
    (model(x) * weights).sum().backward()
    b = model[0].direct_feedback  # (n_err, C_in, 1, 1)
    expected = (weights @ b.view(4, 2)).view(5, 2, 1, 1).expand(5, 2, 3, 3) / 9  # one value per channel / positions
    torch.testing.assert_close(x.grad, expected)
