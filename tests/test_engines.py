"""Every engine against the exact posterior, computed here by brute-force enumeration.

Each case is a ToyLM model small enough to enumerate (≤ 40 sequences). The test
computes log p̃(x) for every sequence by hand — from ``lm.enumerate`` and plain Python
versions of the rewards and constraints, never through the model graph — and checks the
engines against it: ``exact`` to float precision, the sampling engines with a fixed seed
and tolerances derived from their sample size:

- an estimate with a standard error must lie within ``Z_SIGMAS`` of them;
- a chi-square goodness-of-fit statistic must lie below its ``1 - FAILURE_RATE`` quantile.
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
from dataclasses import dataclass

import pytest
import torch
from stats import Z_SIGMAS, chi_square
from torch import Tensor

import kldsl as kl
from kldsl import weights
from kldsl.errors import (
    KldslError,
    KldslInferenceError,
    KldslNameError,
    KldslRewardError,
)
from kldsl.target import Target

EXACT_TOL = 1e-9  # enumeration against enumeration: float rounding only
BIG_BATCH = 1000  # sampling batch for speed where batching is not what is tested
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

Key = tuple[int, ...]


# --- rewards and constraints, each with a plain-Python twin for the brute force ------------


def _frac_a(text: str) -> float:
    return text.count("a") / len(text) if text else 0.0


@kl.reward(bounds=(0.0, 1.0))
def frac_a(texts):
    """Fraction of the characters that are "a"."""
    return [_frac_a(t) for t in texts]


@kl.reward
def n_a(texts):  # no declared bounds: rejection cannot derive M
    return [float(t.count("a")) for t in texts]


# --- the cases ------------------------------------------------------------------------------


@dataclass
class Case:
    """A model and its exact unnormalised posterior over every sequence."""

    name: str
    model: kl.Model
    lm: kl.ToyLM  # the base prior's LM, also the default proposal
    max_tokens: int
    keys: list[Key]  # every sequence (EOS included when drawn)
    log_a: Tensor  # [S] log a(x) of the base prior
    log_p: Tensor  # [S] log p̃(x), by hand
    bound: float | None  # bound= to pass to rejection (None: the engine derives it)
    log_m: float  # the bound M ≥ max log w that rejection uses

    @property
    def log_z(self) -> float:
        return float(torch.logsumexp(self.log_p, 0))

    @property
    def post(self) -> Tensor:
        """Exact posterior probabilities p*(x), aligned with ``keys``."""
        return (self.log_p - self.log_z).exp()

    def probs(self, log_p: Tensor | None = None) -> dict[Key, float]:
        log_p = self.log_p if log_p is None else log_p
        p = (log_p - torch.logsumexp(log_p, 0)).exp()
        return dict(zip(self.keys, p.tolist()))

    def q_mask(self) -> Tensor:
        """Sequences the prior can draw (the tempered case's empty sequence has a = e^-10⁴)."""
        return self.log_a > -700.0


def _text(lm: kl.ToyLM, key: Key) -> str:
    return "".join(lm.chars[i - 1] for i in key if i != lm.eos_id)


def _enumerate(lm: kl.ToyLM, max_tokens: int) -> tuple[list[Key], Tensor, list[str]]:
    every = lm.enumerate(max_tokens)
    keys = [tuple(s) for s in every.ids]
    return keys, every.log_probs, [_text(lm, k) for k in keys]


def _indicator(flags: list[bool]) -> Tensor:
    return torch.tensor([0.0 if f else -math.inf for f in flags], dtype=torch.float64)


@functools.cache
def make_case(name: str) -> Case:
    if name == "soft":  # a(x) · exp(frac_a / 0.5): M = 1 / 0.5 = 2
        lm = kl.ToyLM("ab", seed=1, name="toy")
        keys, log_a, texts = _enumerate(lm, 4)
        log_r = torch.tensor([_frac_a(t) / 0.5 for t in texts], dtype=torch.float64)
        model = kl.prior(lm, max_tokens=4) * kl.exp(frac_a / 0.5)
        return Case(name, model, lm, 4, keys, log_a, log_a + log_r, None, 2.0)
    if name == "hard":  # a(x) · 1["bba" in x]: Z ≈ 0.049
        lm = kl.ToyLM("ab", seed=0, name="toy")
        keys, log_a, texts = _enumerate(lm, 4)
        log_c = _indicator(["bba" in t for t in texts])
        model = kl.prior(lm, max_tokens=4) | kl.contains("bba")
        return Case(name, model, lm, 4, keys, log_a, log_a + log_c, None, 0.0)
    if name == "soft_hard":  # three letters, a tilt and a negated constraint
        lm = kl.ToyLM("abc", seed=2, name="toy")
        keys, log_a, texts = _enumerate(lm, 3)
        log_r = torch.tensor([_frac_a(t) / 0.5 for t in texts], dtype=torch.float64)
        log_c = _indicator(["bb" not in t for t in texts])
        model = kl.prior(lm, max_tokens=3) * kl.exp(frac_a / 0.5) | ~kl.contains("bb")
        return Case(name, model, lm, 3, keys, log_a, log_a + log_r + log_c, None, 2.0)
    if name == "product":  # a(x) · b(x): log w = log b ≤ 0
        lm = kl.ToyLM("ab", seed=3, name="toy")
        other = kl.ToyLM("ab", seed=4, name="other")
        keys, log_a, _ = _enumerate(lm, 4)
        other_keys, other_lp, _ = _enumerate(other, 4)
        log_b = dict(zip(other_keys, other_lp.tolist()))
        log_p = log_a + torch.tensor([log_b[k] for k in keys], dtype=torch.float64)
        model = kl.prior(lm, max_tokens=4) * kl.prior(other, max_tokens=4)
        return Case(name, model, lm, 4, keys, log_a, log_p, None, 0.0)
    if name == "tempered":  # a(x)^0.5: log w = −0.5 log a has no a-priori bound
        lm = kl.ToyLM("ab", seed=6, name="toy")
        keys, log_a, _ = _enumerate(lm, 4)
        log_p = 0.5 * log_a
        model = kl.prior(lm, max_tokens=4) ** 0.5
        # M from the enumeration over the sequences the prior can draw: the empty one has
        # a = e^-10⁴ (never drawn) and p* = e^-5000 / Z (no mass), so rejection stays exact.
        drawable = log_a > -700.0
        m = float((log_p - log_a)[drawable].max())
        return Case(name, model, lm, 4, keys, log_a, log_p, m, m)
    raise ValueError(name)


ALL_CASES = ["soft", "hard", "soft_hard", "product", "tempered"]


# --- statistical helpers --------------------------------------------------------------------


def q_sd(q: Tensor, psi: Tensor) -> float:
    """Standard deviation of ψ(x) under q (a per-sample influence function)."""
    mean = (q * psi).sum()
    return float((q * (psi - mean) ** 2).sum().sqrt())


def qrs_exact(case: Case, log_beta: float) -> dict[str, float | Tensor]:
    """Exact p_β ∝ min(p̃, β·a), TV(p*, p_β), and the per-proposal sd of qrs's TV estimate.

    qrs estimates TV by ½ mean|w/Ẑ − m/Ẑ_β| with m = min(w, β); linearising in Ẑ and Ẑ_β
    gives the influence function ψ = h + c_Z·(w − Z) + c_β·(m − Z_β).
    """
    mask = case.q_mask()
    log_q, log_p = case.log_a[mask], case.log_p[mask]
    q = log_q.exp()
    w = (log_p - log_q).exp()
    m = w.clamp(max=math.exp(log_beta))
    z, z_beta = float((q * w).sum()), float((q * m).sum())
    d = w / z - m / z_beta
    s = torch.sign(d)
    c_z = -0.5 * float((q * s * w).sum()) / z**2
    c_beta = 0.5 * float((q * s * m).sum()) / z_beta**2
    psi = 0.5 * d.abs() + c_z * (w - z) + c_beta * (m - z_beta)
    log_p_beta = torch.full_like(case.log_p, -math.inf)
    log_p_beta[mask] = torch.log(q * m)
    tv = 0.5 * float((case.post[mask] - q * m / z_beta).abs().sum())
    return {
        "log_p_beta": log_p_beta,
        "tv": tv,
        "tv_sd": q_sd(q, psi),
        "acceptance": z_beta / math.exp(log_beta),
    }


# --- exact ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_CASES)
def test_exact_matches_brute_force(name):
    case = make_case(name)
    s = kl.infer(case.model, engine="exact")
    assert s.log_z == pytest.approx(case.log_z, abs=EXACT_TOL)
    assert s.log_z_se == 0.0
    got = dict(zip((tuple(k) for k in s.ids), s.weights.tolist()))
    assert set(got) == set(case.keys)
    want = case.probs()
    assert max(abs(got[k] - want[k]) for k in case.keys) < EXACT_TOL

    post, log_a = case.post, case.log_a
    support = post > 0
    log_post = case.log_p - case.log_z
    kl_post_prior = float((post * (log_post - log_a))[support].sum())
    assert s.divergences["KL(p*‖a)"] == pytest.approx(kl_post_prior, abs=EXACT_TOL)
    a = log_a.exp()
    if not bool((~support & (a > 0)).any()):  # finite unless a has mass where p* has none
        kl_prior_post = float((a * (log_a - log_post))[a > 0].sum())
        assert s.divergences["KL(a‖p*)"] == pytest.approx(kl_prior_post, abs=EXACT_TOL)
    else:
        assert s.divergences["KL(a‖p*)"] == math.inf


def test_exact_pure_constraint_kl_is_minus_log_z():
    """The ruler: for p* = a | c, KL(p*‖a) = −log Z = −log P_a(c)."""
    case = make_case("hard")
    s = kl.infer(case.model, engine="exact")
    assert s.divergences["KL(p*‖a)"] == pytest.approx(-case.log_z, abs=EXACT_TOL)
    p_c = float(case.log_a.exp()[torch.isfinite(case.log_p)].sum())
    assert s.z == pytest.approx(p_c, abs=EXACT_TOL)


# --- rejection ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_CASES)
def test_rejection_samples_the_exact_posterior(name):
    case = make_case(name)
    n = 400
    options = {} if case.bound is None else {"bound": case.bound}
    s = kl.infer(case.model, engine="rejection", n=n, seed=1, batch_size=BIG_BATCH, **options)
    assert len(s) == n and s.info["bound"] == pytest.approx(case.log_m)
    stat, limit = chi_square(s.ids, case.probs())
    assert stat < limit

    # the acceptance rate estimates Z·e^{-M}, and implies log Ẑ = M + log(rate)
    p_accept = math.exp(case.log_z - case.log_m)
    rate_se = math.sqrt(p_accept * (1 - p_accept) / s.n_proposed)
    assert abs(s.acceptance_rate - p_accept) < Z_SIGMAS * rate_se
    assert s.log_z == pytest.approx(case.log_m + math.log(s.acceptance_rate), abs=1e-12)
    assert abs(s.log_z - case.log_z) < Z_SIGMAS * s.log_z_se


def test_rejection_log_z_is_unbiased_across_seeds():
    """The acceptance rate counts every acceptance of the last batch, also those past n.

    Counting its proposals but only the kept acceptances biased log Ẑ down by ~1.3 reported
    standard errors on this case; the mean of K standardised errors has sd 1/√K.
    """
    case = make_case("soft")
    k = 12
    errors = []
    for seed in range(k):
        s = kl.infer(case.model, engine="rejection", n=150, seed=seed, batch_size=64)
        errors.append((s.log_z - case.log_z) / s.log_z_se)
    assert abs(sum(errors) / k) < Z_SIGMAS / math.sqrt(k)


# --- importance -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_CASES)
def test_importance_log_z_and_divergences(name):
    case = make_case(name)
    n = 2000
    s = kl.infer(case.model, engine="importance", n=n, seed=2, batch_size=BIG_BATCH)
    assert len(s) == n and s.n_proposed == n
    assert abs(s.log_z - case.log_z) < Z_SIGMAS * s.log_z_se

    # KL(p*‖q) by self-normalised weights: influence ψ = h − (KL + 1)·(w/Z − 1), h = r log r
    mask = case.q_mask()
    q = case.log_a[mask].exp()
    log_r = case.log_p[mask] - case.log_a[mask] - case.log_z  # log(w / Z)
    r = log_r.exp()
    h = torch.where(r > 0, r * log_r, torch.zeros_like(r))
    kl_pq = float((q * h).sum())
    sd = q_sd(q, h - (kl_pq + 1) * (r - 1))
    assert abs(s.divergences["KL(p*‖q)"] - kl_pq) < Z_SIGMAS * sd / math.sqrt(n)
    if torch.isfinite(log_r).all():  # KL(q‖p*) = log Ẑ − mean log w
        kl_qp = -float((q * log_r).sum())
        sd = q_sd(q, -log_r) + q_sd(q, r)  # its two parts' errors, added
        assert abs(s.divergences["KL(q‖p*)"] - kl_qp) < Z_SIGMAS * sd / math.sqrt(n)
    else:
        assert s.divergences["KL(q‖p*)"] == math.inf


@pytest.mark.parametrize("name", ["soft", "hard", "product", "tempered"])
def test_importance_is_properly_weighted_exactly(name):
    """Σ_x q(x)·w(x)·f(x) = Σ_x p̃(x)·f(x) over every sequence of another proposal LM."""
    case = make_case(name)
    q_lm = kl.ToyLM(case.lm.chars, seed=99, name="q")
    every = q_lm.enumerate(case.max_tokens)
    draw = Target(case.model, q_lm).evaluate(every.ids, every.log_probs)
    assert torch.equal(draw.log_q, every.log_probs)
    log_p_hand = dict(zip(case.keys, case.log_p.tolist()))
    texts = [_text(case.lm, tuple(s)) for s in every.ids]
    fs = {
        "1": [1.0] * len(texts),
        "length": [float(len(t)) for t in texts],
        "starts with a": [float(t.startswith("a")) for t in texts],
        "frac_a": [_frac_a(t) for t in texts],
    }
    q_times_w = (every.log_probs + draw.log_w).exp()
    p_tilde = torch.tensor([log_p_hand[tuple(s)] for s in every.ids], dtype=torch.float64).exp()
    for f_name, f in fs.items():
        f = torch.tensor(f, dtype=torch.float64)
        lhs, rhs = float((q_times_w * f).sum()), float((p_tilde * f).sum())
        assert lhs == pytest.approx(rhs, rel=EXACT_TOL, abs=1e-300), f_name


def test_importance_resampled_tv_falls_with_n():
    case = make_case("soft_hard")
    probs = case.probs()
    seeds = [0, 1, 2]

    def mean_tv(n: int) -> float:
        tvs = []
        for seed in seeds:
            s = kl.infer(case.model, engine="importance", n=n, seed=seed, batch_size=BIG_BATCH)
            tvs.append(weights.tv_distance(s.resample(n, seed=seed).distribution(), probs))
        return sum(tvs) / len(tvs)

    small, large = mean_tv(200), mean_tv(4000)
    # TV shrinks like 1/√n: √20 ≈ 4.5 times; ask for a factor 2
    assert large < 0.5 * small


def test_importance_resample_option_gives_equal_weights():
    case = make_case("soft")
    s = kl.infer(
        case.model, engine="importance", n=3000, seed=3, batch_size=BIG_BATCH, resample=2000
    )
    assert len(s) == 2000 and s.engine == "importance+resample"
    assert torch.equal(s.log_weights, torch.zeros(2000, dtype=torch.float64))
    stat, limit = chi_square(s.ids, case.probs())
    # SIR from 3000 weighted draws is only approximately p*; the resampling adds the
    # multinomial noise the chi-square expects, the weights a smaller error on top
    assert stat < 2 * limit


def _fine_tune(lm: kl.ToyLM, case: Case, steps: int = 60, lr: float = 1.0) -> kl.ToyLM:
    """A copy of ``lm`` trained by forward KL toward the exact posterior (DPG-style)."""
    tuned = kl.ToyLM(lm.chars, name="tuned")
    with torch.no_grad():
        tuned.logits.copy_(lm.logits)
    support = [i for i, p in enumerate(case.post.tolist()) if p > 0]
    seqs = [list(case.keys[i]) for i in support]
    target = case.post[support]
    for _ in range(steps):
        log_q = torch.zeros(len(seqs), dtype=torch.float64)
        for t in range(case.max_tokens):
            rows = [i for i, s in enumerate(seqs) if len(s) > t]
            lp = tuned.next_logprobs([seqs[i][:t] for i in rows])
            tok = torch.tensor([seqs[i][t] for i in rows])
            log_q = log_q.index_add(0, torch.tensor(rows), lp.gather(1, tok[:, None])[:, 0])
        loss = -(target * log_q).sum()  # forward KL up to a constant
        (grad,) = torch.autograd.grad(loss, tuned.logits)
        with torch.no_grad():  # plain gradient descent: torch.optim's first import is slow
            tuned.logits -= lr * grad
    return tuned


def test_a_proposal_closer_to_the_posterior_has_higher_ess():
    case = make_case("hard")
    tuned = _fine_tune(case.lm, case)
    n = 1000
    base = kl.infer(case.model, engine="importance", n=n, seed=4, batch_size=BIG_BATCH)
    better = kl.infer(
        case.model, engine="importance", n=n, seed=4, batch_size=BIG_BATCH, proposal=tuned
    )
    assert better.info["proposal"] == "tuned"
    # exact ESS / n = 1 / E_q[(w/Z)²]; the prior's is Z ≈ 0.05
    every = tuned.enumerate(case.max_tokens)
    log_p_hand = dict(zip(case.keys, case.log_p.tolist()))
    log_p = torch.tensor([log_p_hand[tuple(s)] for s in every.ids], dtype=torch.float64)
    log_r = log_p - every.log_probs
    exact_frac = 1 / float((every.log_probs + 2 * (log_r - case.log_z)).exp().sum())
    assert exact_frac > 4 * math.exp(case.log_z)  # a bigram LM gets ≈ 0.23 of n here
    assert better.ess > 3 * base.ess
    assert abs(better.log_z - case.log_z) < Z_SIGMAS * better.log_z_se
    assert better.log_z_se < base.log_z_se


# --- qrs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_CASES)
def test_qrs_log_z(name):
    case = make_case(name)
    s = kl.infer(case.model, engine="qrs", n=200, seed=5, batch_size=BIG_BATCH)
    assert abs(s.log_z - case.log_z) < Z_SIGMAS * s.log_z_se
    # the default qrs_beta is the 90th percentile of the first batch's log-weights
    stat, limit = chi_square(
        s.ids, case.probs(qrs_exact(case, math.log(s.info["qrs_beta"]))["log_p_beta"])
    )
    assert stat < limit


@pytest.mark.parametrize("name", ["soft", "tempered"])
def test_qrs_with_a_huge_beta_is_rejection(name):
    case = make_case(name)
    beta = 4 * math.exp(case.log_m)  # ≥ 4 · max w: min(w, β) = w everywhere
    s = kl.infer(case.model, engine="qrs", n=150, seed=6, batch_size=BIG_BATCH, qrs_beta=beta)
    assert s.divergences["TV(p*,p_β)"] == pytest.approx(0.0, abs=1e-12)
    assert s.divergences["KL(p*‖p_β)"] == pytest.approx(0.0, abs=1e-12)
    stat, limit = chi_square(s.ids, case.probs())
    assert stat < limit
    p_accept = math.exp(case.log_z) / beta
    rate_se = math.sqrt(p_accept * (1 - p_accept) / s.n_proposed)
    assert abs(s.acceptance_rate - p_accept) < Z_SIGMAS * rate_se


@pytest.mark.parametrize("name", ["soft", "product", "tempered"])
def test_qrs_moderate_beta_tv_and_samples_match_exact(name):
    """β_qrs = Z sits inside the range of w: p_β ≠ p*, and both are known exactly."""
    case = make_case(name)
    log_beta = case.log_z
    exact = qrs_exact(case, log_beta)
    assert exact["tv"] > 0.01  # the test is about a real bias
    s = kl.infer(
        case.model, engine="qrs", n=300, seed=7, batch_size=BIG_BATCH, qrs_beta=math.exp(log_beta)
    )
    n_q = s.n_proposed
    assert abs(s.divergences["TV(p*,p_β)"] - exact["tv"]) < Z_SIGMAS * exact["tv_sd"] / math.sqrt(
        n_q
    )
    p_acc = exact["acceptance"]
    assert abs(s.acceptance_rate - p_acc) < Z_SIGMAS * math.sqrt(p_acc * (1 - p_acc) / n_q)
    stat, limit = chi_square(s.ids, case.probs(exact["log_p_beta"]))
    assert stat < limit


def test_qrs_samples_tv_falls_with_n():
    case = make_case("soft")
    beta = math.exp(case.log_m)  # = max w: exact
    probs = case.probs()

    def mean_tv(n: int) -> float:
        tvs = []
        for seed in (0, 1, 2):
            s = kl.infer(
                case.model, engine="qrs", n=n, seed=seed, batch_size=BIG_BATCH, qrs_beta=beta
            )
            tvs.append(weights.tv_distance(s.distribution(), probs))
        return sum(tvs) / len(tvs)

    small, large = mean_tv(100), mean_tv(2000)
    assert large < 0.5 * small  # √20 ≈ 4.5 times in expectation


def test_qrs_sweep_trades_acceptance_for_divergence(tmp_path):
    case = make_case("tempered")
    png = tmp_path / "sweep.png"
    rows = kl.qrs_sweep(case.model, n=1000, seed=0, batch_size=BIG_BATCH, plot=png)
    assert len(rows) == 25
    betas = [r["qrs_beta"] for r in rows]
    assert betas == sorted(betas)
    for key in ("acceptance_rate", "TV(p*,p_β)", "KL(p*‖p_β)"):
        values = [r[key] for r in rows]
        assert all(b <= a + 1e-12 for a, b in zip(values, values[1:])), key
    assert rows[0]["acceptance_rate"] > rows[-1]["acceptance_rate"]
    assert rows[0]["TV(p*,p_β)"] > 0.1 > rows[-1]["TV(p*,p_β)"]
    assert rows[-1]["TV(p*,p_β)"] == pytest.approx(0.0, abs=1e-12)  # β = the pool's max w
    assert png.read_bytes()[:8] == PNG_MAGIC

    chosen = kl.qrs_sweep(case.model, betas=[10.0, 1.0, 3.0], n=200, batch_size=BIG_BATCH)
    assert [r["qrs_beta"] for r in chosen] == pytest.approx([1.0, 3.0, 10.0])


# --- seeds and batching ---------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["importance", "rejection", "qrs"])
def test_same_seed_same_samples(engine):
    case = make_case("soft")
    a = kl.infer(case.model, engine=engine, n=50, seed=11)
    b = kl.infer(case.model, engine=engine, n=50, seed=11)
    c = kl.infer(case.model, engine=engine, n=50, seed=12)
    assert a.ids == b.ids and torch.equal(a.log_weights, b.log_weights)
    assert a.log_z == b.log_z
    assert a.ids != c.ids
    assert a.resample(20, seed=3).ids == a.resample(20, seed=3).ids


@pytest.mark.parametrize("batch_size", [1, 7])
def test_batch_size_keeps_rejection_exact(batch_size):
    case = make_case("soft")
    s = kl.infer(case.model, engine="rejection", n=250, seed=13, batch_size=batch_size)
    stat, limit = chi_square(s.ids, case.probs())
    assert stat < limit
    assert abs(s.log_z - case.log_z) < Z_SIGMAS * s.log_z_se


@pytest.mark.parametrize("batch_size", [7, 1000])
def test_batch_size_keeps_importance_valid(batch_size):
    case = make_case("product")
    s = kl.infer(case.model, engine="importance", n=700, seed=14, batch_size=batch_size)
    assert len(s) == 700
    assert abs(s.log_z - case.log_z) < Z_SIGMAS * s.log_z_se


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "options", "tried"),
    [
        ("exact", {}, 31),
        ("importance", {}, 40),
        ("rejection", {"max_proposals": 120}, 120),
        ("qrs", {"max_proposals": 120}, 120),
    ],
)
def test_unsatisfiable_constraint_says_z_is_tiny(engine, options, tried):
    lm = kl.ToyLM("ab", seed=0, name="toy")
    model = kl.prior(lm, max_tokens=4) | kl.contains("c")
    with pytest.raises(KldslInferenceError) as info:
        kl.infer(model, engine=engine, n=40, seed=0, batch_size=16, **options)
    message = str(info.value)
    assert f'0 of {tried} samples satisfied `contains("c")`' in message
    assert f"Z is probably below 1/{tried}" in message


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_n_must_be_positive(n):
    with pytest.raises(KldslError, match="n must be a positive number of samples"):
        kl.infer(make_case("soft").model, n=n)


def test_unknown_engine_lists_the_known_ones():
    with pytest.raises(KldslNameError) as info:
        kl.infer(make_case("soft").model, engine="importanse")
    message = str(info.value)
    assert "did you mean 'importance'?" in message
    known = message.split("known: ")[1].split(", ")
    assert known == sorted(kl.engines()) and {"exact", "importance", "qrs", "rejection"} <= set(
        known
    )


def test_unknown_option_lists_the_engines_options():
    with pytest.raises(KldslError) as info:
        kl.infer(make_case("soft").model, engine="qrs", n=4, qrs_bta=2.0)
    message = str(info.value)
    assert "engine 'qrs' has no option qrs_bta" in message
    assert "its options: qrs_beta, max_proposals" in message


def test_non_positive_qrs_beta_is_an_error():
    with pytest.raises(KldslError, match="qrs_beta must be a positive number"):
        kl.infer(make_case("soft").model, engine="qrs", n=4, qrs_beta=0.0)


def test_proposal_with_another_tokenizer_is_refused():
    other = kl.ToyLM("xyz", seed=0, name="other")
    with pytest.raises(KldslInferenceError, match="tokenizes differently"):
        kl.infer(make_case("soft").model, engine="importance", n=4, proposal=other)


@pytest.mark.parametrize(
    ("build", "why"),
    [
        (lambda lm: kl.prior(lm, max_tokens=4) * kl.exp(n_a / 2.0), "has no upper bound"),
        (lambda lm: kl.prior(lm, max_tokens=4) ** 0.5, "α = 0.5 < 1"),
    ],
)
def test_rejection_without_a_bound_says_pass_bound(build, why):
    model = build(kl.ToyLM("ab", seed=0, name="toy"))
    with pytest.raises(KldslInferenceError) as info:
        kl.infer(model, engine="rejection", n=4)
    assert why in str(info.value) and "pass bound=M" in str(info.value)


def test_rejection_warns_when_max_proposals_runs_out():
    case = make_case("hard")  # Z ≈ 0.049: 400 proposals accept about 19
    with pytest.warns(UserWarning, match="stopped at max_proposals=400"):
        s = kl.infer(case.model, engine="rejection", n=100, seed=0, max_proposals=400)
    assert 0 < len(s) < 100 and s.n_proposed == 400
    assert s.acceptance_rate == len(s) / 400
    assert abs(s.log_z - case.log_z) < Z_SIGMAS * s.log_z_se


def test_rejection_with_another_proposal_needs_a_bound():
    case = make_case("soft")
    with pytest.raises(KldslInferenceError, match="the proposal is not the prior"):
        kl.infer(case.model, engine="rejection", n=4, proposal=kl.ToyLM("ab", seed=9))


def test_rejection_checks_a_declared_bound():
    case = make_case("soft")
    with pytest.raises(KldslInferenceError, match="exceeds the bound M = 1.0000"):
        kl.infer(case.model, engine="rejection", n=50, bound=1.0)


def test_nan_reward_names_the_reward_and_the_text():
    @kl.reward(bounds=(0.0, 1.0))
    def nan_after_ab(texts):
        return [math.nan if "ab" in t else 0.5 for t in texts]

    lm = kl.ToyLM("ab", seed=0, name="toy")
    model = kl.prior(lm, max_tokens=4) * kl.exp(nan_after_ab)
    with pytest.raises(KldslRewardError) as info:
        kl.infer(model, engine="importance", n=64, seed=0)
    message = str(info.value)
    assert "reward `nan_after_ab` returned nan on the sample " in message
    text = re.search(r"on the sample '([ab]*)'", message).group(1)
    assert "ab" in text


# --- streaming draws to out= -----------------------------------------------------------------------


def test_out_streams_every_draw_with_exact_log_densities(tmp_path):
    case = make_case("soft_hard")
    path = tmp_path / "draws.jsonl"
    s = kl.infer(case.model, engine="importance", n=40, seed=0, batch_size=16, out=path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["ids"] for r in records] == s.ids
    log_p_hand = dict(zip(case.keys, case.log_p.tolist()))
    for r in records:
        want = log_p_hand[tuple(r["ids"])]
        if math.isinf(want):
            assert r["log_p"] is None and r["log_w"] is None
            assert r["constraints"] == {'not contains("bb")': False}
        else:
            assert r["log_p"] == pytest.approx(want, abs=EXACT_TOL)
            assert r["log_w"] == pytest.approx(r["log_p"] - r["log_q"], abs=EXACT_TOL)
        assert r["rewards"]["frac_a"] == pytest.approx(_frac_a(r["text"]), abs=EXACT_TOL)


def test_out_keeps_finished_batches_when_a_reward_fails(tmp_path):
    calls = []

    @kl.reward(bounds=(0.0, 1.0))
    def flaky(texts):
        calls.append(len(texts))
        if len(calls) >= 3:
            raise RuntimeError("reward server went away")
        return [0.0] * len(texts)

    lm = kl.ToyLM("ab", seed=0, name="toy")
    model = kl.prior(lm, max_tokens=4) * kl.exp(flaky)
    path = tmp_path / "partial.jsonl"
    with pytest.raises(KldslRewardError, match="reward server went away"):
        kl.infer(model, engine="importance", n=64, seed=0, batch_size=16, out=path)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 * 16
    assert all(json.loads(line)["rewards"] == {"flaky": 0.0} for line in lines)


# --- the Samples result type -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weighted():
    case = make_case("soft")
    return case, kl.infer(case.model, engine="importance", n=300, seed=21, batch_size=BIG_BATCH)


def test_samples_resample_is_equally_weighted_and_unbiased(weighted):
    case, s = weighted
    k = 4000
    r = s.resample(k, seed=1)
    assert len(r) == k and len(r.texts) == k and len(r.log_p) == k
    assert torch.equal(r.weights, torch.full((k,), 1.0 / k, dtype=torch.float64))
    assert r.info["resampled_from"] == len(s)
    values = s.rewards["frac_a"]
    mean = float((s.weights * values).sum())
    sd = float((s.weights * (values - mean) ** 2).sum().sqrt())
    assert abs(float(r.rewards["frac_a"].mean()) - mean) < Z_SIGMAS * sd / math.sqrt(k)
    # every resampled row is the original row: text, log p̃ and reward move together
    by_text = dict(zip(s.texts, zip(s.log_p.tolist(), values.tolist())))
    assert all(
        by_text[t] == (lp, v)
        for t, lp, v in zip(r.texts, r.log_p.tolist(), r.rewards["frac_a"].tolist())
    )
    systematic = s.resample(k, seed=1, method="systematic")
    assert abs(float(systematic.rewards["frac_a"].mean()) - mean) < Z_SIGMAS * sd / math.sqrt(k)


def test_samples_to_pandas(weighted):
    _, s = weighted
    df = s.to_pandas()
    assert list(df.columns) == [
        "text",
        "weight",
        "log_weight",
        "log_p",
        "term:log a",
        "term:frac_a / 0.5",
        "frac_a",
    ]
    assert len(df) == len(s)
    assert df["weight"].sum() == pytest.approx(1.0, abs=1e-12)
    assert df["log_p"].tolist() == s.log_p.tolist()


def test_samples_to_jsonl_and_summary(weighted, tmp_path):
    _, s = weighted
    path = s.to_jsonl(tmp_path / "out" / "samples.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(s)
    assert [r["ids"] for r in records] == s.ids
    assert [r["log_weight"] for r in records] == s.log_weights.tolist()
    summary = json.loads((tmp_path / "out" / "samples.jsonl.summary.json").read_text())
    assert summary["engine"] == "importance"
    assert summary["n"] == len(s)
    assert summary["log_z"] == s.log_z and summary["ess"] == pytest.approx(s.ess)
    assert set(summary["divergences"]) == {"KL(q‖p*)", "KL(p*‖q)"}


def test_samples_summary_renders(weighted):
    from rich.console import Console

    _, s = weighted
    console = Console(record=True, width=140)
    console.print(s.summary())
    text = console.export_text()
    assert "log Z" in text and f"{s.log_z:.4f}" in text
    assert "ESS" in text and "mean frac_a" in text and "KL(p*‖q)" in text


def test_samples_plot_writes_a_png(weighted, tmp_path):
    _, s = weighted
    path = s.plot(tmp_path / "plots" / "weights.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_samples_repr_and_html():
    case = make_case("soft_hard")
    s = kl.infer(case.model, engine="exact")
    text = repr(s)
    assert text.startswith("Samples(engine='exact', n=40, ")
    assert f"log_z={s.log_z:.4f}±0.0000" in text
    page = s._repr_html_()
    assert html.escape(str(case.model)) in page and '"bb"' not in page
    assert "<table>" in page and "log Z" in page
    assert page.count("<li>") == 5


def test_exact_writes_its_enumeration_to_out_and_refuses_a_proposal(tmp_path):
    model = kl.prior(kl.ToyLM(vocab="ab"), max_tokens=3) | kl.contains("a")
    path = tmp_path / "exact.jsonl"
    s = kl.infer(model, engine="exact", out=path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["ids"] for r in records] == s.ids and len(records) == s.info["support"]
    assert [r["log_p"] for r in records] == [
        None if not math.isfinite(v) else v for v in s.log_p.tolist()
    ]
    with pytest.raises(KldslError, match="takes no proposal="):
        kl.infer(model, engine="exact", proposal=kl.ToyLM(vocab="ab", seed=3))
