"""The density interpreter: what a model graph's factors mean on a batch of sequences.

A model's factors (:meth:`Model.factors`) form a closed set of nodes: a prior ``Prior``,
a tempered prior ``Power``, a tilt ``Tilt``, a hard constraint ``Condition`` and a
distributional constraint ``MomentCondition`` (which has no pointwise meaning until
:func:`kldsl.fit_moments` rewrites it into a tilt: :func:`full_values` refuses it). Each has
a kind (:func:`factors_of`: the base prior, another expert, a tilt, a constraint) and a
meaning on complete sequences (:func:`full_values`); both are a ``match`` over the node
kinds that refuses any other node. :func:`log_density` sums the meanings into a
:class:`~kldsl.graph.Density` whose terms carry their kind and factor node, so engines read
those and never parse labels.

A second interpretation of the same factors (e.g. checks of each factor on *prefixes* of a
sequence, for a token-level SMC) is one more function ``match``-ing the factor nodes and
reading the same :class:`Batch` memo.

Example:
    >>> import kldsl as kl
    >>> m = kl.prior(kl.ToyLM(), max_tokens=2) * kl.exp(kl.length / 2.0) | ~kl.contains("a")
    >>> [(f.label, f.kind) for f in factors_of(m)]
    [('log a', 'prior'), ('length / 2.0', 'tilt'), ('1[not contains("a")]', 'constraint')]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kldsl.errors import KldslInferenceError, KldslTypeError, shorten
from kldsl.graph import (
    Condition,
    Constraint,
    ConstraintExpr,
    Density,
    Model,
    MomentCondition,
    Node,
    Power,
    Prior,
    Reward,
    RewardExpr,
    Tilt,
    _call_leaf,
    _num,
    _prior_symbols,
    shown,
)
from kldsl.lm import LM
from kldsl.registry import lm_of


def unknown_node(node: object, where: str) -> KldslTypeError:
    """The error for a node outside the closed set a ``match`` knows, naming its type."""
    return KldslTypeError(
        f"{where} does not know the node type {type(node).__name__} "
        f"(`{shown(node)}`); the graph's factors are Prior, Power, Tilt, Condition and "
        "MomentCondition"
    )


@dataclass(frozen=True)
class Factor:
    """A factor node of a model with its kind and its (unique) label."""

    node: Model
    kind: str  # one of kldsl.graph.KINDS
    label: str


def factors_of(model: Model) -> list[Factor]:
    """Every factor of ``model`` in order, with its kind and label.

    The first prior (tempered or not) is the base, kind "prior"; every later one is an
    "expert" (even one equal to the base: it multiplies p̃ again).
    """
    symbols = _prior_symbols(model)
    out: list[Factor] = []
    seen: set[str] = set()
    for f in model.factors():
        match f:
            case Prior() | Power():
                prior = f.prior if isinstance(f, Power) else f
                kind = "expert" if any(x.kind == "prior" for x in out) else "prior"
                alpha = f"^{_num(f.alpha)}" if isinstance(f, Power) and f.alpha != 1.0 else ""
                label = f"log {symbols[prior]}{alpha}"
            case Tilt(reward):
                kind, label = "tilt", str(reward)
            case Condition(_, constraint):
                kind, label = "constraint", f"1[{constraint}]"
            case MomentCondition(_, moment):
                kind, label = "moment", str(moment)
            case _:
                raise unknown_node(f, "the density interpreter")
        out.append(Factor(f, kind, _unique(seen, label)))
    return out


def _unique(seen: set[str], label: str) -> str:
    out, k = label, 2
    while out in seen:
        out, k = f"{label} #{k}", k + 1
    seen.add(out)
    return out


def leaves(node: Node) -> list[Reward | Constraint]:
    """The reward and constraint leaves under ``node`` (an indicator's constraints too)."""
    if isinstance(node, Reward | Constraint):
        return [node]
    return [leaf for child in node._children() if isinstance(child, Node) for leaf in leaves(child)]


class Batch:
    """The sequences a model is interpreted on, with a memo of what is computed once.

    ``memo`` maps each prior node to its log-probs log a(x) [N] (untempered) and each
    leaf to its values [N]; it is the ``cache`` of the resulting Density. ``lms`` holds the
    resolved LM of each prior's model (None: resolve names now, see :func:`log_density`).
    """

    def __init__(
        self,
        base: Prior,
        sequences: Sequence[Sequence[int]],
        texts: list[str],
        batch_size: int,
        memo: dict[Node, Tensor],
        lms: Mapping[LM | str, LM] | None = None,
    ):
        self.base, self.sequences, self.texts = base, sequences, texts
        self.batch_size, self.memo, self.lms = batch_size, memo, lms

    def __len__(self) -> int:
        return len(self.sequences)

    def log_probs(self, prior: Prior) -> Tensor:
        """log-probs of the sequences under ``prior`` (the base's tokens; scored once)."""
        if prior not in self.memo:
            lm = lm_of(prior, self.lms)
            if prior is not self.base:
                _check_same_tokenizer(lm_of(self.base, self.lms), lm)
            lp = lm.score(self.sequences, prompt=prior.prompt, batch_size=self.batch_size)
            self.memo[prior] = lp.double().cpu()
        return self.memo[prior]

    def value(self, expr: RewardExpr | ConstraintExpr) -> Tensor:
        """A reward's values (float64) or a constraint's truth values (bool) [N]."""
        for leaf in leaves(expr):
            if leaf not in self.memo:
                dtype = torch.float64 if isinstance(leaf, Reward) else torch.bool
                n, size = len(self), self.batch_size
                parts = [
                    _call_leaf(leaf, self.texts[i : i + size], dtype) for i in range(0, n, size)
                ]
                self.memo[leaf] = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)
        return expr.evaluate(self.memo)  # type: ignore[arg-type]


def full_values(node: Model, batch: Batch) -> Tensor:
    """A factor's log contribution to log p̃ of each complete sequence [N] float64."""
    match node:
        case Prior():
            return batch.log_probs(node).double()
        case Power(prior, alpha):
            return alpha * batch.log_probs(prior).double()
        case Tilt(reward):
            return batch.value(reward).double()
        case Condition(_, constraint):
            return torch.where(batch.value(constraint), 0.0, -math.inf).double()
        case MomentCondition(_, moment):
            raise unfitted_error(moment)
        case _:
            raise unknown_node(node, "the density interpreter")


def unfitted_error(moment: Node) -> KldslInferenceError:
    """The error for a distributional constraint met before its λ is fitted."""
    return KldslInferenceError(
        f"`{shorten(str(moment))}` is a distributional constraint: it sets a mean over all "
        "samples, so it has no value on one sample until its λ is fitted. Compile it first: "
        "`fit = kl.fit_moments(model, n=1024)` and run engines on `fit.model` (the kldsl "
        "command line does this itself; --moment-n sets its sample size)"
    )


def log_density(
    model: Model,
    sequences: Sequence[Sequence[int]],
    *,
    base_log_probs: Tensor | None = None,
    texts: list[str] | None = None,
    batch_size: int = 64,
    reuse: Density | None = None,
    lms: Mapping[LM | str, LM] | None = None,
) -> Density:
    """log p̃(x) [N] of ``model`` with its terms (see :meth:`Model.log_density`).

    ``lms`` are the LMs of the priors' models, from the caller (a :class:`kldsl.Target`
    resolves them once); when None, as in a user's direct call, this resolves names now
    (:func:`kldsl.registry.resolve`).
    """
    base = model.base()
    factors = factors_of(model)
    for f in factors:  # before anything is scored
        if isinstance(f.node, MomentCondition):
            raise unfitted_error(f.node.moment)
    if texts is None:
        texts = reuse.texts if reuse is not None else lm_of(base, lms).texts(sequences)
    memo: dict[Node, Tensor] = {}
    if reuse is not None and reuse.cache is not None:
        if len(reuse.texts) != len(sequences):
            raise KldslTypeError(
                f"reuse= holds a density of {len(reuse.texts)} sequences, not of these "
                f"{len(sequences)}"
            )
        memo.update(reuse.cache)
    if base_log_probs is not None:
        memo[base] = base_log_probs.double().cpu()
    batch = Batch(base, sequences, texts, batch_size, memo, lms)
    batch.log_probs(base)  # the base first (as a sampler scores it), then the factors

    terms: dict[str, Tensor] = {}
    rewards: dict[str, Tensor] = {}
    constraints: dict[str, Tensor] = {}
    seen: set[str] = set()
    for f in factors:
        terms[f.label] = full_values(f.node, batch)
        if isinstance(f.node, Tilt):
            for leaf in f.node.reward.leaves():
                rewards[str(leaf)] = memo[leaf]
        elif isinstance(f.node, Condition):
            constraints[_unique(seen, str(f.node.constraint))] = batch.value(f.node.constraint)
    total = torch.zeros(len(sequences), dtype=torch.float64)
    for value in terms.values():
        total = total + value
    return Density(
        total,
        terms,
        rewards,
        constraints,
        texts,
        factors={f.label: (f.kind, f.node) for f in factors},
        cache=memo,
    )


def _check_same_tokenizer(base: LM, other: LM) -> None:
    if base.tokenizer_signature() != other.tokenizer_signature():
        raise KldslTypeError(
            f"a product of experts needs LMs that share a tokenizer: {base.name} and "
            f"{other.name} tokenize differently"
        )
