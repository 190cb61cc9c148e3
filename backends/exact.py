"""Exact inference by enumeration: every sequence of an enumerable LM, weighted by p̃.

For a ToyLM (or any LM with a small vocabulary and ``max_tokens``) this is the ground
truth: the returned weights are the exact posterior, ``log_z`` is exact, and
``divergences`` holds the exact KL(p*‖a) and KL(a‖p*) between posterior and prior.
``limit`` caps the number of sequences (a friendly error above it). With ``out=`` the
enumeration is written as draws (log q = log a(x), the prior being the "proposal"). It
takes no ``proposal=``: it enumerates the prior itself.

    kl.infer(kl.prior(kl.ToyLM(), max_tokens=4) | kl.contains("a"), engine="exact")
"""

from __future__ import annotations

import math

import torch

from kldsl.errors import KldslError
from kldsl.infer import Engine
from kldsl.samples import Samples, proposal_means
from kldsl.target import Target
from kldsl.weights import normalize

NO_PROPOSAL = (
    "the exact engine enumerates the prior's own support and weighs it by p̃; it takes no "
    "proposal= (drop it, or use importance/rejection/qrs/mcmc with the proposal)"
)


def run(
    target: Target,
    *,
    n: int,
    generator: torch.Generator,
    batch_size: int,
    progress: bool | None,
    limit: int = 200_000,
) -> Samples:
    """The exact posterior of ``target``'s model, its every sequence weighted by p̃.

    limit: the most sequences to enumerate (a clear error above it)
    """
    if target.proposal is not target.lm:
        raise KldslError(NO_PROPOSAL)
    every = target.lm.enumerate(target.max_tokens, prompt=target.base.prompt, limit=limit)
    # through Target.evaluate, so an out= file gets the enumeration like any engine's draws
    draw = target.evaluate(every.ids, every.log_probs, batch_size=max(batch_size, 1024))
    density = draw.density
    log_p = density.log_p
    log_z = torch.logsumexp(log_p, 0)
    if not torch.isfinite(log_z):
        raise target.no_support_error(len(every))
    post = normalize(log_p)
    prior = every.log_probs
    both = torch.isfinite(post)
    kl_post_prior = float((post.exp() * (post - prior))[both].sum())
    kl_prior_post = (
        math.inf
        if (~both & (prior > -math.inf)).any()
        else float((prior.exp() * (prior - post)).sum())
    )
    return Samples.from_draw(
        "exact",
        target.model,
        draw,
        log_p,
        log_z=float(log_z),
        log_z_se=0.0,
        n_proposed=len(every),
        proposal_means=proposal_means(draw, weights_=prior.exp()),
        divergences={"KL(p*‖a)": kl_post_prior, "KL(a‖p*)": kl_prior_post},
        info={"support": len(every)},
    )


engine = Engine(
    "exact",
    "exact posterior by enumerating every sequence of a small LM (the ground truth)",
    run,
    batched=False,  # it enumerates (up to its own limit), whatever n and batch_size are
    takes_proposal=False,
)
