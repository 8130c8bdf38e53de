"""fbalign.train: the loop learns, writes its run files, resumes bit for bit, stops cleanly, fails clearly."""

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
from torch import nn

import fbalign
from fbalign import checkpoint
from fbalign.cli import main
from fbalign.config import ConfigError, load_config
from fbalign.train import DivergedError, RunDirectoryError, train

SMALL = {"epochs": 3, "batch_size": 32, "threads": 1, "model": {"name": "mlp", "hidden": [32]},
         "data": {"name": "digits"}, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
         "log": {"progress": False}}


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_learns_and_writes_the_run_directory(tmp_path):
    run = tmp_path / "run"
    result = train(SMALL, run_dir=run, rule="fa", log={"every": 10, "progress": False})
    assert result.status == "finished" and [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.final["test_error"] < 15 < result.history[0]["train_error"]  # chance is 90 %
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert {p.name for p in run.iterdir()} == {"config.toml", "metrics.jsonl", "metrics.csv", "steps.jsonl",
                                               "checkpoint.pt", "result.json"}
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == result.history
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,lr,train_loss,train_error")
    steps = [json.loads(line)["step"] for line in (run / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(10, result.final["step"] + 1, 10))
    assert load_config(run / "config.toml").to_dict() == {**result.config.to_dict(), "name": "config"}
    summary = json.loads((run / "result.json").read_text())
    assert summary["status"] == "finished" and summary["final"] == result.final and summary["rule"] == "fa"


def test_unconverted_and_backprop_models_train_bit_for_bit_alike():
    plain, bp = train(SMALL, rule="torch"), train(SMALL, rule="backprop")
    assert_same_weights(weights(plain.model), weights(bp.model))
    assert [h["train_loss"] for h in plain.history] == [h["train_loss"] for h in bp.history]
    assert not any(isinstance(m, nn.Linear) and type(m) is not nn.Linear for m in plain.model.modules())


def test_a_seed_fixes_the_run_and_other_seeds_differ():
    a, b, c = (train(SMALL, rule="brsf", seed=s, epochs=1) for s in (1, 1, 2))
    assert_same_weights(weights(a.model), weights(b.model))
    assert not torch.equal(a.model[1].weight, c.model[1].weight)


def test_finished_work_is_never_overwritten(tmp_path):
    train(SMALL, run_dir=tmp_path, epochs=1)
    with pytest.raises(RunDirectoryError, match="already holds a run; continue it with --resume"):
        train(SMALL, run_dir=tmp_path, epochs=1)


@pytest.mark.parametrize("rule", ["brsf", "kp", "dfa"])
def test_resume_may_extend_a_run_but_not_change_it(tmp_path, rule):
    scheduled = {**SMALL, "rule": rule, "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 1e-3},
                 "schedule": {"name": "multistep", "milestones": [1, 3]}}
    short = train(scheduled, run_dir=tmp_path, epochs=2)
    with pytest.raises(RunDirectoryError, match=r"differs from the checkpoint's in optimizer.lr"):
        train(scheduled, run_dir=tmp_path, resume=True, optimizer={"name": "adam", "lr": 0.1, "weight_decay": 1e-3})
    longer = train(scheduled, run_dir=tmp_path, resume=True, epochs=4)
    straight = train(scheduled, epochs=4)
    assert longer.history[:2] == short.history
    assert_same_weights(weights(longer.model), weights(straight.model))
    assert without_times(longer.history) == without_times(straight.history)
    assert [h["lr"] for h in longer.history] == pytest.approx([0.01, 0.001, 0.001, 0.0001])


def test_kolen_pollack_feedback_steps_with_the_optimizer_in_the_loop():
    # With plain SGD, KP's B and W get the same update and the same decay: B − W shrinks by (1 − lr·λ) a step.
    lr, decay = 0.05, 0.01
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    result = train(SMALL, model=net, rule="kp", epochs=1, optimizer={"name": "sgd", "lr": lr, "weight_decay": decay})
    layer = result.model[3]
    torch.manual_seed(0)
    start = fbalign.convert(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), "kp",
                            seed=0)[3]
    steps = result.final["step"]
    expected = (start.feedback - start.weight.detach()) * (1 - lr * decay) ** steps
    torch.testing.assert_close(layer.feedback - layer.weight.detach(), expected, rtol=1e-4, atol=1e-6)


def test_batch_manhattan_from_the_config():
    result = train(SMALL, rule="usf", optimizer={"name": "bm", "lr": 1e-3, "momentum": 0.9})
    assert result.final["test_error"] < 30


def test_divergence_names_the_step_and_the_learning_rate_and_keeps_the_last_good_checkpoint(tmp_path):
    diverging = {"epochs": 2, "batch_size": 20, "model": {"name": "mlp", "hidden": [20]},
                 "data": {"name": "linear-teacher", "n_train": 2000, "n_test": 100},
                 "optimizer": {"name": "sgd", "lr": 3.0}, "log": {"progress": False, "checkpoint_every": 2}}
    with pytest.raises(DivergedError, match=r"loss became (nan|inf) at step (\d+) .*optimizer.lr, now 3\).*"
                                            r"lower it.*last good checkpoint is kept") as e:
        train(diverging, run_dir=tmp_path)
    step = int(str(e.value).split(" at step ")[1].split()[0])
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    assert 0 < saved["step"] < step
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_model_whose_output_does_not_fit_the_labels_fails_with_both_shapes():
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match=r"output of shape \(2, 3\) for inputs of shape \(2, 1, 8, 8\), but "
                                         r"digits needs \(2, 10\) \(batch, 10 classes\)"):
        train(SMALL, model=wrong)
    with pytest.raises(ValueError, match=r"failed on a batch of inputs of shape \(2, 1, 8, 8\)"):
        train(SMALL, model=nn.Sequential(nn.Linear(5, 10)))


def test_model_and_data_objects_from_a_script():
    from fbalign.data import linear_teacher

    data = linear_teacher(n_train=1000, n_test=200, seed=1)
    net = nn.Sequential(nn.Linear(30, 20, bias=False), nn.Linear(20, 10, bias=False))
    result = train(model=net, data=data, rule="fa", loss="sse", epochs=4, batch_size=10, threads=1,
                   optimizer={"name": "sgd", "lr": 0.01}, log={"progress": False})
    nse = [h["test_nse"] for h in result.history]
    assert nse[-1] < 0.01 < nse[0] and result.model is net
    assert type(net[0]).__module__ == "fbalign.nn"  # converted in place
    assert result.config.model.name == "<Sequential object>"
    with pytest.raises(ConfigError, match="cross_entropy' needs class labels"):
        train(data=data, loss="cross_entropy", epochs=1)


def test_alignment_is_recorded_every_n_steps_without_changing_training(tmp_path):
    recorded = train(SMALL, run_dir=tmp_path, rule="brsf", epochs=2, model={"name": "mlp", "hidden": [32, 16]},
                     log={"every": 20, "alignment": True, "progress": False})
    plain = train(SMALL, rule="brsf", epochs=2, model={"name": "mlp", "hidden": [32, 16]})
    assert_same_weights(weights(recorded.model), weights(plain.model))
    records = [json.loads(line) for line in (tmp_path / "alignment.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(20, recorded.final["step"] + 1, 20))
    angles = [k for k in records[-1] if k.startswith("angle_dh_bp/")]
    assert angles and all(0 <= records[-1][k] < 90 for k in angles)  # sign feedback aligns with backprop
    from fbalign.plot import plot_runs

    assert len(plot_runs([tmp_path]).axes) == 3
    with pytest.raises(ConfigError, match="needs log.every > 0"):
        train(SMALL, log={"alignment": True})
    with pytest.raises(ConfigError, match="give one"):
        train(SMALL, log={"alignment": True, "every": 5})


def test_the_schedule_steps_per_epoch():
    result = train(SMALL, schedule={"name": "multistep", "milestones": [1, 2], "gamma": 0.1})
    assert [h["lr"] for h in result.history] == pytest.approx([0.05, 0.005, 0.0005])


def test_validation_split_gives_the_validation_selected_test_error():
    result = train(SMALL, data={"name": "digits", "validation": 300})
    assert all("val_error" in h for h in result.history)
    best = min(result.history, key=lambda h: h["val_error"])
    assert result.best == best and result.summary()["best"] == best


def test_cli_rejects_a_bad_config_before_training(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('epochs = 1\n[data]\nname = "digits"\n')
    out = tmp_path / "run"
    assert main(["train", str(config), "--set", "epoch=3", "--out", str(out)]) == 2
    assert "unknown key 'epoch' (did you mean 'epochs'?)" in capsys.readouterr().err
    assert not out.exists()
    assert main(["train", str(config), "--set", "data.name=mnist", "--set", f"data.dir='{tmp_path}'",
                 "--out", str(tmp_path / "mnist")]) == 2
    assert "download the four MNIST IDX files" in capsys.readouterr().err
    assert main(["train", str(config), "--set", "log.progress=false", "--out", str(out)]) == 0
    assert main(["train", str(config), "--set", "log.progress=false", "--out", str(out)]) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    assert main(["train", str(config), "--set", "model.hidden=[8]", "--set", "log.progress=false",
                 "--out", str(out), "--resume"]) == 2
    assert "differs from the checkpoint's in model.hidden" in capsys.readouterr().err


def test_cli_train_then_plot(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('epochs = 2\nbatch_size = 32\nthreads = 1\nrule = "usf"\n[log]\nevery = 5\nprogress = false\n')
    for seed in (0, 1):
        assert main(["train", str(config), "--set", f"seed={seed}", "--out", str(tmp_path / f"s{seed}")]) == 0
    assert "finished 2 epoch(s): test error" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "s0"), str(tmp_path / "s1"), "--group", "rule",
                 "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "s0")]) == 0 and (tmp_path / "s0" / "curves.png").exists()
    assert main(["plot", str(tmp_path)]) == 2 and "not a run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_lenet_on_fashion_mnist_32px(fashion_mnist_dir):
    config = Path(__file__).parent.parent / "configs" / "fashion_mnist_lenet.toml"
    result = train(config, epochs=2, data={"name": "fashion-mnist", "size": 32, "validation": 1000,
                                           "train_size": 5000, "normalize": True},
                   optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9}, log={"progress": False})
    assert result.final["test_error"] < 35 and "val_error" in result.final  # chance is 90 %


# --- killed and interrupted runs, in real subprocesses ------------------------------------------------------

KILL_CONFIG = """\
epochs = 12
batch_size = 16
threads = 1
rule = "brsf"
[model]
name = "mlp"
hidden = [256, 256]
[data]
name = "digits"
[optimizer]
name = "sgd"
lr = 0.02
momentum = 0.9
[log]
progress = false
checkpoint_every = 25
every = 10
alignment = true
"""


def fbalign_train(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fbalign", "train", str(config), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def stop_after_first_checkpoint(process: subprocess.Popen, run: Path, signum: int) -> None:
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.002)
    process.send_signal(signum)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run, and the config it came from."""
    root = tmp_path_factory.mktemp("kill")
    config = root / "kill.toml"
    config.write_text(KILL_CONFIG)
    process = fbalign_train(config, root / "reference")
    return config, root / "reference", process


def finished_state(reference_run):
    config, run, process = reference_run
    if process.poll() is None or process.returncode is None:
        process.communicate(timeout=300)
    assert process.returncode == 0
    return checkpoint.load(run / "checkpoint.pt")


def without_times(history):
    return [{k: v for k, v in h.items() if "time" not in k} for h in history]


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_a_stopped_run_resumes_to_the_same_weights_bit_for_bit(reference_run, tmp_path, signum):
    config = reference_run[0]
    run = tmp_path / "run"
    process = fbalign_train(config, run)
    stop_after_first_checkpoint(process, run, signum)
    out, err = process.communicate(timeout=120)
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 130, err
        assert "SIGINT: stopped after step" in out and "checkpoint saved" in out and "--resume" in err
    assert not (run / "result.json").exists()  # it really was stopped mid-way
    stopped = checkpoint.load(run / "checkpoint.pt")
    total = 12 * (1437 // 16)
    assert 0 < stopped["step"] < total

    resumed = fbalign_train(config, run, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    final, reference = checkpoint.load(run / "checkpoint.pt"), finished_state(reference_run)
    assert final["step"] == reference["step"] == total
    assert_same_weights(final["model"], reference["model"])  # weights and the feedback buffers
    assert without_times(final["history"]) == without_times(reference["history"])
    for records in ("steps.jsonl", "alignment.jsonl"):  # records past the checkpoint were not duplicated
        steps = [json.loads(line)["step"] for line in (run / records).read_text().splitlines()]
        assert steps == list(range(10, total + 1, 10)), records


@pytest.mark.parametrize("damage", ["truncated", "other version"])
def test_resume_from_an_unreadable_checkpoint_says_how_to_start_over(tmp_path, capsys, damage):
    config, run = tmp_path / "c.toml", tmp_path / "run"
    config.write_text('epochs = 1\nthreads = 1\n[model]\nname = "mlp"\nhidden = [8]\n[data]\nname = "digits"\n'
                      '[log]\nprogress = false\n')
    assert main(["train", str(config), "--out", str(run)]) == 0
    path = run / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        checkpoint.save({**checkpoint.load(path), "format": 99}, path)
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(run), "--resume", "--set", "epochs=2"]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume {run}" in err and str(path) in err and f"rm -r {run}" in err, err
    assert "Traceback" not in err
