"""Distributional constraints ``| mean(φ) == μ``: the fitted λ against the exact I-projection.

Every exact answer comes from enumerating a ToyLM: the pointwise posterior p₀, the exact λ
(found here by bisection, independently of the Newton solver of kldsl.moments), and the
sampling error of the fitted λ, whose asymptotic standard deviation is computed exactly.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import kldsl as kl
from kldsl.cli import main
from kldsl.exact_oracle import exact_divergences
from kldsl.moments import fit_of, solve_dual
from kldsl.transforms import compile_moments, moments_of, strip_moments

#: A fitted λ may differ from the exact one by this many asymptotic standard deviations:
#: a false alarm rate of about 7e-6 per coordinate.
Z_TOL = 4.5
#: Exact arithmetic in float64 over a few dozen sequences: sums of ~40 terms of order 1.
EXACT_TOL = 1e-9
N_FIT = 4000

HAS_A = kl.indicator(kl.contains("a"))
HAS_AB = kl.indicator(kl.contains("a") & kl.contains("b"))
# the same features computed here, independently of kldsl's interpreter
FEATURES = {
    HAS_A: lambda t: float("a" in t),
    HAS_AB: lambda t: float("a" in t and "b" in t),
    kl.length: lambda t: float(len(t.split())),
}


def toy() -> kl.ToyLM:
    return kl.ToyLM(vocab="ab ", seed=0)


def pointwise(lm=None) -> kl.Model:
    """A tilt and a hard constraint beside the moments: p₀ ∝ a·exp(length/2)·1[¬"bb"]."""
    return kl.prior(lm or toy(), max_tokens=3) * kl.exp(kl.length / 2.0) | ~kl.contains("bb")


class Enumerated:
    """Every sequence of the model's base with log a(x), log p̃₀(x) and the features."""

    def __init__(self, model: kl.Model, features: list[kl.RewardExpr]):
        base = model.base()
        lm = kl.resolve(base)
        every = lm.enumerate(base.max_tokens, prompt=base.prompt)
        self.log_a = every.log_probs.double()
        self.log_p0 = strip_moments(model).log_density(every.ids).log_p
        texts = lm.texts(every.ids)
        self.phi = torch.tensor([[FEATURES[f](t) for f in features] for t in texts]).double()

    def tilted(self, lambdas: torch.Tensor) -> torch.Tensor:
        """The exact posterior p_λ ∝ p̃₀·exp(λ·φ) [N]."""
        return torch.softmax(self.log_p0 + self.phi @ lambdas, 0)

    def means(self, lambdas: torch.Tensor) -> torch.Tensor:
        return self.tilted(lambdas) @ self.phi

    def exact_lambdas(self, targets: list[float], sweeps: int = 400) -> torch.Tensor:
        """λ with E_λ[φ] = μ: coordinate-wise bisection (each mean is increasing in its λ;
        cycling through the coordinates minimises the strictly convex dual)."""
        lam = torch.zeros(len(targets), dtype=torch.float64)
        for _ in range(sweeps if len(targets) > 1 else 1):
            for k, mu in enumerate(targets):
                lo, hi = -60.0, 60.0
                for _ in range(200):
                    lam[k] = (lo + hi) / 2
                    lo, hi = (lam[k].item(), hi) if self.means(lam)[k] < mu else (lo, lam[k].item())
        return lam

    def lambda_sd(self, lambdas: torch.Tensor, n: int) -> torch.Tensor:
        """The asymptotic sd of λ̂ fitted on n importance samples from the prior a:
        Cov = H⁻¹ S H⁻¹ / n, H = Cov_p*[φ], S = E_a[(p*/a)²(φ − μ)(φ − μ)ᵀ]."""
        post = self.tilted(lambdas)
        centred = self.phi - post @ self.phi
        hess = (centred * post[:, None]).T @ centred
        a_ratio2 = torch.exp(2 * post.log() - self.log_a)  # a·(p*/a)², 0 where p* is 0
        s = (centred * a_ratio2[:, None]).T @ centred
        h_inv = torch.linalg.inv(hess)
        return (h_inv @ s @ h_inv / n).diagonal().sqrt()


def test_text_and_python_build_the_same_graph_and_print_back():
    lm = toy()
    python = pointwise(lm) | (kl.mean(HAS_A) == 0.5) | (kl.mean(kl.length) == 1.5)
    text = (
        'prior(toy, max_tokens=3) * exp(length / 2.0) | not contains("bb") '
        '| mean(indicator(contains("a"))) == 0.5 | mean(length) == 1.5'
    )
    assert kl.parse(text, env={"toy": lm}) == python
    assert str(python) == text
    assert [str(m) for m in moments_of(python)] == [
        'mean(indicator(contains("a"))) == 0.5',
        "mean(length) == 1.5",
    ]
    compiled = compile_moments(python, {m: 0.25 for m in moments_of(python)})
    assert kl.parse(str(compiled), env={"toy": lm}) == compiled
    assert strip_moments(python) == pointwise(lm)
    # the rewrites of the core keep a moment a moment
    assert moments_of(kl.soften(python, 3.0)) == moments_of(python)
    assert moments_of(kl.with_prompt(python, "x")) == moments_of(python)


def test_declarations_that_cannot_hold_are_errors():
    with pytest.raises(kl.KldslTypeError, match=r"indicator\(curse\)"):
        kl.mean(kl.curse)
    with pytest.raises(kl.KldslTypeError, match=r"hard constraint `\| curse`"):
        kl.mean(kl.indicator(kl.curse)) == 1  # noqa: B015
    with pytest.raises(kl.KldslTypeError, match="finite"):
        kl.mean(kl.length) == math.inf  # noqa: B015
    with pytest.raises(kl.KldslTypeError, match="binds tighter"):
        kl.prior(toy()) | kl.mean(kl.length) == 1  # noqa: B015
    m = kl.prior(toy()) | (kl.mean(kl.length) == 1) | (kl.mean(kl.length) == 2)
    with pytest.raises(kl.KldslTypeError, match="constrained twice"):
        kl.fit_moments(m, engine="exact")


def test_engines_and_the_interpreter_refuse_an_unfitted_moment():
    m = pointwise() | (kl.mean(HAS_A) == 0.5)
    with pytest.raises(kl.KldslInferenceError, match="kl.fit_moments"):
        kl.infer(m, engine="importance", n=8)
    with pytest.raises(kl.KldslInferenceError, match="kl.fit_moments"):
        m.log_density([[1]])
    assert "not fitted yet" in m.explain() and "λ such that E_p*" in m.explain()


def test_exact_fit_is_the_i_projection_and_meets_the_mean_exactly():
    m = pointwise() | (kl.mean(HAS_A) == 0.5)
    truth = Enumerated(m, [HAS_A]).exact_lambdas([0.5])
    fit = kl.fit_moments(m, engine="exact")
    assert fit.lambdas[0] == pytest.approx(float(truth[0]), abs=1e-7)
    exact = kl.infer(fit.model, engine="exact")
    rate = float(exact.weights @ torch.tensor([FEATURES[HAS_A](t) for t in exact.texts]).double())
    assert rate == pytest.approx(0.5, abs=EXACT_TOL)
    assert fit.base_means[0] > 0.8  # the pointwise posterior is far from 0.5: a real tilt


def test_importance_fit_matches_the_exact_lambda_within_its_sampling_error():
    """A moment with a pointwise tilt and a hard constraint, fitted on N_FIT prior samples."""
    m = pointwise() | (kl.mean(HAS_A) == 0.5)
    enum = Enumerated(m, [HAS_A])
    truth = enum.exact_lambdas([0.5])
    sd = float(enum.lambda_sd(truth, N_FIT)[0])
    fit = kl.fit_moments(m, n=N_FIT, seed=0)
    assert abs(fit.lambdas[0] - float(truth[0])) < Z_TOL * sd, (fit.lambdas, truth, sd)
    assert fit.lambda_se[0] == pytest.approx(sd, rel=0.25)  # its own se estimates the same sd
    assert fit.achieved[0] == pytest.approx(0.5, abs=1e-8)  # on the fitting sample
    assert fit.n == N_FIT and fit.rounds == 1 and fit.iterations < 20
    assert fit.ess > 100


def test_two_moments_at_once():
    m = pointwise() | (kl.mean(HAS_A) == 0.5) | (kl.mean(kl.length) == 1.2)
    enum = Enumerated(m, [HAS_A, kl.length])
    truth = enum.exact_lambdas([0.5, 1.2])
    assert enum.means(truth).tolist() == pytest.approx([0.5, 1.2], abs=1e-9)
    exact = kl.fit_moments(m, engine="exact")
    assert list(exact.lambdas) == pytest.approx(truth.tolist(), abs=1e-6)
    post = kl.infer(exact.model, engine="exact")
    phi = torch.tensor([[FEATURES[f](t) for f in (HAS_A, kl.length)] for t in post.texts])
    phi = phi.double()
    assert (post.weights @ phi).tolist() == pytest.approx([0.5, 1.2], abs=EXACT_TOL)
    fit = kl.fit_moments(m, n=N_FIT, seed=1)
    sd = enum.lambda_sd(truth, N_FIT)
    for k in range(2):
        assert abs(fit.lambdas[k] - float(truth[k])) < Z_TOL * float(sd[k])


def test_a_mean_out_of_reach_is_a_clear_error():
    m = pointwise() | (kl.mean(kl.length) == 2.5)  # three tokens hold at most two words
    with pytest.raises(kl.KldslInferenceError, match=r"`length` takes values in \[0, 2\]"):
        kl.fit_moments(m, n=500)
    # each mean is reachable alone, not both: 1[a and b] ≤ 1[a]
    both = pointwise() | (kl.mean(HAS_A) == 0.2) | (kl.mean(HAS_AB) == 0.5)
    with pytest.raises(kl.KldslInferenceError, match="cannot hold together"):
        kl.fit_moments(both, engine="exact")


def test_low_ess_draws_a_larger_sample_and_says_so():
    m = pointwise() | (kl.mean(HAS_A) == 0.5)
    with pytest.warns(UserWarning, match="below min_ess"):
        # ESS ≈ 0.3·n under this tilt: 100 samples are too few, 800 (round 4) enough
        fit = kl.fit_moments(m, n=100, seed=2, min_ess=100, max_rounds=4)
    assert fit.rounds > 1 and fit.ess >= 100 and fit.n == 100 * 2 ** (fit.rounds - 1)
    assert "below min_ess" in fit.summary()
    with pytest.warns(UserWarning), pytest.raises(kl.KldslInferenceError, match="min_ess"):
        kl.fit_moments(m, n=50, seed=2, min_ess=10_000, max_rounds=2)


def test_the_fit_is_cached_and_every_engine_runs_the_compiled_graph():
    # no unbounded tilt, so the compiled graph's bound is the indicator's (rejection)
    m = kl.prior(toy(), max_tokens=3) | ~kl.contains("bb") | (kl.mean(HAS_A) == 0.5)
    fit = kl.fit_moments(m, n=1000, seed=3)
    assert kl.fit_moments(m, n=1000, seed=3) is fit  # a second engine does not refit
    assert fit_of(fit.model) is fit
    assert "the fitted λ of" in fit.model.explain() and "Fitted from" in fit.model.explain()
    n = 2000
    for engine in ("importance", "rejection", "qrs", "mcmc"):
        s = kl.infer(fit.model, engine=engine, n=n, seed=4)
        assert s.info["moment_fit"]["lambdas"] == list(fit.lambdas)
        if engine == "rejection":  # exact draws of p_λ̂: the bound came from the indicator
            rate = float(torch.tensor([FEATURES[HAS_A](t) for t in s.texts]).mean())
            exact_rate = float(
                Enumerated(m, [HAS_A]).means(torch.tensor(fit.lambdas, dtype=torch.float64))[0]
            )
            assert rate == pytest.approx(exact_rate, abs=Z_TOL * math.sqrt(0.25 / len(s)))


def test_forward_kl_fine_tuning_toward_the_compiled_target_lowers_exact_kl():
    lm = kl.ToyLM(vocab="abc", seed=0)
    m = kl.prior(lm, max_tokens=4) | (kl.mean(HAS_A) == 0.3)  # the prior's rate is 0.91
    target = kl.fit_moments(m, engine="exact").model
    before = exact_divergences(kl.resolve(target.base()), target)["kl_p_pi"]
    fit = kl.infer(
        target, engine="variational", objective="forward_kl", steps=60, batch_size=32, lr=0.1
    )
    after = exact_divergences(fit.model, target)["kl_p_pi"]
    assert after < 0.5 * before, (before, after)


def test_solve_dual_reports_what_it_cannot_reach():
    phi = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    flat = torch.zeros(2, dtype=torch.float64)
    dual = solve_dual(phi, flat, torch.tensor([1.0], dtype=torch.float64))
    assert not dual.converged  # μ on the edge of the hull: λ runs off
    dual = solve_dual(phi, flat, torch.tensor([0.5], dtype=torch.float64))
    assert dual.converged and dual.iterations == 0 and float(dual.lambdas[0]) == 0.0


def test_the_command_line_fits_first_and_reports(tmp_path, capsys):
    folder = kl.Fit(model=kl.ToyLM(vocab="ab "), history=[], objective="js").save(tmp_path / "t")
    path = tmp_path / "m.kl"
    head = f"m = prior({json.dumps(str(folder))}, max_tokens=3)"
    path.write_text(head + ' | mean(indicator(contains("a"))) == 0.5\n')
    assert main(["sample", str(path), "--n", "16", "--moment-n", "500"]) == 0
    assert "λ =" in capsys.readouterr().out
    path.write_text(head + " | mean(length) == 2.5\n")
    assert main(["sample", str(path), "--n", "16", "--moment-n", "200"]) == 2
    err = re.split(r"[\r\n]+", capsys.readouterr().err.strip())[-1]  # after the progress bar
    assert err.startswith("error: ") and "out of reach" in err and "Traceback" not in err
