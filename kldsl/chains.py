"""Mixing diagnostics of Markov chains over sequences, shared by the engines that return
chain states as equally weighted samples (``mcmc``, and ``smc`` in its particle Gibbs mode).

Split R-hat and ESS (``pyro.ops.stats``) of log p̃, each reward and the token count, with
a warning when a chain has not mixed.

Example:
    >>> import kldsl as kl
    >>> target = kl.Target(kl.prior(kl.ToyLM(), max_tokens=3) * kl.exp(kl.length / 1.0))
    >>> draw = target.draw(16, torch.Generator().manual_seed(0))
    >>> summary = chain_summary(draw, chains=2, advice="run longer")
    >>> summary["traces"]["tokens"].shape
    torch.Size([2, 8])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from torch import Tensor

from kldsl.target import Draw

R_HAT_WARN = 1.05  # split R-hat above this means the chains have not mixed


def chain_diagnostics(traces: Mapping[str, Tensor]) -> tuple[dict[str, float], dict[str, float]]:
    """Split R-hat and ESS of each statistic's [chains, samples] trace (pyro.ops.stats).

    Both are NaN for a statistic that is constant over every chain, and for fewer than four
    samples per chain.
    """
    r_hat: dict[str, float] = {}
    ess: dict[str, float] = {}
    for name, trace in traces.items():
        if trace.shape[1] < 4 or float(trace.std()) == 0.0:
            r_hat[name] = ess[name] = math.nan
            continue
        r_hat[name] = float(split_gelman_rubin(trace, chain_dim=0, sample_dim=1))
        ess[name] = float(effective_sample_size(trace, chain_dim=0, sample_dim=1))
    return r_hat, ess


def chain_summary(draw: Draw, chains: int, advice: str, stacklevel: int = 4) -> dict[str, Any]:
    """The diagnostics of ``draw``, the states of ``chains`` equally long chains ordered
    chain by chain: the traces of log p̃, each reward and the token count ([chains, steps]
    each, which :meth:`kldsl.Samples.plot` draws), their split R-hat and ESS, and the worst
    of each (``"split R-hat (max)"``, ``"MCMC ESS (min)"``). Warns, ending with ``advice``,
    when any R-hat exceeds :data:`R_HAT_WARN` (``stacklevel``: the caller the warning
    names, counted from here)."""
    d = draw.density
    traces = {"log p̃": d.log_p, **d.rewards}
    traces["tokens"] = torch.tensor([len(x) for x in draw.ids], dtype=torch.float64)
    traces = {k: v.double().reshape(chains, -1) for k, v in traces.items()}
    r_hat, ess = chain_diagnostics(traces)
    bad = {k: v for k, v in r_hat.items() if v > R_HAT_WARN}
    if bad:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in bad.items())
        warnings.warn(
            f"MCMC chains have not mixed: split R-hat {shown} > {R_HAT_WARN}; {advice}",
            stacklevel=stacklevel,
        )
    finite_r = [v for v in r_hat.values() if not math.isnan(v)]
    finite_ess = [v for v in ess.values() if not math.isnan(v)]
    return {
        "split R-hat (max)": max(finite_r, default=math.nan),
        "MCMC ESS (min)": min(finite_ess, default=math.nan),
        "r_hat": r_hat,
        "ess": ess,
        "traces": traces,
    }
