"""lillicrap2016's image experiments, fig2a (Fig. 2a,b) and figS1 (Fig. S1), at a tiny scale.

The tiny task is XOR on images: two bright-or-dark bars, the label says whether they differ. No linear readout of
the (nearly linear, at the initial weights) random hidden units can solve it, so shallow learning stays at chance
while a hidden layer that learns (backprop, feedback alignment) solves it.
"""

from __future__ import annotations

import json
import math
import shutil
import struct

import numpy as np
import pytest
import torch

from fbalign.cli import main
from fbalign.experiments import lillicrap2016 as paper
from fbalign.experiments.common import Context, Report, load_results, reproduce

TINY = paper.FIG2A_SCALE["tiny"]  # 20× the paper's η: XOR is solved in a few epochs of 800 images


def write_xor_idx(folder, n_train=800, n_test=200, seed=0):
    """MNIST-format IDX files (uncompressed) of the XOR task; labels 0 (bars alike) and 1 (bars differ)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    left, right = np.zeros((28, 28)), np.zeros((28, 28))
    left[6:22, 3:12] = right[6:22, 16:25] = 1.0
    for split, n in (("train", n_train), ("t10k", n_test)):
        a, b = rng.choice([-1.0, 1.0], n), rng.choice([-1.0, 1.0], n)
        x = 0.5 + 0.45 * (a[:, None, None] * left + b[:, None, None] * right) + 0.05 * rng.standard_normal((n, 28, 28))
        images = (np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)
        labels = (a != b).astype(np.uint8)
        for name, array in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
            header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (folder / name).write_bytes(header + array.tobytes())
    return folder


def _context(out, data_dir, **kw):
    return Context(paper="lillicrap2016", out_dir=out, scale="tiny", data="mnist", data_dir=str(data_dir),
                   progress=False, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny reproduction of fig2a and figS1 on the XOR images, shared by the tests below."""
    root = tmp_path_factory.mktemp("images")
    data_dir = write_xor_idx(root / "xor")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = reproduce(paper, _context(root / "out", data_dir), only=["figS1"], command="test")
        yield root, data_dir, results["experiments"]
    finally:
        torch.set_num_threads(threads)


def test_fig2a_learns_xor_where_shallow_cannot(tiny):
    _, _, found = tiny
    fig2a = found["fig2a"]
    assert {"settings", "test_error", "final_test_error", "fa_minus_bp", "angle", "sparse", "fields_file",
            "figure"} <= set(fig2a)
    assert fig2a["settings"]["lr"] == pytest.approx(TINY["eta"] * TINY["batch_size"])
    for algorithm in paper.FIG2A_ALGORITHMS:
        curve = np.asarray(fig2a["test_error"][algorithm]["runs"])
        assert curve.shape == (1, TINY["epochs"] + 1) and np.isfinite(curve).all()
        assert ((curve >= 0) & (curve <= 100)).all()
    final = {a: fig2a["final_test_error"][a]["mean"] for a in paper.FIG2A_ALGORITHMS}
    assert final["shallow"] > 40  # chance is 50%: a readout of near-linear random features cannot do XOR
    assert final["bp"] < final["shallow"] - 30 and final["fa"] < final["shallow"] - 30
    assert final["sparse fa"] < final["shallow"] - 20
    for algorithm in ("fa", "sparse fa"):
        angle = fig2a["angle"][algorithm]
        assert np.isfinite(angle["mean"]).all() and len(angle["mean"]) == len(angle["step"])
        assert 80 < angle["initial"] < 100  # random B: no alignment before learning
        assert angle["last_10_percent"] < angle["initial"] - 20  # W comes to align with B


def test_sparse_fa_keeps_half_of_w_zero_after_training(tiny):
    root, _, found = tiny
    sparse = found["fig2a"]["sparse"]
    assert 0.45 < sparse["w_zero"]["mean"] < 0.55 and 0.45 < sparse["b_zero"]["mean"] < 0.55
    assert 0.2 < sparse["both_connected"]["mean"] < 0.3  # independent masks: ≈ 0.5 × 0.5
    # The trained network's removed connections are the ones removed at the start, and only those are zero.
    start = paper.image_network("sparse fa", 0)
    removed = start.get_submodule(paper.output_layer(start)).weight.detach() == 0
    state = torch.load(root / "out" / "fig2a" / "sparse-fa-0" / "checkpoint.pt", weights_only=False)["model"]
    name = paper.output_layer(start)
    trained = state[f"{name}.parametrizations.weight.original"] * state[f"{name}.parametrizations.weight.0.mask"]
    assert torch.equal(trained == 0, removed)


def test_image_network_starts_every_algorithm_alike_and_draws_b_per_run():
    nets = {a: paper.image_network(a, 0) for a in paper.FIG2A_ALGORITHMS}
    first = {a: net[1].weight for a, net in nets.items()}
    assert all(torch.equal(first["bp"], w) for w in first.values())
    fa_b, other_b = nets["fa"][3].feedback, paper.image_network("fa", 1)[3].feedback
    assert fa_b.abs().max() <= 0.5 and fa_b.abs().max() > 0.45 and not torch.equal(fa_b, other_b)
    sparse = nets["sparse fa"][3]
    assert torch.equal(sparse.feedback[sparse.feedback != 0], fa_b[sparse.feedback != 0])  # the same B, thinned
    # Removed weights stay zero under SGD with weight decay; the others learn.
    optimizer = torch.optim.SGD(nets["sparse fa"].parameters(), lr=0.5, weight_decay=1e-2)
    removed, before = sparse.weight.detach() == 0, sparse.weight.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        paper.one_hot_sse(nets["sparse fa"](torch.rand(8, 1, 28, 28)), torch.randint(0, 10, (8,))).backward()
        optimizer.step()
    after = sparse.weight.detach()
    assert torch.equal(after == 0, removed) and (after != before)[~removed].float().mean() > 0.99


def test_fig_s1_shows_receptive_fields_and_measures_them(tiny):
    root, _, found = tiny
    s1 = found["figS1"]
    assert (root / "out" / s1["figure"]).read_bytes()[:4] == b"\x89PNG"
    assert (root / "out" / found["fig2a"]["figure"]).read_bytes()[:4] == b"\x89PNG"
    assert len(set(s1["units"])) == paper.FIGS1_UNITS
    smooth = s1["smoothness"]
    assert abs(smooth["initial"]) < 0.05  # independent random weights
    for condition in ("bp", "fa", "sparse fa"):
        assert math.isfinite(smooth[condition]) and s1["relative_change"][condition] > 0
        assert s1["change_smoothness"][condition] > 0.3  # learning adds smooth, bar-shaped structure
    assert paper.field_smoothness(torch.ones(1, 784).cumsum(1)).item() > 0.9  # a smooth ramp


def test_report_says_fashion_mnist_is_not_mnist(tiny):
    _, _, found = tiny
    mnist_section = Report()
    ctx = Context(paper="lillicrap2016", out_dir="unused", progress=False)
    paper.report_fig2a(found["fig2a"], mnist_section, ctx)
    assert "not MNIST" not in mnist_section.markdown()
    as_fashion = json.loads(json.dumps(found["fig2a"]))
    as_fashion["settings"]["data"] = "fashion-mnist"
    section = Report()
    paper.report_fig2a(as_fashion, section, ctx)
    text = section.markdown()
    assert "This is Fashion-MNIST, not MNIST" in text
    absolute = [line for line in text.splitlines() if line.startswith("| ") and "final test error (%)" in line]
    assert len(absolute) == 4 and not any("✓" in line or "✗" in line for line in absolute)
    assert "| FA − BP (points, paired by run)" in text and "Quick mode" in text
    claims = {c.quantity: c for c in paper.claims_fig2a(found["fig2a"])}
    assert claims["FA − BP (points, paired by run)"].verdict and claims["FA − BP (points, paired by run)"].criterion
    assert claims["shallow − the worse of BP and FA (points)"].verdict  # XOR: shallow stays at chance
    assert all(c.verdict is None for q, c in claims.items() if "final test error" in q)  # tiny scale: no verdict
    s = found["fig2a"]["settings"]
    seen = claims["training examples seen per run"]  # the examples seen, beside the paper's 100 × 60,000
    assert seen.ours.startswith(f"{s['epochs'] * s['train_examples']:,} ") and seen.paper == "6,000,000"
    assert "of the paper's length" in seen.note
    s1_section = Report()
    paper.report_fig_s1(found["figS1"], s1_section, ctx)
    assert "What they show" in s1_section.markdown()


def test_resume_reuses_finished_runs(tiny, tmp_path):
    """A reproduction killed inside fig2a continues with --resume: finished runs are read back, not retrained, and
    the numbers are those of an uninterrupted reproduction."""
    root, data_dir, found = tiny
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    (out / "results.json").unlink()  # killed before fig2a finished ...
    shutil.rmtree(out / "fig2a" / "sparse-fa-0")  # ... while training the last network
    kept = (out / "fig2a" / "bp-0" / "checkpoint.pt").stat().st_mtime_ns
    reproduce(paper, _context(out, data_dir, resume=True), only=["fig2a"], command="test")
    assert (out / "fig2a" / "bp-0" / "checkpoint.pt").stat().st_mtime_ns == kept
    again = load_results(out)["experiments"]["fig2a"]
    for algorithm in paper.FIG2A_ALGORITHMS:
        assert again["final_test_error"][algorithm]["runs"] == found["fig2a"]["final_test_error"][algorithm]["runs"]
    assert again["angle"]["sparse fa"]["mean"] == pytest.approx(found["fig2a"]["angle"]["sparse fa"]["mean"])


def test_bad_data_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="one of fashion-mnist, mnist"):
        paper.image_data(Context(paper="lillicrap2016", out_dir=tmp_path, data="cifar10"), None)
    out = str(tmp_path / "out")
    assert main(["reproduce", "lillicrap2016", "--only", "fig2a", "--data", "mnist", "--data-dir",
                 str(tmp_path / "missing"), "--out", out, "--no-progress"]) == 2
    assert "no train-images-idx3-ubyte" in capsys.readouterr().err
    assert main(["reproduce", "lillicrap2016", "--only", "fig2a", "--data", "mnist", "--out", out,
                 "--no-progress", "--overwrite"]) == 2
    assert "no directory given" in capsys.readouterr().err
    assert main(["reproduce", "lillicrap2016", "--only", "figS1", "--data", "svhn", "--out", out,
                 "--no-progress", "--overwrite"]) == 2
    assert "one of fashion-mnist, mnist" in capsys.readouterr().err


def test_quick_takes_all_of_a_data_set_smaller_than_its_subset(tiny):
    _, data_dir, found = tiny
    ctx = Context(paper="lillicrap2016", out_dir="unused", data="mnist", data_dir=str(data_dir))
    assert len(paper.image_data(ctx, paper.FIG2A_SCALE["quick"]["train_size"]).train_x) == 800  # not an error
    assert len(paper.image_data(ctx, 100).train_x) == 100
    s = found["fig2a"]["settings"]
    assert s["train_examples"] == 800 and s["examples_seen"] == 800 * TINY["epochs"]
    as_quick = json.loads(json.dumps(found["fig2a"]))
    as_quick["settings"]["train_size_wanted"] = 20_000
    section = Report()
    paper.report_fig2a(as_quick, section, ctx)
    assert "all 800 (fewer than the scale's 20000)" in section.markdown()
