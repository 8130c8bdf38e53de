"""fbalign reproduce transformers: the corpus, the model, the per-block alignment and the whole experiment at a tiny
scale (seconds), with properties that must hold at any scale."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import fbalign
from fbalign.experiments import PAPERS, common
from fbalign.experiments import transformers as tx

TINY = tx.LM_SCALE["tiny"]  # the tests' sizes: the scale table's tiny row


@pytest.fixture(scope="module")
def corpus():
    return tx.load_corpus()


def _context(tmp_path, **kw):
    return common.Context(paper="transformers", out_dir=tmp_path / "out", scale="tiny", progress=False, **kw)


def test_registered():
    assert PAPERS["transformers"] == "fbalign.experiments.transformers"
    assert [e.name for e in tx.EXPERIMENTS] == ["lm"]


def test_default_corpus_holds_out_whole_documents(corpus):
    from pydoc_data.topics import topics

    total = sum(len(t) for t in topics.values())
    assert corpus.documents[0] + corpus.documents[1] == len(topics)
    # about a tenth of the characters, in whole topics (the joins add two characters per document)
    assert 0.08 * total < len(corpus.val) <= 0.1 * total + 2 * corpus.documents[1]
    assert len(corpus.train) + len(corpus.val) == total + 2 * (len(topics) - 2)
    assert corpus.decode(corpus.encode("The assert statement").tolist()) == "The assert statement"
    assert tx.load_corpus().sha256 == corpus.sha256  # the same split every time
    base = tx.ngram_bits(corpus)
    assert 3.0 < base["bigram"] < base["unigram"] < math.log2(len(corpus.vocab))


def test_corpus_from_a_file_and_bad_input(tmp_path):
    text = "".join(f"Line {i} of a small English text, with words.\n" for i in range(200))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    found = tx.load_corpus(str(tmp_path / "t.txt"))
    assert found.name == "t.txt" and found.documents == (0, 0)
    assert found.decode(found.train.tolist()) + found.decode(found.val.tolist()) == text
    assert found.decode(found.val.tolist()).startswith("Line ")  # cut at a line break
    with pytest.raises(FileNotFoundError, match="no such file"):
        tx.load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "short.txt").write_text("too short", encoding="utf-8")
    with pytest.raises(ValueError, match="at least"):
        tx.load_corpus(str(tmp_path / "short.txt"))


def test_model_is_causal_and_checks_its_context(one_thread):
    torch.manual_seed(0)
    model = tx.CharTransformer(vocab=11, context=8, d_model=16, heads=2, d_ff=32, layers=2).eval()
    ids = torch.randint(11, (3, 8))
    later = ids.clone()
    later[:, 5:] = (later[:, 5:] + 1) % 11
    with torch.no_grad():
        a, b = model(ids), model(later)
    assert a.shape == (3, 8, 11)
    torch.testing.assert_close(a[:, :5], b[:, :5])  # no position sees a later character
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 9, dtype=torch.int64))


def _batch(corpus, cfg):
    return tx.sequences(corpus.train, cfg["context"], 4, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("condition", ["backprop"])
def test_backprop_aligns_exactly(corpus, condition, one_thread):
    """Plain torch, and the backprop rule through convert: every angle is 0 (the rule's pass is backprop's)."""
    model = tx.build(condition, TINY, len(corpus.vocab), seed=0)
    with warnings.catch_warnings():  # the embeddings (nothing to convert) are named in a warning
        warnings.simplefilter("ignore", fbalign.UnconvertedModuleWarning)
        converted = fbalign.convert(model, "backprop")
    for candidate in (model, converted):
        found = tx.block_alignment(candidate, list(candidate.blocks), *_batch(corpus, TINY))
        assert found["angle_dh_bp"] == pytest.approx([0.0, 0.0], abs=1e-3)
        assert found["angle_grad_bp"] == pytest.approx([0.0, 0.0], abs=1e-3)


@pytest.mark.parametrize("condition", ["fa", "dfa", "dfa-points"])
def test_rules_send_another_error_to_every_block(corpus, condition, one_thread):
    """fa, dfa and DFA points change the error at every block's output; measuring leaves training's random state
    alone."""
    model = tx.build(condition, TINY, len(corpus.vocab), seed=0)
    state = torch.get_rng_state()
    found = tx.block_alignment(model, list(model.blocks), *_batch(corpus, TINY))
    assert torch.equal(state, torch.get_rng_state())
    assert all(5.0 < a < 180.0 for a in found["angle_dh_bp"]), found
    assert all(5.0 < a < 180.0 for a in found["angle_grad_bp"]), found
    assert all(p.grad is None for p in model.parameters())  # measuring writes no gradient


@pytest.mark.parametrize("error_at", ["logits", "features"])
def test_dfa_points_measure_the_injected_error(corpus, error_at, one_thread):
    """Under DFA points, Δh at block k's output is e · B_k by hand: e the loss's gradient at the logits, or at the
    head's input (W_headᵀ times it) as in Launay et al.'s code."""
    model = tx.build("dfa-points", dict(TINY, dfa_points_error=error_at), len(corpus.vocab), seed=0)
    x, y = _batch(corpus, TINY)
    dh, _ = tx._block_pass(model, list(model.blocks), x, y)
    with torch.no_grad():
        logits = model(x)
    logits.requires_grad_(True)
    (e,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()), logits)
    if error_at == "features":
        e = e @ model.head.weight.detach()
    for k, block in enumerate(model.blocks):
        torch.testing.assert_close(dh[k], e @ block.dfa_point_feedback)
    with pytest.raises(ValueError, match="dfa_points_error"):
        tx.build("dfa-points", dict(TINY, dfa_points_error="head"), len(corpus.vocab), seed=0)


def test_same_start_for_every_condition(corpus):
    plain = tx.build("backprop", TINY, len(corpus.vocab), seed=3)
    for condition in ("fa", "usf", "dfa"):
        converted = tx.build(condition, TINY, len(corpus.vocab), seed=3)
        torch.testing.assert_close(converted.blocks[1].linear2.weight, plain.blocks[1].linear2.weight)
    with pytest.raises(ValueError, match="unknown condition"):
        tx.build("kp-typo", TINY, len(corpus.vocab), seed=0)


class _Stop(Exception):
    pass


class _Progress:
    """A progress bar that interrupts the run at a given step, as Ctrl-C would."""

    def __init__(self, stop_at):
        self.steps, self.stop_at = 0, stop_at

    def update(self, n):
        self.steps += n
        if self.steps == self.stop_at:
            raise _Stop


def test_interrupted_run_resumes_to_the_same_numbers(corpus, tmp_path, one_thread):
    cfg = dict(TINY, steps=12, eval_every=4, dropout=0.1)  # dropout: the random stream is restored too
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = tx.train_run("fa", 0, cfg, corpus, torch.device("cpu"), tmp_path / "a")
    with pytest.raises(_Stop):
        tx.train_run("fa", 0, cfg, corpus, torch.device("cpu"), tmp_path / "b", progress=_Progress(stop_at=10))
    assert (tmp_path / "b" / "fa-seed0.pt").exists()  # the checkpoint of step 8
    resumed = tx.train_run("fa", 0, cfg, corpus, torch.device("cpu"), tmp_path / "b", resume=True)
    assert resumed["history"] == whole["history"]
    assert resumed["val_bpc"] == whole["val_bpc"]
    assert not (tmp_path / "b" / "fa-seed0.pt").exists()
    # a finished run is reused as it is
    (tmp_path / "b" / "fa-seed0.json").write_text(json.dumps(dict(resumed, val_bpc=1.5)))
    assert tx.train_run("fa", 0, cfg, corpus, torch.device("cpu"), tmp_path / "b", resume=True)["val_bpc"] == 1.5
    # ...but not when it was made with other settings
    other = tx.train_run("fa", 0, dict(cfg, lr=1e-3), corpus, torch.device("cpu"), tmp_path / "b", resume=True)
    assert other["val_bpc"] != 1.5 and other["settings"]["lr"] == 1e-3


def test_a_run_whose_loss_turns_nan_is_reported_diverged(corpus, tmp_path, one_thread, monkeypatch):
    real = tx.build

    def poisoned(*args, **kw):
        model = real(*args, **kw)
        with torch.no_grad():
            model.head.bias.fill_(math.nan)
        return model

    monkeypatch.setattr(tx, "build", poisoned)
    found = tx.train_run("usf", 0, dict(TINY, steps=8, eval_every=4), corpus, torch.device("cpu"), tmp_path)
    assert found["diverged_at"] == 4 and math.isnan(found["val_bpc"])


def test_reproduce_end_to_end(tmp_path, one_thread):
    ctx = _context(tmp_path)
    results = common.reproduce(tx, ctx)
    lm = results["experiments"]["lm"]
    conditions = lm["conditions"]
    assert conditions == ["backprop", "fa", "usf", "frsf", "dfa", "dfa-points"]
    assert len(lm["runs"]) == len(conditions) * TINY["seeds"]
    for run in lm["runs"]:
        assert math.isfinite(run["val_bpc"]) and run["val_bpc"] < math.log2(lm["corpus"]["vocab"]) + 1
        assert run["history"]["step"] == [6, 12]
        assert len(run["history"]["angle_dh_bp"][-1]) == TINY["layers"]
        if run["condition"] == "backprop":
            assert run["history"]["angle_dh_bp"][-1] == pytest.approx([0.0, 0.0], abs=1e-3)
        elif run["condition"] != "dfa-points":  # attention takes the rule; only the embeddings are left
            assert set(run["unconverted"]) == {"embed", "position"}
    assert all(run["sample"] for run in lm["runs"] if run["seed"] == 0)
    points = [run for run in lm["runs"] if run["condition"] == "dfa-points"]
    assert "dfa points" in points[0]["summary"] and all(90 - 45 < a < 90 + 45 for run in points
                                                         for a in run["history"]["angle_dh_bp"][0])
    report = (ctx.out_dir / common.REPORT).read_text()
    assert "Beside Launay et al. (2020)" in report and "pydoc-topics" in report
    assert (ctx.out_dir / lm["figure"]).stat().st_size > 10_000
    again = common.reproduce(tx, _context(tmp_path, resume=True))
    assert again["experiments"]["lm"]["runs"] == lm["runs"]
