"""The command line: explain, engines, models, errors."""

from __future__ import annotations

from pathlib import Path

from kldsl.cli import main

FLAGSHIP = Path(__file__).parent.parent / "examples" / "positive_not_curse.kl"


def test_explain_prints_the_maths(capsys):
    assert main(["explain", str(FLAGSHIP)]) == 0
    out = capsys.readouterr().out
    assert "p̃(x) = a(x)·exp(sentiment(x)/0.2)·1[¬curse(x)]" in out
    assert out.splitlines()[0].startswith("prior(smollm2, prompt=")


def test_engines_lists_every_registered_engine(capsys):
    assert main(["engines"]) == 0
    out = capsys.readouterr().out
    for name in ("exact", "rejection", "importance", "qrs", "mcmc", "variational"):
        assert name in out


def test_models_lists_the_embedded_model(capsys):
    assert main(["models"]) == 0
    assert "smollm2" in capsys.readouterr().out


def test_errors_are_one_clear_line_and_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.kl"
    bad.write_text("m = prior(smollm2) *\n")
    assert main(["explain", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1:20: missing operand after '*'" in err
    assert main(["sample", str(FLAGSHIP), "--engine", "importanse"]) == 2
    assert "did you mean 'importance'?" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "missing.kl")]) == 2
    assert "no such .kl file" in capsys.readouterr().err
