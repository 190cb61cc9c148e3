"""Control as inference, as numbers: KL-regularised RL is variational inference.

For a fixed policy π, Pyro's ELBO for the model ``prior(a) * exp(r / β)`` equals the
KL-regularised RL objective divided by β, E_π[r]/β − KL(π‖a), and equals
log Z − KL(π‖p*) — computed here exactly, by enumerating a ToyLM. Then Pyro's importance
sampler and kldsl's agree on log Z, and SVI through Pyro and kldsl's ``reverse_kl``
engine move the same π toward p*.

    python examples/control_as_inference.py
"""

from __future__ import annotations

import torch

import kldsl as kl
from kldsl.pyro_bridge import elbo_by_enumeration

MAX_TOKENS = 4
BETA = 0.5


@kl.reward(bounds=(0, MAX_TOKENS))
def n_a(texts: list[str]) -> list[float]:
    """Number of a's: the reward the policy should learn to collect."""
    return [t.count("a") for t in texts]


def exact_terms(model: kl.Model, prior: kl.LM, pi: kl.LM, log_z: float) -> dict[str, float]:
    """E_π[r]/β, KL(π‖a) and KL(π‖p*) by enumerating π's support."""
    every = pi.enumerate(MAX_TOKENS)
    p = every.log_probs.exp()
    log_a = prior.score(every.ids)
    density = model.log_density(every.ids)
    return {
        "E_π[r]/β": float((p * (density.log_p - log_a)).sum()),
        "KL(π‖a)": float((p * (every.log_probs - log_a)).sum()),
        "KL(π‖p*)": float((p * (every.log_probs - (density.log_p - log_z))).sum()),
    }


def main(steps: int = 150, batch_size: int = 32, lr: float = 0.05) -> dict[str, float]:
    torch.set_num_threads(1)
    prior = kl.ToyLM(vocab="ab", seed=0, name="a")
    model = kl.prior(prior, max_tokens=MAX_TOKENS) * kl.exp(n_a / BETA)
    pi = kl.ToyLM(vocab="ab", seed=4, name="pi")
    log_z = kl.infer(model, engine="exact").log_z
    terms = exact_terms(model, prior, pi, log_z)
    elbo = elbo_by_enumeration(model, pi)
    rl = terms["E_π[r]/β"] - terms["KL(π‖a)"]
    vi = log_z - terms["KL(π‖p*)"]
    print(f"model: {model}\n")
    print("1. For a fixed π, three names for one number (exact enumeration):")
    print(f"   Pyro ELBO  E_π[log p(x, r) − log π(x)]   = {elbo:.10f}")
    print(f"   KL-regularised RL / β  E_π[r]/β − KL(π‖a) = {rl:.10f}")
    print(f"   variational bound  log Z − KL(π‖p*)     = {vi:.10f}")

    ours = kl.infer(model, engine="importance", n=2000, seed=0)
    pyros = kl.infer(model, engine="pyro-importance", n=2000, seed=1)
    print("\n2. log Z three ways:")
    print(f"   exact (enumeration)          {log_z:.4f}")
    print(f"   kldsl importance (n=2000)    {ours.log_z:.4f} ± {ours.log_z_se:.4f}")
    print(f"   pyro.infer.Importance        {pyros.log_z:.4f} ± {pyros.log_z_se:.4f}")

    settings = dict(steps=steps, batch_size=batch_size, lr=lr, seed=0)
    svi = kl.infer(model, engine="pyro-svi", **settings)
    rl_fit = kl.infer(model, engine="variational", objective="reverse_kl", **settings)
    before = exact_terms(model, prior, prior, log_z)["KL(π‖p*)"]
    after_svi = exact_terms(model, prior, svi.model, log_z)["KL(π‖p*)"]
    after_rl = exact_terms(model, prior, rl_fit.model, log_z)["KL(π‖p*)"]
    print(f"\n3. Training π from a ({steps} steps of {batch_size} samples, lr {lr}):")
    print(f"   {'':28} exact KL(π‖p*)")
    print(f"   {'start (π = a)':28} {before:.4f}")
    print(f"   {'Pyro SVI (TraceGraph_ELBO)':28} {after_svi:.4f}")
    print(f"   {'kldsl reverse_kl':28} {after_rl:.4f}")
    return {
        "elbo": elbo,
        "rl": rl,
        "vi": vi,
        "log_z": log_z,
        "log_z_importance": ours.log_z,
        "log_z_pyro": pyros.log_z,
        "kl_before": before,
        "kl_svi": after_svi,
        "kl_reverse_kl": after_rl,
    }


if __name__ == "__main__":
    main()
