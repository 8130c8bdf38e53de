"""fbalign reproduce open-questions: every experiment at a tiny scale (scikit-learn's digits for the image task,
short teacher streams), with properties that must hold at any scale."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F

import fbalign
import fbalign.models
from fbalign.experiments import PAPERS, common
from fbalign.experiments import open_questions as oq
from fbalign.experiments.open_questions import nonlinear_feedback


def _context(tmp_path, **kw):
    return common.Context(paper="open-questions", progress=False, **{"out_dir": tmp_path / "out", "scale": "tiny",
                                                                     **kw})


def test_registered():
    assert PAPERS["open-questions"] == "fbalign.experiments.open_questions"
    assert [e.name for e in oq.EXPERIMENTS] == ["fixed-b", "nonlinear-feedback", "plastic", "depth"]


def test_sizes_take_seeds_from_the_command_line(tmp_path):
    assert oq.sizes(oq.DEPTH_SCALE, _context(tmp_path, scale="quick"))["seeds"] == oq.DEPTH_SCALE["quick"]["seeds"]
    assert oq.sizes(oq.DEPTH_SCALE, _context(tmp_path, scale="full", seeds=7))["seeds"] == 7


def _tiny_mlp(seed=0):
    return oq.student((12, 9, 7, 5), "tanh", bias=True, seed=seed, dtype=torch.float32)


@pytest.mark.parametrize("kind", oq.FIXED_KINDS)
def test_every_kind_of_fixed_b_has_the_asked_rms(kind):
    model = oq.fixed_feedback(_tiny_mlp(), kind, seed=3, rms=0.2, multiplier=3.0)
    for _, layer in fbalign.feedback_layers(model):
        assert isinstance(layer.rule, fbalign.rules.FA)
        assert float(layer.feedback.square().mean().sqrt()) == pytest.approx(0.6, rel=1e-5)
    if kind == "sparse":
        zeros = torch.cat([(layer.feedback == 0).reshape(-1) for _, layer in fbalign.feedback_layers(model)])
        assert 0.35 < float(zeros.float().mean()) < 0.65
    if kind == "W0":
        for _, layer in fbalign.feedback_layers(model):
            assert float(fbalign.metrics.angle(layer.feedback, layer.weight.detach())) < 1e-3
    with pytest.raises(ValueError, match="unknown kind"):
        oq.fixed_feedback(_tiny_mlp(), "lognormal", seed=0)


def test_sign_concordant_b_stays_fixed_and_concordant_with_w0(tmp_path, one_thread):
    """sign(W0): B agrees in sign with the initial weights everywhere, has one magnitude per layer, and does not
    follow W while it learns (fbalign's usf would)."""
    data = oq.image_data(_context(tmp_path), oq.FIXED_B_SCALE["tiny"])
    model = oq.fixed_feedback(oq.image_student(data, [16, 16], "tanh", 0), "sign(W0)", seed=0)
    layers = fbalign.feedback_layers(model)
    w0 = [layer.weight.detach().clone() for _, layer in layers]
    b0 = [layer.feedback.clone() for _, layer in layers]
    for w, b in zip(w0, b0):
        assert torch.equal(torch.sign(b), torch.sign(w))
        assert torch.allclose(b.abs(), torch.full_like(b, 1.0 / math.sqrt(3.0 * w[0].numel())))
    run = oq.train_image(_context(tmp_path), model, data, tmp_path / "run", lr=0.1, epochs=2, seed=0)
    assert not run["diverged"] and len(run["history"]) == 2
    for (_, layer), w, b in zip(layers, w0, b0):
        assert torch.equal(layer.feedback, b)  # bit for bit: fixed
        assert not torch.equal(layer.weight.detach(), w)  # while W learned
    moved = [float(torch.sign(layer.weight.detach()).ne(torch.sign(w)).float().mean()) for (_, layer), w in
             zip(layers, w0)]
    assert max(moved) > 0  # W's signs drifted from W0's: B is concordant with W0, not with W


@pytest.mark.parametrize("rule", ["fa", "bp"])
def test_nonlinear_path_reaches_the_hidden_layers(rule):
    """With the sign pathway at saturation s, every error arriving below a layer is ±s (or 0)."""
    model = nonlinear_feedback._with_path(_tiny_mlp(), rule, "sign", 1.0, seed=0, reference=0.25, rms=None)
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    arrived = []

    def keep(module, inputs, output):  # returns None: the output is left alone
        inputs[0].register_hook(arrived.append)

    for _, layer in oq.hidden_layers(model):
        layer.register_forward_hook(keep)
    F.cross_entropy(model(x), y).backward()
    assert len(arrived) == 2
    for grad in arrived:
        assert set(grad.abs().unique().tolist()) <= {0.0, 0.25}
    linear = nonlinear_feedback._with_path(_tiny_mlp(), rule, None, None, seed=0, reference=0.25, rms=None)
    assert oq.arriving_error_rms(linear, F.cross_entropy, x, y) > 0


def _reproduce(tmp_path, name):
    """One experiment through reproduce() (run, then plot from the JSON results); its context and results."""
    ctx = _context(tmp_path)
    return ctx, common.reproduce(oq, ctx, [name], command=f"fbalign reproduce open-questions --only {name}")[
        "experiments"][name]


def _check_claims(claims):
    assert claims and all(isinstance(c, common.Claim) and c.verdict in (True, False, None) for c in claims)
    assert all(c.criterion for c in claims)


def test_fixed_b_tiny(tmp_path, one_thread):
    ctx, results = _reproduce(tmp_path, "fixed-b")
    conditions = {"bp", *oq.FIXED_KINDS, "uniform ×0.1"}
    assert set(results["tasks"]) == {"linear", "nonlinear", "image"}
    for task, found in results["tasks"].items():
        assert set(found) == conditions
        for c in found.values():
            assert len(c["final"]) == 2
            rate = c["lr"] if task == "image" else c["eta"]
            assert rate in oq.FIXED_B_SCALE["tiny"]["lr_grid" if task == "image" else "eta_grid"]
        assert set(results["headline"][task]["ranked"]) <= set(oq.FIXED_KINDS)
    assert (ctx.out_dir / results["figure"]).stat().st_size > 10_000
    section = common.Report()
    oq.report_fixed_b(results, section, ctx)
    text = section.markdown()
    assert "sign(W0) − uniform B" in text and "Liao et al. 2016" in text and "![fixed_b](fixed_b.png)" in text
    claims = oq.claims_fixed_b(results)
    _check_claims(claims)
    sparse = next(c for c in claims if c.quantity.startswith("image: sparse"))
    assert sparse.verdict == (results["headline"]["image"]["mean"]["sparse"]
                              - results["headline"]["image"]["mean"]["uniform"] < 1.0)


def test_nonlinear_feedback_tiny(tmp_path, one_thread):
    ctx, results = _reproduce(tmp_path, "nonlinear-feedback")
    names = [name for name, *_ in nonlinear_feedback._path_conditions()]
    assert len(names) == 15 and set(results["teacher"]) == set(results["image"]) == set(names)
    for name in names:
        assert results["step_seconds"][name] > 0 and math.isfinite(results["step_ratio"][name])
        assert results["step_ratio"][name] > 0
    assert results["step_ratio"]["fa linear"] == results["step_ratio"]["bp linear"] == 1.0
    refs = results["settings"]["saturation_reference"]
    assert all(refs[task][rule] > 0 for task in ("teacher", "image") for rule in ("fa", "bp"))
    assert results["cost"]["fa linear"]["teacher_nse_ratio"] == pytest.approx(1.0)
    section = common.Report()
    oq.report_nonlinear_feedback(results, section, ctx)
    assert "step time ÷ linear path" in section.markdown()
    _check_claims(oq.claims_nonlinear_feedback(results))


def test_plastic_tiny(tmp_path, one_thread):
    """kp's B aligns with Wᵀ within the run, wm's turns towards it, fa's (fixed) only as far as W turns to B."""
    ctx, results = _reproduce(tmp_path, "plastic")
    assert set(results["rules"]) == set(oq.PLASTIC_RULES)
    assert set(results["momentum_controls"]) == set(oq.MOMENTUM_CONTROLS)
    assert {c["momentum"] for c in results["rules"].values()} == {oq.PLASTIC_MOMENTUM}
    assert {c["momentum"] for c in results["momentum_controls"].values()} == {oq.IMAGE_MOMENTUM}
    output_layer = results["layers"][-1]
    align = results["alignment"]
    for rule in ("fa", "kp", "wm"):
        records = results["rules"][rule]["records"]
        assert len(records) == 2 and records[0][0]["step"] == 0 and len(records[0]) > 5
        assert all(f"angle_b_wt/{output_layer}" in r for r in records[0])
    for layer in results["layers"]:
        fa, kp, wm = (align[rule][layer] for rule in ("fa", "kp", "wm"))
        assert kp["end"][0] < 20 and all(step is not None for step in kp["steps_to_45"])
        # fa's B is fixed: ∡(B, Wᵀ) falls only as far as W turns towards B (feedback alignment itself)
        assert kp["start"][0] - kp["end"][0] > fa["start"][0] - fa["end"][0] + 30
        assert wm["end"][0] < fa["end"][0] - 5
    assert results["speed"]["by_rule"]["bp"]["gap_to_bp"] == 0.0
    section = common.Report()
    oq.report_plastic(results, section, ctx)
    assert "Akrout et al. 2019" in section.markdown()
    claims = oq.claims_plastic(results)
    _check_claims(claims)
    kp_angle = next(c for c in claims if c.quantity.startswith("kp: ∡(B, Wᵀ)"))
    assert kp_angle.verdict is True  # kp's B aligns (asserted per layer above); fa's fixed B cannot follow


def test_conditions_in_parallel_processes_give_the_serial_numbers(tmp_path, one_thread):
    """The runner's processes give the numbers of a serial run (teacher and image conditions), in job order."""
    size = oq.FIXED_B_SCALE["tiny"]
    conditions = {kind: {"task": "nonlinear", "examples": 200, "prefix": 50,
                         "make": functools.partial(oq.fixed_b_model, task="nonlinear", name=kind, rms=0.3)}
                  for kind in ("uniform", "sign(W0)")}
    conditions[("image", "uniform")] = {  # keys may be any hashable: experiments key (task, name)
        "task": "image", "folder": ("image",),
        "make": functools.partial(oq.fixed_b_model, task="image", name="uniform", hidden=[8])}
    serial = oq.run_conditions(_context(tmp_path, out_dir=tmp_path / "serial"), size, conditions)
    parallel = oq.run_conditions(_context(tmp_path), size, conditions, workers=2)
    assert list(parallel) == list(conditions)
    assert common._to_json(list(parallel.values())) == common._to_json(list(serial.values()))


def test_conditions_start_costliest_first_and_return_in_given_order(tmp_path, monkeypatch):
    """One pool for every condition on the CPU, the longest jobs first (so no worker idles behind one at the end),
    the results keyed and ordered as given."""
    started = []

    def fake_run(function, jobs, **options):
        started.extend(job["name"] for job in jobs)
        return [job["name"] for job in jobs]
    monkeypatch.setattr(oq.shared, "run", fake_run)
    conditions = {("linear", "a"): {"task": "linear", "name": "lin"},
                  ("image", "a"): {"task": "image", "name": "img"},
                  ("nonlinear", "a"): {"task": "nonlinear", "name": "nonlin"},
                  ("image", "wm"): {"task": "image", "name": "wm", "cost": 100.0, "on_device": True}}
    found = oq.run_conditions(_context(tmp_path), oq.FIXED_B_SCALE["tiny"], conditions, workers=2)
    assert started == ["wm", "img", "nonlin", "lin"]
    assert list(found) == list(conditions) and found[("image", "a")] == "img"


@pytest.mark.parametrize("task", ["linear", "nonlinear"])
def test_teacher_condition_as_ensembles_trains_like_one_run_at_a_time(task):
    """The tuning grid and the seeds are each one fbalign.Ensemble; in float64 every member scores and ends as the
    same network trained alone by toolkit.tune_eta and train_online (a member that diverges scores +inf)."""
    from fbalign.experiments.toolkit import train_online, tune_eta

    data = oq.teacher_task(task, 300)

    def make(seed):
        return oq.fixed_b_model(data=data, seed=seed, task=task, name="uniform", rms=oq.LILLICRAP_RMS)

    grid = (1e-3, 1e-2, 1e-1, 10.0)
    together = oq.teacher_condition(make, data, examples=300, prefix=100, batch_size=10, seeds=3, grid=grid)
    alone = tune_eta(lambda: make(0), "rule", data, examples=100, batch_size=10, grid=grid)
    assert together["eta"] == alone["eta"]
    assert together["tuning"]["scores"] == pytest.approx(alone["scores"], rel=1e-9)
    finals = [train_online(make(seed), "rule", data, examples=300, eta=alone["eta"], batch_size=10,
                           evaluations=50)["nse"][-1] for seed in range(3)]
    assert together["final"] == pytest.approx(finals, rel=1e-9)


@pytest.mark.parametrize("name", ["uniform", "bp"])
def test_image_condition_as_ensembles_trains_like_one_run_at_a_time(tmp_path, one_thread, monkeypatch, name):
    """With ensembles on (on a GPU, or ENSEMBLES_ON_CPU) a condition's rate grid and its seeds each train as one
    fbalign.train.train_ensemble: the same rate chosen, the same errors (float32 rounding aside), and a resumed
    run reuses the finished ensembles."""
    size = oq.FIXED_B_SCALE["tiny"]
    data = oq.image_data(_context(tmp_path), size)

    def make(seed):
        return oq.fixed_b_model(data=data, seed=seed, task="image", name=name, hidden=[16])

    def condition(ctx):
        return oq.image_condition(ctx, ctx.out_dir, make, data, epochs=2, tune_epochs=1, seeds=3,
                                  grid=(0.01, 0.1, 0.3))

    alone = condition(_context(tmp_path, out_dir=tmp_path / "alone"))
    monkeypatch.setattr(oq.shared, "ENSEMBLES_ON_CPU", True)
    together = condition(_context(tmp_path))
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"tuning", "seeds"}
    assert together["lr"] == alone["lr"]
    assert together["tuning"]["val_error"] == pytest.approx(alone["tuning"]["val_error"], abs=0.7)  # 1 of 150
    assert together["final"] == pytest.approx(alone["final"], abs=0.3)  # 1 of 360 test images
    # resumed, the finished ensembles' checkpoints give their histories back without a step
    assert common._to_json(condition(_context(tmp_path, resume=True))) == common._to_json(together)


def test_mirror_hook_is_removed_after_training(tmp_path, one_thread):
    data = oq.image_data(_context(tmp_path), oq.PLASTIC_SCALE["tiny"])
    model = oq.plastic_model(data, [8], "wm", 0)
    before = [layer.feedback.clone() for _, layer in fbalign.feedback_layers(model)]
    oq.train_image(_context(tmp_path), model, data, tmp_path / "run", lr=0.1, epochs=1, seed=0)
    after = [layer.feedback.clone() for _, layer in fbalign.feedback_layers(model)]
    assert all(not torch.equal(a, b) for a, b in zip(after, before))  # mirrored while training
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(data.train_x[:8]), data.train_y[:8]).backward()
    optimizer.step()
    assert all(torch.equal(layer.feedback, a) for (_, layer), a in zip(fbalign.feedback_layers(model), after))


def test_depth_tiny_and_resume(tmp_path, one_thread):
    """Every rule at every depth, through reproduce(); run again with resume, it reuses the finished runs."""
    ctx = _context(tmp_path)
    results = common.reproduce(oq, ctx, ["depth"], command="fbalign reproduce open-questions --only depth")
    found = results["experiments"]["depth"]
    assert set(found["runs"]) == {f"{r}-{d}" for r in ("bp", "fa", "dfa", "kp") for d in (1, 3)}
    summary = found["summary"]
    for rule in ("bp", "fa", "dfa", "kp"):
        for depth in ("1", "3"):
            assert math.isfinite(summary[rule][depth]["test"][0]) or summary[rule][depth]["diverged"]
    assert summary["bp"]["3"]["angle_lowest"][0] == pytest.approx(0.0, abs=1e-3)  # backprop is its own reference
    assert summary["dfa"]["3"]["angle_lowest"][0] > 1.0
    report = (ctx.out_dir / "report.md").read_text()
    assert "Does FA keep up as depth grows" in report and "![depth](depth.png)" in report
    saved = json.loads((ctx.out_dir / "results.json").read_text())["experiments"]["depth"]
    assert saved["settings"]["depths"] == [1, 3]
    # A resumed run finds every training run finished in its run directory and gives the same numbers.
    again = common._to_json(oq.run_depth(_context(tmp_path, resume=True)))
    assert again["summary"] == summary
    _check_claims(oq.claims_depth(found))
    # --replot: the figure and report.md again, from results.json alone
    (ctx.out_dir / "depth.png").unlink()
    common.replot(oq, _context(tmp_path))
    assert (ctx.out_dir / "depth.png").stat().st_size > 10_000 and (ctx.out_dir / "report.md").read_text() == report


def test_fixed_feedback_model_is_a_factory_for_fbalign_train():
    """The factory path a config names: a built-in model, weights from the seed, B at multiplier × the default rms."""
    model = fbalign.models.build("fbalign.experiments.open_questions:fixed_feedback_model", input_shape=(1, 28, 28),
                                 num_outputs=10, model="lenet5", multiplier=2.0, seed=1)
    layers = fbalign.feedback_layers(model)
    assert [layer.rule.name for _, layer in layers] == ["fa"] * 5
    for _, layer in layers:
        default = 1.0 / math.sqrt(3.0 * layer.weight[0].numel())
        assert float(layer.feedback.square().mean().sqrt()) == pytest.approx(2.0 * default, rel=1e-5)
    again = oq.fixed_feedback_model((1, 28, 28), 10, multiplier=2.0, seed=1)
    for p, q in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="unknown kind of B"):
        oq.fixed_feedback_model((1, 28, 28), 10, kind="triangular")
