"""fbalign.metrics measurements: known angles on hand-made vectors, hand-computed Δh on small nets, backprop and
pseudo-backprop give 0°, NSE of the mean is 1, measuring leaves training bit for bit unchanged under every rule,
and feedback alignment on Lillicrap's linear task aligns."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fbalign
from fbalign import rules
from fbalign.metrics import AlignmentRecorder, angle, example_angles, load_records, measure_alignment, measure_step, nse
from fbalign.metrics import alignment as alignment_module


@pytest.fixture(autouse=True)
def _one_thread():
    """These nets are tiny: a second intra-op thread buys nothing, and on a busy 2-core machine OpenMP's hand-offs
    make them ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Lillicrap et al.'s L = ½‖e‖², averaged over the batch."""
    return 0.5 * (targets - outputs).square().sum(-1).mean()


def uses_seed(rule: str) -> dict:
    return {"seed": 0} if "seed" in rules.get(rule).__dataclass_fields__ else {}


def mlp(rule: str, dtype=torch.float64, **options) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3))
    return fbalign.convert(model.to(dtype), rule, **uses_seed(rule), **options)


def cnn(rule: str, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.ReLU(), nn.Linear(5, 3))
    return fbalign.convert(model.to(dtype), rule, **uses_seed(rule))


def keyed(values: dict, group: str) -> dict:
    return {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith(group + "/")}


# --- the quantities themselves ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("a", "b", "degrees"), [
    ([1.0, 0.0], [0.0, 1.0], 90.0),
    ([1.0, 0.0], [1.0, 1.0], 45.0),
    ([1.0, 0.0], [-1.0, 0.0], 180.0),
    ([2.0, 0.0], [5.0, 0.0], 0.0),
    ([1.0, 0.0], [0.5, math.sqrt(3) / 2], 60.0),
    ([1.0, 2.0, 2.0], [-2.0, -1.0, 2.0], 90.0),
    ([1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], 45.0),
])
def test_angle_of_hand_made_vectors(a, b, degrees):
    got = angle(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert got.item() == pytest.approx(degrees, abs=1e-12)


def test_angle_flattens_matrices_and_is_nan_for_a_zero_vector():
    assert angle(torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])).item() == pytest.approx(90.0)
    assert math.isnan(angle(torch.zeros(3), torch.ones(3)).item())
    with pytest.raises(ValueError, match="as many elements"):
        angle(torch.ones(3), torch.ones(4))


finite = st.floats(-1e3, 1e3, allow_nan=False, width=64)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=2, max_size=12), st.floats(0.01, 100.0))
def test_angle_properties(pairs, c):
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    if a.norm() < 1e-3 or b.norm() < 1e-3:
        return
    assert angle(a, c * a).item() == pytest.approx(0.0, abs=1e-5)
    assert angle(a, -c * a).item() == pytest.approx(180.0, abs=1e-5)
    assert angle(a, b).item() == pytest.approx(angle(b, a).item(), abs=1e-9)
    assert angle(c * a, b).item() == pytest.approx(angle(a, b).item(), abs=1e-6)
    cos = (a @ b / (a.norm() * b.norm())).item()
    if abs(cos) < 0.99:  # where acos is well conditioned
        assert angle(a, b).item() == pytest.approx(math.degrees(math.acos(cos)), abs=1e-6)


def test_example_angles_are_per_row_and_nan_for_zero_rows():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    got = example_angles(a, b)
    assert got[:2].tolist() == pytest.approx([90.0, 45.0])
    assert math.isnan(got[2].item())
    images = torch.randn(4, 2, 3, 3)
    assert example_angles(images, images).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="one shape"):
        example_angles(torch.ones(2, 3), torch.ones(3, 2))


def test_nse_of_predicting_the_mean_is_one_and_of_the_truth_zero():
    targets = torch.randn(50, 4, dtype=torch.float64)
    assert nse(targets.mean(0).expand_as(targets), targets).item() == pytest.approx(1.0, abs=1e-12)
    assert nse(targets, targets).item() == 0.0
    outputs = torch.randn(50, 4, dtype=torch.float64)
    by_hand = ((targets - outputs) ** 2).sum() / ((targets - targets.mean(0)) ** 2).sum()
    assert nse(outputs, targets).item() == pytest.approx(by_hand.item(), rel=1e-12)
    assert math.isnan(nse(outputs[:1], targets[:1]).item())  # one example: no spread to normalise by
    with pytest.raises(ValueError, match="one-hot"):
        nse(outputs, torch.zeros(50, dtype=torch.long))


# --- measurements on networks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [mlp, cnn])
def test_backprop_gives_zero_angles_everywhere(make):
    model = make("backprop")
    x = torch.randn(9, 6, dtype=torch.float64) if make is mlp else torch.randn(9, 2, 7, 7, dtype=torch.float64)
    values = measure_alignment(model, nn.functional.cross_entropy, x, torch.randint(0, 3, (9,)))
    for group in ("angle_dh_bp", "angle_b_wt", "angle_grad_bp"):
        assert keyed(values, group), group
        assert set(keyed(values, group).values()) == {0.0}, group
    assert set(keyed(values, "frac_agree_dh_bp").values()) == {1.0}
    assert set(keyed(values, "norm_ratio_b_w").values()) == {1.0}
    names = [name for name, _ in fbalign.feedback_layers(model)]
    assert set(keyed(values, "angle_dh_bp")) == set(names[1:])  # the first layer's input is the data
    assert set(keyed(values, "angle_grad_bp")) == {name for name, _ in model.named_parameters()}


def test_pseudo_backprop_gives_zero_pbp_angle_and_feedback_alignment_does_not():
    x, t = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    pbp = measure_alignment(mlp("pbp"), half_squared_error, x, t, pseudo_backprop=True)
    assert set(keyed(pbp, "angle_dh_pbp")) == {"2", "4"}
    assert max(keyed(pbp, "angle_dh_pbp").values()) < 1e-6
    fa = measure_alignment(mlp("fa"), half_squared_error, x, t, pseudo_backprop=True)
    assert min(keyed(fa, "angle_dh_pbp").values()) > 10.0
    assert not keyed(measure_alignment(mlp("pbp"), half_squared_error, x, t), "angle_dh_pbp")  # off by default


def test_pbp_angle_is_taken_before_an_in_place_nonlinearity():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 7), nn.ReLU(inplace=True),
                          nn.Linear(7, 3)).double()
    values = measure_alignment(fbalign.convert(model, "pbp"), half_squared_error,
                               torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64),
                               pseudo_backprop=True)
    assert max(keyed(values, "angle_dh_pbp").values()) < 1e-6


def test_two_layer_linear_net_matches_hand_computation():
    """y = W h, h = W0 x, e = y* − y: Δh = B e, Δh_BP = Wᵀe, Δh_PBP = W⁺e, ΔW0 ∝ Σ Δh xᵀ (Lillicrap's notation)."""
    torch.manual_seed(3)
    model = fbalign.convert(nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 3, bias=False)).double(),
                            "fa", scale=0.5, seed=2)
    x, t = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    values = measure_alignment(model, half_squared_error, x, t, pseudo_backprop=True)

    w0, w, b = model[0].weight.detach(), model[1].weight.detach(), model[1].feedback.T
    e = t - x @ w0.T @ w.T
    dh, dh_bp, dh_pbp = e @ b.T, e @ w, e @ torch.linalg.pinv(w).T

    def mean_angle(u, v):
        return sum(math.degrees(math.acos(float(p @ q / (p.norm() * q.norm())))) for p, q in zip(u, v)) / len(u)

    assert values["angle_dh_bp/1"] == pytest.approx(mean_angle(dh, dh_bp), abs=1e-9)
    assert values["angle_dh_pbp/1"] == pytest.approx(mean_angle(dh, dh_pbp), abs=1e-9)
    eWBe = torch.einsum("ni,ij,jk,nk->n", e, w, b, e)
    assert values["frac_agree_dh_bp/1"] == pytest.approx(float((eWBe > 0).double().mean()), abs=1e-12)
    assert 0 < values["frac_agree_dh_bp/1"] < 1  # this case has both signs, so the count is really checked
    assert values["angle_b_wt/1"] == pytest.approx(math.degrees(math.acos(float(
        (b * w.T).sum() / (b.norm() * w.norm())))), abs=1e-9)
    assert values["norm_ratio_b_w/1"] == pytest.approx(float(b.norm() / w.norm()), rel=1e-12)
    assert values["angle_grad_bp/0.weight"] == pytest.approx(float(angle(dh.T @ x, dh_bp.T @ x)), abs=1e-9)
    assert values["angle_grad_bp/1.weight"] == pytest.approx(0.0, abs=1e-6)
    assert values["loss"] == pytest.approx(float(0.5 * e.square().sum(1).mean()), rel=1e-12)
    assert values["nse"] == pytest.approx(float(nse(t - e, t)), rel=1e-12)


def test_deep_tanh_net_matches_hand_computed_feedback_alignment_chain():
    """Lillicrap's deep FA: Δh1 = B2 e and Δh0 = B1((B2 e)∘h1′), against backprop's W-chain."""
    model = mlp("fa", init="gaussian", scale=0.4)
    x, t = torch.randn(11, 6, dtype=torch.float64), torch.randn(11, 3, dtype=torch.float64)
    values = measure_alignment(model, half_squared_error, x, t)

    l0, l1, l2 = model[0], model[2], model[4]
    a0 = x @ l0.weight.T + l0.bias
    a1 = torch.tanh(a0) @ l1.weight.T + l1.bias
    e = (t - torch.tanh(a1) @ l2.weight.T - l2.bias).detach()
    slope1 = 1 - torch.tanh(a1).detach() ** 2
    dh1, dh1_bp = e @ l2.feedback, e @ l2.weight.detach()
    dh0, dh0_bp = (dh1 * slope1) @ l1.feedback, (dh1_bp * slope1) @ l1.weight.detach()
    assert values["angle_dh_bp/4"] == pytest.approx(example_angles(dh1, dh1_bp).mean().item(), abs=1e-9)
    assert values["angle_dh_bp/2"] == pytest.approx(example_angles(dh0, dh0_bp).mean().item(), abs=1e-9)
    assert 20 < values["angle_dh_bp/2"] < 160  # a random chain, far from both 0 and the 4th layer's value
    assert values["angle_dh_bp/2"] != pytest.approx(values["angle_dh_bp/4"], abs=1.0)


def test_conv_net_parameter_angles_match_two_separate_backward_passes():
    model = cnn("fa")
    x, y = torch.randn(9, 2, 7, 7, dtype=torch.float64), torch.randint(0, 3, (9,))
    values = measure_alignment(model, nn.functional.cross_entropy, x, y, pseudo_backprop=True)

    rule_model, bp_model = copy.deepcopy(model), copy.deepcopy(model)
    nn.functional.cross_entropy(rule_model(x), y).backward()
    with fbalign.exact_backprop(bp_model):
        nn.functional.cross_entropy(bp_model(x), y).backward()
    for (name, p), q in zip(rule_model.named_parameters(), bp_model.parameters()):
        assert values[f"angle_grad_bp/{name}"] == pytest.approx(angle(p.grad, q.grad).item(), abs=1e-9), name
    assert values["angle_grad_bp/0.weight"] > 1.0  # below FA layers the update direction really differs
    assert values["angle_grad_bp/7.weight"] == pytest.approx(0.0, abs=1e-9)  # the top layer learns exactly
    assert "angle_dh_pbp/2" not in values and "angle_dh_pbp/7" in values  # pseudo-inverse: Linear layers only
    assert {"angle_b_wt/0", "angle_b_wt/2", "angle_dh_bp/2"} <= set(values)


def test_direct_feedback_alignment_matches_hand_computation_and_has_no_b_w_angle_below_the_source():
    """Nøkland's DFA: every hidden layer's input receives e·B_l straight from the output error e; backprop's goes
    down the W-chain. Layer '0' (6→3) has a B_l of W's shape (3 outputs = 3 units of error), yet no ∡(B, Wᵀ)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model = fbalign.convert(model, "dfa", seed=0)
    x, t = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    values = measure_alignment(model, half_squared_error, x, t)

    l0, l2, l4 = model[0], model[2], model[4]
    h0 = torch.tanh(x @ l0.weight.T + l0.bias)
    h1 = torch.tanh(h0 @ l2.weight.T + l2.bias)
    e = (t - h1 @ l4.weight.T - l4.bias).detach()
    dh1, dh1_bp = e @ l4.direct_feedback, e @ l4.weight.detach()
    dh0 = e @ l2.direct_feedback
    dh0_bp = (dh1_bp * (1 - h1.detach() ** 2)) @ l2.weight.detach()
    assert values["angle_dh_bp/4"] == pytest.approx(example_angles(dh1, dh1_bp).mean().item(), abs=1e-9)
    assert values["angle_dh_bp/2"] == pytest.approx(example_angles(dh0, dh0_bp).mean().item(), abs=1e-9)
    assert l0.direct_feedback.shape == l0.weight.shape
    assert set(keyed(values, "angle_b_wt")) == {"4"}  # the error source's B is a feedback matrix like fa's
    assert values["angle_b_wt/4"] == pytest.approx(angle(l4.direct_feedback, l4.weight).item(), abs=1e-9)


def regression_task(rule: str, **options):
    """A tanh student learning a random tanh teacher: targets in output space, so NSE is defined."""
    torch.manual_seed(2)
    teacher = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    x = torch.randn(256, 6, dtype=torch.float64)
    with torch.no_grad():
        t = teacher(x)
    student = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    return fbalign.convert(student, rule, seed=0, **options), x, t


def test_kolen_pollack_feedback_comes_to_mirror_the_weights(tmp_path):
    model, x, t = regression_task("kp", decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with AlignmentRecorder(model, half_squared_error, every=40, path=tmp_path / "kp.jsonl") as recorder:
        for step in range(121):
            recorder.record(step, x, t)
            optimizer.zero_grad()
            half_squared_error(model(x), t).backward()
            optimizer.step()
    first, last = load_records(tmp_path / "kp.jsonl")[::3]
    for layer in ("0", "2", "4"):
        assert first[f"angle_b_wt/{layer}"] > 60.0 and last[f"angle_b_wt/{layer}"] < 5.0
    for layer in ("2", "4"):
        assert last[f"angle_dh_bp/{layer}"] < 5.0 < first[f"angle_dh_bp/{layer}"]
    assert last["nse"] < first["nse"]


def test_weight_mirrors_align_b_in_a_mirror_phase():
    model, x, t = regression_task("wm")
    before = measure_alignment(model, half_squared_error, x, t)
    fbalign.mirror(model, steps=300, batch_size=256)
    after = measure_alignment(model, half_squared_error, x, t)
    for layer in ("0", "2", "4"):
        assert before[f"angle_b_wt/{layer}"] > 60.0 and after[f"angle_b_wt/{layer}"] < 10.0
    assert after["angle_dh_bp/2"] < 10.0 < before["angle_dh_bp/2"]


def test_shallow_sends_nothing_down_so_angles_below_are_undefined():
    values = measure_alignment(mlp("shallow"), half_squared_error, torch.randn(8, 6, dtype=torch.float64),
                               torch.randn(8, 3, dtype=torch.float64))
    assert all(math.isnan(v) for v in keyed(values, "angle_dh_bp").values())
    assert set(keyed(values, "frac_agree_dh_bp").values()) == {0.0}
    assert math.isnan(values["angle_grad_bp/0.weight"])
    assert values["angle_grad_bp/4.weight"] == 0.0
    assert not keyed(values, "angle_b_wt")


def test_a_layer_called_twice_counts_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.shared, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.inp(x)))))))

    x, t = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    bp = measure_alignment(fbalign.convert(Twice().double(), "backprop"), half_squared_error, x, t)
    assert bp["angle_dh_bp/shared"] == 0.0
    fa = measure_alignment(fbalign.convert(Twice().double(), "fa", seed=0), half_squared_error, x, t)
    assert 0.0 < fa["angle_dh_bp/shared"] < 180.0


def test_clear_errors_for_unconverted_models_and_non_scalar_losses():
    x, t = torch.randn(4, 6), torch.randn(4, 3)
    with pytest.raises(ValueError, match="no fbalign layers.*convert"):
        measure_alignment(nn.Sequential(nn.Linear(6, 3)), half_squared_error, x, t)
    with pytest.raises(ValueError, match="scalar training loss.*reduction"):
        measure_alignment(mlp("fa", dtype=torch.float32), lambda y, t: (y - t).square(), x, t)


def test_measuring_works_inside_no_grad():
    model = mlp("fa")
    with torch.no_grad():
        values = measure_alignment(model, half_squared_error, torch.randn(5, 6, dtype=torch.float64),
                                   torch.randn(5, 3, dtype=torch.float64))
    assert 0 < values["angle_dh_bp/4"] < 180


# --- measuring must not change training -------------------------------------------------------------------------

def noisy_mlp(rule: str) -> nn.Module:
    """Dropout and batch norm (random draws and running statistics) around fbalign layers."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 12),
                          nn.Tanh(), nn.Dropout(0.2), nn.Linear(12, 3))
    return fbalign.convert(model, rule, **uses_seed(rule))


def noisy_cnn(rule: str) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout2d(0.2),
                          nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    return fbalign.convert(model, rule, **uses_seed(rule))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recorder: AlignmentRecorder | None, steps: int = 6,
          inside_step: bool = False):
    """SGD with momentum; batches drawn from the global RNG, which also drives dropout and brsf. The recorder
    measures before each step (``record``) or on the step's own forward/backward (``inside_step``)."""
    torch.manual_seed(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)  # decay: kp's λ
    model.train()
    for step in range(steps):
        idx = torch.randperm(len(x))[:16]
        if recorder is not None and not inside_step:
            grads_before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
            recorder.record(step, x[idx], y[idx])
            for p, before in zip(model.parameters(), grads_before):
                assert same(p.grad, before), "record() touched .grad"
        with recorder.step(step, x[idx], y[idx]) if inside_step else contextlib.nullcontext():
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        if step % 2 == 0:  # accumulate gradients over two steps: measurements run between accumulated backwards
            optimizer.step()
            optimizer.zero_grad()
    return model, optimizer, torch.get_rng_state()


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def assert_same_training(make, rule: str, x: torch.Tensor, y: torch.Tensor, tmp_path, inside_step: bool = False
                         ) -> dict:
    plain, plain_opt, plain_rng = train(make(rule), x, y, None)
    with AlignmentRecorder(make(rule), nn.functional.cross_entropy, every=1, path=tmp_path / "a.jsonl") as rec:
        measured, measured_opt, measured_rng = train(rec.model, x, y, rec, inside_step=inside_step)
    assert torch.equal(plain_rng, measured_rng)
    for (name, a), b in zip(plain.state_dict().items(), measured.state_dict().values()):
        assert torch.equal(a, b), f"{rule}: {name} differs after training with measurements"
    for a, b in zip(plain.parameters(), measured.parameters()):
        assert same(a.grad, b.grad)
        assert same(plain_opt.state[a].get("momentum_buffer"), measured_opt.state[b].get("momentum_buffer"))
    records = load_records(tmp_path / "a.jsonl")
    assert [r["step"] for r in records] == list(range(6))
    return records[-1]


@pytest.mark.parametrize("inside_step", [False, True], ids=["record", "step"])
@pytest.mark.parametrize("rule", rules.available())
def test_measuring_leaves_training_bit_for_bit_unchanged(rule, inside_step, tmp_path):
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    last = assert_same_training(noisy_mlp, rule, x, y, tmp_path, inside_step)
    angles = [v for k, v in last.items() if k.startswith("angle_")]
    assert all(0.0 <= v <= 180.0 for v in angles if not math.isnan(v))
    if rule == "backprop":  # both passes drew the same dropout masks, so they agree exactly
        assert set(angles) == {0.0}
    if rule != "shallow":
        assert all(not math.isnan(v) for k, v in last.items() if k.startswith("angle_dh_bp/"))


@pytest.mark.parametrize("inside_step", [False, True], ids=["record", "step"])
@pytest.mark.parametrize("rule", ["fa", "brsf", "dfa", "kp"])
def test_measuring_a_conv_net_leaves_training_bit_for_bit_unchanged(rule, inside_step, tmp_path):
    assert_same_training(noisy_cnn, rule, torch.randn(64, 2, 7, 7), torch.randint(0, 3, (64,)), tmp_path,
                         inside_step)


def test_the_bit_for_bit_check_catches_a_measuring_hook_that_alters_a_gradient(monkeypatch, tmp_path):
    keep = alignment_module._keep

    def altering(found, index, grad):
        keep(found, index, grad)
        return grad * (1 + 1e-6)

    monkeypatch.setattr(alignment_module, "_keep", altering)
    with pytest.raises(AssertionError, match="differs after training with measurements"):
        assert_same_training(noisy_mlp, "fa", torch.randn(64, 6), torch.randint(0, 3, (64,)), tmp_path,
                             inside_step=True)


@pytest.mark.parametrize("make", [noisy_mlp, noisy_cnn])
@pytest.mark.parametrize("rule", rules.available())
def test_measuring_inside_the_step_gives_what_measure_alignment_gives(make, rule):
    """The step's own pass is the rule's pass measure_alignment runs (same random draws, same buffers), even with
    gradients already accumulated in .grad; pseudo-backprop angles and reference scores included."""
    if make is noisy_cnn and rule == "pbp":
        pytest.skip("pbp is defined for Linear layers only")
    model = make(rule)
    x = torch.randn(16, 6) if make is noisy_mlp else torch.randn(16, 2, 7, 7)
    y = torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()  # .grad holds something already
    reference = (x[:8] + 1, y[:8])
    expected = measure_alignment(model, nn.functional.cross_entropy, x, y, reference=reference,
                                 pseudo_backprop=True)
    with measure_step(model, nn.functional.cross_entropy, x, y, reference=reference, pseudo_backprop=True) as got:
        assert got == {}
        nn.functional.cross_entropy(model(x), y).backward()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True), key


class Drift(nn.Module):
    """Scales its input by a buffer that it rolls in every training forward (state a measurement must rewind)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.arange(1.0, n + 1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * self.scale
        if self.training:
            self.scale = self.scale.roll(1)  # a new tensor: autograd saved the old one
        return out


def test_the_reference_pass_starts_from_the_buffers_the_training_pass_saw():
    torch.manual_seed(0)
    model = fbalign.convert(nn.Sequential(nn.Linear(4, 5), Drift(5), nn.Tanh(), nn.Linear(5, 3)).double(),
                            "backprop")
    x, t = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    with measure_step(model, half_squared_error, x, t) as got:
        half_squared_error(model(x), t).backward()
    assert set(keyed(got, "angle_grad_bp").values()) == {0.0}  # backprop against backprop, from one state
    assert model[1].scale.tolist() == [5.0, 1.0, 2.0, 3.0, 4.0]  # rolled once, by the training pass only


def test_measure_step_says_what_the_block_did_wrong():
    model = mlp("fa")
    x, t = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"call optimizer.step\(\) after the with-block"):
        with measure_step(model, half_squared_error, x, t):
            half_squared_error(model(x), t).backward()
            optimizer.step()
    with pytest.raises(ValueError, match=r"run loss.backward\(\) inside the with-block"):
        with measure_step(model, half_squared_error, x, t):
            loss = half_squared_error(model(x), t)
    loss.backward()  # the hooks are gone: a late backward records nothing and changes nothing
    with pytest.raises(ValueError, match="the model ran 2 times"):
        with measure_step(model, half_squared_error, x, t):
            (half_squared_error(model(x), t) + half_squared_error(model(x), t)).backward()
    with pytest.raises(RuntimeError, match="boom"), measure_step(model, half_squared_error, x, t) as got:
        raise RuntimeError("boom")
    assert got == {}
    assert all(not layer._forward_hooks and not layer.weight._backward_hooks for _, layer in
               fbalign.feedback_layers(model))


# --- Lillicrap et al.'s linear task ------------------------------------------------------------------------------

def test_feedback_alignment_on_the_linear_task_aligns_within_a_few_thousand_examples(tmp_path):
    """30-20-10 linear net, T ~ U[-1,1], W0, W ~ U[-0.01,0.01], B ~ U[-0.5,0.5], x ~ N(0,I), L = ½‖Tx − y‖², one
    example per SGD step at learning rate 1e-3. Δh angles are averaged over 256 fixed probe examples."""
    g = torch.Generator().manual_seed(0)
    target_map = torch.rand(10, 30, generator=g) * 2 - 1
    model = nn.Sequential(nn.Linear(30, 20, bias=False), nn.Linear(20, 10, bias=False))
    with torch.no_grad():
        for layer in model:
            layer.weight.uniform_(-0.01, 0.01, generator=g)
    model = fbalign.convert(model, "fa", scale=0.5, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    probe = torch.randn(256, 30, generator=g)
    probe_targets = probe @ target_map.T
    held_out = torch.randn(1000, 30, generator=g)
    with AlignmentRecorder(model, half_squared_error, every=250, path=tmp_path / "linear.jsonl",
                           reference=(held_out, held_out @ target_map.T), pseudo_backprop=True) as recorder:
        for step in range(2001):
            recorder.record(step, probe, probe_targets)
            x = torch.randn(1, 30, generator=g)
            optimizer.zero_grad()
            half_squared_error(model(x), x @ target_map.T).backward()
            optimizer.step()
    records = load_records(tmp_path / "linear.jsonl")
    print("\nexamples  ∡(Δh,Δh_BP)  frac eᵀWBe>0  ∡(Δh,W⁺e)  NSE (held out)")  # shown by pytest -s
    for r in records:
        print(f"{r['step']:8d}  {r['angle_dh_bp/1']:11.1f}  {r['frac_agree_dh_bp/1']:12.3f}  "
              f"{r['angle_dh_pbp/1']:9.1f}  {r['nse_reference']:.2e}")
    angles = [r["angle_dh_bp/1"] for r in records]
    assert 80.0 < angles[0] < 100.0  # random B against a tiny random W: no alignment
    assert max(angles[2:]) < 45.0  # from 500 examples on, well below 90°
    assert 0.2 < records[0]["frac_agree_dh_bp/1"] < 0.8
    assert records[-1]["frac_agree_dh_bp/1"] == 1.0  # eᵀ W B e > 0 for every probe example
    assert records[-1]["angle_dh_pbp/1"] < records[0]["angle_dh_pbp/1"] - 30  # W becomes B's local pseudo-inverse
    assert records[0]["nse_reference"] == pytest.approx(1.0, abs=0.01)
    assert records[-1]["nse_reference"] < 1e-2
