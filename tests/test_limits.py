"""Resource limits: runs that cannot fit fail at once with a KldslError saying what fits.

Memory is what ``kldsl.budget.available_bytes`` reports; the tests fix it (``MEMORY``) so
that they do not depend on the machine, and make the LM raise if it is ever asked to draw,
so "fails early" means "before any sampling".
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch

import kldsl as kl
from kldsl import budget, weights
from kldsl.errors import KldslError, KldslInferenceError
from kldsl.lm import count_sequences

sys.path.insert(0, str(Path(__file__).parent))
from tiny_hf import tiny_hf  # noqa: E402

MEMORY = 8 * 2**30  # what the tests pretend is available


@pytest.fixture
def memory(monkeypatch):
    monkeypatch.setattr(budget, "available_bytes", lambda: MEMORY)


@pytest.fixture
def no_drawing(monkeypatch):
    """Any sampling at all fails the test: the limits must trip before it."""

    def boom(*args, **kwargs):
        raise AssertionError("the LM was asked to draw before the limit was checked")

    monkeypatch.setattr(kl.ToyLM, "_sample_batch", boom)
    monkeypatch.setattr(kl.ToyLM, "sample_continuations", boom)


def _model(max_tokens: int = 4) -> kl.Model:
    return kl.prior(kl.ToyLM("ab", seed=0, name="toy"), max_tokens=max_tokens) | kl.contains("a")


# --- n ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["importance", "rejection", "qrs", "mcmc", "pyro-importance"])
def test_a_billion_samples_fail_before_anything_runs(engine, memory, no_drawing, tmp_path):
    out = tmp_path / "draws.jsonl"
    with pytest.raises(KldslError) as info:
        kl.infer(_model(), engine=engine, n=10**9, seed=0, out=out)
    message = str(info.value)
    assert message.startswith("n=1,000,000,000 samples of up to 4 tokens need about ")
    per = budget.sample_bytes(_model())
    assert f"at most n ≈ {int(budget.FRACTION * MEMORY) // per:,} fit" in message
    assert not out.exists()  # refused before the out= file was opened


def test_what_the_samples_message_offers_fits(memory):
    per = budget.sample_bytes(_model())
    most = int(budget.FRACTION * MEMORY) // per
    budget.check_samples(_model(), most)  # exactly what the message offers passes
    with pytest.raises(KldslError, match="samples of up to 4 tokens"):
        budget.check_samples(_model(), most + 1)


def test_the_real_available_memory_is_used():
    assert budget.available_bytes() > 0
    with pytest.raises(KldslError, match="n=1,000,000,000,000,000 samples"):
        kl.infer(_model(), n=10**15)  # no machine holds ~10^18 bytes


# --- batch_size --------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["importance", "rejection", "qrs", "mcmc"])
def test_a_million_row_batch_fails_before_drawing(engine, no_drawing, monkeypatch):
    monkeypatch.setattr(budget, "available_bytes", lambda: 2**30)
    with pytest.raises(KldslError) as info:
        kl.infer(_model(), engine=engine, n=64, seed=0, batch_size=10**6)
    message = str(info.value)
    assert message.startswith("a batch of 1,000,000 sequences of up to 4 tokens from toy ")
    assert "(vocabulary 3, context 0 tokens)" in message
    fits = int(message.split("batch_size ≤ ")[1].split(" fits")[0].replace(",", ""))
    assert 10_000 < fits < 10**6
    target = kl.Target(_model())
    budget.check_batch(target, fits, 64)  # what the message offers passes
    with pytest.raises(KldslError):
        budget.check_batch(target, fits + 1, 64)


def test_the_batch_estimate_grows_with_the_vocabulary_and_length():
    small, large = kl.ToyLM("ab"), kl.ToyLM("".join(chr(0x4E00 + i) for i in range(2000)))
    assert large.row_bytes(0, 4) > 100 * small.row_bytes(0, 4)
    assert small.row_bytes(0, 400) > 10 * small.row_bytes(0, 4)
    tiny = tiny_hf()  # a transformer adds its KV cache, which grows with the positions
    # 2 layers x (keys, values) x 2 KV heads x 8 dims x 4 bytes per position, and a copy
    assert tiny.row_bytes(100, 20) - tiny.row_bytes(10, 20) >= 90 * 2 * 2 * 2 * 8 * 4 * 2


# --- exact enumeration --------------------------------------------------------------------------


@pytest.mark.parametrize(("max_tokens", "shown"), [(10**4, "about 10^3,011"), (10**7, "about 10^")])
def test_exact_on_a_huge_space_says_so_at_once(max_tokens, shown):
    lm = kl.ToyLM("ab", seed=0, name="toy")  # two letters: 2^(max_tokens + 1) sequences
    start = time.perf_counter()
    with pytest.raises(KldslInferenceError) as info:
        kl.infer(kl.prior(lm, max_tokens=max_tokens), engine="exact")
    assert time.perf_counter() - start < 5  # generous: it is milliseconds, not a hang
    message = str(info.value)
    assert f"toy has {shown}" in message
    assert f"sequences of at most {max_tokens:,} tokens, more than the enumeration limit" in message


def test_count_sequences_never_builds_giant_integers():
    assert count_sequences(3, 3, 10**9) == 1 + 2 + 4 + 8  # EOS after 0, 1, 2 tokens; or cut
    assert count_sequences(2, 10**7, 10**9) == 10**7 + 1  # one letter: one sequence a length
    assert count_sequences(2, 10**7, 1000) is None
    assert count_sequences(1, 10**7, 10) == 1  # only EOS
    assert count_sequences(10**6, 10**7, 200_000) is None  # returns after a step or two
    for vocab in (2, 3, 5):
        for t in range(1, 7):
            b = vocab - 1
            assert count_sequences(vocab, t, 10**9) == sum(b**k for k in range(t)) + b**t


# --- context length -----------------------------------------------------------------------------


@pytest.mark.parametrize("chars", [300, 300_000])
def test_a_prompt_longer_than_the_context_fails_before_running(chars, monkeypatch):
    tiny = tiny_hf()  # max_position_embeddings = 128
    monkeypatch.setattr(type(tiny), "_sample_batch", lambda *a, **k: pytest.fail("it ran"))
    assert tiny.context_limit == 128
    model = kl.prior(tiny, prompt="ab" * (chars // 2), max_tokens=8)
    start = time.perf_counter()
    with pytest.raises(KldslInferenceError) as info:
        kl.infer(model, n=4)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "tiny attends over at most 128 positions" in message
    assert f"({chars:,} characters) takes {chars + 1:,} tokens of context" in message  # + BOS
    assert "shorten the prompt to at most 120 tokens" in message


def test_a_prompt_that_fits_runs():
    tiny = tiny_hf()
    s = kl.infer(kl.prior(tiny, prompt="ab" * 50, max_tokens=8), n=4, seed=0)  # 101 + 8 ≤ 128
    assert len(s) == 4


def test_max_tokens_alone_past_the_context():
    tiny = tiny_hf()
    with pytest.raises(KldslInferenceError, match="lower max_tokens to at most 127$"):
        kl.infer(kl.prior(tiny, max_tokens=200), n=4)  # the context is BOS alone
    with pytest.raises(
        KldslInferenceError, match="at most 8 tokens or lower max_tokens to at most 2$"
    ):
        kl.infer(kl.prior(tiny, prompt="a" * 125, max_tokens=120), n=4)


# --- importance bookkeeping is linear -----------------------------------------------------------


def test_importance_bookkeeping_is_linear_in_n(monkeypatch):
    """Count the elements every torch.cat and logsumexp call touches during a run: linear
    bookkeeping touches each log-weight a bounded number of times; re-concatenating all
    log-weights after every batch (and taking their ESS) touches ~n²/(2·batch) of them."""
    touched = {"cat": 0, "logsumexp": 0}
    real_cat, real_lse = torch.cat, torch.logsumexp

    def cat(tensors, *args, **kwargs):
        tensors = list(tensors)
        touched["cat"] += sum(t.numel() for t in tensors)
        return real_cat(tensors, *args, **kwargs)

    def logsumexp(x, *args, **kwargs):
        touched["logsumexp"] += x.numel()
        return real_lse(x, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", cat)
    monkeypatch.setattr(torch, "logsumexp", logsumexp)
    model = kl.prior(kl.ToyLM("ab", seed=1), max_tokens=3) * kl.exp(kl.length / 2.0)
    counts = {}
    for n in (1024, 4096):
        touched.update(cat=0, logsumexp=0)
        s = kl.infer(model, engine="importance", n=n, seed=0, batch_size=8)
        assert len(s) == n
        counts[n] = dict(touched)
    for n, c in counts.items():
        # Draw.concat of ~8 fields once, LM batches, two ESS sums per batch, the estimates
        assert c["cat"] < 16 * n and c["logsumexp"] < 16 * n, (n, c)
    # four times the draws, about four times the work (quadratic would be sixteen)
    assert counts[4096]["cat"] < 5 * counts[1024]["cat"]
    assert counts[4096]["logsumexp"] < 5 * counts[1024]["logsumexp"]


def test_running_weights_agree_with_the_batch_formulas():
    log_w = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_w[::7] = -math.inf  # some zero weights
    log_w *= 30  # and a wide range
    running = weights.Running()
    for part in log_w.split(37):
        running.add(part)
    assert running.count == 1000
    assert running.ess == pytest.approx(weights.ess(log_w), rel=1e-9)
    assert running.log_z == pytest.approx(float(weights.log_z(log_w)), abs=1e-9)
    empty = weights.Running()
    empty.add(torch.full((5,), -math.inf, dtype=torch.float64))
    assert empty.ess == 0.0 and empty.log_z == -math.inf
