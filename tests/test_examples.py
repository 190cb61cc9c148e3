"""Every example runs (or, for .kl files, parses) as a test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import kldsl as kl

EXAMPLES = Path(__file__).parent.parent / "examples"
EXACT_TOL = 1e-9


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.kl")), ids=lambda p: p.name)
def test_every_kl_example_parses_and_prints_back(path):
    env = {"toy": kl.ToyLM(vocab="ab ", seed=0, name="toy")}
    graph = kl.load(path, env=env)
    assert kl.parse(str(graph), env=env) == graph
    assert "p̃(x) =" in graph.explain()


def test_control_as_inference_example_shows_the_identity():
    numbers = load_example("control_as_inference").main(steps=80)
    assert numbers["elbo"] == pytest.approx(numbers["rl"], abs=EXACT_TOL)
    assert numbers["elbo"] == pytest.approx(numbers["vi"], abs=EXACT_TOL)
    assert numbers["kl_svi"] < 0.5 * numbers["kl_before"]
    assert numbers["kl_reverse_kl"] < 0.5 * numbers["kl_before"]


def test_pronouns_example_fits_samples_and_fine_tunes(tmp_path):
    """The embedded-model example on a saved ToyLM (same code path, seconds instead of minutes)."""
    folder = kl.Fit(model=kl.ToyLM(vocab="ab ", seed=0), history=[], objective="js").save(
        tmp_path / "toy"
    )
    numbers = load_example("pronouns").main(
        ["--model", str(folder), "--prompt", "", "--pattern", "b", "--mu", "0.3"]
        + ["--max-tokens", "3", "--n", "400", "--min-ess", "50", "--steps", "30"]
        + ["--batch-size", "32", "--lr", "0.1", "--no-lora"]
    )
    # 400 draws: the rates' standard errors are below √(0.25/400) = 0.025 (ESS ≈ 300: 0.03)
    assert numbers["prior_rate"] > 0.45
    assert numbers["lambda"] < 0
    assert numbers["importance_rate"] == pytest.approx(0.3, abs=0.12)
    assert numbers["tuned_rate"] < numbers["fresh_prior_rate"] - 0.1  # moved toward 0.3
