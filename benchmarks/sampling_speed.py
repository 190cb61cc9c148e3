"""Benchmark 1: kldsl's sampler against transformers' ``generate`` on the embedded model.

Pure ancestral sampling (temperature 1, no top-k/top-p) of N sequences × 32 new tokens,
(a) after a short prompt, N=32, and (b) after a 256-token prompt, N=64. kldsl runs the
prompt once and broadcasts its KV cache, drops finished rows, and returns exact log-probs
from the same passes; ``generate`` recomputes the prompt per row. Also timed:
``generate`` followed by re-scoring (what it costs to get log-probs that way).
Each repeat times both back to back (alternating which goes first); the reported ratio is
the median of the per-repeat ratios, measured side by side in one process.

Where vLLM imports (the vLLM environment of ``make setup-vllm``), the same repeats also
time kldsl on the vllm runtime (:class:`kldsl.VLLM`: one seeded request per sequence, with
the log-probs) and raw vLLM ``generate`` on the same engine (one request for all N
sequences, with the drawn tokens' log-probs: the same work), float32, vLLM's default
(compiled) engine unless ``--eager``.

    python -m benchmarks.sampling_speed [--quick] [--eager] [--repeats N] [--device D] [--dtype T]
    .venv-vllm/bin/python -m benchmarks.sampling_speed      # both runtimes side by side
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
    context = torch.tensor([lm.context_ids(prompt)] * n, device=lm.device)
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


def run_vllm_generate(fast: Any, prompt: str, n: int, seed: int) -> list[list[int]]:
    """Raw vLLM: one request for n sequences, with the drawn tokens' log-probs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        n=n,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_tokens=NEW_TOKENS,
        ignore_eos=True,
        stop_token_ids=[fast.eos_id],
        logprobs=0,
        seed=seed,
        detokenize=False,
    )
    (out,) = fast.engine.generate(
        [TokensPrompt(prompt_token_ids=fast.context_ids(prompt))], params, use_tqdm=False
    )
    return [list(c.token_ids) for c in out.outputs]


def case(lm: Any, name: str, prompt: str, n: int, repeats: int, fast: Any = None) -> dict[str, Any]:
    rows: dict[str, list[tuple[float, int, int]]] = {
        "kldsl": [],
        "generate": [],
        "generate+score": [],
    }
    if fast is not None:
        rows.update({"kldsl-vllm": [], "vllm-generate": []})
    for r in range(repeats):
        seed = 1000 + r
        runs = {
            "kldsl": partial(lm.sample, n, NEW_TOKENS, prompt=prompt, seed=seed),
            "generate": partial(run_generate, lm, prompt, n, seed),
        }
        if fast is not None:
            runs["kldsl-vllm"] = partial(fast.sample, n, NEW_TOKENS, prompt=prompt, seed=seed)
            runs["vllm-generate"] = partial(run_vllm_generate, fast, prompt, n, seed)
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        # alternate the order, so a change in machine load hits every method alike
        for method in order:
            if "vllm" in method:  # each vLLM run computes the prompt itself: a cold cache
                fast.engine.reset_prefix_cache()
            t, mem, result = measure(runs[method])
            seqs = getattr(result, "ids", result)
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
    if fast is not None:
        for a, b in (("kldsl-vllm", "vllm-generate"), ("kldsl-vllm", "generate")):
            out[f"ratio_{a}_vs_{b}"] = median([x[0] / y[0] for x, y in zip(rows[a], rows[b])])
    return out


METHODS = ("kldsl", "generate", "generate+score", "kldsl-vllm", "vllm-generate")


def plot(results: list[dict[str, Any]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m in results[0]]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(results))]
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


def main(
    quick: bool = False,
    eager: bool = False,
    repeats: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    from kldsl import vllm

    fast = None
    if vllm.available() is None:  # before torch sets its threads: vLLM binds its own
        fast = vllm.load("smollm2", enforce_eager=eager, dtype=dtype)
        fast.sample(2, 4, prompt=SHORT_PROMPT, seed=0)  # warm-up
    torch.set_num_threads(2)
    lm = load_lm("smollm2", device=device, dtype=dtype) if device or dtype else load_lm("smollm2")
    repeats = repeats or (1 if quick else 5)
    lm.sample(2, 4, prompt=SHORT_PROMPT, seed=0)  # warm-up
    results = [
        case(lm, "short prompt", SHORT_PROMPT, 32, repeats, fast),
        case(lm, "256-token prompt", long_prompt(lm), 16 if quick else 64, repeats, fast),
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
    for r in results if fast is not None else []:
        headline.append(
            {
                "name": f"{r['case']}: kldsl on vLLM / raw vLLM generate (N={r['n']})",
                "value": round(r["ratio_kldsl-vllm_vs_vllm-generate"], 3),
                "target": "≤ 1.15",
                "met": r["ratio_kldsl-vllm_vs_vllm-generate"] <= 1.15,
            }
        )
        headline.append(
            {
                "name": f"{r['case']}: kldsl on vLLM / HF generate (N={r['n']})",
                "value": round(r["ratio_kldsl-vllm_vs_generate"], 3),
                "target": None,
                "met": None,
            }
        )
    payload = {
        "settings": {
            "repeats": repeats,
            "quick": quick,
            "vllm": fast is not None,
            "eager": eager,
            "device": str(lm.device),
            "dtype": str(next(lm.model.parameters()).dtype),
        },
        "results": results,
        "headline": headline,
    }
    path = write("sampling_speed", payload)
    plot(results, path.with_suffix(".png"))
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--repeats", type=int, help="timed repeats (default 5, 1 with --quick)")
    parser.add_argument("--device", help="the hf runtime's device, e.g. cuda (default cpu)")
    parser.add_argument("--dtype", help="both runtimes' dtype, e.g. bfloat16 (default float32)")
    args = parser.parse_args()
    for r in main(args.quick, args.eager, args.repeats, args.device, args.dtype)["results"]:
        times = ", ".join(
            f"{m} {r[m]['seconds']:.2f} s ({r[m]['tokens_per_s']:.0f} tok/s)"
            for m in METHODS
            if m in r
        )
        print(f"{r['case']} (N={r['n']}): {times}")
        print(f"  kldsl / generate {r['ratio_kldsl_vs_generate']:.2f}", end="")
        if "ratio_kldsl-vllm_vs_vllm-generate" in r:
            print(
                f", kldsl-vllm / vllm-generate {r['ratio_kldsl-vllm_vs_vllm-generate']:.2f}, "
                f"kldsl-vllm / generate {r['ratio_kldsl-vllm_vs_generate']:.2f}",
                end="",
            )
        print()
