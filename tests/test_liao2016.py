"""The Liao, Leibo & Poggio (2016) reproduction at tiny scale: every cell present, collapse detected and flagged,
p = 1 concordance equal to the plain rule, resume reusing finished runs, the report stating the paper's claims."""

from __future__ import annotations

import json
import math

import pytest

from fbalign.experiments import common, liao2016

TINY = liao2016.TRAINING["tiny"]


def _context(tmp_path, **kw):
    return common.Context(paper="liao2016", progress=False, **{"out_dir": tmp_path / "out", "scale": "tiny", **kw})


def test_whole_reproduction_at_tiny_scale(one_thread, tmp_path):
    ctx = _context(tmp_path)
    results = common.reproduce(liao2016, ctx, command="fbalign reproduce liao2016 --quick")
    found = results["experiments"]
    assert list(found) == ["magnitudes", "concordance", "bn_bm"]

    magnitudes = found["magnitudes"]
    assert sorted(magnitudes["cells"]) == sorted(f"mlp-{r}" for r in liao2016.RULES)
    for cell in magnitudes["cells"].values():
        assert len(cell["runs"]) == 2 and [o["seed"] for o in cell["runs"]] == [0, 1]
        assert cell["lr"] in TINY["lr_grid"]["sgd"] and len(cell["tuning"]) == 2
        # seed 0's run is the tuning run at the chosen rate
        assert cell["runs"][0]["lr"] == cell["lr"] and cell["runs"][0]["seed"] == 0
        assert cell["runs"][0]["test_error"] == next(t["test_error"] for t in cell["tuning"] if t["lr"] == cell["lr"])
    # Seeds differ (initialization, feedback draws): not one run copied.
    usf = magnitudes["cells"]["mlp-usf"]["runs"]
    assert usf[0]["test_curve"] != usf[1]["test_curve"]
    # BP on digits learns well within two epochs: far from chance, not collapsed.
    assert magnitudes["cells"]["mlp-backprop"]["test_error"]["mean"] < 30
    assert not magnitudes["cells"]["mlp-backprop"]["collapsed"]

    concordance = found["concordance"]
    assert sorted(concordance["cells"]) == ["mlp-usf-p0.5", "mlp-usf-p0.75", "mlp-usf-p1"]
    curve = concordance["curves"]["mlp-usf"]
    assert curve["p"] == [0.5, 0.75, 1.0] and len(curve["mean"]) == 3
    # p = 1 is uSF itself: the same numbers as the magnitudes section's uSF cell, bit for bit.
    assert curve["p1_equals_plain_rule"] is True
    assert concordance["cells"]["mlp-usf-p1"]["test_error"] == magnitudes["cells"]["mlp-usf"]["test_error"]
    assert concordance["cells"]["mlp-usf-p0.5"]["rule_options"] == {"name": "usf", "concordance": 0.5}
    assert set(concordance["references"]["mlp"]) == {"backprop", "fa"}

    grid = found["bn_bm"]
    assert sorted(grid["cells"]) == sorted(f"mlp-{r}-{g}" for r in ("backprop", "usf", "frsf") for g in grid["grid"])
    assert grid["cells"]["mlp-usf-nobn-sgd"]["rule_options"] == {"name": "usf", "scale": 1.0}
    assert grid["cells"]["mlp-usf-bn-bm"]["optimizer"] == "bm" and grid["cells"]["mlp-usf-bn-bm"]["batchnorm"]
    assert grid["cells"]["mlp-usf-bn-bm"]["grid"] == [1e-3]
    assert grid["grid_labels"]["nobn-sgd"].startswith("neither")
    assert set(grid["verdicts"]["mlp-rate_share"]) == {"sign rules", "backprop"}
    assert grid["verdicts"]["mlp-frsf"]["neither_collapsed"] == grid["cells"]["mlp-frsf-nobn-sgd"]["collapsed"]
    assert all(0 <= x <= 1 for x in grid["verdicts"]["mlp-rate_share"]["backprop"].values())
    variant = grid["verdicts"]["mlp-paper_variant"]
    assert list(variant["pairs"]) == ["usf vs frsf"] and list(variant["vs_sgd"]) == ["frsf"]
    cells = grid["cells"]
    assert variant["vs_sgd"]["frsf"]["difference"] == pytest.approx(
        cells["mlp-frsf-bn-bm"]["test_error"]["mean"] - cells["mlp-backprop-bn-sgd"]["test_error"]["mean"])
    init = grid["init"]
    assert init["mlp-backprop-nobn"]["norm_ratio"] == pytest.approx([1.0, 1.0, 1.0])
    assert init["mlp-usf-nobn"]["norm_ratio"][-1] == pytest.approx(1.0)  # the output layer's gradient is exact
    assert init["mlp-usf-nobn"]["norm_ratio"][0] > 5  # bare sign(W): the error below is blown up

    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    for claim in liao2016.PAPER.values():
        assert claim in report
    for figure in ("magnitudes.png", "concordance.png", "bn_bm.png"):
        assert (out / figure).stat().st_size > 10_000 and f"({figure})" in report
    assert "digits" in report and "collapsed" in report and "**Reading.**" in report
    saved = json.loads((out / "results.json").read_text())
    assert saved["experiments"]["magnitudes"]["settings"]["lr_grid"] == {"sgd": [1e-2, 1e-1], "bm": [1e-3]}

    # Claims are data: every row has a criterion and a verdict the numbers decide.
    for claims in (liao2016.claims_magnitudes(magnitudes), liao2016.claims_concordance(concordance),
                   liao2016.claims_bn_bm(grid)):
        assert claims and all(isinstance(c, common.Claim) and c.verdict in (True, False, None) for c in claims)
    p1 = next(c for c in liao2016.claims_concordance(concordance) if "p = 1 runs equal" in c.quantity)
    assert p1.verdict is True
    frsf = next(c for c in liao2016.claims_bn_bm(grid) if c.quantity == "MLP 3×256, frSF")
    assert frsf.verdict == (grid["verdicts"]["mlp-frsf"]["neither_collapsed"]
                            and bool(grid["verdicts"]["mlp-frsf"]["cells_that_train"]))

    # --replot redraws every figure and the same report from results.json alone.
    for figure in ("magnitudes.png", "concordance.png", "bn_bm.png"):
        (out / figure).unlink()
    common.replot(liao2016, _context(tmp_path))
    assert all((out / f).stat().st_size > 10_000 for f in ("magnitudes.png", "concordance.png", "bn_bm.png"))
    assert (out / "report.md").read_text() == report


def test_claims_follow_the_numbers():
    """The concordance verdicts from made-up curves: falling steadily and significantly is ✓, rising is ✗, higher
    at low p without significance is no verdict."""
    def results(spearman, difference, p):
        return {"curves": {"mlp-usf": {"p": [0.5, 1.0], "spearman": spearman, "lowest_minus_highest": difference,
                                       "lowest_vs_highest_p": p, "p1_equals_plain_rule": None}}}

    def verdicts(found):
        return [c.verdict for c in liao2016.claims_concordance(found)]

    assert verdicts(results(-0.9, 5.0, 0.001)) == [True, True]
    assert verdicts(results(0.5, -3.0, 0.001)) == [False, False]
    assert verdicts(results(-0.5, 2.0, 0.3)) == [False, None]


def test_collapsed_runs_are_flagged_not_raised(one_thread, tmp_path, monkeypatch):
    """A rate that makes the loss NaN is a 'diverged' run and one too small to learn stays at chance: both are
    collapsed, the reproduction goes on, and the cell says so."""
    ctx = _context(tmp_path)
    setup = {**TINY, "lr_grid": {"sgd": (1e4,), "bm": (1e-12,)}}
    cells = [liao2016.Cell("exploding", "mlp", {"name": "usf", "scale": 1.0}, False, "sgd"),
             liao2016.Cell("frozen", "mlp", "backprop", False, "bm")]
    found = liao2016.run_cells(ctx, "probe", cells, setup)
    exploding, frozen = found["exploding"], found["frozen"]
    assert exploding["collapse"] == ["diverged", "diverged"] and exploding["collapsed"]
    assert exploding["test_error"]["n"] == 0 and math.isnan(exploding["test_error"]["mean"])
    assert all(o["status"] == "diverged" and ("nan" in o["message"] or "inf" in o["message"])
               for o in exploding["runs"])
    assert frozen["collapse"] == ["chance", "chance"] and frozen["collapsed"] and frozen["rates_that_train"] == 0
    assert frozen["test_error"]["mean"] > 80
    # A resumed reproduction reuses the outcomes without training; a fresh one refuses to overwrite them.
    monkeypatch.setattr(liao2016, "train", None)  # calling either would fail
    monkeypatch.setattr(liao2016, "train_ensemble", None)
    again = liao2016.run_cells(_context(tmp_path, resume=True), "probe", cells, setup)
    assert again == found
    with pytest.raises(common.ReproductionError, match="--resume"):
        liao2016.run_cells(ctx, "probe", cells, setup)


def test_choose_prefers_validation_error_then_loss_and_never_a_diverged_rate():
    tuning = [{"status": "diverged"}, {"status": "finished", "val_error": 5.0, "val_loss": 0.3},
              {"status": "finished", "val_error": 5.0, "val_loss": 0.2}, {"status": "finished", "val_error": 7.0,
                                                                          "val_loss": 0.1}]
    assert liao2016._choose(tuning) == 2
    assert liao2016._choose([{"status": "diverged"}, {"status": "diverged"}]) == 0


def test_lenet_cells_on_resized_digits(one_thread, tmp_path):
    """LeNet-5 trains on digits resized to 28×28 with BatchNorm."""
    ctx = _context(tmp_path)
    assert liao2016.cell_config(ctx, liao2016.Cell("k", "lenet5", "usf", True, "sgd"), 0.1, 0)["data"]["size"] == 28
    cell = liao2016.run_cells(ctx, "lenet", [liao2016.Cell("lenet-bn", "lenet5", "frsf", True, "sgd")])["lenet-bn"]
    assert len(cell["tuning"]) == 2 and len(cell["runs"]) == 2
    assert all(o["status"] == "finished" for o in cell["runs"]) and cell["test_error"]["n"] == 2


def test_parallel_workers_give_the_serial_numbers(one_thread, tmp_path):
    """Runs go to two worker processes (fbalign.runner) and give the numbers they give in this one, in order."""
    cells = [liao2016.Cell("mlp-fa", "mlp", "fa", True, "sgd"), liao2016.Cell("mlp-usf", "mlp", "usf", False, "bm")]
    setup = {**TINY, "epochs": {"mlp": 1, "lenet5": 1}, "train_size": {"digits": 256}}
    parallel = liao2016.run_cells(_context(tmp_path), "p", cells, {**setup, "workers": 2})
    serial = liao2016.run_cells(_context(tmp_path, out_dir=tmp_path / "serial"), "p", cells, setup)

    def numbers(found):
        return {k: [{n: v for n, v in o.items() if n != "seconds"} for o in c["runs"]] for k, c in found.items()}

    assert numbers(serial) == numbers(parallel) and list(parallel) == ["mlp-fa", "mlp-usf"]


def test_a_cells_runs_train_as_one_ensemble_with_the_numbers_of_runs_alone(one_thread, tmp_path, monkeypatch):
    """A cell's runs (its rate grid, then its other seeds) train as one fbalign ensemble (on a GPU, or on the CPU
    for the models ENSEMBLES_ON_CPU names); each run's numbers are those it has alone (to float32 rounding)."""
    cells = [liao2016.Cell("mlp-brsf", "mlp", "brsf", True, "sgd"), liao2016.Cell("mlp-usf", "mlp", "usf", False, "bm")]
    setup = {**TINY, "epochs": {"mlp": 2, "lenet5": 1}, "seeds": 3}
    monkeypatch.setattr(liao2016, "ENSEMBLES_ON_CPU", ("mlp",))  # as on a GPU
    together = liao2016.run_cells(_context(tmp_path), "e", cells, setup)
    monkeypatch.setattr(liao2016, "ENSEMBLES_ON_CPU", ())
    alone = liao2016.run_cells(_context(tmp_path, out_dir=tmp_path / "alone"), "e", cells, setup)
    for cell in cells:
        key, grid = cell.key, setup["lr_grid"][cell.optimizer]
        runs = together[key]["tuning"] + together[key]["runs"]
        assert [o["trained_with"] for o in together[key]["runs"]] == [len(grid), 2, 2]
        assert {o["trained_with"] for o in alone[key]["runs"]} == {1}
        assert together[key]["lr"] == alone[key]["lr"]
        for mine, theirs in zip(runs, alone[key]["tuning"] + alone[key]["runs"]):
            assert mine["status"] == theirs["status"]
            assert mine["test_error"] == pytest.approx(theirs["test_error"], abs=0.6)  # at most 2 of 360 examples


def test_bad_data_name_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="liao2016 trains on digits, fashion-mnist, mnist"):
        liao2016.data_name(_context(tmp_path, data="cifar10"))
    assert liao2016.data_name(_context(tmp_path, scale="full")) == "fashion-mnist"
    assert liao2016.data_name(_context(tmp_path)) == "digits"
