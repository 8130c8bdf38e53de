"""The training loop: :class:`Trainer` holds one run's state (all of it goes into the checkpoint) and steps it.

Each step reads like nanoGPT's: a batch, forward, loss, backward, optimizer step, then one call,
:meth:`Trainer.after_step`, for everything that follows a step (record, check, log, checkpoint, stop).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoint, rundir
from . import data as data_module
from .config import Config
from .data import TensorDataset
from .distributed import Ranks, reduce_step
from .metrics import nse
from .runner import Stop

__all__ = ["Trainer", "TrainResult", "DivergedError", "evaluate"]

_FINITE_CHECK_EVERY = 50  # steps between looks at the loss (one device sync each)


class DivergedError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the likely cause."""


@dataclass
class TrainResult:
    """What :func:`fbalign.train.train` returns.

    Attributes:
        model: the trained model (on the training device).
        config: the resolved configuration.
        history: one dict of metrics per finished epoch (``epoch``, ``step``, ``lr``, ``train_loss``,
            ``test_loss``, ``test_error`` or ``test_nse``, ``val_*`` with a validation split, ``epoch_time`` ...).
        status: ``'finished'`` or ``'interrupted'`` (Ctrl-C / SIGTERM / a stop request: a checkpoint was saved).
        run_dir: where the files went (None: nothing was written).
        world_size: processes that trained the model together (DDP under torchrun; 1 otherwise).
    """

    model: nn.Module
    config: Config
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "finished"
    run_dir: Path | None = None
    world_size: int = 1

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
        """A small JSON-able summary: status, epochs, steps, final and best-by-validation metrics, processes."""
        best = self.best
        return {"status": self.status, "epochs": self.final.get("epoch", 0), "steps": self.final.get("step", 0),
                "final": self.final, "best": best, "rule": self.config.rule.name, "seed": self.config.seed,
                "train_time": sum(h.get("epoch_time", 0.0) for h in self.history),
                "world_size": self.world_size, "batch_per_rank": self.config.batch_size // self.world_size}


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
             classification: bool, batch_size: int = 1000) -> dict[str, float]:
    """Loss and error (%) for classification, loss and NSE (:func:`fbalign.metrics.nse`) for regression, of
    ``model`` in eval mode on ``x`` ``(N, *)`` and ``y`` (``(N,)`` labels or ``(N, outputs)`` targets)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    wrong = torch.zeros((), dtype=torch.int64, device=x.device)
    outputs = []
    for i in range(0, len(x), batch_size):
        out, target = model(x[i:i + batch_size]), y[i:i + batch_size]
        loss_sum += loss_fn(out, target).double() * len(target)
        if classification:
            wrong += (out.argmax(-1) != target).sum()
        else:
            outputs.append(out)
    model.train(was_training)
    metrics = {"loss": float(loss_sum) / len(x)}
    if classification:
        metrics["error"] = 100.0 * float(wrong) / len(x)
    else:
        metrics["nse"] = float(nse(torch.cat(outputs), y))
    return metrics


class Trainer:
    """One training run: its objects, its counters and the loop over them.

    Args:
        cfg: the resolved configuration.
        model: what the forward pass calls (the DDP wrapper when distributed).
        data: the prepared data set, on ``device``.
        loss_fn, optimizer, scheduler: from :mod:`fbalign.builders`.
        order: the generator of the data order (in the checkpoint, so a resumed run sees the same batches).
        run: the run directory (None: nothing is written).
        ranks: this process's place among the DDP processes (rank 0 writes and prints).
        recorder: an :class:`~fbalign.metrics.AlignmentRecorder` or None.
    """

    def __init__(self, cfg: Config, model: nn.Module, data: TensorDataset, loss_fn: Any,
                 optimizer: torch.optim.Optimizer, scheduler: Any, order: torch.Generator, device: torch.device,
                 run: Path | None, ranks: Ranks | None = None, recorder: Any = None) -> None:
        ranks = ranks if ranks is not None else Ranks()
        self.cfg, self.model, self.data, self.loss_fn = cfg, model, data, loss_fn
        self.module: nn.Module = getattr(model, "module", model) if ranks.active else model  # without DDP's wrapper
        self.optimizer, self.scheduler, self.order, self.device = optimizer, scheduler, order, device
        self.run_dir = run if ranks.is_main else None  # only rank 0 writes
        self.ranks, self.recorder = ranks, recorder
        self.steps_per_epoch = len(data.train_x) // cfg.batch_size
        self.rank_batch = cfg.batch_size // ranks.world_size
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
        self.epochs_bar: Any = None
        self.steps_bar: Any = None

    # -- the loop

    def run(self, stop: Stop) -> str:
        """Train to ``cfg.epochs``; ``'finished'``, or ``'interrupted'`` once ``stop`` was requested (after saving
        a checkpoint at the end of the current step)."""
        show = self.cfg.log.progress and self.ranks.is_main
        self.epochs_bar = tqdm(total=self.cfg.epochs, initial=self.epoch, desc=self.cfg.rule.name, unit="epoch",
                               disable=not show, dynamic_ncols=True)
        try:
            with self.recorder if self.recorder is not None else nullcontext():
                while self.epoch < self.cfg.epochs:
                    self.start_epoch()
                    while self.batch < self.steps_per_epoch:
                        x, y = self.next_batch()
                        # A measuring step is measured on its own forward/backward (one extra pass: backprop's).
                        with self.recorder.step(self.step + 1, x, y) if self.recorder is not None else nullcontext():
                            out = self.model(x)
                            loss = self.loss_fn(out, y)
                            self.optimizer.zero_grad(set_to_none=True)
                            loss.backward()
                        self.optimizer.step()
                        if self.after_step(out, y, loss, stop):
                            return "interrupted"
                    self.finish_epoch()
        finally:
            self.epochs_bar.close()
        return "finished"

    def start_epoch(self) -> None:
        if self.perm is None:  # a new epoch (a resumed one keeps its order and place)
            self.perm = torch.randperm(len(self.data.train_x), generator=self.order).to(self.device)
            self.batch = self.checked = 0
            self.elapsed = 0.0
        self.epoch_start = time.perf_counter()
        self.model.train()
        self.steps_bar = tqdm(total=self.steps_per_epoch, initial=self.batch, leave=False, unit="step",
                              desc=f"epoch {self.epoch + 1}", disable=self.epochs_bar.disable, dynamic_ncols=True)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """This rank's slice of the next global batch (the whole batch for one process)."""
        size = self.cfg.batch_size
        idx = self.perm[self.batch * size:(self.batch + 1) * size]
        x, y = self.data.train_x[idx], self.data.train_y[idx]
        # Augmented as one global batch, then sliced: every world size sees the same augmented examples.
        x = data_module.augment_batch(x, self.cfg.data.augment, seed=self.cfg.seed, step=self.step)
        mine = slice(self.ranks.rank * self.rank_batch, (self.ranks.rank + 1) * self.rank_batch)
        return x[mine], y[mine]

    def after_step(self, out: Tensor, y: Tensor, loss: Tensor, stop: Stop) -> bool:
        """Everything after an optimizer step: record the loss, check it is finite, log, checkpoint, and stop
        when asked (True: a checkpoint was saved and the run ends). Every rank takes the same decisions."""
        correct = (out.detach().argmax(-1) == y).sum() if self.data.is_classification else self.correct[0]
        loss, correct, stopping = reduce_step(loss.detach(), correct, stop.requested(), self.ranks)
        self.losses[self.batch] = loss
        if self.data.is_classification:
            self.correct[self.batch] = correct
        self.batch += 1
        self.step += 1
        self.steps_bar.update()
        if self.batch - self.checked >= _FINITE_CHECK_EVERY:
            self.check_finite()
        if self.cfg.log.every and self.step % self.cfg.log.every == 0:
            self.log_steps()
        if self.cfg.log.checkpoint_every and self.step % self.cfg.log.checkpoint_every == 0:
            self.save()
        if stopping:
            self.steps_bar.close()
            self.save()
            if self.ranks.is_main:
                where = f" to {self.run_dir / rundir.CHECKPOINT}" if self.run_dir is not None else ""
                tqdm.write(f"{stop.reason or 'stop request from another rank'}: stopped after step {self.step} "
                           f"(epoch {self.epoch + 1}); checkpoint saved{where}")
        return stopping

    def log_steps(self) -> None:
        start = max(0, self.batch - self.cfg.log.every)
        loss = float(self.losses[start:self.batch].mean())
        self.steps_bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        if self.run_dir is not None:
            rundir.append_record(self.run_dir / "steps.jsonl", {
                "step": self.step, "epoch": self.epoch + self.batch / self.steps_per_epoch, "loss": loss,
                "lr": self.optimizer.param_groups[0]["lr"]})

    def finish_epoch(self) -> None:
        """Evaluate every split, append the epoch's record, step the schedule, write the metrics and checkpoint."""
        self.steps_bar.close()
        self.check_finite()
        epoch_time = self.epoch_seconds()
        self.epoch_start = None
        cfg, data = self.cfg, self.data
        record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step,
                                  "lr": self.optimizer.param_groups[0]["lr"],
                                  "train_loss": float(self.losses.mean())}
        if data.is_classification:
            record["train_error"] = 100.0 - 100.0 * float(self.correct.sum()) / (self.steps_per_epoch * cfg.batch_size)
        start = time.perf_counter()
        for split, (x, y) in data.splits().items():
            if split != "train":
                metrics = evaluate(self.module, x, y, self.loss_fn, classification=data.is_classification,
                                   batch_size=cfg.log.eval_batch_size)
                record.update({f"{split}_{k}": v for k, v in metrics.items()})
        record["epoch_time"] = epoch_time
        record["eval_time"] = time.perf_counter() - start
        if not math.isfinite(record["train_loss"]):  # pragma: no cover - check_finite caught it
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
            rundir.write_metrics(self.run_dir, self.history)
            self.save()
        score = (f"test error {record['test_error']:.2f}%" if "test_error" in record
                 else f"test NSE {record['test_nse']:.3g}")
        self.epochs_bar.update()
        self.epochs_bar.set_postfix_str(score, refresh=False)
        if cfg.log.progress and self.ranks.is_main:
            tqdm.write(f"epoch {record['epoch']}/{cfg.epochs}: train loss {record['train_loss']:.4f}, {score} "
                       f"({epoch_time:.1f} s)")

    def epoch_seconds(self) -> float:
        """Training seconds spent on the current epoch so far, across resumes."""
        return self.elapsed + (time.perf_counter() - self.epoch_start if self.epoch_start is not None else 0.0)

    # -- divergence

    def check_finite(self) -> None:
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
            path = self.run_dir / rundir.CHECKPOINT if self.run_dir is not None else None
            kept = (f"the last good checkpoint is kept in {path}" if path is not None and path.exists()
                    else "no checkpoint was written")
            raise DivergedError(f"the training loss became {value} at step {step} (epoch {self.epoch + 1}, batch "
                                f"{first + 1}); the learning rate (optimizer.lr, now {lr:g}) is the likely cause: "
                                f"lower it, e.g. --set optimizer.lr={lr / 10:g}; {kept}")
        self.checked = self.batch

    # -- checkpoints

    def state(self) -> dict[str, Any]:
        return {
            "format": rundir.CHECKPOINT_FORMAT, "config": self.cfg.to_dict(), "step": self.step,
            "epoch": self.epoch, "batch": self.batch, "perm": None if self.perm is None else self.perm.cpu(),
            "losses": self.losses.cpu(), "correct": self.correct.cpu(), "history": self.history,
            "elapsed": self.epoch_seconds(), "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": checkpoint.rng_state(self.order),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        self.module.load_state_dict(saved["model"])
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

    def save(self) -> None:
        """Check the losses are finite, then (rank 0, with a run directory) write the checkpoint atomically."""
        self.check_finite()
        if self.run_dir is not None:
            checkpoint.save(self.state(), self.run_dir / rundir.CHECKPOINT)
