"""Benchmark 3: fine-tuning the embedded model against the ruler −log Z.

Target: ``prior(smollm2, prompt="I just got back from a trip to", max_tokens=32) |
contains("Paris")``, a pure hard constraint, so p* = a(·|Paris), Z = P_a(Paris) and
KL(p*‖a) = −log Z exactly: the divergence of the untouched prior, the ruler every
fine-tuned π is read against. Z is measured first by rejection (plain filtering of prior
draws, with its binomial standard error).

Then the variational engine fine-tunes the prior four ways at the same number of
optimizer steps: ``forward_kl`` (DPG) from importance draws of its frozen proposal q,
``forward_kl`` from exact samples of the ``rejection`` engine (maximum likelihood on them;
each costs about 1/Z prior draws, so these runs take fewer samples a step), ``js``
(f-DPG) and ``reverse_kl`` (finite penalty on violations, ``kl.soften``). Per step the
engine records the draws it made (training, proposal-update evidence, rejected proposals)
and, where it has draws of π or q, the constraint rate under π. Reported per run: samples
drawn and wall time until the per-step rate is ≥ 90% for two steps running; on fresh draws
of the final π its constraint rate, KL(π‖a) = E_π[log π − log a] with its standard error
and distinct-2 of 64 draws (a collapse check); and its KL(p*‖π) = E_p*[log a − log Z −
log π] averaged over the rejection hits, which are exact samples of p*. The best π by that
KL is saved to ``results/<size's fit_folder>`` for benchmark 4 (``benchmarks/amortise.py``).

Sizes (``--size``): ``full``, the published DPG setting (40 steps × 64 samples, lr 1e-4,
full fine-tuning, 256 fresh draws; several hours on a 2-core CPU, minutes on a GPU);
``lora``, the same with LoRA r=8 on q/k/v/o_proj at lr 3e-3; ``short`` (the default of
this script), LoRA with 8 steps × 8 (2 exact samples a step for rejection), 256 prior
draws for Z and 32 fresh draws per π, sized for about 20 minutes on a shared 2-core
machine (threads: ``OMP_NUM_THREADS``, default 2; 1 is faster on a loaded machine); ``quick`` (``--quick``, what ``make bench-quick`` runs): max_tokens 16, forward_kl
only, 2 steps of 8 — a check that the pipeline runs, nothing more. Results go to
``results/finetune_ruler.json`` (full) or ``finetune_ruler_<size>.json``.

Targets: every objective ends closer to p* than the prior (KL(p*‖π) < −log Z ≈ 4.0 nat);
forward_kl at ≥ 90% constraint rate with KL(p*‖π) ≤ 2.0 nat; the best objective ≤ 1.0 nat.

    python -m benchmarks.finetune_ruler [--size full|lora|short|quick] [--max-tokens N]

``--max-tokens N`` runs a size on the target cut at N tokens (results and the saved fit
get a ``_tN`` suffix): at 8 tokens the full setting fits in well under an hour here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
import warnings
from typing import Any

import torch

import kldsl as kl
from benchmarks.common import RESULTS, measure, write
from kldsl.fit import json_safe

PROMPT = "I just got back from a trip to"
WORD = "Paris"
# (name, objective, sampler of the training draws; None: π's own draws)
RUNS = (
    ("forward_kl", "forward_kl", "importance"),
    ("forward_kl+rejection", "forward_kl", "rejection"),
    ("js", "js", "importance"),
    ("reverse_kl", "reverse_kl", None),
)
RATE_TARGET = 0.90
KL_TARGET = 2.0  # nat, forward_kl's target
BEST_TARGET = 1.0  # nat, the best objective's


@dataclasses.dataclass(frozen=True)
class Settings:
    max_tokens: int = 32
    runs: tuple[tuple[str, str, str | None], ...] = RUNS
    steps: int = 40
    batch_size: int = 64
    rejection_batch: int = 8  # exact samples a step for forward_kl+rejection (1/Z draws each)
    lr: float = 1e-4
    lora: tuple[str, ...] | None = None  # None: full fine-tuning
    rank: int = 8
    penalty: float = 10.0  # reverse_kl: log 1[c] = −penalty on a violation instead of −∞
    rejection_draws: int = 768  # prior draws for Z
    eval_draws: int = 256  # fresh draws from each final π
    seed: int = 0
    fit_folder: str = "paris_fit"
    progress: bool = True  # the engine's per-step bar on stderr (to follow a long run)


FULL = Settings()  # the published DPG setting: 40 steps × 64, lr 1e-4, full fine-tuning
LORA = dataclasses.replace(
    FULL, lora=("q_proj", "k_proj", "v_proj", "o_proj"), lr=3e-3, fit_folder="paris_fit_lora"
)
SHORT = dataclasses.replace(  # sized for a shared 2-core machine: about 20 minutes
    LORA,
    steps=8,
    batch_size=8,
    rejection_batch=2,
    rejection_draws=256,
    eval_draws=32,
    fit_folder="paris_fit_short",
)
QUICK = Settings(
    max_tokens=16,
    runs=(RUNS[0],),
    steps=2,
    batch_size=8,
    lora=("q_proj", "k_proj", "v_proj", "o_proj"),
    lr=3e-3,
    rejection_draws=64,
    eval_draws=16,
    fit_folder="paris_fit_quick",
    progress=False,
)
SIZES = {"full": FULL, "lora": LORA, "short": SHORT, "quick": QUICK}


def target(max_tokens: int) -> kl.Model:
    """The Paris posterior: the prior conditioned on containing the word."""
    return kl.prior("smollm2", prompt=PROMPT, max_tokens=max_tokens) | kl.contains(WORD)


def constraint_key(record: dict[str, Any]) -> str:
    """The history / proposal_means key of the constraint (``constraint/…`` or bare)."""
    (key,) = [k for k in record if k.startswith("constraint/")]
    return key


@dataclasses.dataclass(frozen=True)
class Exact:
    """The rejection hits: exact samples of p* (after ``prompt``) with their log a(x), and
    log Ẑ (± se)."""

    prompt: str
    ids: list[list[int]]
    log_a: torch.Tensor
    log_z: float
    log_z_se: float


def measure_z(model: kl.Model, draws: int, seed: int) -> tuple[dict[str, Any], Exact | None]:
    """Z = P_a(constraint) by rejection (filtering) on exactly ``draws`` prior samples, and
    the accepted draws: exact samples of p*, which :func:`kl_exact` scores π on."""

    def run() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "stopped at max_proposals": we want exactly that
            return kl.infer(
                model,
                engine="rejection",
                n=draws,
                max_proposals=draws,
                batch_size=64,
                seed=seed,
                progress=False,
            )

    try:
        seconds, _, samples = measure(run)
    except kl.KldslInferenceError:  # no hit at all (only plausible in quick mode)
        return {"draws": draws, "hits": 0, "z": 0.0, "z_se": math.nan, "log_z": -math.inf}, None
    rate = samples.acceptance_rate
    exact = Exact(
        model.base().prompt,
        [list(x) for x in samples.ids],
        samples.log_p.clone(),
        samples.log_z,
        samples.log_z_se,
    )
    summary = {
        "draws": samples.n_proposed,
        "hits": len(samples),
        "z": rate,
        "z_se": math.sqrt(rate * (1 - rate) / samples.n_proposed),
        "log_z": samples.log_z,
        "log_z_se": samples.log_z_se,
        "ruler_nat": -samples.log_z,  # KL(p*‖a)
        "seconds": seconds,
        "examples": samples.texts[:5],
    }
    return summary, exact


def kl_exact(lm: Any, exact: Exact | None) -> dict[str, float]:
    """KL(p*‖π) = E_p*[log a(x) − log Z − log π(x)], averaged over the exact p* samples.

    Unlike a self-normalised estimate on π's own draws (whose ESS is often about 1 here, and
    which then reads ≈ 0 whatever π is), this needs no weights: the rejection hits are draws
    of p* itself. Its standard error adds the spread of the log-ratios over the hits and the
    error of log Ẑ.
    """
    if exact is None:
        return {"kl": math.nan, "se": math.nan, "samples": 0}
    log_pi = lm.score(exact.ids, prompt=exact.prompt, batch_size=32)
    ratio = exact.log_a - log_pi
    n = len(ratio)
    spread = float(ratio.var()) / n if n > 1 else math.nan  # one hit: no spread to read
    return {
        "kl": float(ratio.mean()) - exact.log_z,
        "se": math.sqrt(spread + exact.log_z_se**2),
        "samples": n,
    }


def curves(fit: kl.Fit) -> dict[str, list[float | None]]:
    """Per-step curves against samples drawn (non-finite values become None). A run trained
    on a sampling engine's draws of p* has no per-step estimate under π (rates None)."""

    def num(value: Any) -> float | None:
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    keys = [k for k in fit.history[0] if k.startswith("constraint/")]
    drawn = 0.0
    samples = []
    for r in fit.history:
        drawn += r["draws"]
        samples.append(drawn)
    return {
        "step": [r["step"] for r in fit.history],
        "samples": samples,  # every sequence drawn: training, evidence, rejected proposals
        "time_s": [r["time_s"] for r in fit.history],
        "constraint_rate": [num(r[keys[0]]) if keys else None for r in fit.history],
        # a batch whose weights have an ESS below 1.5 (one hit, or one dominant weight) says
        # nothing about KL(p*‖π): the self-normalised estimate then reads ≈ 0 whatever π is
        "kl_p_pi": [
            num(r.get("kl_p_pi")) if (r.get("ess") or 0) >= 1.5 else None for r in fit.history
        ],
        "hits_ess": [num(r.get("ess")) for r in fit.history],
        "kl_pi_a": [num(r.get("kl_pi_a")) for r in fit.history],
        "kl_pi_p": [num(r.get("kl_pi_p")) for r in fit.history],
        "log_z": [num(r.get("log_z")) for r in fit.history],
        "entropy_per_token": [num(r.get("entropy_per_token")) for r in fit.history],
        "swap_gain": [num(r.get("swap/gain")) for r in fit.history],
        "swap_se": [num(r.get("swap/se")) for r in fit.history],
    }


def first_reach(curve: dict[str, list[Any]], level: float, run: int = 2) -> dict[str, Any] | None:
    """Samples drawn and wall time at the end of the first ``run`` consecutive steps whose
    constraint rate is ≥ level (one step is not enough: for forward_kl and js a single hit
    among the proposal's draws can carry most of the self-normalised weight)."""
    streak = 0
    for i, rate in enumerate(curve["constraint_rate"]):
        streak = streak + 1 if rate is not None and rate >= level else 0
        if streak == run:
            return {
                "step": curve["step"][i],
                "samples": curve["samples"][i],
                "time_s": curve["time_s"][i],
            }
    return None


def distinct_2(ids: list[list[int]]) -> float:
    """Distinct token bigrams over all bigrams of the sequences (1: none repeats; a
    collapsed π that says one thing scores near 0).

    >>> distinct_2([[1, 2, 3], [1, 2, 4]])
    0.75
    """
    grams = [tuple(x[i : i + 2]) for x in ids for i in range(len(x) - 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def evaluate(
    model: kl.Model, fit: kl.Fit, draws: int, seed: int, exact: Exact | None
) -> dict[str, Any]:
    """The final π on ``draws`` fresh draws of it: constraint rate, KL(π‖a) = E_π[log π −
    log a] (± se), distinct-2 of the first 64; and KL(p*‖π) on the exact p* samples."""
    on_exact = kl_exact(fit.model, exact)
    base = model.base()
    target = kl.Target(model)
    start = time.perf_counter()
    batch = fit.model.sample(draws, base.max_tokens, prompt=base.prompt, seed=seed, batch_size=32)
    log_pi = batch.log_probs.double()
    log_a = target.lm.score(batch.ids, prompt=base.prompt, batch_size=32).double()
    density = model.log_density(batch.ids, base_log_probs=log_a, lms=target.lms)
    (met,) = density.constraints.values()
    gap = log_pi - log_a
    texts = density.texts
    return {
        "draws": draws,
        "constraint_rate": float(met.double().mean()),
        "kl_p_pi": on_exact["kl"],
        "kl_p_pi_se": on_exact["se"],
        "exact_samples": on_exact["samples"],
        "kl_pi_a": float(gap.mean()),
        "kl_pi_a_se": float(gap.std() / math.sqrt(draws)),
        "distinct_2": distinct_2([list(x) for x in batch.ids[:64]]),
        "seconds": time.perf_counter() - start,
        "examples": [t for t, ok in zip(texts, met.tolist()) if ok][:5],
    }


def train(
    model: kl.Model, run: tuple[str, str, str | None], s: Settings
) -> tuple[kl.Fit, dict[str, Any]]:
    name, objective, sampler = run
    options: dict[str, Any] = {"penalty": s.penalty} if objective == "reverse_kl" else {}
    batch_size = s.batch_size
    if sampler is not None:
        options["sampler"] = sampler
    if sampler == "rejection":  # exact samples: each costs 1/Z prior draws, drawn 32 at once
        batch_size = s.rejection_batch
        options["sampler_options"] = {"batch_size": 32}
    lora = {"r": s.rank, "target_modules": list(s.lora)} if s.lora else None

    def go() -> kl.Fit:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reverse_kl's documented finite-penalty warning
            return kl.infer(
                model,
                engine="variational",
                objective=objective,
                steps=s.steps,
                batch_size=batch_size,
                lr=s.lr,
                lora=lora,
                seed=s.seed,
                progress=s.progress,
                **options,
            )

    seconds, peak, fit = measure(go)
    curve = curves(fit)
    out = {
        "name": name,
        "objective": objective,
        "sampler": sampler,
        "seconds": seconds,
        "peak_mb": peak / 2**20,
        "batch_size": batch_size,
        "samples": curve["samples"][-1],
        "reach_90": first_reach(curve, RATE_TARGET),
        "proposal_updates": fit.info["proposal_updates"],
        "curves": curve,
    }
    return fit, out


def plot(runs: list[dict[str, Any]], z: dict[str, Any], path: Any, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [
        ("constraint_rate", f"constraint rate under π (contains {WORD!r})"),
        ("kl_p_pi", "KL(p*‖π) (nat), estimated"),
        ("kl_pi_a", "KL(π‖a) (nat)"),
    ]
    for ax, (key, label) in zip(axes, panels):
        for r in runs:
            c = r["curves"]
            pts = [(x, y) for x, y in zip(c["samples"], c[key]) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=r["name"])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("samples drawn", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].axhline(RATE_TARGET, color="grey", ls=":", lw=1, label="90% target")
    axes[0].set_ylim(-0.02, 1.02)
    if math.isfinite(z.get("log_z", -math.inf)):
        ruler = -z["log_z"]
        axes[1].axhline(ruler, color="black", ls="--", lw=1, label=f"−log Z = {ruler:.2f}")
        band = z.get("log_z_se", 0.0)
        axes[1].axhspan(ruler - band, ruler + band, color="black", alpha=0.08)
        # a batch with one or two hits can estimate tens of nats; keep the ruler readable
        axes[1].set_ylim(-0.5, 3 * ruler)
        axes[1].set_title("KL(p*‖π) (nat), estimated (clipped at 3× the ruler)", fontsize=9)
    axes[1].axhline(KL_TARGET, color="grey", ls=":", lw=1, label=f"{KL_TARGET} nat target")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline(z: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ruler_nat = z.get("ruler_nat", math.nan)
    rows: list[dict[str, Any]] = [
        {
            "name": f"Z = P_a({WORD}) by rejection ({z['draws']} draws), ± se",
            "value": f"{z['z']:.4f} ± {z['z_se']:.4f}",
            "target": None,
            "met": None,
        }
    ]
    for r in runs:
        ev, reach, name = r["eval"], r["reach_90"], r["name"]
        kl_ok = math.isfinite(ev["kl_p_pi"])
        rows += [
            {
                "name": f"{name}: samples / wall s to 90% constraint rate",
                "value": f"{reach['samples']:.0f} / {reach['time_s']:.0f} s"
                if reach
                else (
                    "not reached"
                    if r["curves"]["constraint_rate"][0] is not None
                    else "not tracked (no draws of π while training)"
                ),
                "target": f"within {r['samples']:.0f} samples",
                "met": reach is not None,
            },
            {
                "name": f"{name}: final constraint rate under π ({ev['draws']} fresh draws)",
                "value": round(ev["constraint_rate"], 3),
                "target": f"≥ {RATE_TARGET}" if r["objective"] == "forward_kl" else None,
                "met": ev["constraint_rate"] >= RATE_TARGET,
            },
            {
                "name": f"{name}: final KL(p*‖π) nat on {z['hits']} exact p* samples "
                f"(ruler −log Z = {ruler_nat:.2f})",
                "value": f"{ev['kl_p_pi']:.2f} ± {ev['kl_p_pi_se']:.2f}",
                "target": f"< {ruler_nat:.2f}"
                + (f", ≤ {KL_TARGET}" if r["objective"] == "forward_kl" else ""),
                "met": kl_ok
                and ev["kl_p_pi"] < ruler_nat
                and (r["objective"] != "forward_kl" or ev["kl_p_pi"] <= KL_TARGET),
            },
            {
                "name": f"{name}: KL(π‖a) nat ± se; distinct-2 of 64 draws",
                "value": f"{ev['kl_pi_a']:.2f} ± {ev['kl_pi_a_se']:.2f}; {ev['distinct_2']:.3f}",
                "target": None,
                "met": None,
            },
        ]
    finite = [r["eval"]["kl_p_pi"] for r in runs if math.isfinite(r["eval"]["kl_p_pi"])]
    best = min(finite, default=math.nan)
    rows.append(
        {
            "name": "best objective's final KL(p*‖π) nat",
            "value": f"{best:.2f}",
            "target": f"≤ {BEST_TARGET}",
            "met": math.isfinite(best) and best <= BEST_TARGET,
        }
    )
    return rows


def main(
    quick: bool = False, settings: Settings | None = None, size: str | None = None
) -> dict[str, Any]:
    """Run one size (``quick``: the pipeline check; default: the full setting)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    size = size or ("quick" if quick else "full")
    s = settings or SIZES[size]
    model = target(s.max_tokens)
    z, exact = measure_z(model, s.rejection_draws, seed=1000 + s.seed)
    print(f"Z = {z['z']:.4f} ± {z['z_se']:.4f} ({z['hits']}/{z['draws']})", flush=True)
    runs: list[dict[str, Any]] = []
    fits: dict[str, kl.Fit] = {}
    for run in s.runs:
        fit, out = train(model, run, s)
        out["eval"] = evaluate(model, fit, s.eval_draws, 2000 + s.seed, exact)
        fits[out["name"]] = fit
        runs.append(out)
        print(
            f"{out['name']}: {out['seconds']:.0f} s, {out['samples']:.0f} samples, reach 90% "
            f"{out['reach_90']}, final rate {out['eval']['constraint_rate']:.3f}, KL(p*‖π) "
            f"{out['eval']['kl_p_pi']:.3f} ± {out['eval']['kl_p_pi_se']:.3f}, KL(π‖a) "
            f"{out['eval']['kl_pi_a']:.3f}, distinct-2 {out['eval']['distinct_2']:.3f}",
            flush=True,
        )

    def final_kl(r: dict[str, Any]) -> float:
        value = r["eval"]["kl_p_pi"]
        return value if math.isfinite(value) else math.inf

    best = min(runs, key=lambda r: (final_kl(r), r["objective"] != "forward_kl"))
    saved = fits[best["name"]].save(RESULTS / s.fit_folder)
    payload = {
        "settings": {**dataclasses.asdict(s), "size": size, "prompt": PROMPT},
        "target": str(model),
        "z": z,
        "runs": runs,
        "saved_fit": {"name": best["name"], "folder": str(saved)},
        "headline": headline(z, runs),
    }
    name = "finetune_ruler" if size == "full" else f"finetune_ruler_{size}"
    if s.max_tokens != SIZES[size].max_tokens:
        name += f"_t{s.max_tokens}"
    path = write(name, json_safe(payload))  # NaN/∞ become null
    tuning = f"LoRA r={s.rank}" if s.lora else "full fine-tuning"
    plot(runs, z, path.with_suffix(".png"), f"{model}  ({tuning}, lr {s.lr:g})")
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="short")
    parser.add_argument("--quick", action="store_true", help="same as --size quick")
    parser.add_argument(
        "--max-tokens", type=int, help="the target's max_tokens (default: the size's, 32)"
    )
    parser.add_argument(
        "--rejection-draws", type=int, help="prior draws for Z and the exact p* samples"
    )
    args = parser.parse_args()
    size = "quick" if args.quick else args.size
    settings = SIZES[size]
    if args.rejection_draws is not None:
        settings = dataclasses.replace(settings, rejection_draws=args.rejection_draws)
    if args.max_tokens is not None:
        settings = dataclasses.replace(
            settings,
            max_tokens=args.max_tokens,
            fit_folder=f"{settings.fit_folder}_t{args.max_tokens}",
        )
    for row in main(settings=settings, size=size)["headline"]:
        print(f"{row['name']}: {row['value']} (target {row['target']}, met {row['met']})")
