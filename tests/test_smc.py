"""Token-level SMC on enumerable ToyLM targets, checked against the exact answers: the
incremental decoding it runs on, Ẑ unbiased for every kind of target and setting, the
particles' posterior, the genealogy standard error and the CSMC / SMC bracket on log Z."""

from __future__ import annotations

import json
import math

import pytest
import torch
from kldsl.backends.smc import genealogy_rel_var, sweep
from stats import Z_SIGMAS
from tiny_hf import tiny_hf

import kldsl as kl
from kldsl import weights
from kldsl.cli import main
from kldsl.lm import LM, pick
from kldsl.target import Target

MAX_TOKENS = 4
SEEDS = 120  # runs per unbiasedness check: the tolerance below scales with 1/√SEEDS
PARTICLES = 4  # few particles: resampling and deaths happen in most runs
# decoding through a KV cache in float32 against scoring in one forward: float32 rounding
# of ~1e-7 relative per logit, accumulated over ≤ 8 positions of a tiny model (test_hf)
HF_TOL = 1e-4
# an estimate that is exact up to the ToyLM's float32 log-probs (rounding 6e-8 relative
# on values of size ≤ 10, ≤ 8 of them per sequence, engine and exact summing them apart:
# ≤ 2·8·10·6e-8 ≈ 1e-5 in log Z)
EXACT_TOL = 1e-5


@kl.reward(bounds=(0.0, 1.0))
def frac_a(texts):
    """Fraction of the characters that are "a"."""
    return [t.count("a") / len(t) if t else 0.0 for t in texts]


def lm() -> kl.ToyLM:
    return kl.ToyLM(vocab="ab", seed=3, eos_bias=-0.5)


def target(name: str) -> kl.Model:
    base = kl.prior(lm(), max_tokens=MAX_TOKENS)
    return {
        "soft": base * kl.exp(3.0 * frac_a),
        "prefix-closed": base | ~kl.contains("a"),
        "upward-closed": base | kl.contains("aa"),
        "mixed": base * kl.exp(2.0 * frac_a) | (kl.contains("a") & ~kl.contains("bbb")),
    }[name]


def exact_z(model: kl.Model) -> float:
    return kl.infer(model, engine="exact").z


def z_hats(model: kl.Model, proposal: LM | None = None, **options) -> torch.Tensor:
    t = Target(model, proposal)
    return torch.tensor(
        [
            math.exp(sweep(t, PARTICLES, torch.Generator().manual_seed(s), **options).log_z)
            for s in range(SEEDS)
        ],
        dtype=torch.float64,
    )


def assert_unbiased(z: torch.Tensor, exact: float) -> None:
    se = float(z.std()) / math.sqrt(len(z))
    if se == 0:  # every run gave one estimate (AWRS with many hits, one valid token): Z itself
        assert float(z[0]) == pytest.approx(exact, rel=EXACT_TOL)
        return
    assert abs(float(z.mean()) - exact) < Z_SIGMAS * se, (float(z.mean()), exact, se)


# --- incremental decoding ----------------------------------------------------------------------


def _decode_and_score(model: LM, prompt: str, room: int | None) -> None:
    """Decode 3 rows for 6 steps (duplicating rows midway), keeping the log-prob of each
    token drawn, and compare them token by token with teacher-forced scoring."""
    dec = model.decoder(prompt, n=3, max_tokens=room)
    seqs: list[list[int]] = [[], [], []]
    token_lp: list[list[float]] = [[], [], []]
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        tokens = torch.multinomial(dec.logprobs.double().exp(), 1, generator=gen).squeeze(1)
        tokens[tokens == model.eos_id] = (model.eos_id + 1) % model.vocab_size
        for seq, lps, tok, lp in zip(seqs, token_lp, tokens.tolist(), pick(dec.logprobs, tokens)):
            seq.append(tok)
            lps.append(float(lp))
        if step == 2:  # resampling: rows 2, 2, 0
            index = torch.tensor([2, 2, 0])
            before = dec.logprobs.clone()
            dec.select(index)
            assert torch.equal(dec.logprobs.cpu(), before[index].cpu())
            seqs = [list(seqs[i]) for i in index]
            token_lp = [list(token_lp[i]) for i in index]
            tokens = tokens[index]
        if step < 5:
            dec.extend(tokens)
    assert seqs[0][:3] == seqs[1][:3]  # row 2 twice, then each drew its own tokens
    forced = model.token_log_probs(seqs, prompt=prompt)
    for mine, theirs in zip(token_lp, forced):
        assert torch.allclose(torch.tensor(mine), torch.tensor(theirs), atol=HF_TOL, rtol=0)
    scores = model.score(seqs, prompt=prompt)
    totals = torch.tensor([sum(lps) for lps in token_lp], dtype=torch.float64)
    assert torch.allclose(totals, scores, atol=HF_TOL, rtol=0)


def test_prefix_decoding_equals_score():
    _decode_and_score(kl.ToyLM(vocab="abc", seed=2), "", None)


@pytest.mark.parametrize("room", [8, None])  # a static cache, and the dynamic one
def test_cached_decoding_equals_score_and_duplicates_rows(room):
    _decode_and_score(tiny_hf("abcdefgh ", initializer_range=0.3), "ab", room)


def test_cached_decoding_counts_token_forwards():
    tiny = tiny_hf("abcdefgh ")
    dec = tiny.decoder("ab", n=4, max_tokens=4)
    dec.extend(torch.tensor([3, 4, 5, 6]))
    dec.select(torch.tensor([0, 1]))
    dec.extend(torch.tensor([3, 4]))
    assert dec.forwards == len(tiny.context_ids("ab")) + 4 + 2


# --- Ẑ is unbiased -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["soft", "prefix-closed", "upward-closed", "mixed"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"ess_threshold": 0.0},
        {"token_sampler": "awrs", "awrs_hits": 2},
        {"token_sampler": "awrs"},
        {"split_eos": True},
        {"split_eos": True, "token_sampler": "awrs", "awrs_hits": 2},
        {"split_eos": True, "token_sampler": "awrs"},
    ],
    ids=[
        "resampling",
        "no-resampling",
        "awrs-2",
        "awrs",
        "split-eos",
        "split-eos-awrs-2",
        "split-eos-awrs",
    ],
)
def test_z_hat_is_unbiased(name, options):
    model = target(name)
    assert_unbiased(z_hats(model, **options), exact_z(model))


@pytest.mark.parametrize("scheme", weights.RESAMPLING)
def test_z_hat_is_unbiased_with_each_resampling_scheme(scheme):
    model = target("mixed")  # resampling at every step
    assert_unbiased(z_hats(model, ess_threshold=1.0, resampling=scheme), exact_z(model))


def _length_twist(texts: list[str]) -> list[float]:
    return [0.3 * len(t) for t in texts]


@pytest.mark.parametrize("twist", ["prefix", _length_twist], ids=["prefix", "function"])
@pytest.mark.parametrize("split_eos", [False, True], ids=["", "split-eos"])
def test_z_hat_is_unbiased_with_a_twist(twist, split_eos):
    model = target("mixed")
    z = z_hats(model, twist=twist, ess_threshold=1.0, split_eos=split_eos)
    assert_unbiased(z, exact_z(model))


def test_z_hat_is_unbiased_with_another_proposal():
    model = target("mixed")
    proposal = kl.ToyLM(vocab="ab", seed=11)  # same tokenizer, other probabilities
    assert_unbiased(z_hats(model, proposal=proposal), exact_z(model))


def test_z_hat_is_unbiased_with_an_expert_and_a_tempered_prior():
    expert = kl.ToyLM(vocab="ab", seed=5)
    base = kl.prior(lm(), max_tokens=MAX_TOKENS)
    model = base**0.5 * kl.prior(expert, max_tokens=MAX_TOKENS) | ~kl.contains("bbb")
    assert_unbiased(z_hats(model), exact_z(model))


# --- the particles: posterior, killed particles, the engine's result ----------------------------


def test_particles_match_the_exact_posterior_and_tv_falls_with_n():
    model = target("mixed")
    probs = kl.infer(model, engine="exact").distribution()

    def mean_tv(n: int) -> float:
        tvs = [
            weights.tv_distance(kl.infer(model, engine="smc", n=n, seed=s).distribution(), probs)
            for s in range(3)
        ]
        return sum(tvs) / len(tvs)

    small, large = mean_tv(64), mean_tv(1024)
    # TV shrinks like 1/√n: 4 times from 64 to 1024 particles; ask for a factor 2, and an
    # absolute size: E[TV] ≤ ½ Σ √(p_i/n_eff) ≤ ½ √(K/n_eff) with K ≤ 30 sequences and
    # n_eff ≥ n/4 (the ESS after the last resampling), so ≤ 0.35 at n = 1024
    assert large < 0.5 * small and large < 0.35


def test_split_eos_particles_match_the_exact_posterior():
    """With ``split_eos`` the result holds the particles and their finished copies, all
    weighted: the weighted population matches p* within the same bound as above."""
    model = target("prefix-closed")  # p* favours ending early: most of Z is in the copies
    probs = kl.infer(model, engine="exact").distribution()
    s = kl.infer(model, engine="smc", n=1024, seed=0, split_eos=True, token_sampler="awrs")
    assert len(s) > 1024 and s.info["split_eos"]
    assert weights.tv_distance(s.distribution(), probs) < 0.35
    assert all(0 <= a < 1024 for a in s.columns["ancestor"])


def test_prefix_closed_violators_die_and_awrs_keeps_every_particle_valid():
    model = target("prefix-closed")
    direct = kl.infer(model, engine="smc", n=32, seed=0)
    dead = ~torch.isfinite(direct.log_weights)
    assert bool(dead.any())  # "a" is likely: some particles die
    assert all("a" in t for t, d in zip(direct.texts, dead.tolist()) if d)
    assert all("a" not in t for t, d in zip(direct.texts, dead.tolist()) if not d)
    awrs = kl.infer(model, engine="smc", n=32, seed=0, token_sampler="awrs")
    assert bool(torch.isfinite(awrs.log_weights).all())
    assert all("a" not in t for t in awrs.texts)


def test_engine_result_holds_ancestry_and_diagnostics():
    s = kl.infer(target("mixed"), engine="smc", n=16, seed=0, ess_threshold=1.0)
    assert s.engine == "smc" and len(s) == 16
    assert all(0 <= a < 16 for a in s.columns["ancestor"])
    d = s.diagnostics
    assert d["resampling_steps"] >= 1 and len(d["ess_per_step"]) <= MAX_TOKENS
    assert 0 < d["token_forwards"] <= 16 * MAX_TOKENS
    assert math.isfinite(s.log_z) and math.isfinite(s.log_z_se)
    again = kl.infer(target("mixed"), engine="smc", n=16, seed=0, ess_threshold=1.0)
    assert again.ids == s.ids  # the same seed gives the same particles


def test_genealogy_variance_matches_the_replicate_spread():
    """Lee & Whiteley's V̂ = Ẑ²·(relative variance) is unbiased for Var(Ẑ) under
    multinomial resampling: its mean over runs is within Z_SIGMAS standard errors of the
    variance of Ẑ across the same runs (the error of a sample variance from its fourth
    moment)."""
    t = Target(target("mixed"))
    runs = 600
    z, v = [], []
    for s in range(runs):
        r = sweep(
            t,
            PARTICLES,
            torch.Generator().manual_seed(s),
            ess_threshold=1.0,
            resampling="multinomial",
        )
        z.append(math.exp(r.log_z))
        v.append(math.exp(2 * r.log_z) * genealogy_rel_var(r.log_w, r.ancestor, r.resampled))
    z_t, v_t = torch.tensor(z, dtype=torch.float64), torch.tensor(v, dtype=torch.float64)
    var = float(z_t.var())
    centred = z_t - z_t.mean()
    var_se = math.sqrt(max(float((centred**4).mean()) - var**2, 0.0) / runs)
    v_se = float(v_t.std()) / math.sqrt(runs)
    assert abs(float(v_t.mean()) - var) < Z_SIGMAS * math.hypot(var_se, v_se)


def test_log_z_bounds_bracket_the_exact_log_z():
    model = target("mixed")
    exact = kl.infer(model, engine="exact")
    b = kl.log_z_bounds(model, exact, n=PARTICLES, runs=200, seed=0)
    assert b.lower - Z_SIGMAS * b.lower_se <= exact.log_z <= b.upper + Z_SIGMAS * b.upper_se
    assert b.lower < b.upper  # Jensen's gaps on both sides are strict here


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"resampling": "bootstrap"},
        {"token_sampler": "masked"},
        {"ess_threshold": 1.5},
        {"twist": "suffix"},
        {"split_eos": True, "gibbs": 4},
        {"token_sampler": "awrs", "awrs_hits": 1},
        {"token_sampler": "awrs", "awrs_hits": 2.5},
    ],
)
def test_bad_options_are_clear_errors(options):
    with pytest.raises(kl.KldslError):
        kl.infer(target("soft"), engine="smc", n=4, **options)


@pytest.fixture(scope="module")
def toy_kl(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    folder = kl.Fit(model=kl.ToyLM(vocab="ab"), history=[], objective="js").save(root / "toy")
    path = root / "toy.kl"
    path.write_text(f'm = prior({json.dumps(str(folder))}, max_tokens=3) | not contains("a")\n')
    return path


def test_cli_sample_with_smc(toy_kl, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    code = main(["sample", str(toy_kl), "--engine", "smc", "--n", "8", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 8


@pytest.mark.parametrize(
    "argv",
    [
        ["--resampling", "bootstrap"],
        ["--ess-threshold", "2"],
        ["--token-sampler", "x"],
        ["--token-sampler", "awrs", "--awrs-hits", "1"],
    ],
)
def test_cli_bad_smc_options_are_one_error_line(toy_kl, capsys, argv):
    code = main(["sample", str(toy_kl), "--engine", "smc", "--n", "8", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err


# --- the embedded model -------------------------------------------------------------------------


@pytest.mark.slow
def test_lipogram_on_the_embedded_model(smollm2):
    model = kl.prior("smollm2", prompt="I just got back from a trip to", max_tokens=8)
    s = kl.infer(model | ~kl.contains("e"), engine="smc", n=8, seed=0, token_sampler="awrs")
    assert bool(torch.isfinite(s.log_weights).all())
    assert all("e" not in t for t in s.texts)
    assert math.isfinite(s.log_z) and s.log_z < 0
