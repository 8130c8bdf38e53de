"""The `fbalign` command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fbalign.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "demo" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "fbalign", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("fbalign ")


def test_demo_rejects_unknown_rule_before_training():
    with pytest.raises(ValueError, match="valid rules are"):
        main(["demo", "--rules", "backprop,nope"])


def test_demo_missing_data_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--data-dir", str(tmp_path), "--rules", "fa"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_trains_and_prints_errors_side_by_side(fashion_mnist_dir, capsys):
    assert main(["demo", "--rules", "backprop,fa,usf", "--epochs", "3", "--train-size", "3000", "--lr", "0.05",
                 "--hidden", "64"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "%" not in line and "rule" not in line]
    errors = {r.split("|")[1].strip(): float(r.split("|")[2]) for r in rows}
    assert set(errors) == {"backprop", "fa", "usf"}
    assert all(e < 35 for e in errors.values()), errors  # chance is 90%


def test_demo_helpers_are_deprecated_but_still_work():
    import fbalign.demo as demo
    from fbalign.models import MLP

    with pytest.warns(DeprecationWarning, match="fbalign.models.MLP"):
        net = demo.mlp([4, 3, 2])
    assert isinstance(net, MLP) and [m.out_features for m in net if hasattr(m, "out_features")] == [3, 2]
    with pytest.warns(DeprecationWarning, match="fbalign.data.DATA_HINT"):
        assert "fashion-mnist" in demo.DATA_HINT
    assert set(demo.__all__) == {"run", "add_parser", "main"}
