"""The run directory: what a run writes where, and whether a run may start or resume in it.

A run directory holds the resolved configuration (``config.toml``), per-epoch metrics (``metrics.jsonl`` and
``metrics.csv``), step-level records every ``log.every`` steps (``steps.jsonl``; alignment in ``alignment.jsonl``),
the latest checkpoint (``checkpoint.pt``, written atomically) and, once finished, ``result.json``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import Config, ConfigError, load_config, to_toml

__all__ = ["CHECKPOINT", "RESUMABLE_CHANGES", "RunDirectoryError", "open_run_directory", "unresumable_changes",
           "write_config", "rewind", "write_metrics", "write_result", "append_record", "truncate_records"]

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1  # bumped when the checkpoint's layout changes; another value cannot be resumed
# Keys that may change when a run is resumed: they do not change what is computed (epochs extends a run).
RESUMABLE_CHANGES = ("epochs", "threads", "device", "log.progress", "log.checkpoint_every", "log.eval_batch_size")


class RunDirectoryError(RuntimeError):
    """The run directory holds another run, or a checkpoint that does not fit the configuration."""


def open_run_directory(run: Path | None, cfg: Config, resume: bool) -> dict[str, Any] | None:
    """Check a run may start (or resume) in ``run``, creating it; return the checkpoint to resume from, if any."""
    if run is None:
        if resume:
            raise RunDirectoryError("resume=True needs the run directory to resume from")
        return None
    path = run / CHECKPOINT
    if not resume:
        if path.exists() or (run / "config.toml").exists():
            raise RunDirectoryError(f"{run} already holds a run; continue it with --resume, or choose another "
                                    "directory with --out")
        run.mkdir(parents=True, exist_ok=True)
        return None
    if not path.exists():
        run.mkdir(parents=True, exist_ok=True)
        return None
    start_over = f"to start over, delete the run (rm -r {run}) or train into another directory with --out"
    try:
        saved = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise RunDirectoryError(f"cannot resume {run}: {e}; {start_over}") from e
    if saved.get("format") != CHECKPOINT_FORMAT or "config" not in saved:
        raise RunDirectoryError(f"cannot resume {run}: {path} has checkpoint format {saved.get('format')!r}, this "
                                f"version of fbalign reads format {CHECKPOINT_FORMAT}; {start_over}")
    changed = unresumable_changes(saved["config"], cfg)
    if changed:
        raise RunDirectoryError(f"cannot resume {run}: the configuration differs from the checkpoint's in "
                                f"{', '.join(changed)} (only {', '.join(RESUMABLE_CHANGES)} may change); "
                                "start a new run with --out")
    return saved


def unresumable_changes(saved: Mapping[str, Any], cfg: Config) -> list[str]:
    """The keys in which ``cfg`` differs from a checkpoint's configuration ``saved``, beyond
    :data:`RESUMABLE_CHANGES`: a run with any of them cannot resume from that checkpoint."""
    try:  # through today's schema, so keys added to it since (with their defaults) are no difference
        before = load_config(saved).to_dict()
    except ConfigError:
        before = dict(saved)
    return [k for k in _config_differences(before, cfg.to_dict()) if k not in RESUMABLE_CHANGES]


def _config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    found = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found += _config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            found.append(f"{prefix}{k}")
    return found


def rewind(run: Path, saved: dict[str, Any]) -> None:
    """Before a run resumes from ``saved``: drop the records written after it and rewrite its metrics."""
    truncate_records(run / "steps.jsonl", saved["step"])
    truncate_records(run / "alignment.jsonl", saved["step"])
    write_metrics(run, list(saved["history"]))


def write_config(run: Path, cfg: Config) -> None:
    checkpoint.atomic_write_text(run / "config.toml", to_toml(cfg))


def write_result(run: Path, summary: dict[str, Any]) -> None:
    checkpoint.atomic_write_text(run / "result.json", json.dumps(summary, indent=2) + "\n")


def write_metrics(run: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl`` and ``metrics.csv``: one row per finished epoch."""
    checkpoint.atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    columns: list[str] = []
    for h in history:
        columns += [k for k in h if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    checkpoint.atomic_write_text(run / "metrics.csv", out.getvalue())


def append_record(path: Path, record: dict[str, Any]) -> None:
    """One JSON line (a kill may cut the last line short; :func:`truncate_records` drops it on resume)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_records(path: Path, last_step: int) -> None:
    """Drop records of steps after ``last_step`` (written after the checkpoint a resumed run starts from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line + "\n")
    checkpoint.atomic_write_text(path, "".join(kept))
