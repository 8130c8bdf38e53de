"""`fbalign reproduce` and the machinery every paper reproduction shares (fbalign.experiments.common)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from fbalign.cli import main
from fbalign.experiments import PAPERS, common
from fbalign.reproduce import load_paper, papers, reproduce


def _fake_paper(calls: list[str]):
    """A paper module with two experiments, the second needing the first; each records that it ran."""

    def run_a(ctx):
        calls.append("a")
        from matplotlib.figure import Figure

        fig = Figure()
        fig.add_subplot().plot([0, 1], [1, 0])
        return {"value": 1.5, "runs": ctx.runs(quick=2, full=20), "steps": ctx.pick(10, 1000),
                "figure": ctx.save_figure(fig, "a.png"), "nan": math.nan}

    def run_b(ctx):
        calls.append("b")
        (ctx.folder("b") / "weights.txt").write_text("kept")
        return {"ratio": 0.25}

    def report_a(results, section, ctx):
        section.figure(results["figure"], "Panel A. A line.")
        section.comparison([("value", results["value"], 1.4, True, "close")])

    def report_b(results, section, ctx):
        section.table(["ratio"], [[results["ratio"]]])

    module = types.ModuleType("fake_paper")
    module.TITLE = "Someone et al. (2000): a paper"
    module.INTRODUCTION = "What this reproduces."
    module.EXPERIMENTS = [common.Experiment("a", "Fig. A", run_a, report_a),
                          common.Experiment("b", "Fig. B", run_b, report_b, needs=("a",))]
    return module


def _context(tmp_path, **kw):
    return common.Context(paper="fake", out_dir=tmp_path / "out", progress=False, **kw)


def test_writes_results_report_and_figures(tmp_path):
    calls: list[str] = []
    module = _fake_paper(calls)
    results = common.reproduce(module, _context(tmp_path), command="fbalign reproduce fake --quick")
    out = tmp_path / "out"
    assert calls == ["a", "b"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["experiments"]["a"]["value"] == 1.5 and saved["experiments"]["a"]["runs"] == 2
    assert saved["experiments"]["a"]["steps"] == 10 and math.isnan(saved["experiments"]["a"]["nan"])
    assert saved["experiments"]["b"]["seconds"] >= 0 and saved["settings"]["scale"] == "quick"
    assert results["experiments"].keys() == saved["experiments"].keys()
    assert (out / "a.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert report.startswith("# Reproduction: Someone et al. (2000)")
    assert "![a](a.png)" in report and "*Panel A. A line.*" in report
    assert "Quick mode" in report and "fbalign reproduce fake --quick" in report
    assert "| value | 1.5 | 1.4 | ✓ | close |" in report
    assert report.index("## Fig. A") < report.index("## Fig. B")


def test_scale_and_seeds(tmp_path):
    ctx = _context(tmp_path, scale="full", seeds=3)
    assert ctx.pick(1, 2) == 2 and ctx.runs(quick=2, full=20) == 3
    assert _context(tmp_path, scale="full").runs(quick=2, full=20) == 20
    with pytest.raises(ValueError, match="scale='huge'"):
        _context(tmp_path, scale="huge")
    with pytest.raises(ValueError, match="seeds=0"):
        _context(tmp_path, seeds=0)


def test_scale_rows_and_the_tiny_scale(tmp_path):
    table = {"quick": {"runs": 2, "steps": 10}, "full": {"runs": 20, "steps": 1000}, "tiny": {"runs": 1, "steps": 3}}
    assert _context(tmp_path, scale="tiny").row(table) == {"runs": 1, "steps": 3}
    assert _context(tmp_path, scale="full", seeds=5).row(table) == {"runs": 5, "steps": 1000}
    assert _context(tmp_path, scale="tiny").row({"quick": {"steps": 10}}) == {"steps": 10}  # no tiny row
    row = _context(tmp_path).row(table)
    row["steps"] = 99  # a copy: the table is not changed
    assert table["quick"]["steps"] == 10 and _context(tmp_path, scale="tiny").quick


def test_claims_are_rendered_with_their_criterion(tmp_path):
    section = common.Report()
    claims = [common.Claim("gap (points)", 0.4, 0.3, "≤ 1 point", 0.4 <= 1.0, "standing"),
              common.Claim("level", 2.0, 1.0, note="read off a figure")]
    section.claims(claims)
    text = section.markdown()
    assert "| gap (points) | 0.4 | 0.3 | ≤ 1 point | ✓ | standing |" in text
    assert "| level | 2 | 1 |  |  | read off a figure |" in text
    assert claims[0].row() == {"quantity": "gap (points)", "ours": 0.4, "paper": 0.3, "criterion": "≤ 1 point",
                               "verdict": True, "note": "standing"}
    import numpy as np

    assert common.Claim("x", 1, 1, "", np.bool_(False)).verdict is False  # stored as a plain bool


def test_replot_redraws_figures_and_report_from_results_alone(tmp_path, capsys):
    calls: list[str] = []
    module = _fake_paper(calls)

    def plot_b(results, ctx):
        from matplotlib.figure import Figure

        fig = Figure()
        fig.add_subplot().bar([0], [results["ratio"]])
        results["figure"] = ctx.save_figure(fig, "b.png")

    module.EXPERIMENTS[1] = common.Experiment("b", "Fig. B", module.EXPERIMENTS[1].run, module.EXPERIMENTS[1].report,
                                              needs=("a",), plot=plot_b)
    ctx = _context(tmp_path, scale="full")
    common.reproduce(module, ctx)
    out = tmp_path / "out"
    saved = (out / "results.json").read_text()
    report = (out / "report.md").read_text()
    assert json.loads(saved)["experiments"]["b"]["figure"] == "b.png"
    (out / "b.png").unlink()
    (out / "report.md").unlink()
    calls.clear()
    with pytest.warns(UserWarning, match="a: no plot function"):
        common.replot(module, common.Context(paper="fake", out_dir=out, progress=False))  # scale from results
    assert calls == [] and (out / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "report.md").read_text() == report and (out / "results.json").read_text() == saved
    with pytest.raises(common.ReproductionError, match="no finished experiments"):
        common.replot(module, common.Context(paper="fake", out_dir=tmp_path / "empty", progress=False))


def test_cli_replot(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["reproduce", "lillicrap2016", "--only", "fig3", "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    (out / "fig3.png").unlink()
    assert main(["reproduce", "lillicrap2016", "--replot", "--out", str(out)]) == 0
    assert "redrew fig3" in capsys.readouterr().out
    assert (out / "fig3.png").read_bytes()[:4] == b"\x89PNG" and (out / "report.md").read_text() == report
    assert main(["reproduce", "lillicrap2016", "--replot", "--out", str(tmp_path / "none")]) == 2
    assert "no finished experiments" in capsys.readouterr().err


def test_only_runs_what_is_asked_and_what_it_needs(tmp_path):
    calls: list[str] = []
    module = _fake_paper(calls)
    common.reproduce(module, _context(tmp_path), only=["a"])
    assert calls == ["a"]
    assert [e.name for e in common.select(module, ["b"])] == ["a", "b"]
    with pytest.raises(common.ReproductionError, match="choose from: a, b"):
        common.select(module, ["c"])


def test_existing_results_are_never_overwritten_silently(tmp_path):
    calls: list[str] = []
    module = _fake_paper(calls)
    common.reproduce(module, _context(tmp_path), only=["a"])
    with pytest.raises(common.ReproductionError, match="--resume .* --overwrite"):
        common.reproduce(module, _context(tmp_path))
    assert calls == ["a"]


def test_resume_reuses_finished_experiments(tmp_path):
    calls: list[str] = []
    module = _fake_paper(calls)
    common.reproduce(module, _context(tmp_path), only=["a"])
    results = common.reproduce(module, _context(tmp_path, resume=True))
    assert calls == ["a", "b"]  # a was not run again
    assert list(results["experiments"]) == ["a", "b"]
    with pytest.raises(common.ReproductionError, match="scale \\('quick', now 'full'\\)"):
        common.reproduce(module, _context(tmp_path, resume=True, scale="full"))


def test_overwrite_clears_only_what_a_reproduction_wrote(tmp_path):
    calls: list[str] = []
    module = _fake_paper(calls)
    common.reproduce(module, _context(tmp_path))
    (tmp_path / "out" / "notes.txt").write_text("mine")
    common.reproduce(module, _context(tmp_path), only=["a"], overwrite=True)
    out = tmp_path / "out"
    assert not (out / "b").exists() and (out / "notes.txt").read_text() == "mine"
    assert list(json.loads((out / "results.json").read_text())["experiments"]) == ["a"]
    assert calls == ["a", "b", "a"]


def test_a_failing_experiment_keeps_the_finished_ones(tmp_path):
    calls: list[str] = []
    module = _fake_paper(calls)

    def broken(ctx):
        raise FloatingPointError("diverged")

    module.EXPERIMENTS[1] = common.Experiment("b", "Fig. B", broken, module.EXPERIMENTS[1].report)
    with pytest.raises(FloatingPointError):
        common.reproduce(module, _context(tmp_path))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(saved["experiments"]) == ["a"]
    assert "## Fig. A" in (tmp_path / "out" / "report.md").read_text()


def test_fmt():
    assert common.fmt(0.02346) == "0.0235"
    assert common.fmt(1.2345e-9) == "1.23e-09"
    assert common.fmt(None) == "–" and common.fmt(math.nan) == "–" and common.fmt(7) == "7"
    assert common.fmt("text") == "text"


def test_papers_are_registered_and_importable():
    assert "lillicrap2016" in papers() and papers() == PAPERS
    module = load_paper("lillicrap2016")
    assert module.TITLE and module.EXPERIMENTS
    names = [e.name for e in module.EXPERIMENTS]
    assert len(set(names)) == len(names)
    for experiment in module.EXPERIMENTS:
        assert set(experiment.needs) <= set(names)
    with pytest.raises(ValueError, match="choose one of: .*lillicrap2016"):
        load_paper("nobody2099")


def test_python_api_defaults_to_runs_paper_scale(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = reproduce("lillicrap2016", only=["fig3"], progress=False, device="cpu")
    assert "fig3" in results["experiments"]
    assert (tmp_path / "runs" / "lillicrap2016-quick" / "report.md").exists()


def test_cli_rejects_bad_input_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "nobody2099"])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["reproduce", "lillicrap2016", "--only", "fig99", "--out", str(tmp_path)]) == 2
    assert "choose from: fig1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "lillicrap2016", "--quick", "--full"])


def test_cli_runs_and_says_where_the_report_is(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["reproduce", "lillicrap2016", "--only", "fig3", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    assert main(["reproduce", "lillicrap2016", "--only", "fig3", "--out", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["reproduce", "lillicrap2016", "--only", "fig3", "--out", str(out), "--no-progress",
                 "--resume"]) == 0


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    try:  # a zombie has exited; only a running or sleeping process still works
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux's /proc")
@pytest.mark.parametrize("paper, workers", [("liao2016", "spawn_main"), ("open-questions", "spawn_main")])
def test_sigterm_stops_a_reproduction_and_its_worker_processes(tmp_path, paper, workers):
    """A ``kill`` of ``fbalign reproduce`` must not leave its training workers running as orphans."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the reproductions train in parallel processes only with two or more cores")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "fbalign", "reproduce", paper, "--quick", "--no-progress",
                                "--out", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    deadline = time.monotonic() + 120
    while True:  # wait for the training workers (the resource tracker is a child too)
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no worker processes within 120 s"
        pool = {c for c in _children(process.pid)
                if workers in Path(f"/proc/{c}/cmdline").read_text(errors="replace")
                and "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_text(errors="replace")}
        if len(pool) >= 2:
            break
        time.sleep(0.1)
    time.sleep(1.0)  # let them start training
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pool) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pool), "worker processes outlived the reproduction"


_PARALLEL_PAPER = '''
import os, time
from fbalign.experiments import common

def run_fast(ctx):
    (ctx.folder("fast") / "made.txt").write_text("fast")
    return {"pid": os.getpid()}

def run_slow(ctx):
    deadline = time.monotonic() + float(os.environ.get("SLOW_SECONDS", "1"))
    while time.monotonic() < deadline:
        time.sleep(0.02)
    return {"pid": os.getpid()}

def run_after(ctx):
    return {"pid": os.getpid(), "read": (ctx.out_dir / "fast" / "made.txt").read_text()}

def report(results, section, ctx):
    section.text(f"pid {results['pid']}")

TITLE = "Parallel paper"
EXPERIMENTS = [common.Experiment("fast", "Fast", run_fast, report, cost=1),
               common.Experiment("after", "After fast", run_after, report, needs=("fast",)),
               common.Experiment("slow", "Slow", run_slow, report, cost=10)]
'''


def _parallel_paper(tmp_path, monkeypatch):
    (tmp_path / "parallel_paper.py").write_text(_PARALLEL_PAPER)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get this sys.path too
    import importlib

    return importlib.import_module("parallel_paper")


def test_experiments_run_side_by_side_in_worker_processes(tmp_path, monkeypatch):
    module = _parallel_paper(tmp_path, monkeypatch)
    results = common.reproduce(module, _context(tmp_path), workers=2)
    found = results["experiments"]
    assert list(found) == ["fast", "after", "slow"]  # the module's order, whatever order they finished in
    assert {found[name]["pid"] for name in found}.isdisjoint({os.getpid()})
    assert found["fast"]["pid"] != found["slow"]["pid"]  # two workers at once
    assert found["after"]["read"] == "fast"  # ran once what it needs had finished
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(saved["experiments"]) == ["fast", "after", "slow"]
    assert "pid" in (tmp_path / "out" / "report.md").read_text()


_DRIVER = '''
import sys
sys.path.insert(0, sys.argv[1])
import parallel_paper
from fbalign.experiments import common
ctx = common.Context(paper="parallel", out_dir=sys.argv[2], progress=False)
try:
    common.reproduce(parallel_paper, ctx, workers=2)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
'''


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux's /proc")
def test_ctrl_c_stops_experiments_running_side_by_side_and_keeps_the_finished(tmp_path, monkeypatch):
    _parallel_paper(tmp_path, monkeypatch)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path), str(out)], stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "SLOW_SECONDS": "120"})
    deadline = time.monotonic() + 60
    results = out / "results.json"
    while not (results.exists() and "after" in json.loads(results.read_text())["experiments"]):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the fast experiments did not finish within 60 s"
        time.sleep(0.05)
    workers = _children(process.pid)
    process.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, err = process.communicate(timeout=30)
    assert time.monotonic() - start < 10, "the slow experiment's worker did not stop within seconds"
    assert process.returncode == 130, err
    finished = json.loads(results.read_text())["experiments"]
    assert set(finished) == {"fast", "after"}  # kept; the stopped one is not recorded
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers), "worker processes outlived the reproduction"
