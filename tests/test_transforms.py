"""Graph rewrites (kldsl/transforms.py): soften and with_prompt on an enumerable ToyLM."""

from __future__ import annotations

import math

import pytest
import torch
from test_density import Odd

import kldsl as kl
from kldsl.exact_oracle import exact_divergences
from kldsl.transforms import soften, with_prompt

MAX_TOKENS = 3
PRIOR = kl.ToyLM(vocab="ab", seed=0, name="toy")
OTHER = kl.ToyLM(vocab="ab", seed=7, name="other")


@kl.reward(bounds=(0, MAX_TOKENS))
def n_a(texts):
    return [t.count("a") for t in texts]


def model():
    return kl.prior(PRIOR, max_tokens=MAX_TOKENS) * kl.exp(n_a / 0.5) | ~kl.contains("bb")


def test_softened_log_z_is_the_sum_by_hand():
    penalty = 3.0
    soft = soften(model(), penalty)
    every = PRIOR.enumerate(MAX_TOKENS)
    texts = PRIOR.texts(every.ids)
    log_terms = [
        float(lp) + t.count("a") / 0.5 - penalty * ("bb" in t)
        for lp, t in zip(PRIOR.score(every.ids), texts)
    ]
    by_hand = math.log(sum(math.exp(v) for v in log_terms))
    assert kl.infer(soft, engine="exact").log_z == pytest.approx(by_hand, abs=1e-9)
    assert exact_divergences(PRIOR, soft)["log_z"] == pytest.approx(by_hand, abs=1e-9)
    # the hard target has the smaller Z; where every constraint holds, log p̃ is unchanged
    hard, softened = model().log_density(every.ids), soft.log_density(every.ids)
    assert exact_divergences(PRIOR, model())["log_z"] < by_hand
    ok = torch.isfinite(hard.log_p)
    assert torch.equal(hard.log_p[ok], softened.log_p[ok])
    assert torch.equal(
        softened.log_p[~ok], hard.terms["log a"][~ok] + hard.terms["n_a / 0.5"][~ok] - 3.0
    )


def test_soften_prints_the_indicator_tilt_and_keeps_the_rest():
    soft = soften(model(), 10.0)
    assert str(soft) == (
        'prior(toy, max_tokens=3) * exp(n_a / 0.5) * exp(indicator(contains("bb")) * -10.0)'
    )
    assert soft.conditions() == [] and [t.kind for t in soft.log_density([[0]]).term_list] == [
        "prior",
        "tilt",
        "tilt",
    ]
    positive = kl.prior(PRIOR, max_tokens=2) | kl.contains("a") | kl.regex("^b")
    assert str(soften(positive, 2)) == (
        'prior(toy, max_tokens=2) * exp(indicator(not contains("a")) * -2.0) '
        '* exp(indicator(not regex("^b")) * -2.0)'
    )
    plain = kl.prior(PRIOR, max_tokens=2) * kl.exp(n_a / 0.5)
    assert soften(plain, 10.0) == plain


def test_explain_of_a_softened_graph_shows_the_target_fitted():
    text = soften(model(), 10.0).explain()
    assert 'exp(-10.0·1[contains("bb")[x]])' in text
    assert "softened" in text and "0 or −∞" not in text


def test_soften_refuses_a_penalty_that_is_no_finite_number():
    for bad in (math.inf, -1.0, math.nan, "10", True):
        with pytest.raises(kl.KldslTypeError, match="penalty"):
            soften(model(), bad)


def test_with_prompt_replaces_every_priors_prompt():
    m = kl.prior(PRIOR, prompt="x", max_tokens=MAX_TOKENS) * kl.prior(OTHER) ** 0.5 * kl.exp(
        n_a / 0.5
    ) | ~kl.contains("bb")
    out = with_prompt(m, "ab")
    assert [p.prompt for p in out.priors()] == ["ab", "ab"]
    assert out.tilts() == m.tilts() and out.conditions() == m.conditions()
    assert str(out) == (
        'prior(toy, prompt="ab", max_tokens=3) * prior(other, prompt="ab") ** 0.5 '
        '* exp(n_a / 0.5) | not contains("bb")'
    )
    assert with_prompt(out, "x") == kl.prior(PRIOR, prompt="x", max_tokens=3) * kl.prior(
        OTHER, prompt="x"
    ) ** 0.5 * kl.exp(n_a / 0.5) | ~kl.contains("bb")
    assert with_prompt(soften(m, 1.0), "ab") == soften(out, 1.0)


def test_rewrites_raise_on_an_unknown_node():
    for graph in (Odd(), kl.prior(PRIOR) * Odd(), (kl.prior(PRIOR) * Odd()) | kl.curse):
        with pytest.raises(kl.KldslTypeError, match="Odd"):
            soften(graph, 1.0)
        with pytest.raises(kl.KldslTypeError, match="Odd"):
            with_prompt(graph, "p")
