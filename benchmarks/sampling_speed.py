"""Benchmark 1: kldsl's sampler against transformers' ``generate`` on the embedded model.

Pure ancestral sampling (temperature 1, no top-k/top-p) of N sequences × 32 new tokens,
(a) after a short prompt, N=32, and (b) after a 256-token prompt, N=64. kldsl runs the
prompt once and broadcasts its KV cache, drops finished rows, and returns exact log-probs
from the same passes; ``generate`` recomputes the prompt per row. Also timed:
``generate`` followed by re-scoring (what it costs to get log-probs that way).
Each repeat times both back to back (alternating which goes first); the reported ratio is
the median of the per-repeat ratios, measured side by side in one process.

    python -m benchmarks.sampling_speed [--quick]
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import torch

from benchmarks.common import measure, median, write
from kldsl.models import load_lm

SHORT_PROMPT = "I just got back from a trip to"
NEW_TOKENS = 32
PARAGRAPH = (
    "The committee met on Tuesday to review the budget for the coming year. After a long "
    "discussion about maintenance, staffing and the new library wing, the members agreed "
    "to postpone the vote until the auditors had finished their report. "
)


def long_prompt(lm: Any, tokens: int = 256) -> str:
    """A prompt whose context (BOS included) is about ``tokens`` tokens long."""
    text = PARAGRAPH * 20
    ids = lm.encode(text)[: tokens - 1]
    return lm.decode(ids)


def run_generate(lm: Any, prompt: str, n: int, seed: int) -> list[list[int]]:
    context = torch.tensor([lm.context_ids(prompt)] * n)
    torch.manual_seed(seed)
    out = lm.model.generate(
        input_ids=context,
        attention_mask=torch.ones_like(context),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=NEW_TOKENS,
        pad_token_id=lm.eos_id,
        eos_token_id=lm.eos_id,
    )
    seqs = []
    for row in out[:, context.shape[1] :].tolist():
        cut = row.index(lm.eos_id) + 1 if lm.eos_id in row else len(row)
        seqs.append(row[:cut])
    return seqs


def case(lm: Any, name: str, prompt: str, n: int, repeats: int) -> dict[str, Any]:
    rows: dict[str, list[tuple[float, int, int]]] = {
        "kldsl": [],
        "generate": [],
        "generate+score": [],
    }
    for r in range(repeats):
        seed = 1000 + r
        runs = {
            "kldsl": partial(lm.sample, n, NEW_TOKENS, prompt=prompt, seed=seed),
            "generate": partial(run_generate, lm, prompt, n, seed),
        }
        # alternate which goes first, so a change in machine load hits both alike
        for method in ("kldsl", "generate") if r % 2 == 0 else ("generate", "kldsl"):
            t, mem, result = measure(runs[method])
            seqs = result.ids if method == "kldsl" else result
            rows[method].append((t, mem, sum(len(s) for s in seqs)))
            if method == "generate":
                t2, mem2, _ = measure(partial(lm.score, seqs, prompt=prompt))
                rows["generate+score"].append((t + t2, max(mem, mem2), rows[method][-1][2]))
    out: dict[str, Any] = {
        "case": name,
        "n": n,
        "new_tokens": NEW_TOKENS,
        "context_tokens": len(lm.context_ids(prompt)),
    }
    for method, values in rows.items():
        seconds = median([v[0] for v in values])
        tokens = median([v[2] for v in values])
        out[method] = {
            "seconds": seconds,
            "all_seconds": [v[0] for v in values],
            "tokens_per_s": tokens / seconds,
            "peak_mb": max(v[1] for v in values) / 2**20,
        }
    # the median of ratios paired within a repeat (the two ran back to back)
    out["ratio_kldsl_vs_generate"] = median(
        [a[0] / b[0] for a, b in zip(rows["kldsl"], rows["generate"])]
    )
    out["ratio_generate_score_vs_generate"] = median(
        [a[0] / b[0] for a, b in zip(rows["generate+score"], rows["generate"])]
    )
    return out


def plot(results: list[dict[str, Any]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["kldsl", "generate", "generate+score"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.27
    for j, method in enumerate(methods):
        xs = [i + (j - 1) * width for i in range(len(results))]
        ax.bar(xs, [r[method]["seconds"] for r in results], width, label=method)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels(
        [f"{r['case']}\n(N={r['n']}, context {r['context_tokens']})" for r in results]
    )
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"SmolLM2-135M, {NEW_TOKENS} new tokens, pure sampling", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(2)
    lm = load_lm("smollm2")
    repeats = 1 if quick else 5
    lm.sample(2, 4, prompt=SHORT_PROMPT, seed=0)  # warm-up
    results = [
        case(lm, "short prompt", SHORT_PROMPT, 32, repeats),
        case(lm, "256-token prompt", long_prompt(lm), 16 if quick else 64, repeats),
    ]
    targets = {"short prompt": 1.00, "256-token prompt": 0.35}
    for r in results:
        r["target_ratio"] = targets[r["case"]]
        r["met"] = r["ratio_kldsl_vs_generate"] <= r["target_ratio"]
    headline = []
    for r in results:
        headline.append(
            {
                "name": f"{r['case']}: kldsl time / generate time (N={r['n']})",
                "value": round(r["ratio_kldsl_vs_generate"], 3),
                "target": f"≤ {r['target_ratio']:.2f}",
                "met": r["met"],
            }
        )
        headline.append(
            {
                "name": f"{r['case']}: (generate + re-score) / generate",
                "value": round(r["ratio_generate_score_vs_generate"], 3),
                "target": None,
                "met": None,
            }
        )
    payload = {
        "settings": {"repeats": repeats, "quick": quick},
        "results": results,
        "headline": headline,
    }
    path = write("sampling_speed", payload)
    plot(results, path.with_suffix(".png"))
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for r in main(args.quick)["results"]:
        print(
            f"{r['case']}: kldsl {r['kldsl']['seconds']:.1f} s, generate "
            f"{r['generate']['seconds']:.1f} s, ratio {r['ratio_kldsl_vs_generate']:.2f} "
            f"(target ≤ {r['target_ratio']:.2f})"
        )
