"""Which fine-tuning objective when: exact divergences on enumerable targets, Z large to small.

Four ToyLM targets — a soft tilt, and hard constraints with Z = 0.63, 0.011 and 0.00093
(computed by enumeration) — fine-tuned by ``reverse_kl`` (the softened target, penalty
10), ``forward_kl`` and ``js`` (importance draws of the proposal q), ``forward_kl`` from
``rejection`` samples, and, at the two small Z, the low-ESS variants of ``forward_kl``:
skipping steps whose weights have an ESS below 1 (``min_ess=1``) and replacing q whenever
one fresh batch favours π (``swap_every=1, swap_z=0, swap_min_ess=0``). Every result is
exact: KL(p*‖π), KL(π‖a) and π's mass on the constraint by enumeration; the mean (and the
worst) over seeds at lr 0.1. Budget: 40 steps × 32 draws (× 128 at Z = 0.00093); the
rejection runs draw 32 exact samples a step, whatever that costs (``draws``; not at Z =
0.00093, where that is 1.4 million draws a run). About 5 minutes on a free 2-core machine;
``--quick``: 2 seeds, the two small-Z targets.

    python -m benchmarks.objectives [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

import kldsl as kl
from benchmarks.common import measure, write
from kldsl.exact_oracle import exact_divergences


@kl.reward
def count_a(texts: list[str]) -> list[float]:
    """Occurrences of the letter a."""
    return [float(t.count("a")) for t in texts]


def _toy(vocab: str) -> kl.ToyLM:
    return kl.ToyLM(vocab=vocab, seed=0)


TARGETS: dict[str, tuple[Callable[[], kl.Model], int]] = {  # name: (model, batch_size)
    "soft": (lambda: kl.prior(_toy("abc"), max_tokens=4) * kl.exp(count_a / 0.5), 32),
    "hard, Z = 0.63": (lambda: kl.prior(_toy("abc"), max_tokens=4) | kl.regex("^a"), 32),
    "hard, Z = 0.011": (lambda: kl.prior(_toy("abcde"), max_tokens=5) | kl.contains("ab"), 32),
    "hard, Z = 0.00093": (
        lambda: kl.prior(_toy("abcd"), max_tokens=5) | kl.contains("abc"),
        128,
    ),
}
RUNS: dict[str, dict[str, Any]] = {
    "reverse_kl": {"objective": "reverse_kl"},
    "forward_kl": {"objective": "forward_kl"},
    "js": {"objective": "js"},
    "forward_kl, rejection": {
        "objective": "forward_kl",
        "sampler": "rejection",
        "sampler_options": {"batch_size": 256},
    },
    "forward_kl, skip ESS < 1": {"objective": "forward_kl", "min_ess": 1.0},
    "forward_kl, one-batch swap": {
        "objective": "forward_kl",
        "swap_every": 1,
        "swap_z": 0.0,
        "swap_min_ess": 0.0,
    },
}
LOW_ESS = ("forward_kl, skip ESS < 1", "forward_kl, one-batch swap")


def constraint_mass(lm: kl.LM, model: kl.Model) -> float:
    """π's exact probability of the sequences p* supports."""
    base = model.base()
    every = lm.enumerate(base.max_tokens, prompt=base.prompt)
    log_p = model.log_density(every.ids).log_p
    return float(every.log_probs.exp()[torch.isfinite(log_p)].sum())


def one(model: kl.Model, options: dict[str, Any], batch_size: int, seeds: int) -> dict[str, Any]:
    fits = []
    for seed in range(seeds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reverse_kl's finite-penalty warning
            fits.append(
                kl.infer(
                    model,
                    engine="variational",
                    steps=40,
                    batch_size=batch_size,
                    lr=0.1,
                    seed=seed,
                    progress=False,
                    **options,
                )
            )
    exact = [exact_divergences(f.model, model) for f in fits]
    kls = [d["kl_p_pi"] for d in exact]
    return {
        "kl_p_pi": statistics.mean(kls),
        "kl_p_pi_worst": max(kls),
        "kl_pi_a": statistics.mean(d["kl_pi_a"] for d in exact),
        "constraint_mass": statistics.mean(constraint_mass(f.model, model) for f in fits),
        "draws": statistics.mean(sum(r["draws"] for r in f.history) for f in fits),
        "proposal_updates": [f.info["proposal_updates"] for f in fits],
    }


def main(quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    seeds = 2 if quick else 3
    names = list(TARGETS)[2:] if quick else list(TARGETS)
    rows = []
    for name in names:
        make, batch_size = TARGETS[name]
        model = make()
        start = exact_divergences(kl.resolve(model.base()), model)
        for run, options in RUNS.items():
            hard = bool(model.conditions())
            if "rejection" in run and (not hard or start["log_z"] < -6):
                continue  # a constraint to reject on, and 1/Z draws a sample one can afford
            if run in LOW_ESS and start["log_z"] > -3:
                continue  # the low-ESS variants matter at small Z only
            size = 32 if "rejection" in run else batch_size
            seconds, _, out = measure(partial(one, model, options, size, seeds))
            row = {
                "target": name,
                "z": math.exp(start["log_z"]),
                "start_kl_p_pi": start["kl_p_pi"],
                "run": run,
                **out,
                "seconds": seconds,
            }
            rows.append(row)
            print(
                f"{name:18s} {run:28s} KL(p*‖π) {out['kl_p_pi']:.3f} (worst "
                f"{out['kl_p_pi_worst']:.3f}, start {start['kl_p_pi']:.3f})  π(c) "
                f"{out['constraint_mass']:.3f}  KL(π‖a) {out['kl_pi_a']:.2f}  draws "
                f"{out['draws']:.0f}",
                flush=True,
            )
    payload = {
        "settings": {"quick": quick, "seeds": seeds, "steps": 40, "lr": 0.1},
        "rows": rows,
        "headline": headline(rows),
    }
    write("objectives", payload)
    return payload


def headline(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target: the three objectives' mean exact KL(p*‖π), read against the start's.

    >>> row = {"target": "t", "start_kl_p_pi": 2.0}
    >>> headline([{**row, "run": "js", "kl_p_pi": 1.0}])[0]["value"]
    'js 1.000 (start 2.000)'
    """
    out = []
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = [
            r
            for r in rows
            if r["target"] == target and r["run"] in ("forward_kl", "js", "reverse_kl")
        ]
        start = mine[0]["start_kl_p_pi"]
        out.append(
            {
                "name": f"{target}: exact KL(p*‖π) nat after 40 steps, mean over seeds",
                "value": ", ".join(f"{r['run']} {r['kl_p_pi']:.3f}" for r in mine)
                + f" (start {start:.3f})",
                "target": "each below the start",
                "met": all(r["kl_p_pi"] < start for r in mine),
            }
        )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
