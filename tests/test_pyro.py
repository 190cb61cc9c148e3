"""The Pyro bridge: the control-as-inference identity exactly, and Pyro's engines."""

import math

import pyro
import pytest
import torch
from stats import Z_SIGMAS

import kldsl as kl
from kldsl.pyro_bridge import elbo_by_enumeration, pyro_guide, to_pyro

EXACT_TOL = 1e-9
MAX_TOKENS = 3


@kl.reward(bounds=(0, MAX_TOKENS))
def n_a(texts):
    return [t.count("a") for t in texts]


PRIOR = kl.ToyLM(vocab="ab", seed=0, name="toy")
TARGETS = {
    "soft": kl.prior(PRIOR, max_tokens=MAX_TOKENS) * kl.exp(n_a / 0.5),
    "hard": kl.prior(PRIOR, max_tokens=MAX_TOKENS) | kl.contains("ba"),
    "mixed": kl.prior(PRIOR, max_tokens=MAX_TOKENS) * kl.exp(n_a / 0.5) | ~kl.contains("bb"),
}


def exact_kls(model, pi):
    """(log Z, E_π[log p̃ − log a], KL(π‖a), KL(π‖p*)) by enumeration."""
    log_z = kl.infer(model, engine="exact").log_z
    every = pi.enumerate(MAX_TOKENS)
    d = model.log_density(every.ids)
    log_a = PRIOR.score(every.ids)
    p = every.log_probs.exp()
    tilt = float((p * (d.log_p - log_a)).sum())
    kl_pi_a = float((p * (every.log_probs - log_a)).sum())
    kl_pi_post = float((p * (every.log_probs - (d.log_p - log_z))).sum())
    return log_z, tilt, kl_pi_a, kl_pi_post


def test_elbo_identity_holds_exactly():
    """Pyro's ELBO = E_π[r]/β − KL(π‖a) = log Z − KL(π‖p*) for a fixed π."""
    model = TARGETS["soft"]
    pi = kl.ToyLM(vocab="ab", seed=4, name="pi")
    elbo = elbo_by_enumeration(model, pi)
    log_z, tilt, kl_pi_a, kl_pi_post = exact_kls(model, pi)
    assert elbo == pytest.approx(tilt - kl_pi_a, abs=EXACT_TOL)
    assert elbo == pytest.approx(log_z - kl_pi_post, abs=EXACT_TOL)
    assert kl_pi_post > 0.01  # π is not p*, so the bound is strict


def test_elbo_with_penalty_is_finite_and_exact():
    model = TARGETS["mixed"]
    pi = kl.ToyLM(vocab="ab", seed=4, name="pi")
    assert elbo_by_enumeration(model, pi) == -math.inf
    penalized = elbo_by_enumeration(model, pi, penalty=10.0)
    every = pi.enumerate(MAX_TOKENS)
    d = model.log_density(every.ids)
    log_p = torch.where(
        torch.isneginf(d.log_p), PRIOR.score(every.ids) + d.terms["n_a / 0.5"] - 10.0, d.log_p
    )
    expected = float((every.log_probs.exp() * (log_p - every.log_probs)).sum())
    assert penalized == pytest.approx(expected, abs=EXACT_TOL)


def test_trace_has_one_site_per_factor_named_after_it():
    other = kl.ToyLM(vocab="ab", seed=7, name="other")
    model = kl.prior(PRIOR, max_tokens=3) * kl.prior(other) ** 0.5 * kl.exp(n_a / 0.5) | ~kl.curse
    trace = pyro.poutine.trace(to_pyro(model)).get_trace()
    sites = [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    assert sites == ["x", "log b^0.5", "n_a / 0.5", "1[not curse]"]
    assert trace.nodes["x"]["value"].shape == (3,)


def test_trace_log_joint_is_log_p_tilde():
    model = kl.prior(PRIOR, max_tokens=3) ** 2.0 * kl.exp(n_a / 0.5) | ~kl.contains("bb")
    every = PRIOR.enumerate(3)
    d = model.log_density(every.ids)
    dist = to_pyro(model)
    pad = pyro.poutine.trace(dist).get_trace().nodes["x"]["fn"].pad
    for i in range(0, len(every.ids), 5):
        data = {"x": pad([every.ids[i]])[0]}
        trace = pyro.poutine.trace(pyro.poutine.condition(dist, data)).get_trace()
        assert float(trace.log_prob_sum()) == pytest.approx(float(d.log_p[i]), abs=EXACT_TOL)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_pyro_importance_agrees_with_importance_and_exact(name):
    model = TARGETS[name]
    exact = kl.infer(model, engine="exact").log_z
    ours = kl.infer(model, engine="importance", n=1500, seed=1)
    theirs = kl.infer(model, engine="pyro-importance", n=1500, seed=2)
    for s in (ours, theirs):
        assert abs(s.log_z - exact) < Z_SIGMAS * s.log_z_se
    both = math.hypot(ours.log_z_se, theirs.log_z_se)
    assert abs(ours.log_z - theirs.log_z) < Z_SIGMAS * both
    assert theirs.info["pyro_ess"] == pytest.approx(theirs.ess, rel=1e-9)


def test_pyro_importance_with_a_guide_proposal():
    model = TARGETS["soft"]
    proposal = kl.ToyLM(vocab="ab", seed=4, name="q")
    exact = kl.infer(model, engine="exact").log_z
    s = kl.infer(model, engine="pyro-importance", n=1500, seed=3, proposal=proposal)
    assert abs(s.log_z - exact) < Z_SIGMAS * s.log_z_se


def test_pyro_svi_lowers_exact_kl():
    model = TARGETS["soft"]
    before = exact_kls(model, PRIOR)[3]
    fit = kl.infer(model, engine="pyro-svi", steps=120, batch_size=32, lr=0.05, seed=0)
    after = exact_kls(model, fit.model)[3]
    assert before > 0.5 and after < 0.1 * before
    assert fit.history[-1]["elbo"] > fit.history[0]["elbo"] - 0.5


def test_pyro_svi_warns_about_the_penalty_with_constraints():
    with pytest.warns(UserWarning, match="finite|instead of −∞"):
        kl.infer(TARGETS["mixed"], engine="pyro-svi", steps=2, batch_size=8, seed=0)


def test_guide_samples_the_same_site_from_its_lm():
    pi = kl.ToyLM(vocab="ab", seed=4, name="pi")
    guide = pyro_guide(pi, TARGETS["soft"], plate_size=6)
    trace = pyro.poutine.trace(guide).get_trace()
    value = trace.nodes["x"]["value"]
    assert value.shape == (6, MAX_TOKENS)
    lp = trace.nodes["x"]["fn"].log_prob(value)
    assert lp.requires_grad


def test_penalty_runs_the_softened_graph_one_factor_per_term():
    """to_pyro(penalty=) is to_pyro(soften(model, penalty)): only constraints are softened."""
    from kldsl.transforms import soften

    model = kl.prior(PRIOR, max_tokens=3) ** 2.0 * kl.exp(n_a / 0.5) | ~kl.contains("bb")
    soft = soften(model, 10.0)
    trace = pyro.poutine.trace(to_pyro(model, penalty=10.0)).get_trace()
    sites = [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    assert sites == ["x", "log a^2.0", "n_a / 0.5", 'indicator(contains("bb")) * -10.0']
    every = PRIOR.enumerate(3)
    d = soft.log_density(every.ids)
    dist = to_pyro(model, penalty=10.0)
    pad = trace.nodes["x"]["fn"].pad
    for i in range(0, len(every.ids), 3):
        data = {"x": pad([every.ids[i]])[0]}
        joint = pyro.poutine.trace(pyro.poutine.condition(dist, data)).get_trace()
        assert float(joint.log_prob_sum()) == pytest.approx(float(d.log_p[i]), abs=EXACT_TOL)
    assert torch.isfinite(d.log_p).all()
