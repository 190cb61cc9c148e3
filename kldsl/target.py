"""What an engine compiles a model into: a proposal to draw from and log-weights of draws.

Example:
    >>> import kldsl as kl, torch
    >>> lm = kl.ToyLM()
    >>> target = Target(kl.prior(lm, max_tokens=3) | kl.contains("a"))
    >>> draw = target.draw(8, torch.Generator().manual_seed(0))
    >>> bool((draw.log_w[draw.density.constraints['contains("a")']] == 0).all())
    True
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from torch import Tensor

from kldsl.errors import KldslInferenceError
from kldsl.graph import Density, Model
from kldsl.lm import LM, Ids


@dataclass
class Draw:
    """Sequences from the proposal with log q(x) and the target's log p̃(x) breakdown."""

    ids: list[Ids]
    log_q: Tensor  # [N] float64, log-prob under the proposal
    density: Density

    @property
    def log_w(self) -> Tensor:
        """Importance log-weights log p̃(x) − log q(x)."""
        return self.density.log_p - self.log_q

    @property
    def texts(self) -> list[str]:
        return self.density.texts

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, index: list[int]) -> Draw:
        """The draws at ``index``, in that order."""
        d = self.density
        density = Density(
            d.log_p[index],
            {k: v[index] for k, v in d.terms.items()},
            {k: v[index] for k, v in d.rewards.items()},
            {k: v[index] for k, v in d.constraints.items()},
            [d.texts[i] for i in index],
        )
        return Draw([self.ids[i] for i in index], self.log_q[index], density)

    @staticmethod
    def concat(draws: Sequence[Draw]) -> Draw:
        """One draw from several batches."""
        first = draws[0]

        def cat(get: Callable[[Density], dict[str, Tensor]]) -> dict[str, Tensor]:
            return {k: torch.cat([get(d.density)[k] for d in draws]) for k in get(first.density)}

        density = Density(
            torch.cat([d.density.log_p for d in draws]),
            cat(lambda d: d.terms),
            cat(lambda d: d.rewards),
            cat(lambda d: d.constraints),
            [t for d in draws for t in d.density.texts],
        )
        return Draw([s for d in draws for s in d.ids], torch.cat([d.log_q for d in draws]), density)


class Target:
    """A model compiled for inference: its base prior, a proposal LM and log-weights.

    The proposal defaults to the base prior's LM, in which case log a(x) comes from the
    very passes that sampled x (no second scoring pass).
    """

    def __init__(self, model: Model, proposal: LM | None = None, sink: IO[str] | None = None):
        self.model = model.check()
        self.base = model.base()
        self.lm = self.base.lm
        self.proposal = proposal if proposal is not None else self.lm
        self.sink = sink  # a text stream that receives every draw as JSON lines
        if (
            self.proposal is not self.lm
            and self.proposal.tokenizer_signature() != self.lm.tokenizer_signature()
        ):
            raise KldslInferenceError(
                f"the proposal {self.proposal.name} tokenizes differently from the prior "
                f"{self.lm.name}; a proposal must share the prior's tokenizer (fine-tune "
                "the prior itself, or use a model of the same family)"
            )

    @property
    def max_tokens(self) -> int:
        return self.base.max_tokens

    def draw(self, n: int, generator: torch.Generator, batch_size: int | None = None) -> Draw:
        """``n`` proposal samples with their log-weights (streamed to ``sink`` if set)."""
        batch = self.proposal.sample(
            n, self.max_tokens, prompt=self.base.prompt, seed=generator, batch_size=batch_size
        )
        return self.evaluate(batch.ids, batch.log_probs)

    def evaluate(self, ids: list[Ids], log_q: Tensor | None = None) -> Draw:
        """Log p̃ (and log q) of given sequences; ``log_q`` is reused when the caller has it."""
        if log_q is None:
            log_q = self.proposal.score(ids, prompt=self.base.prompt)
        base_lp = log_q if self.proposal is self.lm else None
        density = self.model.log_density(ids, base_log_probs=base_lp)
        draw = Draw(ids, log_q.double(), density)
        if self.sink is not None:
            write_jsonl(draw, self.sink)
        return draw

    def no_support_error(self, tried: int) -> KldslInferenceError:
        """The error for 'no draw had p̃ > 0', naming the constraints that failed."""
        failing = " and ".join(f"`{c}`" for c in self.model.conditions()) or "the target"
        return KldslInferenceError(
            f"0 of {tried} samples satisfied {failing}; Z is probably below 1/{tried} "
            f"(≈ {1 / max(tried, 1):.1e}). Try more samples (--n), a proposal closer to the "
            "constraint (fine-tune one with the variational engine and pass it as `proposal`), "
            "or a looser constraint."
        )


def write_jsonl(draw: Draw, stream: IO[str]) -> None:
    """One JSON object per sequence: text, ids, log q, log p̃, log w and the factor terms."""
    for i, ids in enumerate(draw.ids):
        record = {
            "text": draw.texts[i],
            "ids": ids,
            "log_q": _finite(draw.log_q[i]),
            "log_p": _finite(draw.density.log_p[i]),
            "log_w": _finite(draw.log_w[i]),
            "terms": {k: _finite(v[i]) for k, v in draw.density.terms.items()},
            "rewards": {k: float(v[i]) for k, v in draw.density.rewards.items()},
            "constraints": {k: bool(v[i]) for k, v in draw.density.constraints.items()},
        }
        stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    stream.flush()


def _finite(value: Tensor) -> float | None:
    """A float for JSON (−inf becomes None: JSON has no infinities)."""
    v = float(value)
    return v if math.isfinite(v) else None


def open_sink(path: str | Path | None) -> IO[str] | None:
    """A line-buffered text stream for ``--out`` (parents created), or None."""
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("w", encoding="utf-8", buffering=1)
