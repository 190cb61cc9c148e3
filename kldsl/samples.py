"""``Samples``: the one result type every sampling engine returns.

It holds the sequences, their weights and the per-factor breakdown, and computes the
diagnostics once: log Ẑ and its standard error, ESS, reward means and constraint rates
under the target (weighted) and under the proposal (unweighted), and the divergence
estimates where they are defined.

Engine-specific results go in three places, so no method needs to know the engine:
``columns`` holds per-sample values (one per sample, e.g. MCMC's chain id; resampling,
``to_pandas`` and ``to_jsonl`` carry them), ``diagnostics`` holds statistics of the run
(e.g. R-hat, per-statistic ESS and ``traces``, which :meth:`Samples.plot` draws) and
``info`` holds the settings and anything else.

Example:
    >>> import kldsl as kl
    >>> s = kl.infer(kl.prior(kl.ToyLM(), max_tokens=3) | kl.contains("a"), engine="exact")
    >>> round(s.constraint_rate('contains("a")'), 6)
    1.0
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kldsl import weights
from kldsl.graph import Model
from kldsl.lm import Ids, make_generator
from kldsl.target import Draw, json_float


@dataclass
class Samples:
    """Weighted samples of a model's posterior, with diagnostics."""

    engine: str  # the engine that produced them
    model: Model
    ids: list[Ids]  # generated token ids (EOS included when drawn)
    texts: list[str]
    log_weights: Tensor  # [N] unnormalised log-weights (zeros: equally weighted)
    log_p: Tensor  # [N] log p̃(x)
    terms: dict[str, Tensor]  # each factor's log contribution [N]
    rewards: dict[str, Tensor]  # each leaf reward's raw value [N]
    constraints: dict[str, Tensor]  # each condition's satisfaction [N]
    log_z: float  # estimate of log Z (exact for the exact engine)
    log_z_se: float  # its standard error (0 when exact, inf when unknown)
    n_proposed: int  # sequences drawn from the proposal (the cost)
    proposal_means: dict[str, float]  # unweighted reward means and constraint rates of all draws
    acceptance_rate: float | None = None  # accepted / proposed, for rejection-type engines
    divergences: dict[str, float] = field(default_factory=dict)  # named divergence estimates
    columns: dict[str, list[Any] | Tensor] = field(default_factory=dict)  # per sample [N]
    # statistics of the run: named numbers (shown by summary), per-statistic dicts, and
    # "traces" ({statistic: [chains, steps]}, drawn by plot)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # settings and other engine extras

    def __post_init__(self) -> None:
        for name, values in self.columns.items():
            if len(values) != len(self.ids):
                raise ValueError(
                    f"column {name!r} has {len(values)} values for {len(self.ids)} samples"
                )

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_draw(
        cls,
        engine: str,
        model: Model,
        draw: Draw,
        log_weights: Tensor,
        *,
        log_z: float,
        log_z_se: float,
        n_proposed: int,
        proposal_means: dict[str, float],
        **extra: Any,
    ) -> Samples:
        """Samples holding the sequences of ``draw`` with the given log-weights."""
        d = draw.density
        return cls(
            engine=engine,
            model=model,
            ids=draw.ids,
            texts=d.texts,
            log_weights=log_weights.double(),
            log_p=d.log_p,
            terms=d.terms,
            rewards=d.rewards,
            constraints=d.constraints,
            log_z=float(log_z),
            log_z_se=float(log_z_se),
            n_proposed=n_proposed,
            proposal_means=proposal_means,
            **extra,
        )

    # --- weights ------------------------------------------------------------------
    @property
    def log_weights_normalized(self) -> Tensor:
        return weights.normalize(self.log_weights)

    @property
    def weights(self) -> Tensor:
        """Normalised weights [N] (they sum to 1)."""
        return self.log_weights_normalized.exp()

    @property
    def ess(self) -> float:
        return weights.ess(self.log_weights)

    @property
    def z(self) -> float:
        return math.exp(self.log_z)

    # --- statistics -----------------------------------------------------------------
    def reward_mean(self, name: str, weighted: bool = True) -> float:
        """Mean of a leaf reward under the target (weighted) or the proposal (unweighted)."""
        if not weighted:
            return self.proposal_means[name]
        return float((self.weights * self.rewards[name]).sum())

    def constraint_rate(self, name: str, weighted: bool = True) -> float:
        """Satisfaction rate of a condition under the target or the proposal."""
        if not weighted:
            return self.proposal_means[name]
        return float((self.weights * self.constraints[name].double()).sum())

    def target_means(self) -> dict[str, float]:
        out = {k: self.reward_mean(k) for k in self.rewards}
        out.update({k: self.constraint_rate(k) for k in self.constraints})
        return out

    # --- derived samples ------------------------------------------------------------
    def resample(self, k: int | None = None, seed: int = 0, method: str = "multinomial") -> Samples:
        """``k`` equally weighted samples drawn in proportion to the weights (SIR)."""
        k = len(self) if k is None else k
        index = weights.resample(self.log_weights, k, make_generator(seed), method).tolist()

        def pick(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {name: v[index] for name, v in d.items()}

        return replace(
            self,
            engine=f"{self.engine}+resample",
            ids=[self.ids[i] for i in index],
            texts=[self.texts[i] for i in index],
            log_weights=torch.zeros(k, dtype=torch.float64),
            log_p=self.log_p[index],
            terms=pick(self.terms),
            rewards=pick(self.rewards),
            constraints=pick(self.constraints),
            columns={name: _pick_column(v, index) for name, v in self.columns.items()},
            info={**self.info, "resampled_from": len(self)},
        )

    def distribution(self) -> dict[tuple[int, ...], float]:
        """The target's weight of each distinct sequence (self-normalised; with equal
        weights, the frequencies): compare it with an exact posterior by
        :func:`kldsl.weights.tv_distance`."""
        out: dict[tuple[int, ...], float] = {}
        for ids, w in zip(self.ids, self.weights.tolist()):
            out[tuple(ids)] = out.get(tuple(ids), 0.0) + w
        return out

    def best(self, k: int = 5) -> list[int]:
        """Indices of the ``k`` distinct texts with the highest weight (then log p̃)."""
        order = sorted(
            range(len(self)), key=lambda i: (float(self.log_weights[i]), float(self.log_p[i]))
        )[::-1]
        seen, out = set(), []
        for i in order:
            if self.texts[i] not in seen and math.isfinite(float(self.log_p[i])):
                seen.add(self.texts[i])
                out.append(i)
            if len(out) == k:
                break
        return out

    # --- export ---------------------------------------------------------------------
    def to_pandas(self) -> Any:
        """One row per sample: text, weight, log p̃, each term, reward, constraint and
        column."""
        import pandas as pd

        data: dict[str, Any] = {
            "text": self.texts,
            "weight": self.weights.tolist(),
            "log_weight": self.log_weights.tolist(),
            "log_p": self.log_p.tolist(),
        }
        for name, v in self.terms.items():
            data[f"term:{name}"] = v.tolist()
        for name, v in self.rewards.items():
            data[name] = v.tolist()
        for name, v in self.constraints.items():
            data[name] = v.tolist()
        for name, v in self.columns.items():
            data[name] = _column_list(v)
        return pd.DataFrame(data)

    def to_jsonl(self, path: str | Path) -> Path:
        """Write one JSON object per sample, with its ``columns`` (the summary goes to
        ``path``.summary.json)."""
        path = Path(path)
        columns = {name: _column_list(v) for name, v in self.columns.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for i in range(len(self)):
                record = {
                    "text": self.texts[i],
                    "ids": self.ids[i],
                    "log_weight": json_float(self.log_weights[i]),
                    "log_p": json_float(self.log_p[i]),
                    "rewards": {k: float(v[i]) for k, v in self.rewards.items()},
                    "constraints": {k: bool(v[i]) for k, v in self.constraints.items()},
                }
                if columns:
                    record["columns"] = {k: v[i] for k, v in columns.items()}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        path.with_suffix(path.suffix + ".summary.json").write_text(
            json.dumps(self.summary_dict(), indent=2, ensure_ascii=False)
        )
        return path

    def summary_dict(self) -> dict[str, Any]:
        """The diagnostics as plain numbers (for JSON and benchmarks)."""
        return {
            "engine": self.engine,
            "model": str(self.model),
            "n": len(self),
            "n_proposed": self.n_proposed,
            "log_z": json_float(self.log_z),
            "log_z_se": json_float(self.log_z_se),
            "ess": self.ess,
            "acceptance_rate": self.acceptance_rate,
            "target_means": self.target_means(),
            "proposal_means": self.proposal_means,
            "divergences": {k: json_float(v) for k, v in self.divergences.items()},
            "diagnostics": {k: json_float(v) for k, v in self.scalar_diagnostics().items()},
        }

    def scalar_diagnostics(self) -> dict[str, float]:
        """The diagnostics that are single numbers (e.g. the worst R-hat)."""
        return {
            k: float(v)
            for k, v in self.diagnostics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }

    def summary(self) -> Any:
        """A rich table of the diagnostics (print it with ``rich.print``)."""
        from rich.table import Table

        table = Table(
            title=f"{self.engine}: {len(self)} samples of {self.model}", title_justify="left"
        )
        table.add_column("quantity")
        table.add_column("under the target", justify="right")
        table.add_column("under the proposal", justify="right")
        table.add_row("log Z", f"{self.log_z:.4f} ± {self.log_z_se:.4f}", "")
        table.add_row("ESS", f"{self.ess:.1f} of {len(self)}", "")
        table.add_row("proposals drawn", str(self.n_proposed), "")
        if self.acceptance_rate is not None:
            table.add_row("acceptance rate", f"{self.acceptance_rate:.3%}", "")
        for name in self.rewards:
            table.add_row(
                f"mean {name}",
                f"{self.reward_mean(name):+.4f}",
                f"{self.reward_mean(name, weighted=False):+.4f}",
            )
        for name in self.constraints:
            table.add_row(
                f"rate {name}",
                f"{self.constraint_rate(name):.2%}",
                f"{self.constraint_rate(name, weighted=False):.2%}",
            )
        for name, value in [*self.divergences.items(), *self.scalar_diagnostics().items()]:
            table.add_row(name, f"{value:.4f}", "")
        return table

    def __repr__(self) -> str:
        return (
            f"Samples(engine={self.engine!r}, n={len(self)}, log_z={self.log_z:.4f}±"
            f"{self.log_z_se:.4f}, ess={self.ess:.1f}, model='{self.model}')"
        )

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>"
            for k, v in [("log Z", self.log_z), ("ESS", self.ess), *self.target_means().items()]
        )
        best = "".join(
            f"<li>{html.escape(self.texts[i])} <i>(w={float(self.weights[i]):.3g})</i></li>"
            for i in self.best(5)
        )
        return (
            f"<b>{html.escape(self.engine)}</b>: {len(self)} samples of "
            f"<code>{html.escape(str(self.model))}</code><table>{rows}</table><ol>{best}</ol>"
        )

    def plot(self, path: str | Path) -> Path:
        """PNG of the weights (sorted, with ESS) and each reward's histogram under the
        proposal and the target."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        traces = self.diagnostics.get("traces") or {}  # statistic -> [chains, steps]
        panels = max(1 + len(self.rewards), len(traces))
        rows = 2 if traces else 1
        fig, axes = plt.subplots(rows, panels, figsize=(4.5 * panels, 3.6 * rows), squeeze=False)
        for ax in axes[0, 1 + len(self.rewards) :]:
            ax.axis("off")
        if traces:
            _trace_panels(axes[1], traces)
        ax = axes[0, 0]
        w = self.weights.sort(descending=True).values.numpy()
        ax.plot(range(1, len(w) + 1), w, marker=".", lw=1)
        ax.set_yscale("log" if (w > 0).all() and w.max() > 10 * w.min() else "linear")
        ax.set_xlabel("sample rank")
        ax.set_ylabel("normalised weight")
        ax.set_title(f"weights (ESS {self.ess:.1f} of {len(self)})")
        for ax, (name, values) in zip(axes[0, 1:], self.rewards.items()):
            v = values.numpy()
            bins = min(30, max(5, len(set(v.tolist()))))
            ax.hist(v, bins=bins, alpha=0.5, density=True, label="draws")
            ax.hist(
                v,
                bins=bins,
                weights=self.weights.numpy(),
                alpha=0.5,
                density=True,
                label="target (weighted)",
            )
            ax.set_title(name)
            ax.legend(fontsize=8)
        fig.suptitle(str(self.model), fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _trace_panels(axes: Any, traces: dict[str, Tensor]) -> None:
    """One trace plot per statistic, a line per chain (MCMC mixing at a glance)."""
    for ax in axes[len(traces) :]:
        ax.axis("off")
    for ax, (name, trace) in zip(axes, traces.items()):
        for c, row in enumerate(torch.as_tensor(trace).reshape(len(trace), -1)):
            ax.plot(row.numpy(), lw=0.8, alpha=0.8, label=f"chain {c}")
        ax.set_xlabel("kept step")
        ax.set_title(f"trace: {name}")
    if traces and len(next(iter(traces.values()))) <= 8:
        axes[0].legend(fontsize=7)


def _pick_column(values: list[Any] | Tensor, index: list[int]) -> list[Any] | Tensor:
    return values[index] if isinstance(values, Tensor) else [values[i] for i in index]


def _column_list(values: list[Any] | Tensor) -> list[Any]:
    return values.tolist() if isinstance(values, Tensor) else list(values)


def proposal_means(draw: Draw, weights_: Tensor | None = None) -> dict[str, float]:
    """Means of every reward and constraint over ``draw`` (uniform, or with ``weights_``)."""
    d = draw.density
    w = weights_ if weights_ is not None else torch.full((len(draw),), 1.0 / max(len(draw), 1))
    out = {k: float((w * v).sum()) for k, v in d.rewards.items()}
    out.update({k: float((w * v.double()).sum()) for k, v in d.constraints.items()})
    return out


class RunningMeans:
    """:func:`proposal_means` (uniform) of many batches, from running sums: no batch is held.

    Example:
        >>> import kldsl as kl
        >>> target = kl.Target(kl.prior(kl.ToyLM(), max_tokens=3) | kl.contains("a"))
        >>> draw = target.draw(8, torch.Generator().manual_seed(0))
        >>> means = RunningMeans()
        >>> means.add(draw.select(list(range(3)))); means.add(draw.select(list(range(3, 8))))
        >>> abs(means.means()['contains("a")'] - proposal_means(draw)['contains("a")']) < 1e-12
        True
    """

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[str, float] = {}

    def add(self, draw: Draw) -> None:
        d = draw.density
        self.count += len(draw)
        for name, values in [*d.rewards.items(), *d.constraints.items()]:
            self.sums[name] = self.sums.get(name, 0.0) + float(values.double().sum())

    def means(self) -> dict[str, float]:
        return {name: total / max(self.count, 1) for name, total in self.sums.items()}
