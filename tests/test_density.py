"""The density interpreter (kldsl/density.py): log p̃ by hand on a ToyLM, term kinds, errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import kldsl as kl
from kldsl.density import factors_of
from kldsl.graph import P_ATOM, Density, Indicator, Model

MAX_TOKENS = 3
PRIOR = kl.ToyLM(vocab="ab", seed=0, name="toy")
OTHER = kl.ToyLM(vocab="ab", seed=7, name="other")


@kl.reward(bounds=(0, MAX_TOKENS))
def n_a(texts):
    return [t.count("a") for t in texts]


def every():
    out = PRIOR.enumerate(MAX_TOKENS)
    return out.ids, PRIOR.texts(out.ids)


def test_each_factor_kind_agrees_with_log_p_tilde_by_hand():
    ids, texts = every()
    model = kl.prior(PRIOR, max_tokens=MAX_TOKENS) * kl.prior(OTHER) ** 0.5 * kl.exp(
        n_a / 0.5
    ) | ~kl.contains("bb")
    d = model.log_density(ids)
    log_a = PRIOR.score(ids).double()
    log_b = OTHER.score(ids).double()
    tilt = torch.tensor([t.count("a") / 0.5 for t in texts], dtype=torch.float64)
    ok = torch.tensor(["bb" not in t for t in texts])
    ind = torch.where(ok, 0.0, -math.inf).double()
    assert torch.equal(d.terms["log a"], log_a)
    assert torch.allclose(d.terms["log b^0.5"], 0.5 * log_b, atol=0, rtol=1e-12)
    assert torch.allclose(d.terms["n_a / 0.5"], tilt, atol=0, rtol=1e-12)
    assert torch.equal(d.terms['1[not contains("bb")]'], ind)
    assert torch.allclose(d.log_p, log_a + 0.5 * log_b + tilt + ind, atol=1e-12, rtol=0)
    assert torch.equal(d.constraints['not contains("bb")'], ok)
    assert torch.equal(d.rewards["n_a"], tilt * 0.5)


def test_terms_carry_their_kind_and_factor_node():
    base = kl.prior(PRIOR, max_tokens=MAX_TOKENS)
    expert = kl.prior(OTHER) ** 0.5
    tilt = kl.exp(n_a / 0.5)
    model = base * expert * tilt | ~kl.contains("bb")
    d = model.log_density(every()[0])
    assert [(t.label, t.kind) for t in d.term_list] == [
        ("log a", "prior"),
        ("log b^0.5", "expert"),
        ("n_a / 0.5", "tilt"),
        ('1[not contains("bb")]', "constraint"),
    ]
    nodes = [t.node for t in d.term_list]
    assert nodes[:3] == [base, expert, tilt] and nodes[3] is model
    assert [t.node for t in d.by_kind("constraint")] == [model]
    assert [t.label for t in d.by_kind("tilt")] == ["n_a / 0.5"]
    assert all(torch.equal(t.values, d.terms[t.label]) for t in d.term_list)
    with pytest.raises(kl.KldslTypeError, match="unknown term kind"):
        d.by_kind("reward")


def test_a_tempered_base_is_kind_prior_and_a_repeated_prior_an_expert():
    p = kl.prior(PRIOR, max_tokens=MAX_TOKENS)
    ids, _ = every()
    log_a = PRIOR.score(ids).double()
    tempered = (p**2.0).log_density(ids)
    assert [t.kind for t in tempered.term_list] == ["prior"]
    assert torch.allclose(tempered.log_p, 2.0 * log_a, atol=0, rtol=1e-12)
    twice = (p * p).log_density(ids)
    assert [(t.label, t.kind) for t in twice.term_list] == [
        ("log a", "prior"),
        ("log a #2", "expert"),
    ]
    assert torch.allclose(twice.log_p, 2.0 * log_a, atol=0, rtol=1e-12)
    assert [f.kind for f in factors_of(p * p)] == ["prior", "expert"]


def test_an_indicator_tilt_is_one_where_the_constraint_holds():
    ids, texts = every()
    model = kl.prior(PRIOR, max_tokens=MAX_TOKENS) * kl.exp(Indicator(kl.contains("ab")) * 2.0)
    d = model.log_density(ids)
    expected = torch.tensor([2.0 * ("ab" in t) for t in texts], dtype=torch.float64)
    assert torch.equal(d.terms['indicator(contains("ab")) * 2.0'], expected)
    assert d.rewards == {}  # an indicator's leaves are constraints, not rewards
    assert Indicator(kl.contains("ab")).bounds() == (0.0, 1.0)
    with pytest.raises(kl.KldslTypeError, match="indicator"):
        Indicator(n_a)


def test_reuse_evaluates_no_leaf_and_scores_no_prior_again():
    calls = []

    @kl.reward
    def counted(texts):
        calls.append(len(texts))
        return [float(len(t)) for t in texts]

    ids, _ = every()
    model = kl.prior(PRIOR, max_tokens=MAX_TOKENS) * kl.exp(counted / 2.0) | kl.contains("a")
    first = model.log_density(ids, batch_size=4096)
    assert calls == [len(ids)]
    other = kl.prior(PRIOR, max_tokens=MAX_TOKENS) * kl.exp(counted / 4.0)
    again = other.log_density(ids, reuse=first)
    assert calls == [len(ids)]
    assert torch.equal(again.terms["counted / 4.0"], first.rewards["counted"] / 4.0)
    with pytest.raises(kl.KldslTypeError, match="reuse="):
        other.log_density(ids[:3], reuse=first)


def test_a_density_rebuilt_from_its_dicts_says_it_lost_the_kinds():
    d = kl.prior(PRIOR, max_tokens=2).log_density(every()[0][:4])
    rebuilt = Density(d.log_p, d.terms, d.rewards, d.constraints, d.texts)
    with pytest.raises(kl.KldslTypeError, match="lost its factor kinds"):
        rebuilt.by_kind("prior")


@dataclass(frozen=True)
class Odd(Model):
    """A factor node outside the closed set."""

    def _fmt(self):
        return "odd", P_ATOM

    def factors(self):
        return [self]


def test_an_unknown_factor_node_raises_naming_its_type():
    model = kl.prior(PRIOR, max_tokens=2) * Odd()
    with pytest.raises(kl.KldslTypeError, match="Odd"):
        model.log_density(every()[0][:4])
    with pytest.raises(kl.KldslTypeError, match="Odd"):
        model.explain()
    with pytest.raises(kl.KldslTypeError, match="Odd"):
        factors_of(model)
