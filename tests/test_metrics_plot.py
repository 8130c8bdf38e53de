"""plot_alignment: one line per layer at the sliding-window mean, a ±std band, from records or a file."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from fbalign.metrics import plot_alignment, sliding_mean_std  # noqa: E402


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40), st.integers(1, 12))
def test_sliding_mean_std_is_the_centred_window_by_brute_force(values, window):
    mean, std = sliding_mean_std(values, window)
    x = np.asarray(values)
    for i in range(len(x)):
        start = i - (window - 1) // 2
        chunk = x[max(start, 0):max(min(start + window, len(x)), 0)]
        assert mean[i] == pytest.approx(chunk.mean(), abs=1e-6)
        assert std[i] == pytest.approx(chunk.std(), abs=1e-3)
    with pytest.raises(ValueError, match="at least 1"):
        sliding_mean_std(values, 0)


def synthetic_records(n: int = 60) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"step": 10 * i, "loss": 1.0 / (i + 1), "nse_reference": 10.0 ** (-i / 10),
             "angle_dh_bp/1": 90 - i + 5 * rng.standard_normal(), "angle_dh_bp/3": 60 + rng.standard_normal(),
             "angle_dh_pbp/3": float("nan")} for i in range(n)]


def test_draws_one_line_and_one_band_per_layer_at_the_windowed_mean():
    records = synthetic_records()
    ax = plot_alignment(records, window=5)
    lines = [line for line in ax.get_lines() if line.get_label() in ("1", "3")]
    assert sorted(line.get_label() for line in lines) == ["1", "3"]
    for line in lines:
        values = [r[f"angle_dh_bp/{line.get_label()}"] for r in records]
        np.testing.assert_allclose(line.get_ydata(), sliding_mean_std(values, 5)[0])
        np.testing.assert_array_equal(line.get_xdata(), [r["step"] for r in records])
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2
    assert any(list(line.get_ydata()) == [90.0, 90.0] for line in ax.get_lines())  # the no-alignment reference
    assert "Δh_BP" in ax.get_ylabel() and ax.get_legend() is not None


def test_reads_a_recorder_file_and_saves_the_figure(tmp_path):
    import json

    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({k: (None if v != v else v) for k, v in r.items()}) + "\n"
                            for r in synthetic_records()))
    out = tmp_path / "figs" / "angle.png"
    ax = plot_alignment(path, path=out, title="FA")
    assert out.stat().st_size > 1000 and ax.get_title() == "FA"


def test_log_quantities_use_a_log_axis_and_geometric_windows():
    records = synthetic_records()
    ax = plot_alignment(records, metric="nse_reference", window=3)
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata()[1:-1], [10.0 ** (-i / 10) for i in range(1, 59)])


def test_draws_on_a_given_axes_and_skips_undefined_values():
    fig, (left, right) = plt.subplots(1, 2)
    assert plot_alignment(synthetic_records(), right, metric="angle_dh_bp") is right
    assert not left.get_lines()
    empty = plot_alignment(synthetic_records(), metric="angle_dh_pbp")  # all NaN: nothing drawn, no crash
    assert [line.get_label() for line in empty.get_lines() if not line.get_label().startswith("_")] == []
    plt.close(fig)


def test_an_unknown_metric_names_what_the_records_hold():
    with pytest.raises(ValueError, match="no 'angle_b_wt'.*angle_dh_bp, angle_dh_pbp, loss, nse_reference"):
        plot_alignment(synthetic_records(), metric="angle_b_wt")


def test_band_is_the_given_number_of_standard_deviations():
    records = synthetic_records()
    values = [r["angle_dh_bp/3"] for r in records]
    mean, std = sliding_mean_std(values, 10)
    for band in (1.0, 2.0):
        ax = plot_alignment([{k: r[k] for k in ("step", "angle_dh_bp/3")} for r in records], window=10, band=band)
        (polygon,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
        y = polygon.get_paths()[0].vertices[:, 1]
        assert y.max() == pytest.approx((mean + band * std).max())
        assert y.min() == pytest.approx((mean - band * std).min())
    with pytest.raises(ValueError, match="band must be"):
        plot_alignment(records, band=-1)


def test_the_old_module_name_still_works_with_a_warning():
    import importlib
    import sys

    sys.modules.pop("fbalign.metrics.plot", None)
    with pytest.warns(DeprecationWarning, match="fbalign.metrics.alignment_plot"):
        old = importlib.import_module("fbalign.metrics.plot")
    assert old.plot_alignment is plot_alignment and old.sliding_mean_std is sliding_mean_std
