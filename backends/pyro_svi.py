"""Stochastic variational inference through Pyro: ``pyro.infer.SVI`` on ``kl.to_pyro``.

The guide is a trainable copy of the proposal LM (the prior by default) proposing site
``"x"``; the loss is Pyro's ``TraceGraph_ELBO``, whose score-function estimator uses the
decaying-average baseline configured on the guide site (``infer={"baseline": ...}``).
Maximising the ELBO E_π[log p̃ − log π] = log Z − KL(π‖p*) is the variational engine's
``reverse_kl`` objective written as a Pyro program. A −∞ factor would make the ELBO −∞
and its gradient NaN, so hard constraints get the same finite ``penalty`` as
``reverse_kl`` (``kl.transforms.soften``, with the same warning). Returns a ``kl.Fit``.

    fit = kl.infer(model, engine="pyro-svi", steps=200, batch_size=32, lr=0.05)
"""

from __future__ import annotations

import copy
import time
from typing import Any

import pyro
import torch
from pyro.infer import SVI, TraceGraph_ELBO

from kldsl.errors import KldslInferenceError
from kldsl.fit import Fit
from kldsl.infer import Engine
from kldsl.progress import bar
from kldsl.pyro_bridge import pyro_guide, to_pyro
from kldsl.target import Target
from kldsl.transforms import warn_softened


def run(
    target: Target,
    *,
    n: int,
    generator: torch.Generator,
    batch_size: int,
    progress: bool | None,
    steps: int = 100,
    lr: float = 1e-3,
    penalty: float = 10.0,
    baseline_beta: float = 0.9,
) -> Fit:
    conditions = target.model.conditions()
    fitted = target.model  # the finite-penalty graph with constraints (what the ELBO sees)
    if conditions:
        fitted = warn_softened(
            target.model,
            penalty,
            who="pyro-svi",
            why="a −∞ factor makes the ELBO −∞ and its gradient NaN",
        )
    pi = copy.deepcopy(target.proposal)
    module = pi if isinstance(pi, torch.nn.Module) else getattr(pi, "model", None)
    if not isinstance(module, torch.nn.Module) or not any(True for _ in module.parameters()):
        raise KldslInferenceError(
            f"pyro-svi trains the guide LM, and {pi.name} has no torch parameters; use a "
            "ToyLM, a Hugging Face model or an LM that is a torch.nn.Module"
        )
    module.train()
    pyro.clear_param_store()
    pyro.set_rng_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
    model = to_pyro(fitted, plate_size=batch_size, lms=target.lms)
    guide = pyro_guide(
        pi,
        target.model,
        plate_size=batch_size,
        baseline={"use_decaying_avg_baseline": True, "baseline_beta": baseline_beta},
    )
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss=TraceGraph_ELBO())
    history: list[dict[str, Any]] = []
    with bar(steps, "pyro-svi", progress, unit="step") as pbar:
        for step in range(steps):
            start = time.perf_counter()
            loss = svi.step()
            elbo = -loss / batch_size
            history.append(
                {
                    "step": step + 1,
                    "loss": loss,
                    "elbo": elbo,
                    "samples_per_s": batch_size / (time.perf_counter() - start),
                }
            )
            pbar.update(1)
            pbar.set_postfix(elbo=f"{elbo:.3f}")
    module.eval()
    pi.name = f"{target.proposal.name}-pyro-svi"
    return Fit(
        model=pi,
        history=history,
        objective="elbo",
        target=target.model,
        info={
            "engine": "pyro-svi",
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "penalty": penalty if conditions else None,
        },
    )


engine = Engine(
    "pyro-svi",
    "pyro.infer.SVI (score-function TraceGraph_ELBO with a baseline) training an LM guide",
    run,
)
