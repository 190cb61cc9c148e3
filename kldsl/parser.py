"""The text front-end: .kl source to the same graph nodes the Python operators build.

Evaluation is data-only: a name resolves to a built-in or to a value in ``env``, and
the only functions called are kldsl's built-in constructors (``prior``, ``exp``,
``contains``, ...). Nothing in a .kl file can run Python code.

Example:
    >>> import kldsl as kl
    >>> lm = kl.ToyLM(name="toy")
    >>> m = kl.parse("posterior = prior(toy) * exp(length / 0.5) | not curse", env={"toy": lm})
    >>> m == kl.prior(lm) * kl.exp(kl.length / 0.5) | ~kl.curse
    True
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

from kldsl import graph
from kldsl.builtins import BUILTIN_FACTORIES, BUILTIN_VALUES
from kldsl.errors import KldslError, KldslNameError, KldslSyntaxError, KldslTypeError
from kldsl.graph import ConstraintExpr, Model, Node, RewardExpr
from kldsl.lm import LM

#: Functions a .kl text may call; every other call is an error.
FACTORIES: dict[str, Callable[..., Any]] = {
    "prior": graph.prior,
    "exp": graph.exp,
    **BUILTIN_FACTORIES,
}

_OPERATORS = {
    "STAR": "*",
    "SLASH": "/",
    "PLUS": "+",
    "MINUS": "-",
    "VBAR": "|",
    "EQUAL": "=",
    "LPAR": "(",
    "COMMA": ",",
    "__ANON_0": "**",
    "NOT": "not",
    "AND": "and",
    "OR": "or",
}


@functools.cache
def _parser() -> Lark:
    text = resources.files("kldsl.grammar").joinpath("kldsl.lark").read_text(encoding="utf-8")
    return Lark(text, parser="lalr", propagate_positions=True, maybe_placeholders=False)


def builtin_names() -> dict[str, Any]:
    """Every name a .kl text can use without an env."""
    from kldsl.models import EMBEDDED

    return {**BUILTIN_VALUES, **{name: name for name in EMBEDDED}}


def parse(text: str, env: Mapping[str, Any] | None = None, *, source: str = "<text>") -> Model:
    """Parse kldsl text and return the model of its last statement.

    ``env`` supplies user names (rewards, constraints, numbers, LMs) beside the built-ins.
    Raises :class:`KldslSyntaxError`, :class:`KldslNameError` or :class:`KldslTypeError`
    with the line and column of the problem.
    """
    values = parse_program(text, env, source=source)
    if not values:
        raise KldslSyntaxError("the text holds no statement", 1, 1, "", source)
    last_name, last = list(values.items())[-1]
    if not isinstance(last, Model):
        kind = _kind(last)
        raise KldslTypeError(
            f"{source}: the last statement (`{last_name}`) is {kind}, not a model; end with "
            "e.g. `posterior = prior(smollm2) * exp(r / β) | c`"
        )
    return last.check()


def load(path: str | Path, env: Mapping[str, Any] | None = None) -> Model:
    """Read a .kl file and return the model of its last statement (see :func:`parse`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KldslError(f"no such .kl file: {path}") from None
    return parse(text, env, source=str(path))


def parse_program(
    text: str, env: Mapping[str, Any] | None = None, *, source: str = "<text>"
) -> dict[str, Any]:
    """Every statement's value by name, in order (a bare expression is named ``_``)."""
    try:
        tree = _parser().parse(text if text.endswith("\n") else text + "\n")
    except UnexpectedInput as err:
        raise _syntax_error(err, text, source) from None
    try:
        return _Evaluator(text, env or {}, source).transform(tree)
    except VisitError as err:  # lark wraps what a callback raises
        raise err.orig_exc from None


def _syntax_error(err: UnexpectedInput, text: str, source: str) -> KldslSyntaxError:
    lines = text.splitlines() or [""]
    line = getattr(err, "line", None)
    column = getattr(err, "column", None)
    if not isinstance(line, int) or line < 1:  # at the end of the text
        line, column = len(lines), len(lines[-1]) + 1
    line = min(line, len(lines))
    source_line = lines[line - 1]
    before = source_line[: max(column - 1, 0)].rstrip()
    label = _label(err, before, source_line, column)
    if label.startswith("missing operand") and before:
        column = len(before)  # point at the operator that lacks its operand
    return KldslSyntaxError(label, line, column, source_line, source)


def _label(err: UnexpectedInput, before: str, source_line: str, column: int) -> str:
    if isinstance(err, UnexpectedCharacters):
        char = source_line[column - 1 : column] or "?"
        if char == "'":
            return 'strings use double quotes: "..."'
        if char == '"':
            return 'unterminated string: add the closing "'
        if char == "!" or char == "~":
            return f"unexpected character {char!r}; write `not` for negation"
        if char == "&":
            return "unexpected character '&'; write `and` between constraints"
        return f"unexpected character {char!r}"
    token = err.token if isinstance(err, UnexpectedToken) else None
    got = "end of line" if token is None or token.type in ("_NL", "$END") else repr(str(token))
    for op in ("**", "*", "/", "+", "-", "|", "=", ",", "not", "and", "or", "("):
        if before.endswith(op) and (op.isalpha() is False or before[: -len(op)][-1:] in " (|"):
            if op == "(" and token is not None and token.type == "RPAR":
                return "empty parentheses"
            return f"missing operand after {op!r}"
    if token is not None and token.type == "RPAR":
        return "unbalanced ')': no '(' to close"
    expected = set(getattr(err, "expected", ()) or ())
    if "RPAR" in expected and (token is None or token.type in ("_NL", "$END")):
        return "missing ')': a '(' is not closed on this line"
    if token is not None and token.type in ("NAME", "NUMBER", "STRING", "LPAR"):
        return f"unexpected {got}: missing an operator (such as * or |) before it?"
    if token is not None and token.type == "EQUAL":
        return "unexpected '=': a statement is `name = expression`, one per line"
    if isinstance(err, UnexpectedEOF):
        return "unexpected end of text"
    return f"unexpected {got}"


def _kind(value: Any) -> str:
    if isinstance(value, Model):
        return "a model" if value.priors() else "a factor with no prior"
    if isinstance(value, RewardExpr):
        return "a reward"
    if isinstance(value, ConstraintExpr):
        return "a constraint"
    if isinstance(value, LM):
        return "an LM"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__


def _env_value(name: str, value: Any) -> Any:
    """Check (and where needed wrap) a user-supplied env value."""
    if isinstance(value, bool):
        raise KldslTypeError(f"env[{name!r}] is a bool; kldsl names hold numbers, not booleans")
    if isinstance(value, Node | LM | str | int | float):
        return value
    if callable(value):  # a plain batched function: a reward named after its env key
        return graph.reward(value, name=name)
    raise KldslTypeError(
        f"env[{name!r}] is a {type(value).__name__}; env values must be rewards, constraints, "
        "LMs, numbers or strings"
    )


@v_args(meta=True)
class _Evaluator(Transformer):
    """Evaluates the parse tree bottom-up; method names follow the grammar's aliases."""

    def __init__(self, text: str, env: Mapping[str, Any], source: str):
        super().__init__()
        self.lines = text.splitlines()
        self.source = source
        self.env = {k: _env_value(k, v) for k, v in env.items()}
        self.scope: dict[str, Any] = {}  # names bound by earlier statements
        self.statements: dict[str, Any] = {}

    # --- errors with positions -----------------------------------------------------
    def _where(self, meta: Any) -> tuple[str, str]:
        line = getattr(meta, "line", 1)
        column = getattr(meta, "column", 1)
        src = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        return f"{self.source}:{line}:{column}", f"    {src}\n    {' ' * (column - 1)}^"

    def _located(self, err: KldslError, meta: Any) -> KldslError:
        if getattr(err, "_located", False):
            return err
        where, snippet = self._where(meta)
        err.args = (f"{where}: {err.args[0]}\n{snippet}", *err.args[1:])
        err._located = True
        return err

    def _apply(self, meta: Any, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except KldslError as err:
            raise self._located(err, meta) from None
        except ZeroDivisionError:
            raise self._located(KldslTypeError("division by zero"), meta) from None

    # --- program ---------------------------------------------------------------------
    def start(self, meta: Any, children: list[Any]) -> dict[str, Any]:
        return self.statements

    def assign(self, meta: Any, children: list[Any]) -> Any:
        name, value = children
        self.scope[str(name)] = value
        self.statements[str(name)] = value
        return value

    def bare(self, meta: Any, children: list[Any]) -> Any:
        self.statements["_"] = children[0]
        return children[0]

    # --- atoms -----------------------------------------------------------------------
    def number(self, meta: Any, children: list[Token]) -> float | int:
        text = str(children[0])
        value = float(text)
        return int(value) if text.isdigit() else value

    def string(self, meta: Any, children: list[Token]) -> str:
        try:
            return json.loads(str(children[0]))
        except json.JSONDecodeError as err:
            raise self._located(
                KldslSyntaxError(
                    f"bad string escape: {err.msg}", meta.line, meta.column, "", self.source
                ),
                meta,
            ) from None

    def name(self, meta: Any, children: list[Token]) -> Any:
        return self._lookup(str(children[0]), meta)

    def _lookup(self, name: str, meta: Any) -> Any:
        if name in self.scope:
            return self.scope[name]
        if name in self.env:
            return self.env[name]
        builtins = builtin_names()
        if name in builtins:
            return builtins[name]
        if name in FACTORIES:
            err: KldslError = KldslTypeError(f"`{name}` is a function; call it, e.g. `{name}(...)`")
            raise self._located(err, meta)
        known = [*self.scope, *self.env, *builtins, *FACTORIES]
        hint = ""
        if name.replace("-", "").replace("_", "").isalnum():
            hint = f'(to load an LM by name, write prior("{name}"))'
        raise self._located(KldslNameError(name, known, hint=hint), meta)

    def call(self, meta: Any, children: list[Any]) -> Any:
        name = str(children[0])
        args, kwargs = [], {}
        for arg in children[1].children if len(children) > 1 else []:
            if isinstance(arg, tuple) and len(arg) == 3 and arg[0] == "__kwarg__":
                kwargs[arg[1]] = arg[2]
            elif kwargs:
                raise self._located(
                    KldslSyntaxError(
                        "positional argument after a keyword argument",
                        meta.line,
                        meta.column,
                        "",
                        self.source,
                    ),
                    meta,
                )
            else:
                args.append(arg)
        if name not in FACTORIES:
            if name in self.scope or name in self.env or name in builtin_names():
                err: KldslError = KldslTypeError(
                    f"`{name}` is not a function; only built-ins can be called: "
                    f"{', '.join(sorted(FACTORIES))}"
                )
                raise self._located(err, meta)
            raise self._located(KldslNameError(name, FACTORIES, what="function"), meta)
        fn = FACTORIES[name]
        try:
            return fn(*args, **kwargs)
        except TypeError as err:
            if isinstance(err, KldslError):
                raise self._located(err, meta) from None
            raise self._located(KldslTypeError(f"{name}(): {err}"), meta) from None
        except KldslError as err:
            raise self._located(err, meta) from None

    def arguments(self, meta: Any, children: list[Any]) -> Tree:
        return Tree("arguments", children)

    def kwarg(self, meta: Any, children: list[Any]) -> tuple[str, str, Any]:
        return ("__kwarg__", str(children[0]), children[1])

    # --- operators -------------------------------------------------------------------
    def condition(self, meta: Any, children: list[Any]) -> Any:
        left, right = children
        if isinstance(left, ConstraintExpr):
            err = KldslTypeError(
                f"`{left} | {right}`: in .kl text `|` conditions a model; combine constraints "
                f"with `or`: `{left} or {right}`"
            )
            raise self._located(err, meta)
        if not isinstance(left, Model):
            raise self._located(
                KldslTypeError(
                    f"`... | {right}`: the left of `|` must be a model, not {_kind(left)}"
                ),
                meta,
            )
        return self._apply(meta, lambda a, b: a | b, left, right)

    def or_(self, meta: Any, children: list[Any]) -> Any:
        return self._apply(meta, self._logic, "or", *children)

    def and_(self, meta: Any, children: list[Any]) -> Any:
        return self._apply(meta, self._logic, "and", *children)

    def not_(self, meta: Any, children: list[Any]) -> Any:
        (value,) = children
        if not isinstance(value, ConstraintExpr):
            hint = f"; for a reward write `-{value}`" if isinstance(value, RewardExpr) else ""
            raise self._located(
                KldslTypeError(f"`not` applies to constraints, not {_kind(value)}{hint}"), meta
            )
        return ~value

    @staticmethod
    def _logic(op: str, left: Any, right: Any) -> Any:
        for side in (left, right):
            if not isinstance(side, ConstraintExpr):
                raise KldslTypeError(f"`{op}` combines constraints, but one side is {_kind(side)}")
        return left | right if op == "or" else left & right

    def add(self, meta: Any, children: list[Any]) -> Any:
        return self._apply(meta, _arith("+"), *children)

    def sub(self, meta: Any, children: list[Any]) -> Any:
        return self._apply(meta, _arith("-"), *children)

    def mul(self, meta: Any, children: list[Any]) -> Any:
        return self._apply(meta, _arith("*"), *children)

    def div(self, meta: Any, children: list[Any]) -> Any:
        return self._apply(meta, _arith("/"), *children)

    def pow(self, meta: Any, children: list[Any]) -> Any:
        return self._apply(meta, _arith("**"), *children)

    def neg(self, meta: Any, children: list[Any]) -> Any:
        (value,) = children
        if isinstance(value, int | float | RewardExpr):
            return -value
        raise self._located(
            KldslTypeError(f"unary `-` applies to numbers and rewards, not {_kind(value)}"), meta
        )


def _arith(op: str) -> Callable[[Any, Any], Any]:
    def apply(left: Any, right: Any) -> Any:
        numbers = isinstance(left, int | float) and isinstance(right, int | float)
        if op == "+":
            if numbers or isinstance(left, RewardExpr):
                return left + right
        elif op == "-":
            if numbers or isinstance(left, RewardExpr):
                return left - right
        elif op == "*":
            if numbers or isinstance(left, Node) or isinstance(right, Node):
                if isinstance(left, int | float) and isinstance(right, Model):
                    raise KldslTypeError("a model cannot be scaled by a number")
                return left * right
        elif op == "/":
            if numbers or isinstance(left, RewardExpr):
                if numbers and right == 0:
                    raise ZeroDivisionError
                return left / right
        elif op == "**":
            if numbers:
                return math.pow(left, right)
            if isinstance(left, graph.Prior):
                return left**right
            raise KldslTypeError(
                f"`**` tempers a prior (`prior(...) ** 0.5`); got {_kind(left)} on the left"
            )
        raise KldslTypeError(f"`{op}` does not apply to {_kind(left)} and {_kind(right)}")

    return apply
