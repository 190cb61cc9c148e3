"""Particle Gibbs (iterated conditional SMC) on enumerable ToyLM targets, checked against
the exact posterior: one kernel step from exact samples gives exact samples again (and a
kernel that drops the reference's weight does not), the chain's frequencies approach the
posterior as it runs longer, the engine's result and its option errors."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from kldsl.backends.smc import particle_gibbs_step
from stats import chi_square

import kldsl as kl
from kldsl import weights
from kldsl.cli import main
from kldsl.target import Target

MAX_TOKENS = 4
INVARIANCE_DRAWS = 1500  # independent kernel steps, each from its own exact sample
INVARIANCE_PARTICLES = 3  # few particles: the next state is far from an exact draw itself
CHAIN_PARTICLES = 8
SHORT, LONG = 32, 512  # chain lengths: TV should fall like 1/√K, 4× from SHORT to LONG
CHAIN_SEEDS = 3


@kl.reward(bounds=(0.0, 1.0))
def frac_a(texts):
    """Fraction of the characters that are "a"."""
    return [t.count("a") / len(t) if t else 0.0 for t in texts]


def target(name: str) -> kl.Model:
    base = kl.prior(kl.ToyLM(vocab="ab", seed=3, eos_bias=-0.5), max_tokens=MAX_TOKENS)
    return {
        "soft": base * kl.exp(3.0 * frac_a),
        "prefix-closed": base | ~kl.contains("a"),
        "mixed": base * kl.exp(2.0 * frac_a) | (kl.contains("a") & ~kl.contains("bbb")),
    }[name]


def exact_probs(model: kl.Model) -> dict[tuple[int, ...], float]:
    exact = kl.infer(model, engine="exact")
    return {tuple(x): float(w) for x, w in zip(exact.ids, exact.weights) if w > 0}


# --- the kernel leaves the posterior invariant ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [("mixed", {}), ("soft", {"ess_threshold": 1.0})],
    ids=["mixed-adaptive", "soft-every-step"],
)
def test_one_step_from_exact_samples_gives_exact_samples(name, options):
    """x ~ p* (exact engine), then one particle Gibbs step: the next states are i.i.d. p*
    too, so their frequencies pass a chi-square test at size INVARIANCE_DRAWS. The same
    sweeps with the next state drawn among the other particles only (the reference's
    weight left out, a kernel that is not p*-invariant) fail it: the check has power."""
    model = target(name)
    exact = kl.infer(model, engine="exact")
    probs = exact_probs(model)
    t = Target(model)
    gen = torch.Generator().manual_seed(0)
    refs = weights.resample(exact.log_weights, INVARIANCE_DRAWS, gen, "multinomial").tolist()
    after, without_reference, moved = [], [], 0
    for r in refs:
        x = exact.ids[r]
        index, result = particle_gibbs_step(t, x, INVARIANCE_PARTICLES, gen, **options)
        after.append(result.ids[index])
        moved += result.ids[index] != x
        others = result.log_w[1:]
        if torch.isfinite(torch.logsumexp(others, 0)):
            j = 1 + int(weights.resample(others, 1, gen, "multinomial")[0])
        else:  # every other particle died: both kernels keep the reference
            j = 0
        without_reference.append(result.ids[j])
    assert moved > 0.2 * INVARIANCE_DRAWS  # the chain does move
    stat, limit = chi_square(after, probs)
    assert stat < limit, (stat, limit)
    stat_wrong, limit = chi_square(without_reference, probs)
    assert stat_wrong > limit, (stat_wrong, limit)


# --- the chain approaches the posterior -----------------------------------------------------------


# R-hat of a short chain is itself noisy; here the distance to the exact posterior is the judge
@pytest.mark.filterwarnings("ignore:MCMC chains have not mixed")
@pytest.mark.parametrize("name", ["prefix-closed", "mixed"])
def test_chain_frequencies_approach_the_exact_posterior(name):
    model = target(name)
    probs = exact_probs(model)

    def runs(k: int) -> list[kl.Samples]:
        return [
            kl.infer(model, engine="smc", n=CHAIN_PARTICLES, gibbs=k, seed=s)
            for s in range(CHAIN_SEEDS)
        ]

    def mean_tv(samples: list[kl.Samples]) -> float:
        return sum(weights.tv_distance(s.distribution(), probs) for s in samples) / len(samples)

    short, long = runs(SHORT), runs(LONG)
    assert all(len(s) == LONG and set(map(tuple, s.ids)) <= set(probs) for s in long)
    # TV shrinks like 1/√K: 4 times from SHORT to LONG; ask for a factor 2, and an absolute
    # size: E[TV] ≤ ½ Σ √(p_i/n_eff) ≤ ½ √(C/n_eff) (Cauchy–Schwarz over the C sequences of
    # the support), n_eff the chains' effective sample size (the smallest over statistics)
    n_eff = sum(s.diagnostics["MCMC ESS (min)"] for s in long) / CHAIN_SEEDS
    assert mean_tv(long) < 0.5 * mean_tv(short)
    assert mean_tv(long) < 0.5 * math.sqrt(len(probs) / n_eff), (mean_tv(long), n_eff)


# --- the engine's result ------------------------------------------------------------------------


def test_engine_result_holds_chain_states_and_diagnostics(tmp_path):
    model = target("mixed")
    s = kl.infer(model, engine="smc", n=8, gibbs=16, seed=0, out=tmp_path / "pg.jsonl")
    assert s.engine == "smc" and len(s) == 16 and s.info["gibbs"] == 16
    assert torch.equal(s.log_weights, torch.zeros(16, dtype=torch.float64))
    assert s.columns["sweep"] == list(range(1, 17))
    d = s.diagnostics
    moves = sum(a != b for a, b in zip(s.ids, s.ids[1:]))  # the chain's visible moves
    assert moves / 16 <= d["moved"] <= 1 and d["moved"] == s.acceptance_rate
    # each of the 17 sweeps extends ≤ 8 rows ≤ 3 times, and ToyLM's decoding reruns a row's
    # whole prefix at each extend: ≤ 8 · (1 + 2 + 3) positions a sweep
    assert d["sweeps"] == 17 and 17 * 8 < d["token_forwards"] <= 17 * 8 * 6
    assert d["traces"]["log p̃"].shape == (1, 16) and "MCMC ESS (min)" in d
    assert bool(torch.isfinite(s.log_p).all()) and math.isfinite(s.log_z)
    assert s.constraints and all(bool(c.all()) for c in s.constraints.values())
    assert len((tmp_path / "pg.jsonl").read_text().splitlines()) == 16
    again = kl.infer(model, engine="smc", n=8, gibbs=16, seed=0)
    assert again.ids == s.ids  # the same seed gives the same chain
    assert Counter(map(tuple, s.ids)).keys() <= exact_probs(model).keys()


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gibbs": 0}, "gibbs must be a positive integer"),
        ({"gibbs": 2.5}, "gibbs must be a positive integer"),
        ({"gibbs": True}, "gibbs must be a positive integer"),
        ({"gibbs": 4, "token_sampler": "awrs"}, "token_sampler='direct'"),
        ({"gibbs": 4, "n": 1}, "n ≥ 2 particles"),
        ({"gibbs": 4, "resampling": "bootstrap"}, "resampling must be"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    options = {"n": 4, **options}
    with pytest.raises(kl.KldslError, match=message):
        kl.infer(target("soft"), engine="smc", **options)


def test_no_support_is_the_engines_clear_error():
    never = kl.prior(kl.ToyLM(vocab="ab"), max_tokens=2) | kl.contains("aaa")
    with pytest.raises(kl.KldslError, match="0 of 4 samples satisfied"):
        kl.infer(never, engine="smc", n=4, gibbs=4)


@pytest.mark.filterwarnings("ignore:MCMC chains have not mixed")
def test_cli_gibbs_flag(toy_kl, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    argv = ["sample", str(toy_kl), "--engine", "smc", "--n", "4", "--gibbs", "6"]
    assert main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 6
    capsys.readouterr()  # the first run's progress bars
    code = main([*argv[:-1], "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "gibbs" in err and "Traceback" not in err
