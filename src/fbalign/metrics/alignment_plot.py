"""Draw recorded alignment against training step, one line per layer, with its spread (Lillicrap Fig. 1e / 2b)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .recorder import load_records

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_alignment", "sliding_mean_std"]

_YLABELS = {
    "angle_dh_bp": "∡(Δh, Δh_BP) (degrees)",
    "angle_dh_pbp": "∡(Δh, Δh_PBP) (degrees)",
    "angle_b_wt": "∡(B, Wᵀ) (degrees)",
    "angle_grad_bp": "∡(ΔW, ΔW_BP) (degrees)",
    "frac_agree_dh_bp": "fraction of examples with Δh·Δh_BP > 0",
    "norm_ratio_b_w": "‖B‖ / ‖W‖",
    "nse": "NSE",
    "nse_reference": "NSE (reference data)",
    "loss": "loss",
    "loss_reference": "loss (reference data)",
}
_LOG_SCALE = ("nse", "nse_reference", "loss", "loss_reference")


def sliding_mean_std(values: Sequence[float] | np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of ``values`` over a centred window of ``window`` consecutive entries, shrunk
    at the ends (the first point averages the first ``window // 2 + 1`` values). Shapes ``(n,)`` → ``(n,), (n,)``.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 measurement, not {window}")
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    start = np.arange(n) - (window - 1) // 2
    lo, hi = np.clip(start, 0, n), np.clip(start + window, 0, n)
    sums = np.concatenate([[0.0], np.cumsum(x)])
    squares = np.concatenate([[0.0], np.cumsum(x * x)])
    count = hi - lo
    mean = (sums[hi] - sums[lo]) / count
    variance = np.maximum((squares[hi] - squares[lo]) / count - mean * mean, 0.0)
    return mean, np.sqrt(variance)


def plot_alignment(records: Sequence[dict[str, Any]] | str | os.PathLike, ax: Axes | None = None, *,
                   metric: str = "angle_dh_bp", window: int | None = None, path: str | os.PathLike | None = None,
                   xlabel: str = "step", title: str | None = None, band: float = 1.0) -> Axes:
    """Plot ``metric`` against step for every layer (or parameter) in ``records``: the mean over a sliding window
    of ``window`` measurements as a line, ± ``band`` standard deviations over the same window as a band.

    Args:
        records: records from :class:`AlignmentRecorder` (a list of dicts) or the path of its file.
        ax: the matplotlib Axes to draw on; None makes a new figure (no pyplot, so it works headless).
        metric: a key prefix, e.g. ``'angle_dh_bp'`` (one line per ``angle_dh_bp/<layer>``), ``'angle_b_wt'``,
            ``'angle_grad_bp'``, or a plain key such as ``'nse_reference'`` (drawn on a log scale, the window
            taken over log10 of the values).
        window: measurements per window; None: a 25th of the records (at least 1).
        path: also save the figure there (format from the suffix: .png, .pdf, .svg).
        xlabel, title: axis label and title.
        band: half-width of the shaded band in standard deviations (Lillicrap et al.'s Fig. 1e: 2).

    Returns:
        The Axes. Angles get a dashed line at 90° (no alignment).
    """
    rows = load_records(records) if isinstance(records, (str, os.PathLike)) else list(records)
    keys = sorted({key for row in rows for key in row if key == metric or key.startswith(metric + "/")})
    if not keys:
        present = sorted({key.split("/")[0] for row in rows for key in row if key != "step"})
        raise ValueError(f"no {metric!r} in the records; they hold: {', '.join(present) or 'nothing'}")
    if window is None:
        window = max(1, round(len(rows) / 25))
    if not band >= 0:
        raise ValueError(f"band must be a number of standard deviations >= 0, not {band}")
    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=(5.0, 3.5), layout="constrained").add_subplot()
    log_scale = metric in _LOG_SCALE
    for key in keys:
        steps = np.array([row["step"] for row in rows if key in row], dtype=np.float64)
        values = np.array([row[key] for row in rows if key in row], dtype=np.float64)
        keep = np.isfinite(values) & (values > 0 if log_scale else True)
        steps, values = steps[keep], values[keep]
        if len(values) == 0:
            continue
        mean, std = sliding_mean_std(np.log10(values) if log_scale else values, window)
        low, high = mean - band * std, mean + band * std
        if log_scale:
            mean, low, high = 10**mean, 10**low, 10**high
        (line,) = ax.plot(steps, mean, label=key.partition("/")[2] or key, linewidth=1.2)
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.25, linewidth=0)
    if metric.startswith("angle"):
        ax.axhline(90.0, color="0.5", linestyle="--", linewidth=0.8)
        ax.set_ylim(bottom=0.0)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_YLABELS.get(metric, metric))
    if title:
        ax.set_title(title)
    if len(keys) > 1:
        ax.legend(title="layer" if not metric.startswith("angle_grad") else "parameter", fontsize="small")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        ax.figure.savefig(path, dpi=150)
    return ax
