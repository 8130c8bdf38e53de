"""fbalign.dfa_points: the output error injected at named modules' outputs through fixed random matrices, checked
by hand; no error passes between blocks; works on transformers, LSTMs and CNN blocks; inactive in exact_backprop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fbalign


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_injected_error_matches_a_hand_computation():
    torch.manual_seed(0)
    model = fbalign.dfa_points(Blocks().double(), ["blocks.*"], seed=0)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    out = model(x)
    ((out - y).square().sum() / 2).backward()
    b0 = model.blocks[0].dfa_point_feedback
    b1 = model.blocks[1].dfa_point_feedback
    assert b0.shape == b1.shape == (2, 4) and not torch.equal(b0, b1)
    with torch.no_grad():
        e = out - y
        a = model.embed(x)
        h1 = model.blocks[0](a)
        h2 = model.blocks[1](h1)
        delta1 = (e @ b0) * (1 - h1.square())
        delta2 = (e @ b1) * (1 - h2.square())
    torch.testing.assert_close(model.head.weight.grad, e.T @ h2)                 # the head: exact
    torch.testing.assert_close(model.blocks[1][0].weight.grad, delta2.T @ h1)     # block 2: its own B e
    torch.testing.assert_close(model.blocks[0][0].weight.grad, delta1.T @ a)      # block 1: its own B e only
    embed_error = delta1 @ model.blocks[0][0].weight                               # below block 1: backprop
    torch.testing.assert_close(model.embed.weight.grad, embed_error.T @ x)


def test_no_error_passes_between_blocks_and_exact_backprop_turns_points_off():
    torch.manual_seed(0)
    base = Blocks()
    model = fbalign.dfa_points(base, ["blocks.1"], seed=0)
    x = torch.randn(5, 3)
    model(x).sum().backward()
    grad_with_points = model.blocks[0][0].weight.grad.clone()
    model.zero_grad()
    with fbalign.exact_backprop(model):
        model(x).sum().backward()
    reference = model.blocks[0][0].weight.grad.clone()
    base.zero_grad()
    base(x).sum().backward()
    torch.testing.assert_close(reference, base.blocks[0][0].weight.grad)  # inactive: backprop's gradients
    assert not torch.allclose(grad_with_points, reference)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 7)

    def forward(self, tokens):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.encoder(self.embed(tokens), mask=mask, is_causal=True))


def test_transformer_blocks_as_points_each_token_gets_its_own_error():
    torch.manual_seed(0)
    model = fbalign.dfa_points(TinyLM().double(), ["encoder.layers.*"], seed=0)
    assert set(model.__dict__["_forward_pre_hooks"]) and "dfa points" in fbalign.summary(model)
    tokens = torch.randint(0, 7, (2, 5))
    captured = {}
    block = model.encoder.layers[0]
    # the block's last op (post-norm): its output is the block's output, which gets the injected error
    block.norm2.register_full_backward_hook(lambda m, gi, go: captured.__setitem__("grad_out", go[0]))
    logits = model(tokens)
    loss = nn.functional.cross_entropy(logits.reshape(-1, 7), tokens.reshape(-1))
    loss.backward()
    with torch.no_grad():
        e = (logits.softmax(-1) - nn.functional.one_hot(tokens, 7)) / tokens.numel()
        expected = e @ block.dfa_point_feedback
    torch.testing.assert_close(captured["grad_out"], expected)
    assert model.embed.weight.grad is not None and model.encoder.layers[0].linear1.weight.grad.abs().sum() > 0


def test_points_compose_with_a_rule_and_with_lstms_and_conv_maps():
    torch.manual_seed(0)
    lstm_model = nn.Sequential()
    lstm_model.add_module("rnn", nn.LSTM(3, 4, batch_first=True))
    lstm_model.add_module("pick", _First())
    lstm_model.add_module("head", nn.Linear(4, 2))
    model = fbalign.dfa_points(fbalign.convert(lstm_model, "fa", seed=0), ["rnn"], seed=1)
    model(torch.randn(2, 5, 3)).sum().backward()
    assert model.rnn.dfa_point_feedback.shape == (2, 4)
    assert model.rnn.hh_l0.weight.grad.abs().sum() > 0

    cnn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    cnn = fbalign.dfa_points(cnn, ["1", "3"], seed=0, resolution=2)
    cnn(torch.randn(2, 1, 6, 6)).sum().backward()
    assert cnn[1].dfa_point_feedback.shape == (4, 3, 2, 2)
    assert cnn[0].weight.grad.abs().sum() > 0


class _First(nn.Module):
    def forward(self, output):
        return output[0][:, -1]


def test_bad_points_and_misuse_fail_clearly():
    with pytest.raises(ValueError, match="'blocks.9' names no module"):
        fbalign.dfa_points(Blocks(), ["blocks.9"])
    with pytest.raises(ValueError, match="output='nope'"):
        fbalign.dfa_points(Blocks(), ["blocks.*"], output="nope")
    model = fbalign.dfa_points(Blocks(), ["blocks.*"], seed=0)
    with pytest.raises(RuntimeError, match="ran outside a forward"):
        model.blocks[0](torch.randn(2, 4, requires_grad=True))
    copied = copy.deepcopy(model)
    copied(torch.randn(2, 3)).sum().backward()
    assert copied.blocks[0][0].weight.grad is not None and model.blocks[0][0].weight.grad is None


def test_named_output_module_is_the_error_source():
    torch.manual_seed(0)
    model = fbalign.dfa_points(Blocks().double(), ["blocks.0"], output="head", seed=0)
    x = torch.randn(4, 3, dtype=torch.float64)
    out = model(x)
    (out.square().sum() / 2).backward()
    with torch.no_grad():
        h1 = model.blocks[0](model.embed(x))
        delta = (out @ model.blocks[0].dfa_point_feedback) * (1 - h1.square())
    torch.testing.assert_close(model.blocks[0][0].weight.grad, delta.T @ model.embed(x))
