"""fbalign.convert / summary: every layer of any module tree converted, outputs unchanged, nothing skipped
silently."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fbalign
from fbalign import UnconvertedModuleWarning
from fbalign.nn import FeedbackLayer


class Block(nn.Module):
    """A residual block with BatchNorm and a 1×1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.ModuleList([Block(4, 8), Block(8, 8)])
        self.heads = nn.ModuleDict({"class": nn.Linear(8, 3), "aux-out": nn.Linear(8, 2)})
        self.mixer = nn.Sequential(nn.Conv1d(8, 8, 1), nn.GroupNorm(2, 8))
        self.shared = nn.Linear(8, 8)
        self.tied = self.heads["class"]  # one layer at two places in the tree
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.embed = nn.Embedding(5, 8)

    def forward(self, x, tokens):
        for block in self.blocks:
            x = block(torch.relu(self.stem(x)) if block is self.blocks[0] else x)
        seq = x.flatten(2)                        # (N, 8, H·W)
        seq = self.mixer(seq).transpose(1, 2)      # (N, H·W, 8)
        seq = self.shared(self.shared(seq)) + self.embed(tokens)[:, None]
        seq, _ = self.attention(seq, seq, seq)
        pooled = seq.mean(1)
        return self.heads["class"](pooled), self.heads["aux-out"](pooled)


def _inputs():
    return torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 3])


def _convertible_count(model):
    # MultiheadAttention becomes two layers: its packed in-projection and its output projection (a Linear subclass).
    unique = {id(m): m for m in model.modules()}.values()
    return sum(type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) or isinstance(m, nn.MultiheadAttention)
               for m in unique) + sum(isinstance(m, nn.MultiheadAttention) for m in unique)


@pytest.mark.parametrize("rule", ["fa", "usf", "frsf", "brsf", "shallow", "backprop"])
def test_every_layer_converted_and_outputs_unchanged(rule):
    model = Net()
    x, tokens = _inputs()
    expected = [copy.deepcopy(model).train()(x, tokens), copy.deepcopy(model).eval()(x, tokens)]
    with pytest.warns(UnconvertedModuleWarning) as caught:
        converted = fbalign.convert(model, rule, seed=0)
    message = str(caught[0].message)
    assert "attention" not in message and "embed: Embedding" in message
    layers = {id(m) for m in converted.modules() if isinstance(m, FeedbackLayer)}
    assert len(layers) == _convertible_count(model) == 13
    assert converted.tied is converted.heads["class"]  # still one shared layer
    assert isinstance(converted.heads["aux-out"], fbalign.nn.Linear)
    assert not any(isinstance(m, FeedbackLayer) for m in model.modules())  # the original is untouched
    got = [copy.deepcopy(converted).train()(x, tokens), copy.deepcopy(converted).eval()(x, tokens)]
    for g, e in zip(got, expected):
        for a, b in zip(g, e):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # And the converted model trains end to end (attention's projections follow the rule too).
    sum(o.square().sum() for o in converted(x, tokens)).backward()
    assert converted.heads["class"].weight.grad is not None


def test_backprop_conversion_trains_exactly_like_the_original():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5))
    converted = fbalign.convert(original, "backprop")
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 5, (16,))
    for model in (original, converted):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(original.state_dict().values(), converted.state_dict().values()):
        assert torch.equal(a, b)


def test_inplace_shares_parameters_so_an_existing_optimizer_still_works():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    weight = model[0].weight
    same = fbalign.convert(model, "fa", inplace=True, seed=0)
    assert same is model and isinstance(model[0], fbalign.nn.Linear) and model[0].weight is weight
    before = weight.detach().clone()
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    assert not torch.equal(before, model[0].weight)


def test_seed_gives_each_layer_its_own_reproducible_feedback():
    base = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    a, b, c = (fbalign.convert(base, "fa", seed=s) for s in (1, 1, 2))
    assert torch.equal(a[0].feedback, b[0].feedback) and torch.equal(a[1].feedback, b[1].feedback)
    assert not torch.equal(a[0].feedback, a[1].feedback)
    assert not torch.equal(a[0].feedback, c[0].feedback)
    fbalign.convert(base, "backprop", seed=1)  # seed is ignored by a rule without randomness


def test_reconversion_changes_the_rule_and_options_reach_every_layer():
    model = fbalign.convert(nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 2)), "usf")
    model = fbalign.convert(model, "fa", init="gaussian", scale=0.3, seed=0)
    assert all(m.rule.name == "fa" and m.rule.init == "gaussian" for m in model)
    assert abs(model[0].feedback.std().item() - 0.3) < 0.15


def test_bad_rule_or_option_fails_before_anything_changes():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="valid rules are"):
        fbalign.convert(model, "bogus", inplace=True)
    with pytest.raises(ValueError, match="its options are"):
        fbalign.convert(model, "fa", inplace=True, magnitude=3)
    assert type(model[0]) is nn.Linear
    with pytest.raises(TypeError, match=r"fbalign.nn.Linear.from_module"):
        fbalign.convert(nn.Linear(2, 2), "fa")


def test_custom_weights_and_rnns_are_reported_by_name():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.matrix = nn.Parameter(torch.randn(3, 3))
            self.scale = nn.Parameter(torch.ones(3))  # elementwise: not weight transport

        def forward(self, x):
            return x @ self.matrix * self.scale

    class LoRALinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class MyLSTM(nn.LSTM):
        def forward(self, x):
            return super().forward(x)[0]

    model = nn.Sequential(nn.Linear(3, 3), Custom(), MyLSTM(3, 3), nn.LayerNorm(3), LoRALinear(3, 3), nn.GRU(3, 3))
    with pytest.warns(UnconvertedModuleWarning) as caught:
        fbalign.convert(model, "fa")
    message = str(caught[0].message)
    assert "3 module(s)" in message
    assert "1: Custom" in message and "2: MyLSTM" in message and "4: LoRALinear" in message
    assert "LayerNorm" not in message


def test_a_model_of_convertible_layers_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fbalign.convert(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)), "fa")


def test_summary_lists_layers_rules_and_unconverted_modules():
    with pytest.warns(UnconvertedModuleWarning):
        model = fbalign.convert(Net(), "frsf", concordance=0.8, seed=0)
    text = fbalign.summary(model)
    assert "blocks.0.conv1" in text and "heads.aux-out" in text
    assert "frsf(concordance=0.8, seed=" in text
    assert "magnitude(8, 4, 3, 3)" in text
    assert "13 feedback layer(s)" in text
    assert "attention.in_proj" in text and "embed: Embedding" in text


# --- per-layer rules: {pattern: rule} ------------------------------------------------------------------------------

class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.Flatten())
        self.hidden = nn.Linear(12, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(self.features(x))))


def _rules_of(model):
    return {name: layer.rule.name for name, layer in fbalign.feedback_layers(model)}


def test_mapping_last_layer_on_backprop():
    model = fbalign.convert(Classifier(), {"head": "backprop", "*": "fa"}, seed=0)
    assert _rules_of(model) == {"features.0": "fa", "features.2": "fa", "hidden": "fa", "head": "backprop"}
    text = fbalign.summary(model)
    assert "backprop" in text and "left as torch's" not in text


def test_mapping_by_class_pbp_on_linears_fa_on_convolutions_with_options():
    model = fbalign.convert(Classifier(), {nn.Linear: "pbp", nn.Conv2d: ("fa", {"init": "gaussian"})}, seed=1)
    assert _rules_of(model) == {"features.0": "fa", "features.2": "fa", "hidden": "pbp", "head": "pbp"}
    assert model.features[0].rule.init == "gaussian"
    x = torch.randn(2, 1, 6, 6)
    model(x).sum().backward()
    assert model.features[0].weight.grad is not None


def test_mapping_usf_everywhere_but_attention_and_globs_reach_transformer_layers():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    model = nn.Sequential()
    model.add_module("encoder", nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    converted = fbalign.convert(model, {nn.MultiheadAttention: "backprop", "*": "usf"})
    rules_of = _rules_of(converted)
    assert rules_of["encoder.layers.0.self_attn.in_proj"] == "backprop"
    assert rules_of["encoder.layers.1.self_attn.out_proj"] == "backprop"
    assert rules_of["encoder.layers.0.linear1"] == rules_of["encoder.layers.1.linear2"] == "usf"
    only = fbalign.convert(model, {"encoder.layers.*.linear1": "fa", "encoder.layers.0.self_attn.in_proj": "kp"})
    assert _rules_of(only) == {"encoder.layers.0.self_attn.in_proj": "kp", "encoder.layers.0.linear1": "fa",
                               "encoder.layers.1.linear1": "fa"}
    # unmatched layers stay torch's: layer 1's attention is still torch's own module
    assert type(only.encoder.layers[1].self_attn) is nn.MultiheadAttention
    assert type(only.encoder.layers[0].linear2) is nn.Linear
    assert "left as torch's" in fbalign.summary(only)


def test_mapping_first_match_wins_and_star_is_the_default_wherever_it_stands():
    model = fbalign.convert(Classifier(), {"*": "usf", "features": "fa", "features.0": "backprop"}, seed=0)
    assert _rules_of(model) == {"features.0": "fa", "features.2": "fa", "hidden": "usf", "head": "usf"}


def test_mapping_errors_name_the_problem_and_change_nothing():
    model = Classifier()
    with pytest.raises(ValueError, match=r"'heads?' match no module|'heads' match no module"):
        fbalign.convert(model, {"heads": "backprop", "*": "fa"}, inplace=True)
    with pytest.raises(ValueError, match="nn.LSTM|LSTM"):
        fbalign.convert(model, {nn.LSTM: "fa"}, inplace=True)
    with pytest.raises(TypeError, match="in the mapping"):
        fbalign.convert(model, {"*": "fa"}, init="gaussian")
    with pytest.raises(ValueError, match="valid rules are"):
        fbalign.convert(model, {"head": "bogus"}, inplace=True)
    with pytest.raises(TypeError, match="rule, {option: value}"):
        fbalign.convert(model, {"head": ("fa", "gaussian")}, inplace=True)
    assert type(model.head) is nn.Linear and type(model.features[0]) is nn.Conv2d


def test_mapping_with_dfa_and_a_backprop_head_trains():
    model = fbalign.convert(Classifier(), {"head": "backprop", "*": "dfa"}, seed=0)
    model(torch.randn(3, 1, 6, 6)).sum().backward()
    assert model.features[0].weight.grad is not None and "dfa" in fbalign.summary(model)
