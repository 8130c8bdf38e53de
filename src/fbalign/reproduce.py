"""``fbalign reproduce PAPER``: regenerate a paper's experiments, figures and a report beside the paper's numbers.

    fbalign reproduce lillicrap2016 --quick                    # minutes on 2 CPU cores: the README's main job
    fbalign reproduce lillicrap2016 --full --device cuda       # the paper's scale
    fbalign reproduce lillicrap2016 --only fig1,fig3 --out runs/lillicrap-linear
    fbalign reproduce lillicrap2016 --replot --out runs/lillicrap-linear   # figures and report from results.json

The papers are the modules of ``fbalign.experiments`` listed in ``fbalign.experiments.PAPERS`` (the repository's
``experiments/`` folder, installed with fbalign); the shared machinery and the interface a paper module provides
are in ``fbalign.experiments.common``. The output folder gets the figures (PNG), ``results.json`` (every number)
and ``report.md`` (the figures embedded, our numbers beside the paper's).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["reproduce", "replot", "papers", "load_paper", "add_parser", "main"]


def papers() -> dict[str, str]:
    """Paper name → module, as registered in ``fbalign.experiments.PAPERS``."""
    from .experiments import PAPERS

    return dict(PAPERS)


def load_paper(paper: str) -> ModuleType:
    """The module that reproduces ``paper``; ``ValueError`` naming the known papers for another name."""
    known = papers()
    if paper not in known:
        raise ValueError(f"no reproduction of {paper!r}; choose one of: {', '.join(sorted(known)) or 'none'}")
    return importlib.import_module(known[paper])


def reproduce(paper: str, *, scale: str = "quick", only: Sequence[str] | None = None, seeds: int | None = None,
              device: str = "auto", out: str | Path | None = None, data: str | None = None,
              data_dir: str | None = None, resume: bool = False, overwrite: bool = False, progress: bool = True,
              command: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """Run ``paper``'s experiments and write figures, ``results.json`` and ``report.md``; return the results.

    Args:
        paper: a name in :func:`papers`.
        scale: ``'quick'`` (fewer runs and steps; minutes on a CPU) or ``'full'`` (the paper's scale).
        only: experiment names (e.g. ``['fig1', 'fig3']``); None runs them all.
        seeds: runs per condition, overriding each experiment's default for the scale.
        device: ``'auto'`` (CUDA when present), ``'cpu'``, ``'cuda'`` or ``'cuda:N'``: where the larger networks
            train.
        out: output folder; default ``runs/<paper>-<scale>``.
        data, data_dir: the image data set for experiments that train on one, and its directory.
        resume: reuse the experiments ``out`` has finished and continue its interrupted training runs.
        overwrite: start again in an ``out`` that holds results (without it, that is an error).
        progress: show progress bars.
        command: the command line recorded in the report (default: this process's).
        workers: experiments run side by side in this many processes; None: one per CPU core on the CPU, one
            on a GPU (where they would share the device) or for a paper whose experiments start their own worker
            processes (its module sets ``TRAINS_IN_PROCESSES``). 1 runs them one after another in this process.
    """
    from .experiments import common
    from .train import resolve_device

    module = load_paper(paper)
    out_dir = Path(out) if out is not None else Path("runs") / f"{paper}-{scale}"
    ctx = common.Context(paper=paper, out_dir=out_dir, scale=scale, seeds=seeds,  # type: ignore[arg-type]
                         device=resolve_device(device), data=data, data_dir=data_dir, resume=resume,
                         progress=progress)
    if workers is None:
        inside = getattr(module, "TRAINS_IN_PROCESSES", False)
        workers = 1 if ctx.device.type != "cpu" or inside else os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers = {workers}; give at least 1")
    return common.reproduce(module, ctx, only, overwrite=overwrite, command=command, workers=workers)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reproduce", help="regenerate a paper's experiments, figures and a report beside its numbers",
        description="Regenerate every experiment of a paper with fbalign's rules: PNG figures laid out like the "
        "paper's panels, results.json with every number, and report.md with the figures and our numbers beside "
        "the paper's.", epilog="papers: " + ", ".join(sorted(papers())))
    p.add_argument("paper", choices=sorted(papers()), help="the paper to reproduce")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", dest="scale", action="store_const", const="quick",
                       help="fewer runs and steps: minutes on 2 CPU cores (the default)")
    scale.add_argument("--full", dest="scale", action="store_const", const="full",
                       help="the paper's scale (hours on a CPU; uses a GPU when there is one)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated experiments to run (e.g. fig1,fig3); default: all")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="runs per condition (default: the scale's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/PAPER-SCALE)")
    p.add_argument("--data", default=None, help="image data set for the experiments that train on one "
                   "(lillicrap2016: fashion-mnist, the default, or mnist)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="directory of that data set's IDX files")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="reuse the finished experiments in --out and continue its interrupted runs")
    again.add_argument("--overwrite", action="store_true", help="start again in an --out that holds results")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="experiments run side by side in N processes (default: one per CPU core on the CPU; 1 "
                   "with a GPU and for papers whose experiments train in processes of their own, liao2016 and "
                   "open-questions; 1: one after another in this process, with progress bars)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--replot", action="store_true", help="train nothing: redraw the figures and report.md of --out "
                   "from its results.json")
    p.set_defaults(func=_main_or_replot, scale="quick")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .experiments.common import REPORT, ReproductionError
    from .train import DivergedError

    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    command = "fbalign " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    start = time.perf_counter()
    on_main_thread = threading.current_thread() is threading.main_thread()  # only there may handlers be set
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None  # a kill stops like Ctrl-C
    try:
        results = reproduce(args.paper, scale=args.scale, only=only, seeds=args.seeds, device=args.device,
                            out=args.out, data=args.data, data_dir=args.data_dir, resume=args.resume,
                            overwrite=args.overwrite, progress=args.progress, command=command,
                            workers=args.workers)
    except (ValueError, ReproductionError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DivergedError as e:
        print(f"error: diverged: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        again = [a for a in sys.argv[1:] if a != "--overwrite"] or ["reproduce", args.paper]
        again += [] if "--resume" in again else ["--resume"]
        print("\ninterrupted: finished experiments and runs are saved; continue with: fbalign "
              + " ".join(shlex.quote(a) for a in again), file=sys.stderr)
        return 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    out_dir = Path(args.out) if args.out else Path("runs") / f"{args.paper}-{args.scale}"
    print(f"finished {', '.join(results['experiments'])} in {time.perf_counter() - start:.0f} s; report: "
          f"{out_dir / REPORT}")
    return 0


def replot(paper: str, out: str | Path) -> dict[str, Any]:
    """Redraw ``paper``'s figures and ``report.md`` in the folder ``out`` from its ``results.json`` alone (nothing
    trains; the scale and settings are the saved ones). Returns the results."""
    from .experiments import common

    ctx = common.Context(paper=paper, out_dir=Path(out), progress=False)
    return common.replot(load_paper(paper), ctx)


def _main_or_replot(args: argparse.Namespace) -> int:
    if not getattr(args, "replot", False):
        return main(args)
    from .experiments.common import REPORT, ReproductionError

    out_dir = Path(args.out) if args.out else Path("runs") / f"{args.paper}-{args.scale}"
    try:
        results = replot(args.paper, out_dir)
    except (ValueError, ReproductionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"redrew {', '.join(results['experiments'])} from {out_dir / 'results.json'}; report: {out_dir / REPORT}")
    return 0
