"""Rejection sampling: exact samples of p* from proposals x ~ q.

Accepts x with probability exp(log w(x) − M), where w = p̃/q and M ≥ max log w. With the
prior as proposal and only tilts and hard constraints, M is the sum of the rewards'
declared upper bounds (hard constraints alone give M = 0: plain filtering); pass
``bound=M`` otherwise. The acceptance rate implies log Ẑ = M + log(rate).

    kl.infer(kl.prior(lm) * kl.exp(kl.sentiment / 0.5) | ~kl.curse, engine="rejection", n=32)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kldsl import weights
from kldsl.acceptance import accept_until
from kldsl.errors import KldslInferenceError
from kldsl.graph import Condition, Power, Prior, Tilt
from kldsl.infer import Engine
from kldsl.samples import Samples
from kldsl.target import Draw, Target


def log_bound(target: Target) -> tuple[float | None, str]:
    """An upper bound M on log w derived from the model, or None with the reason."""
    if target.proposal is not target.lm:
        return None, "the proposal is not the prior, so log w has no known bound"
    total = 0.0
    for f in target.model.factors():
        if isinstance(f, Tilt):
            hi = f.reward.bounds()[1]
            if math.isinf(hi):
                leaves = ", ".join(f"`{leaf}`" for leaf in f.reward.leaves())
                return None, f"the reward `{f.reward}` has no upper bound (leaves: {leaves})"
            total += hi
        elif isinstance(f, Power) and f.prior is target.base and f.alpha < 1:
            return None, f"tempering the base prior by α = {f.alpha} < 1 makes log w unbounded"
        elif not isinstance(f, Prior | Power | Condition):
            return None, f"no bound is known for the factor `{f}`"
    return total, ""


def run(
    target: Target,
    *,
    n: int,
    generator: torch.Generator,
    batch_size: int,
    progress: bool | None,
    bound: float | None = None,
    max_proposals: int | None = None,
) -> Samples:
    if bound is None:
        bound, why = log_bound(target)
        if bound is None:
            raise KldslInferenceError(
                f"rejection sampling needs a bound M ≥ max log w, and {why}; pass bound=M "
                "(declare reward bounds with @kl.reward(bounds=(lo, hi))), or use the "
                "importance or qrs engine"
            )

    def log_accept(draw: Draw) -> Tensor:
        log_w = draw.log_w
        if (log_w > bound + 1e-6).any():
            i = int(log_w.argmax())
            raise KldslInferenceError(
                f"log w = {float(log_w[i]):.4f} exceeds the bound M = {bound:.4f} on the "
                f"sample {draw.texts[i]!r}; a declared reward bound is wrong, or pass a "
                "larger bound="
            )
        return log_w - bound

    run = accept_until(
        target,
        n,
        generator,
        batch_size,
        progress,
        log_accept,
        name="rejection sampling",
        max_proposals=max_proposals,
    )
    # the rate counts every acceptance among the proposals, also those of the last batch
    # beyond n: dropping them but counting their proposals biases log Ẑ downwards
    rate = run.rate
    return Samples.from_draw(
        "rejection",
        target.model,
        run.accepted,
        torch.zeros(len(run.accepted), dtype=torch.float64),
        log_z=bound + math.log(rate),
        log_z_se=math.sqrt((1 - rate) / (run.tried * rate)),
        n_proposed=run.tried,
        proposal_means=run.proposal_means,
        acceptance_rate=rate,
        divergences={},
        info={
            "bound": bound,
            "log_z_importance": float(weights.log_z(run.proposed_log_w)),
            "proposal": target.proposal.name,
        },
    )


engine = Engine(
    "rejection",
    "exact samples by rejection from the prior (or a proposal with a known bound M)",
    run,
    resumable=True,
)
