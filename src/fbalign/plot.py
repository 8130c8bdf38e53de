"""``fbalign plot RUN_DIR...``: loss, error and alignment curves of one or several runs on shared axes.

Runs with the same label (``--group rule`` labels each run by its rule) are drawn as their mean with a band of
± one standard deviation across runs; single runs as plain lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, read_toml

__all__ = ["Run", "read_run", "plot_runs", "add_parser", "main"]


@dataclass
class Run:
    """The records of one run directory: per-epoch metrics, step records, alignment records, its config."""

    path: Path
    config: dict[str, Any]
    epochs: list[dict[str, Any]]
    steps: list[dict[str, Any]] = field(default_factory=list)
    alignment: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rule(self) -> str:
        rule = self.config.get("rule", {})
        return rule.get("name", "?") if isinstance(rule, dict) else str(rule)

    @property
    def steps_per_epoch(self) -> float | None:
        return self.epochs[0]["step"] / self.epochs[0]["epoch"] if self.epochs else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a last line cut short by a kill
            continue
    return records


def read_run(path: str | os.PathLike) -> Run:
    """Read a run directory written by :func:`fbalign.train.train`; ``FileNotFoundError`` when it is not one."""
    path = Path(path)
    if not (path / "metrics.jsonl").exists() and not (path / "config.toml").exists():
        raise FileNotFoundError(f"{path} is not a run directory (no metrics.jsonl or config.toml); "
                                "give directories written by `fbalign train` or `fbalign compare`")
    try:
        config = read_toml(path / "config.toml") if (path / "config.toml").exists() else {}
    except ConfigError:
        config = {}
    return Run(path, config, _read_jsonl(path / "metrics.jsonl"), _read_jsonl(path / "steps.jsonl"),
               _read_jsonl(path / "alignment.jsonl"))


def _series(records: list[dict[str, Any]], key: str, x_key: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    points = [(r[x_key] / scale, r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and isinstance(r.get(x_key), (int, float))]
    if not points:
        return np.empty(0), np.empty(0)
    xs, ys = zip(*points)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _draw(ax: Any, series: list[tuple[np.ndarray, np.ndarray]], label: str, color: Any, style: str = "-") -> None:
    series = [s for s in series if len(s[0])]
    if not series:
        return
    if len(series) == 1:
        ax.plot(*series[0], style, color=color, label=label, lw=1.4)
        return
    n = min(len(x) for x, _ in series)  # epochs every run has reached
    x = series[0][0][:n]
    ys = np.stack([y[:n] for _, y in series])
    mean, sd = ys.mean(0), ys.std(0, ddof=1)
    ax.plot(x, mean, style, color=color, label=f"{label} (n={len(series)})", lw=1.6)
    ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.2, lw=0)


def _alignment_keys(runs: Sequence[Run]) -> list[str]:
    """The alignment quantities to draw: ∡(Δh, Δh_BP) per layer when recorded (Lillicrap et al.'s angle), else
    every other angle."""
    keys: list[str] = []
    for run in runs:
        for record in run.alignment:
            keys += [k for k in record if k.startswith("angle") and k not in keys]
    preferred = [k for k in keys if k.startswith("angle_dh_bp/")]
    return preferred or keys


def plot_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
              labels: Sequence[str] | None = None, title: str | None = None) -> Any:
    """Draw the runs' curves on shared axes; save to ``out`` (PNG, PDF or SVG by its suffix) when given.

    Panels: training loss; test error (or test NSE for regression), with validation dashed; alignment
    records when any run has them (one line per recorded quantity). The x-axis is epochs. Runs sharing a
    label are drawn as mean ± sd. Returns the matplotlib figure.
    """
    import matplotlib

    if out is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(p) for p in run_dirs]
    if not runs:
        raise ValueError("plot_runs needs at least one run directory")
    labels = list(labels) if labels is not None else [r.path.name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    groups: dict[str, list[Run]] = {}
    for label, run in zip(labels, runs):
        groups.setdefault(label, []).append(run)
    regression = all("test_nse" in r.epochs[-1] for r in runs if r.epochs)
    score = "nse" if regression else "error"
    align_keys = _alignment_keys(runs)
    panels = 3 if align_keys else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0), squeeze=False)
    axes = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for i, (label, members) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        # Training loss: step records when there are any (finer), else the per-epoch means.
        if all(m.steps for m in members):
            _draw(axes[0], [_series(m.steps, "loss", "step", m.steps_per_epoch or 1) for m in members], label, color)
        else:
            _draw(axes[0], [_series(m.epochs, "train_loss", "epoch") for m in members], label, color)
        _draw(axes[1], [_series(m.epochs, f"test_{score}", "epoch") for m in members], label, color)
        _draw(axes[1], [_series(m.epochs, f"val_{score}", "epoch") for m in members], f"{label} (val)", color,
              "--")
        for j, key in enumerate(align_keys):
            _draw(axes[2], [_series(m.alignment, key, "step", m.steps_per_epoch or 1) for m in members],
                  f"{label}: {key}" if len(align_keys) > 1 else label, color, styles[j % len(styles)])
    axes[0].set(title="training loss", xlabel="epoch", ylabel="loss", yscale="log")
    axes[1].set(title=f"test {'NSE' if regression else 'error'}", xlabel="epoch",
                ylabel="NSE" if regression else "error (%)")
    if regression:
        axes[1].set_yscale("log")
    if align_keys:
        axes[2].set(title="alignment with backprop", xlabel="epoch", ylabel="angle (degrees)")
        axes[2].axhline(90, color="grey", lw=0.8, ls=":")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        plt.close(fig)
    return fig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="draw loss/error/alignment curves of runs on shared axes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (from fbalign train / compare)")
    p.add_argument("--out", default=None, help="image file (default: RUN_DIR/curves.png for one run, else "
                   "curves.png)")
    p.add_argument("--group", choices=["run", "rule"], default="run",
                   help="label each run by its directory name (default) or by its rule (mean ± sd per rule)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "curves.png" if len(args.runs) == 1
                                           else Path("curves.png"))
    try:
        runs = [read_run(p) for p in args.runs]
        labels = [r.rule for r in runs] if args.group == "rule" else None
        plot_runs(args.runs, out, labels=labels, title=args.title)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
