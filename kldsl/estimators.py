"""Estimators on one batch of draws: gradient coefficients of the fitting objectives, the
metrics reported for a step (KL in both directions, JS, KL to the base, entropy, ESS) and
the evidence for replacing the proposal.

The draws come from a sampler s — the LM π being fitted (on-policy, reverse KL), a frozen
proposal q (importance), or any sampling engine whose draws are properly weighted for p̃
(rejection, SMC, ...) — and a :class:`Batch` holds, per draw, log p̃ (the unnormalised
target), log s, log π, log a (the base prior), the length and every reward and constraint.
For an engine's weighted samples (x_i, w_i), log s is the implied log p̃ − log w: then
p̃/s = w, the sampler's weight, whatever the engine. Ẑ is passed in: the running estimate
of the normaliser Z of p̃, p* = p̃/Z.
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

    >>> b = Batch(*[torch.tensor([0.0, 1.0])] * 9, rewards={"r": torch.tensor([2.0, 3.0])})
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
    draws: Tensor  # sequences the sampler drew for this row (1 for importance; 1/rate rejection)
    log_mass: Tensor  # this row's share of log Σ p̃/s over those draws (the running Ẑ's input)
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
        draws: Tensor | None = None,
        log_mass: Tensor | None = None,
    ) -> Batch:
        """The columns of draws ``ids`` whose exact density is ``density`` (a ``Density``);
        ``draws`` and ``log_mass`` default to an importance draw's (1 and log p̃ − log s)."""
        n = len(ids)
        return cls(
            log_p=density.log_p,
            log_p_penalized=log_p_penalized,
            log_s=log_s,
            log_pi=log_pi,
            log_a=log_a,
            length=torch.tensor([float(len(s)) for s in ids], dtype=torch.float64),
            prompt=torch.full((n,), float(prompt), dtype=torch.float64),
            draws=torch.ones(n, dtype=torch.float64) if draws is None else draws,
            log_mass=density.log_p - log_s if log_mass is None else log_mass,
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
    log_z_weights: float | None = None,
) -> Tensor:
    """Per-sequence coefficients c with loss = −mean(c · log π(x)) for each objective.

    Off-policy, the draws are properly weighted for p̃ with weights w = p̃/s: E_s[w·h] =
    Z·E_p*[h] for any h. With p* = p̃/Z and W = w/Z_w (``log_z_weights``: Z itself for
    the expectation, or the batch's own mean weight, which makes W = n·w/Σw, the
    self-normalised weights):

    - ``reverse_kl`` (draws of π): c = R − b, R = log p̃_penalized − log π, b its
      leave-one-out mean;
    - ``forward_kl`` (DPG): ∇KL(p*‖π) = −E_p*[∇log π], so c = W (− π/s with ``baseline``:
      E_s[(π/s)∇log π] = Σ ∇π = 0, a control variate only where s is a density one can
      evaluate, i.e. the importance proposal q). Exact samples of p* (rejection) have
      equal weights, W = 1: the gradient is maximum likelihood on them;
    - ``js`` (f-DPG, f(t) = ½[t log t − (1+t) log((1+t)/2)]): ∇JS(π, p*) = E_π[(f′(π/p*) −
      b)∇log π] for any constant b; with b = f′(∞) = ½ log 2 the terms outside the support
      of p* vanish and E_π[·] = E_p*[(π/p*)·] on it, so c = W·(π/p*)·½ softplus(log p*/π)
      (f′(t) − ½ log 2 = −½ softplus(−log t)) — an expectation under p*, which any
      sampler of p* estimates.

    ``baseline=False`` leaves the baselines out (js has none); with no Ẑ yet (log Ẑ = −∞)
    the off-policy coefficients are zeros.

    >>> coefficients("reverse_kl", log_p=None, log_p_penalized=torch.tensor([0.0, 2.0]),
    ...              log_s=torch.tensor([0.0, 0.0]), log_pi=None, log_z=0.0)
    tensor([-2.,  2.])
    >>> coefficients("forward_kl", log_p=torch.tensor([0.0, 0.0]), log_p_penalized=None,
    ...              log_s=torch.tensor([0.0, 0.0]), log_pi=None, log_z=0.0, baseline=False)
    tensor([1., 1.])
    """
    if objective == "reverse_kl":
        reward = log_p_penalized - log_s  # log p̃ − log π (π sampled these draws)
        return reward - loo_mean(reward) if baseline else reward
    if objective not in OBJECTIVES:
        raise KldslInferenceError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    log_z_w = log_z if log_z_weights is None else log_z_weights
    if not math.isfinite(log_z_w):  # no draw in the support: no signal
        return torch.zeros_like(log_p)
    weight = torch.exp(log_p - log_s - log_z_w)  # W: p*/s, or the self-normalised n·w̄
    if objective == "forward_kl":
        return weight - torch.exp(log_pi - log_s) if baseline else weight
    if not math.isfinite(log_z):
        return torch.zeros_like(log_p)
    u = torch.where(weight > 0, log_pi - (log_p - log_z), torch.zeros_like(log_pi))  # log π/p*
    return weight * 0.5 * _exp_softplus(u)


def _exp_softplus(u: Tensor) -> Tensor:
    """e^u·log(1 + e^−u) without overflow (it tends to 1 as u → ∞)."""
    softplus = torch.nn.functional.softplus
    t = torch.exp(-u.clamp(min=0.0))
    large = torch.where(t > 0, torch.log1p(t) / t.clamp(min=1e-300), torch.ones_like(t))
    return torch.where(u > 0, large, torch.exp(u.clamp(max=0.0)) * softplus(-u.clamp(max=0.0)))


def sample_metrics(c: Batch, log_z_run: float) -> dict[str, float]:
    """KL(p*‖π) and the ESS from draws that are samples of p* with weights w = p̃/s (a
    sampling engine's, not a density one can evaluate): KL(p*‖π) = Σ w̄ (log p̃ − log Ẑ −
    log π), self-normalised, with the running Ẑ. Quantities under π (KL(π‖a), entropy,
    constraint rates) need draws of π and are not estimated from them."""
    log_w = c.log_p - c.log_s
    out = {"ess": weights.ess(log_w), "kl_p_pi": math.nan}
    if out["ess"] > 0 and math.isfinite(log_z_run):
        w = weights.normalize(log_w).exp()
        gap = torch.where(w > 0, c.log_p - log_z_run - c.log_pi, torch.zeros_like(w))
        out["kl_p_pi"] = float((w * gap).sum())
    return out


def swap_evidence(
    log_p: Tensor, log_q: Tensor, log_pi: Tensor, *, z: float, min_ess: float
) -> dict[str, float]:
    """Whether π is closer to p* than q, with confidence, from fresh draws of the mixture
    m = ½(q + π) (half from each): the gain G = KL(p*‖q) − KL(p*‖π) = E_p*[log π − log q]
    (log Z cancels: the two are compared on the same draws), estimated self-normalised with
    w ∝ p̃/m, and its delta-method standard error SE² = Σ w̄²(h − Ĝ)², h = log π/q.
    ``replace`` is 1 only when the weights' ESS ≥ ``min_ess`` (a standard error from one
    or two hits is itself noise) and Ĝ > z·SE.

    >>> e = swap_evidence(torch.zeros(4), torch.zeros(4), torch.full((4,), 0.5), z=2.0,
    ...                   min_ess=8.0)
    >>> e["gain"], e["replace"]
    (0.5, 0.0)
    """
    log_m = torch.logaddexp(log_q, log_pi) - _LOG2
    log_w = log_p - log_m
    ess = weights.ess(log_w)
    out = {"gain": math.nan, "se": math.nan, "ess": ess, "replace": 0.0}
    if ess == 0:
        return out
    w = weights.normalize(log_w).exp()
    h = torch.where(w > 0, log_pi - log_q, torch.zeros_like(w))
    gain = float((w * h).sum())
    se = float(torch.sqrt((w**2 * (h - gain) ** 2).sum()))
    out.update(gain=gain, se=se, replace=float(ess >= min_ess and gain > z * se))
    return out
