"""The training loop: :class:`Trainer` holds one run's state (all of it goes into the checkpoint) and steps it.

Each step reads like nanoGPT's: a batch, forward, loss, backward, optimizer step, then one call,
:meth:`Trainer.after_step`, for everything that follows a step (record, check, log, checkpoint, stop).
"""

from __future__ import annotations

import math
import time
import warnings
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

__all__ = ["Trainer", "EnsembleTrainer", "TrainResult", "DivergedError", "evaluate", "evaluate_members"]

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
        status: ``'finished'`` or ``'interrupted'`` (Ctrl-C / SIGTERM / a stop request: a checkpoint was saved);
            for a member of :func:`fbalign.train.train_ensemble`, also ``'diverged'`` (see ``error``).
        run_dir: where the files went (None: nothing was written).
        world_size: processes that trained the model together (DDP under torchrun; 1 otherwise).
        error: why a member of an ensemble run stopped (``status == 'diverged'``); None otherwise.
    """

    model: nn.Module
    config: Config
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "finished"
    run_dir: Path | None = None
    world_size: int = 1
    error: str | None = None

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
                "world_size": self.world_size, "batch_per_rank": self.config.batch_size // self.world_size,
                **({"error": self.error} if self.error is not None else {})}


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
                            loss = self.loss(out, y)
                            self.optimizer.zero_grad(set_to_none=True)
                            loss.sum().backward()
                        self.optimizer.step()
                        if self.after_step(out, y, loss, stop):
                            return "interrupted"
                    self.finish_epoch()
        finally:
            self.epochs_bar.close()
        return "finished"

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """The batch's loss (what is recorded; its sum is what is differentiated)."""
        return self.loss_fn(out, y)

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
        stopping = self.record_step(out, y, loss, stop.requested())
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

    def record_step(self, out: Tensor, y: Tensor, loss: Tensor, stopping: bool) -> bool:
        """Keep the step's loss and correct count (all ranks' together); whether any rank stops."""
        correct = (out.detach().argmax(-1) == y).sum() if self.data.is_classification else self.correct[0]
        loss, correct, stopping = reduce_step(loss.detach(), correct, stopping, self.ranks)
        self.losses[self.batch] = loss
        if self.data.is_classification:
            self.correct[self.batch] = correct
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
        score, line = self.record_epoch(epoch_time)
        if self.scheduler is not None:
            self.scheduler.step()
        self.epoch += 1
        self.perm = None
        self.batch = self.checked = 0
        self.elapsed = 0.0
        self.losses.zero_()
        self.correct.zero_()
        if self.run_dir is not None:
            self.save()
        self.epochs_bar.update()
        self.epochs_bar.set_postfix_str(score, refresh=False)
        if self.cfg.log.progress and self.ranks.is_main:
            tqdm.write(f"epoch {self.epoch}/{self.cfg.epochs}: {line} ({epoch_time:.1f} s)")

    def record_epoch(self, epoch_time: float) -> tuple[str, str]:
        """Evaluate, append the epoch's record to the history and write the metrics; the score for the progress
        bar and the line for the log."""
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
        if self.run_dir is not None:
            rundir.write_metrics(self.run_dir, self.history)
        score = _score(record)
        return score, f"train loss {record['train_loss']:.4f}, {score}"

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

    def generators(self) -> tuple[torch.Generator, ...]:
        """The run's own generators, saved in the checkpoint besides torch's, Python's and NumPy's."""
        return (self.order,)

    def state(self) -> dict[str, Any]:
        return {
            "format": rundir.CHECKPOINT_FORMAT, "config": self.cfg.to_dict(), "step": self.step,
            "epoch": self.epoch, "batch": self.batch, "perm": None if self.perm is None else self.perm.cpu(),
            "losses": self.losses.cpu(), "correct": self.correct.cpu(), "history": self.history,
            "elapsed": self.epoch_seconds(), "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": checkpoint.rng_state(*self.generators()),
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
        checkpoint.set_rng_state(saved["rng"], *self.generators())

    def save(self) -> None:
        """Check the losses are finite, then (rank 0, with a run directory) write the checkpoint atomically."""
        self.check_finite()
        if self.run_dir is not None:
            checkpoint.save(self.state(), self.run_dir / rundir.CHECKPOINT)


def _score(record: dict[str, Any]) -> str:
    return f"test error {record['test_error']:.2f}%" if "test_error" in record else f"test NSE {record['test_nse']:.3g}"


@torch.no_grad()
def evaluate_members(ensemble: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                     classification: bool, batch_size: int = 1000) -> list[dict[str, float]]:
    """:func:`evaluate` for each member of an :class:`fbalign.Ensemble`, all on the same ``x`` ``(N, *)`` and ``y``:
    one dict per member, each computed as ``evaluate`` computes it for that member alone."""
    was_training = ensemble.training
    ensemble.eval()
    size = len(ensemble)
    loss_sum = torch.zeros(size, dtype=torch.float64, device=x.device)
    wrong = torch.zeros(size, dtype=torch.int64, device=x.device)
    outputs = []
    for i in range(0, len(x), batch_size):
        out, target = ensemble(x[i:i + batch_size], shared=True), y[i:i + batch_size]
        loss_sum += torch.stack([loss_fn(member, target).double() for member in out]) * len(target)
        if classification:
            wrong += (out.argmax(-1) != target).sum(1)
        else:
            outputs.append(out)
    ensemble.train(was_training)
    losses = [total / len(x) for total in loss_sum.tolist()]
    if classification:
        return [{"loss": loss, "error": 100.0 * count / len(x)} for loss, count in zip(losses, wrong.tolist())]
    out = torch.cat(outputs, 1)
    return [{"loss": loss, "nse": float(nse(member, y))} for loss, member in zip(losses, out)]


class _EveryMemberStopped(Exception):
    pass


class EnsembleTrainer(Trainer):
    """E runs of one set-up trained side by side as one :class:`fbalign.Ensemble` (built by
    :func:`fbalign.train.train_ensemble`). Each member keeps what a :class:`Trainer` keeps for one run: its data
    order (from its own seed's generator), losses, evaluation and history. A member whose loss becomes NaN/Inf (or
    whose weights do: the ensemble stops it) is stopped with the reason in :attr:`stopped`; the others train on, and
    the run ends early once every member has stopped. One optimizer, schedule and checkpoint serve all members.

    Args: as :class:`Trainer`, but ``configs`` (one per member; the first is ``cfg``, whose shared settings rule)
    and ``orders`` (one data-order generator per member); one process only (no DDP, no alignment recorder).
    """

    def __init__(self, configs: list[Config], ensemble: Any, data: TensorDataset, loss_fn: Any,
                 optimizer: torch.optim.Optimizer, scheduler: Any, orders: list[torch.Generator],
                 device: torch.device, run: Path | None) -> None:
        super().__init__(configs[0], ensemble, data, loss_fn, optimizer, scheduler, orders[0], device, run)
        self.configs, self.orders = list(configs), list(orders)
        size = ensemble.size
        self.losses = torch.zeros(self.steps_per_epoch, size, device=device)
        self.correct = torch.zeros(self.steps_per_epoch, size, dtype=torch.int64, device=device)
        self.histories: list[list[dict[str, Any]]] = [[] for _ in range(size)]
        self.history = self.histories[0]
        self.stopped: dict[int, str] = {}  # member -> why it stopped

    def run(self, stop: Stop) -> str:
        from .ensemble import MemberDivergedWarning

        try:
            with warnings.catch_warnings():  # the member's result says why it stopped
                warnings.simplefilter("ignore", MemberDivergedWarning)
                return super().run(stop)
        except _EveryMemberStopped:
            self.steps_bar.close()
            return "finished"

    def start_epoch(self) -> None:
        if self.perm is None:
            self.perm = torch.stack([torch.randperm(len(self.data.train_x), generator=order)
                                     for order in self.orders]).to(self.device)
            self.batch = self.checked = 0
            self.elapsed = 0.0
        super().start_epoch()

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """Every member's next batch, ``(E, B, ...)``: member ``e``'s examples in its own order."""
        size = self.cfg.batch_size
        idx = self.perm[:, self.batch * size:(self.batch + 1) * size]
        x, y = self.data.train_x[idx], self.data.train_y[idx]
        if self.cfg.data.augment:
            x = torch.stack([data_module.augment_batch(member, True, seed=cfg.seed, step=self.step)
                             for member, cfg in zip(x, self.configs)])
        return x, y

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Each member's loss, ``(E,)``, computed as its run alone computes it (their sum gives each its own
        gradient)."""
        return torch.stack([self.loss_fn(member_out, member_y) for member_out, member_y in zip(out, y)])

    def record_step(self, out: Tensor, y: Tensor, loss: Tensor, stopping: bool) -> bool:
        self.losses[self.batch] = loss.detach()
        if self.data.is_classification:
            self.correct[self.batch] = (out.detach().argmax(-1) == y).sum(1)
        return stopping

    def check_finite(self) -> None:
        """Stop every member whose loss became NaN/Inf since the last look (one device sync), or whose weights did
        (the ensemble stopped it at its last finite weights)."""
        recent = self.losses[self.checked:self.batch]
        if len(recent):
            finite = torch.isfinite(recent)
            for member in (~finite.all(0)).nonzero().flatten().tolist():
                if member in self.stopped:
                    continue
                first = self.checked + int((~finite[:, member]).nonzero()[0])
                step = self.step - (self.batch - first) + 1
                lr = self.optimizer.param_groups[0]["lr"] * float(self.module.lr_scale[member])
                self.stopped[member] = (
                    f"member {member}: the training loss became {float(self.losses[first, member])} at step {step} "
                    f"(epoch {self.epoch + 1}, batch {first + 1}); its learning rate (now {lr:g}) is the likely cause")
                self.module.alive[member] = False  # its weights stay where they are from now on
        for member, why in self.module.diverged.items():
            self.stopped.setdefault(member, why)
        self.checked = self.batch
        if len(self.stopped) == len(self.histories):
            raise _EveryMemberStopped

    def log_steps(self) -> None:
        start = max(0, self.batch - self.cfg.log.every)
        losses = self.losses[start:self.batch].mean(0).tolist()
        alive = [loss for member, loss in enumerate(losses) if member not in self.stopped]
        if alive:
            self.steps_bar.set_postfix(loss=f"{min(alive):.4g}", refresh=False)
        if self.run_dir is not None:
            scale = self.module.lr_scale.tolist()
            lr = self.optimizer.param_groups[0]["lr"]
            rundir.append_record(self.run_dir / "steps.jsonl", {
                "step": self.step, "epoch": self.epoch + self.batch / self.steps_per_epoch, "loss": losses,
                "lr": [lr * s for s in scale]})

    def record_epoch(self, epoch_time: float) -> tuple[str, str]:
        cfg, data = self.cfg, self.data
        start = time.perf_counter()
        evaluated = {split: evaluate_members(self.module, x, y, self.loss_fn, classification=data.is_classification,
                                             batch_size=cfg.log.eval_batch_size)
                     for split, (x, y) in data.splits().items() if split != "train"}
        eval_time = time.perf_counter() - start
        lr = self.optimizer.param_groups[0]["lr"]
        scale = self.module.lr_scale.tolist()
        train_loss = self.losses.mean(0).tolist()
        correct = self.correct.sum(0).tolist()
        scores = []
        for member, history in enumerate(self.histories):
            if member in self.stopped:
                continue
            record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step, "lr": lr * scale[member],
                                      "train_loss": train_loss[member]}
            if data.is_classification:
                record["train_error"] = 100.0 - 100.0 * correct[member] / (self.steps_per_epoch * cfg.batch_size)
            for split, metrics in evaluated.items():
                record.update({f"{split}_{k}": v for k, v in metrics[member].items()})
            record["epoch_time"] = epoch_time
            record["eval_time"] = eval_time
            history.append(record)
            scores.append(record.get("test_error", record.get("test_nse")))
            if self.run_dir is not None:
                rundir.write_metrics(self.member_dir(member), history)
        best = min(scores) if data.is_classification else max(scores)
        what = "test error" if data.is_classification else "test NSE"
        score = f"best {what} {best:.3g}{'%' if data.is_classification else ''}"
        return score, f"{len(scores)} of {len(self.histories)} members training, {score}"

    def member_dir(self, member: int) -> Path:
        """Member ``member``'s folder in the run directory (its config, metrics and result)."""
        assert self.run_dir is not None
        folder = self.run_dir / "members" / str(member)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def generators(self) -> tuple[torch.Generator, ...]:
        ensemble = self.module
        return (*self.orders, *[ensemble.generator(member) for member in range(ensemble.size)])

    def state(self) -> dict[str, Any]:
        return {**super().state(), "configs": [cfg.to_dict() for cfg in self.configs], "histories": self.histories,
                "stopped": self.stopped, "ensemble_diverged": dict(self.module.diverged),
                "ensemble_steps": self.module.steps}

    def restore(self, saved: dict[str, Any]) -> None:
        super().restore(saved)
        self.histories = [list(h) for h in saved["histories"]]
        self.history = self.histories[0]
        self.stopped = {int(k): v for k, v in saved["stopped"].items()}
        self.module.diverged.update({int(k): v for k, v in saved["ensemble_diverged"].items()})
        self.module.steps = saved["ensemble_steps"]
