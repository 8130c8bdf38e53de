"""fbalign.functional: weight and bias gradients exact, input gradient through the given feedback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fbalign import functional

DOUBLE = dict(dtype=torch.float64)


def _autograd_grads(fn, input, weight, bias, grad_out):
    out = fn(input, weight, bias)
    return torch.autograd.grad(out, [input, weight] + ([bias] if bias is not None else []), grad_out)


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=3), n_in=st.integers(1, 7),
       n_out=st.integers(1, 7), bias=st.booleans())
def test_linear_with_weight_as_feedback_is_autograd(lead, n_in, n_out, bias):
    x = torch.randn(*lead, n_in, **DOUBLE, requires_grad=True)
    w = torch.randn(n_out, n_in, **DOUBLE, requires_grad=True)
    b = torch.randn(n_out, **DOUBLE, requires_grad=True) if bias else None
    g = torch.randn(*lead, n_out, **DOUBLE)
    ours = torch.autograd.grad(functional.linear(x, w, b, w), [x, w] + ([b] if bias else []), g)
    ref = _autograd_grads(F.linear, x, w, b, g)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_linear_input_gradient_is_grad_out_times_feedback():
    x = torch.randn(5, 3, 4, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    fb = torch.randn(6, 4)
    g = torch.randn(5, 3, 6)
    gx, gw = torch.autograd.grad(functional.linear(x, w, None, fb), [x, w], g)
    torch.testing.assert_close(gx, g @ fb)
    torch.testing.assert_close(gw, g.reshape(-1, 6).T @ x.reshape(-1, 4))
    assert not torch.allclose(gx, g @ w)


@pytest.mark.parametrize("n", [4, 1])  # 1: one example per member, whose weight gradient is an outer product
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", [None, 0.5])
def test_stacked_linear_is_each_members_own_linear(bias, scale, n):
    """Weights (E, out, in): member e computes, and sends its error down, as functional.linear on its own slices."""
    members, n_in, n_out = 3, 5, 2
    x = torch.randn(members, n, n_in, **DOUBLE, requires_grad=True)
    w = torch.randn(members, n_out, n_in, **DOUBLE, requires_grad=True)
    b = torch.randn(members, n_out, **DOUBLE, requires_grad=True) if bias else None
    fb = torch.randn(members, n_out, n_in, **DOUBLE)
    g = torch.randn(members, n, n_out, **DOUBLE)
    inputs = [x, w] + ([b] if bias else [])
    out = functional.linear(x, w, b, fb, scale, torch.tanh)
    grads = torch.autograd.grad(out, inputs, g)
    for e in range(members):
        own = [t[e].detach().requires_grad_() for t in inputs]
        out_e = functional.linear(own[0], own[1], own[2] if bias else None, fb[e], scale, torch.tanh)
        torch.testing.assert_close(out[e], out_e, rtol=1e-13, atol=1e-13)
        for stacked, alone in zip(grads, torch.autograd.grad(out_e, own, g[e])):
            torch.testing.assert_close(stacked[e], alone, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match=r"stacked weight \(3, 2, 5\) \(E, out, in\) takes an input \(E, N, in\)"):
        functional.linear(x[0], w, b, fb)


def test_no_feedback_means_no_input_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(2, 4, requires_grad=True)
    functional.linear(x, w, None, None).sum().backward()
    assert x.grad is None and w.grad is not None
    xc = torch.randn(1, 2, 5, 5, requires_grad=True)
    k = torch.randn(3, 2, 3, 3, requires_grad=True)
    functional.conv(xc, k, None, None, (1, 1), (1, 1), (1, 1)).sum().backward()
    assert xc.grad is None and k.grad is not None


def test_feedback_shape_must_match():
    with pytest.raises(ValueError, match="feedback has shape"):
        functional.linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(3, 4))


CONV_CASES = [
    # (dims, in, out, kernel, stride, padding, dilation, groups, bias)
    (1, 3, 4, 3, 1, 0, 1, 1, True),
    (1, 4, 6, 5, 2, 2, 2, 2, False),
    (2, 3, 5, 3, 1, 1, 1, 1, True),
    (2, 4, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2, True),
    (2, 6, 6, 3, 1, 1, 1, 6, False),  # depthwise
    (3, 2, 4, 3, 2, 1, 1, 1, True),
    (3, 4, 4, (1, 3, 2), 1, (0, 1, 1), (1, 2, 1), 4, False),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_with_kernel_as_feedback_is_autograd(case):
    dims, cin, cout, k, stride, pad, dil, groups, bias = case
    kernel = (k,) * dims if isinstance(k, int) else k
    tup = lambda v: (v,) * dims if isinstance(v, int) else v  # noqa: E731
    x = torch.randn(2, cin, *([7] * dims), **DOUBLE, requires_grad=True)
    w = torch.randn(cout, cin // groups, *kernel, **DOUBLE, requires_grad=True)
    b = torch.randn(cout, **DOUBLE, requires_grad=True) if bias else None
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    out = conv(x, w, b, tup(stride), tup(pad), tup(dil), groups)
    g = torch.randn_like(out)
    params = [x, w] + ([b] if bias else [])
    ours = torch.autograd.grad(functional.conv(x, w, b, w, tup(stride), tup(pad), tup(dil), groups), params, g)
    ref = torch.autograd.grad(out, params, g)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
    # With another kernel as feedback the input gradient is that kernel's transposed convolution.
    fb = torch.randn_like(w)
    gx = torch.autograd.grad(functional.conv(x, w, b, fb, tup(stride), tup(pad), tup(dil), groups), x, g)[0]
    ref_gx = torch.autograd.grad(conv(x, fb, b, tup(stride), tup(pad), tup(dil), groups), x, g)[0]
    torch.testing.assert_close(gx, ref_gx, rtol=1e-10, atol=1e-10)


def test_unbatched_conv_input():
    x = torch.randn(3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    out = functional.conv(x, w, None, w, (1, 1), (1, 1), (1, 1))
    assert out.shape == (4, 8, 8)
    out.sum().backward()
    ref = torch.autograd.grad(F.conv2d(x, w, None, 1, 1).sum(), x)[0]
    torch.testing.assert_close(x.grad, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_autocast_matches_autograd_under_autocast(op, dtype):
    torch.manual_seed(1)
    if op == "linear":
        x = torch.randn(8, 16, requires_grad=True)
        w = torch.randn(4, 16, requires_grad=True)
        b = torch.randn(4, requires_grad=True)
        ours_fn = lambda: functional.linear(x, w, b, w)  # noqa: E731
        ref_fn = lambda: F.linear(x, w, b)  # noqa: E731
    else:
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        w = torch.randn(4, 3, 3, 3, requires_grad=True)
        b = torch.randn(4, requires_grad=True)
        ours_fn = lambda: functional.conv(x, w, b, w, (1, 1), (1, 1), (1, 1))  # noqa: E731
        ref_fn = lambda: F.conv2d(x, w, b, 1, 1)  # noqa: E731
    results = []
    for fn in (ours_fn, ref_fn):
        with torch.autocast("cpu", dtype=dtype):
            out = fn()
        assert out.dtype == dtype
        grads = torch.autograd.grad(out.float().square().sum(), [x, w, b])
        assert all(g.dtype == torch.float32 for g in grads)
        results.append(grads)
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("batch", [3, 40])  # error smaller than the matrix, and larger
def test_feedback_scale_multiplies_the_feedback(batch):
    x = torch.randn(batch, 20, **DOUBLE, requires_grad=True)
    w = torch.randn(10, 20, **DOUBLE, requires_grad=True)
    fb = torch.randn(10, 20, **DOUBLE)
    scale = torch.tensor(0.37, **DOUBLE)
    g = torch.randn(batch, 10, **DOUBLE)
    gx = torch.autograd.grad(functional.linear(x, w, None, fb, scale), x, g)[0]
    torch.testing.assert_close(gx, g @ (fb * 0.37))
    xc = torch.randn(2, 3, 6, 6, **DOUBLE, requires_grad=True)
    k = torch.randn(4, 3, 3, 3, **DOUBLE, requires_grad=True)
    fk = torch.randn_like(k)
    gc = torch.randn(2, 4, 4, 4, **DOUBLE)
    got = torch.autograd.grad(functional.conv(xc, k, None, fk, (1, 1), (0, 0), (1, 1), 1, 0.37), xc, gc)[0]
    ref = torch.autograd.grad(F.conv2d(xc, fk * 0.37), xc, gc)[0]
    torch.testing.assert_close(got, ref)


def test_send_down_is_its_own_argument():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    seven = lambda grad_output, input: torch.full_like(input, 7.0)  # noqa: E731
    functional.linear(x, w, None, None, send_down=seven).sum().backward()
    assert torch.all(x.grad == 7.0) and w.grad is not None
    with pytest.raises(ValueError, match="not both"):
        functional.linear(x, w, None, w.detach(), send_down=seven)
    with pytest.raises(TypeError, match="feedback must be a tensor"):
        functional.linear(x, w, None, "w")
    with pytest.raises(TypeError, match="send_down must be a callable"):
        functional.linear(x, w, None, None, send_down=w)
    x.grad = None
    with pytest.warns(DeprecationWarning, match="send_down"):  # the old way: a callable as feedback
        functional.linear(x, w, None, seven).sum().backward()
    assert torch.all(x.grad == 7.0)
    image = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    functional.conv(image, kernel, None, None, (1,), (0,), (1,), send_down=seven).sum().backward()
    assert torch.all(image.grad == 7.0) and kernel.grad is not None
