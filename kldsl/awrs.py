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
stays R (valid tokens are never removed). Run until the K-th hit (``hits=K``; the paper's
K = 2). The first hit is the returned token x. Draws come in batches of independent
inverse-CDF draws from q restricted to the rest; a draw that a removal earlier in the
batch has made part of R is dropped, which leaves the later draws exactly draws from q
restricted to the new rest, so the batches run exactly the chain above.

Why x ~ q restricted to the valid set: at every hit, which valid token is drawn is ∝ q,
independently of the chain's states (a hit changes nothing), so x is independent of the
removal sequence and distributed as q(x)·1[valid x]/Z.

The weight (derived here; it is a Rao-Blackwellisation of the simplest unbiased
estimator, and at K = 2 it has lower variance than the estimator of the paper, which
multiplies M at the first hit by 1/(N+1)). Let the removals be r_1, ..., r_N in order,
M_k = M({r_1..r_k}) for k = 0..N, u_k = 1/M_k, and c_k the number of hits in state k
(Σ c_k = K, c_N ≥ 1: the last event is the K-th hit). The estimator Y = M_0·1[the first
event is a hit] is unbiased: P(first event is a hit) = Z/M_0. The probability of a whole
history is

    Π_{j<N} q(r_{j+1})/M_j · Π_k (Z/M_k)^{c_k},

so given the removal sequence, the hit counts have probability ∝ Π_k u_k^{c_k}, and with
h_j the complete homogeneous symmetric polynomial of degree j in u_0..u_N,

    E[Y | r_1..r_N] = M_0 · u_0·u_N·h_{K−2} / (u_N·h_{K−1}) = h_{K−2} / h_{K−1} =: w

(K = 2: w = 1 / Σ_k 1/M_k). Hence E[w] = E[Y] = Z, and since x is independent of the
removals, E[w·f(x)] = E[w]·E[f(x)] = Σ_v q(v)·1[valid v]·f(v). The weight is never zero
when a valid token has q > 0 (each M_k > 0), and when no draw is invalid w = M_0. As K
grows the chain finds the invalid mass and w tends to the mass M_N left at the end: on
the 32-token lipogram of the benchmarks the spread of SMC's log Ẑ over seeds comes
mostly from the K = 2 weight's noise, compounded over the steps. M_k is summed from the
mass M_N left at the end plus the later removals, so no difference of nearly equal
numbers is ever taken.

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

from kldsl.errors import KldslValueError

#: The largest batch of draws taken at once (batches double from ``hits``).
MAX_BATCH = 4096


def awrs(
    log_q: Tensor,
    valid: Callable[[Tensor], Tensor],
    generator: torch.Generator,
    hits: int = 2,
) -> tuple[int, float, int]:
    """One token from q restricted to ``valid`` tokens, with a properly weighted log-weight.

    ``log_q`` [V]: next-token log-probabilities (−inf entries are never drawn);
    ``valid(tokens)`` maps a LongTensor [k] of token ids to a BoolTensor [k]; ``hits``
    (≥ 2): how many valid draws end the chain, more giving a weight of lower variance at
    the cost of more draws (and of checks of the rarer tokens they reach). Returns
    ``(token, log_weight, checks)``: the token, log of an unbiased estimate of the valid
    mass Σ_v q(v)·1[valid v] (see the module docstring), and how many tokens ``valid``
    was asked about. With no valid token of positive probability: ``(-1, -inf, checks)``
    (a token whose probability underflows float64 next to the likeliest one, below
    e^-745 of it, counts as probability zero).
    """
    check_hits(hits)
    log_q = log_q.detach().double().cpu().reshape(-1)
    if bool(torch.isnan(log_q).any()) or bool((log_q == math.inf).any()):
        raise ValueError("awrs() takes log-probabilities: log_q holds NaN or +inf")
    known: dict[int, bool] = {}
    checks = 0

    def check(tokens: list[int]) -> None:
        nonlocal checks
        ask = sorted({t for t in tokens if t not in known})
        if ask:
            answer = torch.as_tensor(valid(torch.tensor(ask, dtype=torch.long)))
            answer = answer.reshape(-1).tolist()
            if len(answer) != len(ask):
                raise ValueError(f"valid() returned {len(answer)} values for {len(ask)} tokens")
            known.update(zip(ask, (bool(a) for a in answer)))
            checks += len(ask)

    q = _Masses(log_q)
    rest = _Rest(q)
    removals: list[int] = []  # r_1..r_N in order
    first, found, size = -1, 0, hits
    while found < hits:
        batch = rest.draw(size, generator)
        if not batch:
            return -1, -math.inf, checks  # nothing valid outside R: nothing valid at all
        check(batch)
        for t in batch:
            if t in rest.removed:  # drawn before its removal: a draw from the rest rejects it
                continue
            if not known[t]:
                removals.append(t)
                rest.remove(t)
                continue
            first = t if found == 0 else first
            found += 1
            if found == hits:
                break
        size = min(2 * size, MAX_BATCH)
    return first, _log_weight(q, removals, hits), checks


def check_hits(hits: object, name: str = "hits") -> None:
    """Raise a :class:`~kldsl.errors.KldslValueError` unless ``hits`` is an integer ≥ 2.

    Example:
        >>> check_hits(32)
        >>> check_hits(1)
        Traceback (most recent call last):
        ...
        kldsl.errors.KldslValueError: hits must be an integer ≥ 2, got 1
    """
    if isinstance(hits, bool) or not isinstance(hits, int) or hits < 2:
        raise KldslValueError(f"{name} must be an integer ≥ 2, got {hits!r}")


class _Masses:
    """q of one row: probabilities (scaled by exp(max log q)) and their cumulative sums."""

    def __init__(self, log_q: Tensor):
        self.log_q = log_q
        self.shift = float(log_q.max()) if bool(torch.isfinite(log_q).any()) else 0.0
        self.probs = torch.exp(log_q - self.shift)
        self.cum = torch.cumsum(self.probs, 0)
        self.total = float(self.cum[-1]) if len(self.cum) else 0.0


class _Rest:
    """Independent draws from q restricted to the tokens not yet removed: inverse-CDF
    draws over a cumulative sum that leaves out the removals, rebuilt (O(V)) once the
    removals since its last build hold half of its mass, so at most about half of the
    draws land on a removed token and are drawn again."""

    def __init__(self, q: _Masses):
        self.q = q
        self.removed: set[int] = set()
        self._build()

    def _build(self) -> None:
        if self.removed:
            probs = self.q.probs.clone()
            probs[list(self.removed)] = 0.0
            self.cum = torch.cumsum(probs, 0)
            self.total = float(self.cum[-1])
        else:
            self.cum, self.total = self.q.cum, self.q.total
        self.stale = 0.0  # the mass removed since the build

    def remove(self, token: int) -> None:
        self.removed.add(token)
        self.stale += float(self.q.probs[token])

    def draw(self, k: int, generator: torch.Generator) -> list[int]:
        """k tokens, independent draws from q outside the removed ones ([] when no mass
        is left there)."""
        out: list[int] = []
        while len(out) < k:
            if 2 * self.stale > self.total:
                self._build()
            if self.total <= 0.0:
                return []
            u = torch.rand(k - len(out), generator=generator, dtype=torch.float64)
            index = torch.searchsorted(self.cum, u * self.total, right=True)
            index = index.clamp_max(len(self.cum) - 1)
            positive = (self.q.probs[index] > 0).tolist()  # u·total rounded up to the end
            out += [t for t, p in zip(index.tolist(), positive) if p and t not in self.removed]
        return out


def _log_weight(q: _Masses, removals: list[int], hits: int = 2) -> float:
    """log w = log h_{K−2}(u) − log h_{K−1}(u) for K = ``hits`` (module docstring), u_k =
    1/M_k and M_k the mass outside r_1..r_k; at K = 2, −log Σ_{k=0}^{N} 1/M_k."""
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
    log_u = -torch.cat([torch.logaddexp(left, later), left])
    # h_j(u_0..u_k) = Σ_{i≤k} u_i·h_{j−1}(u_0..u_i): a cumulative sum per degree
    log_h = torch.zeros_like(log_u)
    totals = [0.0]  # log h_0 = 0
    for _ in range(hits - 1):
        log_h = torch.logcumsumexp(log_u + log_h, 0)
        totals.append(float(log_h[-1]))
    return totals[-2] - totals[-1]
