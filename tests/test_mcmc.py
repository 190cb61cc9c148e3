"""The MCMC engine: exact detailed balance of every move, long runs against the exact posterior.

Detailed balance is checked exactly: on a ToyLM with vocabulary "ab" and at most 3 tokens
(15 sequences) the test builds the full transition matrix K from the same pure functions
the sampler runs (``local_positions``, ``*_log_proposal``, ``log_acceptance``) and checks
p*(x)·K(x, y) = p*(y)·K(y, x) and p*·K = p*. Long runs are compared with the exact
posterior by a chi-square test whose sample size is the chains' effective sample size.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from kldsl.backends import mcmc
from stats import chi_square

import kldsl as kl
from kldsl.errors import KldslError, KldslInferenceError
from kldsl.target import Target
from kldsl.weights import normalize

EXACT_TOL = 1e-12  # detailed balance from enumeration: float rounding only
LONG_RUN_N = 2000  # samples of each long run
LONG_RUN_CHAINS = 16

LM = kl.ToyLM(vocab="ab", seed=3)
OTHER = kl.ToyLM(vocab="ab", seed=11, eos_bias=0.5, name="other")


@kl.reward
def count_a(texts):
    """Number of "a" characters."""
    return [float(t.count("a")) for t in texts]


def _model(kind: str, prompt: str = "") -> kl.Model:
    base = kl.prior(LM, prompt=prompt, max_tokens=3)
    if kind == "soft":
        return base * kl.exp(count_a / 1.0)
    if kind == "hard":
        return base | kl.contains("ab")
    return base * kl.exp(count_a / 1.0) | ~kl.contains("bb")


def _kernel(target: Target, move_probs: dict[str, float]) -> tuple[torch.Tensor, ...]:
    """The exact transition matrix K over the enumerated support, p* on it, and the total
    proposal probability out of each x (1 when the proposal densities are right)."""
    every = target.lm.enumerate(target.max_tokens, prompt=target.base.prompt)
    ids = every.ids
    log_p = target.evaluate(ids).density.log_p
    lps = target.proposal.token_log_probs(ids, prompt=target.base.prompt)
    size = len(ids)
    proposal = torch.zeros(size, size, dtype=torch.float64)  # Σ over moves of Q(x→y)
    kernel = torch.zeros(size, size, dtype=torch.float64)
    for a, x in enumerate(ids):
        for b, y in enumerate(ids):
            moves = []
            if "independent" in move_probs:
                moves.append(
                    (move_probs["independent"], mcmc.independent_log_proposal(lps[a], lps[b]))
                )
            if "local" in move_probs:
                moves.extend(
                    (move_probs["local"], mcmc.local_log_proposal(lps[a], lps[b], i))
                    for i in mcmc.local_positions(x, y)
                )
            for weight, (fwd, rev) in moves:
                alpha = float(mcmc.log_acceptance(log_p[a], log_p[b], fwd, rev).exp())
                proposal[a, b] += weight * math.exp(fwd)
                if a != b:
                    kernel[a, b] += weight * math.exp(fwd) * alpha
        kernel[a, a] = 1.0 - kernel[a].sum()
    return kernel, normalize(log_p).exp(), proposal.sum(1)


@pytest.mark.parametrize("kind", ["soft", "hard", "mixed"])
@pytest.mark.parametrize("proposal", [None, OTHER], ids=["prior", "other"])
@pytest.mark.parametrize(
    "moves", [{"independent": 1.0}, {"local": 1.0}, {"independent": 0.3, "local": 0.7}]
)
def test_detailed_balance_is_exact(kind, proposal, moves):
    prompt = "b" if proposal is OTHER else ""  # the context must reach the suffix proposals
    kernel, p, out = _kernel(Target(_model(kind, prompt), proposal), mcmc.parse_moves(moves))
    assert torch.allclose(out, torch.ones_like(out), atol=EXACT_TOL)
    flow = p[:, None] * kernel
    assert (kernel >= -EXACT_TOL).all()
    assert torch.allclose(flow, flow.T, atol=EXACT_TOL)
    assert torch.allclose(p @ kernel, p, atol=EXACT_TOL)


def test_detailed_balance_needs_the_length_factors(monkeypatch):
    """The check has teeth: a reverse move that forgets |y| ≠ |x| breaks stationarity."""

    def wrong(lx, ly, i):
        return sum(ly[i:]) - math.log(len(lx)), sum(lx[i:]) - math.log(len(lx))

    monkeypatch.setattr(mcmc, "local_log_proposal", wrong)
    kernel, p, out = _kernel(Target(_model("soft")), {"local": 1.0})
    assert torch.allclose(out, torch.ones_like(out), atol=EXACT_TOL)
    assert not torch.allclose(p @ kernel, p, atol=1e-6)


def test_continuations_respect_max_tokens_and_score():
    prefixes = [[], [1], [2, 2]] * 20
    tails, lps = LM.sample_continuations(
        prefixes, 3, prompt="ab", seed=torch.Generator().manual_seed(0)
    )
    full = [p + t for p, t in zip(prefixes, tails)]
    assert all(len(x) <= 3 and (x[-1] == LM.eos_id or len(x) == 3) for x in full)
    assert all(LM.eos_id not in x[:-1] for x in full)
    scored = LM.token_log_probs(full, prompt="ab")
    for prefix, tail_lp, every_lp in zip(prefixes, lps, scored):
        assert tail_lp == pytest.approx(every_lp[len(prefix) :], abs=1e-12)
    assert torch.allclose(
        torch.tensor([sum(t) for t in scored], dtype=torch.float64), LM.score(full, prompt="ab")
    )


# R-hat of a finite run is itself noisy; here the chi-square test is the judge
@pytest.mark.filterwarnings("ignore:MCMC chains have not mixed")
@pytest.mark.parametrize(("kind", "proposal"), [("soft", None), ("hard", None), ("mixed", OTHER)])
def test_long_run_matches_the_exact_posterior(kind, proposal):
    model = _model(kind)
    exact = kl.infer(model, engine="exact")
    s = kl.infer(
        model, engine="mcmc", n=LONG_RUN_N, chains=LONG_RUN_CHAINS, seed=0, proposal=proposal
    )
    assert len(s) == LONG_RUN_N and s.engine == "mcmc"
    assert s.columns["chain"] == [
        c for c in range(LONG_RUN_CHAINS) for _ in range(LONG_RUN_N // LONG_RUN_CHAINS)
    ]
    assert set(s.info["acceptance"]) == {"independent", "local"}
    assert all(0 < r < 1 for r in s.info["acceptance"].values())
    n_eff = min(v for v in s.diagnostics["ess"].values() if not math.isnan(v))
    assert 20 < n_eff <= LONG_RUN_N * 1.5
    # goodness of fit of the sample frequencies to the exact posterior, at size n_eff
    p = {tuple(x): float(w) for x, w in zip(exact.ids, exact.weights)}
    stat, limit = chi_square(s.ids, p, n=n_eff)
    assert stat < limit
    # log Z: the importance estimate from the sequences drawn whole from q
    assert abs(s.log_z - exact.log_z) < 4 * s.log_z_se
    for satisfied in s.constraints.values():
        assert bool(satisfied.all())


def test_r_hat_warns_when_chains_do_not_mix():
    # four steps per chain, no burn-in, a sharp target and a proposal far from it: the
    # chains are still near their different starting points
    sharp = kl.prior(LM, max_tokens=3) * kl.exp(count_a / 0.05)
    far = kl.ToyLM(vocab="ab", seed=5, eos_bias=3.0, name="far")
    with pytest.warns(UserWarning, match="R-hat"):
        s = kl.infer(sharp, engine="mcmc", n=16, chains=4, burn_in=0, proposal=far, seed=0)
    assert max(s.diagnostics["r_hat"].values()) > mcmc.R_HAT_WARN
    assert s.diagnostics["split R-hat (max)"] > mcmc.R_HAT_WARN


def test_no_support_is_a_clear_error():
    never = kl.prior(LM, max_tokens=3) | kl.contains("aaaa")
    with pytest.raises(
        KldslInferenceError, match=r"0 of 4000 samples satisfied `contains\(\"aaaa\"\)`"
    ):
        kl.infer(never, engine="mcmc", n=8, chains=4)


def test_options_rounding_and_reproducibility(tmp_path):
    model = _model("mixed")
    a = kl.infer(model, engine="mcmc", n=10, chains=4, burn_in=3, thin=2, moves="local", seed=1)
    b = kl.infer(model, engine="mcmc", n=10, chains=4, burn_in=3, thin=2, moves="local", seed=1)
    assert len(a) == 12 and a.ids == b.ids  # n rounds up to a multiple of chains
    assert a.columns["step"][:3] == [4, 6, 8] and a.columns["chain"][:4] == [0, 0, 0, 1]
    assert set(a.info["acceptance"]) == {"local"}
    assert a.n_proposed >= 4 + 4 * (3 + 2 * 3)
    assert a.diagnostics["traces"]["log p̃"].shape == (4, 3)
    assert "chain" in a.to_pandas().columns
    assert a.plot(tmp_path / "trace.png").read_bytes()[:4] == b"\x89PNG"
    assert "mcmc" in kl.engines()
    assert set(kl.get_engine("mcmc").options()) == {"chains", "burn_in", "thin", "moves"}
    with pytest.raises(KldslError, match="unknown MCMC move"):
        kl.infer(model, engine="mcmc", n=8, moves={"gibbs": 1.0})
    with pytest.raises(KldslError, match="chains must be"):
        kl.infer(model, engine="mcmc", n=8, chains=0)


def test_compare_engines_example_runs(capsys):
    path = Path(__file__).parents[1] / "examples" / "compare_engines.py"
    spec = importlib.util.spec_from_file_location("compare_engines", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(n=800)
    out = capsys.readouterr().out
    assert "importance" in out and "mcmc" in out and "exact" in out
    assert results["exact"]["tv"] == pytest.approx(0.0, abs=1e-12)
    assert results["mcmc"]["tv"] < 0.15 and results["importance"]["tv"] < 0.15
