"""fbalign.rules: the registry, each rule's feedback matrix, and how it changes (or does not) with training."""

from __future__ import annotations

import math

import pytest
import torch

import fbalign
from fbalign import rules
from fbalign.nn import Conv2d, Linear


def test_registry_lists_every_core_rule():
    assert {"backprop", "fa", "usf", "frsf", "brsf", "pbp", "shallow"} <= set(rules.available())
    assert rules.get("bp") == rules.Backprop()
    assert rules.get("FA", seed=3) == rules.FA(seed=3)


def test_unknown_rule_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown rule 'nope'; valid rules are: .*backprop.*fa.*usf"):
        rules.get("nope")
    with pytest.raises(ValueError, match="unknown rule"):
        Linear(3, 2, rule="nope")


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"rule 'fa' has no option 'colour'; its options are: init, scale, "):
        rules.get("fa", colour="red")
    with pytest.raises(ValueError, match="rule 'shallow' has no option 'seed'; its options are: none"):
        Linear(3, 2, rule="shallow", seed=1)
    with pytest.raises(ValueError, match="rule 'backprop' has no option 'seed'; its options are: "
                                         "feedback_nonlinearity, feedback_saturation"):
        Linear(3, 2, rule="backprop", seed=1)


@pytest.mark.parametrize("rule,options,match", [
    ("fa", {"init": "cauchy"}, "init='cauchy' is not valid; choose one of 'uniform', 'gaussian'"),
    ("fa", {"scale": -1.0}, r"scale=-1.0 must lie in \(0.0, inf\]"),
    ("fa", {"sparsity": 1.0}, "use rule='shallow'"),
    ("usf", {"concordance": 1.5}, r"concordance=1.5 must lie in \[0.0, 1.0\]"),
])
def test_bad_option_values_are_rejected(rule, options, match):
    with pytest.raises(ValueError, match=match):
        rules.get(rule, **options)


def test_fa_default_has_the_variance_of_torch_default_init():
    layer = Linear(400, 300, rule="fa", seed=0)
    b = layer.feedback
    assert b.shape == layer.weight.shape
    assert abs(b.var().item() * 3 * 400 - 1) < 0.03
    assert b.abs().max() <= 1 / math.sqrt(400)


@pytest.mark.parametrize("init,check", [
    ("uniform", lambda b: b.abs().max() <= 0.5 and b.abs().max() > 0.49),
    ("gaussian", lambda b: abs(b.std().item() - 0.5) < 0.02),
    ("orthogonal", lambda b: torch.allclose(b @ b.T, 0.25 * torch.eye(b.shape[0]), atol=1e-5)),
])
def test_fa_distributions_with_scale(init, check):
    b = Linear(200, 50, rule="fa", init=init, scale=0.5, seed=0).feedback
    assert check(b)


def test_fa_orthogonal_default_scale_and_conv_kernels():
    b = Conv2d(8, 16, 3, rule="fa", init="orthogonal", seed=0).feedback
    flat = b.reshape(16, -1)
    gram = flat @ flat.T
    torch.testing.assert_close(gram, gram[0, 0] * torch.eye(16), atol=1e-5, rtol=0)
    assert abs(flat.var().item() * 3 * 72 - 1) < 0.1


def test_fa_weight_copy_and_sparsity():
    layer = Linear(100, 100, rule="fa", init="weight", sparsity=0.5, seed=1)
    kept = layer.feedback != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.02
    torch.testing.assert_close(layer.feedback[kept], layer.weight.detach()[kept])


def test_same_seed_same_feedback_and_seedless_follows_torch_seed():
    a, b, c = (Linear(30, 20, rule="fa", seed=s).feedback for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = Linear(30, 20, rule="fa").feedback
    torch.manual_seed(5)
    e = Linear(30, 20, rule="fa").feedback
    assert torch.equal(d, e)
    # The seed fixes B whatever the dtype: float64 holds the float32 draw up to rounding.
    f = Linear(30, 20, rule="fa", seed=7, dtype=torch.float64).feedback
    torch.testing.assert_close(f.float(), a)


def test_usf_is_sign_of_weight_with_weight_norm():
    layer = Linear(50, 40, rule="usf")
    v = layer.rule.feedback(layer)
    w = layer.weight.detach()
    assert torch.equal(torch.sign(v), torch.sign(w))
    assert abs(v.norm().item() / w.norm().item() - 1) < 1e-5
    fixed = Linear(50, 40, rule="usf", scale=1.0)
    assert torch.equal(fixed.rule.feedback(fixed), torch.sign(fixed.weight.detach()))


@pytest.mark.parametrize("rule", ["frsf", "brsf"])
def test_random_magnitude_rules_keep_signs_and_norm(rule):
    layer = Linear(200, 300, rule=rule, seed=0)
    v = layer.rule.feedback(layer)
    w = layer.weight.detach()
    assert torch.equal(torch.sign(v), torch.sign(w))
    assert abs(v.norm().item() / w.norm().item() - 1) < 0.02
    assert v.abs().std() / v.abs().mean() > 0.3  # magnitudes vary, unlike usf


@pytest.mark.parametrize("rule", ["usf", "frsf", "brsf"])
def test_sign_concordance(rule):
    full = Linear(200, 200, rule=rule, concordance=1.0, seed=0)
    usf = Linear(200, 200, rule="usf")
    usf.weight = full.weight
    assert torch.equal(torch.sign(full.rule.feedback(full)), torch.sign(usf.rule.feedback(usf)))
    half = Linear(200, 200, rule=rule, concordance=0.5, seed=0)
    agree = (torch.sign(half.rule.feedback(half)) == torch.sign(half.weight.detach())).float().mean().item()
    assert abs(agree - 0.5) < 0.01  # 40,000 Bernoulli(0.5) draws: sd 0.0025
    none = Linear(200, 200, rule=rule, concordance=0.0, seed=0)
    assert torch.equal(torch.sign(none.rule.feedback(none)), -torch.sign(none.weight.detach()))
    # The disagreeing set is drawn once: it does not move as W learns.
    mask = half.concordance_sign.clone()
    _train_steps(torch.nn.Sequential(Linear(10, 200, rule="backprop"), torch.nn.Tanh(), half), steps=3)
    assert torch.equal(mask, half.concordance_sign)


def _train_steps(model, steps, n_in=None):
    n_in = n_in or model[0].in_features
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, n_in)).square().mean().backward()
        opt.step()


def test_brsf_redraws_magnitudes_each_training_step_in_place():
    top = Linear(20, 5, rule="brsf", seed=0)
    model = torch.nn.Sequential(Linear(10, 20, rule="brsf", seed=0), torch.nn.Tanh(), top)
    buffer = top.magnitude
    seen = []
    for _ in range(3):
        _train_steps(model, 1)
        seen.append(top.magnitude.clone())
    assert top.magnitude is buffer  # redrawn in place, no fresh tensor per step
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 10))
    assert torch.equal(top.magnitude, seen[2])  # inference draws nothing


@pytest.mark.parametrize("rule", ["fa", "frsf"])
def test_fixed_rules_never_change(rule):
    model = torch.nn.Sequential(Linear(10, 20, rule=rule, seed=0), torch.nn.Tanh(), Linear(20, 5, rule=rule, seed=1))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("feedback", "magnitude"))}
    weights = model[2].weight.detach().clone()
    _train_steps(model, 5)
    assert not torch.equal(weights, model[2].weight)
    for k, v in before.items():
        assert torch.equal(v, model.state_dict()[k])


def test_pbp_is_transposed_pseudo_inverse_and_refuses_convolutions():
    layer = Linear(6, 4, rule="pbp")
    torch.testing.assert_close(layer.rule.feedback(layer), torch.linalg.pinv(layer.weight.detach()).T)
    with pytest.raises(ValueError, match="pbp is defined for Linear layers only"):
        Conv2d(3, 4, 3, rule="pbp")


def test_shallow_leaves_lower_layers_without_gradient():
    model = fbalign.convert(torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                                torch.nn.ReLU(), torch.nn.Linear(8, 3)), "shallow")
    x = torch.randn(4, 5, requires_grad=True)
    model(x).square().sum().backward()
    for layer in (model[0], model[2]):
        assert layer.weight.grad is None or not layer.weight.grad.any()
    assert x.grad is None
    assert model[4].weight.grad.abs().sum() > 0


def test_rule_repr_shows_changed_options():
    assert str(rules.FA()) == "fa"
    assert str(rules.FA(init="gaussian", seed=2)) == "fa(init='gaussian', seed=2)"
    assert "rule=usf(concordance=0.7" in repr(Linear(3, 2, rule="usf", concordance=0.7, seed=0))


# --- A nonlinear feedback pathway -------------------------------------------------------------------------------

MATRIX_RULES = ["backprop", "fa", "usf", "frsf", "brsf", "pbp"]


def _hand_nonlinear_hidden_grad(model, x, t, down, f):
    """W1's gradient for L = ½‖y − t‖² when the output error goes down through ``down`` and then ``f``."""
    w1, b1, w2, b2 = (p.detach() for p in (model[0].weight, model[0].bias, model[2].weight, model[2].bias))
    h1 = torch.sigmoid(x @ w1.T + b1)
    e = h1 @ w2.T + b2 - t
    return ((f(e @ down) * h1 * (1 - h1)).T @ x)


@pytest.mark.parametrize("rule", MATRIX_RULES)
@pytest.mark.parametrize("nonlinearity,saturation,f", [
    ("tanh", 1.0, torch.tanh),
    ("hardtanh", 0.3, lambda v: 0.3 * v.div(0.3).clamp(-1, 1)),
    ("relu", 1.0, torch.relu),
    ("sign", 0.01, lambda v: 0.01 * torch.sign(v)),
    (torch.sin, 0.5, lambda v: 0.5 * torch.sin(v / 0.5)),
])
def test_nonlinear_feedback_path_is_f_of_feedback_times_error(rule, nonlinearity, saturation, f):
    torch.manual_seed(3)
    options = dict(feedback_nonlinearity=nonlinearity, feedback_saturation=saturation)
    seed = {"seed": 2} if "seed" in rules.get(rule).__dataclass_fields__ else {}
    model = torch.nn.Sequential(Linear(5, 4, rule="backprop", dtype=torch.float64), torch.nn.Sigmoid(),
                                Linear(4, 3, rule=rule, dtype=torch.float64, **options, **seed))
    x = torch.randn(6, 5, dtype=torch.float64)
    t = 3 * torch.randn(6, 3, dtype=torch.float64)  # errors of order 1, so the nonlinearity bends them
    (0.5 * (model(x) - t).square().sum()).backward()
    top = model[2]
    down = top.rule.feedback(top)
    expected = _hand_nonlinear_hidden_grad(model, x, t, down, f)
    torch.testing.assert_close(model[0].weight.grad, expected, rtol=1e-10, atol=1e-12)
    linear = _hand_nonlinear_hidden_grad(model, x, t, down, lambda v: v)
    assert not torch.allclose(model[0].weight.grad, linear, rtol=1e-3)  # the nonlinearity did act


def test_nonlinear_feedback_in_convolutions():
    torch.manual_seed(0)
    conv = Conv2d(2, 3, 3, padding=1, rule="fa", feedback_nonlinearity="softsign", feedback_saturation=0.1,
                  dtype=torch.float64)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    conv(x).backward(g)
    linear_path = torch.nn.grad.conv2d_input(x.shape, conv.feedback, g, padding=1)
    torch.testing.assert_close(x.grad, 0.1 * torch.nn.functional.softsign(linear_path / 0.1))


def test_nonlinearity_names_callables_repr_and_toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    options = tomllib.loads('feedback_nonlinearity = "tanh"\nfeedback_saturation = 0.01\nseed = 1')
    rule = rules.get("fa", **options)
    assert str(rule) == "fa(seed=1, feedback_nonlinearity='tanh', feedback_saturation=0.01)"
    assert str(rules.get("usf", feedback_nonlinearity=torch.tanh)) == "usf(feedback_nonlinearity=tanh)"
    assert rules.get("fa", feedback_nonlinearity="identity")._nonlinearity is None
    with pytest.raises(ValueError, match="feedback_nonlinearity='swish' is not a known name; use a callable or one "
                                         "of: hardtanh, relu, sign, softsign, tanh, identity"):
        rules.get("fa", feedback_nonlinearity="swish")
    with pytest.raises(TypeError, match="feedback_nonlinearity must be a name, a callable or None, not int"):
        rules.get("fa", feedback_nonlinearity=3)
    with pytest.raises(ValueError, match=r"feedback_saturation=0.0 must lie in \(0.0, inf\]"):
        rules.get("fa", feedback_saturation=0.0)
    with pytest.raises(ValueError, match="rule 'shallow' has no option 'feedback_nonlinearity'"):
        rules.get("shallow", feedback_nonlinearity="tanh")


def test_backprop_without_nonlinearity_stays_plain_autograd():
    layer = Linear(4, 3, rule="backprop")
    out = layer(torch.randn(2, 4, requires_grad=True))
    assert type(out.grad_fn).__name__ == "AddmmBackward0"
    bent = Linear(4, 3, rule="backprop", feedback_nonlinearity="tanh")
    assert "Feedback" in type(bent(torch.randn(2, 4, requires_grad=True)).grad_fn).__name__


def test_a_new_rule_is_one_file_in_the_rules_package(tmp_path, monkeypatch):
    """What docs/architecture.md promises: drop a module into fbalign/rules/ and convert, the config and the metrics
    know the rule, with no other file edited."""
    import sys

    import torch
    from torch import nn

    (tmp_path / "negative_fa.py").write_text(
        "from dataclasses import dataclass\n"
        "from typing import ClassVar\n"
        "from fbalign.rules import MatrixRule, register\n\n"
        "@register\n"
        "@dataclass(frozen=True)\n"
        "class NegativeFA(MatrixRule):\n"
        "    name: ClassVar[str] = 'negative_fa'\n\n"
        "    def feedback(self, layer):\n"
        "        return -layer.weight.detach()\n")
    monkeypatch.setattr(rules, "__path__", [*rules.__path__, str(tmp_path)])
    monkeypatch.setattr(rules, "_RULES", dict(rules._RULES))
    monkeypatch.delitem(sys.modules, "fbalign.rules.negative_fa", raising=False)
    try:
        rules._import_rule_modules()
        assert "negative_fa" in rules.available()
        model = fbalign.convert(nn.Sequential(nn.Linear(3, 2, dtype=torch.float64)), "negative_fa")
        x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        model(x).sum().backward()
        torch.testing.assert_close(x.grad, -torch.ones(4, 2, dtype=torch.float64) @ model[0].weight.detach())
        from fbalign.config import load_config
        assert load_config({"rule": "negative_fa"}).rule.name == "negative_fa"
        values = fbalign.metrics.measure_alignment(nn.Sequential(nn.Tanh(), model), lambda y, t: y.sum(), x, None)
        assert abs(values["angle_b_wt/1.0"] - 180.0) < 1e-6
    finally:
        sys.modules.pop("fbalign.rules.negative_fa", None)
