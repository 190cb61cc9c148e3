"""The vllm runtime (kldsl.VLLM) against the Hugging Face runtime on the same weights.

vLLM starts slowly (tens of seconds), so one engine per model serves the whole module.
Where vLLM cannot be installed (``make test`` installs it in a second environment) the
module is skipped with the reason.
"""

from __future__ import annotations

import math

import pytest
import torch
from stats import Z_SIGMAS
from tiny_hf import tiny_model, tiny_tokenizer

import kldsl as kl
from kldsl import vllm
from kldsl.hf import HFLM

WHY = vllm.available()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"the vllm runtime is not here: {WHY}")

CHARS = "abcdefgh "
# both runtimes compute float32 logits of the same weights with different kernels: about
# 1e-6 of rounding per token (a few float32 ulps of logits of size ~10) and at most 12
# tokens per sequence here, so 1e-3 per sequence leaves a wide margin (and still catches a
# wrong token, context or EOS term, which costs far more than 1e-3)
TOL = 1e-3
#: vLLM options of every engine here: no torch.compile (its first compile takes minutes)
OPTIONS = {"enforce_eager": True}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny llama saved as a Hugging Face folder; head size 32, the CPU kernels' smallest."""
    tokenizer = tiny_tokenizer(CHARS)
    model = tiny_model(len(tokenizer), hidden=64, heads=2, initializer_range=0.3)
    out = tmp_path_factory.mktemp("tiny-llama-vllm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def fast(folder) -> kl.VLLM:
    return kl.resolve(folder, runtime="vllm", **OPTIONS)


@pytest.fixture(scope="module")
def hf(folder) -> HFLM:
    return kl.resolve(folder)


def test_tokens_and_context_are_the_hf_runtimes(fast, hf):
    assert (fast.vocab_size, fast.eos_id, fast.bos_id) == (hf.vocab_size, hf.eos_id, hf.bos_id)
    assert fast.context_ids("ab c") == hf.context_ids("ab c") == [1, 3, 4, 11, 5]
    assert fast.context_ids("") == [1]  # BOS, which vLLM's text path would not add
    assert fast.tokenizer_signature() == hf.tokenizer_signature()
    assert kl.resolve(fast.name, runtime="vllm", **OPTIONS) is fast  # started once


@pytest.mark.parametrize("prompt", ["", "ab c"])
def test_sampling_log_probs_are_hf_scores_and_sequences_end_as_hf_ends_them(fast, hf, prompt):
    batch = fast.sample(300, max_tokens=MAX_TOKENS, prompt=prompt, seed=1)
    ended = [s for s in batch.ids if s and s[-1] == fast.eos_id]
    cut = [s for s in batch.ids if not s or s[-1] != fast.eos_id]
    assert ended and cut, "the test needs sequences of both kinds"
    assert all(len(s) == MAX_TOKENS for s in cut)  # cut at max_tokens, never earlier
    assert all(fast.eos_id not in s[:-1] for s in batch.ids)  # EOS ends a sequence, kept
    assert batch.log_probs.dtype == torch.float64
    scored = hf.score(batch.ids, prompt=prompt)
    assert (batch.log_probs - scored).abs().max() < TOL
    assert (fast.score(batch.ids, prompt=prompt) - scored).abs().max() < TOL


def test_length_distribution_is_the_hf_runtimes(fast, hf):
    n = 1000
    lengths = {}
    for name, lm in (("vllm", fast), ("hf", hf)):
        ids = lm.sample(n, max_tokens=MAX_TOKENS, seed=3).ids
        lengths[name] = torch.tensor([float(len(s)) for s in ids], dtype=torch.float64)
    # two independent samples of the same distribution: their mean lengths differ by less
    # than Z_SIGMAS standard errors of the difference
    gap = lengths["vllm"].mean() - lengths["hf"].mean()
    se = math.sqrt(sum(float(x.var()) / n for x in lengths.values()))
    assert abs(float(gap)) < Z_SIGMAS * se
    cut = {k: float((x == MAX_TOKENS).double().mean()) for k, x in lengths.items()}
    p = (cut["vllm"] + cut["hf"]) / 2
    assert abs(cut["vllm"] - cut["hf"]) < Z_SIGMAS * math.sqrt(2 * p * (1 - p) / n)


def test_next_logprobs_are_the_hf_runtimes(fast, hf):
    prefixes = [[1], [1, 3], [1, 3, 4, 11], [1, 5, 5, 5, 6, 7], [1, 10, 9]]
    got, want = fast.next_logprobs(prefixes), hf.next_logprobs(prefixes)
    assert got.shape == want.shape == (len(prefixes), hf.vocab_size)
    assert torch.allclose(got.exp().sum(1), torch.ones(len(prefixes)), atol=1e-5)
    assert (got - want).abs().max() < TOL


def test_the_same_seed_gives_the_same_samples(fast):
    a = fast.sample(64, max_tokens=MAX_TOKENS, seed=5)
    b = fast.sample(64, max_tokens=MAX_TOKENS, seed=5, batch_size=7)
    c = fast.sample(64, max_tokens=MAX_TOKENS, seed=6)
    assert a.ids == b.ids and torch.equal(a.log_probs, b.log_probs)
    assert a.ids != c.ids


def test_many_seeded_rows_after_a_long_prompt(fast, hf):
    # 64 rows x 109 context tokens exceed one step's token budget (4,096): a prompt split
    # over steps once crashed seeded sampling on CPU
    prompt = "abcdefgh " * 12
    batch = fast.sample(64, max_tokens=4, prompt=prompt, seed=0)
    assert (batch.log_probs - hf.score(batch.ids, prompt=prompt)).abs().max() < TOL


def test_continuations_and_token_log_probs_are_the_hf_runtimes(fast, hf):
    prefixes = [[], [3], [3, 4, 5], [6] * 6]
    tails, token_lp = fast.sample_continuations(prefixes, MAX_TOKENS, prompt="ab", seed=2)
    for prefix, tail, lps in zip(prefixes, tails, token_lp):
        assert len(tail) == len(lps) and tail
        assert tail[-1] == fast.eos_id or len(prefix) + len(tail) == MAX_TOKENS
    full = [p + t for p, t in zip(prefixes, tails)]
    want = hf.token_log_probs(full, prompt="ab")
    for prefix, lps, ref in zip(prefixes, token_lp, want):
        assert max(abs(a - b) for a, b in zip(lps, ref[len(prefix) :])) < TOL
    assert fast.score([[], [3]]).tolist()[0] == 0.0  # the empty sequence holds no token


@pytest.mark.parametrize("engine", ["importance", "rejection", "smc"])
def test_log_z_agrees_across_runtimes(folder, fast, engine):
    model = kl.prior(folder, max_tokens=MAX_TOKENS) | ~kl.contains("h")  # Z = P(no "h")
    runs = {
        name: kl.infer(model, engine=engine, n=400, seed=0, runtime=runtime)
        for name, runtime in (("hf", "hf"), ("vllm", kl.Runtime.of("vllm", **OPTIONS)))
    }
    hf_run, v_run = runs["hf"], runs["vllm"]
    se = math.hypot(hf_run.log_z_se, v_run.log_z_se)
    assert 0 < se < 1 and abs(hf_run.log_z - v_run.log_z) < Z_SIGMAS * se


@pytest.mark.parametrize("engine", ["qrs", "mcmc"])
def test_every_engine_runs_on_the_vllm_runtime(folder, fast, hf, engine):
    model = kl.prior(folder, max_tokens=MAX_TOKENS) * kl.exp(kl.length / 4.0)
    samples = kl.infer(model, engine=engine, n=32, seed=0, runtime=kl.Runtime.of("vllm", **OPTIONS))
    assert len(samples) == 32
    ids = samples.ids
    assert all(len(s) <= MAX_TOKENS for s in ids)
    # the draws are sequences of this prior: HF gives each a finite log-probability
    assert torch.isfinite(hf.score(ids)).all()


def test_fine_tuning_is_refused_with_a_clear_error(fast):
    with pytest.raises(kl.KldslInferenceError, match="hf runtime"):
        fast.log_prob([[3, 4]])


@pytest.mark.slow
def test_embedded_model_samples_what_hf_scores(smollm2):
    lm = kl.resolve("smollm2", runtime="vllm", **OPTIONS)
    assert lm.context_ids("Once upon a time") == smollm2.context_ids("Once upon a time")
    batch = lm.sample(8, max_tokens=16, prompt="Once upon a time", seed=0)
    # float32 on 30 layers: about 1e-5 per token, 16 tokens
    scored = smollm2.score(batch.ids, prompt="Once upon a time")
    assert (batch.log_probs - scored).abs().max() < TOL
    prefixes = [lm.context_ids("The cat"), lm.context_ids("Hello")]
    assert (lm.next_logprobs(prefixes) - smollm2.next_logprobs(prefixes)).abs().max() < TOL
