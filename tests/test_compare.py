"""fbalign.compare: the rule × seed grid in parallel processes, its table, its plot, resuming it."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from fbalign import compare as cmp
from fbalign.config import ConfigError, load_config
from fbalign.train import RunDirectoryError


def outcome(rule, seed, status="finished", final=None, best=None):
    summary = {"final": {"test_error": final}, "best": None if best is None else {"test_error": best},
               "epochs": 2, "train_time": 3.0} if status == "finished" else None
    return cmp.RunOutcome(rule, seed, f"runs/{rule}-seed{seed}", status, summary)


def test_results_table_gives_mean_and_sample_sd_per_rule():
    table = cmp.results_table([outcome("fa", 0, final=10.0, best=9.0), outcome("fa", 1, final=12.0, best=11.0),
                               outcome("fa", 2, status="diverged"), outcome("usf", 0, final=8.5, best=8.0)])
    lines = table.splitlines()
    assert lines[0] == ("| rule | runs | test error (%), final epoch | test error (%), best validation epoch "
                        "| s / epoch | not finished |")
    sd = statistics.stdev([10, 12])
    assert lines[2] == f"| fa | 2/3 | 11.00 ± {sd:.2f} | 10.00 ± {sd:.2f} | 1.5 | seed 2: diverged |"
    assert lines[3] == "| usf | 1/1 | 8.50 | 8.00 | 1.5 | – |"
    assert "best validation" not in cmp.results_table([outcome("fa", 0, final=10.0)])


def test_parallelism_splits_the_cores(monkeypatch):
    monkeypatch.setattr(cmp.os, "cpu_count", lambda: 8)
    assert cmp.plan_parallelism(10, "cpu") == (8, 1)
    assert cmp.plan_parallelism(2, "cpu") == (2, 4)
    assert cmp.plan_parallelism(10, "cpu", jobs=3) == (3, 2)
    assert cmp.plan_parallelism(1, "cpu", jobs=4) == (1, 8)


def test_bad_rules_fail_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="unknown rule 'nope'"):
        cmp.compare({"epochs": 1}, ["fa", "nope"], [0], out_dir=tmp_path / "out")
    with pytest.raises(ConfigError, match="names a rule twice"):
        cmp.compare({"epochs": 1}, ["bp", "backprop"], [0], out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


GRID = {"name": "grid", "epochs": 2, "batch_size": 32, "model": {"name": "mlp", "hidden": [16]},
        "data": {"name": "digits", "validation": 200}, "rule": {"name": "frsf", "concordance": 0.5},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}


def test_compare_runs_the_grid_writes_the_table_and_resumes(tmp_path, capsys):
    out = tmp_path / "grid"
    outcomes = cmp.compare(GRID, ["frsf", "bp"], [0, 1], out_dir=out, jobs=2, progress=False)
    assert [(o.rule, o.seed, o.status) for o in outcomes] == [
        ("frsf", 0, "finished"), ("frsf", 1, "finished"), ("backprop", 0, "finished"), ("backprop", 1, "finished")]
    # The config's rule options go to that rule only.
    assert load_config(out / "frsf-seed0" / "config.toml").rule.options == {"concordance": 0.5}
    assert load_config(out / "backprop-seed1" / "config.toml").rule.options == {}
    # The table's numbers are the runs' own.
    finals = {rule: [json.loads((out / f"{rule}-seed{s}" / "result.json").read_text())["final"]["test_error"]
                     for s in (0, 1)] for rule in ("frsf", "backprop")}
    table = (out / "results.md").read_text()
    for rule, values in finals.items():
        assert f"| {rule} | 2/2 | {statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} |" in table
    assert (out / "curves.png").stat().st_size > 10_000
    assert len(json.loads((out / "results.json").read_text())) == 4

    with pytest.raises(RunDirectoryError, match="--resume"):
        cmp.compare(GRID, ["frsf", "bp"], [0, 1], out_dir=out, progress=False)
    steps = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")}
    again = cmp.compare(GRID, ["frsf", "bp", "dfa"], [0, 1], out_dir=out, resume=True, jobs=2, progress=False)
    assert [o.summary["final"] for o in again[:4]] == [o.summary["final"] for o in outcomes]
    assert {p: p.stat().st_mtime_ns for p in steps} == steps  # finished runs were not trained again
    assert again[4].rule == "dfa" and again[4].status == "finished"


SLOW_GRID = """\
epochs = 1000
batch_size = 8
threads = 1
[model]
name = "mlp"
hidden = [128]
[data]
name = "digits"
[log]
progress = false
"""


def test_sigterm_to_the_parent_alone_stops_every_running_worker_with_a_checkpoint(tmp_path):
    """A scheduler's or a user's ``kill PID`` reaches only the parent; the running workers must stop too."""
    config, out = tmp_path / "slow.toml", tmp_path / "grid"
    config.write_text(SLOW_GRID)
    command = [sys.executable, "-m", "fbalign", "compare", str(config), "--rules", "bp,fa", "--seeds", "1",
               "--jobs", "2", "--set", "optimizer.lr=0.02", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    runs = [out / "backprop-seed0", out / "fa-seed0"]
    deadline = time.monotonic() + 120
    while not all((run / "metrics.jsonl").exists() for run in runs):  # both are training, past epoch 1
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the runs did not start within 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    _, err = process.communicate(timeout=60)
    assert time.monotonic() - stopped_at < 30  # the 1000 epochs would take over a minute
    assert process.returncode == 130, err
    outcomes = json.loads((out / "results.json").read_text())
    assert [o["status"] for o in outcomes] == ["interrupted", "interrupted"]
    for run in runs:
        assert (run / "checkpoint.pt").exists() and not (run / "result.json").exists()
    assert "--set optimizer.lr=0.02" in err and "--resume" in err  # the hint reruns the same grid
