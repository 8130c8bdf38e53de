"""Train the model a configuration describes: a configuration in, a trained model and its metrics out.

    >>> result = fbalign.train.train("configs/digits_mlp.toml", run_dir="runs/digits-fa", rule="fa")
    >>> result.final["test_error"]

On the command line: ``fbalign train CONFIG [--out DIR] [--resume] [--nproc N]``.

The run directory's files are listed in :mod:`fbalign.rundir`. A killed run continues with ``resume=True``
(``--resume``); on the CPU its final weights equal an uninterrupted run's bit for bit. Ctrl-C (or SIGTERM), or a
``stop`` requested by whoever runs this run (:class:`fbalign.runner.Stop`), saves a checkpoint at the end of the
current step and returns. A non-finite loss stops the run with :class:`DivergedError`, keeping the last good
checkpoint. Under ``torchrun`` the processes train one model with DDP (:mod:`fbalign.distributed`).

The pieces live in their own modules: :mod:`fbalign.builders` (config → objects), :mod:`fbalign.rundir` (files,
resume) and :mod:`fbalign.trainer` (the loop); their public names are re-exported here.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from . import distributed, rundir
from .builders import (
    build_model,
    check_output,
    convert_model,
    load_data,
    loss_function,
    make_alignment_recorder,
    make_optimizer,
    make_scheduler,
    resolve_device,
)
from .config import Config, ConfigError, load_config
from .data import TensorDataset
from .rundir import CHECKPOINT, RunDirectoryError, truncate_records
from .runner import Stop
from .trainer import DivergedError, EnsembleTrainer, Trainer, TrainResult, evaluate

__all__ = ["train", "train_ensemble", "TrainResult", "DivergedError", "RunDirectoryError", "evaluate", "build_model",
           "load_data", "resolve_device", "add_parser", "main", "Trainer", "CHECKPOINT"]


def train(config: Config | Mapping[str, Any] | str | os.PathLike | None = None, *,
          run_dir: str | os.PathLike | None = None, resume: bool = False, overrides: Iterable[str] = (),
          stop: Stop | None = None, handle_signals: bool = True, **settings: Any) -> TrainResult:
    """Train the model a configuration describes; return the trained model and its per-epoch metrics.

    Args:
        config: a TOML file, a dict, a :class:`~fbalign.config.Config`, or None (the defaults).
        run_dir: where to write the resolved config, metrics and checkpoints; None writes nothing.
        resume: continue from ``run_dir``'s checkpoint (a fresh start when there is none). Without it, a
            ``run_dir`` that already holds a run is an error, so no finished work is overwritten.
        overrides: ``'key=value'`` strings, as given to ``--set``.
        stop: the stop decision of whoever runs this run (e.g. :func:`fbalign.runner.run`): once requested, the
            run saves a checkpoint after the current step and returns ``status='interrupted'``. With a ``stop``
            the caller owns the signals; without one, this call catches Ctrl-C / SIGTERM itself (in the main
            thread, unless ``handle_signals=False``).
        handle_signals: without ``stop``: catch Ctrl-C / SIGTERM to save a checkpoint and return
            ``status='interrupted'``.
        **settings: more overrides as keyword arguments: top-level keys (``epochs=5``), sections as dicts
            (``optimizer={'name': 'adam', 'lr': 1e-3}``) or names (``rule='fa'``). Two take objects
            instead: ``model=`` an ``nn.Module`` to train (converted to the rule in place) and ``data=`` a
            :class:`~fbalign.data.TensorDataset` (used as is; ``data.*`` preparation keys are ignored).

    Raises:
        ConfigError: an unknown key or bad value, before anything is loaded; a batch the DDP processes cannot
            split evenly.
        DivergedError: the loss became NaN/Inf (the last good checkpoint is kept).
        RunDirectoryError: ``run_dir`` holds another run and ``resume`` is off, or its checkpoint does not fit
            or cannot be read.
    """
    model_object = settings.pop("model") if isinstance(settings.get("model"), nn.Module) else None
    data_object = settings.pop("data") if isinstance(settings.get("data"), TensorDataset) else None
    cfg = load_config(config, [*overrides, *settings.items()])
    if model_object is not None:
        cfg.model = {"name": f"<{type(model_object).__name__} object>"}  # type: ignore[assignment]
    ranks, device = distributed.setup(resolve_device(cfg.device), cfg.batch_size)
    run = Path(run_dir) if run_dir is not None else None
    try:
        return _with_threads_and_stop(cfg, stop, handle_signals, lambda stop: _train(
            cfg, device, run, resume, stop, ranks, model_object, data_object))
    finally:
        distributed.teardown(ranks)


_T = TypeVar("_T")


def _with_threads_and_stop(cfg: Config, stop: Stop | None, handle_signals: bool, work: Callable[[Stop], _T]) -> _T:
    """``work(stop)`` with ``cfg.threads`` torch threads (the caller's setting restored after: it holds for this
    run only), under the caller's ``stop``, or under a new one catching Ctrl-C / SIGTERM when ``handle_signals``."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        if stop is not None:
            return work(stop)
        stop = Stop()
        with stop.catch_signals() if handle_signals else nullcontext():
            return work(stop)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: Config, device: torch.device, run: Path | None, resume: bool, stop: Stop,
           ranks: distributed.Ranks, model_object: nn.Module | None,
           data_object: TensorDataset | None) -> TrainResult:
    saved = distributed.from_main(ranks, lambda: rundir.open_run_directory(run, cfg, resume))
    if saved is not None and run is not None and ranks.is_main:
        rundir.rewind(run, saved)

    # Every rank seeds alike: the same data, model, feedback and (brsf's) redraws everywhere.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    data = data_object if data_object is not None else load_data(cfg)
    if len(data.train_x) < cfg.batch_size:
        raise ConfigError(f"batch_size = {cfg.batch_size} is larger than the {len(data.train_x)} training examples "
                          f"of {data.name}; lower batch_size")
    model = convert_model(model_object, cfg) if model_object is not None else build_model(cfg, data)
    data = data.to(device)
    model = model.to(device)
    check_output(model, data, cfg.model.name)
    distributed.check_same_state(model, ranks)
    loss_fn = loss_function(cfg, data)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    order = torch.Generator().manual_seed(cfg.seed)
    recorder = make_alignment_recorder(cfg, model, loss_fn, run) if ranks.is_main else None

    trainer = Trainer(cfg, distributed.wrap(model, ranks, device), data, loss_fn, optimizer, scheduler, order,
                      device, run, ranks, recorder)
    if saved is not None:
        trainer.restore(saved)
        if trainer.epoch < cfg.epochs and run is not None and ranks.is_main:  # an extended run is unfinished
            (run / "result.json").unlink(missing_ok=True)
    if run is not None and ranks.is_main:
        rundir.write_config(run, cfg)
    status = trainer.run(stop)
    result = TrainResult(model, cfg, trainer.history, status, run, ranks.world_size)
    if run is not None and ranks.is_main and status == "finished":
        rundir.write_result(run, result.summary())
    return result


# Settings members of one ensemble may differ in (everything else is shared: one data set, one schedule, ...).
MEMBER_SETTINGS = ("name", "seed", "rule", "optimizer.lr")


def train_ensemble(configs: Sequence[Config | Mapping[str, Any] | str | os.PathLike], *,
                   models: Sequence[nn.Module] | None = None, data: TensorDataset | None = None,
                   run_dir: str | os.PathLike | None = None, resume: bool = False, stop: Stop | None = None,
                   handle_signals: bool = True) -> list[TrainResult]:
    """Train several runs of one set-up side by side as one :class:`fbalign.Ensemble`, each as :func:`train` would
    train it alone; return one :class:`TrainResult` per configuration, in order.

    The configurations may differ only in ``seed`` (a member's initial weights, feedback matrices, data order and
    brsf draws), ``optimizer.lr`` (a learning-rate grid: the optimizer runs at the largest rate and each member's
    step is scaled to its own, see :class:`fbalign.Ensemble`), ``rule`` (as members of an Ensemble may: one rule
    with different seeds, or backprop, fa and shallow mixed) and ``name``. Member ``e``'s weights and metrics are
    those of ``train(configs[e])`` up to float rounding (tested to 1e-12 in float64), except for dropout's masks,
    which the members draw together.

    A member whose loss (or weights) becomes NaN/Inf is stopped where it was, with ``status='diverged'`` and the
    reason in ``error`` (where :func:`train` raises :class:`DivergedError`); the others train on. Ctrl-C, SIGTERM
    or ``stop`` save one checkpoint of the whole ensemble and return ``status='interrupted'`` for every member;
    ``resume=True`` continues it. ``run_dir`` holds ``checkpoint.pt``, ``config.toml`` (member 0's), ``steps.jsonl``
    and, per member, ``members/<e>/`` with its ``config.toml``, metrics and ``result.json``.

    Args:
        configs: one configuration per member (TOML files, dicts or :class:`~fbalign.config.Config`).
        models: one ``nn.Module`` per member to train instead of the configured model (converted to its rule in
            place, as ``train(model=...)``).
        data: a :class:`~fbalign.data.TensorDataset` to use as is (None: loaded from the configurations' ``data``).
        run_dir, resume, stop, handle_signals: as for :func:`train`.

    Raises:
        ConfigError: configurations that differ elsewhere than :data:`MEMBER_SETTINGS`, ``log.alignment`` (measure
            members with :meth:`fbalign.Ensemble.per_member`), or a call under torchrun (an ensemble is one process).
        ValueError: models an Ensemble cannot hold together (different architectures or rule options).
        RunDirectoryError: as for :func:`train`.
    """
    cfgs = [load_config(c) for c in configs]
    _check_ensemble_configs(cfgs, models)
    device = resolve_device(cfgs[0].device)
    run = Path(run_dir) if run_dir is not None else None
    return _with_threads_and_stop(cfgs[0], stop, handle_signals, lambda stop: _train_ensemble(
        cfgs, device, run, resume, stop, models, data))


def _check_ensemble_configs(cfgs: list[Config], models: Sequence[nn.Module] | None) -> None:
    if not cfgs:
        raise ConfigError("train_ensemble needs at least one configuration")
    if models is not None and len(models) != len(cfgs):
        raise ConfigError(f"train_ensemble: {len(models)} models for {len(cfgs)} configurations; give one per "
                          "configuration")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train_ensemble trains all members in one process; run it without torchrun (DDP splits "
                          "one model's batch, an ensemble already batches its members)")
    if cfgs[0].log.alignment:
        raise ConfigError("train_ensemble does not record alignment (log.alignment); measure the members with "
                          "Ensemble.per_member(fbalign.metrics.measure_alignment, ...) or train them with train()")

    def shared(cfg: Config) -> dict[str, Any]:
        raw = cfg.to_dict()
        for key in MEMBER_SETTINGS:
            section, _, leaf = key.rpartition(".")
            (raw[section] if section else raw).pop(leaf, None)
        return raw

    first = shared(cfgs[0])
    for index, cfg in enumerate(cfgs[1:], 1):
        differs = rundir._config_differences(first, shared(cfg))
        if differs:
            raise ConfigError(f"train_ensemble: configuration {index} differs from configuration 0 in "
                              f"{', '.join(differs)}; members may differ only in {', '.join(MEMBER_SETTINGS)} (train "
                              "the others as another ensemble)")


def _train_ensemble(cfgs: list[Config], device: torch.device, run: Path | None, resume: bool, stop: Stop,
                    models: Sequence[nn.Module] | None, data: TensorDataset | None) -> list[TrainResult]:
    from .ensemble import Ensemble

    saved = rundir.open_run_directory(run, cfgs[0], resume)
    if saved is not None and run is not None:
        _check_saved_members(run, saved, cfgs)
    if data is None:
        torch.manual_seed(cfgs[0].seed)  # as train() loads it
        data = load_data(cfgs[0])
    if len(data.train_x) < cfgs[0].batch_size:
        raise ConfigError(f"batch_size = {cfgs[0].batch_size} is larger than the {len(data.train_x)} training "
                          f"examples of {data.name}; lower batch_size")
    data = data.to(device)
    members, draws = [], []
    for index, cfg in enumerate(cfgs):  # each member built exactly as train() builds it alone
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        model = convert_model(models[index], cfg) if models is not None else build_model(cfg, data)
        draws.append(torch.get_rng_state())  # where its run's later draws (brsf's) would continue
        model = model.to(device)
        check_output(model, data, cfg.model.name)
        members.append(model)
    rates = [cfg.optimizer.lr for cfg in cfgs]
    top = max(rates)
    ensemble = Ensemble(members, lr_scale=[rate / top if top > 0 else 1.0 for rate in rates],
                        seeds=[cfg.seed for cfg in cfgs])
    if device.type == "cpu":  # alone, a member's brsf draws come from torch's CPU generator after its build
        for index, state in enumerate(draws):
            ensemble.generator(index).set_state(state)
    shared = load_config(cfgs[0].to_dict())
    shared.optimizer.lr = top
    loss_fn = loss_function(shared, data)
    optimizer = make_optimizer(shared, ensemble)
    scheduler = make_scheduler(shared, optimizer)
    orders = [torch.Generator().manual_seed(cfg.seed) for cfg in cfgs]
    trainer = EnsembleTrainer(cfgs, ensemble, data, loss_fn, optimizer, scheduler, orders, device, run)
    if saved is not None:
        trainer.restore(saved)
    if run is not None:
        rundir.write_config(run, cfgs[0])
        for index, cfg in enumerate(cfgs):
            folder = trainer.member_dir(index)
            rundir.write_config(folder, cfg)
            if saved is not None:
                (folder / "result.json").unlink(missing_ok=True)
    status = trainer.run(stop)
    results = []
    for index, (cfg, model) in enumerate(zip(cfgs, ensemble.members())):
        error = trainer.stopped.get(index)
        result = TrainResult(model, cfg, trainer.histories[index], "diverged" if error else status,
                             trainer.member_dir(index) if run is not None else None, error=error)
        if run is not None and status == "finished":
            rundir.write_result(result.run_dir, result.summary())
        results.append(result)
    return results


def _check_saved_members(run: Path, saved: dict[str, Any], cfgs: list[Config]) -> None:
    """A resumed ensemble must have the checkpoint's members, with the same settings (only
    :data:`fbalign.rundir.RESUMABLE_CHANGES` may change)."""
    before = saved.get("configs")
    if before is None or len(before) != len(cfgs):
        found = "a single run" if before is None else f"{len(before)} members"
        raise RunDirectoryError(f"cannot resume {run}: its checkpoint holds {found}, this call gives {len(cfgs)} "
                                "configurations; start a new run in another directory")
    for index, (old, cfg) in enumerate(zip(before, cfgs)):
        changed = rundir.unresumable_changes(old, cfg)
        if changed:
            raise RunDirectoryError(f"cannot resume {run}: member {index}'s configuration differs from the "
                                    f"checkpoint's in {', '.join(changed)}; start a new run in another directory")
    truncate_records(run / "steps.jsonl", saved["step"])
    for index, history in enumerate(saved["histories"]):
        folder = run / "members" / str(index)
        folder.mkdir(parents=True, exist_ok=True)
        rundir.write_metrics(folder, list(history))


# -------------------------------------------------------------------------------------------------------- CLI

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model from a TOML configuration",
                              description="Train a model from a TOML configuration (see configs/). Writes the "
                              "resolved config, metrics and checkpoints to the run directory. Several processes "
                              "train one model with DDP: fbalign train CONFIG --nproc N, or torchrun "
                              "--nproc-per-node N -m fbalign train CONFIG (batch_size is the global batch).")
    p.add_argument("config", help="TOML configuration file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set rule=fa --set optimizer.lr=0.1 (repeatable)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train with N processes on this machine (DDP through torchrun; gloo on CPUs, nccl on GPUs)")
    p.set_defaults(func=main)


def _launch_torchrun(args: argparse.Namespace) -> int:
    """``--nproc N``: replace this process with ``torchrun --standalone --nproc-per-node N -m fbalign train ...``
    (so a Ctrl-C or a ``kill`` reaches torchrun, which passes it to every rank)."""
    if args.nproc < 1:
        print(f"error: --nproc {args.nproc}: give at least 1 process", file=sys.stderr)
        return 2
    try:  # the checks every rank would make, once and before torchrun's own report of failed ranks
        cfg = load_config(args.config, args.overrides)
        if cfg.batch_size % args.nproc:
            raise ConfigError(f"batch_size = {cfg.batch_size} is the global batch and must split evenly over the "
                              f"{args.nproc} processes of --nproc; choose a multiple of {args.nproc}")
        if resolve_device(cfg.device).type == "cuda" and torch.cuda.device_count() < args.nproc:
            raise ConfigError(f"--nproc {args.nproc} on the GPU needs {args.nproc} GPUs (nccl: one per process); "
                              f"this machine has {torch.cuda.device_count()}: lower --nproc, or train on the CPU "
                              "with gloo (--set device=cpu)")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
            "-m", "fbalign", "train", str(args.config), *[f"--set={o}" for o in args.overrides]]
    argv += [f"--out={args.out}"] if args.out else []
    argv += ["--resume"] if args.resume else []
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover - execv does not return


def main(args: argparse.Namespace) -> int:
    if getattr(args, "nproc", None) is not None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _launch_torchrun(args)
    main_rank = int(os.environ.get("RANK", "0")) == 0
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
    if not main_rank:
        return 130 if result.status == "interrupted" else 0
    if result.status == "interrupted":
        again = ["fbalign", "train", str(args.config), *[f"--set {shlex.quote(o)}" for o in args.overrides],
                 f"--out {shlex.quote(str(run_dir))}", "--resume"]
        if result.world_size > 1:
            again.insert(3, f"--nproc {result.world_size}")
        print(f"interrupted; continue with: {' '.join(again)}", file=sys.stderr)
        return 130
    final = result.final
    score = (f"test error {final['test_error']:.2f}%" if "test_error" in final else f"test NSE {final['test_nse']:.4g}")
    best = result.best
    if best is not None and "test_error" in best:
        score += f"; at the best validation epoch ({best['epoch']}): test error {best['test_error']:.2f}%"
    processes = f" on {result.world_size} processes" if result.world_size > 1 else ""
    print(f"finished {final.get('epoch', 0)} epoch(s){processes}: {score}; run directory {run_dir}")
    return 0
