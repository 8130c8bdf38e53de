"""fbalign.nn layers: with the feedback matrix made equal to W every rule is autograd; hand-computed B·e;
buffers, dtypes, devices, autocast and torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbalign
from fbalign import rules
from fbalign.nn import Conv1d, Conv2d, Conv3d, Linear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ALL_RULES = rules.available()  # every registered rule: a new one must pass these tests too
# dfa's convolution matrices are (n_err, C_in, r, r), not kernels (its conv gradients: tests/test_dfa.py); pbp is
# defined for Linear layers only.
CONV_RULES = [r for r in ALL_RULES if r not in ("dfa", "pbp")]


def seeded(rule: str, seed: int = 0) -> dict:
    """``{'seed': seed}`` for the rules that draw random state, else nothing."""
    return {"seed": seed} if "seed" in rules.get(rule).__dataclass_fields__ else {}


def make_feedback_equal_weight(layer: fbalign.nn.FeedbackLayer, monkeypatch) -> None:
    """Put each rule in the state where its feedback matrix is exactly W."""
    w = layer.weight
    with torch.no_grad():
        name = layer.rule.name
        if "feedback" in layer.rule_buffers():  # a stored matrix of the weight's shape: fa, kp, wm
            layer.feedback.copy_(w)
        elif name in ("usf", "frsf", "brsf"):
            w.copy_(torch.sign(torch.randn_like(w)) * 0.2)  # V = sign(W)·rms(W) = W when |W| is constant
            if name == "frsf":
                layer.magnitude.fill_(rules.FRSF._magnitude_rms)
            if name == "brsf":  # constant "random" bytes, and the normaliser that makes them 1
                monkeypatch.setattr(rules.BRSF, "_redraw", staticmethod(lambda m: m.fill_(128)))
                monkeypatch.setattr(rules.BRSF, "_magnitude_rms", 128 / 256)
        elif name == "pbp":
            nn.init.orthogonal_(w)  # pinv(W)ᵀ = W for orthogonal W
        elif name == "dfa":  # the layer is its own error source: e · B with B = W is W's transpose at work
            layer.direct_feedback.copy_(w)
        elif name not in ("backprop", "shallow"):
            pytest.fail(f"make_feedback_equal_weight does not know how to make {name}'s feedback equal W: teach it")


def check_layer_against_torch(ours, reference, x, monkeypatch):
    model = nn.Sequential(ours)
    ours.rule.setup_model(model)  # what convert() does once every layer has the rule (dfa wires the model)
    make_feedback_equal_weight(ours, monkeypatch)
    reference.load_state_dict({k: v for k, v in ours.state_dict().items() if k in ("weight", "bias")})
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    out1, out2 = model(x1), reference(x2)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    g = torch.randn_like(out1)
    out1.backward(g)
    out2.backward(g)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-10, atol=1e-10)
    if reference.bias is not None:
        torch.testing.assert_close(ours.bias.grad, reference.bias.grad, rtol=1e-10, atol=1e-10)
    if ours.rule.name == "shallow":
        assert x1.grad is None
    else:
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("shape", [(7, 6), (3, 5, 6), (2, 2, 3, 6)])
def test_linear_with_feedback_equal_to_weight_is_autograd(rule, shape, monkeypatch):
    ours = Linear(6, 6, rule=rule, dtype=torch.float64, **seeded(rule))
    check_layer_against_torch(ours, nn.Linear(6, 6, dtype=torch.float64), torch.randn(shape, dtype=torch.float64),
                              monkeypatch)


CONVS = [
    (Conv1d, nn.Conv1d, dict(kernel_size=3), (2, 4, 11)),
    (Conv1d, nn.Conv1d, dict(kernel_size=4, stride=2, padding=3, dilation=2, groups=2, bias=False), (2, 4, 13)),
    (Conv1d, nn.Conv1d, dict(kernel_size=4, padding="same", padding_mode="circular"), (2, 4, 9)),
    (Conv2d, nn.Conv2d, dict(kernel_size=3, padding=1), (2, 4, 8, 8)),
    (Conv2d, nn.Conv2d, dict(kernel_size=(2, 3), padding="same", dilation=(2, 1)), (2, 4, 7, 6)),  # asymmetric
    (Conv2d, nn.Conv2d, dict(kernel_size=3, stride=(2, 1), padding=(1, 2), groups=4, bias=False), (2, 4, 9, 7)),
    (Conv2d, nn.Conv2d, dict(kernel_size=3, padding=1, padding_mode="reflect"), (2, 4, 6, 6)),
    (Conv2d, nn.Conv2d, dict(kernel_size=3, padding="valid"), (4, 6, 6)),  # unbatched
    (Conv3d, nn.Conv3d, dict(kernel_size=3, stride=2, padding=1), (2, 4, 6, 6, 6)),
    (Conv3d, nn.Conv3d, dict(kernel_size=(1, 2, 3), padding="same", groups=2, padding_mode="replicate"),
     (1, 4, 5, 5, 5)),
]


@pytest.mark.parametrize("rule", CONV_RULES)
@pytest.mark.parametrize("ours_cls,torch_cls,kwargs,shape", CONVS)
def test_conv_with_feedback_equal_to_weight_is_autograd(rule, ours_cls, torch_cls, kwargs, shape, monkeypatch):
    ours = ours_cls(4, 4, **kwargs, rule=rule, dtype=torch.float64, **seeded(rule))
    check_layer_against_torch(ours, torch_cls(4, 4, **kwargs, dtype=torch.float64),
                              torch.randn(shape, dtype=torch.float64), monkeypatch)


def _two_layer(rule):
    torch.manual_seed(3)
    model = nn.Sequential(Linear(5, 4, rule=rule, dtype=torch.float64, **seeded(rule, 1)), nn.Sigmoid(),
                          Linear(4, 3, rule=rule, dtype=torch.float64, **seeded(rule, 2)))
    x = torch.randn(6, 5, dtype=torch.float64)
    t = torch.randn(6, 3, dtype=torch.float64)
    return model, x, t


def _hand_hidden_grad(model, x, t, down):
    """W1's gradient for L = ½‖y − t‖² when the output error e = y − t goes down through ``down``."""
    w1, b1, w2, b2 = (p.detach() for p in (model[0].weight, model[0].bias, model[2].weight, model[2].bias))
    a1 = x @ w1.T + b1
    h1 = torch.sigmoid(a1)
    e = h1 @ w2.T + b2 - t
    delta1 = (e @ down) * h1 * (1 - h1)          # rows: (B·e)ᵀ ∘ σ′(a1), with B = down.T
    return delta1.T @ x, delta1.sum(0), e.T @ h1


@pytest.mark.parametrize("rule", ["fa", "pbp", "backprop"])
def test_two_layer_hidden_gradient_is_hand_computed_feedback_times_error(rule):
    model, x, t = _two_layer(rule)
    (0.5 * (model(x) - t).square().sum()).backward()
    top = model[2]
    if rule == "fa":
        down = top.feedback
    elif rule == "pbp":
        down = torch.linalg.pinv(top.weight.detach()).T   # Δh = W⁺e
    else:
        down = top.weight.detach()
    gw1, gb1, gw2 = _hand_hidden_grad(model, x, t, down)
    torch.testing.assert_close(model[0].weight.grad, gw1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model[0].bias.grad, gb1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(top.weight.grad, gw2, rtol=1e-10, atol=1e-12)  # top layer: plain delta rule


def test_fa_hidden_update_differs_from_backprop():
    model, x, t = _two_layer("fa")
    (0.5 * (model(x) - t).square().sum()).backward()
    gw1_bp, _, _ = _hand_hidden_grad(model, x, t, model[2].weight.detach())
    assert not torch.allclose(model[0].weight.grad, gw1_bp)


def set_up(layer: fbalign.nn.FeedbackLayer) -> fbalign.nn.FeedbackLayer:
    """``layer`` as ``convert`` leaves it: its rule's model-wide set-up done on a model of its own (dfa's wiring)."""
    layer.rule.setup_model(nn.Sequential(layer))
    return layer


@pytest.mark.parametrize("rule", ALL_RULES)
def test_buffers_are_state_not_parameters(rule):
    options = {"concordance": 0.5} if rule in ("usf", "frsf", "brsf") else {}
    layer = set_up(Linear(6, 5, rule=rule, **options, **seeded(rule)))
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"weight", "bias"}
    state = layer.state_dict()
    buffers = layer.rule_buffers()
    assert set(buffers) <= set(state)
    fresh = set_up(Linear(6, 5, rule=layer.rule))  # another draw...
    fresh.load_state_dict(state)  # ...replaced by the saved one
    for name, buffer in buffers.items():
        assert torch.equal(getattr(fresh, name), buffer)
    double = copy.deepcopy(layer).to(torch.float64)
    for name, buffer in buffers.items():  # floating state follows the dtype; brsf's bytes stay bytes
        expected = torch.float64 if buffer.is_floating_point() else buffer.dtype
        assert getattr(double, name).dtype == expected


def test_save_load_round_trip_through_a_file(tmp_path):
    model = fbalign.convert(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Conv1d(1, 2, 3)), "fa", seed=0)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    other = fbalign.convert(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Conv1d(1, 2, 3)), "fa", seed=1)
    assert not torch.equal(other[0].feedback, model[0].feedback)
    other.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert torch.equal(other[0].feedback, model[0].feedback)
    assert torch.equal(other[2].feedback, model[2].feedback)


def test_set_rule_replaces_buffers():
    layer = Linear(4, 3, rule="frsf", concordance=0.5, seed=0)
    assert {"magnitude", "concordance_sign"} <= set(layer.state_dict())
    layer.set_rule("fa", seed=0)
    assert set(layer.state_dict()) == {"weight", "bias", "feedback"}
    assert not hasattr(layer, "magnitude")


def test_extra_repr_and_construction_matches_torch():
    layer = Conv2d(3, 8, 5, stride=2, padding="valid", rule="fa", init="gaussian", seed=4)
    assert repr(layer) == ("Conv2d(3, 8, kernel_size=(5, 5), stride=(2, 2), padding=valid, "
                           "rule=fa(init='gaussian', seed=4))")
    assert isinstance(layer, nn.Conv2d) and isinstance(Linear(2, 2), nn.Linear)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["fa", "usf", "brsf"])
def test_autocast_trains(rule, dtype):
    model = fbalign.convert(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(4 * 6 * 6, 10), nn.ReLU(), nn.Linear(10, 3)), rule, seed=0)
    x = torch.randn(5, 1, 6, 6)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    F.cross_entropy(out.float(), torch.tensor([0, 1, 2, 0, 1])).backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def _compiled_matches_eager(backend):
    base = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    model = fbalign.convert(base, "fa", seed=0)
    compiled = torch.compile(copy.deepcopy(model), backend=backend, fullgraph=True)
    x = torch.randn(3, 2, 5, 5)
    for m in (model, compiled):
        m(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    backprop = fbalign.convert(base, "backprop")  # the compiled graph really sends the error through B
    backprop(x).square().sum().backward()
    assert not torch.allclose(backprop[0].weight.grad, next(compiled.parameters()).grad, rtol=1e-3, atol=1e-4)


def test_torch_compile_aot_eager():
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor():
    _compiled_matches_eager("inductor")


@cuda
@pytest.mark.parametrize("rule", ALL_RULES)
def test_cuda_matches_cpu(rule):
    torch.manual_seed(0)
    cpu = nn.Sequential(Linear(6, 5, rule=rule, **seeded(rule)),
                        nn.Tanh(), Linear(5, 3, rule="backprop"))
    rules.get(rule).setup_model(cpu)
    gpu = copy.deepcopy(cpu).cuda()
    assert all(b.is_cuda for b in gpu.buffers())
    x = torch.randn(4, 6, requires_grad=True)
    xg = x.detach().cuda().requires_grad_()
    if rule == "brsf":
        pytest.skip("brsf draws from each device's own generator")
    cpu(x).square().sum().backward()
    gpu(xg).square().sum().backward()
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(p.grad, q.grad.cpu(), rtol=1e-4, atol=1e-5)


def test_exact_backprop_context_gives_backprop_gradients_and_restores_the_rule():
    model, x, t = _two_layer("brsf")
    reference = fbalign.convert(model, "backprop")
    magnitude = model[2].magnitude.clone()
    with fbalign.exact_backprop(model):
        (0.5 * (model(x) - t).square().sum()).backward()
    (0.5 * (reference(x) - t).square().sum()).backward()
    torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad, rtol=0, atol=0)
    assert torch.equal(model[2].magnitude, magnitude)  # no redraw while exact
    assert [name for name, _ in fbalign.feedback_layers(model)] == ["0", "2"]
    model.zero_grad()
    (0.5 * (model(x) - t).square().sum()).backward()
    assert not torch.allclose(model[0].weight.grad, reference[0].weight.grad)


# --- the layer API rules call ------------------------------------------------------------------------------------

def test_add_rule_buffer_adds_replaces_and_goes_with_the_rule():
    layer = Linear(3, 2, rule="backprop")
    layer.add_rule_buffer("extra", torch.zeros(2))
    layer.add_rule_buffer("extra", torch.ones(2, 3), persistent=False)  # replaced, now not in state_dict
    assert layer.rule_buffers().keys() == {"extra"} and layer.extra.shape == (2, 3)
    assert "extra" not in layer.state_dict()
    layer.set_rule("fa", seed=0)
    assert not hasattr(layer, "extra") and list(layer.rule_buffers()) == ["feedback"]
    layer.register_buffer("mine", torch.zeros(1))
    with pytest.raises(ValueError, match="not the rule's"):
        layer.add_rule_buffer("mine", torch.ones(1))


def test_rule_state_is_declared_and_emptied_with_the_rule():
    layer = Linear(3, 2, rule="fa", seed=0)
    assert layer.rule_state == {}
    layer.rule_state["note"] = object()
    assert copy.deepcopy(layer).rule_state.keys() == {"note"}
    layer.set_rule("usf")
    assert layer.rule_state == {}


def test_deprecated_layer_names_still_work():
    layer = Linear(3, 2, rule="fa", seed=0, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with pytest.warns(DeprecationWarning, match="add_rule_buffer"):
        layer.register_feedback_buffer("extra", torch.zeros(1))
    with pytest.warns(DeprecationWarning, match="forward_exact"):
        torch.testing.assert_close(layer._forward_exact(x), layer.forward_exact(x))
    with pytest.warns(DeprecationWarning, match="forward_feedback"):
        layer._forward_feedback(x, layer.feedback).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 2, dtype=torch.float64) @ layer.feedback)
    x.grad = None
    with pytest.warns(DeprecationWarning):  # a callable went to forward_send_down
        layer._forward_feedback(x, lambda grad_output, input: torch.full_like(input, 7.0)).sum().backward()
    assert torch.all(x.grad == 7.0)


def test_a_layer_written_for_the_old_method_names_keeps_working():
    with pytest.warns(DeprecationWarning, match="deprecated"):
        class OldScaled(fbalign.nn.FeedbackLayer, nn.Linear):  # doubles its output, as a user's layer might
            def __init__(self, n: int, rule: str = "fa", **options) -> None:
                super().__init__(n, n, bias=False, dtype=torch.float64)
                self.set_rule(rule, **options)

            def _forward_exact(self, input):
                return 2 * F.linear(input, self.weight)

            def _forward_feedback(self, input, feedback, feedback_scale=None, feedback_nonlinearity=None):
                return 2 * fbalign.functional.linear(input, self.weight, None, feedback, feedback_scale,
                                                     feedback_nonlinearity)

    layer = OldScaled(3, rule="fa", seed=0)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, 2 * F.linear(x, layer.weight))
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * torch.ones(4, 3, dtype=torch.float64) @ layer.feedback)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), 2 * F.linear(x, layer.weight))  # through forward_exact


def test_from_module_keeps_the_layers_hooks_and_leaves_the_original_alone():
    calls = []
    plain = nn.Linear(3, 2)
    handle = plain.register_forward_hook(lambda m, a, out: calls.append("forward"), always_call=True)
    plain.register_full_backward_hook(lambda m, gin, gout: calls.append("backward"))
    plain.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    ours = Linear.from_module(plain, "fa", seed=0)
    assert ours.weight is plain.weight and ours.bias is plain.bias and type(plain) is nn.Linear
    ours(torch.randn(4, 3, requires_grad=True)).sum().backward()
    assert calls == ["pre", "forward", "backward"]
    handle.remove()  # a handle of the original removes the hook from the original only
    calls.clear()
    ours(torch.randn(4, 3))
    plain(torch.randn(4, 3))
    assert calls == ["pre", "forward", "pre"]
    with pytest.raises(TypeError, match="takes an Linear"):
        Linear.from_module(nn.Conv1d(3, 2, 1))


def test_torch_keeps_forward_pre_hooks_where_model_wiring_reads_them():
    """ModelWiring.installed reads nn.Module._forward_pre_hooks (torch has no public way to list hooks): this fails
    loudly if torch moves them."""
    model = nn.Sequential(nn.Linear(2, 2))
    wiring = fbalign.nn.ModelWiring()
    wiring.install(model)
    assert fbalign.nn.ModelWiring.installed(model) == [wiring]
    assert any(getattr(h, "__self__", None) is wiring for h in model._forward_pre_hooks.values())
    fbalign.nn.ModelWiring.remove(model)
    assert fbalign.nn.ModelWiring.installed(model) == []
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_metrics_import_no_concrete_rule():
    import ast
    import inspect

    import fbalign.metrics.alignment as alignment
    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(alignment)))
                if isinstance(node, ast.ImportFrom)}
    assert not imported & {"dfa", "plastic", "rules"}, imported


def test_hook_dict_names_are_read_from_torch_and_hold_the_hooks():
    """fbalign.nn._HOOK_DICTS (used to give a copied module hooks of its own) is derived from nn.Module; this fails
    loudly if torch stops keeping forward hooks in the dicts it names."""
    names = fbalign.nn._HOOK_DICTS
    assert {"_forward_hooks", "_forward_pre_hooks", "_backward_hooks"} <= set(names)
    module = nn.Linear(2, 2)
    module.register_forward_hook(lambda *a: None, always_call=True)
    module.register_forward_pre_hook(lambda *a: None, with_kwargs=True)
    module.register_full_backward_hook(lambda *a: None)
    assert all(any(getattr(module, n)) for n in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))
    held = {n for n in names if getattr(module, n)}
    assert held >= {"_forward_hooks", "_forward_hooks_always_called", "_forward_pre_hooks",
                    "_forward_pre_hooks_with_kwargs", "_backward_hooks"}, held
