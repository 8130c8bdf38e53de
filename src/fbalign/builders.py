"""From a configuration to the objects a run trains: device, data, model, loss, optimizer, schedule, recorder.

Each function takes the resolved :class:`~fbalign.config.Config` and returns one object; :func:`fbalign.train.train`
calls them in order. Every error is a :class:`~fbalign.config.ConfigError` (or ``ValueError``) that names the key
to change.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as data_module
from . import models
from .config import PLAIN_TORCH, SCHEDULES, Config, ConfigError, optimizer_class
from .convert import convert
from .data import TensorDataset

__all__ = ["resolve_device", "load_data", "build_model", "convert_model", "check_output", "loss_function",
           "make_optimizer", "make_scheduler", "make_alignment_recorder"]

LossFunction = Callable[[Tensor, Tensor], Tensor]


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
    return convert_model(model, config)


def convert_model(model: nn.Module, config: Config) -> nn.Module:
    """``model`` converted in place to the configured rule (its feedback seeded by ``rule.seed`` or ``seed``)."""
    if config.rule.name == PLAIN_TORCH:
        return model
    options = dict(config.rule.options)
    seed = options.pop("seed", config.seed)
    return convert(model, config.rule.name, inplace=True, seed=seed, **options)


def check_output(model: nn.Module, data: TensorDataset, name: str) -> None:
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


def loss_function(config: Config, data: TensorDataset) -> LossFunction:
    """The configured loss: ``cross_entropy`` (classification), ``mse`` (mean over batch and outputs, on one-hot
    targets for classification), or ``sse`` (½‖y − y*‖² summed over outputs, mean over the batch: Lillicrap
    et al.'s L). ``auto``: cross-entropy for classification, mse for regression. All are means over the batch,
    so the gradient of a batch split over DDP ranks and averaged is the whole batch's."""
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


def make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s parameters (feedback matrices are buffers: not among them)."""
    cls = optimizer_class(config.optimizer.name)
    try:
        return cls(model.parameters(), lr=config.optimizer.lr, **config.optimizer.options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer {config.optimizer.name!r}: {e}") from e


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> Any:
    """The configured learning-rate schedule (stepped once per epoch), or None."""
    cls = SCHEDULES[config.schedule.name]
    if cls is None:
        return None
    options = dict(config.schedule.options)
    if config.schedule.name == "cosine":
        options.setdefault("T_max", config.epochs)
    try:
        return cls(optimizer, **options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"schedule {config.schedule.name!r}: {e}") from e


def make_alignment_recorder(config: Config, model: nn.Module, loss_fn: LossFunction, run: Path | None) -> Any:
    """An :class:`fbalign.metrics.AlignmentRecorder` writing ``alignment.jsonl`` every ``log.every`` steps, or
    None when ``log.alignment`` is off."""
    if not config.log.alignment:
        return None
    if run is None:
        raise ConfigError("log.alignment = true writes alignment.jsonl into the run directory; give one "
                          "(run_dir=... or --out)")
    from .metrics import AlignmentRecorder

    return AlignmentRecorder(model, loss_fn, config.log.every, run / "alignment.jsonl")
