"""AlignmentRecorder: measures on the right steps, writes strict JSONL / CSV that load_records reads back, resumes,
survives a torn last line, logs to TensorBoard, and costs nothing between measurements."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn

import fbalign
from fbalign.metrics import AlignmentRecorder, load_records


def model_and_batch(rule: str = "fa"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    model = fbalign.convert(model, rule, **({"seed": 0} if rule == "fa" else {}))
    return model, torch.randn(8, 5), torch.randn(8, 2)


def mse(outputs, targets):
    return nn.functional.mse_loss(outputs, targets)


def same_record(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-12) for x, y in
        ((a[k], b[k]) for k in a))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_records_every_nth_step_and_reads_back(tmp_path, suffix):
    model, x, t = model_and_batch()
    path = tmp_path / "deep" / f"alignment{suffix}"
    with AlignmentRecorder(model, mse, every=3, path=path) as recorder:
        returned = [recorder.record(step, x, t) for step in range(10)]
    measured = [r for r in returned if r is not None]
    assert [r["step"] for r in measured] == [0, 3, 6, 9]
    assert all(returned[s] is None for s in range(10) if s % 3)
    assert {"loss", "nse", "angle_dh_bp/2", "angle_b_wt/0", "angle_grad_bp/0.weight"} <= set(measured[0])
    loaded = load_records(path)
    assert all(same_record(a, b) for a, b in zip(loaded, measured)) and len(loaded) == 4
    lines = path.read_text().splitlines()
    if suffix == ".csv":
        assert lines[0].split(",") == list(measured[0]) and len(lines) == 5
    else:
        assert len(lines) == 4 and json.loads(lines[0])["step"] == 0


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_undefined_values_are_written_as_null_or_empty(tmp_path, suffix):
    model, x, t = model_and_batch("shallow")
    path = tmp_path / f"a{suffix}"
    with AlignmentRecorder(model, mse, every=1, path=path) as recorder:
        row = recorder.record(0, x, t)
    assert math.isnan(row["angle_dh_bp/2"])
    text = path.read_text()
    assert "NaN" not in text and "nan" not in text
    if suffix == ".jsonl":
        strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
        assert strict["angle_dh_bp/2"] is None
    assert math.isnan(load_records(path)[0]["angle_dh_bp/2"])


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_resumed_run_appends_and_its_repeated_steps_replace_the_old_ones(tmp_path, suffix):
    model, x, t = model_and_batch()
    path = tmp_path / f"a{suffix}"
    with AlignmentRecorder(model, mse, every=2, path=path) as recorder:
        for step in range(7):
            recorder.record(step, x, t)
    with torch.no_grad():
        model[2].weight.mul_(-1)  # the resumed run is somewhere else: its records must win
    with AlignmentRecorder(model, mse, every=2, path=path) as recorder:
        redone = {step: recorder.record(step, x, t) for step in range(4, 9, 2)}
    records = load_records(path)
    assert [r["step"] for r in records] == [0, 2, 4, 6, 8]
    assert all(same_record(records[i], redone[step]) for i, step in ((2, 4), (3, 6), (4, 8)))
    if suffix == ".csv":
        assert path.read_text().count("step,") == 1  # one header


def test_a_torn_last_line_is_skipped_with_a_warning_and_a_broken_middle_line_is_an_error(tmp_path):
    model, x, t = model_and_batch()
    path = tmp_path / "a.jsonl"
    with AlignmentRecorder(model, mse, every=1, path=path) as recorder:
        for step in range(3):
            recorder.record(step, x, t)
    text = path.read_text()
    path.write_text(text + text.splitlines()[0][:25])
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["step"] for r in load_records(path)] == [0, 1, 2]
    path.write_text("{broken\n" + text)
    with pytest.raises(ValueError, match="line 1"):
        load_records(path)
    with pytest.raises(FileNotFoundError, match="AlignmentRecorder"):
        load_records(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("every", [0, -2, 2.5, "10", True])
def test_bad_every_is_a_clear_error(tmp_path, every):
    model, _, _ = model_and_batch()
    with pytest.raises(ValueError, match="every must be a positive whole number"):
        AlignmentRecorder(model, mse, every=every, path=tmp_path / "a.jsonl")


def test_a_closed_recorder_refuses_to_record(tmp_path):
    model, x, t = model_and_batch()
    recorder = AlignmentRecorder(model, mse, every=1, path=tmp_path / "a.jsonl")
    recorder.close()
    recorder.close()
    with pytest.raises(ValueError, match="closed"):
        recorder.record(0, x, t)
    with pytest.raises(TypeError, match="callable"):
        AlignmentRecorder(model, "mse", every=1, path=tmp_path / "b.jsonl")


def test_nothing_is_hooked_or_run_between_measurements_and_a_measurement_is_two_passes(tmp_path):
    model, x, t = model_and_batch()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(torch.is_grad_enabled()))
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    with AlignmentRecorder(model, mse, every=5, path=tmp_path / "a.jsonl") as recorder:
        recorder.record(3, x, t)
        assert forwards == []
        recorder.record(5, x, t)
        assert forwards == [True, True]  # the rule's forward/backward and backprop's
    assert hooks_before == [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    reference = (torch.randn(20, 5), torch.randn(20, 2))
    forwards.clear()
    with AlignmentRecorder(model, mse, every=5, path=tmp_path / "b.jsonl", reference=reference) as recorder:
        row = recorder.record(0, x, t)
    assert forwards == [True, True, False]  # plus one gradient-free pass over the reference data
    assert row["loss_reference"] == pytest.approx(mse(model(reference[0]), reference[1]).item(), rel=1e-6)
    assert model.training


def test_a_measurement_inside_the_step_is_one_extra_pass_and_nothing_is_hooked_between(tmp_path):
    model, x, t = model_and_batch()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(torch.is_grad_enabled()))
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    def hooked() -> list:
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    with AlignmentRecorder(model, mse, every=5, path=tmp_path / "a.jsonl") as recorder:
        with recorder.step(3, x, t) as row:
            assert hooked() == hooks_before and all(not p._backward_hooks for p in model.parameters())
            mse(model(x), t).backward()
        assert row == {} and forwards == [True]  # the training pass only
        forwards.clear()
        with recorder.step(5, x, t) as row:
            mse(model(x), t).backward()
        assert forwards == [True, True]  # the training pass, and backprop's
        assert row["step"] == 5 and {"loss", "angle_dh_bp/2", "angle_grad_bp/0.weight"} <= set(row)
    assert hooks_before == hooked() and all(not p._backward_hooks for p in model.parameters())
    assert [r["step"] for r in load_records(tmp_path / "a.jsonl")] == [5]
    with pytest.raises(ValueError, match="closed"), recorder.step(10, x, t):
        pass


def test_tensorboard_gets_every_value(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, x, t = model_and_batch()
    with AlignmentRecorder(model, mse, every=2, path=tmp_path / "a.jsonl", tensorboard_dir=tmp_path / "tb") as rec:
        rows = [r for step in range(5) if (r := rec.record(step, x, t)) is not None]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(rows[0]) - {"step"}
    got = events.Scalars("angle_dh_bp/2")
    assert [e.step for e in got] == [0, 2, 4]
    assert [e.value for e in got] == pytest.approx([r["angle_dh_bp/2"] for r in rows], rel=1e-6)


def test_without_tensorboard_installed_the_file_is_still_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    model, x, t = model_and_batch()
    with pytest.warns(UserWarning, match="pip install tensorboard"):
        recorder = AlignmentRecorder(model, mse, every=1, path=tmp_path / "a.jsonl", tensorboard_dir=tmp_path / "tb")
    with recorder:
        recorder.record(0, x, t)
    assert len(load_records(tmp_path / "a.jsonl")) == 1
    assert not (tmp_path / "tb").exists()
