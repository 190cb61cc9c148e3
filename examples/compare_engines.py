"""Run one .kl model with the importance, MCMC and exact engines and compare them.

The model (``toy_target.kl``) uses a ToyLM small enough to enumerate, so the exact engine
gives the truth; the table shows each engine's log Z, reward means, constraint rates and
total-variation distance of its sample distribution to the exact posterior.

    python examples/compare_engines.py            # 2000 samples per engine
    python examples/compare_engines.py --n 500
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import kldsl as kl
from kldsl import weights

TARGET = Path(__file__).with_name("toy_target.kl")
ENGINES = ("importance", "mcmc", "exact")


def main(n: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Print the three engines side by side; return their numbers by engine."""
    model = kl.load(TARGET, env={"toy": kl.ToyLM(vocab="ab ", seed=0)})
    runs: dict[str, kl.Samples] = {}
    seconds: dict[str, float] = {}
    for name in ENGINES:
        start = time.perf_counter()
        runs[name] = kl.infer(model, engine=name, n=n, seed=seed, progress=False)
        seconds[name] = time.perf_counter() - start
    truth = runs["exact"].distribution()
    results: dict[str, dict[str, float]] = {}
    for name, s in runs.items():
        row = {"log Z": s.log_z, "log Z se": s.log_z_se}
        row.update({f"mean {k}": s.reward_mean(k) for k in s.rewards})
        row.update({f"rate {k}": s.constraint_rate(k) for k in s.constraints})
        row["tv"] = weights.tv_distance(s.distribution(), truth)
        row["samples"] = len(s)
        row["proposals"] = s.n_proposed
        row["seconds"] = seconds[name]
        results[name] = row

    print(f"model: {model}")
    print(f"{'':>24}" + "".join(f"{name:>14}" for name in ENGINES))
    for key in results["exact"]:
        cells = "".join(f"{_fmt(results[name][key]):>14}" for name in ENGINES)
        label = "TV to exact" if key == "tv" else key
        print(f"{label:>24}{cells}")
    mc = runs["mcmc"]
    print(
        f"mcmc: acceptance {', '.join(f'{k} {v:.2f}' for k, v in mc.info['acceptance'].items())}; "
        f"split R-hat max {mc.diagnostics['split R-hat (max)']:.3f}; "
        f"ESS min {mc.diagnostics['MCMC ESS (min)']:.0f} of {len(mc)}"
    )
    return results


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return "inf" if math.isinf(value) else f"{value:.4f}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="samples per engine (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.n, args.seed)
