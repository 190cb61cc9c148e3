"""Self-normalised importance sampling from the prior or any proposal LM.

Draws x ~ q, weighs w = p̃(x)/q(x), estimates Z by mean(w) with a delta-method standard
error, and reports ESS, KL(q‖p*) and KL(p*‖q). ``resample=k`` returns ``k`` equally
weighted samples (sampling-importance-resampling) instead of the weighted draws.

    kl.infer(model, engine="importance", n=256, proposal=fine_tuned, resample=64)
"""

from __future__ import annotations

import torch

from kldsl import weights
from kldsl.infer import Engine
from kldsl.progress import bar
from kldsl.samples import Samples, proposal_means
from kldsl.target import BatchSeeds, Draw, Target


def run(
    target: Target,
    *,
    n: int,
    generator: torch.Generator,
    batch_size: int,
    progress: bool | None,
    resample: int | bool = False,
) -> Samples:
    seeds = BatchSeeds(generator)
    draws: list[Draw] = []
    running = weights.Running()  # the progress bar's ESS, in O(batch) per batch
    with bar(n, "importance", progress) as pbar:
        while running.count < n:
            size = min(batch_size, n - running.count)
            draws.append(target.draw_batch(len(draws), size, seeds))
            running.add(draws[-1].log_w)
            pbar.update(size)
            pbar.set_postfix(ess=f"{running.ess:.1f}")
    draw = Draw.concat(draws)  # once, at the end
    log_w = draw.log_w
    if not torch.isfinite(torch.logsumexp(log_w, 0)):
        raise target.no_support_error(n)
    samples = Samples.from_draw(
        "importance",
        target.model,
        draw,
        log_w,
        log_z=float(weights.log_z(log_w)),
        log_z_se=weights.log_z_se(log_w),
        n_proposed=n,
        proposal_means=proposal_means(draw),
        divergences={"KL(q‖p*)": weights.kl_q_p(log_w), "KL(p*‖q)": weights.kl_p_q(log_w)},
        info={"proposal": target.proposal.name},
    )
    if resample:
        k = n if resample is True else int(resample)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        return samples.resample(k, seed=seed)
    return samples


engine = Engine(
    "importance",
    "self-normalised importance sampling from the prior or a proposal; log Z, ESS, SIR",
    run,
    resumable=True,
)
