"""Importance sampling through Pyro: ``pyro.infer.Importance`` on ``kl.to_pyro(model)``.

The guide is the prior itself (Pyro's default) or ``kl.pyro_guide(proposal)``; Pyro's log
normaliser and ESS are reported as ``log_z`` and ``ess`` in the usual ``kl.Samples``. Pyro
runs the model once per sample (no batching), so this engine is for checking and teaching;
the ``importance`` engine is the fast path to the same estimates.

    kl.infer(model, engine="pyro-importance", n=500, seed=0)
"""

from __future__ import annotations

import pyro
import torch

from kldsl import weights
from kldsl.infer import Engine
from kldsl.progress import bar
from kldsl.pyro_bridge import pyro_guide, to_pyro
from kldsl.samples import Samples, proposal_means
from kldsl.target import Target


def run(
    target: Target,
    *,
    n: int,
    generator: torch.Generator,
    batch_size: int,
    progress: bool | None,
) -> Samples:
    pyro.set_rng_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
    pyro_model = to_pyro(target.model, lms=target.lms)
    guide = None if target.proposal is target.lm else pyro_guide(target.proposal, target.model)
    with bar(n, "pyro-importance", progress) as pbar, torch.no_grad():

        def model() -> torch.Tensor:
            pbar.update(1)
            return pyro_model()

        # Importance falls back to 10 samples when num_samples is None: always pass n
        importance = pyro.infer.Importance(model, guide, num_samples=n).run()
    trace = importance.exec_traces[0]
    site = trace.nodes["x"]["fn"]
    ids = [site.unpad(t.nodes["x"]["value"])[0] for t in importance.exec_traces]
    log_w = torch.stack([torch.as_tensor(w, dtype=torch.float64) for w in importance.log_weights])
    if not torch.isfinite(torch.logsumexp(log_w, 0)):
        raise target.no_support_error(n)
    # log q(x) is what the weights divided by: the prior site's or the guide's log-prob
    draw = target.evaluate(ids, log_q=None if guide else _prior_log_probs(importance))
    log_z = float(importance.get_log_normalizer())
    return Samples.from_draw(
        "pyro-importance",
        target.model,
        draw,
        log_w,
        log_z=log_z,
        log_z_se=weights.log_z_se(log_w),
        n_proposed=n,
        proposal_means=proposal_means(draw),
        divergences={"KL(q‖p*)": weights.kl_q_p(log_w), "KL(p*‖q)": weights.kl_p_q(log_w)},
        info={"pyro_ess": float(importance.get_ESS()), "proposal": target.proposal.name},
    )


def _prior_log_probs(importance: pyro.infer.Importance) -> torch.Tensor:
    values = [t.nodes["x"]["fn"].log_prob(t.nodes["x"]["value"]) for t in importance.exec_traces]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values]).reshape(-1)


engine = Engine(
    "pyro-importance",
    "pyro.infer.Importance on the model as a Pyro program (log normaliser, ESS)",
    run,
)
