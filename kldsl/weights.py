"""Shared arithmetic of weighted samples: normalising, ESS, log Z, divergences, resampling.

Every engine uses these; none re-derives them. All inputs are log-weights
``log w = log p̃(x) − log q(x)`` of samples from a proposal q (``−inf`` where a hard
constraint fails).

Example:
    >>> import torch
    >>> log_w = torch.log(torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    >>> round(ess(log_w), 3)
    2.667
    >>> round(float(log_z(log_w).exp()), 3)
    1.333
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def normalize(log_w: Tensor) -> Tensor:
    """Self-normalised log-weights (they log-sum-exp to 0); all −inf gives all −inf."""
    total = torch.logsumexp(log_w, 0)
    if not torch.isfinite(total):
        return torch.full_like(log_w, -math.inf)
    return log_w - total


def ess(log_w: Tensor) -> float:
    """Kish effective sample size (Σw)² / Σw² (0 when every weight is 0)."""
    if len(log_w) == 0 or not torch.isfinite(torch.logsumexp(log_w, 0)):
        return 0.0
    shifted = log_w - log_w.max()  # keeps precision when log-weights are large
    return float(torch.exp(2 * torch.logsumexp(shifted, 0) - torch.logsumexp(2 * shifted, 0)))


def log_z(log_w: Tensor, n: int | None = None) -> Tensor:
    """log Ẑ = log mean(w): the unbiased importance estimate of Z, in log space; with
    ``n``, log(Σw/n), for weights that split n draws' mass among more rows (smc's
    ``split_eos`` copies)."""
    return torch.logsumexp(log_w, 0) - math.log(len(log_w) if n is None else n)


def log_z_se(log_w: Tensor) -> float:
    """Standard error of log Ẑ by the delta method: sd(w) / (√n · mean(w))."""
    n = len(log_w)
    if n < 2 or not torch.isfinite(torch.logsumexp(log_w, 0)):
        return math.inf
    shift = log_w.max()
    w = torch.exp(log_w - shift)
    return float(w.std(unbiased=True) / (math.sqrt(n) * w.mean()))


def kl_q_p(log_w: Tensor) -> float:
    """KL(q‖p*) = log Z − E_q[log w], with Z estimated from the same weights (∞ when q
    puts mass where p̃ is 0)."""
    if torch.isinf(log_w).any():
        return math.inf
    return float(log_z(log_w) - log_w.mean())


def kl_p_q(log_w: Tensor) -> float:
    """KL(p*‖q) = E_q[(w/Z)·log(w/Z)], estimated by self-normalised weights."""
    if not torch.isfinite(torch.logsumexp(log_w, 0)):
        return math.nan
    n = len(log_w)
    log_ratio = log_w - log_z(log_w)  # log(w / Ẑ)
    ratio = torch.exp(log_ratio)
    terms = torch.where(ratio > 0, ratio * log_ratio, torch.zeros_like(ratio))
    return float(terms.sum() / n)


def tv_distance(p: Mapping[Any, float], q: Mapping[Any, float]) -> float:
    """Total variation ½Σ|p(x) − q(x)| between two distributions given as
    ``{outcome: probability}``, over the union of their supports (e.g. an exact posterior
    and :meth:`kldsl.Samples.distribution`)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in p.keys() | q.keys())


#: the resampling schemes of :func:`resample`
RESAMPLING = ("multinomial", "stratified", "systematic", "residual")


def resample(
    log_w: Tensor, k: int, generator: torch.Generator, method: str = "multinomial"
) -> Tensor:
    """Indices [k] drawn in proportion to the weights: each index i is drawn k·W_i times
    in expectation (W the normalised weights), by one of :data:`RESAMPLING`.

    ``multinomial`` draws k i.i.d. indices; ``stratified`` one uniform in each of the k
    strata [j/k, (j+1)/k) of the weights' CDF; ``systematic`` one uniform shifted across
    all strata (each count is then ⌊k·W_i⌋ or ⌈k·W_i⌉); ``residual`` keeps ⌊k·W_i⌋ copies
    of each index and draws the rest multinomially from the remainders. The last three
    have lower variance than multinomial (Douc, Cappé & Moulines 2005).

    Example:
        >>> log_w = torch.log(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
        >>> resample(log_w, 4, torch.Generator().manual_seed(0), "residual")[:3].tolist()
        [0, 0, 1]
    """
    probs = normalize(log_w).exp()
    if not torch.isfinite(probs).all() or float(probs.sum()) <= 0:
        raise ValueError("cannot resample: every weight is zero")
    if method == "multinomial":
        return torch.multinomial(probs.float(), k, replacement=True, generator=generator)
    if method in ("stratified", "systematic"):
        shape = (k,) if method == "stratified" else ()
        u = (torch.rand(shape, generator=generator, dtype=torch.float64) + torch.arange(k)) / k
        return _inverse_cdf(probs, u)
    if method == "residual":
        copies = torch.floor(k * probs).long()
        kept = torch.repeat_interleave(torch.arange(len(probs)), copies)
        rest = k - int(copies.sum())
        if rest == 0:
            return kept
        remainder = (k * probs - copies).clamp(min=0.0)
        drawn = torch.multinomial(remainder.float(), rest, replacement=True, generator=generator)
        return torch.cat([kept, drawn])
    raise ValueError(
        f"unknown resampling method {method!r}; use one of {', '.join(map(repr, RESAMPLING))}"
    )


def _inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """The index whose CDF interval holds each of the sorted uniforms ``u``."""
    cdf = torch.cumsum(probs, 0)
    cdf[-1] = 1.0
    return torch.searchsorted(cdf, u, right=True).clamp(max=len(probs) - 1)


class Running:
    """Log Σw, log Σw² and the count of log-weights seen batch by batch: the ESS and log Ẑ
    of everything so far in O(batch) per batch, without holding or re-concatenating them.

    Example:
        >>> running = Running()
        >>> for part in torch.log(torch.tensor([[1.0, 1.0], [2.0, 4.0]], dtype=torch.float64)):
        ...     running.add(part)
        >>> round(running.ess, 3), round(math.exp(running.log_z), 3)
        (2.909, 2.0)
    """

    def __init__(self) -> None:
        self.count = 0
        self.log_sum = -math.inf  # log Σw
        self.log_sum_sq = -math.inf  # log Σw²

    def add(self, log_w: Tensor) -> None:
        self.count += len(log_w)
        if len(log_w):
            self.log_sum = _log_add(self.log_sum, float(torch.logsumexp(log_w, 0)))
            self.log_sum_sq = _log_add(self.log_sum_sq, float(torch.logsumexp(2 * log_w, 0)))

    @property
    def ess(self) -> float:
        """Kish ESS (Σw)² / Σw² of every weight added (0 while every weight is 0)."""
        if not math.isfinite(self.log_sum):
            return 0.0
        return math.exp(2 * self.log_sum - self.log_sum_sq)

    @property
    def log_z(self) -> float:
        """log mean(w) of every weight added."""
        return self.log_sum - math.log(max(self.count, 1))


def _log_add(a: float, b: float) -> float:
    """log(e^a + e^b) of two floats (−inf allowed)."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi = max(a, b)
    return hi + math.log1p(math.exp(-abs(a - b)))
