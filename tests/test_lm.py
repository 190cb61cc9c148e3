"""The LM protocol on the ToyLM: enumeration, sampling, scoring."""

import pytest
import torch
from stats import chi_square

import kldsl as kl
from kldsl.errors import KldslInferenceError


@pytest.mark.parametrize(("vocab", "max_tokens", "prompt"), [("ab", 4, ""), ("abc", 3, "ca")])
def test_enumeration_sums_to_one(vocab, max_tokens, prompt):
    lm = kl.ToyLM(vocab=vocab, seed=3)
    every = lm.enumerate(max_tokens, prompt=prompt)
    assert float(torch.logsumexp(every.log_probs, 0).exp()) == pytest.approx(1.0, abs=1e-9)
    assert len({tuple(s) for s in every.ids}) == len(every.ids)
    assert all(len(s) <= max_tokens for s in every.ids)
    # each enumerated sequence is scored to the same value
    assert torch.allclose(lm.score(every.ids, prompt=prompt), every.log_probs)


def test_sample_log_probs_agree_with_score():
    lm = kl.ToyLM(vocab="abc", seed=2)
    batch = lm.sample(50, 5, prompt="ab", seed=0)
    assert torch.allclose(batch.log_probs, lm.score(batch.ids, prompt="ab"), atol=1e-9)
    ended = [s for s in batch.ids if s[-1] == lm.eos_id]
    cut = [s for s in batch.ids if s[-1] != lm.eos_id]
    assert ended and cut and all(len(s) == 5 for s in cut)


def test_same_seed_same_samples_and_batching_does_not_matter():
    lm = kl.ToyLM(vocab="abc", seed=2)
    a = lm.sample(20, 4, seed=7)
    b = lm.sample(20, 4, seed=7, batch_size=20)
    c = lm.sample(20, 4, seed=8)
    assert a.ids == b.ids and torch.equal(a.log_probs, b.log_probs)
    assert a.ids != c.ids


def test_sampling_frequencies_match_enumeration():
    """Chi-square goodness of fit of 20k samples against the exact distribution."""
    lm = kl.ToyLM(vocab="ab", seed=1, eos_bias=1.0)
    every = lm.enumerate(3)
    probs = {tuple(s): float(p) for s, p in zip(every.ids, every.log_probs.exp())}
    stat, limit = chi_square(lm.sample(20_000, 3, seed=0).ids, probs)
    assert stat < limit


def test_enumeration_limit_is_a_friendly_error():
    lm = kl.ToyLM(vocab="abcdef", seed=0)
    with pytest.raises(KldslInferenceError, match="more than the enumeration limit"):
        lm.enumerate(12)


def test_toylm_encode_decode_and_text():
    lm = kl.ToyLM(vocab="xy")
    assert lm.encode("xyx") == [1, 2, 1]
    assert lm.text([1, 2, 0]) == "xy"
    with pytest.raises(kl.KldslValueError, match="not in this ToyLM's vocabulary"):
        lm.encode("z")


def test_custom_lm_works_through_the_protocol():
    class Uniform(kl.LM):
        name = "uniform"
        vocab_size = 3
        eos_id = 0

        def encode(self, text):
            return [int(c) for c in text]

        def decode(self, ids):
            return "".join(str(i) for i in ids)

        def next_logprobs(self, prefixes):
            return torch.full((len(prefixes), 3), -torch.log(torch.tensor(3.0)))

    lm = Uniform()
    every = lm.enumerate(3)
    assert float(every.log_probs.exp().sum()) == pytest.approx(1.0)
    batch = lm.sample(8, 3, seed=0)
    assert torch.allclose(batch.log_probs, lm.score(batch.ids))
    m = kl.prior(lm, max_tokens=3) | kl.contains("1")
    d = m.log_density(batch.ids, base_log_probs=batch.log_probs)
    assert d.constraints['contains("1")'].tolist() == ["1" in t for t in lm.texts(batch.ids)]
