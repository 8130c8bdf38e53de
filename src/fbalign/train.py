"""The training loop: a configuration in, a trained model and its metrics out; ``fbalign train`` on the CLI.

    >>> result = fbalign.train.train("configs/digits_mlp.toml", run_dir="runs/digits-fa", rule="fa")
    >>> result.final["test_error"]

A run directory holds the resolved configuration (``config.toml``), per-epoch metrics (``metrics.jsonl`` and
``metrics.csv``), step-level records every ``log.every`` steps (``steps.jsonl``; alignment in
``alignment.jsonl``), the latest checkpoint (``checkpoint.pt``, written atomically) and, once finished,
``result.json``. A killed run continues with ``resume=True`` (``--resume``); on the CPU its final weights equal
an uninterrupted run's bit for bit. Ctrl-C (or SIGTERM) saves a checkpoint at the end of the current step
and returns. A non-finite loss stops the run with :class:`DivergedError`, keeping the last good checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoint, models
from . import data as data_module
from .config import PLAIN_TORCH, SCHEDULES, Config, ConfigError, load_config, optimizer_class, to_toml
from .convert import convert
from .data import TensorDataset

__all__ = ["train", "TrainResult", "DivergedError", "RunDirectoryError", "evaluate", "build_model", "load_data",
           "resolve_device", "add_parser", "main"]

CHECKPOINT = "checkpoint.pt"
_FINITE_CHECK_EVERY = 50  # steps between looks at the loss (one device sync each)
# Keys that may change when a run is resumed: they do not change what is computed (epochs extends a run).
_RESUMABLE_CHANGES = ("epochs", "threads", "device", "log.progress", "log.checkpoint_every", "log.eval_batch_size")


class DivergedError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the likely cause."""


class RunDirectoryError(RuntimeError):
    """The run directory holds another run, or a checkpoint that does not fit the configuration."""


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (on the training device).
        config: the resolved configuration.
        history: one dict of metrics per finished epoch (``epoch``, ``step``, ``lr``, ``train_loss``,
            ``test_loss``, ``test_error`` or ``test_nse``, ``val_*`` with a validation split, ``epoch_time`` ...).
        status: ``'finished'`` or ``'interrupted'`` (Ctrl-C / SIGTERM: a checkpoint was saved).
        run_dir: where the files went (None: nothing was written).
    """

    model: nn.Module
    config: Config
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "finished"
    run_dir: Path | None = None

    @property
    def final(self) -> dict[str, Any]:
        """Metrics of the last finished epoch (empty before the first)."""
        return self.history[-1] if self.history else {}

    @property
    def best(self) -> dict[str, Any] | None:
        """Metrics of the epoch with the lowest validation error (validation loss for regression); None without
        a validation split. Its ``test_*`` values are the honest, validation-selected test numbers."""
        key = "val_error" if any("val_error" in h for h in self.history) else "val_loss"
        scored = [h for h in self.history if key in h]
        return min(scored, key=lambda h: h[key]) if scored else None

    def summary(self) -> dict[str, Any]:
        """A small JSON-able summary: status, epochs, steps, final and best-by-validation metrics."""
        best = self.best
        return {"status": self.status, "epochs": self.final.get("epoch", 0), "steps": self.final.get("step", 0),
                "final": self.final, "best": best, "rule": self.config.rule.name, "seed": self.config.seed,
                "train_time": sum(h.get("epoch_time", 0.0) for h in self.history)}


# ----------------------------------------------------------------------------------------------------- pieces

def resolve_device(name: str) -> torch.device:
    """``'auto'`` → CUDA when available, else the CPU; anything else as given (checked to exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} but CUDA is not available here (torch {torch.__version__}); "
                          "use device = 'cpu' or 'auto'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device = {name!r} but MPS is not available here; use device = 'cpu' or 'auto'")
    return device


def load_data(config: Config) -> TensorDataset:
    """The configured data set, prepared (resized, split, normalized), on the CPU."""
    section = config.data
    options = dict(section.options)
    if "seed" in inspect.signature(data_module.DATASETS[section.name]).parameters:
        options.setdefault("seed", section.seed)
    raw = data_module.load(section.name, **options)
    return data_module.prepare(raw, size=section.size, resize=section.resize, validation=section.validation,
                               train_size=section.train_size, normalize=section.normalize, seed=section.seed)


def build_model(config: Config, data: TensorDataset) -> nn.Module:
    """The configured model for ``data``, converted to the configured rule (seeded by ``config.seed``)."""
    torch.manual_seed(config.seed)
    model = models.build(config.model.name, input_shape=data.input_shape, num_outputs=data.num_outputs,
                         **config.model.options)
    return _convert(model, config)


def _convert(model: nn.Module, config: Config) -> nn.Module:
    if config.rule.name == PLAIN_TORCH:
        return model
    options = dict(config.rule.options)
    seed = options.pop("seed", config.seed)
    return convert(model, config.rule.name, inplace=True, seed=seed, **options)


def _check_output(model: nn.Module, data: TensorDataset, name: str) -> None:
    """Run two examples through ``model``: its output must be ``(2, data.num_outputs)``."""
    probe = data.train_x[:2]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as e:
        raise ValueError(f"model {name!r} failed on a batch of inputs of shape {tuple(probe.shape)} from "
                         f"{data.name}: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    expected = (len(probe), data.num_outputs)
    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
    if shape != expected:
        what = f"{data.num_classes} classes" if data.is_classification else f"{data.num_outputs} target dimensions"
        raise ValueError(f"model {name!r} gives output of shape {shape} for inputs of shape {tuple(probe.shape)}, "
                         f"but {data.name} needs {expected} (batch, {what}); change the model's last layer")


def loss_function(config: Config, data: TensorDataset) -> Callable[[Tensor, Tensor], Tensor]:
    """The configured loss: ``cross_entropy`` (classification), ``mse`` (mean over batch and outputs, on one-hot
    targets for classification), or ``sse`` (½‖y − y*‖² summed over outputs, mean over the batch: Lillicrap
    et al.'s L). ``auto``: cross-entropy for classification, mse for regression."""
    name = config.loss
    if name == "auto":
        name = "cross_entropy" if data.is_classification else "mse"
    if name == "cross_entropy":
        if not data.is_classification:
            raise ConfigError(f"loss = 'cross_entropy' needs class labels, but {data.name} is a regression task; "
                              "use loss = 'mse' or 'sse'")
        return F.cross_entropy

    def target(out: Tensor, y: Tensor) -> Tensor:
        return F.one_hot(y, out.shape[-1]).to(out.dtype) if data.is_classification else y

    if name == "mse":
        return lambda out, y: F.mse_loss(out, target(out, y))
    return lambda out, y: 0.5 * (out - target(out, y)).square().sum(-1).mean()


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
             classification: bool, batch_size: int = 1000) -> dict[str, float]:
    """Loss and error (%) for classification, loss and NSE for regression, of ``model`` in eval mode.

    NSE, the normalized squared error, is Σ‖y − y*‖² / Σ‖y* − mean(y*)‖² (1 for predicting the mean).
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    wrong = torch.zeros((), dtype=torch.int64, device=x.device)
    squared = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, len(x), batch_size):
        out, target = model(x[i:i + batch_size]), y[i:i + batch_size]
        loss_sum += loss_fn(out, target).double() * len(target)
        if classification:
            wrong += (out.argmax(-1) != target).sum()
        else:
            squared += (out - target).double().square().sum()
    model.train(was_training)
    metrics = {"loss": float(loss_sum) / len(x)}
    if classification:
        metrics["error"] = 100.0 * float(wrong) / len(x)
    else:
        metrics["nse"] = float(squared) / float((y - y.mean(0)).double().square().sum())
    return metrics


# ------------------------------------------------------------------------------------------------ run files

def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    checkpoint.atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    columns: list[str] = []
    for h in history:
        columns += [k for k in h if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    checkpoint.atomic_write_text(run_dir / "metrics.csv", out.getvalue())


def _truncate_jsonl(path: Path, last_step: int) -> None:
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


def _config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    found = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found += _config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            found.append(f"{prefix}{k}")
    return found


_STOP: list[str] = []  # names of the stop signals received (SIGINT, SIGTERM) while a run was in progress


def _request_stop(signum: int, frame: Any) -> None:
    if "SIGINT" in _STOP and signum == signal.SIGINT:  # a second Ctrl-C: stop now
        raise KeyboardInterrupt
    _STOP.append(signal.Signals(signum).name)


_PARENT_STOP: Any = None  # in a worker of ``fbalign compare``: the parent's stop request (a multiprocessing Event)


def stopped_by_parent() -> bool:
    """In a worker of ``fbalign compare``: whether the parent has asked every run to stop."""
    return _PARENT_STOP is not None and _PARENT_STOP.is_set()


def catch_stop_signals(stop_event: Any = None) -> None:
    """Turn SIGINT and SIGTERM into stop requests for this whole process (a worker of ``fbalign compare``): a
    signal that arrives while a run is still loading its data stops it after its first step.

    ``stop_event`` (a ``multiprocessing.Event``) carries a stop from the parent: a ``kill`` of the parent alone,
    or a scheduler's SIGTERM, reaches no worker, so the parent sets the event and a thread here turns it into
    the same request a signal makes.
    """
    global _PARENT_STOP
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _request_stop)
    if stop_event is not None:
        _PARENT_STOP = stop_event

        def forward() -> None:
            stop_event.wait()
            _STOP.append("stop request from fbalign compare")

        threading.Thread(target=forward, daemon=True, name="fbalign-stop").start()


@contextmanager
def _stop_requests(enabled: bool) -> Iterator[list[str]]:
    """Catch SIGINT and SIGTERM during a run: the first sets a flag the loop reads after each step (so a checkpoint
    is saved and the run returns cleanly); a second SIGINT interrupts at once."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield []
        return
    previous = {s: signal.signal(s, _request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield _STOP
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _STOP.clear()


# -------------------------------------------------------------------------------------------------- the loop

def train(config: Config | Mapping[str, Any] | str | os.PathLike | None = None, *,
          run_dir: str | os.PathLike | None = None, resume: bool = False, overrides: Iterable[str] = (),
          handle_signals: bool = True, **settings: Any) -> TrainResult:
    """Train the model a configuration describes; return the trained model and its per-epoch metrics.

    Args:
        config: a TOML file, a dict, a :class:`~fbalign.config.Config`, or None (the defaults).
        run_dir: where to write the resolved config, metrics and checkpoints; None writes nothing.
        resume: continue from ``run_dir``'s checkpoint (a fresh start when there is none). Without it, a
            ``run_dir`` that already holds a run is an error, so no finished work is overwritten.
        overrides: ``'key=value'`` strings, as given to ``--set``.
        handle_signals: catch Ctrl-C / SIGTERM to save a checkpoint and return ``status='interrupted'``.
        **settings: more overrides as keyword arguments: top-level keys (``epochs=5``), sections as dicts
            (``optimizer={'name': 'adam', 'lr': 1e-3}``) or names (``rule='fa'``). Two take objects
            instead: ``model=`` an ``nn.Module`` to train (converted to the rule in place) and ``data=`` a
            :class:`~fbalign.data.TensorDataset` (used as is; ``data.*`` preparation keys are ignored).

    Raises:
        ConfigError: an unknown key or bad value, before anything is loaded.
        DivergedError: the loss became NaN/Inf (the last good checkpoint is kept).
        RunDirectoryError: ``run_dir`` holds another run and ``resume`` is off, or its checkpoint does not fit.
    """
    model_object = settings.pop("model") if isinstance(settings.get("model"), nn.Module) else None
    data_object = settings.pop("data") if isinstance(settings.get("data"), TensorDataset) else None
    cfg = load_config(config, [*overrides, *settings.items()])
    if model_object is not None:
        cfg.model = {"name": f"<{type(model_object).__name__} object>"}  # type: ignore[assignment]
    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, device, Path(run_dir) if run_dir is not None else None, resume, handle_signals,
                      model_object, data_object)
    finally:
        torch.set_num_threads(threads)  # the caller's setting: config.threads holds for this run only


def _train(cfg: Config, device: torch.device, run: Path | None, resume: bool, handle_signals: bool,
           model_object: nn.Module | None, data_object: TensorDataset | None) -> TrainResult:
    saved = _open_run_directory(run, cfg, resume)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    data = data_object if data_object is not None else load_data(cfg)
    if len(data.train_x) < cfg.batch_size:
        raise ConfigError(f"batch_size = {cfg.batch_size} is larger than the {len(data.train_x)} training examples "
                          f"of {data.name}; lower batch_size")
    if model_object is not None:
        model = _convert(model_object, cfg)
    else:
        model = build_model(cfg, data)
    data = data.to(device)
    model = model.to(device)
    _check_output(model, data, cfg.model.name)
    loss_fn = loss_function(cfg, data)
    optimizer = _optimizer(cfg, model)
    scheduler = _scheduler(cfg, optimizer)
    order = torch.Generator().manual_seed(cfg.seed)

    loop = _Loop(cfg, model, data, loss_fn, optimizer, scheduler, order, device, run)
    if saved is not None:
        loop.restore(saved)
        if loop.epoch < cfg.epochs and run is not None:  # an extended run is not finished any more
            (run / "result.json").unlink(missing_ok=True)
    if run is not None:
        checkpoint.atomic_write_text(run / "config.toml", to_toml(cfg))
    with _stop_requests(handle_signals) as stop:
        status = loop.run(stop)
    result = TrainResult(model, cfg, loop.history, status, run)
    if run is not None and status == "finished":
        checkpoint.atomic_write_text(run / "result.json", json.dumps(result.summary(), indent=2) + "\n")
    return result


def _open_run_directory(run: Path | None, cfg: Config, resume: bool) -> dict[str, Any] | None:
    """Check ``run`` may be used; return its checkpoint when resuming from one."""
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
    saved = checkpoint.load(path)
    try:  # through today's schema, so keys added to it since (with their defaults) are no difference
        before = load_config(saved["config"]).to_dict()
    except ConfigError:
        before = saved["config"]
    changed = [k for k in _config_differences(before, cfg.to_dict()) if k not in _RESUMABLE_CHANGES]
    if changed:
        raise RunDirectoryError(f"cannot resume {run}: the configuration differs from the checkpoint's in "
                                f"{', '.join(changed)} (only {', '.join(_RESUMABLE_CHANGES)} may change); "
                                "start a new run with --out")
    return saved


def _optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    cls = optimizer_class(cfg.optimizer.name)
    try:
        return cls(model.parameters(), lr=cfg.optimizer.lr, **cfg.optimizer.options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer {cfg.optimizer.name!r}: {e}") from e


def _scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> Any:
    cls = SCHEDULES[cfg.schedule.name]
    if cls is None:
        return None
    options = dict(cfg.schedule.options)
    if cfg.schedule.name == "cosine":
        options.setdefault("T_max", cfg.epochs)
    try:
        return cls(optimizer, **options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"schedule {cfg.schedule.name!r}: {e}") from e


def _alignment_recorder(cfg: Config, model: nn.Module, loss_fn: Any, run: Path | None) -> Any:
    """An :class:`fbalign.metrics.AlignmentRecorder` writing ``alignment.jsonl`` every ``log.every`` steps."""
    if not cfg.log.alignment:
        return None
    if run is None:
        raise ConfigError("log.alignment = true writes alignment.jsonl into the run directory; give one "
                          "(run_dir=... or --out)")
    try:
        from .metrics import AlignmentRecorder
    except ImportError as e:  # pragma: no cover - fbalign.metrics ships with fbalign
        raise ConfigError("log.alignment = true needs fbalign.metrics, which this install lacks") from e
    return AlignmentRecorder(model, loss_fn, cfg.log.every, run / "alignment.jsonl")


class _Loop:
    """The state of one training run and the loop over it; everything here goes into the checkpoint."""

    def __init__(self, cfg: Config, model: nn.Module, data: TensorDataset, loss_fn: Any,
                 optimizer: torch.optim.Optimizer, scheduler: Any, order: torch.Generator, device: torch.device,
                 run: Path | None) -> None:
        self.cfg, self.model, self.data, self.loss_fn = cfg, model, data, loss_fn
        self.optimizer, self.scheduler, self.order, self.device, self.run_dir = optimizer, scheduler, order, device, run
        self.steps_per_epoch = len(data.train_x) // cfg.batch_size
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epochs finished
        self.batch = 0  # batches of the current epoch done
        self.perm: Tensor | None = None  # the current epoch's data order
        self.losses = torch.zeros(self.steps_per_epoch, device=device)  # this epoch's per-step training losses
        self.correct = torch.zeros(self.steps_per_epoch, dtype=torch.int64, device=device)
        self.checked = 0  # batches of this epoch whose loss is known to be finite
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0  # training seconds of the current epoch before this process took over
        self.epoch_start: float | None = None  # when this process began (or resumed) the current epoch

    # -- checkpoints

    def state(self) -> dict[str, Any]:
        return {
            "format": 1, "config": self.cfg.to_dict(), "step": self.step, "epoch": self.epoch, "batch": self.batch,
            "perm": None if self.perm is None else self.perm.cpu(), "losses": self.losses.cpu(),
            "correct": self.correct.cpu(), "history": self.history, "elapsed": self._epoch_seconds(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": checkpoint.rng_state(self.order),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        self.step, self.epoch, self.batch = saved["step"], saved["epoch"], saved["batch"]
        self.perm = None if saved["perm"] is None else saved["perm"].to(self.device)
        self.losses.copy_(saved["losses"])
        self.correct.copy_(saved["correct"])
        self.checked = self.batch
        self.history = list(saved["history"])
        self.elapsed = saved["elapsed"]
        checkpoint.set_rng_state(saved["rng"], self.order)
        if self.run_dir is not None:
            _truncate_jsonl(self.run_dir / "steps.jsonl", self.step)
            _truncate_jsonl(self.run_dir / "alignment.jsonl", self.step)
            _write_metrics(self.run_dir, self.history)

    def save(self) -> None:
        if self.run_dir is not None:
            self._check_finite()
            checkpoint.save(self.state(), self.run_dir / CHECKPOINT)

    # -- divergence

    def _check_finite(self) -> None:
        """Raise :class:`DivergedError` naming the first step whose loss was NaN/Inf (one device sync)."""
        recent = self.losses[self.checked:self.batch]
        if len(recent) == 0:
            return
        bad = (~torch.isfinite(recent)).nonzero()
        if len(bad):
            first = self.checked + int(bad[0])
            step = self.step - (self.batch - first) + 1
            value = float(recent[int(bad[0])])
            lr = self.optimizer.param_groups[0]["lr"]
            kept = (f"the last good checkpoint is kept in {self.run_dir / CHECKPOINT}" if self.run_dir is not None
                    and (self.run_dir / CHECKPOINT).exists() else "no checkpoint was written")
            raise DivergedError(f"the training loss became {value} at step {step} (epoch {self.epoch + 1}, batch "
                                f"{first + 1}); the learning rate (optimizer.lr, now {lr:g}) is the likely cause: "
                                f"lower it, e.g. --set optimizer.lr={lr / 10:g}; {kept}")
        self.checked = self.batch

    # -- the loop

    def _epoch_seconds(self) -> float:
        """Training seconds spent on the current epoch so far, across resumes."""
        return self.elapsed + (time.perf_counter() - self.epoch_start if self.epoch_start is not None else 0.0)

    def run(self, stop: list[str]) -> str:
        cfg, data = self.cfg, self.data
        x_train, y_train = data.train_x, data.train_y
        batch_size, classification = cfg.batch_size, data.is_classification
        model, loss_fn, optimizer = self.model, self.loss_fn, self.optimizer
        recorder = _alignment_recorder(cfg, model, loss_fn, self.run_dir)
        log_every, checkpoint_every = cfg.log.every, cfg.log.checkpoint_every
        show = cfg.log.progress
        epochs_bar = tqdm(total=cfg.epochs, initial=self.epoch, desc=f"{cfg.rule.name}", unit="epoch",
                          disable=not show, dynamic_ncols=True)
        try:
            with recorder if recorder is not None else nullcontext():
                while self.epoch < cfg.epochs:
                    if self.perm is None:
                        self.perm = torch.randperm(len(x_train), generator=self.order).to(self.device)
                        self.batch = self.checked = 0
                        self.elapsed = 0.0
                    self.epoch_start = time.perf_counter()
                    model.train()
                    steps_bar = tqdm(total=self.steps_per_epoch, initial=self.batch, leave=False, unit="step",
                                     desc=f"epoch {self.epoch + 1}", disable=not show, dynamic_ncols=True)
                    while self.batch < self.steps_per_epoch:
                        idx = self.perm[self.batch * batch_size:(self.batch + 1) * batch_size]
                        x, y = x_train[idx], y_train[idx]
                        x = data_module.augment_batch(x, cfg.data.augment, seed=cfg.seed, step=self.step)
                        # A measuring step is measured on its own forward/backward (one extra pass: backprop's).
                        with recorder.step(self.step + 1, x, y) if recorder is not None else nullcontext():
                            out = model(x)
                            loss = loss_fn(out, y)
                            optimizer.zero_grad(set_to_none=True)
                            loss.backward()
                        optimizer.step()
                        self.losses[self.batch] = loss.detach()
                        if classification:
                            self.correct[self.batch] = (out.detach().argmax(-1) == y).sum()
                        self.batch += 1
                        self.step += 1
                        steps_bar.update()
                        if self.batch - self.checked >= _FINITE_CHECK_EVERY:
                            self._check_finite()
                        if log_every and self.step % log_every == 0:
                            self._log_steps(log_every, steps_bar)
                        if checkpoint_every and self.step % checkpoint_every == 0:
                            self.save()
                        if stop:
                            steps_bar.close()
                            self.save()
                            where = f" to {self.run_dir / CHECKPOINT}" if self.run_dir is not None else ""
                            tqdm.write(f"{stop[0]}: stopped after step {self.step} (epoch {self.epoch + 1}); "
                                       f"checkpoint saved{where}")
                            return "interrupted"
                    steps_bar.close()
                    self._finish_epoch(epochs_bar)
        finally:
            epochs_bar.close()
        return "finished"

    def _log_steps(self, every: int, bar: Any) -> None:
        start = max(0, self.batch - every)
        loss = float(self.losses[start:self.batch].mean())
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        if self.run_dir is not None:
            record = {"step": self.step, "epoch": self.epoch + self.batch / self.steps_per_epoch, "loss": loss,
                      "lr": self.optimizer.param_groups[0]["lr"]}
            with open(self.run_dir / "steps.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _finish_epoch(self, bar: Any) -> None:
        self._check_finite()
        epoch_time = self._epoch_seconds()
        self.epoch_start = None
        cfg, data = self.cfg, self.data
        record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step,
                                  "lr": self.optimizer.param_groups[0]["lr"],
                                  "train_loss": float(self.losses.mean())}
        if data.is_classification:
            record["train_error"] = 100.0 - 100.0 * float(self.correct.sum()) / (self.steps_per_epoch * cfg.batch_size)
        start = time.perf_counter()
        for split, (x, y) in data.splits().items():
            if split == "train":
                continue
            metrics = evaluate(self.model, x, y, self.loss_fn, classification=data.is_classification,
                               batch_size=cfg.log.eval_batch_size)
            record.update({f"{split}_{k}": v for k, v in metrics.items()})
        record["epoch_time"] = epoch_time
        record["eval_time"] = time.perf_counter() - start
        if not math.isfinite(record["train_loss"]):  # pragma: no cover - _check_finite caught it
            raise DivergedError("non-finite training loss")
        self.history.append(record)
        if self.scheduler is not None:
            self.scheduler.step()
        self.epoch += 1
        self.perm = None
        self.batch = self.checked = 0
        self.elapsed = 0.0
        self.losses.zero_()
        self.correct.zero_()
        if self.run_dir is not None:
            _write_metrics(self.run_dir, self.history)
            self.save()
        score = (f"test error {record['test_error']:.2f}%" if "test_error" in record
                 else f"test NSE {record['test_nse']:.3g}")
        bar.update()
        bar.set_postfix_str(score, refresh=False)
        if self.cfg.log.progress:
            tqdm.write(f"epoch {record['epoch']}/{cfg.epochs}: train loss {record['train_loss']:.4f}, {score} "
                       f"({epoch_time:.1f} s)")


# -------------------------------------------------------------------------------------------------------- CLI

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model from a TOML configuration",
                              description="Train a model from a TOML configuration (see configs/). Writes the "
                              "resolved config, metrics and checkpoints to the run directory.")
    p.add_argument("config", help="TOML configuration file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set rule=fa --set optimizer.lr=0.1 (repeatable)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.out) if args.out else Path("runs") / (cfg.name or "run")
        result = train(cfg, run_dir=run_dir, resume=args.resume)
    except (ConfigError, RunDirectoryError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DivergedError as e:
        print(f"error: diverged: {e}", file=sys.stderr)
        return 3
    if result.status == "interrupted":
        print(f"interrupted; continue with: fbalign train {args.config} "
              + "".join(f"--set {o} " for o in args.overrides) + f"--out {run_dir} --resume", file=sys.stderr)
        return 130
    final = result.final
    score = (f"test error {final['test_error']:.2f}%" if "test_error" in final else f"test NSE {final['test_nse']:.4g}")
    best = result.best
    if best is not None and "test_error" in best:
        score += f"; at the best validation epoch ({best['epoch']}): test error {best['test_error']:.2f}%"
    print(f"finished {final.get('epoch', 0)} epoch(s): {score}; run directory {run_dir}")
    return 0
