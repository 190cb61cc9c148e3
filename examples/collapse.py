"""Distribution collapse: the same reward, β from large to tiny.

KL-regularised RL with reward r and coefficient β fits p*_β ∝ a·exp(r/β). A finite β keeps
π near the posterior, which keeps a's diversity where r is indifferent; as β → 0 the target
itself collapses onto argmax r, and so does π (the collapse Korbak et al. 2022 warn about).

Part 1 (exact, a ToyLM): for each β, fine-tune with ``reverse_kl`` (= KL-regularised RL)
and print, by enumeration, the entropy of π and of p*_β, KL(π‖a), KL(π‖p*_β) and the mass
on the reward's argmax; writes a plot. Part 2 (``--smollm2``, a few minutes): the embedded
model with a sentiment reward and LoRA, a few steps per β: distinct-n, entropy per token and
samples.

    python examples/collapse.py                      # ToyLM only, ≈ 15 s
    python examples/collapse.py --smollm2 --steps 4  # also the embedded model
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import torch

import kldsl as kl
from kldsl.exact_oracle import exact_divergences

MAX_TOKENS = 4


@kl.reward(bounds=(0, MAX_TOKENS))
def count_a(texts: list[str]) -> list[float]:
    """How many times the letter a occurs (argmax: "aaaa")."""
    return [float(t.count("a")) for t in texts]


def entropy(log_p: torch.Tensor) -> float:
    p = log_p.exp()
    return float(-(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum())


def toy(betas: list[float], steps: int, plot: Path | None) -> list[dict[str, float]]:
    """Fine-tune a ToyLM for each β and measure everything exactly."""
    lm = kl.ToyLM(vocab="abc", seed=0)
    argmax = lm.encode("a" * MAX_TOKENS)
    rows = []
    print(
        f"{'β':>7} {'H(π)':>7} {'H(p*)':>7} {'KL(π‖a)':>8} {'KL(π‖p*)':>9} "
        f"{'π(argmax)':>10} {'p*(argmax)':>11}"
    )
    for beta in betas:
        model = kl.prior(lm, max_tokens=MAX_TOKENS) * kl.exp(count_a / beta)
        fit = kl.infer(
            model,
            engine="variational",
            objective="reverse_kl",
            steps=steps,
            batch_size=32,
            lr=0.1,
            seed=0,
            progress=False,
        )
        exact = exact_divergences(fit.model, model)
        every = fit.model.enumerate(MAX_TOKENS)
        log_post = model.log_density(every.ids).log_p
        log_post = log_post - torch.logsumexp(log_post, 0)
        at = every.ids.index(argmax)
        row = {
            "beta": beta,
            "entropy_pi": entropy(every.log_probs),
            "entropy_post": entropy(log_post),
            "kl_pi_a": exact["kl_pi_a"],
            "kl_pi_p": exact["kl_pi_p"],
            "pi_argmax": float(every.log_probs[at].exp()),
            "post_argmax": float(log_post[at].exp()),
        }
        rows.append(row)
        print(
            f"{beta:7.3g} {row['entropy_pi']:7.3f} {row['entropy_post']:7.3f} "
            f"{row['kl_pi_a']:8.3f} {row['kl_pi_p']:9.4f} {row['pi_argmax']:10.3f} "
            f"{row['post_argmax']:11.3f}"
        )
    if plot is not None:
        draw(rows, plot)
        print(f"plot: {plot}")
    return rows


def draw(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beta = [r["beta"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(beta, [r["entropy_pi"] for r in rows], "o-", label="π (fitted)")
    axes[0].plot(beta, [r["entropy_post"] for r in rows], "x--", label="p*_β (exact)")
    axes[0].set_title("entropy (nats)")
    axes[1].plot(beta, [r["kl_pi_a"] for r in rows], "o-", label="KL(π‖a)")
    axes[1].plot(beta, [r["kl_pi_p"] for r in rows], "s-", label="KL(π‖p*_β)")
    axes[1].set_title("divergences")
    axes[2].plot(beta, [r["pi_argmax"] for r in rows], "o-", label="π")
    axes[2].plot(beta, [r["post_argmax"] for r in rows], "x--", label="p*_β")
    axes[2].set_title("mass on argmax r")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("β")
        ax.legend(fontsize=8)
    fig.suptitle("ToyLM · exp(count_a / β): finite β tracks p*, β → 0 collapses onto argmax")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams of words over all n-grams (1.0: no repetition across samples)."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def smollm2(betas: list[float], steps: int, samples: int) -> None:
    """A few LoRA steps per β on the embedded model with a sentiment reward."""
    prompt = "My neighbour told me that"
    for beta in betas:
        model = kl.prior("smollm2", prompt=prompt, max_tokens=12) * kl.exp(kl.sentiment / beta)
        start = time.perf_counter()
        fit = kl.infer(
            model,
            engine="variational",
            objective="reverse_kl",
            steps=steps,
            batch_size=4,
            lr=2e-3,
            lora={"r": 8, "target_modules": ["q_proj", "v_proj"]},
            seed=0,
            progress=True,
        )
        drawn = fit.model.sample(samples, 12, prompt=prompt, seed=1)
        texts = fit.model.texts(drawn.ids)
        tokens = sum(len(s) for s in drawn.ids)
        sentiment = kl.sentiment(texts).mean()
        print(
            f"β={beta:g} ({time.perf_counter() - start:.0f} s): "
            f"entropy/token {float(-drawn.log_probs.sum()) / tokens:.3f}, "
            f"distinct-1 {distinct_n(texts, 1):.2f}, distinct-2 {distinct_n(texts, 2):.2f}, "
            f"mean sentiment {float(sentiment):+.3f}, KL(π‖a) {fit.final['kl_pi_a']:.3f}"
        )
        for text in texts[:3]:
            print("   ", repr(text))


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--betas", default="10,3,1,0.3,0.1,0.03,0.01")
    parser.add_argument("--steps", type=int, default=150, help="ToyLM steps per β")
    parser.add_argument("--plot", default="collapse.png")
    parser.add_argument("--smollm2", action="store_true", help="also the embedded model")
    parser.add_argument("--smollm2-steps", type=int, default=4)
    parser.add_argument("--smollm2-betas", default="1,0.1,0.01")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    betas = [float(b) for b in args.betas.split(",")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = toy(betas, args.steps, Path(args.plot) if args.plot else None)
        if args.smollm2:
            torch.set_num_threads(max(1, min(4, torch.get_num_interop_threads())))
            smollm2([float(b) for b in args.smollm2_betas.split(",")], args.smollm2_steps, 16)
    big, small = rows[0], rows[-1]
    if math.isfinite(small["kl_pi_p"]):
        print(
            f"β={big['beta']:g}: H(π)={big['entropy_pi']:.2f} nats; "
            f"β={small['beta']:g}: H(π)={small['entropy_pi']:.2f}, "
            f"π(argmax)={small['pi_argmax']:.2f}"
        )
    return rows


if __name__ == "__main__":
    main()
