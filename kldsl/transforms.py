"""Rewrites of a model graph: each a function graph → graph, a ``match`` over the node kinds.

- :func:`soften` replaces every hard condition ``| c`` by the tilt
  ``exp(indicator(¬c) * -penalty)``: a violation costs ``penalty`` in log p̃ instead of
  excluding x. It is the one finite-penalty target of the engines that need one (reverse
  KL, Pyro SVI, ``to_pyro(penalty=)``); :func:`warn_softened` is their warning.
- :func:`with_prompt` conditions every prior on another prompt (CDPG's p̃(x|c)).
- :func:`compile_moments` replaces every distributional constraint ``| mean(φ) == μ`` by
  the tilt ``exp(φ * λ)`` with its fitted λ (:func:`kldsl.fit_moments` fits λ);
  :func:`strip_moments` drops them (the pointwise model the fit samples from) and
  :func:`moments_of` lists them.

Example:
    >>> import kldsl as kl
    >>> m = kl.prior(kl.ToyLM(), max_tokens=3) * kl.exp(kl.length / 2.0) | ~kl.contains("a")
    >>> str(soften(m, 10.0))
    'prior(toy, max_tokens=3) * exp(length / 2.0) * exp(indicator(contains("a")) * -10.0)'
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import warnings

from kldsl.density import unknown_node
from kldsl.errors import KldslTypeError
from kldsl.graph import (
    Condition,
    ConstraintExpr,
    Indicator,
    Model,
    Moment,
    MomentCondition,
    Not,
    Power,
    Prior,
    Product,
    RMul,
    Tilt,
)


def soften(model: Model, penalty: float) -> Model:
    """``model`` with each hard ``| c`` replaced by the tilt ``exp(indicator(¬c) * -penalty)``.

    The softened target is p̃(x) = a(x)·exp(r(x))·exp(−penalty·1[¬c(x)]): log p̃ is
    unchanged where every constraint holds and ``−penalty`` lower for each one violated.
    """
    if isinstance(penalty, bool) or not isinstance(penalty, int | float):
        raise KldslTypeError(f"penalty must be a number, got {penalty!r}")
    if not math.isfinite(penalty) or penalty < 0:
        raise KldslTypeError(f"penalty must be a finite number ≥ 0, got {penalty}")
    return _soften(model, float(penalty))


def _soften(model: Model, penalty: float) -> Model:
    match model:
        case Prior() | Power() | Tilt():
            return model
        case Product(terms):
            return functools.reduce(operator.mul, (_soften(t, penalty) for t in terms))
        case Condition(inner, constraint):
            return _soften(inner, penalty) * Tilt(RMul(Indicator(_negated(constraint)), -penalty))
        case MomentCondition(inner, moment):
            return MomentCondition(_soften(inner, penalty), moment)
        case _:
            raise unknown_node(model, "soften()")


def _negated(constraint: ConstraintExpr) -> ConstraintExpr:
    """¬c, without a double negation."""
    return constraint.expr if isinstance(constraint, Not) else Not(constraint)


def warn_softened(model: Model, penalty: float, *, who: str, why: str, hint: str = "") -> Model:
    """Warn that ``who`` fits :func:`soften` (``model``, ``penalty``) and return that graph.

    ``why`` says why a −∞ factor is impossible for it; ``hint`` adds an alternative.
    The message prints the softened graph: the target actually fitted (``explain()`` it).
    """
    softened = soften(model, penalty)
    shown = " and ".join(f"`{c}`" for c in model.conditions())
    warnings.warn(
        f"{who} with the hard constraint {shown}: {why}, so a violation gets "
        f"log 1[c] = −{penalty:g} instead of −∞; π targets a·exp(r/β)·exp(−{penalty:g}·"
        f"[violation]), the graph `{softened}`. Set penalty= to change it{hint}.",
        stacklevel=4,  # the caller of the engine's run()
    )
    return softened


def with_prompt(model: Model, prompt: str) -> Model:
    """The same model graph with every prior conditioned on ``prompt`` instead."""
    match model:
        case Prior():
            return dataclasses.replace(model, prompt=prompt)
        case Power(prior, _):
            return dataclasses.replace(model, prior=with_prompt(prior, prompt))
        case Product(terms):
            return Product(tuple(with_prompt(t, prompt) for t in terms))
        case Condition(inner, _) | MomentCondition(inner, _):
            return dataclasses.replace(model, model=with_prompt(inner, prompt))
        case Tilt():
            return model  # a tilt does not see the prompt
        case _:
            raise unknown_node(model, "with_prompt()")


def moments_of(model: Model) -> list[Moment]:
    """The distributional constraints ``mean(φ) == μ`` of ``model``, in factor order."""
    return [f.moment for f in model.factors() if isinstance(f, MomentCondition)]


def strip_moments(model: Model) -> Model:
    """``model`` without its distributional constraints: a(x)·[pointwise factors]."""
    return compile_moments(model, {})


def compile_moments(model: Model, lambdas: dict[Moment, float]) -> Model:
    """``model`` with each ``| mean(φ) == μ`` replaced by ``* exp(φ * λ)``, λ = ``lambdas[m]``
    (a moment missing from ``lambdas`` is dropped: :func:`strip_moments`).

    Example:
        >>> import kldsl as kl
        >>> m = kl.prior(kl.ToyLM(), max_tokens=3) | (kl.mean(kl.length) == 2)
        >>> str(compile_moments(m, {moments_of(m)[0]: 0.5}))
        'prior(toy, max_tokens=3) * exp(length * 0.5)'
    """
    match model:
        case Prior() | Power() | Tilt():
            return model
        case Product(terms):
            return functools.reduce(operator.mul, (compile_moments(t, lambdas) for t in terms))
        case Condition(inner, constraint):
            return compile_moments(inner, lambdas) | constraint
        case MomentCondition(inner, moment):
            compiled = compile_moments(inner, lambdas)
            if moment not in lambdas:
                return compiled
            return compiled * Tilt(RMul(moment.feature, float(lambdas[moment])))
        case _:
            raise unknown_node(model, "compile_moments()")
