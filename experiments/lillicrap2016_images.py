"""Lillicrap et al. (2016), the image experiments: Fig. 2a,b (the 784-1000-10 logistic network on Fashion-MNIST or
MNIST: test error of backprop, feedback alignment, shallow learning and sparse FA; ∡(Δh_FA, Δh_BP) of the hidden
layer) and Fig. S1 (receptive fields of its hidden units). Part of the ``lillicrap2016`` reproduction
(:mod:`.lillicrap2016` lists these experiments with the others); the networks train in :func:`fbalign.train.train`,
each in its own run directory, so a killed reproduction continues with ``--resume``.

Like :mod:`.lillicrap2016` it reads as a methods section: constants with their source, then per figure its scale
table, ``run_*``, ``claims_*``, ``plot_*`` (from the results alone) and ``report_*``.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

import fbalign
from fbalign.checkpoint import atomic_write_bytes
from fbalign.data import TensorDataset, load_mnist_format, prepare
from fbalign.metrics import load_records, measure_alignment, plot_alignment
from fbalign.train import RunDirectoryError, evaluate, train

from .common import Claim, Context, Report, ReproductionError, fmt
from .toolkit import half_sse, new_figure, output_layer, panel_letter, pm, stream_seed, student, summary

# The paper's MNIST test errors (%), n = 20 runs.
FIG2A_PAPER = {"bp": 2.4, "fa": 2.1, "shallow": 7.2, "sparse fa": 2.4}
FIG2A_PAPER_EXAMPLES = 100 * 60_000  # training examples per run: MNIST's 60,000 images, 100 epochs (Fig. 2a's axis)
FIG2A_LABELS = {"bp": "backprop", "fa": "feedback alignment", "shallow": "shallow",
                "sparse fa": "FA, 50% sparse W and B"}
FIG2A_COLORS = {"bp": "black", "fa": "tab:green", "shallow": "0.7", "sparse fa": "tab:olive"}

IMAGE_DATA = ("fashion-mnist", "mnist")  # what --data takes; the first is the default
IMAGE_ETA = 1e-3  # the paper's learning rate, per example (online SGD on ½‖e‖²)
IMAGE_DECAY = 1e-6  # the paper's weight decay, per example like η
# B of the image networks: U[-0.5, 0.5], the range the paper gives for its B (linear task); None: fbalign's default
# scale (the variance of torch's init of W, so Δh_FA starts as large as Δh_BP).
IMAGE_FEEDBACK_RANGE: float | None = 0.5
SPARSITY = 0.5  # the fraction of W's and of B's entries removed in "sparse fa"
CONNECTIVITY = 2  # key of the streams that draw the sparse connectivity masks of W (see stream_seed)
FIG2A_ALGORITHMS = ("bp", "fa", "shallow", "sparse fa")
# Per scale: runs per algorithm, passes over the training set, the training set's size (None: all there is; a
# smaller data set is used whole), examples per SGD step (the per-example η makes the curve nearly independent of
# it, see report_fig2a), steps between measurements of ∡(Δh_FA, Δh_BP), and η per example. The tiny row is the
# tests' XOR-on-images task (tests/test_lillicrap2016_images.py), solved in a few epochs at 20× the paper's η.
FIG2A_SCALE: dict[str, dict[str, Any]] = {
    "quick": {"runs": 1, "epochs": 10, "train_size": 20_000, "batch_size": 100, "angle_every": 20, "eta": IMAGE_ETA},
    "full": {"runs": 20, "epochs": 100, "train_size": None, "batch_size": 100, "angle_every": 200, "eta": IMAGE_ETA},
    "tiny": {"runs": 1, "epochs": 10, "train_size": None, "batch_size": 5, "angle_every": 20, "eta": 0.02},
}


class Connectivity(nn.Module):
    """A fixed connectivity mask as a weight parametrization (:func:`torch.nn.utils.parametrize`): the layer's
    weight is ``W ∘ M`` at every forward, so a removed connection is zero whatever the optimizer and the weight
    decay do; ``M`` is a buffer (saved in the checkpoint, moved by ``.to()``)."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def image_data(ctx: Context, train_size: int | None) -> TensorDataset:
    """The image data set of ``ctx`` (``ctx.data``: fashion-mnist by default, or mnist from ``ctx.data_dir``), pixels
    in [0, 1]; only the first ``train_size`` training images when given and there are more (a smaller set is used
    whole: the report says how many). Raises ``ValueError`` for another name, ``FileNotFoundError`` (saying how to
    get it) for missing files."""
    name = ctx.data or IMAGE_DATA[0]
    if name not in IMAGE_DATA:
        raise ValueError(f"--data {name!r}: the image experiments of lillicrap2016 train on one of "
                         f"{', '.join(IMAGE_DATA)} (MNIST from --data-dir DIR)")
    raw = load_mnist_format(ctx.data_dir, name)
    return prepare(raw, train_size=None if train_size is None else min(train_size, len(raw.train_x)))


def image_network(algorithm: str, run: int) -> nn.Module:
    """The 784-1000-10 network of Fig. 2a for run ``run``: logistic hidden and output units with biases, torch's
    default initialization U[±1/√fan_in] drawn from the run's stream (every algorithm of a run starts from the same
    weights), set up to learn by ``algorithm``:

    * ``bp``, ``shallow`` (only the output layer learns);
    * ``fa``: B ~ U[-0.5, 0.5] (:data:`IMAGE_FEEDBACK_RANGE`), drawn anew for each run;
    * ``sparse fa``: the same B with half its entries zero, and half of the hidden→output weights W removed by a
      :class:`Connectivity` mask. The two masks are drawn independently: a feedback pathway that knew which forward
      connections exist would carry a piece of the structural symmetry FA does without.
    """
    model = student((28 * 28, 1000, 10), "sigmoid", bias=True, seed=run, dtype=torch.float32,
                    output_activation="sigmoid")
    if algorithm in ("bp", "shallow"):
        return fbalign.convert(model, "backprop" if algorithm == "bp" else "shallow", inplace=True)
    if algorithm not in ("fa", "sparse fa"):
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(FIG2A_ALGORITHMS)}")
    scale = {} if IMAGE_FEEDBACK_RANGE is None else {"init": "uniform", "scale": IMAGE_FEEDBACK_RANGE}
    sparsity = SPARSITY if algorithm == "sparse fa" else 0.0
    fbalign.convert(model, "fa", inplace=True, seed=run, sparsity=sparsity, **scale)
    if algorithm == "sparse fa":
        output = model.get_submodule(output_layer(model))
        generator = torch.Generator().manual_seed(stream_seed(CONNECTIVITY, run))
        kept = torch.rand(output.weight.shape, generator=generator) >= SPARSITY
        with torch.no_grad():
            output.weight.mul_(kept)
        parametrize.register_parametrization(output, "weight", Connectivity(kept.to(output.weight.dtype)))
    return model


def one_hot_sse(outputs: Tensor, labels: Tensor) -> Tensor:
    """½‖y − y*‖² with one-hot targets y*, averaged over the batch (``loss='sse'`` of :func:`fbalign.train.train`)."""
    return half_sse(outputs, F.one_hot(labels, outputs.shape[-1]).to(outputs.dtype))


def train_image_network(ctx: Context, algorithm: str, run: int, data: TensorDataset,
                        size: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Train :func:`image_network` in :func:`fbalign.train.train`, in its own run directory under
    ``ctx.folder('fig2a')``, so a reproduction killed at any point continues with ``--resume`` (a finished run is
    read back, not trained again).

    SGD on the batch-mean loss at ``lr = η·batch_size`` (and the same weight decay per example) takes the step the
    paper's online SGD at η takes over those examples, to first order in η.

    Returns the trained model and ``test_error`` (before training and after every epoch), ``angle`` (∡(Δh, Δh_BP)
    at the hidden layer, before training and every ``size['angle_every']`` steps, FA only) with ``angle_step`` and
    ``frac_agree`` (fraction of examples with Δh·Δh_BP > 0), ``w_rms`` (root mean square of the hidden→output
    weights before and after training), ``b_rms`` (of B, FA only) and ``train_seconds``.
    """
    model = image_network(algorithm, run)
    hidden = output_layer(model)
    output = model.get_submodule(hidden)
    w_rms = [float(output.weight.detach().square().mean().sqrt())]
    initial = evaluate(model, data.test_x, data.test_y, one_hot_sse, classification=True)["error"]
    learns_by_fa = algorithm in ("fa", "sparse fa")
    first = measure_alignment(model, one_hot_sse, data.train_x[:size["batch_size"]],
                              data.train_y[:size["batch_size"]]) if learns_by_fa else {}
    run_dir = ctx.folder("fig2a") / f"{algorithm.replace(' ', '-')}-{run}"
    try:
        result = train(model=model, data=data, rule="torch", loss="sse", seed=run, device=str(ctx.device),
                       epochs=size["epochs"], batch_size=size["batch_size"],
                       optimizer={"name": "sgd", "lr": size["eta"] * size["batch_size"], "weight_decay": IMAGE_DECAY},
                       log={"every": size["angle_every"], "alignment": learns_by_fa, "progress": False},
                       run_dir=run_dir, resume=ctx.resume)
    except RunDirectoryError as e:
        raise ReproductionError(f"{e}. It is a training run of an interrupted reproduction: add --resume to "
                                "continue it, or choose another --out") from e
    if result.status != "finished":
        raise ReproductionError(f"fig2a: {algorithm} run {run} was interrupted (checkpoint in {run_dir}); continue "
                                "with the same command plus --resume")
    w_rms.append(float(output.weight.detach().square().mean().sqrt()))
    curve: dict[str, Any] = {"test_error": [initial] + [h["test_error"] for h in result.history], "w_rms": w_rms,
                             "train_seconds": sum(h["epoch_time"] for h in result.history)}
    if learns_by_fa:
        curve["b_rms"] = float(output.feedback.square().mean().sqrt())
        records = [{"step": 0, **first}] + load_records(run_dir / "alignment.jsonl")
        curve["angle_step"] = [r["step"] for r in records]
        curve["angle"] = [r[f"angle_dh_bp/{hidden}"] for r in records]
        curve["frac_agree"] = [r[f"frac_agree_dh_bp/{hidden}"] for r in records]
    return result.model, curve


def _first_layer_weights(model: nn.Module) -> Tensor:
    """The hidden units' input weights ``(1000, 784)``: row i is unit i's receptive field."""
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    return first.weight.detach().to("cpu", torch.float32).clone()


def run_fig2a(ctx: Context) -> dict[str, Any]:
    """Fig. 2a,b: the 784-1000-10 logistic network on Fashion-MNIST (or MNIST): test error of backprop, feedback
    alignment, shallow learning and sparse FA, and ∡(Δh_FA, Δh_BP) of the hidden layer while FA learns."""
    size = ctx.row(FIG2A_SCALE)
    data = image_data(ctx, size["train_size"])
    runs = size["runs"]
    curves: dict[str, list[dict[str, Any]]] = {a: [] for a in FIG2A_ALGORITHMS}
    sparse: dict[str, list[float]] = {"w_zero": [], "b_zero": [], "both_connected": []}
    fields: dict[str, Tensor] = {}
    with ctx.bar(total=runs * len(FIG2A_ALGORITHMS), desc="fig2a", unit="run") as bar:
        for run in range(runs):  # run by run, so a killed reproduction keeps whole runs of every algorithm
            for algorithm in FIG2A_ALGORITHMS:
                if run == 0 and not fields:
                    fields["initial"] = _first_layer_weights(image_network(algorithm, run))
                model, curve = train_image_network(ctx, algorithm, run, data, size)
                curves[algorithm].append(curve)
                if run == 0 and algorithm != "shallow":
                    fields[algorithm] = _first_layer_weights(model)
                if algorithm == "sparse fa":
                    output = model.get_submodule(output_layer(model))
                    w_zero, b_zero = output.weight.detach() == 0, output.feedback == 0
                    sparse["w_zero"].append(float(w_zero.float().mean()))
                    sparse["b_zero"].append(float(b_zero.float().mean()))
                    sparse["both_connected"].append(float((~w_zero & ~b_zero).float().mean()))
                bar.update()
    fields["mean_image"] = data.train_x.mean(0).flatten()
    fields_file = ctx.folder("fig2a") / "receptive_fields.pt"
    buffer = io.BytesIO()
    torch.save(fields, buffer)
    atomic_write_bytes(fields_file, buffer.getvalue())

    final = {a: [c["test_error"][-1] for c in curves[a]] for a in FIG2A_ALGORITHMS}

    def paired(a: str, b: str) -> dict[str, float]:  # the same run's initial weights (and B) for both
        return summary(np.subtract(final[a], final[b]))

    errors = {a: np.asarray([c["test_error"] for c in curves[a]]) for a in FIG2A_ALGORITHMS}
    angle = {}
    for algorithm in ("fa", "sparse fa"):
        values = np.asarray([c["angle"] for c in curves[algorithm]])
        late = values[:, -max(1, values.shape[1] // 10):]
        angle[algorithm] = {
            "step": curves[algorithm][0]["angle_step"], "mean": values.mean(0), "sd": values.std(0),
            "frac_agree_mean": np.mean([c["frac_agree"] for c in curves[algorithm]], 0),
            "initial": float(values[:, 0].mean()), "last_10_percent": float(late.mean()),
            "min_over_training": float(values.mean(0).min())}
    results = {
        "settings": {"data": data.name, "data_dir": ctx.data_dir, "train_examples": len(data.train_x),
                     "train_size_wanted": size["train_size"], "scale": ctx.scale,
                     "examples_seen": size["epochs"] * len(data.train_x),
                     "test_examples": len(data.test_x), "runs": runs, **{k: size[k] for k in
                                                                       ("epochs", "batch_size", "angle_every")},
                     "eta_per_example": size["eta"], "lr": size["eta"] * size["batch_size"],
                     "weight_decay": IMAGE_DECAY, "feedback_range": IMAGE_FEEDBACK_RANGE, "sparsity": SPARSITY,
                     "masks": "independent", "device": str(ctx.device)},
        "test_error": {a: {"epochs": list(range(size["epochs"] + 1)), "runs": errors[a], "mean": errors[a].mean(0),
                           "sd": errors[a].std(0)} for a in FIG2A_ALGORITHMS},
        "final_test_error": {a: summary(final[a]) for a in FIG2A_ALGORITHMS},
        "fa_minus_bp": paired("fa", "bp"), "shallow_minus_bp": paired("shallow", "bp"),
        "shallow_minus_fa": paired("shallow", "fa"), "sparse_minus_fa": paired("sparse fa", "fa"),
        "angle": angle, "sparse": {k: summary(v) for k, v in sparse.items()},
        "w_rms": {a: {"initial": float(np.mean([c["w_rms"][0] for c in curves[a]])),
                      "final": float(np.mean([c["w_rms"][1] for c in curves[a]]))} for a in FIG2A_ALGORITHMS},
        "b_rms": {a: float(np.mean([c["b_rms"] for c in curves[a]])) for a in ("fa", "sparse fa")},
        "train_seconds": {a: [c["train_seconds"] for c in curves[a]] for a in FIG2A_ALGORITHMS},
        "fields_file": fields_file.relative_to(ctx.out_dir).as_posix(),
    }
    return results


def claims_fig2a(results: dict[str, Any]) -> list[Claim]:
    s, final, paper = results["settings"], results["final_test_error"], FIG2A_PAPER
    mnist = s["data"] == "mnist"
    data_name = "MNIST" if mnist else "Fashion-MNIST"
    judged = mnist and s.get("scale") == "full"  # absolute errors are judged on MNIST at the paper's scale only
    note = ("MNIST, full scale" if judged else
            f"{data_name}, {s.get('scale', 'quick')} scale: no verdict on the absolute number")
    shallow_gap = min(results["shallow_minus_bp"]["mean"], results["shallow_minus_fa"]["mean"])
    angle, sparse_angle, sparse = results["angle"]["fa"], results["angle"]["sparse fa"], results["sparse"]
    rows = [Claim(f"{FIG2A_LABELS[a]}, final test error (%), {data_name}", pm(final[a]), paper[a],
                  "within 0.5 points" if judged else "", abs(final[a]["mean"] - paper[a]) <= 0.5 if judged else None,
                  note) for a in FIG2A_ALGORITHMS]
    seen = s.get("examples_seen", s["epochs"] * s["train_examples"])
    return rows + [
        Claim("training examples seen per run", f"{seen:,} ({s['epochs']} passes over {s['train_examples']:,})",
              f"{FIG2A_PAPER_EXAMPLES:,}", note="the paper's length" if seen >= FIG2A_PAPER_EXAMPLES else
              f"{seen / FIG2A_PAPER_EXAMPLES:.0%} of the paper's length: errors are still falling (--full trains "
              "the paper's length)"),
        Claim("FA − BP (points, paired by run)", pm(results["fa_minus_bp"]), fmt(paper["fa"] - paper["bp"], 2),
              "≤ 1 point", results["fa_minus_bp"]["mean"] <= 1.0, "standing: FA within 1 point of BP, or better"),
        Claim("shallow − the worse of BP and FA (points)", fmt(shallow_gap, 3),
              fmt(paper["shallow"] - max(paper["bp"], paper["fa"]), 2), "≥ 2 points", shallow_gap >= 2.0,
              "standing: both far below shallow"),
        Claim("sparse FA − FA (points, paired by run)", pm(results["sparse_minus_fa"]),
              fmt(paper["sparse fa"] - paper["fa"], 2), "≤ 1 point", results["sparse_minus_fa"]["mean"] <= 1.0,
              "standing: removing half of W and B costs little"),
        Claim("fraction of W zero after training (sparse FA)", fmt(sparse["w_zero"]["mean"], 4), SPARSITY,
              f"within 0.01 of {SPARSITY}", abs(sparse["w_zero"]["mean"] - SPARSITY) < 0.01,
              f"B: {fmt(sparse['b_zero']['mean'], 4)} zero; W and B both present at "
              f"{fmt(sparse['both_connected']['mean'], 3)} of the connections (independent masks)"),
        Claim("∡(Δh_FA, Δh_BP) before training (°)", fmt(angle["initial"], 3), "≈ 90", note="no alignment yet"),
        Claim("∡(Δh_FA, Δh_BP), last 10% of training (°)", fmt(angle["last_10_percent"], 3), "< 90", "< 90°",
              angle["last_10_percent"] < 90, "Δh_FA is within 90° of backprop's Δh: it carries useful error"),
        Claim("the same, FA with 50% of W and B removed (°)", fmt(sparse_angle["last_10_percent"], 3), "< 90",
              "< 90°", sparse_angle["last_10_percent"] < 90),
    ]


def plot_fig2a(results: dict[str, Any], ctx: Context) -> None:
    figure, (left, right) = new_figure(9.5, 3.6, 2)
    top = 0.0
    for algorithm, curve in results["test_error"].items():
        epochs, mean, sd = (np.asarray(curve[k], dtype=float) for k in ("epochs", "mean", "sd"))
        left.plot(epochs, mean, color=FIG2A_COLORS[algorithm], label=FIG2A_LABELS[algorithm], linewidth=1.4)
        left.fill_between(epochs, mean - sd, mean + sd, color=FIG2A_COLORS[algorithm], alpha=0.2, linewidth=0)
        top = max(top, mean[1:].max())
    # The axis shows learning from the first epoch on; the untrained nets (90% wrong) start off the top.
    left.set(xlabel="epoch", ylabel="test error (%)", xlim=(0, epochs[-1]), ylim=(0, min(100.0, 1.1 * top)))
    left.legend(fontsize="small")
    panel_letter(left, "a")
    s = results["settings"]
    steps_per_epoch = s["train_examples"] // s["batch_size"]
    for algorithm in ("fa", "sparse fa"):
        angle = results["angle"][algorithm]
        records = [{"step": step / steps_per_epoch, f"angle_dh_bp/{FIG2A_LABELS[algorithm]}": value}
                   for step, value in zip(angle["step"], angle["mean"])]
        plot_alignment(records, right, window=max(1, len(records) // 40), band=2.0, xlabel="epoch")
        line = next(line for line in right.lines if line.get_label() == FIG2A_LABELS[algorithm])
        line.set_color(FIG2A_COLORS[algorithm])
        right.collections[-1].set_color(FIG2A_COLORS[algorithm])
    right.set(ylabel="∡(Δh_FA, Δh_BP) (degrees)", ylim=(0, 100), xlim=(0, s["epochs"]))
    right.legend(handles=[line for line in right.lines if line.get_linestyle() != "--"], fontsize="small")
    panel_letter(right, "b")
    results["figure"] = ctx.save_figure(figure, "fig2a.png")


def report_fig2a(results: dict[str, Any], section: Report, ctx: Context) -> None:
    s, final = results["settings"], results["final_test_error"]
    angle, sparse_angle = results["angle"]["fa"], results["angle"]["sparse fa"]
    mnist = s["data"] == "mnist"
    data_name = "MNIST" if mnist else "Fashion-MNIST"
    wanted = s.get("train_size_wanted")
    subset = (f"all {s['train_examples']}" if wanted is None else f"**only the first {s['train_examples']}**"
              if s["train_examples"] == wanted else f"all {s['train_examples']} (fewer than the scale's {wanted})")
    over = f"mean over {s['runs']} runs (band ±1 sd over runs)" if s["runs"] > 1 else "one run"
    section.figure(results["figure"], f"Fig. 2a,b on {data_name}. (a) Test error on the {s['test_examples']} test "
                   f"images while the 784-1000-10 logistic network learns from {subset} training images, "
                   f"{s['epochs']} epochs; {over}. (b) ∡(Δh_FA, Δh_BP) of the hidden layer on the training batch "
                   f"before training and every {s['angle_every']} steps ({over}; smoothed over a sliding window, ±2 "
                   "sd of the window shaded); dashed: 90°.")
    if not mnist:
        section.text("**This is Fashion-MNIST, not MNIST.** The paper's numbers are MNIST test errors; "
                     "Fashion-MNIST (clothing, in MNIST's format) is a harder data set on which every network "
                     "makes several times as many errors, so our absolute errors get no ✓/✗ verdict against the "
                     "paper's. What carries over is the **standing** of the algorithms, FA against BP against "
                     "shallow learning, judged below. `--data mnist --data-dir DIR` runs MNIST.")
    section.claims(claims_fig2a(results))
    section.text(
        f"**Set-up.** Logistic hidden and output units with biases, one-hot targets, L = ½‖y − y*‖², pixels in "
        f"[0, 1], η = {fmt(s['eta_per_example'])} per example and weight decay {fmt(s['weight_decay'])}, the same "
        "for every algorithm (the paper's: η = 1e-3, decay 1e-6). The paper's η is for online SGD on the squared "
        "error of each example; here "
        f"SGD takes {s['batch_size']} examples per step on the batch-mean loss at lr = η·{s['batch_size']} = "
        f"{fmt(s['lr'])} (weight decay likewise per example), which to first order in η is the sum of the paper's "
        "per-example steps. Weights start at torch's default U[±1/√fan_in] (the paper gives no range for this "
        "network), the same for every algorithm of a run; "
        + (f"B ~ U[−{fmt(s['feedback_range'])}, {fmt(s['feedback_range'])}] (the range the paper gives for B)"
           if s["feedback_range"] is not None else "B with fbalign's default scale (the variance of W's initial "
           "weights)")
        + ", drawn anew for each run. Shallow learning trains only the hidden→output weights. Sparse FA removes 50% of "
        "the hidden→output weights W with a fixed random mask (the layer computes with W ∘ M, so the removed weights "
        "stay zero) and sets 50% of B's entries to zero. The two masks are drawn **independently**: the point of the "
        "condition is that feedback needs no knowledge of the forward weights, and a shared mask would hand it the "
        "forward connectivity. Every number is the test error after the last epoch (no early stopping).")
    errors = {a: np.asarray(results["test_error"][a]["mean"]) for a in FIG2A_ALGORITHMS}
    early = max(1, s["epochs"] // 10)
    w_rms, b_rms = results["w_rms"], results["b_rms"]["fa"]
    ahead = ("level with" if abs(errors["fa"][early] - errors["bp"][early]) < 0.5 else
             "ahead of" if errors["fa"][early] < errors["bp"][early] else "behind")
    paragraphs = [
        f"**FA is {ahead} BP early on.** After {early} epoch{'s' if early > 1 else ''} FA's test error is "
        f"{fmt(errors['fa'][early], 3)}% against BP's {fmt(errors['bp'][early], 3)}%. The hidden layer's error is "
        f"B e under FA and Wᵀe under BP; B has rms {fmt(b_rms, 2)}, W {fmt(w_rms['bp']['initial'], 2)} at the start "
        f"and {fmt(w_rms['bp']['final'], 2)} after BP's training"
        + (", so at the same η FA's hidden layer takes the larger steps." if b_rms > 2 * w_rms["bp"]["final"] else ".")
        + f" Shallow learning's hidden units stay random; its final error is {fmt(final['shallow']['mean'], 3)}%."]
    if ctx.quick:
        paragraphs.append(
            f"**Quick mode** trains {s['epochs']} epochs on {s['train_examples']} images "
            f"({s['epochs'] * s['train_examples']} examples): at η = {fmt(s['eta_per_example'])} per example the "
            "curves are still falling, "
            "so the errors are far above converged ones and the standings are those of early learning.")
    if results["sparse_minus_fa"]["mean"] > 1.0:
        paragraphs.append(
            f"**Sparse FA lags FA** by {fmt(results['sparse_minus_fa']['mean'], 2)} points here (the paper: 0.3): "
            f"with half of B missing its hidden layer gets a weaker and less aligned signal (rms of B "
            f"{fmt(results['b_rms']['sparse fa'], 2)} against {fmt(b_rms, 2)}; ∡(Δh, Δh_BP) "
            f"{fmt(sparse_angle['last_10_percent'], 3)}° against {fmt(angle['last_10_percent'], 3)}° at the end).")
    section.text(*paragraphs)


# ------------------------------------------------------------------------------------------------ Fig. S1

FIGS1_UNITS = 100  # hidden units shown per condition (a 10×10 grid)
FIGS1_SEED = 2016  # picks which units
FIGS1_CONDITIONS = ("initial", "bp", "fa", "sparse fa")


def field_smoothness(fields: Tensor) -> Tensor:
    """Spatial smoothness of receptive fields: the correlation between the weights of horizontally and vertically
    adjacent pixels (the lag-1 autocorrelation of each 28×28 field, its mean removed). Shapes ``(units, 784)`` →
    ``(units,)``. Independent random weights score ≈ 0 (± 0.03), a smooth blob close to 1, a checkerboard −1."""
    w = fields.double().reshape(-1, 28, 28)
    w = w - w.mean((1, 2), keepdim=True)
    neighbours = (w[:, :, 1:] * w[:, :, :-1]).mean((1, 2)) + (w[:, 1:, :] * w[:, :-1, :]).mean((1, 2))
    return neighbours / 2 / w.square().mean((1, 2))


def _row_cosines(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=1)


def run_fig_s1(ctx: Context) -> dict[str, Any]:
    """Fig. S1: receptive fields (input weights) of 100 random hidden units of fig2a's first run: initial, after
    BP, after FA, after sparse FA; with the fields' spatial smoothness and how much, and how alike, learning
    changed them."""
    path = ctx.out_dir / "fig2a" / "receptive_fields.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: figS1 shows the networks fig2a trained; run fig2a in this --out "
                                "first (--only figS1 runs it when its results are missing)")
    fields = torch.load(path, weights_only=True)
    units = torch.randperm(len(fields["initial"]), generator=torch.Generator().manual_seed(FIGS1_SEED))[:FIGS1_UNITS]
    initial = fields["initial"]
    smooth = {c: field_smoothness(fields[c]) for c in FIGS1_CONDITIONS}
    change = {c: fields[c] - initial for c in FIGS1_CONDITIONS[1:]}
    # A control for the similarity of two rules' changes: the same rule pairs with the units shuffled.
    shuffled = torch.randperm(len(initial), generator=torch.Generator().manual_seed(FIGS1_SEED + 1))
    results = {
        "settings": {"units_shown": FIGS1_UNITS, "hidden_units": len(initial), "run": 0, "seed": FIGS1_SEED},
        "units": units,
        "smoothness": {c: float(smooth[c].mean()) for c in FIGS1_CONDITIONS},
        "smoothness_shown": {c: float(smooth[c][units].mean()) for c in FIGS1_CONDITIONS},
        "change_smoothness": {c: float(field_smoothness(change[c]).mean()) for c in change},
        "relative_change": {c: float(change[c].norm() / initial.norm()) for c in change},
        # How much of a unit's change is the mean training image (the whole change early in learning, when the
        # error a unit gets hardly depends on the image).
        "mean_image_cosine": {c: float(_row_cosines(change[c], fields["mean_image"].expand_as(change[c])).abs().mean())
                              for c in change},
        "change_cosine": {
            "bp vs fa": float(_row_cosines(change["bp"], change["fa"]).mean()),
            "fa vs sparse fa": float(_row_cosines(change["fa"], change["sparse fa"]).mean()),
            "bp vs fa, units shuffled": float(_row_cosines(change["bp"], change["fa"][shuffled]).mean()),
        },
        # The fields drawn, each scaled to its largest |weight| and rounded to 127 levels (the figure's contrast).
        "shown": {c: _quantize(fields[c][units]) for c in FIGS1_CONDITIONS},
    }
    return results


def _quantize(fields: Tensor) -> list[list[int]]:
    """Fields ``(n, 784)`` scaled to [−1, 1] by each one's largest |weight|, as integers −127 … 127."""
    peak = fields.double().abs().amax(1, keepdim=True).clamp_min(1e-12)
    return (fields.double() / peak * 127).round().to(torch.int64).tolist()


def _mosaic(fields: np.ndarray, columns: int = 10, gap: int = 1) -> np.ndarray:
    """Tile fields ``(n, 784)`` into one image, ``columns`` per row, each scaled to [−1, 1] by its largest |weight|
    (the paper's panels show each field's own contrast); NaN between them."""
    rows = math.ceil(len(fields) / columns)
    cell = 28 + gap
    image = np.full((rows * cell + gap, columns * cell + gap), np.nan)
    for i, field in enumerate(fields):
        r, c = divmod(i, columns)
        image[gap + r * cell:gap + r * cell + 28, gap + c * cell:gap + c * cell + 28] = (
            field.reshape(28, 28) / max(np.abs(field).max(), 1e-12))
    return image


def claims_fig_s1(results: dict[str, Any]) -> list[Claim]:
    smooth, change, relative = results["smoothness"], results["change_smoothness"], results["relative_change"]
    cosine, mean_image = results["change_cosine"], results["mean_image_cosine"]
    trained = ("bp", "fa", "sparse fa")
    rows = [Claim("smoothness of the fields, initial", smooth["initial"], "random", note="independent weights: ≈ 0")]
    rows += [Claim(f"smoothness of the fields, {FIG2A_LABELS[c]}", smooth[c], "structured (Fig. S1, by eye)",
                   "> initial + 0.02", smooth[c] > smooth["initial"] + 0.02,
                   f"of the change ΔW alone: {fmt(change[c])}; ‖ΔW‖/‖W₀‖ = {fmt(relative[c])}") for c in trained]
    return rows + [
        Claim("|cos(ΔW, mean training image)|, BP / FA / sparse FA", " / ".join(fmt(mean_image[c]) for c in trained),
              "–", note="how much of the change is the mean image"),
        Claim("cos(ΔW_BP, ΔW_FA) of the same unit", cosine["bp vs fa"], "–",
              note=f"units shuffled: {fmt(cosine['bp vs fa, units shuffled'])}"),
        Claim("cos(ΔW_FA, ΔW_sparse FA) of the same unit", cosine["fa vs sparse fa"], "–",
              note="the same initial weights and the same B, half of it removed")]


def plot_fig_s1(results: dict[str, Any], ctx: Context) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 8.6), layout="constrained")
    axes = figure.subplots(2, 2)
    cmap = colormaps["gray"].with_extremes(bad="white")
    titles = {"initial": "initial", **FIG2A_LABELS}
    for ax, letter, condition in zip(axes.flat, "abcd", FIGS1_CONDITIONS):
        shown = np.asarray(results["shown"][condition], dtype=float)
        ax.imshow(_mosaic(shown), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{letter}   {titles[condition]} (smoothness {results['smoothness_shown'][condition]:.2f})",
                     loc="left", fontsize="medium")
    results["figure"] = ctx.save_figure(figure, "figS1.png")


def report_fig_s1(results: dict[str, Any], section: Report, ctx: Context) -> None:
    smooth, change, relative = results["smoothness"], results["change_smoothness"], results["relative_change"]
    cosine, trained = results["change_cosine"], ("bp", "fa", "sparse fa")
    section.figure(results["figure"], f"Fig. S1. Receptive fields (the 784 input weights as a 28×28 image, each "
                   f"scaled to its own largest |weight|, black negative, white positive) of "
                   f"{results['settings']['units_shown']} randomly chosen hidden units of fig2a's first run: (a) "
                   "initial, shared by every algorithm of the run; after learning by (b) backprop, (c) feedback "
                   "alignment, (d) FA with 50% of W and B removed. Smoothness: the correlation of adjacent pixels' "
                   "weights, mean over the units shown.")
    section.claims(claims_fig_s1(results))
    alike = cosine["bp vs fa"] > 0.1 and cosine["bp vs fa"] > 3 * abs(cosine["bp vs fa, units shuffled"])
    section.text(
        f"**What they show.** Every number is over all {results['settings']['hidden_units']} hidden units. The "
        f"initial fields are noise (smoothness {fmt(smooth['initial'])}); what learning adds to them is spatially "
        f"smooth (smoothness of ΔW {fmt(min(change[c] for c in trained))} to {fmt(max(change[c] for c in trained))}), "
        f"so the trained fields, initial noise plus ΔW, are smoother: {fmt(smooth['bp'])} after BP, "
        f"{fmt(smooth['fa'])} after FA, {fmt(smooth['sparse fa'])} after sparse FA, in step with how far each moved "
        f"(‖ΔW‖/‖W₀‖ = {fmt(relative['bp'])}, {fmt(relative['fa'])}, {fmt(relative['sparse fa'])}). "
        + ("BP and FA change a unit alike" if alike else "BP and FA teach a unit different features")
        + f" (cosine of the two changes {fmt(cosine['bp vs fa'])}, {fmt(cosine['bp vs fa, units shuffled'])} for "
        f"mismatched units); FA with and without sparsity, which start from the same weights and share B's "
        f"remaining entries, give {fmt(cosine['fa vs sparse fa'])}"
        + (": since all three start from the same weights, what an FA unit learns is set by its column of B."
           if not alike and cosine["fa vs sparse fa"] > 0.3 else ".")
        + (" Quick mode trains briefly; longer training moves the fields further from their start."
           if ctx.quick else ""))
