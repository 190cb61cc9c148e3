"""Estimators on one batch of draws: gradient coefficients of the fitting objectives and the
metrics reported for a step (KL in both directions, JS, KL to the base, entropy, ESS).

The draws come from a sampler s — the LM π being fitted (on-policy, reverse KL) or a frozen
proposal q — and a :class:`Batch` holds, per draw, log p̃ (the unnormalised target), log s,
log π, log a (the base prior), the length and every reward and constraint. Ẑ is passed in:
the running estimate of the normaliser Z of p̃, p* = p̃/Z.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kldsl import weights
from kldsl.errors import KldslInferenceError
from kldsl.lm import Ids

OBJECTIVES = ("reverse_kl", "forward_kl", "js")
_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class Batch:
    """Per-draw float64 columns of one batch (or of one group of it, ``batch[g]``).

    ``stack`` lays them out as one matrix (one row a draw) so that processes can gather a
    batch with one collective; ``unstack`` names the columns again.

    >>> b = Batch(*[torch.tensor([0.0, 1.0])] * 7, rewards={"r": torch.tensor([2.0, 3.0])})
    >>> Batch.unstack(b.stack(), like=b)[1:].rewards
    {'r': tensor([3.])}
    """

    log_p: Tensor  # log p̃(x) of the model graph
    log_p_penalized: Tensor  # log p̃ of the softened graph (= log_p without one)
    log_s: Tensor  # log s(x), the sampler's log-probability
    log_pi: Tensor  # log π(x) (detached)
    log_a: Tensor  # log a(x), the base prior
    length: Tensor  # tokens in x
    prompt: Tensor  # index of the prompt x was drawn for
    rewards: dict[str, Tensor] = field(default_factory=dict)
    constraints: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        density: Any,
        *,
        log_p_penalized: Tensor,
        log_s: Tensor,
        log_pi: Tensor,
        log_a: Tensor,
        ids: list[Ids],
        prompt: int,
    ) -> Batch:
        """The columns of draws ``ids`` whose exact density is ``density`` (a ``Density``)."""
        return cls(
            log_p=density.log_p,
            log_p_penalized=log_p_penalized,
            log_s=log_s,
            log_pi=log_pi,
            log_a=log_a,
            length=torch.tensor([float(len(s)) for s in ids], dtype=torch.float64),
            prompt=torch.full((len(ids),), float(prompt), dtype=torch.float64),
            rewards={k: v.double() for k, v in density.rewards.items()},
            constraints={k: v.double() for k, v in density.constraints.items()},
        )

    def _fixed(self) -> list[Tensor]:
        names = [f.name for f in dataclasses.fields(self)]
        return [getattr(self, k) for k in names if k not in ("rewards", "constraints")]

    def stack(self) -> Tensor:
        """One float64 row per draw: the fixed columns, then rewards, then constraints."""
        cols = self._fixed() + list(self.rewards.values()) + list(self.constraints.values())
        return torch.stack(cols, 1)

    @classmethod
    def unstack(cls, matrix: Tensor, like: Batch) -> Batch:
        """The columns of ``matrix`` (rows of :meth:`stack`), named as ``like``'s are."""
        fixed = len(like._fixed())
        cols = [matrix[:, i] for i in range(matrix.shape[1])]
        rewards = dict(zip(like.rewards, cols[fixed : fixed + len(like.rewards)]))
        constraints = dict(zip(like.constraints, cols[fixed + len(like.rewards) :]))
        return cls(*cols[:fixed], rewards=rewards, constraints=constraints)

    def __getitem__(self, rows: slice) -> Batch:
        return Batch(
            *[c[rows] for c in self._fixed()],
            rewards={k: v[rows] for k, v in self.rewards.items()},
            constraints={k: v[rows] for k, v in self.constraints.items()},
        )


def rho(log_pi: Tensor, log_s: Tensor, on_policy: bool) -> Tensor:
    """Self-normalised weights of the draws as samples of π (uniform when drawn from π)."""
    if on_policy:
        return torch.full_like(log_pi, 1.0 / len(log_pi))
    return weights.normalize(log_pi - log_s).exp()


def metrics(c: Batch, log_z_run: float, on_policy: bool) -> dict[str, float]:
    """KL(π‖a), KL(p*‖π), KL(π‖p*), JS(π, p*), entropy per token, ESS and the means of every
    reward and constraint under π, from one group of draws of s (π when ``on_policy``, the
    proposal q otherwise, which adds KL(p*‖q)). On-policy, Ẑ is this batch's estimate
    (``log_z_run`` if no draw is in the support), off-policy the running ``log_z_run``."""
    log_p, log_s, log_pi, log_a = c.log_p, c.log_s, c.log_pi, c.log_a
    n = len(log_p)
    r = rho(log_pi, log_s, on_policy)
    log_w = log_p - log_s  # p̃/s: the sampler's importance weights
    out: dict[str, float] = {
        "kl_pi_a": float((r * (log_pi - log_a)).sum()),
        "entropy_per_token": float((r * -log_pi).sum() / (r * c.length).sum().clamp(min=1e-12)),
        "ess": weights.ess(log_w),
    }
    if on_policy:  # the shared estimators, with Ẑ from this batch
        out["kl_pi_p"] = weights.kl_q_p(log_w)
        out["kl_p_pi"] = weights.kl_p_q(log_w)
        batch_log_z = float(weights.log_z(log_w))
        log_z = batch_log_z if math.isfinite(batch_log_z) else log_z_run
    else:
        log_z = log_z_run
        out["kl_p_pi"] = kl_p_r(log_w, log_p - log_pi, log_z, n)
        out["kl_p_q"] = kl_p_r(log_w, log_w, log_z, n)
        hit = (r > 0) & torch.isneginf(log_p)
        out["kl_pi_p"] = (
            math.inf if bool(hit.any()) else float((r * (log_pi - log_p)).sum() + log_z)
        )
    # JS(π, p*) = ½E_π[log 2π/(π+p*)] + ½E_p*[log 2p*/(π+p*)], u = log π/p*
    if math.isfinite(log_z):
        u = log_pi - (log_p - log_z)
        p_over_s = torch.exp(log_w - log_z)
        softplus = torch.nn.functional.softplus
        half_pi = (r * (_LOG2 - softplus(-u))).sum()
        inside = torch.isfinite(u)
        half_p = torch.where(inside, p_over_s * (_LOG2 - softplus(u)), torch.zeros_like(u))
        out["js"] = float(0.5 * half_pi + 0.5 * half_p.sum() / n)
    else:
        out["js"] = math.nan
    for key, value in c.rewards.items():
        out[f"reward/{key}"] = float((r * value).sum())
    for key, value in c.constraints.items():
        out[f"constraint/{key}"] = float((r * value).sum())
    return out


def mean_dicts(parts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise means of equally sized groups' metrics.

    >>> mean_dicts([{"kl": 1.0}, {"kl": 2.0}])
    {'kl': 1.5}
    """
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}


def kl_p_r(log_w: Tensor, log_p_over_r: Tensor, log_z: float, n: int) -> float:
    """KL(p*‖r) from draws of s with weights w = p̃/s: (1/n)Σ (w/Ẑ)(log p̃/r − log Ẑ)."""
    if not math.isfinite(log_z):
        return math.nan
    ratio = torch.exp(log_w - log_z)
    terms = torch.where(ratio > 0, ratio * (log_p_over_r - log_z), torch.zeros_like(ratio))
    return float(terms.sum() / n)


def loo_mean(values: Tensor) -> Tensor:
    """Leave-one-out means: entry i is the mean of every other entry (zeros below two), the
    baseline of a score-function gradient that keeps it unbiased.

    >>> loo_mean(torch.tensor([1.0, 2.0, 6.0]))
    tensor([4.0000, 3.5000, 1.5000])
    """
    n = len(values)
    if n < 2:
        return torch.zeros_like(values)
    return (values.sum() - values) / (n - 1)


def coefficients(
    objective: str,
    *,
    log_p: Tensor,
    log_p_penalized: Tensor,
    log_s: Tensor,
    log_pi: Tensor,
    log_z: float,
    baseline: bool = True,
) -> Tensor:
    """Per-sequence coefficients c with loss = −mean(c · log π(x)) for each objective.

    - ``reverse_kl`` (draws of π): c = R − b, R = log p̃_penalized − log π, b its
      leave-one-out mean;
    - ``forward_kl`` (DPG, draws of q): c = p̃/(Ẑq) − π/q;
    - ``js`` (f-DPG, draws of q): c = −(π/q)(f′(π/p*) − b), f′(t) = ½ log(2t/(1+t)), b the
      leave-one-out π/q-weighted mean of f′.

    Without ``baseline`` the baselines are left out; with no Ẑ yet (log Ẑ = −∞) the
    off-policy coefficients are zeros.

    >>> coefficients("reverse_kl", log_p=None, log_p_penalized=torch.tensor([0.0, 2.0]),
    ...              log_s=torch.tensor([0.0, 0.0]), log_pi=None, log_z=0.0)
    tensor([-2.,  2.])
    """
    if objective == "reverse_kl":
        reward = log_p_penalized - log_s  # log p̃ − log π (π sampled these draws)
        return reward - loo_mean(reward) if baseline else reward
    if not math.isfinite(log_z):  # no draw has been in the support yet: no signal
        return torch.zeros_like(log_p)
    ratio_pi = torch.exp(log_pi - log_s)  # π/q
    if objective == "forward_kl":
        c = torch.exp(log_p - log_s - log_z)  # p*/q
        return c - ratio_pi if baseline else c
    if objective == "js":
        u = log_pi - (log_p - log_z)  # log π/p* (+∞ outside the support)
        f_prime = 0.5 * (_LOG2 - torch.nn.functional.softplus(-u))
        weighted = ratio_pi * f_prime
        if baseline and len(u) > 1:
            b = (weighted.sum() - weighted) / (ratio_pi.sum() - ratio_pi).clamp(min=1e-300)
        else:
            b = torch.zeros_like(u)
        return -ratio_pi * (f_prime - b)
    raise KldslInferenceError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
