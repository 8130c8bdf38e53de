"""fbalign.attention: converted MultiheadAttention and nn.Transformer* modules give the same outputs as torch's, and
their gradients are torch's with B = W and differ under fa."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fbalign
from fbalign.attention import MultiheadAttention


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _inputs(batch_first: bool, kdim: int, n: int = 3, length: int = 5, source: int = 4):
    torch.manual_seed(1)
    x = torch.randn(n, length, 8, dtype=torch.float64)
    kv = torch.randn(n, source, kdim, dtype=torch.float64)
    if not batch_first:
        x, kv = x.transpose(0, 1), kv.transpose(0, 1)
    return x, kv


CASES = [  # (kwargs to MultiheadAttention, self-attention?, forward keywords)
    ({}, True, {}),
    ({}, True, {"need_weights": False}),
    ({}, True, {"attn_mask": "causal", "is_causal": True, "need_weights": False}),
    ({}, True, {"attn_mask": "causal", "need_weights": True, "average_attn_weights": False}),
    ({}, False, {"key_padding_mask": True}),
    ({}, False, {"key_padding_mask": True, "need_weights": False}),
    ({"kdim": 6, "vdim": 6}, False, {"need_weights": False}),
    ({"add_bias_kv": True, "add_zero_attn": True}, True, {"attn_mask": "causal"}),
    ({"bias": False}, False, {}),
]


def _call(module, x, kv, self_attention, keywords, batch_first):
    keywords = dict(keywords)
    n = x.shape[0] if batch_first else x.shape[1]
    length = x.shape[1] if batch_first else x.shape[0]
    if keywords.get("attn_mask") == "causal":
        keywords["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
    if keywords.get("key_padding_mask") is True:
        keywords["key_padding_mask"] = torch.tensor([[False, False, True, True]] * n)
    return module(x, x, x, **keywords) if self_attention else module(x, kv, kv, **keywords)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("options,self_attention,keywords", CASES)
def test_outputs_and_gradients_equal_torch_with_b_equal_w(options, self_attention, keywords, batch_first):
    torch.manual_seed(0)
    original = nn.MultiheadAttention(8, 2, dropout=0.2, batch_first=batch_first, **options).double()
    converted = fbalign.convert(nn.Sequential(original), "fa", init="weight")[0]
    assert isinstance(converted, MultiheadAttention) and isinstance(converted, nn.MultiheadAttention)
    x, kv = _inputs(batch_first, options.get("kdim", 8))
    x.requires_grad_(True)
    for mode in ("train", "eval"):
        outputs = []
        for module in (original, converted):
            getattr(module, mode)()
            module.zero_grad()
            x.grad = None
            torch.manual_seed(2)  # the same dropout draws
            out, weights = _call(module, x, kv, self_attention, keywords, batch_first)
            (out.square().sum() + (0 if weights is None else weights.sum())).backward()
            outputs.append((out, weights, _grads(module), x.grad.clone()))
        (a, wa, ga, xa), (b, wb, gb, xb) = outputs
        torch.testing.assert_close(b, a)
        assert (wa is None) == (wb is None)
        if wa is not None:
            torch.testing.assert_close(wb, wa)
        torch.testing.assert_close(xb, xa)
        names = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias", "q_proj.weight": "q_proj_weight",
                 "k_proj.weight": "k_proj_weight", "v_proj.weight": "v_proj_weight"}
        assert {names.get(k, k) for k in gb} == set(ga)
        for name, grad in gb.items():
            torch.testing.assert_close(grad, ga[names.get(name, name)])


def test_conversion_shares_parameters_and_exposes_torch_attributes():
    original = nn.MultiheadAttention(8, 2)
    model = fbalign.convert(nn.Sequential(original), "fa", inplace=True, seed=0)
    attention = model[0]
    assert attention.in_proj_weight is original.in_proj_weight and attention.in_proj.weight is original.in_proj_weight
    assert attention.out_proj.weight is original.out_proj.weight
    assert isinstance(attention.in_proj, fbalign.nn.Linear) and isinstance(attention.out_proj, fbalign.nn.Linear)
    assert attention.in_proj.feedback.shape == (24, 8)
    assert len(list(model.parameters())) == 4
    separate = fbalign.convert(nn.Sequential(nn.MultiheadAttention(8, 2, kdim=5, vdim=3)), "usf")[0]
    assert separate.k_proj.weight.shape == (8, 5) and separate.v_proj_weight.shape == (8, 3)
    assert separate.in_proj_weight is None and separate.in_proj_bias.shape == (24,)


def _transformer(batch_first: bool = True) -> nn.Transformer:
    torch.manual_seed(0)
    return nn.Transformer(8, 2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=16, dropout=0.1,
                          batch_first=batch_first).double()


def _transformer_loss(model, src, tgt):
    mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=torch.float64)
    padding = torch.zeros(src.shape[:2], dtype=torch.bool)
    padding[0, -1] = True
    out = model(src, tgt, tgt_mask=mask, tgt_is_causal=True, src_key_padding_mask=padding,
                memory_key_padding_mask=padding)
    # Not out.square(): the output is layer-normed, so its sum of squares hardly depends on anything.
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return (out * weights).sum()


@pytest.mark.parametrize("rule", [("fa", {"init": "weight"}), ("backprop", {}), ("usf", {})])
def test_transformer_gradients_equal_torch_with_b_equal_w_and_differ_under_fa(rule):
    name, options = rule
    original = _transformer()
    converted = fbalign.convert(original, name, **options)
    assert not fbalign.unconverted(converted)
    src = torch.randn(3, 6, 8, dtype=torch.float64)
    tgt = torch.randn(3, 5, 8, dtype=torch.float64)
    grads = []
    for model in (original, converted):
        torch.manual_seed(3)
        _transformer_loss(model, src, tgt).backward()
        grads.append(_grads(model))
    torch_grads, ours = grads
    renamed = {k.replace("in_proj.weight", "in_proj_weight").replace("in_proj.bias", "in_proj_bias"): v
               for k, v in ours.items()}
    assert set(renamed) == set(torch_grads)
    if name == "usf":  # sign feedback: the top layer's weight gradient is exact, those below differ
        torch.testing.assert_close(renamed["decoder.layers.1.linear2.weight"],
                                   torch_grads["decoder.layers.1.linear2.weight"])
        assert not torch.allclose(renamed["encoder.layers.0.self_attn.in_proj_weight"],
                                  torch_grads["encoder.layers.0.self_attn.in_proj_weight"])
        return
    for key, grad in renamed.items():
        torch.testing.assert_close(grad, torch_grads[key], msg=key)


def test_transformer_under_fa_differs_below_the_top_and_eval_fast_path_matches():
    original = _transformer()
    converted = fbalign.convert(original, "fa", seed=0)
    src = torch.randn(3, 6, 8, dtype=torch.float64)
    tgt = torch.randn(3, 5, 8, dtype=torch.float64)
    for model in (original, converted):
        torch.manual_seed(3)
        _transformer_loss(model, src, tgt).backward()
    top = "decoder.layers.1.linear2.weight"
    torch.testing.assert_close(converted.get_parameter(top).grad, original.get_parameter(top).grad)
    for name in ("encoder.layers.0.self_attn.in_proj.weight", "decoder.layers.0.multihead_attn.out_proj.weight",
                 "encoder.layers.0.linear1.weight"):
        ours = converted.get_parameter(name).grad
        theirs = original.get_parameter(name.replace("in_proj.weight", "in_proj_weight")).grad
        assert not torch.allclose(ours, theirs), name
    # Inference (torch's fused fast paths read the same Parameters): the same outputs.
    original.eval(), converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(src.float().double(), tgt), original(src, tgt))


class CausalLM(nn.Module):
    """A tiny decoder-only transformer: nn.TransformerEncoder with a causal mask, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.encoder(x, mask=mask, is_causal=True))


@pytest.mark.parametrize("rule", ["fa", "usf", "frsf", "brsf", "pbp", "kp", "wm", "shallow", "dfa"])
def test_causal_encoder_stack_trains_under_every_rule(rule):
    torch.manual_seed(0)
    model = fbalign.convert(CausalLM(), rule, seed=0)
    model(torch.randn(2, 5, 8)).square().mean().backward()
    grad = model.encoder.layers[0].self_attn.in_proj.weight.grad
    if rule == "shallow":  # nothing passes below the attention's output projection
        assert grad is None or not grad.any()
    else:
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, rule


def test_standalone_constructor_and_deepcopy():
    attention = MultiheadAttention(8, 2, batch_first=True, rule="fa", seed=0)
    assert isinstance(attention.in_proj, fbalign.nn.Linear)
    clone = copy.deepcopy(attention)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(clone(x, x, x)[0], attention(x, x, x)[0])
    plain = MultiheadAttention(8, 2)
    assert type(plain.in_proj) is nn.Linear


class AttentionHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attention(x, x, x, need_weights=False)[0])


def test_layer_level_dfa_sends_each_tokens_error_to_the_projections_inputs_by_hand():
    torch.manual_seed(0)
    model = fbalign.convert(AttentionHead().double(), "dfa", seed=0)
    attention = model.attention
    captured = {}

    def keep_input(module, args):
        args[0].retain_grad()
        captured["attended"] = args[0]

    attention.out_proj.register_forward_pre_hook(keep_input)
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 4, 3, dtype=torch.float64)
    (model(x) * weights).sum().backward()
    e = weights  # the gradient at the head's output, per token
    torch.testing.assert_close(captured["attended"].grad, e @ attention.out_proj.direct_feedback)
    torch.testing.assert_close(x.grad, e @ attention.in_proj.direct_feedback)  # x enters only through in_proj


def test_unbatched_inputs_match_torch():
    torch.manual_seed(0)
    original = nn.MultiheadAttention(8, 2, batch_first=True).double()
    converted = fbalign.convert(nn.Sequential(original), "fa", init="weight")[0]
    x = torch.randn(5, 8, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    padding = torch.tensor([0, 0, 0, 1, 1]).bool()
    for keywords in ({}, {"attn_mask": mask, "need_weights": False}, {"key_padding_mask": padding}):
        a, wa = original(x, x, x, **keywords)
        b, wb = converted(x, x, x, **keywords)
        torch.testing.assert_close(b, a)
        if wa is not None:
            torch.testing.assert_close(wb, wa)
