"""fbalign reproduce akrout2019: the protocol of Akrout et al.'s code, exact where it can be, and every experiment
end to end at a tiny scale (a slice of Fashion-MNIST)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import fbalign
from fbalign.data import TensorDataset
from fbalign.experiments import PAPERS, common
from fbalign.experiments import akrout2019 as ak
from fbalign.metrics import angle


def small_data(n_train: int = 512, n_test: int = 200, features: int = 40, seed: int = 0) -> TensorDataset:
    """A learnable 10-class task in [0, 1] (pixel-like), small enough for many runs."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(10, features, generator=gen)
    y = torch.randint(0, 10, (n_train + n_test,), generator=gen)
    x = (centres[y] + 0.3 * torch.rand(len(y), features, generator=gen)).clamp(0, 1)
    return TensorDataset("fashion-mnist", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes=10)


@pytest.fixture
def tiny(monkeypatch, one_thread):
    """The synthetic data set in place of Fashion-MNIST; the sizes come from each scale table's ``tiny`` row
    (``Context(scale="tiny")``)."""
    data = small_data()
    monkeypatch.setattr(ak, "flat_data", lambda ctx: data)
    return data


def test_registered():
    assert PAPERS["akrout2019"] == "fbalign.experiments.akrout2019"


def test_network_follows_their_code():
    model = ak.network((784, 500, 10), "kp", seed=0)
    w, v = model[0].weight, model[0].feedback
    std = 1 / math.sqrt(784 + 500)  # N(0, 1/(fan_in + fan_out)) for W, b and B
    for t in (w.detach(), v, model[0].bias.detach()):
        assert abs(float(t.std()) - std) < 0.1 * std and abs(float(t.mean())) < 0.1 * std
    assert not torch.equal(w, v)
    assert model[0].rule.decay == 0.0  # their KP: weight_decay=1, a factor of 1
    assert isinstance(model[1], torch.nn.Sigmoid) and len(model) == 3
    opt = ak.optimizer(model, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.3 / 128]  # bias: lr/batch on the batch-mean δ
    # Their loss: sigmoid cross-entropy summed over outputs, mean over the batch; its gradient is (σ(o) − y)/N.
    out = torch.randn(5, 10, requires_grad=True)
    y = torch.tensor([0, 3, 9, 2, 2])
    ak.loss(out, y).backward()
    assert torch.allclose(out.grad, (torch.sigmoid(out) - F.one_hot(y, 10)) / 5, atol=1e-7)


@pytest.mark.parametrize("rule", ["fa", "wm", "kp"])
def test_rules_with_b_equal_w_step_like_backprop(rule):
    data = small_data()
    bp, other = ak.network((40, 16, 10), "bp", seed=3), ak.network((40, 16, 10), rule, seed=3)
    with torch.no_grad():
        for _, layer in fbalign.feedback_layers(other):
            layer.feedback.copy_(layer.weight)
    grads = []
    for model in (bp, other):
        model.zero_grad()
        ak.loss(model(data.train_x[:32]), data.train_y[:32]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_angles_are_the_hand_computed_ones():
    data = small_data()
    model = ak.network((40, 16, 10), "fa", seed=1)
    x, y = data.train_x[:20], data.train_y[:20]
    got = ak.angles(model, x, y)
    with torch.no_grad():
        h = torch.sigmoid(x @ model[0].weight.T + model[0].bias)
        e = torch.sigmoid(h @ model[2].weight.T + model[2].bias) - F.one_hot(y, 10)
        b = model[2].feedback.T  # B, (hidden × outputs)
        d_fa, d_bp = (e @ b.T) * h * (1 - h), (e @ model[2].weight) * h * (1 - h)
        cosines = (d_fa * d_bp).sum(1) / (d_fa.norm(dim=1) * d_bp.norm(dim=1))
    assert got["delta"] == pytest.approx(float(torch.rad2deg(torch.acos(cosines.clamp(-1, 1))).mean()), abs=1e-3)
    assert got["w1"] == pytest.approx(float(angle(b.T, model[2].weight.detach())), abs=1e-9)
    assert ak.angles(ak.network((40, 16, 10), "bp", seed=1), x, y)["delta"] == 0.0


def test_sigmoid_mirror_is_their_update():
    model = ak.network((6, 4, 3), "wm", seed=0)
    before = [layer.feedback.clone() for layer in (model[0], model[2])]
    ak.sigmoid_mirror(model, 1, lr=0.01, amplitude=0.1, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    for layer, v in zip((model[0], model[2]), before):
        x = 0.1 * (torch.rand(128, layer.in_features, generator=gen) - 0.5)
        y = torch.sigmoid(x @ layer.weight.T + layer.bias)
        assert torch.allclose(layer.feedback, v + 0.01 * y.T @ x, atol=1e-7)


def test_undecayed_mirror_keeps_aligning_where_a_decayed_one_stops():
    """The finding of the ablation, on mirror dynamics alone (W fixed): without decay B integrates every step
    (noise ∝ √t against signal ∝ t), so its angle keeps falling; with decay λ = σ² it stops at a floor."""
    torch.manual_seed(0)
    angles = {}
    for decay in (0.0, ak.MIRROR["noise_std"] ** 2):
        model = ak.network((200, 100, 10), "wm", seed=0)
        gen = torch.Generator().manual_seed(1)
        found = []
        for steps in (250, 750, 3000):
            fbalign.mirror(model, steps, batch_size=128, noise_std=ak.MIRROR["noise_std"], lr=10 * ak.MIRROR["lr"],
                           decay=decay, generator=gen)
            found.append(float(angle(model[0].feedback, model[0].weight.detach())))
        angles[decay] = found
    free, decayed = angles[0.0], angles[ak.MIRROR["noise_std"] ** 2]
    assert free[0] > free[1] > free[2] and free[2] < 0.6 * free[0]
    assert abs(decayed[2] - decayed[1]) < 0.1 * decayed[1]  # on its floor already


def test_kp_invariant_holds_to_float_precision(tiny):
    ctx = common.Context("akrout2019", "/tmp/unused", scale="tiny", progress=False)
    out = ak.run_kp_invariant(ctx)
    assert out["float64_decay0.01"]["max_relative_error"] < 1e-12
    assert out["float32_decay0.01"]["max_relative_error"] < 1e-4
    assert out["float64_decay0"]["max_relative_error"] < 1e-12  # their KP: W − B never changes
    first, last = out["float64_decay0.01"]["offset_curve"][0], out["float64_decay0.01"]["offset_curve"][-1]
    assert last[1] == pytest.approx(last[2], rel=1e-9) and last[1] < first[1] < 1  # shrinks as (1 − ηλ)^t


def test_reproduce_tiny_end_to_end_and_resume(tiny, tmp_path):
    ctx = common.Context("akrout2019", tmp_path, scale="tiny", progress=False)
    results = common.reproduce(ak, ctx, command="test")
    main = results["experiments"]["main"]
    assert set(main["summary"]) == {"bp", "fa", "wm", "kp"}
    for rule, runs in main["runs"].items():
        history = runs[0]["history"]
        assert [h["epoch"] for h in history] == [0, 1, 2]
        assert history[2]["loss"] < history[1]["loss"], rule  # learning (8 steps are too few for accuracy)
    assert main["summary"]["bp"]["delta"] == [0.0]
    assert main["summary"]["kp"]["w1"][0] < main["summary"]["fa"]["w1"][0]
    ablation = results["experiments"]["wm_ablation"]
    assert [r["label"] for r in ablation["rows"]][-1] == "hidden 8" and ablation["rows"][-1]["hidden"] == 8
    report = (tmp_path / "report.md").read_text()
    assert "theirs (MNIST)" in report and "akrout_main.png" in report and (tmp_path / "akrout_main.png").exists()
    assert json.loads((tmp_path / "results.json").read_text())["experiments"]["kp_invariant"]
    mirror = {r["label"]: r["curve"] for r in results["experiments"]["wm_mirror"]["rows"]}
    assert [s for s, _ in mirror["lr ×10"]][-1] == 300
    assert mirror["lr ×10"][-1][1] < mirror["lr ×10"][0][1]  # the mirror aligns B with the trained W
    assert "akrout_mirror_alone.png" in report
    # An interrupted run continues from its per-epoch checkpoint: the same numbers as uninterrupted.
    checkpoint = tmp_path / "main" / "kp-seeds1.pt"
    assert checkpoint.exists()
    resumed = common.Context("akrout2019", tmp_path / "again", scale="tiny", progress=False, resume=True)
    (tmp_path / "again" / "main").mkdir(parents=True)
    saved = fbalign.checkpoint.load(checkpoint)
    torch.manual_seed(123)
    run = ak.train_run(resumed, tiny, "kp", seed=1111, epochs=2, hidden=16, checkpoint_path=checkpoint)
    assert run["history"] == saved["history"][0]
    more = ak.train_run(resumed, tiny, "kp", seed=1111, epochs=3, hidden=16, checkpoint_path=checkpoint)
    fresh = ak.train_run(ctx, tiny, "kp", seed=1111, epochs=3, hidden=16)
    assert more["history"][-1]["test_acc"] == fresh["history"][-1]["test_acc"]
    assert more["history"][-1]["w1"] == pytest.approx(fresh["history"][-1]["w1"], abs=1e-9)


@pytest.mark.parametrize("rule", ["fa", "wm", "kp"])
def test_seeds_side_by_side_train_as_each_alone(tiny, rule):
    """--full trains a rule's seeds as one ensemble: each seed's curve is the one it has alone (float32 rounding)."""
    ctx = common.Context("akrout2019", "/tmp/unused", scale="tiny", progress=False)
    together = ak.train_runs(ctx, tiny, rule, seeds=[1, 2, 3], epochs=2, hidden=16)
    for seed, run in zip([1, 2, 3], together):
        alone = ak.train_run(ctx, tiny, rule, seed=seed, epochs=2, hidden=16)
        for mine, theirs in zip(run["history"], alone["history"], strict=True):
            assert mine.keys() == theirs.keys()
            for key in mine:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-4), (seed, mine["epoch"], key)
    assert together[0]["history"][-1]["w1"] != together[1]["history"][-1]["w1"]  # seeds differ


def test_unknown_data_set_is_refused():
    ctx = common.Context("akrout2019", "/tmp/unused", data="digits", progress=False)
    with pytest.raises(ValueError, match="fashion-mnist, mnist or cifar10"):
        ak.flat_data(ctx)
