"""fbalign.dfa: hand-computed B_l·e∘f′ on tiny nets (linear, convolutional, sequence), the same as fa with one
hidden layer, exact backprop inside exact_backprop, state, and the clear errors of a wrong set-up."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbalign
from fbalign.nn import Linear

DOUBLE = dict(dtype=torch.float64)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)).double()


@pytest.mark.parametrize("nonlinearity,f", [(None, lambda v: v), ("tanh", torch.tanh)])
def test_hidden_gradients_are_hand_computed_direct_feedback_times_error(nonlinearity, f):
    model = fbalign.convert(_mlp(), "dfa", seed=0, feedback_nonlinearity=nonlinearity)
    x = torch.randn(6, 5, **DOUBLE, requires_grad=True)
    t = 2 * torch.randn(6, 2, **DOUBLE)
    (0.5 * (model(x) - t).square().sum()).backward()

    w0, b0, w2, b2, w4, b4 = (p.detach() for p in model.parameters())
    a0 = x.detach() @ w0.T + b0
    h0 = torch.sigmoid(a0)
    a2 = h0 @ w2.T + b2
    h2 = torch.sigmoid(a2)
    e = h2 @ w4.T + b4 - t                                            # the output error
    B4, B2, B0 = model[4].direct_feedback, model[2].direct_feedback, model[0].direct_feedback
    assert B4.shape == (2, 3) and B2.shape == (2, 4) and B0.shape == (2, 5)
    delta2 = f(e @ B4) * h2 * (1 - h2)                               # (B·e)∘σ′ at the last hidden layer
    delta0 = f(e @ B2) * h0 * (1 - h0)                               # ...and at the first: e, not delta2
    for grad, expected in [(model[4].weight.grad, e.T @ h2), (model[4].bias.grad, e.sum(0)),
                           (model[2].weight.grad, delta2.T @ h0), (model[2].bias.grad, delta2.sum(0)),
                           (model[0].weight.grad, delta0.T @ x.detach()), (model[0].bias.grad, delta0.sum(0)),
                           (x.grad, f(e @ B0))]:
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)

    backprop = fbalign.convert(_mlp(), "backprop")
    (0.5 * (backprop(x.detach()) - t).square().sum()).backward()
    assert not torch.allclose(model[0].weight.grad, backprop[0].weight.grad, rtol=1e-2)


@pytest.mark.parametrize("resolution", [1, 2])
def test_convolution_receives_per_channel_or_low_resolution_error(resolution):
    torch.manual_seed(1)
    base = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 2)).double()
    model = fbalign.convert(base, "dfa", seed=0, resolution=resolution)
    x = torch.randn(3, 2, 6, 6, **DOUBLE)
    y = model(x)
    g = torch.randn_like(y)  # the output error e = ∂L/∂y for L = <g, y>
    (g * y).sum().backward()

    conv1, conv2, fc = model[0], model[2], model[5]
    assert conv2.direct_feedback.shape == (2, 3, resolution, resolution)
    a1 = F.conv2d(x, conv1.weight.detach(), conv1.bias.detach(), padding=1)
    low = (g @ conv2.direct_feedback.reshape(2, -1)).reshape(3, 3, resolution, resolution)
    cell = 36 / resolution ** 2                                   # positions per cell of the r × r map
    arriving = F.interpolate(low, size=(6, 6), mode="nearest") / cell  # as through an average pool to r × r
    delta1 = arriving * (a1 > 0)
    torch.testing.assert_close(conv1.weight.grad, torch.nn.grad.conv2d_weight(x, conv1.weight.shape, delta1, padding=1),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(conv1.bias.grad, delta1.sum((0, 2, 3)), rtol=1e-10, atol=1e-12)
    h2 = torch.tanh(F.conv2d(torch.relu(a1), conv2.weight.detach(), conv2.bias.detach(), stride=2))
    delta2 = (g @ fc.direct_feedback).reshape(h2.shape) * (1 - h2 ** 2)
    torch.testing.assert_close(conv2.weight.grad,
                               torch.nn.grad.conv2d_weight(torch.relu(a1), conv2.weight.shape, delta2, stride=2),
                               rtol=1e-10, atol=1e-12)


def test_error_of_a_pooled_sequence_is_broadcast_over_positions():
    torch.manual_seed(2)

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mix, self.out = nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):                                    # x: (N, T, 4)
            h = torch.tanh(self.mix(torch.tanh(self.embed(x))))
            return self.out(h.mean(1))

    model = fbalign.convert(Pooled().double(), "dfa", seed=0)
    x = torch.randn(2, 7, 4, **DOUBLE)
    y = model(x)
    g = torch.randn_like(y)
    (g * y).sum().backward()
    h0 = torch.tanh(model.embed(x)).detach()
    delta0 = (g @ model.mix.direct_feedback)[:, None, :] * (1 - h0 ** 2)   # (N, 1, 5) broadcast over T
    torch.testing.assert_close(model.embed.weight.grad, torch.einsum("nto,nti->oi", delta0, x),
                               rtol=1e-10, atol=1e-12)


def test_one_hidden_layer_dfa_is_fa_with_the_same_seed():
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    grads = {}
    for rule in ("dfa", "fa"):
        model = fbalign.convert(base, rule, seed=4)
        F.cross_entropy(model(x), y).backward()
        grads[rule] = [p.grad for p in model.parameters()]
    for a, b in zip(grads["dfa"], grads["fa"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_exact_backprop_context_is_plain_backprop():
    base = _mlp()
    model = fbalign.convert(base, "dfa", seed=0)
    reference = fbalign.convert(base, "backprop")
    x, t = torch.randn(4, 5, **DOUBLE), torch.randn(4, 2, **DOUBLE)
    with fbalign.exact_backprop(model):
        (model(x) - t).square().sum().backward()
    (reference(x) - t).square().sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_two_forwards_before_one_backward_keep_their_own_errors():
    model = fbalign.convert(_mlp(), "dfa", seed=0)
    x1, x2 = torch.randn(3, 5, **DOUBLE), torch.randn(4, 5, **DOUBLE)
    t1, t2 = torch.randn(3, 2, **DOUBLE), torch.randn(4, 2, **DOUBLE)
    ((model(x1) - t1).square().sum() + (model(x2) - t2).square().sum()).backward()
    together = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (model(x1) - t1).square().sum().backward()
    (model(x2) - t2).square().sum().backward()
    for a, p in zip(together, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=1e-12)


def test_state_dict_deepcopy_and_reconversion():
    model = fbalign.convert(_mlp(), "dfa", seed=0)
    other = fbalign.convert(_mlp(), "dfa", seed=1)
    assert not torch.equal(model[2].direct_feedback, other[2].direct_feedback)
    other.load_state_dict(model.state_dict())
    direct = {k for k in model.state_dict() if k.endswith("direct_feedback")}
    assert direct == {f"{i}.direct_feedback" for i in (0, 2, 4)}
    assert not any(k in dict(model.named_parameters()) for k in model.state_dict() if "direct" in k)
    twin = copy.deepcopy(model)
    x, t = torch.randn(4, 5, **DOUBLE), torch.randn(4, 2, **DOUBLE)
    for m in (model, other, twin):
        (m(x) - t).square().sum().backward()
    for p, q, r in zip(model.parameters(), other.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=0)
    assert twin[4].rule_state["dfa_wiring"] is not model[4].rule_state["dfa_wiring"]
    assert twin[4].rule_state["dfa_wiring"].source is twin[4]

    fa = fbalign.convert(model, "fa", seed=0)
    assert not fa._forward_pre_hooks and not fa._forward_hooks
    assert "dfa" not in fbalign.summary(fa)
    fa(x).sum().backward()


def test_summary_names_the_error_source_and_output_chooses_it():
    base = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert "output of '4' (2 units)" in fbalign.summary(fbalign.convert(base, "dfa"))
    chosen = fbalign.convert(base, "dfa", output="2")
    assert "output of '2' (3 units)" in fbalign.summary(chosen)
    assert chosen[0].direct_feedback.shape == (3, 5)


@pytest.mark.parametrize("resolution", [1, 2])
def test_bn_pool_conv_net_lower_layers_learn_from_the_direct_error(resolution):
    torch.manual_seed(0)
    x = torch.randn(128, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()   # top half brighter than bottom half?
    base = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 2))

    def final_loss(rule, **options):
        model = fbalign.convert(base, rule, seed=0, **options)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(40):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        return loss.item()

    # Only the output layer learns under "shallow"; dfa's convolutions must add to it (measured: 0.60 vs
    # 0.34 with r = 1, 0.24 with r = 2; backprop 0.13).
    assert final_loss("dfa", resolution=resolution) < 0.6 * final_loss("shallow")


def test_loss_that_bypasses_the_output_is_an_error():
    model = fbalign.convert(_mlp(), "dfa", seed=0)
    hidden = {}
    model[3].register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
    model(torch.randn(2, 5, **DOUBLE))
    with pytest.raises(RuntimeError, match=r"layer '2' got its error before the output error existed: the loss "
                                           r"does not depend on the output of the error source '4'"):
        hidden["h"].sum().backward()


def test_calling_part_of_the_model_is_an_error_but_inference_is_fine():
    model = fbalign.convert(_mlp(), "dfa", seed=0)
    x = torch.randn(2, 5, **DOUBLE)
    with pytest.raises(RuntimeError, match="layer '2' ran outside a forward of the model it is wired to"):
        model[:3](x)
    with torch.no_grad():
        model[:3](x)                                   # no gradient, no error needed
    part = fbalign.convert(model[:3], "dfa", inplace=True)  # ...or wire the part itself
    part(x).sum().backward()


def test_source_must_run_last_and_be_linear():
    class HeadFirst(nn.Module):  # registers its head before its body
        def __init__(self):
            super().__init__()
            self.head, self.body = nn.Linear(6, 3), nn.Linear(4, 6)

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    x = torch.randn(2, 4, requires_grad=True)
    wrong = fbalign.convert(HeadFirst(), "dfa")
    with pytest.raises(RuntimeError, match="layer 'head' ran after the error source 'body'"):
        wrong(x)
    right = fbalign.convert(HeadFirst(), "dfa", output="head")
    right(x).sum().backward()
    assert right.body.weight.grad is not None
    with pytest.raises(ValueError, match="output='tail' is not a dfa layer of the model; its dfa layers are: head, "
                                         "body"):
        fbalign.convert(HeadFirst(), "dfa", output="tail")
    with pytest.raises(ValueError, match="the error source '0' is a Conv2d; the output error must come from a "
                                         "Linear layer"):
        fbalign.convert(nn.Sequential(nn.Conv2d(1, 2, 3)), "dfa")


def test_unwired_layer_explains_how_to_wire_it():
    model = nn.Sequential(Linear(3, 4, rule="dfa"), nn.Tanh(), Linear(4, 2, rule="dfa"))
    with pytest.raises(RuntimeError, match=r"not wired to an output error.*fbalign.convert\(model, 'dfa', "
                                           r"inplace=True\)"):
        model(torch.randn(2, 3))
    fbalign.dfa.wire(model)
    model(torch.randn(2, 3)).sum().backward()
    assert model[0].weight.grad is not None


def test_bf16_autocast():
    model = fbalign.convert(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(4 * 6 * 6, 10), nn.ReLU(), nn.Linear(10, 3)), "dfa", seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(5, 1, 6, 6))
    F.cross_entropy(out.float(), torch.tensor([0, 1, 2, 0, 1])).backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_torch_compile_gives_eager_gradients():
    model = fbalign.convert(_mlp(), "dfa", seed=0)
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    x = torch.randn(4, 5, **DOUBLE)
    for m in (model, compiled):
        m(x).square().sum().backward()
    for p, q in zip(model.parameters(), compiled.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options,match", [
    ({"resolution": 0}, r"resolution=0 must lie in \[1, inf\]"),
    ({"init": "weight"}, "init='weight' is not valid"),
    ({"output": 3}, "output must be a layer name"),
])
def test_bad_options(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fbalign.rules.get("dfa", **options)


@pytest.mark.slow
def test_dfa_mlp_learns_fashion_mnist(fashion_mnist_dir):
    from fbalign.data import load_mnist_format
    from fbalign.models import MLP
    from fbalign.train import train

    data = load_mnist_format(fashion_mnist_dir, "fashion-mnist")
    data.train_x, data.train_y = data.train_x[:6000], data.train_y[:6000]
    torch.manual_seed(0)
    base = MLP((1, 28, 28), 10, hidden=[256, 256])

    def test_error(model: nn.Module) -> float:
        return train(model=model, data=data, rule="torch", epochs=1, batch_size=64, seed=0, log={"progress": False},
                     optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9}).final["test_error"]

    errors = {rule: test_error(fbalign.convert(base, rule, seed=0)) for rule in ("dfa", "shallow")}
    # One epoch on 6,000 images; measured: dfa 39.4%, shallow (only the output layer learns) 53.9%, backprop 36.6%.
    assert errors["dfa"] < 45 and errors["dfa"] < errors["shallow"] - 8, errors


def test_wiring_of_names_the_wiring_a_layer_belongs_to():
    model = fbalign.convert(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), "dfa", seed=0)
    wiring = fbalign.dfa.wiring_of(model[0])
    assert isinstance(wiring, fbalign.dfa.DirectFeedback) and wiring is fbalign.dfa.wiring_of(model[2])
    assert wiring.source is model[2]
    assert fbalign.dfa.wiring_of(fbalign.nn.Linear(3, 4, rule="dfa")) is None
    assert fbalign.dfa.wiring_of(model) is None and fbalign.dfa.wiring_of(nn.Linear(3, 4)) is None
