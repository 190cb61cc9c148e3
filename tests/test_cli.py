"""The command line: explain, engines, models, errors, engine flags."""

from __future__ import annotations

from pathlib import Path

import kldsl as kl
from kldsl.cli import _engine_options, build_parser, main

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


def _toy_folder_model(tmp_path: Path) -> Path:
    folder = tmp_path / "toy"
    kl.Fit(model=kl.ToyLM(vocab="ab"), history=[], objective="js").save(folder)
    path = tmp_path / "toy.kl"
    path.write_text(f'prior("{folder}", max_tokens=3) | contains("a")\n')
    return path


def test_a_prompt_the_model_cannot_spell_is_one_error_line(tmp_path, capsys):
    folder = _toy_folder_model(tmp_path).parent / "toy"
    path = tmp_path / "prompt.kl"
    path.write_text(f'prior("{folder}", prompt="xyz", max_tokens=3)\n')
    assert main(["sample", str(path), "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'x' is not in this ToyLM's vocabulary") and "internal" not in err


def test_engine_flags_come_from_the_engines_options():
    parser = build_parser()
    args = parser.parse_args(["sample", "m.kl", "--engine", "mcmc", "--chains", "2"])
    assert _engine_options(args, "mcmc") == {"chains": 2}
    args = parser.parse_args(
        ["sample", "m.kl", "--bound", "0.5", "--max-proposals", "9", "--qrs-beta", "0.1"]
    )
    assert _engine_options(args, "rejection") == {"bound": 0.5, "max_proposals": 9, "qrs_beta": 0.1}
    for flag in ("--resample 3", "--burn-in 1", "--thin 2", "--moves local"):
        parser.parse_args(["sample", "m.kl", *flag.split()])
    args = parser.parse_args(["fit", "m.kl", "--out", "o", "--lr", "0.1", "--objective", "js"])
    # fit's own defaults reach only the engines that take them
    assert _engine_options(args, "pyro-svi", {"steps": 100, "checkpoint_every": 50}) == {
        "steps": 100,
        "lr": 0.1,
        "objective": "js",
    }


def test_sample_passes_engine_flags_and_refuses_foreign_ones(tmp_path, capsys):
    path = _toy_folder_model(tmp_path)
    assert main(["sample", str(path), "--engine", "mcmc", "--n", "8", "--chains", "2"]) == 0
    assert "mcmc: 8 samples" in capsys.readouterr().out
    assert main(["sample", str(path), "--engine", "importance", "--chains", "2"]) == 2
    assert "has no option chains" in capsys.readouterr().err


def test_fit_with_pyro_svi_saves_the_fit(tmp_path, capsys):
    path = _toy_folder_model(tmp_path)
    out = tmp_path / "svi"
    args = ["fit", str(path), "--engine", "pyro-svi", "--steps", "2", "--batch-size", "4"]
    assert main([*args, "--out", str(out), "--lr", "0.01"]) == 0
    assert "2 steps" in capsys.readouterr().out
    fit = kl.Fit.load(out)
    assert fit.info["engine"] == "pyro-svi" and fit.info["lr"] == 0.01 and len(fit.history) == 2
    assert main([*args, "--out", str(out)]) == 2  # an existing fit is kept
    assert "--overwrite" in capsys.readouterr().err
