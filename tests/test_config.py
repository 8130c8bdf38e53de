"""fbalign.config: every key checked before training, errors that name the key and the choices, --set."""

from __future__ import annotations

from pathlib import Path

import pytest

from fbalign.config import Config, ConfigError, apply_overrides, load_config, parse_override, to_toml

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_defaults_round_trip_through_toml(tmp_path):
    cfg = load_config({"rule": {"name": "frsf", "concordance": 0.75}, "model": {"name": "mlp", "hidden": [8]}},
                      ["optimizer.lr=0.5", "schedule.name=multistep", "schedule.milestones=[2, 4]"])
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    again = load_config(tmp_path / "c.toml")
    assert again.to_dict() == {**cfg.to_dict(), "name": "c"}
    assert again.rule.options == {"concordance": 0.75} and again.optimizer.lr == 0.5


@pytest.mark.parametrize("raw, message", [
    ({"epoch": 3}, r"unknown key 'epoch' \(did you mean 'epochs'\?\); valid keys here: name, seed"),
    ({"log": {"evry": 3}}, r"unknown key 'log.evry' \(did you mean 'every'\?\)"),
    ({"data": {"name": "cifar"}}, r"data.name = 'cifar'.*'fashion-mnist', 'mnist', 'digits'"),
    ({"optimizer": {"name": "lbfgs"}}, r"optimizer.name = 'lbfgs'.*'sgd', 'adam'"),
    ({"epochs": 0}, r"epochs = 0: Input should be greater than or equal to 1"),
    ({"device": "gpu"}, r"device = 'gpu'.*'auto', 'cpu', 'cuda'"),
    ({"loss": "hinge"}, r"loss = 'hinge'.*'cross_entropy'"),
    ({"rule": "nope"}, r"unknown rule 'nope'; valid rules are: .*fa.*\(or 'torch'"),
    ({"rule": {"name": "fa", "sead": 1}}, r"rule 'fa' has no option 'sead'; its options are: init, scale"),
    ({"rule": {"name": "usf", "concordance": 2.0}}, r"concordance=2.0 must lie in \[0.0, 1.0\]"),
    ({"model": {"name": "mlp", "width": 3}}, r"model 'mlp' has no option 'width'; its options are: hidden"),
    ({"model": {"name": "mlp", "num_outputs": 3}}, r"no option 'num_outputs'"),
    ({"data": {"name": "linear-teacher", "dir": "/x"}}, r"data set 'linear-teacher' has no option 'dir'"),
    ({"optimizer": {"name": "sgd", "momentom": 0.9}}, r"optimizer 'sgd' has no option 'momentom'.*momentum"),
    ({"schedule": "multistep"}, r"schedule 'multistep' needs milestones"),
    ({"schedule": {"name": "constant", "gamma": 0.1}}, r"'constant' takes no options"),
    ({"log": {"alignment": True}}, r"log.alignment = true needs log.every > 0"),
])
def test_bad_configs_fail_naming_the_key_and_the_choices(raw, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw)


def test_several_errors_are_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config({"epochs": -1, "batch_size": "big", "extra": 1})
    assert all(k in str(e.value) for k in ("epochs", "batch_size", "'extra'"))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no configuration file"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("epochs = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_parse_override_reads_toml_values():
    assert parse_override("optimizer.lr=0.1") == ("optimizer.lr", 0.1)
    assert parse_override("model.hidden=[64, 32]") == ("model.hidden", [64, 32])
    assert parse_override("rule=fa") == ("rule", "fa")
    assert parse_override("data.dir='/tmp/x y'") == ("data.dir", "/tmp/x y")
    assert parse_override("log.progress=false") == ("log.progress", False)
    for bad in ("lr", "=3", "a..b=1", ".a=1"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_override(bad)


def test_overrides_reach_into_sections_and_expand_shorthands():
    raw = {"rule": "fa", "optimizer": {"name": "sgd", "lr": 0.1}}
    out = apply_overrides(raw, ["rule.seed=3", "optimizer.lr=0.5", ("model", {"name": "lenet5"})])
    assert out == {"rule": {"name": "fa", "seed": 3}, "optimizer": {"name": "sgd", "lr": 0.5},
                   "model": {"name": "lenet5"}}
    assert raw == {"rule": "fa", "optimizer": {"name": "sgd", "lr": 0.1}}  # the input is left alone
    # Setting a section to a name replaces its options (they belonged to the old choice).
    cfg = load_config({"rule": {"name": "fa", "init": "gaussian"}}, ["rule=usf"])
    assert cfg.rule.name == "usf" and cfg.rule.options == {}


def test_config_object_and_name_from_file(tmp_path):
    (tmp_path / "my_run.toml").write_text('epochs = 2\nrule = "fa"\n')
    cfg = load_config(tmp_path / "my_run.toml", ["seed=4"])
    assert (cfg.name, cfg.epochs, cfg.rule.name, cfg.seed) == ("my_run", 2, "fa", 4)
    assert load_config(cfg, ["epochs=3"]).epochs == 3 and cfg.epochs == 2
    assert isinstance(load_config(), Config)


def test_choices_are_the_registries_keys(monkeypatch):
    """DATASETS, OPTIMIZERS and SCHEDULES are the one source of truth: what they hold is valid, nothing else."""
    from fbalign import config, data

    monkeypatch.setitem(config.OPTIMIZERS, "my-sgd", config.OPTIMIZERS["sgd"])
    monkeypatch.setitem(config.SCHEDULES, "my-step", config.SCHEDULES["step"])
    monkeypatch.setitem(data.DATASETS, "my-digits", data.DATASETS["digits"])
    cfg = load_config({"optimizer": "my-sgd", "schedule": {"name": "my-step", "step_size": 2}, "data": "my-digits"})
    assert (cfg.optimizer.name, cfg.schedule.name, cfg.data.name) == ("my-sgd", "my-step", "my-digits")
    monkeypatch.delitem(config.OPTIMIZERS, "adam")
    with pytest.raises(ConfigError, match="optimizer.name = 'adam'.*choose one of 'sgd'"):
        load_config({"optimizer": "adam"})


@pytest.mark.parametrize("hidden", [[0], [16, 0], [-3], 64, [8.5]])
def test_a_zero_width_model_is_refused_before_training(hidden, tmp_path):
    from fbalign.train import train

    with pytest.raises(ValueError, match=r"MLP: hidden=.* is not usable: give a list of widths >= 1"):
        train({"model": {"name": "mlp", "hidden": hidden}, "data": "digits", "epochs": 1, "log": {"progress": False}},
              run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
