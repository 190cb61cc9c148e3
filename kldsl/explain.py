"""``model.explain()``: the target's mathematics and a table of its factors."""

from __future__ import annotations

import math

from kldsl.density import factors_of, leaves, unknown_node
from kldsl.errors import shorten
from kldsl.graph import (
    And,
    Condition,
    Constraint,
    ConstraintExpr,
    Indicator,
    Model,
    MomentCondition,
    Node,
    Not,
    Or,
    Power,
    Prior,
    RAdd,
    RDiv,
    Reward,
    RewardExpr,
    RMul,
    RNeg,
    Tilt,
    _num,
    _prior_symbols,
)
from kldsl.moments import fit_of


def math_reward(expr: RewardExpr) -> str:
    """A reward in maths notation, e.g. ``sentiment(x)/0.2``."""
    match expr:
        case Reward():
            return f"{expr}(x)" if not (expr.args or expr.kwargs) else f"{expr}[x]"
        case RDiv(inner, c):
            return f"{_paren(inner)}/{_num(c)}"
        case RMul(inner, c):
            return f"{_num(c)}·{_paren(inner)}"
        case RAdd(left, RNeg(right)):
            return f"{math_reward(left)} − {_paren(right)}"
        case RAdd(left, right):
            return f"{math_reward(left)} + {math_reward(right)}"
        case RNeg(inner):
            return f"−{_paren(inner)}"
        case Indicator(constraint):
            return f"1[{math_constraint(constraint)}]"
    raise unknown_node(expr, "explain")


def _paren(expr: RewardExpr) -> str:
    text = math_reward(expr)
    return f"({text})" if isinstance(expr, RAdd | RNeg) else text


def math_constraint(expr: ConstraintExpr) -> str:
    """A constraint in maths notation, e.g. ``¬curse(x)``."""
    match expr:
        case Constraint():
            return f"{expr}(x)" if not (expr.args or expr.kwargs) else f"{expr}[x]"
        case Not(inner):
            text = math_constraint(inner)
            return f"¬{text}" if isinstance(inner, Constraint | Not) else f"¬({text})"
        case And(left, right):
            return f"{_cparen(left, Or)} ∧ {_cparen(right, Or)}"
        case Or(left, right):
            return f"{_cparen(left, And)} ∨ {_cparen(right, And)}"
    raise unknown_node(expr, "explain")


def _cparen(expr: ConstraintExpr, other: type) -> str:
    text = math_constraint(expr)
    return f"({text})" if isinstance(expr, other) else text


def _interval(lo: float, hi: float) -> str:
    def f(v: float) -> str:
        return "∞" if v == math.inf else "−∞" if v == -math.inf else f"{v + 0.0:g}"  # no −0

    return f"[{f(lo)}, {f(hi)}]"


def formula(model: Model) -> str:
    """``p̃(x) = a(x)·exp(r(x)/β)·1[¬c(x)]`` for this model."""
    symbols = _prior_symbols(model)
    parts = []
    for f in factors_of(model):
        match f.node:
            case Prior():
                parts.append(f"{symbols[f.node]}(x)")
            case Power(prior, alpha):
                parts.append(f"{symbols[prior]}(x)^{_num(alpha)}")
            case Tilt(reward):
                parts.append(f"exp({math_reward(reward)})")
            case Condition(_, constraint):
                parts.append(f"1[{math_constraint(constraint)}]")
            case MomentCondition(_, moment):
                parts.append(f"exp({_lambda(model, f.node)}·{_paren(moment.feature)})")
            case _:
                raise unknown_node(f.node, "explain")
    return "p̃(x) = " + "·".join(parts)


def _lambda(model: Model, node: MomentCondition) -> str:
    """λ, or λ₁, λ₂, ... when the model has several distributional constraints."""
    nodes = [f for f in model.factors() if isinstance(f, MomentCondition)]
    if len(nodes) == 1:
        return "λ"
    return "λ" + "".join("₀₁₂₃₄₅₆₇₈₉"[int(d)] for d in str(nodes.index(node) + 1))


def explain(model: Model) -> str:
    """The maths of ``model`` and one table row per factor."""
    model.check()
    symbols = _prior_symbols(model)
    rows: list[tuple[str, str, str, str]] = []
    softened = False
    fit = fit_of(model)
    fitted: dict[Node, str] = {}  # the tilts a fit compiled, with their constraint
    if fit is not None:
        compiled = [f for f in fit.model.factors() if isinstance(f, Tilt)]
        declared = {f for f in fit.declared.factors() if isinstance(f, Tilt)}
        for tilt, moment in zip([t for t in compiled if t not in declared], fit.moments):
            fitted[tilt] = str(moment)
    for factor in factors_of(model):
        f, kind = factor.node, factor.kind
        match f:
            case Prior() | Power():
                prior = f.prior if isinstance(f, Power) else f
                name = prior.model if isinstance(prior.model, str) else prior.model.name
                what = f"LM {name}"
                if prior.prompt:
                    what += f", prompt {shorten(repr(prior.prompt))}"
                if kind == "prior":
                    what += f", ≤ {prior.max_tokens} tokens; the base: x is drawn from it"
                else:
                    what += "; another expert, scored on the base's tokens"
                alpha = f" (tempered by {_num(f.alpha)})" if isinstance(f, Power) else ""
                rows.append((f"{symbols[prior]}(x)" + alpha, kind, "log-prob", what))
            case Tilt(reward):
                lo, hi = reward.bounds()
                notes = "; ".join(
                    f"{leaf}: {leaf.doc}" if leaf.doc else str(leaf)
                    for leaf in dict.fromkeys(leaves(reward))
                )
                if f in fitted:
                    notes += f" (the fitted λ of `{shorten(fitted[f])}`)"
                elif any(isinstance(n, Indicator) for n in _nodes(reward)):
                    softened = True
                    notes += " (a softened hard constraint: a violation costs, never excludes)"
                rows.append((f"exp({math_reward(reward)})", kind, f"∈ {_interval(lo, hi)}", notes))
            case Condition(_, constraint):
                notes = "; ".join(
                    f"{leaf}: {leaf.doc}" if leaf.doc else str(leaf)
                    for leaf in dict.fromkeys(constraint.leaves())
                )
                if constraint.prefix_closed:
                    notes += " (prefix-closed: a violating prefix can be pruned)"
                rows.append((f"1[{math_constraint(constraint)}]", kind, "0 or −∞", notes))
            case MomentCondition(_, moment):
                phi = math_reward(moment.feature)
                lam = _lambda(model, f)
                notes = f"{lam} such that E_p*[{phi}] = {_num(moment.value)}; not fitted yet"
                rows.append((f"exp({lam}·{_paren(moment.feature)})", kind, "λ·φ", notes))
            case _:
                raise unknown_node(f, "explain")
    header = ("factor", "kind", "log value", "meaning")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        str(model),
        "",
        formula(model),
        "p*(x) = p̃(x) / Z,   Z = Σ_x p̃(x)",
        "",
        "  ".join(h.ljust(w) for h, w in zip(header, [*widths, 0])).rstrip(),
    ]
    lines.append("  ".join("─" * w for w in [*widths, len(header[3])]))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, [*widths, 0])).rstrip())
    if model.conditions():
        lines += [
            "",
            "Hard constraints put log p̃ = −∞ on violations: Z is then the prior probability of "
            "satisfying them (times the tilt), and KL(p*‖a) ≥ −log Z.",
        ]
    if any(isinstance(f, MomentCondition) for f in model.factors()):
        lines += [
            "",
            "mean(φ) == μ is a distributional constraint: p* is the distribution closest to "
            "the pointwise factors' posterior (in KL) whose mean of φ is μ, an exponential tilt "
            "exp(λ·φ). kl.fit_moments(model, n=...) fits λ and compiles the graph for the "
            "engines.",
        ]
    if fit is not None:
        lines += ["", f"Fitted from `{shorten(str(fit.declared), 200)}`:", fit.summary()]
    if softened:
        lines += [
            "",
            "exp(−k·1[¬c(x)]) is a hard constraint c softened: a violation lowers log p̃ by k "
            "instead of excluding x, so p* still puts some mass on violations.",
        ]
    return "\n".join(lines)


def _nodes(node: Node) -> list[Node]:
    """``node`` and every node under it."""
    return [node, *(n for c in node._children() if isinstance(c, Node) for n in _nodes(c))]
