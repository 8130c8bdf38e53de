"""Record alignment measurements while training: every N steps, one line in a JSONL or CSV file (and TensorBoard).

    recorder = AlignmentRecorder(model, loss_fn, every=100, path="runs/fa/alignment.jsonl")
    with recorder:
        for step, (x, y) in enumerate(loader):
            with recorder.step(step, x, y):      # measures on steps 0, 100, 200, ...: one extra forward/backward
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
            optimizer.step()
    records = load_records("runs/fa/alignment.jsonl")

``recorder.record(step, x, y)`` measures without a training step around it (two extra passes).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from .alignment import LossFn, measure_alignment, measure_step

__all__ = ["AlignmentRecorder", "load_records"]


class AlignmentRecorder:
    """Measure alignment (:func:`fbalign.metrics.measure_alignment`) every ``every`` steps and append it to a file.

    Each measurement is one record: ``{"step": step, **measurement}`` (keys in
    :mod:`fbalign.metrics.alignment`). Records are appended to ``path`` as one JSON object per line, or as CSV
    rows when ``path`` ends in ``.csv`` (undefined values are ``null`` / empty), and flushed to disk at once, so
    a killed run keeps every finished record. An existing file is appended to (a resumed run continues it;
    :func:`load_records` keeps the last record of a repeated step).

    Two ways to measure. :meth:`step` wraps the training step's forward and backward and measures on them: one
    extra forward/backward per measurement (backprop's reference). :meth:`record` measures a batch on its own
    (:func:`~fbalign.metrics.measure_alignment`: the rule's pass and backprop's, two extra). Either way training
    is untouched: a run with a recorder follows the same trajectory, bit for bit, as one without. Between
    measurements both return at once and nothing is hooked into the model.

    Args:
        model: the model being trained (with fbalign layers).
        loss_fn: the training loss, ``loss_fn(model(inputs), targets)`` → scalar.
        every: measure when ``step % every == 0``.
        path: the JSONL (or ``.csv``) file; its folder is created.
        tensorboard_dir: also log every value as a TensorBoard scalar there (needs the ``tensorboard`` package;
            without it a warning says so and the file is still written).
        reference: optional held-out ``(inputs, targets)`` scored at every measurement (``loss_reference``,
            ``nse_reference``), e.g. the test set of Lillicrap et al.'s NSE curves.
        pseudo_backprop: also record ``angle_dh_pbp`` (costs an SVD of every Linear weight per measurement).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, every: int, path: str | os.PathLike, *,
                 tensorboard_dir: str | os.PathLike | None = None, reference: tuple[Any, Any] | None = None,
                 pseudo_backprop: bool = False) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive whole number of steps, not {every!r}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), not {type(loss_fn).__name__}")
        self.model, self.loss_fn, self.every = model, loss_fn, every
        self.reference, self.pseudo_backprop = reference, pseudo_backprop
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._csv = self.path.suffix.lower() == ".csv"
        self._columns: list[str] | None = _csv_header(self.path) if self._csv else None
        self._file = open(self.path, "a", newline="" if self._csv else None, encoding="utf-8")
        self._tensorboard = _summary_writer(tensorboard_dir) if tensorboard_dir is not None else None

    def measures(self, step: int) -> bool:
        """Whether ``step`` is a measuring step (``step % every == 0``)."""
        return step % self.every == 0

    @contextlib.contextmanager
    def step(self, step: int, inputs: Any, targets: Any) -> Iterator[dict[str, float]]:
        """Wrap one training step's forward and backward on ``(inputs, targets)``; on a measuring step, measure on
        them (:func:`~fbalign.metrics.measure_step`) and append the record when the block ends.

        Call ``optimizer.step()`` after the block. Yields a dict: on a measuring step it holds the record
        (``step`` and the measurements) once the block has ended; otherwise it stays empty and nothing is hooked.
        """
        if not self.measures(step):
            yield {}
            return
        self._check_open()
        row: dict[str, float] = {"step": step}
        with measure_step(self.model, self.loss_fn, inputs, targets, reference=self.reference,
                          pseudo_backprop=self.pseudo_backprop) as measured:
            yield row
        row.update(measured)
        self._append(row)

    def record(self, step: int, inputs: Any, targets: Any) -> dict[str, float] | None:
        """Measure on this batch if ``step % every == 0`` and append the record; return it, else None.

        Runs the rule's forward/backward and backprop's on the batch (two passes); inside a training loop,
        :meth:`step` measures on the step's own pass instead (one extra pass).
        """
        if not self.measures(step):
            return None
        self._check_open()
        measured = measure_alignment(self.model, self.loss_fn, inputs, targets, reference=self.reference,
                                     pseudo_backprop=self.pseudo_backprop)
        row: dict[str, float] = {"step": step, **measured}
        self._append(row)
        return row

    def _check_open(self) -> None:
        if self._file.closed:
            raise ValueError(f"this AlignmentRecorder was closed; create a new one to keep writing {self.path}")

    def _append(self, row: dict[str, float]) -> None:
        self._write(row)
        if self._tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self._tensorboard.add_scalar(key, value, row["step"])
            self._tensorboard.flush()

    def _write(self, row: dict[str, float]) -> None:
        if self._csv:
            if self._columns is None:
                self._columns = list(row)
                csv.writer(self._file).writerow(self._columns)
            extra = [key for key in row if key not in self._columns]
            if extra:
                warnings.warn(f"{self.path} has no column for {', '.join(extra)} (its columns were fixed by its "
                              "first record); those values go only to TensorBoard; use a .jsonl file to keep them",
                              stacklevel=4)
            csv.writer(self._file).writerow(["" if _undefined(row.get(k)) else row[k] for k in self._columns])
        else:
            clean = {key: None if _undefined(value) else value for key, value in row.items()}
            self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file (and the TensorBoard writer). Idempotent."""
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> AlignmentRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every={self.every}, path={str(self.path)!r})"


def _undefined(value: object) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def _csv_header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), None)


def _summary_writer(log_dir: str | os.PathLike) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard_dir was given but the tensorboard package is not installed, so nothing goes to "
                      "TensorBoard (the JSONL/CSV file is still written); pip install tensorboard", stacklevel=3)
        return None
    return SummaryWriter(log_dir=str(log_dir))


def load_records(path: str | os.PathLike) -> list[dict[str, float]]:
    """Read the records an :class:`AlignmentRecorder` wrote (JSONL, or CSV by suffix), sorted by step.

    Undefined values come back as ``nan``. Where a step occurs more than once (a run resumed from an earlier
    checkpoint re-measures it), the last record wins. A torn last line (a run killed mid-write) is skipped.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no alignment records at {path}; AlignmentRecorder(path=...) writes them")
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".csv":
            rows = [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()}
                    for row in csv.DictReader(f)]
        else:
            lines = [line for line in f.read().splitlines() if line.strip()]
            rows = []
            for i, line in enumerate(lines):
                try:
                    rows.append({k: math.nan if v is None else v for k, v in json.loads(line).items()})
                except json.JSONDecodeError:
                    if i < len(lines) - 1:
                        raise ValueError(f"{path}, line {i + 1}, is not a JSON record: {line[:80]!r}") from None
                    warnings.warn(f"{path}: skipped a torn last line (a run stopped while writing it)", stacklevel=2)
    by_step = {}
    for row in rows:
        if not math.isfinite(row.get("step", math.nan)):
            continue  # a torn CSV row
        row["step"] = int(row["step"])
        by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]
