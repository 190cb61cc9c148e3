"""AWRS: the token is q restricted to the valid set and the weight is properly weighted."""

from __future__ import annotations

import math

import pytest
import torch

from kldsl.awrs import _log_weight, _Masses, awrs

#: z-score of the Monte Carlo checks: two-sided false-alarm rate 5.7e-7 per comparison,
#: so the ~60 comparisons below raise a false alarm with probability below 1e-4.
Z_SCORE = 5.0


def _problem(seed: int, vocab: int, zero: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random log q [vocab] (``zero`` tokens of probability 0) and a random mask."""
    gen = torch.Generator().manual_seed(seed)
    log_q = torch.log_softmax(torch.randn(vocab, generator=gen, dtype=torch.float64) * 1.5, 0)
    log_q[:zero] = -math.inf
    log_q = log_q - torch.logsumexp(log_q, 0)
    mask = torch.rand(vocab, generator=gen) < 0.4
    mask[zero] = True  # at least one valid token of positive probability
    return log_q, mask


def _paths(probs: list[float], valid: list[bool], removed: tuple[int, ...]):
    """Every history of one round from state ``removed``: (new removals, hit, probability)."""
    out = []

    def walk(used: tuple[int, ...], new: tuple[int, ...], p: float) -> None:
        rest = sum(probs[t] for t in range(len(probs)) if t not in used)
        for t in range(len(probs)):
            if t in used or probs[t] == 0.0:
                continue
            step = p * probs[t] / rest
            if valid[t]:
                out.append((new, t, step))
            else:
                walk((*used, t), (*new, t), step)

    walk(removed, (), 1.0)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_weight_is_properly_weighted_exactly(seed):
    """Enumerating both rounds' histories: E[w·1[x = v]] = q(v)·1[valid v] for every v."""
    log_q, mask = _problem(seed, 6, zero=seed % 2)
    probs, valid = log_q.exp().tolist(), mask.tolist()
    q = _Masses(log_q)
    mass = [0.0] * len(probs)
    second_moment = paper_mean = paper_second_moment = 0.0
    for first, x, p1 in _paths(probs, valid, ()):
        for second, _, p2 in _paths(probs, valid, first):
            w = math.exp(_log_weight(q, [*first, *second]))
            mass[x] += p1 * p2 * w
            second_moment += p1 * p2 * w * w
            # the paper's weight: the mass left at the first hit over (removals + 1)
            paper = (1.0 - sum(probs[t] for t in first)) / (len(first) + len(second) + 1)
            paper_mean += p1 * p2 * paper
            paper_second_moment += p1 * p2 * paper * paper
    want = [p if ok else 0.0 for p, ok in zip(probs, valid)]
    # float64 sums of at most a few thousand terms of size ≤ 1: error far below 1e-12
    assert mass == pytest.approx(want, abs=1e-12)
    # ours is its Rao-Blackwellisation: the same mean, no more variance
    assert paper_mean == pytest.approx(sum(want), abs=1e-12)
    assert second_moment <= paper_second_moment + 1e-12


def _histories(probs: list[float], valid: list[bool], hits: int):
    """Every history of a chain run to its ``hits``-th hit: (first hit, removals, prob)."""
    out = []

    def walk(removed: tuple[int, ...], first: int | None, found: int, p: float) -> None:
        if found == hits:
            out.append((first, removed, p))
            return
        for new, t, step in _paths(probs, valid, removed):
            walk((*removed, *new), t if first is None else first, found + 1, p * step)

    walk((), None, 0, 1.0)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_more_hits_stay_properly_weighted_exactly(seed):
    """With K = 2, 3, 4, 6 hits, enumerating every history: E[w·1[x = v]] = q(v)·1[valid v]
    for every v, and the relative variance of w falls as K grows (on each of these
    problems: 0.05–2.8 at K = 2, below 0.06 at K = 6)."""
    log_q, mask = _problem(seed, 5, zero=seed % 2)
    probs, valid = log_q.exp().tolist(), mask.tolist()
    q = _Masses(log_q)
    want = [p if ok else 0.0 for p, ok in zip(probs, valid)]
    z = sum(want)
    rel_var = []
    for hits in (2, 3, 4, 6):
        mass = [0.0] * len(probs)
        second_moment = 0.0
        for x, removed, p in _histories(probs, valid, hits):
            w = math.exp(_log_weight(q, list(removed), hits))
            mass[x] += p * w
            second_moment += p * w * w
        # float64 sums of at most ~40,000 terms of size ≤ 1: error far below 1e-12
        assert mass == pytest.approx(want, abs=1e-12), hits
        rel_var.append(second_moment / z**2 - 1)
    assert rel_var == sorted(rel_var, reverse=True)
    assert rel_var[-1] < 0.06


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("hits", [2, 5])
def test_sampler_is_properly_weighted_monte_carlo(seed, hits):
    """The sampler itself (batched draws, removals within a batch): the mean of w·f(x) is
    the masked mass Σ q·1[valid]·f for the indicator of every token and for f = 1, within
    Z_SCORE standard errors."""
    log_q, mask = _problem(10 + seed, 6, zero=1)
    gen = torch.Generator().manual_seed(seed)
    n = 6000
    draws = [awrs(log_q, lambda t: mask[t], gen, hits) for _ in range(n)]
    tokens = torch.tensor([d[0] for d in draws])
    w = torch.tensor([math.exp(d[1]) for d in draws], dtype=torch.float64)
    assert bool(mask[tokens].all())
    probs = log_q.exp()
    for v in range(len(probs)):
        values = w * (tokens == v)
        want = float(probs[v]) if mask[v] else 0.0
        se = float(values.std()) / math.sqrt(n)
        assert abs(float(values.mean()) - want) <= Z_SCORE * se + 1e-12, v
    se = float(w.std()) / math.sqrt(n)
    assert abs(float(w.mean()) - float(probs[mask].sum())) <= Z_SCORE * se


@pytest.mark.parametrize("hits", [2, 16])
def test_small_valid_mass_many_rejections(hits):
    """A valid mass of about 2% over 400 tokens (hundreds of rejections, the rest's CDF
    rebuilt many times): w stays unbiased for Z and is never −inf."""
    gen = torch.Generator().manual_seed(0)
    log_q = torch.log_softmax(torch.randn(400, generator=gen, dtype=torch.float64), 0)
    mask = torch.zeros(400, dtype=torch.bool)
    mask[::50] = True
    z = float(log_q.exp()[mask].sum())
    n = 1500
    draws = [awrs(log_q, lambda t: mask[t], gen, hits) for _ in range(n)]
    w = torch.tensor([math.exp(d[1]) for d in draws], dtype=torch.float64)
    assert all(mask[d[0]] and math.isfinite(d[1]) for d in draws)
    assert abs(float(w.mean()) - z) <= Z_SCORE * float(w.std()) / math.sqrt(n)


@pytest.mark.parametrize("seed", range(20))
def test_never_minus_inf_when_a_valid_token_exists(seed):
    log_q, _ = _problem(seed, 8, zero=2)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[2 + seed % 6] = True  # exactly one valid token, of positive probability
    token, log_w, _ = awrs(log_q, lambda t: mask[t], torch.Generator().manual_seed(seed))
    assert token == 2 + seed % 6 and math.isfinite(log_w)


def test_minus_inf_when_no_token_is_valid():
    log_q, _ = _problem(0, 8, zero=2)
    only_zero = torch.zeros(8, dtype=torch.bool)
    only_zero[:2] = True  # valid tokens all have probability 0
    gen = torch.Generator().manual_seed(0)
    assert awrs(log_q, lambda t: only_zero[t], gen)[:2] == (-1, -math.inf)
    assert awrs(log_q, lambda t: torch.zeros(len(t), dtype=torch.bool), gen)[:2] == (
        -1,
        -math.inf,
    )


def test_zero_probability_tokens_are_never_checked():
    log_q, _ = _problem(3, 50, zero=25)
    asked: list[int] = []

    def valid(tokens):
        asked.extend(tokens.tolist())
        return tokens % 7 == 0

    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        awrs(log_q, valid, gen)
    assert asked and min(asked) >= 25


def test_large_vocabulary_few_checks():
    """50k tokens, 99% of the mass valid: a handful of checks per token, never a scan of
    the vocabulary; all valid: at most two checks and w = 1 (the whole mass)."""
    gen = torch.Generator().manual_seed(0)
    log_q = torch.log_softmax(torch.randn(50_000, generator=gen) * 3, 0)
    bad = torch.zeros(50_000, dtype=torch.bool)
    bad[torch.topk(log_q, 5).indices[1:]] = True  # a few likely tokens invalid
    bad_mass = float(log_q.double().exp()[bad].sum())
    calls: list[int] = []

    def valid(tokens):
        calls.append(len(tokens))
        return ~bad[tokens]

    checks = [awrs(log_q, valid, gen)[2] for _ in range(200)]
    assert max(checks) <= 40
    # each round checks about 1/(1 - bad mass) tokens on average, doubled by batching
    assert sum(checks) / len(checks) <= 2 * 2 * 2 / (1 - bad_mass)
    for _ in range(20):
        token, log_w, n = awrs(log_q, lambda t: torch.ones(len(t), dtype=torch.bool), gen)
        assert n <= 2 and log_w == pytest.approx(0.0, abs=1e-6)  # float32 log q sums to 1±1e-6


def test_unnormalised_log_q():
    """q need not sum to 1: the weight estimates Σ q·1[valid] of the q given."""
    log_q, mask = _problem(4, 5)
    shifted = log_q + 3.0
    gen = torch.Generator().manual_seed(1)
    n = 4000
    w = torch.tensor([math.exp(awrs(shifted, lambda t: mask[t], gen)[1]) for _ in range(n)])
    z = math.exp(3.0) * float(log_q.exp()[mask].sum())
    assert abs(float(w.mean()) - z) <= Z_SCORE * float(w.std()) / math.sqrt(n)


def test_bad_log_q_is_an_error():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="NaN"):
        awrs(torch.tensor([0.0, math.nan]), lambda t: t >= 0, gen)


@pytest.mark.parametrize("hits", [1, 0, 2.0, True])
def test_bad_hits_is_an_error(hits):
    with pytest.raises(ValueError, match="hits must be an integer ≥ 2"):
        awrs(torch.zeros(3), lambda t: t >= 0, torch.Generator().manual_seed(0), hits)


def test_valid_may_return_a_list():
    log_q, mask = _problem(2, 5)
    token, log_w, _ = awrs(log_q, lambda t: mask[t].tolist(), torch.Generator().manual_seed(0))
    assert mask[token] and math.isfinite(log_w)


@pytest.mark.parametrize("which", ["prefix-closed", "mixed"])
def test_masked_sequences_are_properly_weighted(which):
    """Token by token with AWRS masking every token the prefix checks rule out, the
    product of the weights makes the sequences properly weighted for p̃ = a·1[c]: the mean
    of w·1[x = s] is p̃(s) for every sequence s (soundness of the checks is exactly what
    makes this hold: a sequence that satisfies c never has a dead prefix)."""
    import kldsl as kl
    from kldsl.prefix import prefix_check

    lm = kl.ToyLM(vocab="ab", seed=3)
    constraint = ~kl.contains("bb")
    if which == "mixed":
        constraint = constraint & (kl.contains("a") | ~kl.contains("ba"))
    max_tokens = 3
    model = kl.prior(lm, max_tokens=max_tokens) | constraint
    exact = lm.enumerate(max_tokens=max_tokens)
    p_tilde = model.log_density(exact.ids).log_p.exp()
    index = {tuple(s): i for i, s in enumerate(exact.ids)}
    check = prefix_check(model)
    gen = torch.Generator().manual_seed(0)
    # every sequence of p̃ > 0 has masked-proposal probability ≥ p̃ ≥ 0.01 here, so each
    # is drawn in n = 1500 runs (its mean compared with a nonzero spread) but with
    # probability below (1 − 0.01)^1500 < 3e-7
    assert float(p_tilde[p_tilde > 0].min()) >= 0.01
    n = 1500
    weights = torch.zeros(n, len(exact.ids), dtype=torch.float64)
    for run in range(n):
        ids: list[int] = []
        log_w = 0.0
        while log_w > -math.inf and len(ids) < max_tokens and lm.eos_id not in ids:
            log_q = lm.next_logprobs([ids])[0]
            prefix = list(ids)
            token, step, _ = awrs(
                log_q, lambda t, p=prefix: check.allowed(lm, p, t, max_tokens), gen
            )
            log_w += step
            ids.append(token)
        if log_w > -math.inf:
            weights[run, index[tuple(ids)]] = math.exp(log_w)
    mean, se = weights.mean(0), weights.std(0) / math.sqrt(n)
    assert bool((mean - p_tilde).abs().le(Z_SCORE * se + 1e-12).all())
    z = float(p_tilde.sum())
    total = weights.sum(1)
    assert abs(float(total.mean()) - z) <= Z_SCORE * float(total.std()) / math.sqrt(n)
