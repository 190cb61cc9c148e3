"""Adaptive weighted rejection sampling (AWRS) of one token under a validity mask.

Given next-token probabilities q over a vocabulary and a predicate ``valid`` that is
costly to evaluate (a prefix check of a hard constraint), :func:`awrs` draws a token
from q restricted to the valid tokens, checking only a few tokens lazily, and returns
with it an unbiased estimate of the valid mass Z = Σ_v q(v)·1[valid v]. The pair is
*properly weighted*: E[w·f(x)] = Σ_v q(v)·1[valid v]·f(v) for every f, so a sequential
Monte Carlo sampler that multiplies w into its particle weight targets exactly the
masked distribution (Lipkin et al. 2025, "Fast controlled generation from language
models with adaptive weighted rejection sampling").

The algorithm, as a Markov chain on the set R of tokens found invalid so far (M(R) = the
q-mass outside R, M(∅) = Σ q): in state R draw a token t from q restricted to V \\ R; if
t is invalid, move to R ∪ {t} (a *removal*); if t is valid it is a *hit*, and the state
stays R (valid tokens are never removed). Run until the second hit. The first hit is
the returned token x. Each round (until the first hit, then until the second) scans a
fresh order of the tokens outside R drawn without replacement from q (a Plackett-Luce
order); every token it passes before its first valid one is invalid, so the scan is
exactly the chain above.

Why x ~ q restricted to the valid set: at every hit, which valid token is drawn is ∝ q,
independently of the chain's states (a hit changes nothing), so x is independent of the
removal sequence and distributed as q(x)·1[valid x]/Z.

The weight (derived here; it is a Rao-Blackwellisation of the simplest unbiased
estimator, and it has lower variance than the estimator of the paper, which multiplies
M at the first hit by 1/(N+1)). Let the removals be r_1, ..., r_N in order (all those
before the second hit), M_k = M({r_1..r_k}) for k = 0..N, and k₁ the state of the first
hit. The estimator Y = M_0·1[the first event is a hit] is unbiased: P(first event is a
hit) = Z/M_0. The probability of a whole history is

    Π_{j<N} q(r_{j+1})/M_j · (Z/M_{k₁}) · (Z/M_N),

so given the removal sequence, k₁ ∈ {0..N} has probability ∝ 1/M_{k₁}, and

    E[Y | r_1..r_N] = M_0 · (1/M_0) / Σ_k 1/M_k = 1 / Σ_{k=0}^{N} 1/M_k =: w.

Hence E[w] = E[Y] = Z, and since x is independent of the removals, E[w·f(x)] =
E[w]·E[f(x)] = Σ_v q(v)·1[valid v]·f(v). The weight is never zero when a valid token has
q > 0 (each M_k > 0), and when every token is valid the first draw hits twice: w = M_0.
M_k is summed from the mass M_N left at the end plus the later removals, so no
difference of nearly equal numbers is ever taken.

Example:
    >>> import torch
    >>> log_q = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    >>> token, log_w, checks = awrs(log_q, lambda t: t != 0, torch.Generator().manual_seed(0))
    >>> token in (1, 2), log_w <= 0.0
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

#: Tokens checked in the first batch of a round; each further batch doubles, so finding
#: the first valid token costs at most about twice the checks of a one-by-one scan.
FIRST_BATCH = 1


def awrs(
    log_q: Tensor, valid: Callable[[Tensor], Tensor], generator: torch.Generator
) -> tuple[int, float, int]:
    """One token from q restricted to ``valid`` tokens, with a properly weighted log-weight.

    ``log_q`` [V]: next-token log-probabilities (−inf entries are never drawn);
    ``valid(tokens)`` maps a LongTensor [k] of token ids to a BoolTensor [k]. Returns
    ``(token, log_weight, checks)``: the token, log of an unbiased estimate of the valid
    mass Σ_v q(v)·1[valid v] (see the module docstring), and how many tokens ``valid``
    was asked about. With no valid token of positive probability: ``(-1, -inf, checks)``
    (a token whose probability underflows float64 next to the likeliest one, below
    e^-745 of it, counts as probability zero).
    """
    log_q = log_q.detach().double().cpu().reshape(-1)
    if bool(torch.isnan(log_q).any()) or bool((log_q == math.inf).any()):
        raise ValueError("awrs() takes log-probabilities: log_q holds NaN or +inf")
    known: dict[int, bool] = {}
    checks = 0

    def check(tokens: list[int]) -> list[bool]:
        nonlocal checks
        ask = [t for t in tokens if t not in known]
        if ask:
            answer = torch.as_tensor(valid(torch.tensor(ask, dtype=torch.long)))
            answer = answer.reshape(-1).tolist()
            if len(answer) != len(ask):
                raise ValueError(f"valid() returned {len(answer)} values for {len(ask)} tokens")
            known.update(zip(ask, (bool(a) for a in answer)))
            checks += len(ask)
        return [known[t] for t in tokens]

    q = _Masses(log_q)
    removals: list[int] = []  # r_1..r_N in order
    hits: list[int] = []
    for _ in range(2):
        order = _Order(q, set(removals), generator)
        found = -1
        while found < 0:
            batch = order.take(FIRST_BATCH << min(order.batches, 30))
            if not batch:
                return -1, -math.inf, checks  # nothing valid outside R: nothing valid at all
            ok = check(batch)
            if any(ok):
                first = ok.index(True)
                found = batch[first]
                removals.extend(batch[:first])
            else:
                removals.extend(batch)
        hits.append(found)
    return hits[0], _log_weight(q, removals), checks


class _Masses:
    """q of one row: probabilities (scaled by exp(max log q)) and their cumulative sums."""

    def __init__(self, log_q: Tensor):
        self.log_q = log_q
        self.shift = float(log_q.max()) if bool(torch.isfinite(log_q).any()) else 0.0
        self.probs = torch.exp(log_q - self.shift)
        self.cum = torch.cumsum(self.probs, 0)
        self.total = float(self.cum[-1]) if len(self.cum) else 0.0
        self.alive = int((self.probs > 0).sum())


class _Order:
    """A Plackett-Luce order (sampling without replacement from q) of the tokens outside
    ``excluded``, produced lazily in batches.

    While the tokens drawn or excluded hold under half of the mass, the next token is an
    inverse-CDF draw from q redrawn until it is new (which is exactly a draw from q
    restricted to the rest), each costing O(log V); past that it sorts Gumbel keys of the
    rest once (O(V log V)), whose descending order continues the same Plackett-Luce law.
    """

    def __init__(self, q: _Masses, excluded: set[int], generator: torch.Generator):
        self.q, self.generator, self.batches = q, generator, 0
        self.used = set(excluded)
        self.used_mass = sum(float(q.probs[t]) for t in excluded)
        self.sorted: list[int] | None = None

    def take(self, k: int) -> list[int]:
        self.batches += 1
        out: list[int] = []
        while len(out) < k and len(self.used) < self.q.alive:
            if self.sorted is None and 2 * self.used_mass < self.q.total:
                u = float(torch.rand((), generator=self.generator, dtype=torch.float64))
                t = int(torch.searchsorted(self.q.cum, u * self.q.total, right=True))
                t = min(t, len(self.q.cum) - 1)
                if t in self.used or float(self.q.probs[t]) <= 0.0:
                    continue
            else:
                if self.sorted is None:
                    self.sorted = self._rest()
                t = self.sorted.pop()
            self.used.add(t)
            self.used_mass += float(self.q.probs[t])
            out.append(t)
        return out

    def _rest(self) -> list[int]:
        """The tokens not yet used, in Gumbel-key order, last first (for ``pop``)."""
        log_q = self.q.log_q.masked_fill(self.q.probs <= 0, -math.inf)  # as the CDF sees it
        log_q[list(self.used)] = -math.inf
        u = torch.rand(log_q.shape, generator=self.generator, dtype=torch.float64)
        keys = log_q - torch.log(-torch.log(u.clamp_min(1e-300)))
        alive = int(torch.isfinite(keys).sum())
        return torch.topk(keys, alive, sorted=True).indices.flip(0).tolist()


def _log_weight(q: _Masses, removals: list[int]) -> float:
    """log w = −log Σ_{k=0}^{N} 1/M_k (module docstring), M_k the mass outside r_1..r_k."""
    r = torch.tensor(removals, dtype=torch.long)
    removed = float(q.probs[r].sum()) if removals else 0.0
    if 2 * removed <= q.total:  # the difference keeps its precision (at most 1 bit lost)
        log_left = math.log(q.total - removed) + q.shift
    else:  # sum what is left directly
        mask = torch.zeros(len(q.log_q), dtype=torch.bool)
        mask[r] = True
        log_left = float(torch.logsumexp(q.log_q.masked_fill(mask, -math.inf), 0))
    left = torch.tensor([log_left], dtype=torch.float64)
    later = torch.logcumsumexp(q.log_q[r].flip(0), 0).flip(0)  # Σ_{j>k} q(r_j), k < N
    log_m = torch.cat([torch.logaddexp(left, later), left])
    return float(-torch.logsumexp(-log_m, 0))
