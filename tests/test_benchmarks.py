"""The benchmarks' own arithmetic: ratios, bounds and thresholds read into the headline."""

import math

import pytest
import torch

from benchmarks.amortise import ESS_TARGET, ess_ratio
from benchmarks.finetune_ruler import first_reach


def test_ess_ratio_with_prior_hits_has_a_value_and_error():
    prior = {"ess": 7.0, "draws": 384, "ess_per_1000": 18.2, "ess_per_1000_se": 6.9}
    fitted = {"ess": 40.0, "draws": 192, "ess_per_1000": 208.3, "ess_per_1000_se": 30.0}
    r = ess_ratio(prior, fitted)
    assert r["value"] == pytest.approx(208.3 / 18.2)
    rel = math.hypot(30.0 / 208.3, 6.9 / 18.2)
    assert r["se"] == pytest.approx(r["value"] * rel)
    assert r["met"] is True and r["lower_95"] is None


def test_ess_ratio_without_prior_hits_is_a_finite_lower_bound():
    prior = {"ess": 0.0, "draws": 384, "ess_per_1000": 0.0, "ess_per_1000_se": math.nan}
    fitted = {"ess": 40.0, "draws": 192, "ess_per_1000": 208.3}
    r = ess_ratio(prior, fitted)
    # P(0 hits in 384 | rate = bound) = 5%: the bound is the 95% upper limit of the hit rate
    assert (1 - r["prior_ess_per_1000_upper_95"] / 1000) ** 384 == pytest.approx(0.05)
    assert r["value"] is None and math.isfinite(r["lower_95"])
    assert r["lower_95"] == pytest.approx(208.3 / r["prior_ess_per_1000_upper_95"])
    assert r["met"] is True and "0 hits in 384" in r["text"]


def test_ess_ratio_without_prior_hits_is_undecided_when_the_bound_is_below_target():
    prior = {"ess": 0.0, "draws": 64, "ess_per_1000": 0.0}
    fitted = {"ess": 1.1, "draws": 64, "ess_per_1000": 17.6}
    r = ess_ratio(prior, fitted)
    assert r["lower_95"] < ESS_TARGET
    assert r["met"] is None  # neither met nor missed: the prior's draws were too few


def test_first_reach_needs_consecutive_steps_at_the_level():
    curve = {
        "step": [1, 2, 3, 4, 5],
        "samples": [32, 64, 96, 128, 160],
        "time_s": [1.0, 2.0, 3.0, 4.0, 5.0],
        "constraint_rate": [0.95, 0.1, 0.92, None, 0.91],
    }
    assert first_reach(curve, 0.9) is None  # never two in a row
    curve["constraint_rate"][3] = 0.93
    assert first_reach(curve, 0.9) == {"step": 4, "samples": 128, "time_s": 4.0}
    assert first_reach(curve, 0.9, run=1)["step"] == 1


def test_kl_exact_matches_the_enumerated_divergence():
    import kldsl as kl
    from benchmarks.finetune_ruler import kl_exact, measure_z

    prior = kl.ToyLM("ab", seed=1, name="toy")
    pi = kl.ToyLM("ab", seed=5, name="pi")
    model = kl.prior(prior, max_tokens=3) | kl.contains("b")
    every = kl.infer(model, engine="exact")  # the whole support, exact p*
    log_post = every.log_weights - torch.logsumexp(every.log_weights, 0)
    log_pi = pi.score(every.ids)
    support = torch.isfinite(log_post)  # sequences without a "b" have p* = 0
    truth = float((log_post.exp() * (log_post - log_pi))[support].sum())

    _, exact = measure_z(model, draws=3000, seed=0)
    got = kl_exact(pi, exact)
    assert got["samples"] == len(exact.ids) > 100
    assert abs(got["kl"] - truth) < 4 * got["se"]  # Z_SIGMAS of tests/test_engines.py
    assert got["se"] < 0.25 * truth  # and the check has teeth
