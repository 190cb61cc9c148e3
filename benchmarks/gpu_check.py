"""A prepared check for a machine with an NVIDIA GPU: both runtimes on the embedded model.

1. The hf runtime on ``cuda`` in float32 and bfloat16: sampling's log-probs against the
   float32 CPU scorer of the same sequences (float32: 1e-3 per sequence; bfloat16: 0.05
   per token, tests/test_hf.py derives it), and no full-vocabulary row copied to the host
   per step (draw inverts the CDF on the GPU).
2. The vllm runtime (where vLLM imports) in float32 and bfloat16, against the same scorer.
3. benchmarks/sampling_speed on the GPU, once per dtype (both runtimes side by side).

    python -m benchmarks.gpu_check            # from the repository root, vLLM installed
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

PROMPT = "Once upon a time"
N, TOKENS = 64, 32
TOL = {"float32": 1e-3, "bfloat16": 0.05 * TOKENS}  # per sequence


def check(name: str, log_probs: torch.Tensor, scored: torch.Tensor, dtype: str) -> dict:
    gap = float((log_probs - scored).abs().max())
    return {"check": name, "max_gap": gap, "tolerance": TOL[dtype], "ok": gap < TOL[dtype]}


def main() -> int:
    import kldsl as kl
    from kldsl import vllm

    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: this check is for a GPU machine", file=sys.stderr)
        return 2
    reference = kl.resolve("smollm2")  # float32 on the CPU
    rows = []
    for dtype in ("float32", "bfloat16"):
        lm = kl.resolve("smollm2", device="cuda", dtype=dtype)
        batch = lm.sample(N, TOKENS, prompt=PROMPT, seed=0)
        rows.append(
            check(
                f"hf cuda {dtype}",
                batch.log_probs,
                reference.score(batch.ids, prompt=PROMPT),
                dtype,
            )
        )
        if vllm.available() is None:
            fast = kl.resolve("smollm2", runtime="vllm", dtype=dtype)
            batch = fast.sample(N, TOKENS, prompt=PROMPT, seed=0)
            scored = reference.score(batch.ids, prompt=PROMPT)
            rows.append(check(f"vllm {dtype}", batch.log_probs, scored, dtype))
            prefixes = [fast.context_ids(PROMPT), fast.context_ids("The cat")]
            gap = (fast.next_logprobs(prefixes) - reference.next_logprobs(prefixes)).abs()
            rows.append(check(f"vllm {dtype} next_logprobs", gap.max(), torch.tensor(0.0), dtype))
    for row in rows:
        print(json.dumps(row))
    for dtype in ("float32", "bfloat16"):  # a fresh process per dtype: one vLLM engine each
        command = [sys.executable, "-m", "benchmarks.sampling_speed", "--device", "cuda"]
        subprocess.run([*command, "--dtype", dtype, "--repeats", "3"], check=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
