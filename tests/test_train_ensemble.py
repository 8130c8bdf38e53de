"""fbalign.train.train_ensemble: several runs of one set-up trained as one fbalign.Ensemble, each member as its run
alone (fbalign.train.train) trains."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fbalign.config import ConfigError
from fbalign.data import load_digits, prepare
from fbalign.runner import Stop
from fbalign.train import DivergedError, RunDirectoryError, train, train_ensemble

BASE = {"epochs": 2, "batch_size": 32, "device": "cpu", "threads": 1,
        "model": {"name": "mlp", "hidden": [24, 16], "batchnorm": True},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "schedule": {"name": "cosine"},
        "log": {"progress": False}}
# (seed, learning rate) per member: a grid point twice with different seeds, and one seed at two rates
MEMBERS = [(0, 0.1), (1, 0.1), (0, 0.02)]


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture(scope="module")
def digits():
    return prepare(load_digits(), validation=200, train_size=600, normalize=True, seed=0)


def in_float64(data):
    return dataclasses.replace(data, train_x=data.train_x.double(), val_x=data.val_x.double(),
                               test_x=data.test_x.double())


def configs(rule, members=MEMBERS, **changes):
    return [{**BASE, **changes, "seed": seed, "rule": rule, "optimizer": {**BASE["optimizer"], **changes.get(
        "optimizer", {}), "lr": lr}} for seed, lr in members]


def relative_difference(a, b):
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
               for x, y in zip(a.state_dict().values(), b.state_dict().values()) if x.is_floating_point())


@pytest.mark.parametrize("rule, optimizer", [("fa", "sgd"), ("brsf", "sgd"), ("usf", "bm"),
                                             ({"name": "usf", "concordance": 0.8}, "sgd"), ("kp", "sgd")])
def test_members_train_as_their_runs_alone(float64, rule, optimizer):
    data = in_float64(prepare(load_digits(), validation=200, train_size=600, normalize=True, seed=0))
    settings = {"optimizer": {"name": optimizer, "momentum": 0.9,
                              **({"weight_decay": 1e-3} if rule == "kp" else {})}}
    if optimizer == "bm":  # a bias before BatchNorm has a zero gradient up to rounding, whose sign BM would follow
        settings["model"] = {**BASE["model"], "batchnorm": False}
    members = [(s, lr / 100 if optimizer == "bm" else lr) for s, lr in MEMBERS]
    together = train_ensemble(configs(rule, members, **settings), data=data)
    for member, config in zip(together, configs(rule, members, **settings)):
        alone = train(config, data=data)
        assert member.status == alone.status == "finished"
        assert relative_difference(member.model, alone.model) < 1e-12  # BatchNorm's running statistics included
        assert [h["test_error"] for h in member.history] == [h["test_error"] for h in alone.history]
        for mine, theirs in zip(member.history, alone.history):
            for key in ("train_loss", "val_loss", "test_loss", "lr"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-6 if key == "train_loss" else 1e-12), key
            assert mine["train_error"] == theirs["train_error"]


def test_members_may_mix_backprop_fa_and_shallow(float64):
    data = in_float64(prepare(load_digits(), validation=200, train_size=600, normalize=True, seed=0))
    mixed = [{**c, "rule": rule} for c, rule in zip(configs("fa"), ("backprop", "fa", "shallow"))]
    for member, config in zip(train_ensemble(mixed, data=data), mixed):
        assert relative_difference(member.model, train(config, data=data).model) < 1e-12


def test_a_diverging_member_stops_and_the_others_train_on():
    teacher = {"epochs": 2, "batch_size": 20, "threads": 1, "model": {"name": "mlp", "hidden": [20]},
               "data": {"name": "linear-teacher", "n_train": 2000, "n_test": 100}, "log": {"progress": False}}
    grid = [{**teacher, "seed": seed, "optimizer": {"name": "sgd", "lr": lr}} for seed, lr in
            [(0, 0.01), (0, 3.0), (1, 0.01)]]
    with pytest.raises(DivergedError):
        train(grid[1])
    found = train_ensemble(grid)
    assert [r.status for r in found] == ["finished", "diverged", "finished"]
    assert found[1].error.startswith("member 1: the training loss became") and "learning rate" in found[1].error
    assert found[1].summary()["error"] == found[1].error and found[1].history == []
    for member, config in zip(found[::2], grid[::2]):
        alone = train(config)
        assert [h["test_nse"] for h in member.history] == pytest.approx([h["test_nse"] for h in alone.history],
                                                                         rel=1e-5)
        assert relative_difference(member.model, alone.model) < 1e-5  # float32


class _StopAfter(Stop):
    """A stop requested after ``steps`` looks (one look per training step)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.left = steps

    def requested(self) -> bool:
        self.left -= 1
        return self.left < 0 or super().requested()


def test_an_interrupted_ensemble_resumes_to_the_uninterrupted_weights_bit_for_bit(digits, tmp_path):
    grid = configs("brsf", log={"progress": False, "every": 5})
    whole = train_ensemble(grid, data=digits)
    stopped = train_ensemble(grid, data=digits, run_dir=tmp_path, stop=_StopAfter(23))  # mid-epoch 2
    assert {r.status for r in stopped} == {"interrupted"}
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "members" / "0" / "result.json").exists()
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        train_ensemble(grid, data=digits, run_dir=tmp_path)
    changed = [{**c, "batch_size": 16} for c in grid]
    with pytest.raises(RunDirectoryError, match="batch_size"):
        train_ensemble(changed, data=digits, run_dir=tmp_path, resume=True)
    with pytest.raises(RunDirectoryError, match="holds 3 members, this call gives 2"):
        train_ensemble(grid[:2], data=digits, run_dir=tmp_path, resume=True)
    resumed = train_ensemble(grid, data=digits, run_dir=tmp_path, resume=True)
    for a, b in zip(resumed, whole):
        assert a.status == "finished"
        for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
            assert torch.equal(x, y)
        assert [h["test_error"] for h in a.history] == [h["test_error"] for h in b.history]
    for index, member in enumerate(resumed):
        folder = tmp_path / "members" / str(index)
        assert {p.name for p in folder.iterdir()} == {"config.toml", "metrics.jsonl", "metrics.csv", "result.json"}
        assert [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()] == member.history
        assert json.loads((folder / "result.json").read_text())["seed"] == grid[index]["seed"]
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(5, resumed[0].final["step"] + 1, 5))
    assert all(len(s["loss"]) == 3 for s in steps)


def test_what_members_may_not_differ_in_is_named(digits):
    grid = configs("fa")
    with pytest.raises(ConfigError, match=r"configuration 2 differs from configuration 0 in batch_size; members may "
                                          r"differ only in name, seed, rule, optimizer.lr"):
        train_ensemble([*grid[:2], {**grid[2], "batch_size": 16}], data=digits)
    with pytest.raises(ConfigError, match="optimizer.momentum"):
        train_ensemble([grid[0], {**grid[1], "optimizer": {"name": "sgd", "lr": 0.1}}], data=digits)
    with pytest.raises(ConfigError, match="does not record alignment"):
        train_ensemble([{**c, "log": {"progress": False, "every": 5, "alignment": True}} for c in grid], data=digits)
    with pytest.raises(ConfigError, match="at least one configuration"):
        train_ensemble([], data=digits)
    with pytest.raises(ValueError, match="members must share the architecture and the rule"):
        train_ensemble([grid[0], {**grid[1], "rule": "usf"}], data=digits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_members_on_the_gpu_train_as_their_runs_alone(digits):
    grid = configs("brsf", device="cuda")
    for member, config in zip(train_ensemble(grid, data=digits), grid):
        alone = train(config, data=digits)
        assert next(member.model.parameters()).device.type == "cuda"
        assert relative_difference(member.model, alone.model) < 1e-4  # float32, other kernels
        assert member.final["test_error"] == pytest.approx(alone.final["test_error"], abs=1.0)
