"""The Lillicrap et al. (2016) reproduction (fbalign.experiments.lillicrap2016) at tiny scale: Fig. 1, 2d, 3, 4 and
the theory section run end to end through ``reproduce`` and give the paper's qualitative results, and the checks
behind Fig. 2d's deep FA and the theory section can fail."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

import fbalign
from fbalign.data import linear_teacher
from fbalign.experiments import common
from fbalign.experiments import lillicrap2016 as lil


def _reproduce(tmp_path, name: str, seeds: int | None = None) -> tuple[dict, str]:
    """Run one experiment at the tiny scale (each scale table's ``tiny`` row); its results as saved and the report."""
    ctx = common.Context(paper="lillicrap2016", out_dir=tmp_path / "out", scale="tiny", seeds=seeds, progress=False)
    common.reproduce(lil, ctx, only=[name], command=f"test {name}")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["experiments"][name]
    assert (tmp_path / "out" / saved["figure"]).read_bytes()[:4] == b"\x89PNG"
    return saved, (tmp_path / "out" / "report.md").read_text()


@pytest.fixture(autouse=True)
def _one_thread():
    with common.torch_threads(1):
        yield


@pytest.fixture
def teacher_and_feedback() -> tuple[torch.Tensor, torch.Tensor]:
    teacher = linear_teacher(n_train=1, n_test=1, seed=lil.TASK_SEED, dtype=torch.float64).extras["T"]
    feedback = lil.linear_pair(_linear_student("fa"))[1].feedback.T.clone()
    return teacher, feedback


def _linear_student(algorithm: str, init_range: float = lil.WEIGHT_RANGE, seed: int = 0) -> torch.nn.Module:
    return lil.with_rule(lil.student((30, 20, 10), "linear", bias=False, seed=seed, init_range=init_range),
                         algorithm, seed)


# ------------------------------------------------------------------------------------------------ Fig. 1, 3

def test_fig1_tiny(tmp_path):
    found, report = _reproduce(tmp_path, "fig1")
    final = found["final_nse"]
    assert found["settings"]["examples"] == 300 and found["curves"]["bp"]["examples"][-1] == 300
    assert all(t["eta"] in lil.ETA_GRID for t in found["tuning"].values())
    # The gradient rules learn where shallow learning (tiny W0 it cannot change) hardly does.
    assert final["shallow"] > 0.5 and max(final["bp"], final["fa"]) < 0.2 * final["shallow"]
    assert found["angle"]["first_10"] > 60 and found["angle"]["last_10_percent"] < found["angle"]["first_10"] - 20
    assert "## Fig. 1d,e" in report and "| backprop, final NSE |" in report
    verdicts = {c.quantity: c.verdict for c in lil.claims_fig1(found)}
    assert verdicts["shallow learning, final NSE"] and verdicts["∡(Δh_FA, Δh_BP), last 10% of examples (°)"]
    assert verdicts["examples to NSE 1e-8, BP / FA"] is None
    # Figures from results alone: the figure and the report come back, the same, with nothing trained.
    out = tmp_path / "out"
    (out / "fig1.png").unlink()
    common.replot(lil, common.Context(paper="lillicrap2016", out_dir=out, progress=False))
    assert (out / "fig1.png").read_bytes()[:4] == b"\x89PNG" and (out / "report.md").read_text() == report


def test_fig3_flow_field_is_fas_expected_update(tmp_path):
    found, report = _reproduce(tmp_path, "fig3")
    grid = np.asarray(found["grid"])
    w, w0 = np.meshgrid(grid, grid, indexing="ij")  # rows: W, columns: W0
    e = 1 - w * w0
    np.testing.assert_allclose(found["flow_dw0"], e * 1.0, atol=1e-12)  # ΔW0 = B·e with B = 1 (backprop: W·e)
    np.testing.assert_allclose(found["flow_dw"], e * w0, atol=1e-12)  # ΔW = e·W0
    assert found["end_on_stable_branch"]
    np.testing.assert_allclose(found["end"], [2 ** (1 / 3), 2 ** (-1 / 3)], atol=0.02)
    assert found["invariant_max_drift"] < 0.02
    assert "## Fig. 3" in report
    assert [c.verdict for c in lil.claims_fig3(found)] == [True, True, None]
    broken = dict(found, end=[-1.0, -1.0], end_on_stable_branch=False)  # the claims can fail
    assert [c.verdict for c in lil.claims_fig3(broken)] == [False, False, None]


# ------------------------------------------------------------------------------------------------ Fig. 2d

def test_fig2d_tiny(tmp_path):
    found, report = _reproduce(tmp_path, "fig2d")
    assert set(found["final_nse"]) == {"shallow-3", "bp-3", "fa-3", "bp-4", "fa-4"}
    for name, curve in found["curves"].items():
        assert np.asarray(curve["nse"]).shape == (2, 5) and curve["examples"][-1] == 400
        assert np.isfinite(curve["nse"]).all()
        assert found["tuning"][name]["eta"] in (1e-3, 1e-2, 1e-1)
    for name in ("bp-3", "fa-3", "bp-4", "fa-4"):  # every gradient rule learns something
        assert np.mean(found["curves"][name]["nse"], axis=0)[-1] < 0.8 * np.mean(found["curves"][name]["nse"],
                                                                                 axis=0)[0]
    for test in found["depth"].values():
        assert 0 <= test["p_log"] <= 1 and 0 <= test["p_nse"] <= 1 and test["geometric_ratio"] > 0
    assert found["deep_fa_formula_error"] < 1e-12
    assert "## Fig. 2d" in report and "Welch t-test 4 vs 3 layers" in report


def test_deep_fa_sends_each_layers_error_through_its_own_b():
    """Δh1 = B2·e and Δh0 = B1·((B2·e)∘h1′) exactly; the same check on backprop's pass fails."""
    model = lil.with_rule(lil.student(lil.FIG2D_WIDTHS[4], "tanh", bias=True, seed=3), "fa", 3)
    x = torch.randn(32, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(32, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert lil.deep_fa_error(model, x, y) < 1e-12
    with fbalign.exact_backprop(model):
        assert lil.deep_fa_error(model, x, y) > 0.1


def test_depth_test_is_welchs_on_log_nse():
    three, four = [1e-2, 2.5e-2, 1.4e-2, 3e-2], [1e-3, 4e-3, 1.5e-3]
    found = lil.depth_test(three, four)
    expected = stats.ttest_ind(np.log10(four), np.log10(three), equal_var=False)
    assert found["p_log"] == pytest.approx(expected.pvalue) and found["t_log"] == pytest.approx(expected.statistic)
    assert found["p_nse"] == pytest.approx(stats.ttest_ind(four, three, equal_var=False).pvalue)
    assert found["deeper_wins"] and found["t_log"] < 0
    assert found["geometric_ratio"] == pytest.approx(10 ** (np.log10(four).mean() - np.log10(three).mean()))
    single = lil.depth_test([0.1], [0.2])
    assert math.isnan(single["p_log"]) and not single["deeper_wins"]


# ------------------------------------------------------------------------------------------------ Fig. 4

def test_fig4_tiny(tmp_path):
    found, report = _reproduce(tmp_path, "fig4", seeds=1)
    small, large = found["omegas"]
    assert small["omega"] == 0.0001 and np.asarray(small["angle_pbp"]).shape == (1, 7)
    # Before learning the updates are unrelated (≈ 90°); the pseudo-inverse angle is smaller from a small start.
    assert small["angle_bp"][0][0] > 70 and small["angle_pbp"][0][0] > 70
    assert small["angle_pbp_late"] < large["angle_pbp_late"] - 10
    assert small["nse"][0][-1] < 0.3 * small["nse"][0][0]
    assert "## Fig. 4" in report


# ------------------------------------------------------------------------------------------------ theory

def test_fa_conserves_its_invariant_and_backprop_does_not(teacher_and_feedback):
    teacher, feedback = teacher_and_feedback
    fa = [lil.euler_path(_linear_student("fa"), teacher, feedback, eta, round(1.0 / eta)) for eta in (0.02, 0.01)]
    bp = [lil.euler_path(_linear_student("bp"), teacher, feedback, eta, round(1.0 / eta)) for eta in (0.02, 0.01)]
    # FA: halving the step halves the drift of B·W + Wᵀ·Bᵀ − A·Aᵀ, and B·ΔW = ΔA·Aᵀ at every step.
    assert fa[0]["drift_fa"] / fa[1]["drift_fa"] == pytest.approx(2.0, rel=0.05)
    assert max(p["link_residual"] for p in fa) < 1e-12
    # Backprop's updates do not conserve it (the drift stays put as the step shrinks) but conserve Wᵀ·W − A·Aᵀ.
    assert bp[0]["drift_fa"] / bp[1]["drift_fa"] == pytest.approx(1.0, rel=0.1)
    assert bp[1]["drift_fa"] > 10 * fa[1]["drift_fa"] and min(p["link_residual"] for p in bp) > 0.1
    assert bp[0]["drift_bp"] / bp[1]["drift_bp"] == pytest.approx(2.0, rel=0.1)


def test_high_order_integration_conserves_to_rounding(teacher_and_feedback):
    teacher, feedback = teacher_and_feedback
    found = lil.integrate_path(_linear_student("fa"), teacher, feedback, duration=1.0, rtol=1e-11)
    assert found["drift_fa"] / found["scale"] < 1e-9 and found["nse"] < 0.5


def test_one_pair_from_zero_fa_is_a_positive_multiple_of_pseudo_backprop():
    data = linear_teacher(n_train=1, n_test=1, seed=lil.TASK_SEED, dtype=torch.float64)
    x, y = data.train_x[:1], data.train_y[:1]
    from_zero = lil.single_pair_path(_linear_student("fa", 0.0), x, y, eta=2e-4, steps=150, metric_every=50)
    assert len(from_zero["step"]) == 148  # W = 0 until the second step
    assert max(from_zero["sine"]) < 1e-12 and min(from_zero["ratio"]) > 0
    assert from_zero["relative_error"][-1] < 0.1 and max(from_zero["metric_angle"]) < 1e-5
    # The check can fail: from a random start the two updates are far apart.
    random_start = lil.single_pair_path(_linear_student("fa", 0.1), x, y, eta=2e-4, steps=20, metric_every=50)
    assert max(random_start["sine"]) > 0.1


def test_from_zero_on_all_inputs_fa_is_within_90_degrees_of_pseudo_backprop_but_not_parallel(teacher_and_feedback):
    teacher, feedback = teacher_and_feedback
    found = lil.euler_path(_linear_student("fa", 0.0), teacher, feedback, 0.01, 200, pseudo_backprop=True)
    angles = np.asarray(found["angle_pbp"])
    assert angles.max() < 90 and angles[0] > 10 and angles[-1] < angles[0]


def test_theory_tiny(tmp_path):
    found, report = _reproduce(tmp_path, "theory")
    assert found["slopes"]["fa_invariant_fa_path"] == pytest.approx(1.0, abs=0.1)
    assert abs(found["slopes"]["fa_invariant_bp_path"]) < 0.2
    assert found["single_pair"]["max_scaled_sine"] < 100 * np.finfo(np.float64).eps
    assert found["single_pair"]["min_ratio"] > 0 and found["single_pair"]["control_max_sine"] > 1e-2
    assert "## Theory" in report and "✗" not in report.split("## Theory")[1].split("**What the theorem")[0]
    assert all(c.verdict for c in lil.claims_theory(found))  # every claim has a verdict, and holds
    assert [c.quantity for c in lil.claims({"theory": found})] == [c.quantity for c in lil.claims_theory(found)]


# ------------------------------------------------------------------------------------------------ ensembles

def test_ensemble_runs_train_like_separate_runs_and_a_diverged_member_stops_alone():
    from fbalign.data import nonlinear_teacher
    from fbalign.experiments import toolkit

    data = toolkit.stream_task(nonlinear_teacher(n_train=300, n_test=200, seed=lil.TASK_SEED, dtype=torch.float64),
                               200)

    def make(seed):
        return lil.with_rule(lil.student(lil.FIG2D_WIDTHS[4], "tanh", bias=True, seed=seed), "fa", seed)

    etas = [0.01, 0.03, 30.0]  # the last one diverges
    together = toolkit.train_online_ensemble([make(s) for s in range(3)], data, examples=200, etas=etas,
                                             evaluations=4)
    for seed, eta in enumerate(etas[:2]):
        alone = toolkit.train_online(make(seed), "fa", data, examples=200, eta=eta, evaluations=4)
        assert together[seed]["diverged"] is None and together[seed]["examples"] == alone["examples"]
        np.testing.assert_allclose(together[seed]["nse"], alone["nse"], rtol=1e-12)
    with pytest.raises(fbalign.train.DivergedError):
        toolkit.train_online(make(2), "fa", data, examples=200, eta=etas[2], evaluations=4)
    assert together[2]["diverged"] and math.isnan(together[2]["nse"][-1])
    # A grid tuned as one ensemble picks what one run at a time picks.
    grid = (1e-3, 1e-2, 1e-1, 10.0)
    one_by_one = toolkit.tune_eta(lambda: make(0), "fa", data, examples=100, grid=grid)
    at_once = toolkit.tune_eta(lambda: make(0), "fa", data, examples=100, grid=grid, ensemble=True)
    assert at_once["eta"] == one_by_one["eta"] and math.isinf(at_once["scores"][-1])
    np.testing.assert_allclose(at_once["scores"][:3], one_by_one["scores"][:3], rtol=1e-12)


def test_pm_summary_and_welch():
    from fbalign.experiments import toolkit

    assert toolkit.pm([1.0, 3.0]) == "2 ± 1.4" and toolkit.pm([2.0]) == "2"
    assert toolkit.pm([1.0, 3.0, math.nan]) == "2 ± 1.4 (1/3 diverged)"
    assert toolkit.summary([1.0, math.nan])["n"] == 1
    found = toolkit.welch([1.0, 2.0, 3.5], [4.0, 6.0, 5.5])
    expected = stats.ttest_ind([1.0, 2.0, 3.5], [4.0, 6.0, 5.5], equal_var=False)
    assert found["p"] == pytest.approx(expected.pvalue) and found["t"] == pytest.approx(expected.statistic)
    assert math.isnan(toolkit.welch([1.0], [2.0, 3.0])["p"])
    best = toolkit.pick_best([1, 2, 3], [math.nan, 0.5, math.inf])
    assert best["value"] == 2 and not best["at_grid_edge"]
