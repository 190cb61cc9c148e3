"""Benchmark 5: token-level SMC against importance sampling on the embedded SmolLM2.

Prompt "I just got back from a trip to", 32 tokens, n = 16 and 64 particles, several seeds;
importance sampling draws as many sequences as SMC has particles, so both spend about the
same token forwards (each reports its own count: SMC's include the context once and stop
for particles that died or finished).

1. lipogram ``| not contains("e")`` (lowercase e): smc direct, smc awrs with the paper's
   2 hits and with the engine's default 32, smc awrs with ``split_eos`` (ending summed
   over at every step, not sampled) and importance —
   share of final particles valid, log Ẑ mean and spread over seeds, ESS, wall time,
   token forwards. Targets: awrs keeps every final particle valid; log Ẑ spread (max − min
   over seeds) of smc awrs below 1 nat at n = 64.
2. flagship ``* exp(sentiment / 0.2) | not curse``: smc with and without ``twist="prefix"``
   (resampling at ESS < n/2, and at every step: ``ess_threshold=1``) and importance — ESS
   per 1,000 token forwards and the posterior mean sentiment with its spread over seeds. Target: smc ≥ 3× importance's ESS per token forward.
3. ``| contains("Paris")``: smc with the prior as proposal, and with benchmark 3's
   fine-tuned π when one is saved (the newest ``results/paris_fit*``).
4. speed: smc direct with 64 particles against importance sampling of 64 sequences on the
   flagship target, timed side by side. Target: ≤ 2× importance's wall time.

``--quick`` runs 12 tokens, n = 16 only (64 for the speed comparison), 2 seeds, one timing
pair and no Paris target: about 15 minutes on this shared 2-core machine under load (one
forward of 16 rows then takes about 2 s; the full run takes hours here).

    python -m benchmarks.smc [--quick] [--only lipogram flagship paris speed]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from typing import Any

import torch

import kldsl as kl
from benchmarks.common import RESULTS, write
from kldsl.models import load_lm

PROMPT = "I just got back from a trip to"
SPREAD_TARGET = 1.0  # nat: max − min of log Ẑ over seeds, smc awrs, n = 64
ESS_TARGET = 3.0  # × importance's ESS per 1,000 token forwards (flagship)
SPEED_TARGET = 2.0  # × importance's wall time, 64 particles


@dataclasses.dataclass(frozen=True)
class Settings:
    max_tokens: int = 32
    particles: tuple[int, ...] = (16, 64)
    seeds: int = 3
    flagship_particles: tuple[int, ...] = (16, 64)
    speed_seeds: int = 3
    paris: bool = True


FULL = Settings()
QUICK = Settings(
    max_tokens=12, particles=(16,), seeds=2, flagship_particles=(16,), speed_seeds=1, paris=False
)


def prior(s: Settings) -> kl.Model:
    return kl.prior("smollm2", prompt=PROMPT, max_tokens=s.max_tokens)


def one_run(model: kl.Model, engine: str, n: int, seed: int, **options: Any) -> dict[str, Any]:
    """One run's figures (a run in which no particle survives has log Ẑ = −inf)."""
    start = time.perf_counter()
    try:
        s = kl.infer(model, engine=engine, n=n, seed=seed, progress=False, **options)
    except kl.KldslInferenceError:  # every particle / draw has weight 0
        return {"valid": 0.0, "log_z": -math.inf, "ess": 0.0, "seconds": None, "forwards": None}
    seconds = time.perf_counter() - start
    forwards = s.diagnostics.get("token_forwards", sum(len(x) for x in s.ids))
    out = {
        "valid": float(torch.isfinite(s.log_weights).double().mean()),
        "log_z": s.log_z,
        "log_z_se": s.log_z_se,
        "ess": s.ess,
        "seconds": seconds,
        "forwards": int(forwards),
        "ess_per_1000": 1000.0 * s.ess / max(int(forwards), 1),
        "distinct": len(set(s.texts)),  # resampling's copies count once
    }
    if "sentiment" in s.rewards:
        out["sentiment"] = s.reward_mean("sentiment")
    if engine == "smc":
        out["resampling_steps"] = s.diagnostics["resampling_steps"]
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds, and the spread of log Ẑ (max − min, and sd)."""

    def mean(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None and math.isfinite(r[key])]
        return statistics.fmean(values) if values else None

    log_z = [r["log_z"] for r in runs]
    finite = [z for z in log_z if math.isfinite(z)]
    out = {
        k: mean(k)
        for k in ("valid", "ess", "seconds", "forwards", "ess_per_1000", "distinct", "sentiment")
        if any(k in r for r in runs)
    }
    out["log_z"] = log_z
    out["log_z_mean"] = statistics.fmean(finite) if len(finite) == len(log_z) else None
    out["log_z_spread"] = max(finite) - min(finite) if len(finite) == len(log_z) else None
    out["log_z_sd"] = statistics.stdev(finite) if len(finite) == len(log_z) > 1 else None
    if "sentiment" in out:
        values = [r["sentiment"] for r in runs if "sentiment" in r]
        out["sentiment_sd"] = statistics.stdev(values) if len(values) > 1 else None
    out["runs"] = runs
    return out


def compare(
    model: kl.Model,
    methods: dict[str, tuple[str, dict[str, Any]]],
    ns: tuple[int, ...],
    s: Settings,
) -> dict[str, Any]:
    """Each method (engine and options) at each n over the seeds, run side by side."""
    out: dict[str, Any] = {}
    for n in ns:
        for name, (engine, options) in methods.items():
            runs = [one_run(model, engine, n, seed, **options) for seed in range(s.seeds)]
            out[f"{name} n={n}"] = summarise(runs)
            row = out[f"{name} n={n}"]
            print(
                f"  {name:>14} n={n:<3} valid={row.get('valid')} log Ẑ={row['log_z_mean']} "
                f"spread={row['log_z_spread']} ESS={row.get('ess')} t={row.get('seconds')}",
                flush=True,
            )
    return out


def fine_tuned() -> tuple[Any, str] | None:
    """The newest fit benchmark 3 saved (``results/paris_fit*``), loaded as an LM."""
    saved = [p for p in RESULTS.glob("paris_fit*") if (p / "fit.json").is_file()]
    if not saved:
        return None
    path = max(saved, key=lambda p: (p / "fit.json").stat().st_mtime)
    return load_lm(str(path)), str(path)


def speed(model: kl.Model, n: int, seeds: int) -> dict[str, Any]:
    """Wall time of smc direct and of importance, alternating, n particles / sequences."""
    times: dict[str, list[float]] = {"smc": [], "importance": []}
    for seed in range(seeds):
        for engine in ("smc", "importance"):
            start = time.perf_counter()
            kl.infer(model, engine=engine, n=n, seed=seed, batch_size=n, progress=False)
            times[engine].append(time.perf_counter() - start)
    smc, imp = statistics.median(times["smc"]), statistics.median(times["importance"])
    return {"seconds": times, "smc": smc, "importance": imp, "ratio": smc / imp}


SECTIONS = ("lipogram", "flagship", "paris", "speed")


def run_section(name: str, s: Settings) -> dict[str, Any]:
    """One section's figures (see the module docstring)."""
    base = prior(s)
    flagship_model = base * kl.exp(kl.sentiment / 0.2) | ~kl.curse
    print(name, flush=True)
    if name == "lipogram":
        methods = {
            "smc direct": ("smc", {}),
            "smc awrs 2 hits": ("smc", {"token_sampler": "awrs", "awrs_hits": 2}),
            "smc awrs": ("smc", {"token_sampler": "awrs"}),
            "smc awrs split": ("smc", {"token_sampler": "awrs", "split_eos": True}),
            "importance": ("importance", {}),
        }
        return compare(base | ~kl.contains("e"), methods, s.particles, s)
    if name == "flagship":
        methods = {
            "smc": ("smc", {}),
            "smc twist": ("smc", {"twist": "prefix"}),
            "smc twist every step": ("smc", {"twist": "prefix", "ess_threshold": 1.0}),
            "importance": ("importance", {}),
        }
        return compare(flagship_model, methods, s.flagship_particles, s)
    if name == "paris":
        methods: dict[str, tuple[str, dict[str, Any]]] = {
            "smc prior": ("smc", {}),
            "importance": ("importance", {}),
        }
        fit = fine_tuned()
        if fit is not None:
            methods["smc fine-tuned"] = ("smc", {"proposal": fit[0]})
        out = compare(base | kl.contains("Paris"), methods, (s.particles[-1],), s)
        return {**out, "fine_tuned_proposal": None if fit is None else fit[1]}
    return speed(flagship_model, 64, s.speed_seeds)


def headline(sections: dict[str, Any], s: Settings) -> list[dict[str, Any]]:
    rows = []
    n_top, nf = s.particles[-1], s.flagship_particles[-1]
    for method in ("smc awrs", "smc awrs split"):
        awrs = sections.get("lipogram", {}).get(f"{method} n={n_top}")
        if awrs is None:
            continue
        spread = awrs["log_z_spread"]
        rows += [
            {
                "name": f"lipogram: {method} valid share (n={n_top})",
                "value": awrs["valid"],
                "target": 1.0,
                "met": awrs["valid"] == 1.0,
            },
            {
                "name": f"lipogram: {method} log Ẑ spread over {s.seeds} seeds (n={n_top})",
                "value": spread,
                "unit": "nat",
                "target": f"< {SPREAD_TARGET}",
                "met": spread is not None and spread < SPREAD_TARGET,
            },
        ]
    if "flagship" in sections:
        f = sections["flagship"]
        best = max(
            f[f"{m} n={nf}"]["ess_per_1000"] or 0.0
            for m in ("smc", "smc twist", "smc twist every step")
        )
        imp = f[f"importance n={nf}"]["ess_per_1000"] or 0.0
        ratio = best / imp if imp > 0 else None
        rows.append(
            {
                "name": f"flagship: smc ESS per token forward / importance's (n={nf})",
                "value": ratio,
                "unit": "×",
                "target": f"≥ {ESS_TARGET}",
                "met": None if ratio is None else ratio >= ESS_TARGET,
            }
        )
    if "speed" in sections:
        ratio = sections["speed"]["ratio"]
        rows.append(
            {
                "name": f"speed: smc direct / importance wall time (64 × {s.max_tokens} tokens)",
                "value": ratio,
                "unit": "×",
                "target": f"≤ {SPEED_TARGET}",
                "met": ratio <= SPEED_TARGET,
            }
        )
    return rows


def main(
    quick: bool = False, settings: Settings | None = None, only: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run the sections (``only``: some of them, merged into the results file of earlier
    runs with the same settings, so sections can run in separate processes)."""
    s = settings or (QUICK if quick else FULL)
    load_lm("smollm2")  # loaded once, before anything is timed
    names = only or tuple(n for n in SECTIONS if n != "paris" or s.paris)
    sections: dict[str, Any] = {}
    path = RESULTS / "smc.json"
    if only and path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("settings") == json.loads(json.dumps(dataclasses.asdict(s))):
            sections = stored.get("sections", {})
    for name in names:
        sections[name] = run_section(name, s)
    if only and path.is_file():  # another process may have finished a section meanwhile
        stored = json.loads(path.read_text())
        if stored.get("settings") == json.loads(json.dumps(dataclasses.asdict(s))):
            sections = {**stored.get("sections", {}), **sections}
    payload = {
        "settings": dataclasses.asdict(s),
        "quick": quick,
        "sections": sections,
        "headline": headline(sections, s),
    }
    written = write("smc", payload)
    print(f"wrote {written}")
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=[])
    args = parser.parse_args()
    main(args.quick, only=tuple(args.only))
