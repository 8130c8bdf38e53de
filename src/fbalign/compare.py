"""``fbalign compare CONFIG --rules bp,fa,usf --seeds 5``: one configuration, trained with every rule and seed.

Each (rule, seed) run goes to ``OUT/<rule>-seed<seed>/`` (a normal run directory). Runs go in parallel
processes where the cores allow, each with its share of the CPU threads (one process at a time on a GPU).
``OUT/results.md`` gets a markdown table of the test error per rule, mean ± sd over seeds (and, with a
validation split, the test error at each run's best validation epoch), ``OUT/results.json`` every run's
numbers, and ``OUT/curves.png`` the curves (mean ± sd per rule). ``--resume`` continues an interrupted grid:
finished runs are reused, unfinished ones continue from their checkpoints. Ctrl-C, or SIGTERM sent to this
process alone (``kill``, a batch scheduler), stops every run at the end of its current step with a checkpoint,
and the command prints how to continue.

The runs go through :func:`fbalign.runner.run`: ``--executor process`` (the default: local processes),
``inline`` (this process, one run at a time) or ``ray`` (Ray tasks on a local Ray runtime, or on the cluster at
``--address``; ``pip install 'fbalign[ray]'``). On a cluster, ``--out`` must name a directory every node can
write (a shared file system): each run writes its own directory there.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import rules as rules_module
from .checkpoint import atomic_write_text
from .config import PLAIN_TORCH, Config, ConfigError, load_config
from .runner import EXECUTORS, Interrupted, Stop, run
from .train import DivergedError, RunDirectoryError, resolve_device, train

__all__ = ["RunOutcome", "compare", "results_table", "plan_parallelism", "add_parser", "main"]


@dataclass
class RunOutcome:
    """One (rule, seed) run of a grid: its status (finished / interrupted / diverged / failed) and numbers."""

    rule: str
    seed: int
    run_dir: str
    status: str
    summary: dict[str, Any] | None = None
    message: str = ""

    def metric(self, which: str) -> float | None:
        """``'final'`` or ``'best'`` test error (or NSE) of a finished run; None otherwise."""
        if self.status != "finished" or not self.summary:
            return None
        record = self.summary.get(which) or {}
        value = record.get("test_error", record.get("test_nse"))
        return float(value) if value is not None else None


def plan_parallelism(runs: int, device: str, jobs: int | None = None) -> tuple[int, int]:
    """``(processes, torch threads per process)``: on the CPU as many processes as cores (at most one per run),
    splitting the cores between them; on a GPU one process unless ``jobs`` says otherwise."""
    cores = os.cpu_count() or 1
    if jobs is None:
        jobs = 1 if resolve_device(device).type != "cpu" else min(runs, cores)
    jobs = max(1, min(jobs, runs))
    return jobs, max(1, cores // jobs)


def _canonical(rule: str) -> str:
    if rule == PLAIN_TORCH:
        return rule
    try:
        return rules_module.get(rule).name
    except ValueError as e:
        raise ConfigError(f"--rules: {e} (or {PLAIN_TORCH!r} for the unconverted model)") from None


@dataclass(frozen=True)
class _Job:
    """One (rule, seed) run of the grid, as sent to a worker."""

    config: dict[str, Any]
    rule_section: dict[str, Any]
    seed: int
    threads: int
    run_dir: str  # as the user wrote it: reported in the table and results.json
    path: str  # absolute: workers (Ray's, above all) may start elsewhere
    resume: bool


def _run_one(job: _Job, stop: Stop) -> RunOutcome:
    """One run of the grid, in a worker. Failures become outcomes, so one bad run does not stop the grid."""
    rule = job.rule_section["name"]
    try:
        result = train(job.config, run_dir=job.path, resume=job.resume, stop=stop, rule=job.rule_section,
                       seed=job.seed, threads=job.threads, log={**job.config["log"], "progress": False})
    except DivergedError as e:
        return RunOutcome(rule, job.seed, job.run_dir, "diverged", message=str(e))
    except Exception as e:  # reported in the table; the traceback is in the message
        return RunOutcome(rule, job.seed, job.run_dir, "failed", message=f"{type(e).__name__}: {e}")
    return RunOutcome(rule, job.seed, job.run_dir, result.status, summary=result.summary())


def _mean_sd(values: Sequence[float], spec: str = ".2f") -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def results_table(outcomes: Sequence[RunOutcome], regression: bool = False) -> str:
    """The markdown table: per rule, the number of finished runs, test error (or NSE) mean ± sd (sample sd over
    seeds), the same at the best validation epoch when there is a validation split, and seconds per epoch."""
    what = "test NSE" if regression else "test error (%)"
    by_rule: dict[str, list[RunOutcome]] = {}
    for o in outcomes:
        by_rule.setdefault(o.rule, []).append(o)
    has_best = any(o.metric("best") is not None for o in outcomes)
    header = ["rule", "runs", f"{what}, final epoch"] + ([f"{what}, best validation epoch"] if has_best else []) \
        + ["s / epoch", "not finished"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rule, group in by_rule.items():
        finished = [o for o in group if o.status == "finished"]
        final = [v for o in finished if (v := o.metric("final")) is not None]
        best = [v for o in finished if (v := o.metric("best")) is not None]
        seconds = [o.summary["train_time"] / max(1, o.summary["epochs"]) for o in finished if o.summary]
        spec = ".3g" if regression else ".2f"
        others = ", ".join(f"seed {o.seed}: {o.status}" for o in group if o.status != "finished") or "–"
        row = [rule, f"{len(finished)}/{len(group)}", _mean_sd(final, spec)] \
            + ([_mean_sd(best, spec)] if has_best else []) \
            + [f"{statistics.mean(seconds):.1f}" if seconds else "–", others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def compare(config: str | os.PathLike | dict[str, Any] | Config, rules: Sequence[str], seeds: Sequence[int], *,
            out_dir: str | os.PathLike, overrides: Sequence[str] = (), jobs: int | None = None,
            resume: bool = False, progress: bool = True, executor: str = "process",
            address: str | None = None) -> list[RunOutcome]:
    """Train ``config`` with every rule in ``rules`` and every seed in ``seeds``; write the table and plot.

    The config's own ``[rule]`` options are kept for that rule; other rules get their defaults. Returns the
    outcomes in grid order; after a stop (Ctrl-C, SIGTERM) the unfinished runs are ``'interrupted'`` (with a
    checkpoint) or ``'not started'``. ``executor`` and ``address`` choose where the runs go (see
    :func:`fbalign.runner.run`); ``jobs`` is how many at a time. Raises :class:`~fbalign.config.ConfigError`
    (before training) for a bad config or rule name, :class:`~fbalign.train.RunDirectoryError` when ``out_dir``
    holds runs and ``resume`` is off.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    cfg = load_config(config, overrides)
    names = [_canonical(r) for r in rules]  # fails on a bad name before anything runs
    if len(set(names)) != len(names):
        raise ConfigError(f"--rules names a rule twice: {', '.join(rules)}")
    sections = [dict(name=n, **(cfg.rule.options if n == cfg.rule.name else {})) for n in names]
    for section in sections:
        load_config(cfg, [("rule", section)])  # the rule's options fit it
    out = Path(out_dir)
    grid = [(section, seed) for section in sections for seed in seeds]
    dirs = [out / f"{s['name']}-seed{seed}" for s, seed in grid]
    if not resume and any(d.exists() for d in dirs):
        raise RunDirectoryError(f"{out} already holds runs of this grid; continue them with --resume, or choose "
                                "another directory with --out")
    if executor == "ray":  # Ray gives each task one CPU; jobs=None: as many at a time as the cluster has CPUs
        workers, threads = jobs, 1
    else:
        workers, threads = plan_parallelism(len(grid), cfg.device, 1 if executor == "inline" else jobs)
    base = cfg.to_dict()
    work = [_Job(base, section, seed, threads, str(d), str(d.resolve()), resume)
            for (section, seed), d in zip(grid, dirs)]
    if progress:
        tqdm.write(f"{len(work)} run(s) on {executor}" + (f" ({workers} at a time)" if workers else ""))
    try:
        ordered = run(_run_one, work, workers=workers, executor=executor, address=address)
    except Interrupted as e:
        ordered = [e.results.get(i) or RunOutcome(j.rule_section["name"], j.seed, j.run_dir, "not started")
                   for i, j in enumerate(work)]
    for o in ordered:
        if o.status != "finished" and progress:
            tqdm.write(f"{o.rule} seed {o.seed}: {o.status} {o.message}".rstrip())
    _write_results(out, cfg, ordered, seeds)
    return ordered


def _write_results(out: Path, cfg: Config, outcomes: list[RunOutcome], seeds: Sequence[int]) -> None:
    regression = any(o.summary and "test_nse" in (o.summary.get("final") or {}) for o in outcomes)
    table = results_table(outcomes, regression)
    header = (f"# {cfg.name or 'comparison'}: {cfg.model.name} on {cfg.data.name}, {cfg.epochs} epoch(s), "
              f"seeds {', '.join(map(str, seeds))}\n\n")
    atomic_write_text(out / "results.md", header + table + "\n")
    atomic_write_text(out / "results.json", json.dumps([o.__dict__ for o in outcomes], indent=1) + "\n")
    finished = [o for o in outcomes if Path(o.run_dir, "metrics.jsonl").exists()]
    if finished:
        from .plot import plot_runs

        plot_runs([o.run_dir for o in finished], out / "curves.png", labels=[o.rule for o in finished],
                  title=f"{cfg.model.name} on {cfg.data.name}")


def _seed_list(text: str) -> list[int]:
    """``'5'`` → seeds 0..4; ``'3,7,9'`` → those seeds."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        return list(range(int(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give a count (5) or a list (0,3,7)") from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="train one config with several rules and seeds; tabulate and plot",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="TOML configuration file")
    p.add_argument("--rules", default="bp,fa,usf,frsf,brsf,dfa,kp", help="comma-separated rules (default: %(default)s; "
                   f"'{PLAIN_TORCH}' trains the unconverted model)")
    p.add_argument("--seeds", type=_seed_list, default=[0], help="how many seeds (5 → 0..4) or a list (0,3,7)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every run (repeatable)")
    p.add_argument("--out", default=None, help="output directory (default: runs/compare-<config name>)")
    p.add_argument("--jobs", type=int, default=None, help="parallel processes (default: one per core on the CPU, "
                   "one on a GPU)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs and continue unfinished ones")
    p.add_argument("--executor", choices=EXECUTORS, default="process",
                   help="where the runs go: local processes (default), inline (this process) or ray")
    p.add_argument("--address", default=None, help="with --executor ray: the Ray cluster to join (auto, HOST:6379 "
                   "or ray://HOST:10001); default: a local Ray runtime")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / f"compare-{cfg.name or 'run'}"
        outcomes = compare(cfg, rules, args.seeds, out_dir=out, jobs=args.jobs, resume=args.resume,
                           executor=args.executor, address=args.address)
    except (ConfigError, RunDirectoryError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / "results.md").read_text())
    print(f"{len(outcomes)} run(s) in {time.perf_counter() - start:.0f} s; table {out / 'results.md'}, "
          f"curves {out / 'curves.png'}")
    if any(o.status in ("interrupted", "not started") for o in outcomes):
        sets = "".join(f" --set {shlex.quote(o)}" for o in args.overrides)
        where = f" --executor {args.executor}" if args.executor != "process" else ""
        where += f" --address {shlex.quote(args.address)}" if args.address else ""
        print(f"interrupted; continue with: fbalign compare {shlex.quote(str(args.config))} --rules {args.rules} "
              f"--seeds {','.join(map(str, args.seeds))}{sets} --out {shlex.quote(str(out))}{where} --resume",
              file=sys.stderr)
        return 130
    return 0 if all(o.status == "finished" for o in outcomes) else 1
