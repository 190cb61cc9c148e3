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

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

import torch
from torch import Tensor

from kldsl.errors import KldslInferenceError, KldslNoSupportError
from kldsl.graph import Density, Model
from kldsl.lm import LM, Ids
from kldsl.registry import check_runtime, resolve_all


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


class BatchSeeds:
    """One generator per (batch, purpose), derived from a root drawn once from the run's
    generator: batch k's draws (``"draw"``) and acceptance uniforms (``"accept"``) do not
    depend on having made batches 0..k−1, so a resumed run can skip the batches its file
    holds and continue the very stream an uninterrupted run draws.

    Example:
        >>> seeds = BatchSeeds(torch.Generator().manual_seed(0))
        >>> torch.equal(torch.rand(3, generator=seeds(5)), torch.rand(3, generator=seeds(5)))
        True
    """

    def __init__(self, generator: torch.Generator):
        self.root = int(torch.randint(0, 2**62, (), generator=generator))

    def __call__(self, index: int, purpose: str = "draw") -> torch.Generator:
        key = f"{self.root}:{purpose}:{index}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        return torch.Generator().manual_seed(seed)


class Target:
    """A model compiled for inference: its base prior, a proposal LM and log-weights.

    Every prior of the model (base, experts, tempered) is resolved to an LM here, once, on
    ``runtime`` (:func:`kldsl.registry.resolve`): :attr:`lms` holds them by the model each
    prior names and goes to the density interpreter, so evaluating loads nothing. The
    proposal defaults to the base prior's LM, in which case log a(x) comes from the very
    passes that sampled x (no second scoring pass). Every prior's prompt and
    ``max_tokens`` are checked against its LM's context length here, before anything runs.
    """

    def __init__(
        self,
        model: Model,
        proposal: LM | None = None,
        sink: IO[str] | None = None,
        runtime: str = "hf",
    ):
        self.model = model.check()
        self.base = model.base()
        self.runtime = check_runtime(runtime)
        self.lms = resolve_all(self.model.priors(), runtime)
        self.lm = self.lms[self.base.model]
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
        for prior in self.model.priors():
            self.lms[prior.model].check_context(prior.prompt, prior.max_tokens)
        if self.proposal is not self.lm:
            self.proposal.check_context(self.base.prompt, self.max_tokens)

    @property
    def max_tokens(self) -> int:
        return self.base.max_tokens

    def draw(self, n: int, generator: torch.Generator, batch_size: int | None = None) -> Draw:
        """``n`` proposal samples with their log-weights (streamed to ``sink`` if set)."""
        batch = self.proposal.sample(
            n, self.max_tokens, prompt=self.base.prompt, seed=generator, batch_size=batch_size
        )
        return self.evaluate(batch.ids, batch.log_probs)

    def draw_batch(self, index: int, size: int, seeds: BatchSeeds) -> Draw:
        """Batch ``index`` of a run: ``size`` proposal samples drawn with ``seeds(index)``,
        or, when the sink is resuming a file that holds that batch complete, its records
        read back (nothing is drawn, scored or written again)."""
        recorded = getattr(self.sink, "recorded", None)
        if recorded is not None:
            draw = recorded(index, size)
            if draw is not None:
                return draw
        batch = self.proposal.sample(
            size, self.max_tokens, prompt=self.base.prompt, seed=seeds(index)
        )
        return self.evaluate(batch.ids, batch.log_probs, batch=index)

    def evaluate(
        self,
        ids: list[Ids],
        log_q: Tensor | None = None,
        batch: int | None = None,
        batch_size: int | None = None,
    ) -> Draw:
        """Log p̃ (and log q) of given sequences; ``log_q`` is reused when the caller has it.
        ``batch`` tags the records streamed to the sink with the batch they belong to;
        ``batch_size`` is the scoring batch (the model's default when None)."""
        if log_q is None:
            log_q = self.proposal.score(ids, prompt=self.base.prompt)
        base_lp = log_q if self.proposal is self.lm else None
        sizes = {} if batch_size is None else {"batch_size": batch_size}
        density = self.model.log_density(ids, base_log_probs=base_lp, lms=self.lms, **sizes)
        draw = Draw(ids, log_q.double(), density)
        if self.sink is not None:
            write_jsonl(draw, self.sink, batch=batch)
        return draw

    def no_support_error(self, tried: int) -> KldslNoSupportError:
        """The error for 'no draw had p̃ > 0', naming the constraints that failed."""
        failing = " and ".join(f"`{c}`" for c in self.model.conditions()) or "the target"
        return KldslNoSupportError(
            f"0 of {tried} samples satisfied {failing}; Z is probably below 1/{tried} "
            f"(≈ {1 / max(tried, 1):.1e}). Try more samples (--n), a proposal closer to the "
            "constraint (fine-tune one with the variational engine and pass it as `proposal`), "
            "or a looser constraint."
        )


def write_jsonl(draw: Draw, stream: IO[str], batch: int | None = None) -> None:
    """One JSON object per sequence: text, ids, log q, log p̃, log w and the factor terms
    (and ``batch``, the index of the batch, when given), written in one go and flushed."""
    lines = []
    for i, ids in enumerate(draw.ids):
        record = {
            "text": draw.texts[i],
            "ids": ids,
            "log_q": json_float(draw.log_q[i]),
            "log_p": json_float(draw.density.log_p[i]),
            "log_w": json_float(draw.log_w[i]),
            "terms": {k: json_float(v[i]) for k, v in draw.density.terms.items()},
            "rewards": {k: float(v[i]) for k, v in draw.density.rewards.items()},
            "constraints": {k: bool(v[i]) for k, v in draw.density.constraints.items()},
        }
        if batch is not None:
            record["batch"] = batch
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    stream.write("".join(lines))
    stream.flush()


def json_float(value: Tensor | float) -> float | None:
    """A float for JSON (non-finite becomes None: JSON has no infinities or NaN)."""
    v = float(value)
    return v if math.isfinite(v) else None
