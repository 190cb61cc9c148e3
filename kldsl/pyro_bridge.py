"""The model graph as a Pyro program, so Pyro's inference runs on LM posteriors.

``to_pyro(model)`` returns a Pyro model with one sample site ``"x"`` (the base prior LM as
a distribution over EOS-padded token sequences) and one ``pyro.factor`` per other factor
of p̃, named after it: ``"sentiment / 0.2"`` contributes r/β, ``"1[not curse]"``
contributes 0 or −∞, another expert ``"log b"`` its log-probability. With ``penalty=`` the
model is :func:`kldsl.transforms.soften`-ed first: ``| not curse`` becomes the factor
``"indicator(curse) * -10.0"`` (0 or −penalty). ``pyro_guide(lm, model)`` samples the
same site from any (trainable) LM.

Example:
    >>> import kldsl as kl, pyro
    >>> lm = kl.ToyLM()
    >>> m = kl.prior(lm, max_tokens=3) * kl.exp(kl.length / 2.0)
    >>> trace = pyro.poutine.trace(to_pyro(m)).get_trace()
    >>> [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    ['x', 'length / 2.0']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.ops.provenance import get_provenance, track_provenance
from torch import Tensor

from kldsl.graph import Model, Prior
from kldsl.lm import LM, Ids, make_generator, torch_module
from kldsl.registry import lm_of, resolve_all
from kldsl.transforms import soften


class SequenceDistribution(dist.TorchDistribution):
    """An LM's distribution over continuations of ``prompt`` as a Pyro distribution.

    A value is a LongTensor ``[..., max_tokens]``: the generated tokens, then EOS repeated
    to the full width (a sequence shorter than ``max_tokens`` always ends with EOS, so the
    padding is unambiguous; :func:`unpad` recovers the held tokens, ``mask`` the length).
    Sampling draws its seed from torch's global RNG, so ``pyro.set_rng_seed`` fixes it.
    With ``grad=True`` ``log_prob`` is differentiable in the LM's parameters (a guide).
    """

    arg_constraints: dict[str, Any] = {}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(
        self,
        lm: LM,
        prompt: str,
        max_tokens: int,
        *,
        grad: bool = False,
        batch_shape: torch.Size | None = None,
    ):
        self.lm, self.prompt, self.max_tokens, self.grad = lm, prompt, max_tokens, grad
        # log-probs of the sequences this distribution drew, from the passes that drew them
        self._drawn: dict[tuple[int, ...], float] = {}
        shape = torch.Size() if batch_shape is None else batch_shape
        super().__init__(shape, torch.Size([max_tokens]), validate_args=False)

    def expand(self, batch_shape: Sequence[int], _instance: Any = None) -> SequenceDistribution:
        new = SequenceDistribution(
            self.lm,
            self.prompt,
            self.max_tokens,
            grad=self.grad,
            batch_shape=torch.Size(batch_shape),
        )
        new._drawn = self._drawn
        return new

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        n = math.prod(shape)
        generator = make_generator(int(torch.randint(0, 2**62, ())))
        batch = self.lm.sample(n, self.max_tokens, prompt=self.prompt, seed=generator)
        for ids, lp in zip(batch.ids, batch.log_probs.tolist()):
            self._drawn[tuple(ids)] = lp
        return self.pad(batch.ids).reshape(*shape, self.max_tokens)

    def pad(self, sequences: Sequence[Ids]) -> Tensor:
        """EOS-padded [N, max_tokens] tensor of sequences."""
        out = torch.full((len(sequences), self.max_tokens), self.lm.eos_id, dtype=torch.long)
        for row, ids in enumerate(sequences):
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def unpad(self, value: Tensor) -> list[Ids]:
        return unpad(value, self.lm.eos_id)

    def mask(self, value: Tensor) -> Tensor:
        """[..., max_tokens] bool: which positions hold a token of the sequence."""
        eos = value == self.lm.eos_id
        before = torch.cumsum(eos.long(), -1) - eos.long()  # EOS tokens strictly before
        return before == 0

    def log_prob(self, value: Tensor) -> Tensor:
        flat = value.reshape(-1, self.max_tokens)
        seqs = self.unpad(flat)
        if self.grad:
            lp = self.lm.log_prob(seqs, prompt=self.prompt)
        else:
            known = [self._drawn.get(tuple(s)) for s in seqs]
            if all(v is not None for v in known):
                lp = torch.tensor(known, dtype=torch.float64)
            else:
                lp = self.lm.score(seqs, prompt=self.prompt)
        return _same_provenance(lp.reshape(value.shape[:-1]), value)


def _same_provenance(result: Tensor, source: Tensor) -> Tensor:
    """Mark ``result`` as computed from ``source``.

    Pyro's TraceGraph_ELBO finds the cost downstream of a sampled site by tracking the
    provenance of tensors; values computed through Python (decoding tokens to text,
    calling a reward) lose it, so the cost would never reach the site's score function.
    """
    provenance = get_provenance(source)
    return track_provenance(result, provenance) if provenance else result


def unpad(value: Tensor, eos_id: int) -> list[Ids]:
    """The held tokens of each EOS-padded row: up to and including the first EOS."""
    out = []
    for row in value.reshape(-1, value.shape[-1]).tolist():
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        out.append(row[:cut])
    return out


def to_pyro(
    model: Model,
    *,
    penalty: float | None = None,
    plate_size: int | None = None,
    lms: Mapping[LM | str, LM] | None = None,
) -> Callable[[], Tensor]:
    """A Pyro model for ``model``: the prior LM as site ``"x"`` and one factor per factor.

    ``penalty=None`` keeps hard constraints exact (log 1[c] ∈ {0, −∞}); a number runs
    ``soften(model, penalty)`` instead, whose violated constraints cost −penalty (what
    score-function SVI needs: a −∞ factor makes the ELBO −∞ and its gradient NaN). ``plate_size`` draws that many sequences at once inside a plate
    ``"samples"``. ``lms`` are the priors' LMs (an engine passes :attr:`kldsl.Target.lms`);
    without them this resolves names now (:func:`kldsl.registry.resolve`).
    """
    model.check()
    if penalty is not None:
        model = soften(model, penalty)
    base = model.base()
    if lms is None:
        lms = resolve_all(model.priors())
    prior_dist = SequenceDistribution(lm_of(base, lms), base.prompt, base.max_tokens)

    def pyro_model() -> Tensor:
        if plate_size is None:
            return _body(model, prior_dist, lms, batch=())
        with pyro.plate("samples", plate_size):
            return _body(model, prior_dist, lms, batch=(plate_size,))

    return pyro_model


def _body(
    model: Model,
    prior_dist: SequenceDistribution,
    lms: Mapping[LM | str, LM],
    batch: tuple[int, ...],
) -> Tensor:
    x = pyro.sample("x", prior_dist.expand(batch) if batch else prior_dist)
    seqs = prior_dist.unpad(x)
    log_a = torch.as_tensor(prior_dist.log_prob(x.reshape(-1, prior_dist.max_tokens))).reshape(-1)
    density = model.log_density(seqs, base_log_probs=log_a, lms=lms)
    for term in density.term_list:
        value = term.values
        if term.kind == "prior":  # the sample site "x" carries log a(x)
            if isinstance(term.node, Prior):
                continue
            value = value - log_a.double()  # a(x)^α: the factor adds (α−1)·log a
        shape = batch if batch else ()
        pyro.factor(term.label, _same_provenance(value.reshape(shape), x))
    return x


def pyro_guide(
    lm: LM, model: Model, *, plate_size: int | None = None, baseline: dict[str, Any] | None = None
) -> Callable[[], Tensor]:
    """A Pyro guide whose trainable ``lm`` proposes site ``"x"`` for ``model``'s prior.

    ``baseline`` goes to the site's ``infer={"baseline": ...}`` (used by TraceGraph_ELBO's
    score-function estimator), e.g. ``{"use_decaying_avg_baseline": True}``.
    """
    base = model.check().base()
    guide_dist = SequenceDistribution(lm, base.prompt, base.max_tokens, grad=True)
    module = torch_module(lm)
    infer = {"baseline": baseline} if baseline else {}

    def guide() -> Tensor:
        if module is not None:
            pyro.module("guide_lm", module)
        if plate_size is None:
            return pyro.sample("x", guide_dist, infer=infer)
        with pyro.plate("samples", plate_size):
            return pyro.sample("x", guide_dist.expand((plate_size,)), infer=infer)

    return guide


def elbo_by_enumeration(model: Model, guide_lm: LM, *, penalty: float | None = None) -> float:
    """Pyro's ELBO E_π[log p(x, factors) − log π(x)] for a fixed guide LM π, exactly.

    Every sequence of π's (enumerable) support is fed to Pyro's traces of ``to_pyro(model)``
    and ``pyro_guide(guide_lm, model)`` with ``poutine.condition``; the ELBO is their
    π-weighted sum. The control-as-inference identity says it equals E_π[r]/β − KL(π‖a)
    and log Z − KL(π‖p*).
    """
    base = model.check().base()
    every = guide_lm.enumerate(base.max_tokens, prompt=base.prompt)
    pyro_model = to_pyro(model, penalty=penalty)
    guide = pyro_guide(guide_lm, model)
    pad = SequenceDistribution(guide_lm, base.prompt, base.max_tokens).pad
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for ids, log_pi in zip(every.ids, every.log_probs):
            if not torch.isfinite(log_pi) or log_pi < -700:  # zero mass: no contribution
                continue
            data = {"x": pad([ids])[0]}
            joint = pyro.poutine.trace(pyro.poutine.condition(pyro_model, data)).get_trace()
            proposal = pyro.poutine.trace(pyro.poutine.condition(guide, data)).get_trace()
            term = joint.log_prob_sum() - proposal.log_prob_sum()
            total = total + log_pi.exp() * torch.as_tensor(term, dtype=torch.float64)
    return float(total)
