"""Benchmark 2: accuracy per cost on targets whose posterior is known exactly.

A ToyLM (vocabulary "abc", at most 5 tokens: 364 sequences) is small enough for the
``exact`` engine to give the true posterior p* and log Z. Three targets:

- ``soft``:  prior · exp(many_c / 0.25), many_c = #c / 5 ∈ [0, 1]   (Z ≈ 3.97)
- ``hard``:  prior | contains("aab")                                (Z ≈ 0.0104)
- ``mixed``: prior · exp(many_c / 0.25) | contains("ab")             (Z ≈ 1.17)

The tilt matters (TV(p*, prior) ≈ 0.39 on ``soft``) and in ``mixed`` it fights the
constraint (TV ≈ 0.31 from the constrained prior, ≈ 0.71 from ``soft``).

For each target and engine — ``rejection``, ``importance``, ``qrs``, ``mcmc`` and
``importance`` with a proposal fine-tuned by the ``variational`` engine — it sweeps the
sample budget n, repeats each budget for a few named seeds, and measures

- the cost: **token forward passes**, counted by wrapping the LM in :class:`CountingLM`
  (one pass per row of ``next_logprobs``, one per token of a differentiable ``log_prob``);
  the target is built from the counting LM, so sampling, re-scoring under the prior and
  the fine-tuned proposal are all counted;
- ``|log Ẑ − log Z|``: each engine's own estimate (rejection: M + log(acceptance rate);
  importance, qrs: mean(w) over every proposal; mcmc: it has no estimate of its own and
  reports mean(w) over the sequences its independent moves and initialisation drew whole
  from the prior — that is what is plotted for it);
- TV to p*: of the empirical distribution of the accepted / kept samples (rejection, qrs,
  mcmc) or of the self-normalised weights mapped onto the support (importance).

The fine-tuned proposal's training passes are reported separately (its curve shows
sampling passes only). Results: ``results/accuracy.json`` and one log-log plot per target,
``results/accuracy_<target>.png``.

    python -m benchmarks.accuracy [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import kldsl as kl
from benchmarks.common import RESULTS, write
from kldsl import weights
from kldsl.errors import KldslInferenceError
from kldsl.lm import LM, Ids

VOCAB = "abc"
LM_SEED = 2  # ToyLM weights: chosen so that contains("aab") has Z ≈ 0.01
MAX_TOKENS = 5
BETA = 0.25
ENGINES = ("rejection", "importance", "qrs", "mcmc", "importance+fit")
TV_GOAL = 0.1
LOG_Z_GOAL = 0.05
# Each engine's budget n runs through N_START · 4^k until the next one would pass the cap.
N_START = 16
FULL = {"seeds": (0, 1, 2), "pass_cap": 450_000, "fit_steps": 100}
QUICK = {"seeds": (0, 1), "pass_cap": 40_000, "fit_steps": 50}
FIT_BATCH = 64
FIT_LR = 0.05
MAX_BATCH = 1024  # sampling batch min(n, 1024): rejection and qrs overshoot n by < 1 batch
MCMC_CHAINS = (4, 64)  # chains = n/16 within these bounds; default moves and burn-in


@dataclass
class Counter:
    """Token forward passes spent so far."""

    passes: int = 0


class CountingLM(LM):
    """An LM that delegates to ``lm`` and counts token forward passes into ``counter``.

    ``sample``, ``score`` and ``enumerate`` of the base class go through ``next_logprobs``
    (one pass per prefix row); ``log_prob`` (what fine-tuning differentiates) counts one
    pass per token it scores. Copies made by the variational engine share the counter.

    Example:
        >>> lm = CountingLM(kl.ToyLM())
        >>> _ = lm.sample(4, max_tokens=3, seed=0)
        >>> 4 <= lm.counter.passes <= 12
        True
    """

    def __init__(self, lm: LM, counter: Counter | None = None):
        self.model = lm  # `.model`: the variational engine fine-tunes this module
        self.counter = counter if counter is not None else Counter()
        self.name = lm.name
        self.vocab_size = lm.vocab_size
        self.eos_id = lm.eos_id
        self.bos_id = lm.bos_id

    def encode(self, text: str) -> Ids:
        return self.model.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(ids)

    def context_ids(self, prompt: str = "") -> Ids:
        return self.model.context_ids(prompt)

    def tokenizer_signature(self) -> tuple:
        return self.model.tokenizer_signature()

    def next_logprobs(self, prefixes: list[Ids]) -> Tensor:
        self.counter.passes += len(prefixes)
        return self.model.next_logprobs(prefixes)

    def log_prob(self, sequences: Sequence[Sequence[int]], *, prompt: str = "") -> Tensor:
        self.counter.passes += sum(len(s) for s in sequences)
        return self.model.log_prob(sequences, prompt=prompt)


@kl.reward(bounds=(0, 1))
def many_c(texts: list[str]) -> list[float]:
    """How many characters are 'c', over the longest length (so 1 only for "ccccc")."""
    return [t.count("c") / MAX_TOKENS for t in texts]


def targets(lm: LM) -> dict[str, kl.Model]:
    """The three benchmark targets over ``lm`` (build them from the counting LM)."""
    p = kl.prior(lm, max_tokens=MAX_TOKENS)
    return {
        "soft": p * kl.exp(many_c / BETA),
        "hard": p | kl.contains("aab"),
        "mixed": p * kl.exp(many_c / BETA) | kl.contains("ab"),
    }


# --- accuracy of one run ---------------------------------------------------------------------
def run_engine(
    model: kl.Model, engine: str, n: int, seed: int, proposal: LM | None
) -> kl.Samples | None:
    """One run; None when no sample had p̃ > 0 (importance with a tiny budget)."""
    name = "importance" if engine == "importance+fit" else engine
    # n/16 chains (4 to 64): one forward pass serves every chain, so large n runs faster
    chains = min(max(n // 16, MCMC_CHAINS[0]), MCMC_CHAINS[1])
    options = {"chains": chains} if engine == "mcmc" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MCMC's R-hat warning at small n is expected
        try:
            return kl.infer(
                model,
                engine=name,
                n=n,
                seed=seed,
                proposal=proposal,
                batch_size=min(n, MAX_BATCH),
                progress=False,
                **options,
            )
        except KldslInferenceError:
            return None


def measure_run(
    model: kl.Model,
    engine: str,
    n: int,
    seed: int,
    proposal: LM | None,
    counter: Counter,
    exact: dict[tuple[int, ...], float],
    log_z: float,
) -> dict[str, Any]:
    before, start = counter.passes, time.perf_counter()
    samples = run_engine(model, engine, n, seed, proposal)
    row: dict[str, Any] = {
        "n": n,
        "seed": seed,
        "passes": counter.passes - before,
        "seconds": time.perf_counter() - start,
    }
    if samples is None:
        return {**row, "failed": True, "log_z_error": None, "tv": None}
    return {
        **row,
        "failed": False,
        "log_z": samples.log_z,
        "log_z_error": abs(samples.log_z - log_z) if math.isfinite(samples.log_z) else None,
        "tv": weights.tv_distance(exact, samples.distribution()),
        "ess": samples.ess,
        **({"chains": samples.info["chains"]} if engine == "mcmc" else {}),
        "samples": len(samples),
        "n_proposed": samples.n_proposed,
    }


# --- sweeps ----------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed means at one budget (failed runs are counted, left out of the means)."""
    ok = [r for r in runs if not r["failed"]]
    errors = [r["log_z_error"] for r in ok if r["log_z_error"] is not None]
    return {
        "n": runs[0]["n"],
        "passes": statistics.mean(r["passes"] for r in runs),
        "seconds": statistics.mean(r["seconds"] for r in runs),
        "log_z_error": statistics.mean(errors) if errors else None,
        "tv": statistics.mean(r["tv"] for r in ok) if ok else None,
        "failed": len(runs) - len(ok),
        "runs": runs,
    }


def sweep(
    model: kl.Model,
    engine: str,
    proposal: LM | None,
    counter: Counter,
    exact: dict[tuple[int, ...], float],
    log_z: float,
    seeds: Sequence[int],
    pass_cap: int,
) -> list[dict[str, Any]]:
    """Budgets n = N_START · 4^k, each over every seed, until the next budget (about 4× the
    seed-mean passes of this one) would spend more than ``pass_cap``."""
    points = []
    n = N_START
    while True:
        runs = [
            measure_run(model, engine, n, seed, proposal, counter, exact, log_z) for seed in seeds
        ]
        points.append(summarise(runs))
        if points[-1]["passes"] * 4 > pass_cap:
            return points
        n *= 4


def passes_to_reach(points: list[dict[str, Any]], key: str, goal: float) -> float | None:
    """Passes from which the seed-mean ``key`` stays below ``goal`` at every larger budget,
    interpolated log-log between the last budget above it and the next (None when the
    largest budget is still above it). A lucky small budget does not count."""
    above = [i for i, p in enumerate(points) if p[key] is None or p[key] >= goal]
    if above and above[-1] == len(points) - 1:
        return None
    if not above:
        return points[0]["passes"]
    lo, hi = points[above[-1]], points[above[-1] + 1]
    if lo[key] is None:
        return hi["passes"]
    x0, x1 = math.log(lo["passes"]), math.log(hi["passes"])
    y0, y1 = math.log(lo[key]), math.log(max(hi[key], 1e-12))
    t = (y0 - math.log(goal)) / (y0 - y1)
    return math.exp(x0 + t * (x1 - x0))


def fine_tune(
    model: kl.Model, counter: Counter, steps: int, exact: dict[tuple[int, ...], float]
) -> tuple[LM, dict[str, Any]]:
    """A proposal fine-tuned toward ``model`` by the variational engine, its training cost,
    and its exact distance to p* (by enumeration, not counted as cost)."""
    before, start = counter.passes, time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reverse KL on soft targets: nothing to warn about
        fit = kl.infer(
            model,
            engine="variational",
            steps=steps,
            batch_size=FIT_BATCH,
            lr=FIT_LR,
            seed=0,
            progress=False,
        )
    passes, seconds = counter.passes - before, time.perf_counter() - start
    toy = fit.model.model  # the fine-tuned ToyLM inside the counting wrapper: uncounted
    return fit.model, {
        "objective": fit.objective,
        "steps": steps,
        "batch_size": FIT_BATCH,
        "lr": FIT_LR,
        "passes": passes,
        "seconds": seconds,
        **proposal_quality(toy, exact),
        "best_bigram_kl_p_q": best_bigram_kl(toy.vocab_size, exact),
        "prior_kl_p_q": proposal_quality(kl.ToyLM(vocab=VOCAB, seed=LM_SEED), exact)["kl_p_q"],
    }


def proposal_quality(q: LM, exact: dict[tuple[int, ...], float]) -> dict[str, float]:
    """Exact KL(p*‖q) and the ESS fraction 1/E_q[(p*/q)²] importance sampling from q gets."""
    support = [seq for seq, p in exact.items() if p > 0]
    log_p = torch.tensor([math.log(exact[seq]) for seq in support], dtype=torch.float64)
    log_q = q.score([list(seq) for seq in support])
    return {
        "kl_p_q": float((log_p.exp() * (log_p - log_q)).sum()),
        "ess_fraction": float(1.0 / torch.exp(torch.logsumexp(2 * log_p - log_q, 0))),
    }


def best_bigram_kl(vocab_size: int, exact: dict[tuple[int, ...], float]) -> float:
    """KL(p*‖q) of the best proposal a ToyLM (a bigram LM) can be: the forward-KL optimum,
    whose next-token table is p*'s expected transition counts, normalised per row."""
    start = vocab_size  # the ToyLM's start-state row
    counts = torch.zeros(vocab_size + 1, vocab_size, dtype=torch.float64)
    for seq, p in exact.items():
        for prev, tok in zip((start, *seq[:-1]), seq):
            counts[prev, tok] += p
    log_table = torch.log(counts / counts.sum(1, keepdim=True).clamp(min=1e-300))
    total = 0.0
    for seq, p in exact.items():
        if p > 0:
            log_q = sum(float(log_table[prev, tok]) for prev, tok in zip((start, *seq[:-1]), seq))
            total += p * (math.log(p) - log_q)
    return total


def exact_posterior(model: kl.Model) -> tuple[dict[tuple[int, ...], float], float, int]:
    s = kl.infer(model, engine="exact")
    return s.distribution(), s.log_z, len(s)


# --- plot ------------------------------------------------------------------------------------
def plot(name: str, model: str, result: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        ("log_z_error", "|log Ẑ − log Z|", LOG_Z_GOAL),
        ("tv", "TV(p*, samples)", TV_GOAL),
    )
    for ax, (key, label, goal) in zip(axes, panels):
        for engine, points in result["engines"].items():
            shown = [p for p in points if p[key] is not None and p[key] > 0]
            if not shown:
                continue
            legend = engine
            if engine == "importance+fit":
                legend += f" (+{result['fit']['passes']:,} training passes)"
            (line,) = ax.plot(
                [p["passes"] for p in shown], [p[key] for p in shown], marker="o", label=legend
            )
            hollow = [p for p in shown if p["failed"]]
            ax.scatter(
                [p["passes"] for p in hollow],
                [p[key] for p in hollow],
                s=110,
                facecolors="none",
                edgecolors=line.get_color(),
            )
        ax.axhline(goal, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("token forward passes (mean over seeds)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
    axes[0].set_title(
        "mcmc has no Ẑ of its own: mean w of the sequences it drew whole from the prior;\n"
        "a ring: some seeds found no p̃ > 0 (left out of the mean)",
        fontsize=8,
    )
    axes[1].set_title("TV of accepted/kept samples, or of importance weights", fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle(
        f"{name}: {model}   (log Z = {result['log_z']:.4f}, seeds {list(result['seeds'])})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------
def headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per target: the fewest passes to TV < 0.1 and to |Δlog Z| < 0.05, and by which engine."""
    rows = []
    for name, result in results.items():
        for key, label in (("tv", f"TV < {TV_GOAL}"), ("log_z_error", f"|Δlog Z| < {LOG_Z_GOAL}")):
            reached = {e: v for e, v in result["passes_to"][key].items() if v is not None}
            best = min(reached, key=reached.__getitem__) if reached else None
            note = f" ({best})" if best else ""
            if best == "importance+fit":
                note = f" (importance+fit; +{result['fit']['passes']:,} training passes)"
            rows.append(
                {
                    "name": f"{name}: fewest passes to {label}{note}",
                    "value": round(reached[best]) if best else "not reached",
                    "unit": "passes" if best else "",
                    "target": None,
                    "met": None,
                }
            )
    return rows


def main(quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    settings = QUICK if quick else FULL
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name in ("soft", "hard", "mixed"):
        counter = Counter()
        lm = CountingLM(kl.ToyLM(vocab=VOCAB, seed=LM_SEED), counter)
        model = targets(lm)[name]
        exact, log_z, support = exact_posterior(model)
        proposal, fit_info = fine_tune(model, counter, settings["fit_steps"], exact)
        engines: dict[str, list[dict[str, Any]]] = {}
        for engine in ENGINES:
            engines[engine] = sweep(
                model,
                engine,
                proposal if engine == "importance+fit" else None,
                counter,
                exact,
                log_z,
                settings["seeds"],
                settings["pass_cap"],
            )
            last = engines[engine][-1]
            error, dist = (
                "—" if last[k] is None else f"{last[k]:.4f}" for k in ("log_z_error", "tv")
            )
            print(
                f"  {name:5s} {engine:15s} n≤{last['n']:6d} passes {last['passes']:9.0f}  "
                f"|Δlog Z| {error}  TV {dist}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        result = {
            "model": str(model),
            "log_z": log_z,
            "z": math.exp(log_z),
            "support": support,
            "seeds": list(settings["seeds"]),
            "fit": fit_info,
            "engines": engines,
        }
        result["passes_to"] = {
            key: {e: passes_to_reach(points, key, goal) for e, points in engines.items()}
            for key, goal in (("tv", TV_GOAL), ("log_z_error", LOG_Z_GOAL))
        }
        results[name] = result
        RESULTS.mkdir(parents=True, exist_ok=True)
        plot(name, str(model), result, RESULTS / f"accuracy_{name}.png")
    payload = {
        "settings": {
            "quick": quick,
            "toy_lm": {"vocab": VOCAB, "seed": LM_SEED, "max_tokens": MAX_TOKENS},
            "seeds": list(settings["seeds"]),
            "pass_cap": settings["pass_cap"],
            "n_start": N_START,
            "max_batch": MAX_BATCH,
            "mcmc_chains": "n/16, at least 4, at most 64",
            "fit": {"batch_size": FIT_BATCH, "lr": FIT_LR, "steps": settings["fit_steps"]},
            "goals": {"tv": TV_GOAL, "log_z_error": LOG_Z_GOAL},
            "seconds": time.perf_counter() - started,
        },
        "targets": results,
    }
    payload["headline"] = headline(results)
    write("accuracy", payload)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    out = main(args.quick)
    for row in out["headline"]:
        print(f"{row['name']}: {row['value']}")
