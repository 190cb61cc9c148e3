"""Quasi-rejection sampling (Eikema, Kruszewski, Dance, Aziz & Dymetman, 2022).

Draw x ~ q and accept it with probability min(1, w(x)/β_qrs), w = p̃/q. Accepted samples
follow p_β ∝ min(p̃, β_qrs·q): exact as β_qrs → ∞ (rejection), cheap but biased as it
shrinks. From the same draws the engine estimates Z = E_q[w], the acceptance rate
Z_β/β_qrs with Z_β = E_q[min(w, β_qrs)], and the divergences of p_β from p*:

    TV(p*, p_β) = ½ E_q |w/Z − min(w, β_qrs)/Z_β|
    KL(p*‖p_β) = E_q [(w/Z) · log((w/Z) / (min(w, β_qrs)/Z_β))]

``qrs_sweep`` computes this trade-off for many β_qrs on one pool of proposals.

    kl.infer(model, engine="qrs", n=64, qrs_beta=2.0)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kldsl import weights
from kldsl.acceptance import accept_until
from kldsl.errors import KldslError
from kldsl.graph import Model
from kldsl.infer import Engine
from kldsl.lm import LM, make_generator
from kldsl.samples import Samples
from kldsl.target import Draw, Target


def diagnostics(log_w: Tensor, log_beta: float) -> dict[str, float]:
    """Acceptance rate and divergence estimates of QRS at log β_qrs from proposal log-weights."""
    n = len(log_w)
    log_z = weights.log_z(log_w)
    log_min = torch.minimum(log_w, torch.full_like(log_w, log_beta))
    log_z_beta = torch.logsumexp(log_min, 0) - math.log(n)
    p = torch.exp(log_w - log_z)  # w / Z
    p_beta = torch.exp(log_min - log_z_beta)  # min(w, β) / Z_β
    tv = float(0.5 * (p - p_beta).abs().mean())
    ratio = torch.where(p > 0, (log_w - log_z) - (log_min - log_z_beta), torch.zeros_like(p))
    kl = float((p * ratio).mean())
    return {
        "acceptance_rate": float(torch.exp(log_z_beta - log_beta)),
        "TV(p*,p_β)": tv,
        "KL(p*‖p_β)": kl,
    }


def run(
    target: Target,
    *,
    n: int,
    generator: torch.Generator,
    batch_size: int,
    progress: bool | None,
    qrs_beta: float | None = None,
    max_proposals: int | None = None,
) -> Samples:
    if qrs_beta is not None and not qrs_beta > 0:
        raise KldslError(
            f"qrs_beta must be a positive number (a threshold on w = p̃/q), got {qrs_beta!r}"
        )
    log_beta = None if qrs_beta is None else math.log(qrs_beta)

    def log_accept(draw: Draw) -> Tensor:
        nonlocal log_beta
        if log_beta is None:  # default: the 90th percentile of the first weights seen
            finite = draw.log_w[torch.isfinite(draw.log_w)]
            if len(finite) == 0:
                return torch.full_like(draw.log_w, -math.inf)
            log_beta = float(torch.quantile(finite, 0.9))
        return draw.log_w - log_beta

    run = accept_until(
        target,
        n,
        generator,
        batch_size,
        progress,
        log_accept,
        name="qrs",
        max_proposals=max_proposals,
        advice="raise max_proposals or lower qrs_beta",
    )
    log_w = run.proposed_log_w
    diag = diagnostics(log_w, log_beta)
    return Samples.from_draw(
        "qrs",
        target.model,
        run.accepted,
        torch.zeros(len(run.accepted), dtype=torch.float64),
        log_z=float(weights.log_z(log_w)),
        log_z_se=weights.log_z_se(log_w),
        n_proposed=run.tried,
        proposal_means=run.proposal_means,
        acceptance_rate=run.rate,  # every acceptance, also the last batch's extras
        divergences={k: v for k, v in diag.items() if k != "acceptance_rate"},
        info={
            "qrs_beta": math.exp(log_beta),
            "expected_acceptance_rate": diag["acceptance_rate"],
            "proposal": target.proposal.name,
        },
    )


def qrs_sweep(
    model: Model,
    betas: list[float] | None = None,
    n: int = 1024,
    proposal: LM | None = None,
    seed: int = 0,
    batch_size: int = 64,
    plot: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Acceptance rate vs divergence to p* for each β_qrs, on one pool of ``n`` proposals.

    With ``betas=None`` it sweeps 25 values spread over the pool's log-weights. ``plot``
    writes a PNG of the trade-off.

    Example:
        >>> import kldsl as kl
        >>> rows = qrs_sweep(kl.prior(kl.ToyLM(), max_tokens=3) * kl.exp(kl.length), n=256)
        >>> rows[0]["acceptance_rate"] >= rows[-1]["acceptance_rate"]
        True
    """
    target = Target(model, proposal)
    log_w = target.draw(n, make_generator(seed), batch_size=batch_size).log_w
    finite = log_w[torch.isfinite(log_w)]
    if len(finite) == 0:
        raise target.no_support_error(n)
    if betas is None:
        lo, hi = float(finite.min()), float(finite.max())
        log_betas = torch.linspace(lo - 1.0, hi, 25).tolist()
    else:
        log_betas = [math.log(b) for b in sorted(betas)]
    rows = [{"qrs_beta": math.exp(lb), **diagnostics(log_w, lb)} for lb in log_betas]
    if plot is not None:
        _plot(rows, Path(plot), str(model))
    return rows


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    acc = [r["acceptance_rate"] for r in rows]
    ax.plot(acc, [r["TV(p*,p_β)"] for r in rows], marker="o", label="TV(p*, p_β)")
    ax.plot(acc, [r["KL(p*‖p_β)"] for r in rows], marker="s", label="KL(p* ‖ p_β)")
    ax.set_xscale("log")
    ax.set_xlabel("acceptance rate")
    ax.set_ylabel("divergence from the target")
    ax.set_title("quasi-rejection sampling: cost vs accuracy", fontsize=10)
    fig.suptitle(title, fontsize=7)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


engine = Engine(
    "qrs",
    "quasi-rejection sampling: tunable cost/accuracy with estimated divergence to the target",
    run,
    resumable=True,
)
