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
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

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
from .rundir import CHECKPOINT, RunDirectoryError
from .runner import Stop
from .trainer import DivergedError, Trainer, TrainResult, evaluate

__all__ = ["train", "TrainResult", "DivergedError", "RunDirectoryError", "evaluate", "build_model", "load_data",
           "resolve_device", "add_parser", "main", "Trainer", "CHECKPOINT"]


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
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        run = Path(run_dir) if run_dir is not None else None
        if stop is not None:
            return _train(cfg, device, run, resume, stop, ranks, model_object, data_object)
        stop = Stop()
        with stop.catch_signals() if handle_signals else nullcontext():
            return _train(cfg, device, run, resume, stop, ranks, model_object, data_object)
    finally:
        torch.set_num_threads(threads)  # the caller's setting: config.threads holds for this run only
        distributed.teardown(ranks)


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
