"""Benchmark 4: amortise then correct — a fine-tuned π as an importance-sampling proposal.

Target: the Paris posterior of benchmark 3 (``prior(smollm2, prompt="I just got back from a
trip to", max_tokens=32) | contains("Paris")``). Importance sampling draws x ~ q and weighs
w = p̃(x)/q(x) with (a) q = the prior a and (b) q = the π fine-tuned by benchmark 3
(the newest ``results/paris_fit*`` that benchmark 3 saved, whatever its size; when none
exists a short forward_kl fit is trained here first). The
fine-tuning amortises the work; the weights correct π's remaining error, so both estimate the
same p* and Z. With the prior and a pure hard constraint, w ∈ {0, 1}: ESS = the number of hits
≈ Z·n.

Reported for each proposal: ESS per 1,000 draws (standard error by bootstrap over draws),
log Ẑ with its delta-method standard error, and its agreement with the rejection estimate of
benchmark 3 (read from ``results/finetune_ruler.json`` when it was made with the same
max_tokens, else measured here). Target: the fine-tuned proposal gives ≥ 10× the prior's ESS.
When the prior has no hit at all its ESS is 0 and the ratio has no value; the benchmark then
reports the 95% lower bound that 0 hits in n draws imply (see ``ess_ratio``), and the target
counts as met only if that bound reaches it.

Sizing: 384 prior draws and 192 draws from π (about 3 minutes on this 2-core machine when
it is otherwise idle: 166 s measured). ``--quick``: max_tokens 16, 64 draws each (about 2 minutes), using whichever
saved fit exists (those, then ``paris_fit_quick``), else a 2-step fit.

    python -m benchmarks.amortise [--quick] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from functools import partial
from typing import Any

import torch

import kldsl as kl
from benchmarks import finetune_ruler as ruler
from benchmarks.common import RESULTS, measure, write
from kldsl import weights
from kldsl.fit import json_safe
from kldsl.models import load_lm

ESS_TARGET = 10.0  # × the prior's ESS per 1,000 draws


@dataclasses.dataclass(frozen=True)
class Settings:
    max_tokens: int = 32
    prior_draws: int = 384
    fit_draws: int = 192
    rejection_draws: int = 384  # only when benchmark 3's estimate is not usable
    bootstrap: int = 2000
    seed: int = 0


FULL = Settings()
QUICK = Settings(max_tokens=16, prior_draws=64, fit_draws=64, rejection_draws=64, bootstrap=500)


def bootstrap_ess_per_1000(log_w: torch.Tensor, reps: int, seed: int) -> float:
    """Standard error of 1000·ESS/n by resampling the draws with replacement."""
    n = len(log_w)
    gen = torch.Generator().manual_seed(seed)
    values = [
        1000 * weights.ess(log_w[torch.randint(0, n, (n,), generator=gen)]) / n for _ in range(reps)
    ]
    return float(torch.tensor(values).std(unbiased=True))


def importance(
    model: kl.Model, proposal: Any, n: int, s: Settings, name: str, seed: int
) -> dict[str, Any]:
    run = partial(
        kl.infer,
        model,
        engine="importance",
        proposal=proposal,
        n=n,
        batch_size=64,
        seed=seed,
        progress=False,
    )
    try:
        seconds, _, samples = measure(run)
    except kl.KldslInferenceError:  # no draw met the constraint (only plausible in quick mode)
        return {
            "proposal": name,
            "draws": n,
            "hits": 0,
            "ess": 0.0,
            "ess_per_1000": 0.0,
            "ess_per_1000_se": math.nan,
            "log_z": -math.inf,
            "log_z_se": math.inf,
            "seconds": math.nan,
        }
    log_w = samples.log_weights
    key = [k for k in samples.proposal_means if ruler.WORD in k][0]
    return {
        "proposal": name,
        "draws": n,
        "seconds": seconds,
        "hits": int(torch.isfinite(log_w).sum()),
        "constraint_rate_under_q": samples.proposal_means[key],
        "ess": samples.ess,
        "ess_per_1000": 1000 * samples.ess / n,
        "ess_per_1000_se": bootstrap_ess_per_1000(log_w, s.bootstrap, seed),
        "log_z": samples.log_z,
        "log_z_se": samples.log_z_se,
        "kl_p_q": samples.divergences["KL(p*‖q)"],
        "ess_per_s": samples.ess / seconds,
    }


def reference_z(model: kl.Model, s: Settings, quick: bool) -> dict[str, Any]:
    """The rejection estimate of benchmark 3 when it matches, else a fresh one."""
    for path in sorted(RESULTS.glob("finetune_ruler*.json")):
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored["settings"]["max_tokens"] == s.max_tokens and stored["z"]["hits"] > 0:
                return {**stored["z"], "source": str(path)}
    z, _ = ruler.measure_z(model, s.rejection_draws, seed=3000 + s.seed)
    return {**z, "source": "measured here"}


def fine_tuned(quick: bool) -> tuple[Any, str]:
    """Benchmark 3's newest saved π (``results/paris_fit*``; ``paris_fit_quick`` only with
    ``quick``), or a short forward_kl fit when none is saved."""
    saved = [
        p
        for p in RESULTS.glob("paris_fit*")
        if (p / "fit.json").is_file() and (quick or not p.name.startswith("paris_fit_quick"))
    ]
    if saved:
        path = max(saved, key=lambda p: (p / "fit.json").stat().st_mtime)
        return load_lm(str(path)), str(path)
    short = dataclasses.replace(
        ruler.QUICK if quick else ruler.SHORT,
        runs=(ruler.RUNS[0],),
        steps=2 if quick else ruler.SHORT.steps,
    )
    fit, _ = ruler.train(ruler.target(short.max_tokens), ruler.RUNS[0], short)
    return fit.model, f"trained here: forward_kl, {short.steps} steps × {short.batch_size}"


def plot(rows: list[dict[str, Any]], z: dict[str, Any], path: Any, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [r["proposal"] for r in rows]
    errors = [r["ess_per_1000_se"] if math.isfinite(r["ess_per_1000_se"]) else 0 for r in rows]
    bars = ax1.bar(names, [r["ess_per_1000"] for r in rows], yerr=errors)
    for bar, r in zip(bars, rows):
        if r["hits"] == 0:
            ax1.annotate(
                f"0 hits in {r['draws']}",
                (bar.get_x() + bar.get_width() / 2, 0),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                fontsize=8,
            )
    ax1.set_ylabel("ESS per 1,000 draws")
    ax1.set_title("effective sample size", fontsize=9)
    shown = [i for i, r in enumerate(rows) if math.isfinite(r["log_z"])]
    ax2.errorbar(
        shown,
        [rows[i]["log_z"] for i in shown],
        yerr=[rows[i]["log_z_se"] for i in shown],
        fmt="o",
        capsize=4,
    )
    if math.isfinite(z.get("log_z", -math.inf)):
        ax2.axhline(z["log_z"], color="black", ls="--", lw=1, label="rejection")
        se = z.get("log_z_se", 0.0)
        ax2.axhspan(z["log_z"] - se, z["log_z"] + se, color="black", alpha=0.08)
        ax2.legend(fontsize=7)
    ax2.set_xticks(range(len(rows)))
    ax2.set_xticklabels(names)
    ax2.set_xlim(-0.5, len(rows) - 0.5)
    ax2.set_ylabel("log Ẑ ± se")
    ax2.set_title("log Z estimates", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ess_ratio(prior: dict[str, Any], fitted: dict[str, Any]) -> dict[str, Any]:
    """ESS per draw of the fine-tuned proposal over the prior's, with its standard error.

    When the prior had no hit in its n draws its ESS is 0 and the ratio has no value; what
    the draws do say is a bound. With w ∈ {0, 1} the prior's ESS is its number of hits, and
    0 hits in n draws put its hit rate below 1 − 0.05^(1/n) (≈ 3/n) with 95% confidence, so
    the ratio is at least the fine-tuned ESS per draw over that bound. The target counts as
    met when the bound reaches it, and as undecided (``met`` None) when it does not.

    >>> r = ess_ratio({"ess": 0.0, "draws": 384, "ess_per_1000": 0.0},
    ...               {"ess": 40.0, "draws": 192, "ess_per_1000": 208.3})
    >>> r["lower_95"] > 25, r["met"]
    (True, True)
    """
    fit_rate = fitted["ess_per_1000"]
    if prior["ess"] > 0:
        value = fit_rate / prior["ess_per_1000"]
        se = value * math.sqrt(
            (fitted.get("ess_per_1000_se", 0.0) / max(fit_rate, 1e-12)) ** 2
            + (prior.get("ess_per_1000_se", 0.0) / prior["ess_per_1000"]) ** 2
        )
        return {
            "value": value,
            "se": se,
            "lower_95": None,
            "text": f"{value:.1f}× ± {se:.1f}",
            "met": value >= ESS_TARGET,
        }
    n = prior["draws"]
    bound = 1000 * (1 - 0.05 ** (1 / n))  # 95% upper bound on the prior's ESS per 1,000
    lower = fit_rate / bound
    return {
        "value": None,
        "se": None,
        "lower_95": lower,
        "prior_ess_per_1000_upper_95": bound,
        "text": f"≥ {lower:.1f}× (prior: 0 hits in {n} draws, 95% bound)",
        "met": True if lower >= ESS_TARGET else None,
    }


def agreement(row: dict[str, Any], z: dict[str, Any]) -> dict[str, float]:
    diff = row["log_z"] - z["log_z"]
    se = math.sqrt(row["log_z_se"] ** 2 + z.get("log_z_se", math.inf) ** 2)
    return {"diff": diff, "se": se, "z_score": diff / se if se > 0 else math.nan}


def main(quick: bool = False, settings: Settings | None = None) -> dict[str, Any]:
    torch.set_num_threads(2)
    s = settings or (QUICK if quick else FULL)
    model = ruler.target(s.max_tokens)
    z = reference_z(model, s, quick)
    lm, source = fine_tuned(quick)
    prior_row = importance(model, None, s.prior_draws, s, "prior", seed=4000 + s.seed)
    fit_row = importance(model, lm, s.fit_draws, s, "fine-tuned", seed=5000 + s.seed)
    rows = [prior_row, fit_row]
    for r in rows:
        r["vs_rejection"] = agreement(r, z)
        r["vs_prior"] = agreement(r, prior_row)
        if r["hits"] == 0:
            print(f"{r['proposal']}: 0 hits in {r['draws']} draws", flush=True)
            continue
        print(
            f"{r['proposal']}: ESS/1000 {r['ess_per_1000']:.1f} ± {r['ess_per_1000_se']:.1f}, "
            f"log Ẑ {r['log_z']:.3f} ± {r['log_z_se']:.3f} ({r['seconds']:.0f} s)",
            flush=True,
        )
    ratio = ess_ratio(prior_row, fit_row)
    agree = fit_row["vs_rejection"]
    payload = {
        "settings": {**dataclasses.asdict(s), "quick": quick},
        "target": str(model),
        "fine_tuned_from": source,
        "rejection": z,
        "rows": rows,
        "ess_ratio": ratio,
        "headline": [
            {
                "name": "ESS per 1,000: prior proposal (± se)",
                "value": f"{prior_row['ess_per_1000']:.1f} ± {prior_row['ess_per_1000_se']:.1f}"
                if prior_row["hits"]
                else f"0 (0 hits in {prior_row['draws']} draws)",
                "target": None,
                "met": None,
            },
            {
                "name": "ESS per 1,000: fine-tuned proposal (± se)",
                "value": f"{fit_row['ess_per_1000']:.1f} ± {fit_row['ess_per_1000_se']:.1f}",
                "target": None,
                "met": None,
            },
            {
                "name": "ESS ratio fine-tuned / prior",
                "value": ratio["text"],
                "target": f"≥ {ESS_TARGET:g}×",
                "met": ratio["met"],
            },
            {
                "name": "log Ẑ fine-tuned − log Ẑ rejection (± se)",
                "value": f"{agree['diff']:+.3f} ± {agree['se']:.3f}",
                "target": "within 2 se",
                "met": abs(agree["z_score"]) <= 2,
            },
        ],
    }
    path = write("amortise", json_safe(payload))  # NaN/∞ become null
    plot(rows, z, path.with_suffix(".png"), str(model))
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-tokens", type=int, help="the target's max_tokens (default 32)")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    if args.max_tokens is not None:
        settings = dataclasses.replace(settings, max_tokens=args.max_tokens)
    for row in main(args.quick, settings)["headline"]:
        print(f"{row['name']}: {row['value']} (target {row['target']}, met {row['met']})")
