"""Exact answers on enumerable LMs, for tests, examples and benchmarks.

:func:`exact_divergences` enumerates every sequence of an LM π (a ``ToyLM``) and of a
model's posterior p* and returns their divergences exactly: the oracle that sampled and
fitted estimates are checked against.

Example:
    >>> import kldsl as kl
    >>> m = kl.prior(kl.ToyLM(), max_tokens=3) * kl.exp(kl.length / 1.0)
    >>> exact_divergences(kl.resolve(m.base()), m)["kl_pi_a"]
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from kldsl.graph import Model
from kldsl.lm import LM
from kldsl.registry import lm_of, resolve_all

_LOG2 = math.log(2.0)


def exact_divergences(
    lm: LM, model: Model, limit: int = 200_000, lms: Mapping[LM | str, LM] | None = None
) -> dict[str, float]:
    """KL(π‖p*), KL(p*‖π), JS(π, p*), KL(π‖a), entropy per token and log Z of an enumerable
    LM π against ``model``'s posterior, by enumerating every sequence. ``lms`` are the
    priors' LMs (e.g. :attr:`kldsl.Target.lms`); without them names resolve now."""
    base = model.base()
    if lms is None:
        lms = resolve_all(model.priors())
    every = lm.enumerate(base.max_tokens, prompt=base.prompt, limit=limit)
    log_pi = every.log_probs
    density = model.log_density(every.ids, batch_size=4096, lms=lms)
    log_z = torch.logsumexp(density.log_p, 0)
    log_post = density.log_p - log_z
    log_a = lm_of(base, lms).score(every.ids, prompt=base.prompt)
    pi, post = log_pi.exp(), log_post.exp()
    support = post > 0
    if bool(((~support) & (pi > 0)).any()):
        kl_pi_p = math.inf
    else:
        kl_pi_p = float((pi * (log_pi - log_post)).sum())
    mix = torch.logaddexp(log_pi, log_post) - _LOG2
    js = 0.5 * (pi * (log_pi - mix)).sum() + 0.5 * (post * (log_post - mix))[support].sum()
    length = torch.tensor([float(len(s)) for s in every.ids], dtype=torch.float64)
    return {
        "kl_pi_p": kl_pi_p,
        "kl_p_pi": float((post * (log_post - log_pi))[support].sum()),
        "js": float(js),
        "kl_pi_a": float((pi * (log_pi - log_a)).sum()),
        "entropy_per_token": float((pi * -log_pi).sum() / (pi * length).sum()),
        "log_z": float(log_z),
    }
