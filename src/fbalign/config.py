"""Training configurations: a TOML file, ``--set key=value`` overrides, validated before anything trains.

A configuration names a model, a data set, a rule and its options, an optimizer, a learning-rate schedule,
epochs, batch size, device, seed and logging. Every key is checked: an unknown key or a bad value raises
:class:`ConfigError` naming the key and the valid choices, before any data is loaded. The sections whose
options depend on a choice (``rule``, ``model``, ``data``, ``optimizer``, ``schedule``) hold a ``name`` plus
that choice's options, checked against the rule's fields or the factory's signature.

Example (``configs/digits_mlp.toml``)::

    epochs = 20
    batch_size = 32
    rule = "fa"                       # shorthand for [rule] name = "fa"

    [model]
    name = "mlp"
    hidden = [64]

    [data]
    name = "digits"

    [optimizer]
    name = "sgd"
    lr = 0.05
    momentum = 0.9
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import data as data_module
from . import models, rules
from ._util import check_options
from .optim import BatchManhattan

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "parse_override", "to_toml", "PLAIN_TORCH",
           "OPTIMIZERS", "SCHEDULES"]

PLAIN_TORCH = "torch"
"""Rule name meaning "do not convert": the model trains as plain PyTorch (the speed and accuracy reference)."""


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key and the choices."""


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "bm": BatchManhattan,
}
"""Optimizers by name; ``bm`` is Batch Manhattan (SGD along the sign of the batch gradient)."""


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for a configuration name (see :data:`OPTIMIZERS`)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name = {name!r} is not valid; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


SCHEDULES: dict[str, Any] = {
    "constant": None,
    "multistep": torch.optim.lr_scheduler.MultiStepLR,
    "step": torch.optim.lr_scheduler.StepLR,
    "cosine": torch.optim.lr_scheduler.CosineAnnealingLR,
    "exponential": torch.optim.lr_scheduler.ExponentialLR,
}
"""Learning-rate schedules, stepped once per epoch. ``cosine`` anneals over all epochs unless ``T_max`` is set."""


def _one_of(choices: Mapping[str, Any]) -> Any:
    """A ``name`` validator: the value must be a key of ``choices`` (the registry itself, so the two never differ)."""

    def check(cls: type, value: str) -> str:
        if value not in choices:
            raise ValueError(f"choose one of {', '.join(map(repr, choices))}")
        return value

    return field_validator("name")(classmethod(check))


class _Section(BaseModel):
    """A section whose keys are all declared: any other key is an error."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _Choice(BaseModel):
    """A section naming a choice (``name``) plus that choice's own options (checked by :meth:`Config.check`)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str

    @property
    def options(self) -> dict[str, Any]:
        """Everything but ``name``: the chosen thing's options."""
        return dict(self.model_extra or {})

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class RuleConfig(_Choice):
    """``name``: a rule from :func:`fbalign.rules.available` or ``'torch'`` (no conversion); then its options."""

    name: str = "backprop"


class ModelConfig(_Choice):
    """``name``: ``mlp``, ``lenet5``, ``resnet`` or ``'package.module:factory'``; then the factory's options."""

    name: str = "mlp"


class DataConfig(_Choice):
    """A data set by name, how to prepare it (see :func:`fbalign.data.prepare`), then the loader's options."""

    name: str = "digits"
    _name = _one_of(data_module.DATASETS)
    seed: int = 0
    size: int | None = Field(default=None, ge=1)
    resize: Literal["bilinear", "pad"] = "bilinear"
    validation: int = Field(default=0, ge=0)
    train_size: int | None = Field(default=None, ge=1)
    normalize: bool = False
    augment: bool = False  # training batches: random 4-pixel-padded crop + horizontal flip (fbalign.data.augment)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimizerConfig(_Choice):
    """``name`` (see :data:`OPTIMIZERS`), ``lr``, then the optimizer's own options (momentum, weight_decay, ...)."""

    name: str = "sgd"
    _name = _one_of(OPTIMIZERS)
    lr: float = Field(default=0.01, gt=0)


class ScheduleConfig(_Choice):
    """``name`` (see :data:`SCHEDULES`), then the scheduler's options (``milestones``, ``gamma``, ...)."""

    name: str = "constant"
    _name = _one_of(SCHEDULES)


class LogConfig(_Section):
    """What is recorded while training, and how often."""

    every: int = Field(default=0, ge=0, description="steps between step-level metric records; 0: per epoch only")
    alignment: bool = Field(default=False, description="record alignment (fbalign.metrics.AlignmentRecorder)")
    progress: bool = Field(default=True, description="progress bars")
    checkpoint_every: int = Field(default=0, ge=0, description="steps between checkpoints; 0: at epoch ends only")
    eval_batch_size: int = Field(default=1000, ge=1)


class Config(_Section):
    """A whole training run. Load one with :func:`load_config`; ``Config()`` is a small valid default."""

    name: str | None = None
    seed: int = 0
    device: str = "auto"
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    loss: Literal["auto", "cross_entropy", "mse", "sse"] = "auto"
    threads: int = Field(default=0, ge=0, description="torch CPU threads; 0: torch's default")
    rule: RuleConfig = Field(default_factory=RuleConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError("choose one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
        return value

    def check(self) -> Config:
        """Check the options of every choice (rule, model, data, optimizer, schedule) without building anything
        big; raise :class:`ConfigError` naming the key and the valid options. Returns ``self``."""
        try:
            if self.rule.name != PLAIN_TORCH:
                rules.get(self.rule.name, **self.rule.options)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"rule: {e}" + ("" if self.rule.name in rules.available() else
                                               f" (or {PLAIN_TORCH!r} for the unconverted model)")) from e
        _checked("model", lambda: check_options(models.resolve_factory(self.model.name), self.model.options,
                                                f"model {self.model.name!r}", ("input_shape", "num_outputs")))
        _checked("data", lambda: check_options(data_module.DATASETS[self.data.name], self.data.options,
                                               f"data set {self.data.name!r}"))
        optimizer = optimizer_class(self.optimizer.name)
        _checked("optimizer", lambda: check_options(optimizer, self.optimizer.options,
                                                    f"optimizer {self.optimizer.name!r}", ("params", "lr")))
        scheduler = SCHEDULES[self.schedule.name]
        if scheduler is None and self.schedule.options:
            raise ConfigError(f"schedule: 'constant' takes no options, got {', '.join(self.schedule.options)}")
        if scheduler is not None:
            _checked("schedule", lambda: check_options(scheduler, self.schedule.options,
                                                       f"schedule {self.schedule.name!r}", ("optimizer",)))
            required = [n for n, p in inspect.signature(scheduler).parameters.items()
                        if p.default is p.empty and n != "optimizer" and p.kind is not p.VAR_KEYWORD]
            missing = [n for n in required if n not in self.schedule.options
                       and not (n == "T_max" and self.schedule.name == "cosine")]
            if missing:
                raise ConfigError(f"schedule {self.schedule.name!r} needs {', '.join(missing)} "
                                  f"(e.g. --set schedule.{missing[0]}=...)")
        if self.log.alignment and self.log.every == 0:
            raise ConfigError("log.alignment = true needs log.every > 0 (steps between alignment records)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (every default filled in; no None values, as in TOML)."""
        return _drop_none(self.model_dump(mode="json"))


def _checked(section: str, check: Any) -> None:
    try:
        check()
    except ValueError as e:
        raise ConfigError(f"{section}: {e}") from e


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def parse_override(item: str) -> tuple[str, Any]:
    """``'optimizer.lr=0.1'`` → ``('optimizer.lr', 0.1)``. The value is read as TOML (numbers, booleans,
    ``[1, 2]``, quoted strings); anything else is taken as a bare string (``rule=fa``)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
        raise ConfigError(f"--set {item!r}: write KEY=VALUE with a dotted KEY, e.g. --set optimizer.lr=0.1")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str | tuple[str, Any]]) -> dict[str, Any]:
    """A copy of the raw configuration ``raw`` with each ``key=value`` override set (dotted keys reach into
    sections; setting a section to a string, ``rule=usf``, replaces the whole section)."""
    result = _deep_copy(raw)
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        *path, last = key.split(".")
        node = result
        for part in path:
            child = node.get(part)
            if isinstance(child, str):  # a shorthand section: expand it to a table
                child = {"name": child}
            elif not isinstance(child, dict):
                child = {}
            node[part] = child
            node = child
        node[last] = value
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (inspect.isclass(annotation) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        model = _section_model(loc)
        valid = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {key!r}{hint}; valid keys here: {', '.join(valid)}"
    return f"{key} = {error.get('input')!r}: {error['msg']}"


def validate(raw: Mapping[str, Any]) -> Config:
    """Turn raw data (a parsed TOML file, a dict) into a checked :class:`Config`, or raise :class:`ConfigError`."""
    try:
        config = Config.model_validate(dict(raw))
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    return config.check()


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML file, with a clear error for a missing or malformed one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no configuration file {str(path)!r}" + ("; see configs/ for examples"
                                                                     if not path.exists() else " (not a file)"))
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def load_config(source: str | os.PathLike | Mapping[str, Any] | Config | None = None,
                overrides: Iterable[str | tuple[str, Any]] = ()) -> Config:
    """Load and check a configuration from a TOML file, a dict or a :class:`Config`, with overrides applied.

    ``overrides`` are ``'key=value'`` strings (as given to ``--set``) or ``(dotted_key, value)`` pairs.
    The run's ``name`` defaults to the file's stem.
    """
    if isinstance(source, Config):
        raw = source.model_dump(mode="python")
    elif isinstance(source, Mapping):
        raw = dict(source)
    elif source is None:
        raw = {}
    else:
        raw = read_toml(source)
        raw.setdefault("name", Path(source).stem)
    return validate(apply_overrides(raw, overrides))


def to_toml(config: Config) -> str:
    """The resolved configuration as TOML text (readable back with :func:`load_config`)."""
    import tomli_w

    return tomli_w.dumps(config.to_dict())
