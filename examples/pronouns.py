"""Half of the stories use she/her: a distributional constraint on the embedded model.

In the spirit of GDC's biographies (Khalifa et al. 2021): under a neutral prompt the prior
writes about a woman in a minority of its continuations. ``| mean(indicator(she)) == 0.5``
asks for the distribution closest to the prior whose rate is one half, p* ∝ a·exp(λ·1[she]).
The script measures the prior's rate, fits λ (``kl.fit_moments``), samples the compiled
target by importance sampling, fine-tunes the prior toward it with forward KL (DPG; LoRA)
and measures the rate and distinct-n on fresh samples of the fine-tuned model.

    python examples/pronouns.py            # the embedded SmolLM2, a few minutes on 2 cores
    python examples/pronouns.py --n 256 --steps 30 --batch-size 16   # tighter numbers
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch

import kldsl as kl

PROMPT = "The doctor walked into the room and"
SHE = r"\b([Ss]he|[Hh]er|[Hh]ers|[Hh]erself)\b"


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams of words over all n-grams (1.0: no repetition across samples)."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def rate(texts: list[str], feature: kl.Constraint, weights: torch.Tensor | None = None) -> float:
    hits = feature(texts).double()
    return float(hits.mean() if weights is None else weights @ hits)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="the prior LM (name or folder)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--pattern", default=SHE, help="the feature: a regex of the text")
    parser.add_argument("--mu", type=float, default=0.5, help="the target rate")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--n", type=int, default=48, help="samples to fit λ and to measure")
    parser.add_argument("--min-ess", type=float, default=24.0)
    parser.add_argument("--steps", type=int, default=6, help="fine-tuning steps")
    parser.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--no-lora", action="store_true", help="train every parameter")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    she = kl.regex(args.pattern)
    model = kl.prior(args.model, prompt=args.prompt, max_tokens=args.max_tokens) | (
        kl.mean(kl.indicator(she)) == args.mu
    )
    print(model)
    out: dict[str, Any] = {}
    start = time.perf_counter()
    fit = kl.fit_moments(model, n=args.n, seed=0, min_ess=args.min_ess, progress=True)
    out["prior_rate"] = fit.base_means[0]  # the fitting sample is drawn from the prior
    out["lambda"], out["lambda_se"] = fit.lambdas[0], fit.lambda_se[0]
    print(fit.summary(), f"({time.perf_counter() - start:.0f} s)")

    start = time.perf_counter()
    samples = kl.infer(fit.model, engine="importance", n=args.n, seed=1, progress=True)
    out["importance_rate"] = rate(samples.texts, she, samples.weights)
    out["importance_ess"] = samples.ess
    print(
        f"importance sampling of the compiled target ({args.n} fresh draws, ESS "
        f"{samples.ess:.1f}): rate {out['importance_rate']:.3f} "
        f"({time.perf_counter() - start:.0f} s)"
    )

    start = time.perf_counter()
    lora = None if args.no_lora else {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few steps: the fit's own diagnostics say enough
        tuned = kl.infer(
            fit.model,
            engine="variational",
            objective="forward_kl",
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            lora=lora,
            seed=2,
            progress=True,
        )
    drawn = tuned.model.sample(args.n, args.max_tokens, prompt=args.prompt, seed=3)
    texts = tuned.model.texts(drawn.ids)
    out["tuned_rate"] = rate(texts, she)
    prior_texts = samples.texts  # importance sampling drew them from the prior
    out["fresh_prior_rate"] = rate(prior_texts, she)
    for k in (1, 2):
        out[f"distinct_{k}_prior"] = distinct_n(prior_texts, k)
        out[f"distinct_{k}_tuned"] = distinct_n(texts, k)
    print(
        f"forward KL, {args.steps} steps × {args.batch_size} ({time.perf_counter() - start:.0f} s): "
        f"rate on {args.n} fresh samples {out['tuned_rate']:.3f} (the prior's {args.n} "
        f"importance draws: {out['fresh_prior_rate']:.3f}); distinct-1 {out['distinct_1_tuned']:.2f} "
        f"(prior {out['distinct_1_prior']:.2f}), distinct-2 {out['distinct_2_tuned']:.2f} "
        f"(prior {out['distinct_2_prior']:.2f})"
    )
    for text in texts[:4]:
        print("   ", repr(text))
    return out


if __name__ == "__main__":
    main()
