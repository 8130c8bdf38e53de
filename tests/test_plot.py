"""fbalign.plot: curves of several runs on shared axes, runs of one rule as mean ± sd, alignment when recorded."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest

from fbalign.plot import plot_runs, read_run

matplotlib.use("Agg")


def fake_run(path, rule, errors, angles=None):
    path.mkdir(parents=True)
    (path / "config.toml").write_text(f'[rule]\nname = "{rule}"\n')
    epochs = [{"epoch": i + 1, "step": 10 * (i + 1), "train_loss": 1.0 / (i + 1), "test_error": e}
              for i, e in enumerate(errors)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs))
    if angles is not None:
        records = [{"step": 5 * (i + 1), "loss": 1.0, "angle_dh_bp/2": a, "angle_b_wt/2": None}
                   for i, a in enumerate(angles)]
        (path / "alignment.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9')
    return path


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_runs_of_one_rule_are_drawn_as_their_mean_with_alignment(tmp_path):
    a = fake_run(tmp_path / "fa-seed0", "fa", [30.0, 20.0, 10.0], angles=[80.0, 60.0])
    b = fake_run(tmp_path / "fa-seed1", "fa", [34.0, 22.0], angles=[70.0, 50.0])
    c = fake_run(tmp_path / "bp-seed0", "backprop", [25.0, 15.0, 9.0])
    assert len(read_run(a).alignment) == 2  # the torn last line of a killed run is skipped
    fig = plot_runs([a, b, c], labels=["fa", "fa", "backprop"])
    loss_ax, error_ax, align_ax = fig.axes
    fa = lines_by_label(error_ax)["fa (n=2)"]
    np.testing.assert_allclose(fa.get_xdata(), [1, 2])  # epochs both runs reached
    np.testing.assert_allclose(fa.get_ydata(), [32.0, 21.0])
    np.testing.assert_allclose(lines_by_label(error_ax)["backprop"].get_ydata(), [25.0, 15.0, 9.0])
    angle = lines_by_label(align_ax)["fa (n=2)"]
    np.testing.assert_allclose(angle.get_xdata(), [0.5, 1.0])  # steps in epochs (10 steps an epoch)
    np.testing.assert_allclose(angle.get_ydata(), [75.0, 55.0])
    assert loss_ax.get_yscale() == "log"


def test_without_alignment_there_are_two_panels_and_files_are_written(tmp_path):
    run = fake_run(tmp_path / "r", "usf", [50.0, 40.0])
    fig = plot_runs([run])
    assert len(fig.axes) == 2 and "r" in lines_by_label(fig.axes[1])
    plot_runs([run], tmp_path / "out" / "c.svg")
    assert (tmp_path / "out" / "c.svg").read_text().startswith("<?xml")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        plot_runs([tmp_path / "out"])
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        plot_runs([run, run], labels=["x"])
