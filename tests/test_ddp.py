"""DDP under torchrun: 2 gloo processes train the same weights as 1 process with the same global batch, a rank
with other feedback is refused, ``fbalign train --nproc`` writes one run directory, stops and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fbalign import checkpoint
from fbalign.cli import main
from fbalign.config import load_config
from fbalign.train import build_model, load_data, train

sys.path.insert(0, str(Path(__file__).parent))
import ddp_job  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """ddp_job.py on 2 gloo processes: the final states of every rule, and what each rank printed."""
    out = tmp_path_factory.mktemp("ddp") / "states.pt"
    done = subprocess.run([*TORCHRUN, str(Path(__file__).parent / "ddp_job.py"), str(out)], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False), done.stdout


@pytest.mark.parametrize("rule", ddp_job.RULES)
def test_two_processes_train_the_weights_one_process_trains_with_the_whole_batch(two_ranks, rule, one_thread):
    states, _ = two_ranks
    alone = train(ddp_job.CONFIG, rule=rule)
    cfg = load_config(ddp_job.CONFIG, [("rule", rule)])
    start = build_model(cfg, load_data(cfg)).state_dict()
    one = alone.model.state_dict()
    assert one.keys() == states[rule].keys()
    for name, value in one.items():  # weights and feedback (brsf's redraws, kp's plastic B) alike
        torch.testing.assert_close(states[rule][name], value, rtol=1e-5, atol=1e-6, msg=name)
    moved = max(float((one[k] - start[k]).abs().max()) for k in one if k.endswith("weight"))
    assert moved > 1e-2  # the runs trained: a rank training on the wrong slice would be far off
    two = states[rule + ":history"][0]
    assert two["train_loss"] == pytest.approx(alone.final["train_loss"], rel=1e-5)  # the whole batch's loss
    assert two["train_error"] == alone.final["train_error"] and two["test_error"] == alone.final["test_error"]


def test_a_rank_whose_feedback_differs_is_refused_at_start(two_ranks):
    _, printed = two_ranks
    for rank in (0, 1):
        assert f"rank {rank} refused: refusing to train: the model's state differs between ranks (rank 1: " \
               "1.feedback" in printed, printed
    assert "trained" not in printed


SLOW = """\
epochs = 400
batch_size = 16
threads = 1
[model]
name = "mlp"
hidden = [32]
[data]
name = "digits"
train_size = 320
[rule]
name = "brsf"
[optimizer]
name = "sgd"
lr = 0.05
[log]
progress = false
checkpoint_every = 10
"""


def test_nproc_writes_one_run_directory_stops_on_ctrl_c_and_resumes(tmp_path, one_thread):
    config, run = tmp_path / "slow.toml", tmp_path / "run"
    config.write_text(SLOW)
    command = [sys.executable, "-m", "fbalign", "train", str(config), "--nproc", "2", "--out", str(run)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no epoch finished within 180 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # torchrun passes it on to both ranks
    sent = time.monotonic()
    out, err = process.communicate(timeout=120)
    assert time.monotonic() - sent < 60
    assert process.returncode != 0
    assert "stopped after step" in out and f"--nproc 2 --out {run} --resume" in err, err[-3000:]
    stopped = checkpoint.load(run / "checkpoint.pt")
    assert 0 < stopped["epoch"] < 400 and not (run / "result.json").exists()
    assert {p.name for p in run.iterdir()} == {"config.toml", "metrics.jsonl", "metrics.csv", "checkpoint.pt"}

    # Resume to a few epochs past the stop: the same weights as one process trained straight there.
    epochs = stopped["epoch"] + 2
    resumed = subprocess.run([*command, "--resume", "--set", f"epochs={epochs}"], capture_output=True, text=True,
                             env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "on 2 processes" in resumed.stdout
    summary = json.loads((run / "result.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_per_rank"] == 8 and summary["epochs"] == epochs
    alone = train(config, epochs=epochs)
    final = checkpoint.load(run / "checkpoint.pt")["model"]
    for name, value in alone.model.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_bad_launch_is_refused_before_torchrun_starts(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(SLOW)
    assert main(["train", str(config), "--nproc", "3", "--out", str(tmp_path / "run")]) == 2
    assert "batch_size = 16 is the global batch and must split evenly over the 3 processes" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", str(config), "--nproc", "2", "--set", "device=cuda", "--out", str(tmp_path)]) == 2
        assert "CUDA is not available here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
