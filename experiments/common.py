"""What every paper reproduction shares: scale, output folder, results.json, report.md, figures, progress, device.

``fbalign reproduce PAPER`` (:mod:`fbalign.reproduce`) imports the paper's module from
:data:`fbalign.experiments.PAPERS` and hands it to :func:`reproduce` with a :class:`Context`.

The interface of a paper module
-------------------------------

A paper module defines three names (``experiments/lillicrap2016.py`` is the worked example)::

    TITLE = "Lillicrap, Cownden, Tweed & Akerman (2016): Random synaptic feedback weights ..."
    INTRODUCTION = "One markdown paragraph: what the reproduction does and how it differs from the paper."
    EXPERIMENTS = [
        Experiment("fig1", "Fig. 1d,e: linear function approximation", run_fig1, report_fig1),
        Experiment("figS1", "Fig. S1: receptive fields", run_fig_s1, report_fig_s1, needs=("fig2a",)),
        ...                                               # in the order the report shows them
    ]

* ``run(ctx: Context) -> dict`` computes one experiment at ``ctx.scale`` and returns *every* number it
  produced (JSON-able: numbers, strings, lists, dicts; NaN is allowed), including the settings it used (steps,
  runs, learning rates chosen). It draws its figures from those numbers with ``ctx.save_figure`` and may keep
  larger artefacts (checkpoints, weights) under ``ctx.folder(name)``, where a resumed run finds them
  (``ctx.resume``). It raises on bad input; it never prints results (the report does).
* ``report(results: dict, section: Report, ctx: Context)`` writes the experiment's section of report.md from
  its results alone: figures, our numbers beside the paper's (:meth:`Report.comparison`), and a plain statement of
  where and why they differ.
* ``needs`` names experiments whose results (or files) this one reads; they run first when selected or missing.
* ``claims(results) -> list[Claim]`` (optional) states the experiment's verdicts as data: each row the quantity,
  our number, the paper's, the criterion and the verdict. ``report`` renders them (:meth:`Report.claims`) and tests
  check them, so no verdict hides in the prose.
* ``plot(results, ctx)`` (optional) draws the experiment's figures from its results alone (setting
  ``results['figure']``); with it, ``reproduce`` calls it after ``run`` and :func:`replot` (``fbalign reproduce
  PAPER --replot``) redraws every figure and report.md from results.json without training.

:func:`reproduce` runs the selected experiments in order, writes ``results.json`` (atomically) after each one,
and rewrites ``report.md`` each time, so a killed run loses nothing it had finished; ``resume=True`` reuses the
experiments already in ``results.json`` (same scale, seeds and data, else it refuses, naming what differs).

Scale: ``quick`` fits the README's main job (minutes on 2 CPU cores, fewer runs and steps, said so in the report);
``full`` is the paper's scale; ``tiny`` is the tests' (seconds). Experiments keep their sizes in a scale table, one
row per scale, read with :meth:`Context.row` (``--seeds N`` overrides its ``runs``; a table without a ``tiny`` row
gives its ``quick`` row), or choose with :meth:`Context.pick` and :meth:`Context.runs`.
"""

from __future__ import annotations

import _thread
import io
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from fbalign import __version__
from fbalign.checkpoint import atomic_write_bytes, atomic_write_text

__all__ = ["Context", "Experiment", "Claim", "Report", "ReproductionError", "reproduce", "replot", "select",
           "load_results", "render_report", "fmt", "welch_p", "torch_threads", "RESULTS", "REPORT", "SCALES"]

RESULTS = "results.json"
REPORT = "report.md"
SCALES = ("quick", "full", "tiny")  # tiny: the tests' scale, not offered on the command line
_T = TypeVar("_T")


class ReproductionError(RuntimeError):
    """The output folder holds results that cannot be reused or would be overwritten, or the selection is bad."""


@dataclass
class Context:
    """Where and at what scale a reproduction runs; handed to every experiment.

    Attributes:
        paper: the paper's name in ``PAPERS``.
        scale: ``'quick'`` (fewer runs and steps), ``'full'`` (the paper's scale) or ``'tiny'`` (the tests').
        out_dir: the output folder (figures, results.json, report.md, experiment folders).
        seeds: number of runs per condition, overriding each experiment's default; None keeps the defaults.
        device: where the experiments that train sizeable networks run (small online-learning tasks stay on the
            CPU, where a step is cheaper than a kernel launch).
        data: the image data set for experiments that train on one (None: the paper module's default).
        data_dir: a directory of that data set's files (None: the default location).
        resume: reuse finished experiments and continue interrupted runs found in ``out_dir``.
        progress: show progress bars.
    """

    paper: str
    out_dir: Path
    scale: Literal["quick", "full", "tiny"] = "quick"
    seeds: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data: str | None = None
    data_dir: str | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r}; choose one of {', '.join(SCALES)}")
        if self.seeds is not None and self.seeds < 1:
            raise ValueError(f"seeds={self.seeds} must be at least 1")
        self.out_dir = Path(self.out_dir)

    @property
    def quick(self) -> bool:
        """Below the paper's scale (quick or tiny)."""
        return self.scale != "full"

    def row(self, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """This scale's row of an experiment's scale table (a copy; the ``quick`` row at ``tiny`` scale when the
        table has no ``tiny`` row), its ``runs`` replaced by ``--seeds`` when given."""
        found = dict(table[self.scale] if self.scale in table else table["quick"])
        if self.seeds is not None and "runs" in found:
            found["runs"] = self.seeds
        return found

    def pick(self, quick: _T, full: _T) -> _T:
        """``quick`` (at quick and tiny scale) or ``full``, by the scale."""
        return quick if self.quick else full

    def runs(self, quick: int, full: int) -> int:
        """Runs per condition: ``--seeds`` when given, else ``quick`` or ``full`` by the scale."""
        return self.seeds if self.seeds is not None else self.pick(quick, full)

    def folder(self, *parts: str) -> Path:
        """A folder under the output folder (created), for an experiment's own files."""
        path = self.out_dir.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def save_figure(self, figure: Any, name: str, dpi: int = 150) -> str:
        """Write a matplotlib figure to ``out_dir/name`` atomically; return ``name`` (the report's link)."""
        buffer = io.BytesIO()
        figure.savefig(buffer, format=Path(name).suffix.lstrip(".") or "png", dpi=dpi)
        atomic_write_bytes(self.out_dir / name, buffer.getvalue())
        return name

    def bar(self, iterable: Iterable[_T] | None = None, *, total: int | None = None, desc: str = "",
            unit: str = "it", leave: bool = False) -> tqdm:
        """A progress bar (tqdm), silent when ``progress`` is off."""
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=not self.progress,
                    dynamic_ncols=True)

    def settings(self) -> dict[str, Any]:
        """What the numbers depend on: a resumed run must match it (the device may change)."""
        return {"paper": self.paper, "scale": self.scale, "seeds": self.seeds, "data": self.data,
                "data_dir": self.data_dir}


@dataclass(frozen=True)
class Experiment:
    """One experiment of a paper: ``run(ctx) -> results`` and ``report(results, section, ctx)`` (see the module
    docstring); ``needs`` lists experiments to run before it; ``threads`` sets torch's intra-op CPU threads while it
    runs (1 for tiny networks trained an example at a time, where handing work between threads costs more than
    the work; None leaves torch's default); ``claims(results)`` its verdicts as :class:`Claim` rows; ``plot(results,
    ctx)`` its figures from its results alone (then ``run`` draws none: ``reproduce`` and :func:`replot` call it);
    ``cost`` its rough run time relative to the paper's other experiments, so that parallel workers start the
    longest first."""

    name: str
    title: str
    run: Callable[[Context], dict[str, Any]]
    report: Callable[[dict[str, Any], Report, Context], None]
    needs: tuple[str, ...] = ()
    threads: int | None = None
    claims: Callable[[dict[str, Any]], list[Claim]] | None = None
    plot: Callable[[dict[str, Any], Context], None] | None = None
    cost: float = 1.0


@dataclass(frozen=True)
class Claim:
    """One verdict of a reproduction, as data: our number beside the paper's and the criterion that judges it.

    Attributes:
        quantity: what is compared, in words (a table row's label).
        ours: our number (or a short text such as ``'1.2 ± 0.3'``).
        paper: the paper's number or statement (``'–'`` where it gives none).
        criterion: what counts as agreement, e.g. ``'≤ 1 point'``, ``'< 60°'``; empty where there is no verdict.
        verdict: True (agrees), False (disagrees) or None (no verdict: other data, or a number read off a figure).
        note: why the criterion, or what else to know.
    """

    quantity: str
    ours: Any
    paper: Any
    criterion: str = ""
    verdict: bool | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.verdict is not None:  # NumPy bools are bools to JSON and to a reader, not to isinstance
            object.__setattr__(self, "verdict", bool(self.verdict))

    def row(self) -> dict[str, Any]:
        """As a JSON-able dict."""
        return {"quantity": self.quantity, "ours": self.ours, "paper": self.paper, "criterion": self.criterion,
                "verdict": self.verdict, "note": self.note}


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op CPU threads (None: unchanged), restoring the number after."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------- report

def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: ``digits`` significant digits, scientific notation when very small or large;
    ``–`` for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch t-test p-value between the finite values of ``a`` and ``b``; NaN when it is undefined
    (fewer than two finite values in either, or no spread in both)."""
    a = [v for v in a if math.isfinite(v)]
    b = [v for v in b if math.isfinite(v)]
    if len(a) < 2 or len(b) < 2 or (np.std(a) == 0 and np.std(b) == 0):
        return math.nan
    with warnings.catch_warnings():  # near-identical samples: scipy warns of precision loss, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


class Report:
    """A markdown document built a block at a time (headings, paragraphs, figures, tables)."""

    def __init__(self) -> None:
        self.blocks: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(f"{'#' * level} {text}")

    def text(self, *paragraphs: str) -> None:
        self.blocks.extend(p.strip() for p in paragraphs if p.strip())

    def bullets(self, items: Iterable[str]) -> None:
        self.blocks.append("\n".join(f"- {item}" for item in items))

    def figure(self, path: str, caption: str) -> None:
        """Embed the figure at ``path`` (relative to report.md) with a caption below it."""
        self.blocks.append(f"![{Path(path).stem}]({path})\n\n*{caption}*")

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """A markdown table; numbers are formatted with :func:`fmt`."""
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(fmt(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
        self.blocks.append("\n".join(lines))

    def comparison(self, rows: Iterable[Sequence[Any]]) -> None:
        """Our numbers beside the paper's: rows of ``(quantity, ours, paper's, agrees, note)``; ``agrees`` is a
        bool (✓ / ✗) or None (no verdict: different data, or a number read off a figure)."""
        marks = {True: "✓", False: "✗", None: ""}
        self.table(["quantity", "here", "paper", "", "note"],
                   [(q, ours, paper, marks[agrees], note) for q, ours, paper, agrees, note in rows])

    def claims(self, claims: Iterable[Claim]) -> None:
        """The verdicts of :class:`Claim` rows as a table: quantity, ours, the paper's, the criterion, ✓ / ✗."""
        marks = {True: "✓", False: "✗", None: ""}
        self.table(["quantity", "here", "paper", "criterion", "", "note"],
                   [(c.quantity, c.ours, c.paper, c.criterion, marks[c.verdict], c.note) for c in claims])

    def markdown(self) -> str:
        return "\n\n".join(self.blocks) + "\n"


def render_report(module: Any, results: dict[str, Any], ctx: Context) -> str:
    """report.md for the experiments in ``results``: the paper, the scale and the command, then one section per
    experiment (in the module's order), each from its own numbers."""
    report = Report()
    report.heading(f"Reproduction: {module.TITLE}", 1)
    header = results.get("header", {})
    scale_note = ("**Tiny mode**: the tests' scale; the numbers show that the code runs, not the paper's results."
                  if ctx.scale == "tiny" else
                  "**Quick mode**: fewer runs and training steps than the paper, so that the whole reproduction "
                  "takes minutes on a laptop CPU; the qualitative picture is the paper's, the numbers are not yet "
                  "at the paper's scale. `--full` runs at the paper's scale."
                  if ctx.quick else "**Full mode**: the paper's scale (number of runs and training length), except "
                  "where a section says otherwise.")
    report.text(getattr(module, "INTRODUCTION", ""), scale_note)
    report.bullets([
        f"command: `{header.get('command', '')}`",
        f"fbalign {header.get('fbalign', __version__)}, torch {header.get('torch', torch.__version__)}, "
        f"Python {header.get('python', platform.python_version())}; device for the larger networks: "
        f"{header.get('device', str(ctx.device))}",
        "experiments: " + ", ".join(f"{name} ({fmt(r.get('seconds', float('nan')), 3)} s)"
                                    for name, r in results.get("experiments", {}).items()),
        f"every number below is in `{RESULTS}`",
    ])
    for experiment in module.EXPERIMENTS:
        found = results.get("experiments", {}).get(experiment.name)
        if found is None:
            continue
        report.heading(experiment.title)
        experiment.report(found, report, ctx)
    return report.markdown()


# --------------------------------------------------------------------------------------------------- running

def select(module: Any, only: Sequence[str] | None) -> list[Experiment]:
    """The experiments to run, in the module's order: ``only`` (names) plus what they need; None: all.

    Raises ``ReproductionError`` naming the valid experiments for an unknown name.
    """
    by_name = {e.name: e for e in module.EXPERIMENTS}
    if only is None:
        return list(module.EXPERIMENTS)
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise ReproductionError(f"no experiment {', '.join(map(repr, unknown))} in {module.__name__.rsplit('.')[-1]}; "
                                f"choose from: {', '.join(by_name)}")
    wanted: set[str] = set()
    pending = list(only)
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(by_name[name].needs)
    return [e for e in module.EXPERIMENTS if e.name in wanted]


def load_results(out_dir: str | Path) -> dict[str, Any]:
    """``results.json`` of an output folder (empty dict when there is none)."""
    path = Path(out_dir) / RESULTS
    return json.loads(path.read_text()) if path.exists() else {}


def _prepare_folder(module: Any, ctx: Context, overwrite: bool) -> dict[str, Any]:
    """Results to start from: the saved ones when resuming (checked to fit), none otherwise; refuse to overwrite
    results unless told to, and then clear only what an earlier reproduction wrote."""
    saved = load_results(ctx.out_dir)
    if not saved:
        return {}
    if ctx.resume:
        before = saved.get("settings", {})
        differing = sorted(k for k in set(before) | set(ctx.settings()) if before.get(k) != ctx.settings().get(k))
        if differing:
            raise ReproductionError(
                f"cannot resume {ctx.out_dir}: its results were made with different "
                + ", ".join(f"{k} ({before.get(k)!r}, now {ctx.settings().get(k)!r})" for k in differing)
                + "; choose another --out, or --overwrite to start again")
        return saved
    if not overwrite:
        done = ", ".join(saved.get("experiments", {})) or "none finished"
        raise ReproductionError(f"{ctx.out_dir} already holds a reproduction ({done}); add --resume to reuse what "
                                "it finished, --overwrite to start again, or choose another --out")
    for experiment in module.EXPERIMENTS:
        if (ctx.out_dir / experiment.name).is_dir():
            shutil.rmtree(ctx.out_dir / experiment.name)
    for name in (RESULTS, REPORT):
        (ctx.out_dir / name).unlink(missing_ok=True)
    return {}


def _to_json(value: Any) -> Any:
    """Tensors and NumPy values as plain numbers and lists, so ``json.dumps`` takes them."""
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _to_json(value.tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # NumPy arrays and scalars
        return _to_json(value.tolist())
    return value


def reproduce(module: Any, ctx: Context, only: Sequence[str] | None = None, *, overwrite: bool = False,
              command: str | None = None, workers: int = 1) -> dict[str, Any]:
    """Run a paper module's experiments (``only`` those, plus what they need; None: all) and write the
    figures, ``results.json`` and ``report.md`` into ``ctx.out_dir``. Returns the results.

    With ``workers`` > 1 the experiments run side by side in that many worker processes
    (:func:`fbalign.runner.run`), longest (``Experiment.cost``) first; one that ``needs`` others runs after them
    in their worker. Results are written as each worker's share finishes. Ctrl-C or SIGTERM stops every worker
    within a second; finished experiments stay in results.json for ``resume``.

    Raises:
        ReproductionError: ``out_dir`` holds results and neither ``ctx.resume`` nor ``overwrite`` is set, the
            saved results were made with other settings, or ``only`` names an unknown experiment.
    """
    chosen = select(module, only)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    results = _prepare_folder(module, ctx, overwrite)
    results["settings"] = ctx.settings()
    results["header"] = {"command": command or " ".join(sys.argv), "fbalign": __version__,
                         "torch": torch.__version__, "python": platform.python_version(), "device": str(ctx.device),
                         "scale": ctx.scale}
    finished = results.setdefault("experiments", {})
    todo = [e for e in chosen if e.name not in finished]
    if len(todo) < len(chosen):
        tqdm.write(f"reusing {', '.join(e.name for e in chosen if e.name in finished)} from {ctx.out_dir / RESULTS}")
    if workers > 1 and len(todo) > 1:
        _run_side_by_side(module, ctx, todo, results, workers)
    else:
        for i, experiment in enumerate(todo, 1):
            tqdm.write(f"[{i}/{len(todo)}] {experiment.name}: {experiment.title}")
            finished[experiment.name] = _run_experiment_here(experiment, ctx, experiment.threads)
            _write(module, results, ctx)
            tqdm.write(f"      done in {finished[experiment.name]['seconds']:.0f} s")
    if not todo:
        _write(module, results, ctx)
    return results


def _run_experiment_here(experiment: Experiment, ctx: Context, threads: int | None) -> dict[str, Any]:
    start = time.perf_counter()
    with torch_threads(threads):
        found = _to_json(experiment.run(ctx))
        if experiment.plot is not None:
            experiment.plot(found, ctx)
    found["seconds"] = time.perf_counter() - start
    return found


def _run_side_by_side(module: Any, ctx: Context, todo: list[Experiment], results: dict[str, Any],
                      workers: int) -> None:
    """The experiments in ``todo`` on ``workers`` processes. An experiment that needs others runs after them in
    the same worker (a chain); chains start longest first; results.json is written as each chain returns."""
    from fbalign import runner

    order = {e.name: i for i, e in enumerate(todo)}
    chain_of: dict[str, list[Experiment]] = {}
    chains: list[list[Experiment]] = []
    for experiment in todo:  # the module's order runs what is needed first
        owners = []
        for name in experiment.needs:
            if name in chain_of and not any(chain_of[name] is o for o in owners):
                owners.append(chain_of[name])
        chain = owners[0] if owners else []
        for other in owners[1:]:  # needs from several chains: one chain
            chain.extend(other)
            chains.remove(other)
        chain.sort(key=lambda e: order[e.name])
        chain.append(experiment)
        if not owners:
            chains.append(chain)
        for member in chain:
            chain_of[member.name] = chain
    chains.sort(key=lambda chain: -sum(e.cost for e in chain))
    finished = results["experiments"]
    size = min(workers, len(chains))
    threads = max(1, (os.cpu_count() or 1) // size)
    quiet = replace(ctx, progress=False)  # several progress bars would garble one terminal
    tqdm.write(f"running {len(todo)} experiments side by side in {size} worker processes, longest first: "
               + ", ".join(" then ".join(e.name for e in chain) for chain in chains))

    def save(index: int, found: dict[str, dict[str, Any]]) -> None:
        for name, result in found.items():
            finished[name] = result
            tqdm.write(f"      {name} done in {result['seconds']:.0f} s")
        if found:
            _write(module, results, ctx)
    jobs = [(module.__name__, [(e.name, e.threads or threads) for e in chain], quiet) for chain in chains]
    runner.run(_experiments_job, jobs, workers=size, executor="process", on_result=save)


def _experiments_job(job: tuple[str, list[tuple[str, int]], Context], stop: Any) -> dict[str, dict[str, Any]]:
    """In a worker process: a chain of a paper module's experiments, in order; those that finished before a stop."""
    import importlib

    module_name, names, ctx = job
    by_name = {e.name: e for e in importlib.import_module(module_name).EXPERIMENTS}
    found: dict[str, dict[str, Any]] = {}
    try:
        with _interrupted_by(stop):
            for name, threads in names:
                found[name] = _run_experiment_here(by_name[name], ctx, threads)
    except KeyboardInterrupt:
        pass
    return found


@contextmanager
def _interrupted_by(stop: Any) -> Iterator[None]:
    """Raise ``KeyboardInterrupt`` in this (main) thread once ``stop`` is requested, as Ctrl-C would in a
    reproduction run in one process: an experiment need not look at the stop itself. (SIGUSR1's handler is the
    carrier: ``_thread.interrupt_main`` runs a signal's Python handler without a signal being sent.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGUSR1, signal.default_int_handler)
    over = threading.Event()

    def watch() -> None:
        while not over.wait(0.1):
            if stop.requested():
                _thread.interrupt_main(signal.SIGUSR1)
                return
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        over.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)


def _write(module: Any, results: dict[str, Any], ctx: Context) -> None:
    # Experiments in the module's order, whatever order they finished in.
    order = [e.name for e in module.EXPERIMENTS]
    finished = results["experiments"]
    ordered = sorted(finished.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    finished.clear()
    finished.update(ordered)
    atomic_write_text(ctx.out_dir / RESULTS, json.dumps(results, indent=1, allow_nan=True) + "\n")
    atomic_write_text(ctx.out_dir / REPORT, render_report(module, results, ctx))


def replot(module: Any, ctx: Context) -> dict[str, Any]:
    """Redraw the figures of every experiment in ``ctx.out_dir``'s results.json that has a ``plot``, and rewrite
    report.md, from results.json alone (nothing trains). ``ctx``'s scale, seeds and data are taken from the saved
    settings. Returns the results; raises ``ReproductionError`` when there are none, naming experiments whose
    figures cannot be redrawn (they have no ``plot``) in a warning.
    """
    results = load_results(ctx.out_dir)
    if not results.get("experiments"):
        raise ReproductionError(f"{ctx.out_dir / RESULTS} holds no finished experiments to redraw; run the "
                                "reproduction first")
    saved = results.get("settings", {})
    for key in ("scale", "seeds", "data", "data_dir"):
        if key in saved:
            setattr(ctx, key, saved[key])
    by_name = {e.name: e for e in module.EXPERIMENTS}
    unknown = [name for name in results["experiments"] if name not in by_name]
    if unknown:
        raise ReproductionError(f"{ctx.out_dir / RESULTS} holds {', '.join(unknown)}, which "
                                f"{module.__name__.rsplit('.')[-1]} does not define: another paper's results?")
    fixed = [name for name in results["experiments"] if by_name[name].plot is None]
    if fixed:
        warnings.warn(f"{', '.join(fixed)}: no plot function, so the figures saved with the results are kept",
                      stacklevel=2)
    for name, found in results["experiments"].items():
        if by_name[name].plot is not None:
            by_name[name].plot(found, ctx)
    atomic_write_text(ctx.out_dir / REPORT, render_report(module, results, ctx))
    return results
