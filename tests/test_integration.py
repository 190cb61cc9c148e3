"""A few engine runs on the embedded SmolLM2 (slow: they load a real 135M LM)."""

from __future__ import annotations

import math

import pytest
import torch

import kldsl as kl
from kldsl.cli import main as cli_main

pytestmark = pytest.mark.slow
PROMPT = "My neighbour told me that"


def test_importance_on_the_flagship_model(smollm2):
    model = kl.prior(smollm2, prompt=PROMPT, max_tokens=12) * kl.exp(kl.sentiment / 0.2) | ~kl.curse
    s = kl.infer(model, engine="importance", n=8, seed=0)
    assert len(s) == 8 and math.isfinite(s.log_z)
    # the ESS is the one of these weights: (Σw)² / Σw² over the normalised weights
    w = s.weights
    assert s.ess == pytest.approx(float(1 / (w**2).sum()), rel=1e-9)
    # proposal = prior: each log-weight is r/β on allowed texts and −inf on cursing ones
    allowed = s.constraints["not curse"]
    expected = torch.where(allowed, s.rewards["sentiment"] / 0.2, -math.inf)
    assert torch.allclose(s.log_weights, expected)
    # the weights came from the sampling passes: re-scoring gives the same log a(x)
    assert torch.allclose(s.terms["log a"], smollm2.score(s.ids, prompt=PROMPT), atol=1e-3)


def test_rejection_on_a_hard_constraint(smollm2):
    model = kl.prior(smollm2, prompt=PROMPT, max_tokens=8) | ~kl.contains("the")
    r = kl.infer(model, engine="rejection", n=4, seed=0, batch_size=8)
    assert all("the" not in t for t in r.texts) and 0 < r.acceptance_rate <= 1


def test_cli_sample_streams_draws(smollm2, tmp_path, capsys):
    kl_file = tmp_path / "m.kl"
    kl_file.write_text(
        f'm = prior(smollm2, prompt="{PROMPT}", max_tokens=8) * exp(sentiment / 0.5)\n'
    )
    out = tmp_path / "draws.jsonl"
    code = cli_main(["sample", str(kl_file), "--n", "6", "--batch-size", "3", "--out", str(out)])
    assert code == 0
    assert len(out.read_text().splitlines()) == 6
    assert "log Z" in capsys.readouterr().out
