"""The shared arithmetic of weighted samples, on hand-made weights with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from stats import Z_SIGMAS, chi_square

from kldsl import weights

EXACT_TOL = 1e-12


def logs(*w: float) -> torch.Tensor:
    return torch.tensor(w, dtype=torch.float64).log()


# --- ESS, log Z and its standard error --------------------------------------------------------


def test_ess_by_hand():
    assert weights.ess(logs(1.0, 1.0, 2.0)) == pytest.approx(16 / 6, abs=EXACT_TOL)
    assert weights.ess(logs(*[3.0] * 7)) == pytest.approx(7.0, abs=EXACT_TOL)
    assert weights.ess(logs(5.0, 0.0, 0.0)) == pytest.approx(1.0, abs=EXACT_TOL)
    assert weights.ess(logs(0.0, 0.0)) == 0.0
    assert weights.ess(torch.zeros(0, dtype=torch.float64)) == 0.0


def test_ess_and_normalize_are_scale_free_and_do_not_overflow():
    log_w = logs(1.0, 2.0, 3.0, 0.0)
    shifted = log_w + 5000.0  # e^5000 overflows a float64
    # 2·lse(log w) − lse(2·log w) cancels ~10⁴: relative rounding of 10⁴ · 2⁻⁵³ remains
    assert weights.ess(shifted) == pytest.approx(weights.ess(log_w), rel=1e-9)
    expected = torch.tensor([1, 2, 3, 0], dtype=torch.float64) / 6
    assert torch.allclose(weights.normalize(shifted).exp(), expected, atol=EXACT_TOL)
    assert torch.equal(weights.normalize(logs(0.0, 0.0)), logs(0.0, 0.0))


def test_log_z_is_log_mean_w_and_counts_zero_weights():
    assert float(weights.log_z(logs(1.0, 2.0, 3.0, 0.0))) == pytest.approx(
        math.log(6 / 4), abs=EXACT_TOL
    )
    assert float(weights.log_z(logs(1.0, 2.0) + 1000.0)) == pytest.approx(
        1000.0 + math.log(1.5), abs=EXACT_TOL
    )
    assert float(weights.log_z(logs(0.0, 0.0))) == -math.inf


def test_log_z_se_is_the_delta_method():
    w = [0.5, 1.0, 4.0, 0.0, 2.5]
    n, mean = len(w), sum(w) / len(w)
    sd = math.sqrt(sum((x - mean) ** 2 for x in w) / (n - 1))
    assert weights.log_z_se(logs(*w)) == pytest.approx(sd / (math.sqrt(n) * mean), rel=1e-12)
    assert weights.log_z_se(logs(*w) - 800.0) == pytest.approx(sd / (math.sqrt(n) * mean), rel=1e-9)
    assert weights.log_z_se(logs(2.0, 2.0, 2.0)) == pytest.approx(0.0, abs=EXACT_TOL)
    assert weights.log_z_se(logs(2.0)) == math.inf
    assert weights.log_z_se(logs(0.0, 0.0, 0.0)) == math.inf


def test_log_z_se_matches_the_spread_of_log_z():
    """Over many replications, sd(log Ẑ) ≈ the reported standard error."""
    gen = torch.Generator().manual_seed(0)
    reps, n = 400, 2000
    log_w = torch.randn(reps, n, generator=gen, dtype=torch.float64) * 0.5  # lognormal w
    estimates = torch.stack([weights.log_z(row) for row in log_w])
    se = torch.tensor([weights.log_z_se(row) for row in log_w])
    truth = 0.5**2 / 2  # log E[e^{σN}] = σ²/2
    assert abs(float(estimates.mean()) - truth) < Z_SIGMAS * float(se.mean()) / math.sqrt(reps)
    # the sd of a sample sd from `reps` normal draws has relative error ≈ 1/√(2·reps)
    ratio = float(estimates.std()) / float(se.mean())
    assert abs(ratio - 1) < Z_SIGMAS / math.sqrt(2 * reps)


# --- divergences ----------------------------------------------------------------------------------


def _stratified(q: list[float], p_tilde: list[float], copies: list[int]) -> torch.Tensor:
    """Log-weights of a "sample" holding atom i ``copies[i]`` times, copies ∝ q: sample
    means are then exact q-expectations, so the estimators must equal the exact values."""
    out = []
    for qi, pi, c in zip(q, p_tilde, copies):
        out += [math.log(pi / qi) if pi > 0 else -math.inf] * c
    return torch.tensor(out, dtype=torch.float64)


Q = [0.5, 0.25, 0.125, 0.125]
COPIES = [4, 2, 1, 1]  # ∝ Q
P_TILDE = [0.3, 0.9, 0.6, 0.2]  # Z = 2.0


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_divergences_equal_the_exact_ones_on_a_stratified_sample():
    z = sum(P_TILDE)
    p = [x / z for x in P_TILDE]
    log_w = _stratified(Q, P_TILDE, COPIES)
    assert float(weights.log_z(log_w)) == pytest.approx(math.log(z), abs=EXACT_TOL)
    assert weights.kl_q_p(log_w) == pytest.approx(_kl(Q, p), abs=EXACT_TOL)
    assert weights.kl_p_q(log_w) == pytest.approx(_kl(p, Q), abs=EXACT_TOL)
    assert weights.ess(log_w) == pytest.approx(
        len(log_w) / sum(qi * (pi / qi / z) ** 2 for qi, pi in zip(Q, P_TILDE)), abs=1e-9
    )


def test_divergences_with_a_hard_constraint():
    """p̃ = q·1[c]: KL(p*‖q) = −log Z exactly, and KL(q‖p*) is infinite."""
    p_tilde = [q if i != 1 else 0.0 for i, q in enumerate(Q)]
    log_w = _stratified(Q, p_tilde, COPIES)
    z = sum(p_tilde)
    assert weights.kl_p_q(log_w) == pytest.approx(-math.log(z), abs=EXACT_TOL)
    assert weights.kl_q_p(log_w) == math.inf
    assert math.isnan(weights.kl_p_q(logs(0.0, 0.0)))


def test_divergences_vanish_when_q_is_the_target():
    log_w = torch.full((10,), 0.7, dtype=torch.float64)
    assert weights.kl_q_p(log_w) == pytest.approx(0.0, abs=EXACT_TOL)
    assert weights.kl_p_q(log_w) == pytest.approx(0.0, abs=EXACT_TOL)


def test_tv_distance():
    p = {"a": 0.5, "b": 0.5}
    q = {"a": 0.25, "b": 0.25, "c": 0.5}  # "c" is outside p's support
    assert weights.tv_distance(p, q) == pytest.approx(0.5, abs=EXACT_TOL)
    assert weights.tv_distance(q, q) == 0.0


# --- resampling (BlackJAX tests/smc/test_resampling.py: against the exact weighted mean) ----------

METHODS = list(weights.RESAMPLING)


@pytest.mark.parametrize("method", METHODS)
def test_resample_matches_the_weighted_mean(method):
    gen = torch.Generator().manual_seed(1)
    n, k = 100, 20_000
    w = torch.rand(n, generator=gen, dtype=torch.float64)
    w[::7] = 0.0  # some zero weights
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    p = w / w.sum()
    exact = float((p * x).sum())
    sd = float((p * (x - exact) ** 2).sum().sqrt())
    index = weights.resample(w.log(), k, torch.Generator().manual_seed(2), method)
    assert index.shape == (k,) and index.dtype == torch.int64
    assert bool((w[index] > 0).all())  # zero weights are never drawn
    # multinomial draws are i.i.d.; systematic ones have smaller variance, so the bound holds
    assert abs(float(x[index].mean()) - exact) < Z_SIGMAS * sd / math.sqrt(k)


def test_systematic_counts_are_floor_or_ceil_of_k_times_w():
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(30, generator=gen, dtype=torch.float64)
    p = w / w.sum()
    for k in (7, 30, 101):
        index = weights.resample(w.log(), k, torch.Generator().manual_seed(k), "systematic")
        counts = torch.bincount(index, minlength=30).double()
        assert bool((counts >= torch.floor(k * p - 1e-9)).all())
        assert bool((counts <= torch.ceil(k * p + 1e-9)).all())
        assert int(counts.sum()) == k


@pytest.mark.parametrize("method", METHODS)
def test_resample_frequencies_chi_square(method):
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    k = 10_000
    index = weights.resample(p.log() + 3.0, k, torch.Generator().manual_seed(4), method)
    stat, limit = chi_square(index.tolist(), dict(enumerate(p.tolist())))
    assert stat < limit


@pytest.mark.parametrize("method", METHODS)
def test_resample_is_reproducible(method):
    log_w = logs(1.0, 2.0, 3.0)
    a = weights.resample(log_w, 50, torch.Generator().manual_seed(5), method)
    b = weights.resample(log_w, 50, torch.Generator().manual_seed(5), method)
    assert torch.equal(a, b)


def test_resample_refuses_all_zero_weights_and_unknown_methods():
    with pytest.raises(ValueError, match="every weight is zero"):
        weights.resample(logs(0.0, 0.0), 3, torch.Generator())
    with pytest.raises(ValueError, match="use one of 'multinomial', 'stratified'"):
        weights.resample(logs(1.0, 1.0), 3, torch.Generator(), "bootstrap")


@pytest.mark.parametrize("method", weights.RESAMPLING)
def test_resample_counts_are_unbiased(method):
    """E[count_i] = k·W_i: the mean count over REPS resamplings is within Z_SIGMAS standard
    errors of k·W_i. One resampling's count variance is at most k·W_i(1 − W_i) for
    multinomial and at most 1 for the others (their counts vary only through the strata
    around one CDF point, or the < 1 remainder of k·W_i), so the bound uses the larger."""
    reps, k = 2000, 10
    w = torch.tensor([0.05, 0.0, 0.3, 0.15, 0.5], dtype=torch.float64)
    p = w / w.sum()
    gen = torch.Generator().manual_seed(6)
    counts = torch.zeros(len(w), dtype=torch.float64)
    for _ in range(reps):
        counts += torch.bincount(weights.resample(w.log(), k, gen, method), minlength=len(w))
    mean = counts / reps
    var = torch.clamp(k * p * (1 - p), min=1.0)
    assert bool(((mean - k * p).abs() < Z_SIGMAS * (var / reps).sqrt()).all())
    assert mean[1] == 0.0  # a zero weight is never drawn


@pytest.mark.parametrize("method", ["systematic", "residual"])
def test_low_variance_schemes_keep_the_floor_of_k_times_w(method):
    w = torch.tensor([0.05, 0.3, 0.15, 0.5], dtype=torch.float64)
    for seed in range(20):
        index = weights.resample(w.log(), 7, torch.Generator().manual_seed(seed), method)
        counts = torch.bincount(index, minlength=4).double()
        assert bool((counts >= torch.floor(7 * w - 1e-9)).all()) and int(counts.sum()) == 7
