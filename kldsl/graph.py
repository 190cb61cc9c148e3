"""The model graph: a closed set of frozen, hashable node kinds.

A model is built from a prior LM, tilts ``exp(reward)`` and hard conditions
``| constraint``; the graph denotes the unnormalised target

    p̃(x) = a(x) · exp(r(x)/β) · 1[c(x)]

``str(node)`` prints DSL text that :func:`kldsl.parse` reads back to an equal node.
Python operators and the text grammar build the same nodes; engines interpret them
through :meth:`Model.log_density` and :meth:`Model.base`.

Example:
    >>> import kldsl as kl
    >>> m = kl.prior(kl.ToyLM(), max_tokens=4) * kl.exp(kl.length / 2.0) | ~kl.contains("a")
    >>> str(m)
    'prior(toy, max_tokens=4) * exp(length / 2.0) | not contains("a")'
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kldsl.errors import KldslRewardError, KldslTypeError, shorten
from kldsl.lm import LM
from kldsl.values import constraint_values, reward_values

Number = int | float

# Precedence of the text grammar, loosest first; the printer parenthesises by it.
P_COND, P_OR, P_AND, P_NOT, P_SUM, P_PROD, P_NEG, P_POW, P_ATOM = range(1, 10)

#: The deepest a graph may nest (a leaf has depth 1, each operator adds one): building a
#: deeper node is an error, so printing, evaluating and explaining (recursive) stay safe.
MAX_DEPTH = 200

# The grammar's NAME terminal: a name prints bare only when it reads back as a name.
_NAME = re.compile(r"(?!(not|and|or)\b)[^\W\d]\w*")


def _num(x: Number) -> str:
    return repr(int(x)) if isinstance(x, int) else repr(float(x))


def _wrap(node: Node, need: int) -> str:
    text, prec = node._fmt()
    return f"({text})" if prec < need else text


def _args_text(args: tuple, kwargs: tuple[tuple[str, Any], ...]) -> str:
    parts = [_literal(a) for a in args] + [f"{k}={_literal(v)}" for k, v in kwargs]
    return ", ".join(parts)


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        raise KldslTypeError("booleans have no DSL literal")
    if isinstance(value, int | float):
        return _num(value)
    if isinstance(value, LM):
        return _name_text(value.name)
    raise KldslTypeError(f"{shown(value)} has no DSL literal")


def _name_text(name: str) -> str:
    """``name`` bare when the grammar reads it as a name, else as a string literal."""
    return name if _NAME.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def shown(value: Any) -> str:
    """``value`` as a message quotes it: DSL text of a node, repr of anything else, cut short."""
    return shorten(str(value) if isinstance(value, Node) else repr(value))


def surrogate_at(text: str) -> int | None:
    """The index of the first lone surrogate in ``text`` (no encoder writes one), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _finite(value: float, what: Callable[[], str]) -> None:
    """Raise unless ``value`` is finite; ``what()`` names it (built only for the message)."""
    if not math.isfinite(value):
        raise KldslTypeError(f"{what()} must be a finite number, got {value}")


class Node:
    """Base of every graph node; ``str(node)`` is its DSL text."""

    def __post_init__(self) -> None:
        if self.depth > MAX_DEPTH:
            raise KldslTypeError(
                f"the expression nests {self.depth} levels deep, more than the {MAX_DEPTH} "
                "kldsl allows; combine fewer terms in one expression"
            )

    @functools.cached_property
    def depth(self) -> int:
        """1 for a leaf, else 1 + the depth of the deepest child (cached: nodes are frozen)."""
        return 1 + max((c.depth for c in self._children() if isinstance(c, Node)), default=0)

    def _children(self) -> tuple[Any, ...]:
        return ()

    def _fmt(self) -> tuple[str, int]:
        raise NotImplementedError

    def __str__(self) -> str:
        return self._fmt()[0]


# ---------------------------------------------------------------------------------------
# Rewards: batched text -> float functions and arithmetic over them
# ---------------------------------------------------------------------------------------


class RewardExpr(Node):
    """A reward: a real-valued function of the text. Supports ``/ β``, ``* c``, ``+``, ``-``."""

    def __truediv__(self, other: Number) -> RewardExpr:
        c = _scalar(other, "a reward can only be divided by a number (β)")
        if c <= 0:
            raise KldslTypeError(
                f"β must be > 0 in `{shown(self)} / β` (got {other}); to prefer low rewards "
                f"write `exp(-{shorten(_wrap(self, P_NEG))} / β)` with a positive β"
            )
        return RDiv(self, c)

    def __mul__(self, other: Number) -> RewardExpr:
        if isinstance(other, RewardExpr):
            raise KldslTypeError("rewards multiply only with numbers; add them with `+`")
        if isinstance(other, Node):
            raise KldslTypeError(
                f"`{shown(self)} * {shown(other)}`: a reward is not a factor of a model; "
                f"write `exp({shown(self)}) * ...` to tilt by it"
            )
        return RMul(self, _scalar(other, "a reward can only be multiplied by a number"))

    __rmul__ = __mul__

    def __add__(self, other: RewardExpr) -> RewardExpr:
        if not isinstance(other, RewardExpr):
            raise KldslTypeError(
                f"`{shown(self)} + {shown(other)}`: only rewards can be added to a reward"
            )
        return RAdd(self, other)

    def __sub__(self, other: RewardExpr) -> RewardExpr:
        if not isinstance(other, RewardExpr):
            raise KldslTypeError(
                f"`{shown(self)} - {shown(other)}`: only rewards can be subtracted"
            )
        return RAdd(self, RNeg(other))

    def __neg__(self) -> RewardExpr:
        return RNeg(self)

    def __or__(self, other: Any) -> Any:
        raise KldslTypeError(
            f"`{shown(self)} | ...`: `|` conditions a model on a constraint; "
            f"write `prior(...) * exp({shown(self)}) | constraint`"
        )

    def bounds(self) -> tuple[float, float]:
        """Interval (lo, hi) holding every value of the reward (±inf when unknown)."""
        raise NotImplementedError

    def leaves(self) -> list[Reward]:
        raise NotImplementedError

    def evaluate(self, values: dict[Reward, Tensor]) -> Tensor:
        """The reward from its leaves' values [N]."""
        raise NotImplementedError


@dataclass(frozen=True)
class Reward(RewardExpr):
    """A named leaf reward: a batched function ``list[str] -> list[float]``.

    Built-ins compare equal by name and arguments; user rewards by their function.
    """

    name: str = field(compare=False)  # how it prints
    fn: Callable[[list[str]], Sequence[float]] = field(compare=False, repr=False)
    key: tuple = ()  # identity: ("builtin", name, args, kwargs) or ("user", fn)
    args: tuple = field(default=(), compare=False)  # printed call arguments of a built-in
    kwargs: tuple[tuple[str, Any], ...] = field(default=(), compare=False)
    lo: float = field(default=-math.inf, compare=False)  # declared lower bound of values
    hi: float = field(default=math.inf, compare=False)  # declared upper bound of values
    doc: str = field(default="", compare=False)

    def _fmt(self) -> tuple[str, int]:
        if self.args or self.kwargs:
            return f"{self.name}({_args_text(self.args, self.kwargs)})", P_ATOM
        return self.name, P_ATOM

    def bounds(self) -> tuple[float, float]:
        return (self.lo, self.hi)

    def leaves(self) -> list[Reward]:
        return [self]

    def evaluate(self, values: dict[Reward, Tensor]) -> Tensor:
        return values[self]

    def __call__(self, texts: list[str]) -> Tensor:
        """Evaluate on texts, checking the result (NaN, wrong length, exceptions)."""
        return _call_leaf(self, texts, torch.float64)


@dataclass(frozen=True)
class RDiv(RewardExpr):
    """``expr / c`` with c > 0 (a temperature β)."""

    expr: RewardExpr
    c: float

    def __post_init__(self) -> None:
        _finite(self.c, lambda: f"β in `{shown(self.expr)} / β`")
        super().__post_init__()

    def _children(self) -> tuple[Any, ...]:
        return (self.expr,)

    def _fmt(self) -> tuple[str, int]:
        return f"{_wrap(self.expr, P_PROD)} / {_num(self.c)}", P_PROD

    def bounds(self) -> tuple[float, float]:
        lo, hi = self.expr.bounds()
        return (lo / self.c, hi / self.c)

    def leaves(self) -> list[Reward]:
        return self.expr.leaves()

    def evaluate(self, values: dict[Reward, Tensor]) -> Tensor:
        return self.expr.evaluate(values) / self.c


@dataclass(frozen=True)
class RMul(RewardExpr):
    """``expr * c`` for a number c."""

    expr: RewardExpr
    c: float

    def __post_init__(self) -> None:
        _finite(self.c, lambda: f"the factor c in `{shown(self.expr)} * c`")
        super().__post_init__()

    def _children(self) -> tuple[Any, ...]:
        return (self.expr,)

    def _fmt(self) -> tuple[str, int]:
        return f"{_wrap(self.expr, P_PROD)} * {_num(self.c)}", P_PROD

    def bounds(self) -> tuple[float, float]:
        lo, hi = self.expr.bounds()
        if self.c == 0:
            return (0.0, 0.0)
        a, b = lo * self.c, hi * self.c
        return (min(a, b), max(a, b))

    def leaves(self) -> list[Reward]:
        return self.expr.leaves()

    def evaluate(self, values: dict[Reward, Tensor]) -> Tensor:
        return self.expr.evaluate(values) * self.c


@dataclass(frozen=True)
class RAdd(RewardExpr):
    """``left + right`` (``left - right`` is ``left + -right``)."""

    left: RewardExpr
    right: RewardExpr

    def _children(self) -> tuple[Any, ...]:
        return (self.left, self.right)

    def _fmt(self) -> tuple[str, int]:
        if isinstance(self.right, RNeg):
            return f"{_wrap(self.left, P_SUM)} - {_wrap(self.right.expr, P_PROD)}", P_SUM
        return f"{_wrap(self.left, P_SUM)} + {_wrap(self.right, P_PROD)}", P_SUM

    def bounds(self) -> tuple[float, float]:
        (a, b), (c, d) = self.left.bounds(), self.right.bounds()
        return (a + c, b + d)

    def leaves(self) -> list[Reward]:
        return self.left.leaves() + self.right.leaves()

    def evaluate(self, values: dict[Reward, Tensor]) -> Tensor:
        return self.left.evaluate(values) + self.right.evaluate(values)


@dataclass(frozen=True)
class RNeg(RewardExpr):
    """``-expr``."""

    expr: RewardExpr

    def _children(self) -> tuple[Any, ...]:
        return (self.expr,)

    def _fmt(self) -> tuple[str, int]:
        return f"-{_wrap(self.expr, P_NEG)}", P_NEG

    def bounds(self) -> tuple[float, float]:
        lo, hi = self.expr.bounds()
        return (-hi, -lo)

    def leaves(self) -> list[Reward]:
        return self.expr.leaves()

    def evaluate(self, values: dict[Reward, Tensor]) -> Tensor:
        return -self.expr.evaluate(values)


@dataclass(frozen=True)
class Indicator(RewardExpr):
    """``indicator(c)``: the reward 1[c(x)] ∈ {0, 1} of a constraint.

    :func:`kldsl.transforms.soften` tilts by ``indicator(¬c) * -penalty`` in place of a hard
    ``| c``. Its leaves are constraints, so :meth:`leaves` (reward leaves) is empty.
    """

    constraint: ConstraintExpr

    def __post_init__(self) -> None:
        if not isinstance(self.constraint, ConstraintExpr):
            raise KldslTypeError(f"indicator() takes a constraint; got {shown(self.constraint)}")
        super().__post_init__()

    def _children(self) -> tuple[Any, ...]:
        return (self.constraint,)

    def _fmt(self) -> tuple[str, int]:
        return f"indicator({self.constraint})", P_ATOM

    def bounds(self) -> tuple[float, float]:
        return (0.0, 1.0)

    def leaves(self) -> list[Reward]:
        return []

    def evaluate(self, values: dict[Node, Tensor]) -> Tensor:  # type: ignore[override]
        """1.0 where the constraint holds, else 0.0 (``values`` holds its constraint leaves)."""
        return self.constraint.evaluate(values).double()  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Constraints: batched text -> bool functions and logic over them
# ---------------------------------------------------------------------------------------


class ConstraintExpr(Node):
    """A hard constraint. Python: ``~c``, ``c1 & c2``, ``c1 | c2``; text: not / and / or."""

    def __invert__(self) -> ConstraintExpr:
        return Not(self)

    def __and__(self, other: ConstraintExpr) -> ConstraintExpr:
        return And(self, _constraint(other, "&"))

    def __or__(self, other: ConstraintExpr) -> ConstraintExpr:
        return Or(self, _constraint(other, "|"))

    def __mul__(self, other: Any) -> Any:
        raise KldslTypeError(
            f"`{shown(self)} * ...`: a constraint is not a factor; "
            f"write `prior(...) | {shown(self)}` "
            "to condition on it"
        )

    __rmul__ = __mul__

    @property
    def prefix_closed(self) -> bool:
        """True when a prefix that violates it cannot be extended into one that satisfies it."""
        raise NotImplementedError

    @property
    def upward_closed(self) -> bool:
        """True when a prefix that satisfies it cannot be extended into one that violates it."""
        raise NotImplementedError

    def leaves(self) -> list[Constraint]:
        raise NotImplementedError

    def evaluate(self, values: dict[Constraint, Tensor]) -> Tensor:
        raise NotImplementedError


def _constraint(other: Any, op: str) -> ConstraintExpr:
    if not isinstance(other, ConstraintExpr):
        raise KldslTypeError(f"`{op}` combines two constraints; got {shown(other)}")
    return other


@dataclass(frozen=True)
class Constraint(ConstraintExpr):
    """A named leaf constraint: a batched function ``list[str] -> list[bool]``.

    ``closed`` says how it behaves on extensions of a text (over complete words):
    "prefix" (a violation persists), "upward" (a satisfaction persists) or "".
    ``prefix``, when given, decides it on the text p of an unfinished sequence: a batched
    function returning, per text, True (every text that starts with p satisfies it),
    False (none does) or None (cannot tell); see :mod:`kldsl.prefix`.
    """

    name: str = field(compare=False)
    fn: Callable[[list[str]], Sequence[bool]] = field(compare=False, repr=False)
    key: tuple = ()
    args: tuple = field(default=(), compare=False)
    kwargs: tuple[tuple[str, Any], ...] = field(default=(), compare=False)
    closed: str = field(default="", compare=False)
    doc: str = field(default="", compare=False)
    prefix: Callable[[list[str]], Sequence[bool | None]] | None = field(
        default=None, compare=False, repr=False
    )

    def _fmt(self) -> tuple[str, int]:
        if self.args or self.kwargs:
            return f"{self.name}({_args_text(self.args, self.kwargs)})", P_ATOM
        return self.name, P_ATOM

    @property
    def prefix_closed(self) -> bool:
        return self.closed == "prefix"

    @property
    def upward_closed(self) -> bool:
        return self.closed == "upward"

    def leaves(self) -> list[Constraint]:
        return [self]

    def evaluate(self, values: dict[Constraint, Tensor]) -> Tensor:
        return values[self]

    def __call__(self, texts: list[str]) -> Tensor:
        return _call_leaf(self, texts, torch.bool)


@dataclass(frozen=True)
class Not(ConstraintExpr):
    expr: ConstraintExpr

    def _children(self) -> tuple[Any, ...]:
        return (self.expr,)

    def _fmt(self) -> tuple[str, int]:
        return f"not {_wrap(self.expr, P_NOT)}", P_NOT

    @property
    def prefix_closed(self) -> bool:
        return self.expr.upward_closed

    @property
    def upward_closed(self) -> bool:
        return self.expr.prefix_closed

    def leaves(self) -> list[Constraint]:
        return self.expr.leaves()

    def evaluate(self, values: dict[Constraint, Tensor]) -> Tensor:
        return ~self.expr.evaluate(values)


@dataclass(frozen=True)
class And(ConstraintExpr):
    left: ConstraintExpr
    right: ConstraintExpr

    def _children(self) -> tuple[Any, ...]:
        return (self.left, self.right)

    def _fmt(self) -> tuple[str, int]:
        return f"{_wrap(self.left, P_AND)} and {_wrap(self.right, P_NOT)}", P_AND

    @property
    def prefix_closed(self) -> bool:
        return self.left.prefix_closed and self.right.prefix_closed

    @property
    def upward_closed(self) -> bool:
        return self.left.upward_closed and self.right.upward_closed

    def leaves(self) -> list[Constraint]:
        return self.left.leaves() + self.right.leaves()

    def evaluate(self, values: dict[Constraint, Tensor]) -> Tensor:
        return self.left.evaluate(values) & self.right.evaluate(values)


@dataclass(frozen=True)
class Or(ConstraintExpr):
    left: ConstraintExpr
    right: ConstraintExpr

    def _children(self) -> tuple[Any, ...]:
        return (self.left, self.right)

    def _fmt(self) -> tuple[str, int]:
        return f"{_wrap(self.left, P_OR)} or {_wrap(self.right, P_AND)}", P_OR

    @property
    def prefix_closed(self) -> bool:
        return self.left.prefix_closed and self.right.prefix_closed

    @property
    def upward_closed(self) -> bool:
        return self.left.upward_closed and self.right.upward_closed

    def leaves(self) -> list[Constraint]:
        return self.left.leaves() + self.right.leaves()

    def evaluate(self, values: dict[Constraint, Tensor]) -> Tensor:
        return self.left.evaluate(values) | self.right.evaluate(values)


def _call_leaf(leaf: Reward | Constraint, texts: list[str], dtype: torch.dtype) -> Tensor:
    kind = "reward" if dtype == torch.float64 else "constraint"
    try:
        raw = leaf.fn(list(texts))
    except Exception as err:  # find the text that breaks it, for the message
        for text in texts:
            try:
                leaf.fn([text])
            except Exception as single:
                raise KldslRewardError(
                    f"{kind} `{leaf}` raised {type(single).__name__}: {shorten(str(single))} on the "
                    f"sample {shorten(repr(text))}"
                ) from single
        raise KldslRewardError(
            f"{kind} `{leaf}` raised {type(err).__name__}: {shorten(str(err))}"
        ) from err
    if dtype == torch.bool:
        return constraint_values(str(leaf), texts, raw)
    return reward_values(str(leaf), texts, raw)


# ---------------------------------------------------------------------------------------
# Models: priors, tilts, products, tempering, conditioning
# ---------------------------------------------------------------------------------------


class Model(Node):
    """A factor of the unnormalised target p̃; a model when it contains a prior.

    ``*`` multiplies factors, ``| c`` conditions on a constraint, ``prior ** α`` tempers.
    """

    def __mul__(self, other: Any) -> Model:
        if isinstance(other, RewardExpr):
            raise KldslTypeError(
                f"`... * {shown(other)}`: a reward is not a factor; tilt by it with "
                f"`* exp({shown(other)} / β)`"
            )
        if isinstance(other, ConstraintExpr):
            raise KldslTypeError(
                f"`... * {shown(other)}`: a constraint is not a factor; condition with "
                f"`| {shown(other)}`"
            )
        if not isinstance(other, Model):
            raise KldslTypeError(f"cannot multiply a model by {shown(other)}")
        left = self.terms if isinstance(self, Product) else (self,)
        right = other.terms if isinstance(other, Product) else (other,)
        return Product(left + right)

    def __or__(self, other: Any) -> Model:
        if isinstance(other, Moment):
            return MomentCondition(self, other)
        if isinstance(other, Mean):
            raise KldslTypeError(
                f"`| {other}`: a distributional constraint sets the mean to a number, and in "
                f"Python `|` binds tighter than `==`: write `model | ({other} == 0.5)`"
            )
        if isinstance(other, RewardExpr):
            raise KldslTypeError(
                f"`| {shown(other)}`: `|` conditions on a constraint, and `{shown(other)}` is a "
                f"reward; to tilt by it write `* exp({shown(other)} / β)`"
            )
        if not isinstance(other, ConstraintExpr):
            raise KldslTypeError(f"`| {shown(other)}`: `|` takes a constraint such as `not curse`")
        return Condition(self, other)

    # --- structure ----------------------------------------------------------------
    def factors(self) -> list[Model]:
        """The flat list of factors (Prior, Power, Tilt, and the constraint of each Condition)."""
        raise NotImplementedError

    def conditions(self) -> list[ConstraintExpr]:
        return [f.constraint for f in self.factors() if isinstance(f, Condition)]

    def tilts(self) -> list[RewardExpr]:
        return [f.reward for f in self.factors() if isinstance(f, Tilt)]

    def priors(self) -> list[Prior]:
        out = []
        for f in self.factors():
            if isinstance(f, Prior):
                out.append(f)
            elif isinstance(f, Power):
                out.append(f.prior)
        return out

    def base(self) -> Prior:
        """The base prior (the first one): it sets the LM, prompt and length of samples."""
        priors = self.priors()
        if not priors:
            raise KldslTypeError(
                f"`{shown(self)}` has no prior: a model needs an LM to define what x is; write "
                f"e.g. `prior(smollm2) * {shown(self)}`"
            )
        return priors[0]

    def check(self) -> Model:
        """Raise if this is not a complete model (it has no prior); return it otherwise."""
        self.base()
        return self

    # --- meaning ------------------------------------------------------------------
    def log_density(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        base_log_probs: Tensor | None = None,
        texts: list[str] | None = None,
        batch_size: int = 64,
        reuse: Density | None = None,
        lms: Mapping[LM | str, LM] | None = None,
    ) -> Density:
        """log p̃(x) [N] with a per-factor breakdown, in batches of ``batch_size``.

        ``lms`` holds the LM of each model the priors name (:attr:`kldsl.Target.lms`, which
        an engine passes, so evaluating loads nothing); without it, a user's call resolves
        names now (:func:`kldsl.registry.resolve`).

        ``base_log_probs`` are log a(x) of the base prior when the caller has them from
        the passes that sampled the sequences (so nothing is scored twice); ``reuse`` is a
        density of the same sequences whose prior scores and leaf values are reused (e.g.
        for a rewritten graph, :func:`kldsl.transforms.soften`). The interpreter is
        :func:`kldsl.density.log_density`.
        """
        from kldsl.density import log_density

        return log_density(
            self,
            sequences,
            base_log_probs=base_log_probs,
            texts=texts,
            batch_size=batch_size,
            reuse=reuse,
            lms=lms,
        )

    def explain(self) -> str:
        """The target's mathematics and a table of its factors, as text."""
        from kldsl.explain import explain

        return explain(self)


def _prior_symbols(model: Model) -> dict[Prior, str]:
    symbols: dict[Prior, str] = {}
    for prior in model.priors():
        if prior not in symbols:
            symbols[prior] = "abcdefgh"[len(symbols)] if len(symbols) < 8 else f"a{len(symbols)}"
    return symbols


#: The kinds of factor of p̃: the base prior, another (product-of-experts) prior, a tilt
#: exp(r), a hard constraint 1[c] and a distributional constraint mean(φ) == μ (a tilt
#: exp(λ·φ) once λ is fitted, :func:`kldsl.fit_moments`).
KINDS = ("prior", "expert", "tilt", "constraint", "moment")


@dataclass(frozen=True, eq=False)
class Term:
    """One factor's log contribution to log p̃: what engines read (never ``label``)."""

    label: str  # for display: the key of ``Density.terms`` ("log a", "sentiment / 0.2", ...)
    kind: str  # one of KINDS
    node: Model  # the factor node: Prior, Power (kinds prior, expert), Tilt, Condition
    values: Tensor  # [N] float64


@dataclass
class Density:
    """log p̃ of a batch of sequences with its breakdown by factor.

    ``terms`` maps each factor's label to its values; :attr:`term_list` and :meth:`by_kind`
    are the typed view (kind and factor node of each term), present on a density that
    :meth:`Model.log_density` made (``factors`` is None on one rebuilt from the dicts alone).
    """

    log_p: Tensor  # [N] float64, log p̃(x) (−inf where a constraint fails)
    terms: dict[str, Tensor]  # each factor's log contribution [N]
    rewards: dict[str, Tensor]  # each leaf reward's raw value [N]
    constraints: dict[str, Tensor]  # each condition's satisfaction [N] bool
    texts: list[str]
    # label of each term -> (kind, factor node); None when rebuilt from the dicts alone
    factors: dict[str, tuple[str, Model]] | None = field(default=None, repr=False, compare=False)
    # prior log-probs and leaf values by node, for ``log_density(..., reuse=)``
    cache: dict[Node, Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def term_list(self) -> list[Term]:
        """Every term in factor order, with its kind and factor node."""
        if self.factors is None:
            raise KldslTypeError(
                "this Density was rebuilt from its dicts and has lost its factor kinds; "
                "use the Density that Model.log_density returned"
            )
        return [Term(k, *self.factors[k], v) for k, v in self.terms.items()]

    def by_kind(self, kind: str) -> list[Term]:
        """The terms of one kind ("prior", "expert", "tilt" or "constraint")."""
        if kind not in KINDS:
            raise KldslTypeError(f"unknown term kind {kind!r}; the kinds are {', '.join(KINDS)}")
        return [t for t in self.term_list if t.kind == kind]


@dataclass(frozen=True)
class Prior(Model):
    """The prior LM a(x): sequences after ``prompt``, at most ``max_tokens`` tokens.

    A prior only names its model: nothing is loaded until inference resolves it
    (:func:`kldsl.registry.resolve`). ``label`` is how the model prints when it is not
    its own name: the ``env`` name the parser found an LM under, so the text parses back
    (with the same ``env``) to an equal prior; it takes no part in equality.
    """

    model: LM | str  # an LM object, or a name that kldsl.registry.resolve resolves
    prompt: str = ""
    max_tokens: int = 32
    label: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.label is not None and (not isinstance(self.label, str) or not self.label):
            raise KldslTypeError(
                f"a prior's label must be a non-empty string, got {shown(self.label)}"
            )
        if not isinstance(self.model, LM | str):
            raise KldslTypeError(
                f'prior() takes an LM or a model name such as "smollm2"; got {shown(self.model)}'
            )
        if isinstance(self.model, str) and not self.model.strip():
            raise KldslTypeError(
                'prior() needs a model name or folder, such as "smollm2"; got an empty name'
            )
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise KldslTypeError(
                f"max_tokens must be a positive integer, got {shown(self.max_tokens)}"
            )
        if not isinstance(self.prompt, str):
            raise KldslTypeError(f"prompt must be a string, got {shown(self.prompt)}")
        at = surrogate_at(self.prompt)
        if at is not None:
            raise KldslTypeError(
                f"the prompt holds a lone surrogate {shown(self.prompt[at])} at index {at}; "
                "a prompt must be valid Unicode text"
            )

    def __pow__(self, alpha: Number) -> Power:
        a = _scalar(alpha, "a prior is tempered by a number: `prior(...) ** 0.5`")
        if a <= 0:
            raise KldslTypeError(f"tempering needs α > 0 in `prior ** α`, got {shown(alpha)}")
        return Power(self, a)

    def _fmt(self) -> tuple[str, int]:
        if self.label is not None:
            head = _name_text(self.label)
        elif isinstance(self.model, LM):
            head = _name_text(self.model.name)
        else:
            from kldsl.models import EMBEDDED

            head = self.model if self.model in EMBEDDED else json.dumps(self.model)
        kwargs: list[tuple[str, Any]] = []
        if self.prompt:
            kwargs.append(("prompt", self.prompt))
        if self.max_tokens != Prior.max_tokens:
            kwargs.append(("max_tokens", self.max_tokens))
        extra = ", " + _args_text((), tuple(kwargs)) if kwargs else ""
        return f"prior({head}{extra})", P_ATOM

    def factors(self) -> list[Model]:
        return [self]


@dataclass(frozen=True)
class Power(Model):
    """A tempered prior a(x)^α (α > 0)."""

    prior: Prior
    alpha: float

    def __post_init__(self) -> None:
        _finite(self.alpha, lambda: "α in `prior ** α`")
        super().__post_init__()

    def _children(self) -> tuple[Any, ...]:
        return (self.prior,)

    def _fmt(self) -> tuple[str, int]:
        return f"{_wrap(self.prior, P_ATOM)} ** {_num(self.alpha)}", P_POW

    def factors(self) -> list[Model]:
        return [self]


@dataclass(frozen=True)
class Tilt(Model):
    """The soft factor exp(r(x))."""

    reward: RewardExpr

    def _children(self) -> tuple[Any, ...]:
        return (self.reward,)

    def _fmt(self) -> tuple[str, int]:
        return f"exp({self.reward})", P_ATOM

    def factors(self) -> list[Model]:
        return [self]


@dataclass(frozen=True)
class Product(Model):
    """A product of factors; the first prior among them is the base."""

    terms: tuple[Model, ...]

    def _children(self) -> tuple[Any, ...]:
        return self.terms

    def _fmt(self) -> tuple[str, int]:
        head, *rest = self.terms
        parts = [_wrap(head, P_PROD)] + [_wrap(t, P_NEG) for t in rest]
        return " * ".join(parts), P_PROD

    def factors(self) -> list[Model]:
        return [f for t in self.terms for f in t.factors()]


@dataclass(frozen=True)
class Condition(Model):
    """``model | constraint``: multiplies by the indicator 1[constraint(x)]."""

    model: Model
    constraint: ConstraintExpr

    def _children(self) -> tuple[Any, ...]:
        return (self.model, self.constraint)

    def _fmt(self) -> tuple[str, int]:
        return f"{_wrap(self.model, P_COND)} | {_wrap(self.constraint, P_OR)}", P_COND

    def factors(self) -> list[Model]:
        return [*self.model.factors(), self]


class Mean:
    """``mean(φ)``: the posterior mean of a reward φ, to be set by ``== μ``.

    Not a node: ``mean(φ) == μ`` makes the :class:`Moment` that ``model | ...`` takes.
    """

    __slots__ = ("feature",)
    __hash__ = None  # type: ignore[assignment]  # == builds a Moment, so no hashing

    def __init__(self, feature: RewardExpr):
        self.feature = feature

    def __eq__(self, value: Any) -> Moment:  # type: ignore[override]
        if isinstance(value, bool) or not isinstance(value, int | float):
            what = f"`{shown(value)}`" if isinstance(value, Node | Mean) else shown(value)
            raise KldslTypeError(
                f"`{self} == μ` sets the posterior mean of `{shown(self.feature)}` to a number "
                f"μ; got {what}"
            )
        return Moment(self.feature, float(value))

    def __ne__(self, value: Any) -> Any:
        raise KldslTypeError(f"`{self}` can only be set equal to a number: `{self} == μ`")

    __lt__ = __le__ = __gt__ = __ge__ = __ne__

    def __ror__(self, other: Any) -> Any:
        raise KldslTypeError(
            f"`... | {self}`: in Python `|` binds tighter than `==`; parenthesise each "
            f"distributional constraint: `model | ({self} == μ)`"
        )

    def __str__(self) -> str:
        return f"mean({self.feature})"

    __repr__ = __str__


@dataclass(frozen=True)
class Moment(Node):
    """The distributional constraint ``mean(φ) == μ``: E_p*[φ(x)] = μ over the posterior.

    ``model | moment`` is a :class:`MomentCondition`. μ must lie strictly inside φ's
    declared bounds (at a bound the constraint is a hard one: write ``| c`` instead).
    """

    feature: RewardExpr
    value: float

    def __post_init__(self) -> None:
        _finite(self.value, lambda: f"μ in `mean({shown(self.feature)}) == μ`")
        lo, hi = self.feature.bounds()
        if not lo < self.value < hi:
            hint = ""
            if isinstance(self.feature, Indicator) and self.value in (lo, hi):
                c = self.feature.constraint
                hard = shown(c) if self.value == hi else shown(Not(c))
                hint = f"; a rate of exactly {_num(self.value)} is the hard constraint `| {hard}`"
            raise KldslTypeError(
                f"`mean({shown(self.feature)}) == {_num(self.value)}`: the feature's values lie "
                f"in [{lo:g}, {hi:g}], so its mean can only be set strictly inside "
                f"({lo:g}, {hi:g}){hint}"
            )
        super().__post_init__()

    def _children(self) -> tuple[Any, ...]:
        return (self.feature,)

    def _fmt(self) -> tuple[str, int]:
        return f"mean({self.feature}) == {_num(self.value)}", P_NOT

    def __or__(self, other: Any) -> Any:
        raise KldslTypeError(
            f"`{self} | ...`: a distributional constraint conditions a model: "
            f"write `prior(...) | {self}`"
        )

    __and__ = __ror__ = __rand__ = __or__


@dataclass(frozen=True)
class MomentCondition(Model):
    """``model | mean(φ) == μ``: the I-projection of ``model`` onto E[φ] = μ.

    Its meaning is the factor exp(λ·φ(x)) with λ chosen so that the posterior mean of φ is
    μ: it has no pointwise value until :func:`kldsl.fit_moments` fits λ and rewrites the
    node into that tilt.
    """

    model: Model
    moment: Moment

    def __post_init__(self) -> None:
        if not isinstance(self.moment, Moment):
            raise KldslTypeError(
                f"a moment condition takes `mean(φ) == μ`; got {shown(self.moment)}"
            )
        super().__post_init__()

    def _children(self) -> tuple[Any, ...]:
        return (self.model, self.moment)

    def _fmt(self) -> tuple[str, int]:
        return f"{_wrap(self.model, P_COND)} | {_wrap(self.moment, P_OR)}", P_COND

    def factors(self) -> list[Model]:
        return [*self.model.factors(), self]


def _scalar(value: Any, message: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        what = f"`{shown(value)}`" if isinstance(value, Node) else shown(value)
        raise KldslTypeError(f"{message}; got {what}")
    return float(value)


# ---------------------------------------------------------------------------------------
# Constructors of the Python front-end
# ---------------------------------------------------------------------------------------


def prior(model: LM | str, prompt: str = "", max_tokens: int = 32) -> Prior:
    """The prior LM a(x).

    Example:
        >>> p = prior("smollm2", prompt="Once upon a time", max_tokens=20)
        >>> str(p)
        'prior(smollm2, prompt="Once upon a time", max_tokens=20)'
    """
    if isinstance(max_tokens, float) and max_tokens.is_integer():
        max_tokens = int(max_tokens)
    return Prior(model, prompt, max_tokens)


def exp(reward: RewardExpr) -> Tilt:
    """The soft factor exp(reward); write ``exp(r / β)`` for a temperature β.

    Example:
        >>> from kldsl.builtins import sentiment
        >>> str(exp(sentiment / 0.1))
        'exp(sentiment / 0.1)'
    """
    if isinstance(reward, ConstraintExpr):
        raise KldslTypeError(
            f"exp() takes a reward, but `{shown(reward)}` is a constraint; condition on it "
            f"with `model | {shown(reward)}` instead"
        )
    if isinstance(reward, Model):
        raise KldslTypeError(f"exp() takes a reward, but `{shown(reward)}` is a model")
    if not isinstance(reward, RewardExpr):
        raise KldslTypeError(
            f"exp() takes a reward (a built-in such as `sentiment`, or a function decorated "
            f"with @kl.reward); got {shown(reward)}"
        )
    return Tilt(reward)


def indicator(constraint: ConstraintExpr) -> Indicator:
    """The reward 1[constraint(x)]: 1.0 where it holds, 0.0 where not.

    Example:
        >>> from kldsl.builtins import curse
        >>> str(exp(indicator(~curse) * 2.0))
        'exp(indicator(not curse) * 2.0)'
    """
    return Indicator(constraint)


def mean(feature: RewardExpr) -> Mean:
    """The posterior mean of a reward; ``model | mean(φ) == μ`` sets it to μ.

    A constraint's rate is the mean of its indicator. In Python, parenthesise the
    comparison (``|`` binds tighter than ``==``). Fit the constraint with
    :func:`kldsl.fit_moments` before inference.

    Example:
        >>> from kldsl.builtins import contains
        >>> str(prior("smollm2") | (mean(indicator(contains("she"))) == 0.5))
        'prior(smollm2) | mean(indicator(contains("she"))) == 0.5'
    """
    if isinstance(feature, ConstraintExpr):
        raise KldslTypeError(
            f"mean() takes a reward, but `{shown(feature)}` is a constraint; its rate is "
            f"the mean of its indicator: `mean(indicator({shown(feature)}))`"
        )
    if isinstance(feature, Model):
        raise KldslTypeError(f"mean() takes a reward, but `{shown(feature)}` is a model")
    if not isinstance(feature, RewardExpr):
        raise KldslTypeError(
            f"mean() takes a reward (a built-in such as `sentiment`, `indicator(c)` of a "
            f"constraint, or a function decorated with @kl.reward); got {shown(feature)}"
        )
    return Mean(feature)


def reward(
    fn: Callable[[list[str]], Sequence[float]] | None = None,
    *,
    name: str | None = None,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> Any:
    """Decorate a batched function ``list[str] -> list[float]`` as a reward.

    Example:
        >>> @reward(bounds=(0, 1))
        ... def has_q(texts):
        ...     return [float("?" in t) for t in texts]
        >>> str(exp(has_q / 0.5))
        'exp(has_q / 0.5)'
    """

    def wrap(f: Callable) -> Reward:
        if isinstance(f, Reward):
            return f
        return Reward(
            name=name or getattr(f, "__name__", "reward"),
            fn=f,
            key=("user", f),
            lo=float(bounds[0]),
            hi=float(bounds[1]),
            doc=(f.__doc__ or "").strip().split("\n")[0],
        )

    return wrap(fn) if fn is not None else wrap


def constraint(
    fn: Callable[[list[str]], Sequence[bool]] | None = None,
    *,
    name: str | None = None,
    closed: str = "",
    prefix: Callable[[list[str]], Sequence[bool | None]] | None = None,
) -> Any:
    """Decorate a batched function ``list[str] -> list[bool]`` as a hard constraint.

    ``closed="prefix"`` declares that a violation persists on every extension (lets SMC
    prune early); ``closed="upward"`` that a satisfaction does. Both speak of complete
    words: the claim is about a text that is empty or ends in whitespace (every text that
    starts with it keeps its verdict), so a prefix ``"I am sh"`` is judged by ``"I am "``.

    ``prefix=`` decides the constraint on the text p of an unfinished sequence more
    finely: a batched function ``list[str] -> list[bool | None]`` returning, per prefix
    text, True when every text that starts with p satisfies the constraint, False when
    none does, and None when it cannot tell. It must be sound (a wrong True or False
    biases SMC); when given, it replaces the rule ``closed`` implies on prefixes.

    Example:
        >>> @constraint
        ... def short(texts):
        ...     return [len(t) < 40 for t in texts]
        >>> str(short)
        'short'
    """
    if closed not in ("", "prefix", "upward"):
        raise ValueError('closed must be "", "prefix" or "upward"')
    if prefix is not None and not callable(prefix):
        raise KldslTypeError(f"prefix= takes a function of prefix texts; got {shown(prefix)}")

    def wrap(f: Callable) -> Constraint:
        if isinstance(f, Constraint):
            return f
        return Constraint(
            name=name or getattr(f, "__name__", "constraint"),
            fn=f,
            key=("user", f),
            closed=closed,
            doc=(f.__doc__ or "").strip().split("\n")[0],
            prefix=prefix,
        )

    return wrap(fn) if fn is not None else wrap
