"""fbalign.recurrent: converted RNN/LSTM/GRU and their cells give torch's outputs, torch's gradients with B = W,
different ones under fa; layer-level dfa sends each step's output error to that step's hidden state."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fbalign
from fbalign.recurrent import LSTM


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients under torch's names (ih_l0.weight -> weight_ih_l0, ih.bias -> bias_ih)."""
    found = {}
    for name, p in module.named_parameters():
        if p.grad is not None:
            if "." in name:
                child, kind = name.rsplit(".", 1)
                name = f"{kind}_{child}"
            found[name] = p.grad.clone()
    return found


def _run(module, x, packed_lengths, batch_first, hx):
    inp = x
    if packed_lengths is not None:
        inp = pack_padded_sequence(x, packed_lengths, batch_first=batch_first, enforce_sorted=False)
    out, h = module(inp, hx)
    data = out.data if packed_lengths is not None else out
    states = h if isinstance(h, tuple) else (h,)
    weights = torch.linspace(-1, 1, data.numel(), dtype=data.dtype).view(data.shape)
    (data * weights).sum().backward() if not states else ((data * weights).sum()
                                                           + sum(s.sin().sum() for s in states)).backward()
    return data, states


NETS = [
    (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    (nn.LSTM, {"num_layers": 2, "batch_first": True, "proj_size": 3, "dropout": 0.3}),
    (nn.GRU, {"num_layers": 2, "batch_first": True, "bidirectional": True}),
    (nn.RNN, {"nonlinearity": "relu", "bias": False}),
    (nn.RNN, {"num_layers": 3, "dropout": 0.5}),
]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind,options", NETS)
@pytest.mark.parametrize("rule", [("fa", {"init": "weight"}), ("backprop", {})])
def test_outputs_and_gradients_equal_torch_with_b_equal_w(kind, options, packed, rule):
    torch.manual_seed(0)
    original = kind(4, 5, **options).double()
    converted = fbalign.convert(nn.Sequential(original), rule[0], **rule[1])[0]
    assert not fbalign.unconverted(nn.Sequential(converted))
    batch_first = options.get("batch_first", False)
    x = torch.randn(3, 6, 4, dtype=torch.float64) if batch_first else torch.randn(6, 3, 4, dtype=torch.float64)
    x.requires_grad_(True)
    lengths = torch.tensor([6, 2, 4]) if packed else None
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    h0 = torch.randn(layers, 3, options.get("proj_size") or 5, dtype=torch.float64)
    hx = (h0, torch.randn(layers, 3, 5, dtype=torch.float64)) if kind is nn.LSTM else h0
    results = []
    for module in (original, converted):
        module.train(options.get("dropout", 0) == 0)  # dropout draws: compared in eval mode
        x.grad = None
        data, states = _run(module, x, lengths, batch_first, hx)
        results.append((data, states, _grads(module), x.grad.clone()))
    (a, sa, ga, xa), (b, sb, gb, xb) = results
    torch.testing.assert_close(b, a)
    for s, t in zip(sb, sa):
        torch.testing.assert_close(s, t)
    torch.testing.assert_close(xb, xa)
    assert set(gb) == set(ga)
    for name, grad in ga.items():
        torch.testing.assert_close(gb[name], grad, msg=name)


def test_dropout_between_layers_in_training():
    torch.manual_seed(0)
    converted = fbalign.convert(nn.Sequential(nn.GRU(3, 4, num_layers=2, dropout=0.5)), "fa", seed=0)[0]
    x = torch.randn(5, 2, 3)
    converted.train()
    assert not torch.equal(converted(x)[0], converted(x)[0])
    converted.eval()
    assert torch.equal(converted(x)[0], converted(x)[0])


@pytest.mark.parametrize("kind", [nn.RNNCell, nn.LSTMCell, nn.GRUCell])
def test_cells_equal_torch_and_differ_under_fa(kind):
    torch.manual_seed(0)
    original = kind(4, 5).double()
    exact = fbalign.convert(nn.Sequential(original), "fa", init="weight")[0]
    fa = fbalign.convert(nn.Sequential(original), "fa", seed=0)[0]
    assert exact.weight_ih is exact.ih.weight and torch.equal(exact.weight_ih, original.weight_ih)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    hx = (h, c) if kind is nn.LSTMCell else h
    grads = []
    for module in (original, exact, fa):
        x.grad = h.grad = None
        out = module(x, hx)
        out = out[0] * out[1] if isinstance(out, tuple) else out
        out.sin().sum().backward()
        grads.append((out, x.grad.clone(), h.grad.clone(), _grads(module)))
    (o0, x0, h0, g0), (o1, x1, h1, g1), (o2, x2, h2, g2) = grads
    torch.testing.assert_close(o1, o0)
    torch.testing.assert_close(o2, o0)
    torch.testing.assert_close(x1, x0)
    torch.testing.assert_close(h1, h0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name])
        torch.testing.assert_close(g2[name], g0[name])  # a single layer's weight gradients are local: exact
    assert not torch.allclose(x2, x0) and not torch.allclose(h2, h0)  # what goes below and back in time differs
    unbatched = original(x[0], hx[0] if not isinstance(hx, tuple) else (hx[0][0], hx[1][0]))
    ours = exact(x[0], hx[0] if not isinstance(hx, tuple) else (hx[0][0], hx[1][0]))
    for u, v in zip(unbatched if isinstance(unbatched, tuple) else (unbatched,), ours if isinstance(ours, tuple)
                    else (ours,)):
        torch.testing.assert_close(v, u)


def test_fa_error_below_the_top_differs_from_backprop():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("rnn", nn.LSTM(3, 4, num_layers=2))
    original = model.double()
    converted = fbalign.convert(original, "fa", seed=0)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for module in (original, converted):
        out, _ = module(x)
        out[-1].sum().backward()
    top = "rnn.hh_l1.weight"
    # The top layer's input-to-hidden weights see the exact error at the last step only through the recurrence.
    assert not torch.allclose(converted.get_parameter(top).grad, original.rnn.weight_hh_l1.grad)
    assert not torch.allclose(converted.get_parameter("rnn.ih_l0.weight").grad, original.rnn.weight_ih_l0.grad)


class Tagger(nn.Module):
    """One prediction per time step: an LSTM then a Linear head (the dfa error source)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def test_dfa_sends_each_steps_output_error_to_that_steps_hidden_state():
    torch.manual_seed(0)
    model = fbalign.convert(Tagger(), "dfa", seed=0).double()
    rnn = model.rnn
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    target = torch.randn(2, 4, 2, dtype=torch.float64)
    out = model(x)
    ((out - target).square().sum() / 2).backward()
    # By hand: e_t = y_t - target_t. h_t = tanh(a_t); the error at h_t comes only from dfa: B_hh e_t through the
    # next step's hh (t < T-1) plus B_head e_t through the head's input (the head sends its dfa signal down).
    with torch.no_grad():
        e = out - target
        hs = rnn(x)[0]
        b_hh = rnn.hh_l0.direct_feedback        # (n_err, hidden)
        b_head = model.head.direct_feedback     # (n_err, hidden)
        delta_h = e @ b_head
        delta_h[:, :-1] += e[:, :-1] @ b_hh
        delta_a = delta_h * (1 - hs.square())
        previous = torch.cat([torch.zeros_like(hs[:, :1]), hs[:, :-1]], dim=1)
        expected_hh = torch.einsum("nth,nti->hi", delta_a, previous)
        expected_ih = torch.einsum("nth,nti->hi", delta_a, x)
    torch.testing.assert_close(rnn.hh_l0.weight.grad, expected_hh)
    torch.testing.assert_close(rnn.ih_l0.weight.grad, expected_ih)


def test_standalone_constructor_names_and_state_dict():
    lstm = LSTM(3, 4, num_layers=2, rule="fa", seed=0)
    assert isinstance(lstm.ih_l1, fbalign.nn.Linear) and lstm.weight_hh_l1 is lstm.hh_l1.weight
    assert "ih_l0.feedback" in lstm.state_dict()
    out, (h, c) = lstm(torch.randn(5, 2, 3))
    assert out.shape == (5, 2, 4) and h.shape == c.shape == (2, 2, 4)
    assert isinstance(lstm, nn.Module) and issubclass(lstm.replaces, nn.LSTM)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_unbatched_sequences_match_torch(kind):
    torch.manual_seed(0)
    original = kind(3, 4, num_layers=2, bidirectional=True).double()
    converted = fbalign.convert(nn.Sequential(original), "backprop")[0]
    x = torch.randn(6, 3, dtype=torch.float64)
    a, b = original(x), converted(x)
    torch.testing.assert_close(b[0], a[0])
    for s, t in zip(b[1] if kind is nn.LSTM else (b[1],), a[1] if kind is nn.LSTM else (a[1],)):
        torch.testing.assert_close(s, t)
