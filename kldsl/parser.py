"""The text front-end: .kl source to the same graph nodes the Python operators build.

Evaluation is data-only: a name resolves to a built-in or to a value in ``env``, and
the only functions called are kldsl's built-in constructors (``prior``, ``exp``,
``contains``, ...). Nothing in a .kl file can run Python code.

Text rules: UTF-8 (a leading byte-order mark is dropped); lines end in ``\\n``, ``\\r\\n``
or a lone ``\\r`` (all read as ``\\n``); numbers are finite; an expression nests at most
:data:`kldsl.graph.MAX_DEPTH` levels.

Example:
    >>> import kldsl as kl
    >>> lm = kl.ToyLM(name="toy")
    >>> m = kl.parse("posterior = prior(toy) * exp(length / 0.5) | not curse", env={"toy": lm})
    >>> m == kl.prior(lm) * kl.exp(kl.length / 0.5) | ~kl.curse
    True
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from lark import Lark, Token, Transformer_NonRecursive, Tree, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

from kldsl import graph
from kldsl.builtins import BUILTIN_FACTORIES, BUILTIN_VALUES
from kldsl.errors import (
    SHOWN,
    KldslError,
    KldslNameError,
    KldslSyntaxError,
    KldslTypeError,
    shorten,
    snippet,
)
from kldsl.graph import ConstraintExpr, Model, Node, RewardExpr, shown, surrogate_at
from kldsl.lm import LM

#: Functions a .kl text may call; every other call is an error.
FACTORIES: dict[str, Callable[..., Any]] = {
    "prior": graph.prior,
    "exp": graph.exp,
    "indicator": graph.indicator,
    "mean": graph.mean,
    **BUILTIN_FACTORIES,
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

    ``env`` supplies user names (rewards, constraints, numbers, LMs) beside the built-ins;
    ``prior("name")`` takes the LM ``env["name"]`` when there is one (so an LM whose name
    is no identifier, printed as a string, reads back). Raises :class:`KldslSyntaxError`,
    :class:`KldslNameError` or :class:`KldslTypeError` with the line and column of the
    problem.
    """
    values = parse_program(text, env, source=source)
    if not values:
        raise KldslSyntaxError("the text holds no statement", 1, 1, "", source)
    last_name, last = list(values.items())[-1]
    if not isinstance(last, Model):
        kind = _kind(last)
        raise KldslTypeError(
            f"{source}: the last statement (`{shorten(last_name)}`) is {kind}, not a model; "
            "end with e.g. `posterior = prior(smollm2) * exp(r / β) | c`"
        )
    return last.check()


def load(path: str | Path, env: Mapping[str, Any] | None = None) -> Model:
    """Read a .kl file (UTF-8) and return the model of its last statement (see :func:`parse`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KldslError(f"no such .kl file: {path}") from None
    except IsADirectoryError:
        raise KldslError(f"{path} is a folder, not a .kl file") from None
    except (OSError, ValueError) as err:  # permissions, a NUL in the path, ...
        raise KldslError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    return parse(_decode(data, str(path)), env, source=str(path))


def _decode(data: bytes, source: str = "<bytes>") -> str:
    """The text of a .kl file's bytes: strict UTF-8, or a located :class:`KldslSyntaxError`."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise KldslSyntaxError(
            "the file starts with a UTF-16 byte-order mark; save it as UTF-8", 1, 1, "", source
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        before = _normalise(data[: err.start].decode("utf-8")).split("\n")
        after = data[err.start :].decode("utf-8", "replace")
        source_line = before[-1] + after.replace("\r", "\n").split("\n")[0]
        raise KldslSyntaxError(
            f"not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset {err.start}; save the "
            "file as UTF-8",
            len(before),
            len(before[-1]) + 1,
            source_line,
            source,
        ) from None


def parse_program(
    text: str, env: Mapping[str, Any] | None = None, *, source: str = "<text>"
) -> dict[str, Any]:
    """Every statement's value by name, in order (a bare expression is named ``_``)."""
    if not isinstance(text, str):
        raise KldslTypeError(f"kldsl text must be a str, not {type(text).__name__}")
    text = _normalise(text)
    _check_brackets(text, source)
    try:
        tree = _parser().parse(text if text.endswith("\n") else text + "\n")
    except UnexpectedInput as err:
        raise _syntax_error(err, text, source) from None
    try:
        return _Evaluator(text, env or {}, source).transform(tree)
    except VisitError as err:  # lark wraps what a callback raises
        raise err.orig_exc from None


def _normalise(text: str) -> str:
    """Drop a leading byte-order mark; read ``\\r\\n`` and a lone ``\\r`` as ``\\n``."""
    text = text.removeprefix("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _check_brackets(text: str, source: str) -> None:
    """Parentheses may nest :data:`kldsl.graph.MAX_DEPTH` deep (checked before lark parses)."""
    if text.count("(") <= graph.MAX_DEPTH:
        return
    depth = 0
    for match in _BRACKETS.finditer(text):
        bracket = match.group()
        if bracket == "(":
            depth += 1
            if depth > graph.MAX_DEPTH:
                before = text[: match.start()]
                line_start = before.rfind("\n") + 1
                raise KldslSyntaxError(
                    f"parentheses nest more than {graph.MAX_DEPTH} deep",
                    before.count("\n") + 1,
                    match.start() - line_start + 1,
                    text[line_start:].split("\n", 1)[0],
                    source,
                )
        elif bracket == ")":
            depth = max(depth - 1, 0)


def _lines(text: str) -> list[str]:
    """The lines of (normalised) text as lark counts them: split at ``\\n`` only."""
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1] == "":  # the line end of the last line
        lines.pop()
    return lines


def _syntax_error(err: UnexpectedInput, text: str, source: str) -> KldslSyntaxError:
    lines = _lines(text)
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
        if surrogate_at(char) is not None:
            return f"unexpected character {char!r} (a lone surrogate)"
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
    end = token is None or token.type in ("_NL", "$END")
    got = "end of line" if end else shorten(repr(str(token)))
    for op in ("**", "*", "/", "+", "-", "|", "==", "=", ",", "not", "and", "or", "("):
        if before.endswith(op) and (op.isalpha() is False or before[: -len(op)][-1:] in " (|"):
            if op == "(" and token is not None and token.type == "RPAR":
                return "empty parentheses"
            if token is not None and token.type == "NOT" and op in ("**", "*", "/", "+", "-"):
                return f"`not` cannot follow {op!r}: write `{op} (not ...)`"
            return f"missing operand after {op!r}"
    if token is not None and token.type == "RPAR":
        return "unbalanced ')': no '(' to close"
    if token is not None and str(token) == "==":
        return "`==` does not chain: write each `mean(φ) == μ` as a condition of its own"
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
    if isinstance(value, graph.Mean):
        return "a mean (set it with `== μ`)"
    if isinstance(value, graph.Moment):
        return "a distributional constraint"
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
        raise KldslTypeError(
            f"env[{shown(name)}] is a bool; kldsl names hold numbers, not booleans"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise KldslTypeError(f"env[{shown(name)}] is {value}; kldsl numbers are finite")
    if isinstance(value, Node | LM | str | int | float):
        return value
    if callable(value):  # a plain batched function: a reward named after its env key
        return graph.reward(value, name=name)
    raise KldslTypeError(
        f"env[{shown(name)}] is a {type(value).__name__}; env values must be rewards, "
        "constraints, LMs, numbers or strings"
    )


class _Kwarg(NamedTuple):
    name: str
    value: Any
    meta: Any


# Raw control characters (a tab too) a string may not hold: they are written as escapes.
_CONTROL = re.compile(r"[\x00-\x1f]")
# What the bracket-depth scan sees: strings and comments (skipped whole), and parentheses.
_BRACKETS = re.compile(r'"(?:\\.|[^"\\\n])*"|#[^\n]*|[()]')


@v_args(meta=True)
class _Evaluator(Transformer_NonRecursive):
    """Evaluates the parse tree bottom-up; method names follow the grammar's aliases.

    Non-recursive, so that a long chain of number arithmetic cannot exhaust the stack;
    graph nodes themselves are bounded by :data:`kldsl.graph.MAX_DEPTH`.
    """

    def __init__(self, text: str, env: Mapping[str, Any], source: str):
        super().__init__()
        self.lines = _lines(text)
        self.source = source
        self.env = {k: _env_value(k, v) for k, v in env.items()}
        self.scope: dict[str, Any] = {}  # names bound by earlier statements
        self.statements: dict[str, Any] = {}

    # --- errors with positions -----------------------------------------------------
    def _line(self, line: int) -> str:
        return self.lines[line - 1] if 0 < line <= len(self.lines) else ""

    def _where(self, meta: Any) -> tuple[str, str]:
        line = getattr(meta, "line", 1)
        column = getattr(meta, "column", 1)
        return f"{self.source}:{line}:{column}", snippet(self._line(line), column)

    def _syntax(self, label: str, meta: Any, offset: int = 0) -> KldslSyntaxError:
        """A syntax error at ``offset`` characters after the start of ``meta``."""
        line = getattr(meta, "line", 1)
        column = getattr(meta, "column", 1) + offset
        return KldslSyntaxError(label, line, column, self._line(line), self.source)

    def _located(self, err: KldslError, meta: Any) -> KldslError:
        if isinstance(err, KldslSyntaxError) or getattr(err, "_located", False):
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
        if not math.isfinite(value):
            raise self._syntax(
                f"number too large: {shorten(text, 20)} (numbers are finite, below about 1.8e308)",
                meta,
            )
        if not text.isdigit():
            return value
        if not text.isascii():  # other scripts' decimal digits
            text = "".join(str(unicodedata.decimal(c)) for c in text)
        return int(text.lstrip("0") or "0")

    def string(self, meta: Any, children: list[Token]) -> str:
        token = str(children[0])
        control = _CONTROL.search(token)
        if control is not None:
            char = control.group()
            raise self._syntax(
                f"control character U+{ord(char):04X} in a string; write it as "
                f"{json.dumps(char)[1:-1]}",
                meta,
                control.start(),
            )
        try:
            value = json.loads(token)
        except json.JSONDecodeError as err:
            raise self._syntax(f"bad string escape: {err.msg}", meta, err.pos) from None
        at = surrogate_at(value)
        if at is not None:
            raise self._syntax(
                f"the string holds a lone surrogate {value[at]!r}; write the character itself "
                "or a full surrogate pair",
                meta,
            )
        return value

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
            hint = f"(to load an LM by name, write prior({shorten(json.dumps(name))}))"
        raise self._located(KldslNameError(name, known, hint=hint), meta)

    def call(self, meta: Any, children: list[Any]) -> Any:
        name = str(children[0])
        args, kwargs = [], {}
        for arg in children[1].children if len(children) > 1 else []:
            if isinstance(arg, _Kwarg):
                if arg.name in kwargs:
                    label = f"duplicate keyword argument {shorten(arg.name)!r}"
                    raise self._syntax(label, arg.meta)
                kwargs[arg.name] = arg.value
            elif kwargs:
                raise self._syntax("positional argument after a keyword argument", meta)
            else:
                args.append(arg)
        if name not in FACTORIES:
            if name in self.scope or name in self.env or name in builtin_names():
                err: KldslError = KldslTypeError(
                    f"`{shorten(name)}` is not a function; only built-ins can be called: "
                    f"{', '.join(sorted(FACTORIES))}"
                )
                raise self._located(err, meta)
            raise self._located(KldslNameError(name, FACTORIES, what="function"), meta)
        label = None
        if name == "prior":
            args, kwargs, label = self._env_lm(args, kwargs)
        fn = FACTORIES[name]
        try:
            value = fn(*args, **kwargs)
            return value if label is None else dataclasses.replace(value, label=label)
        except TypeError as err:
            if isinstance(err, KldslError):
                raise self._located(err, meta) from None
            message = KldslTypeError(f"{name}(): {shorten(str(err), 2 * SHOWN)}")
            raise self._located(message, meta) from None
        except KldslError as err:
            raise self._located(err, meta) from None

    def _env_lm(
        self, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict, str | None]:
        """``prior("name")`` with an LM ``env["name"]``: that LM (how a non-identifier LM
        name prints). Also the env name of an LM argument, the prior's printing label, so
        it prints under the name it has in ``env`` and parses back with the same env."""
        model = args[0] if args else kwargs.get("model")
        if isinstance(model, str) and isinstance(self.env.get(model), LM):
            label: str | None = model
            if args:
                args = [self.env[model], *args[1:]]
            else:
                kwargs = {**kwargs, "model": self.env[model]}
        elif isinstance(model, LM):
            names = [k for k, v in self.env.items() if v is model]
            label = model.name if model.name in names else next(iter(names), None)
        else:
            label = None
        return args, kwargs, label

    def arguments(self, meta: Any, children: list[Any]) -> Tree:
        return Tree("arguments", children)

    def kwarg(self, meta: Any, children: list[Any]) -> _Kwarg:
        return _Kwarg(str(children[0]), children[1], meta)

    # --- operators -------------------------------------------------------------------
    def condition(self, meta: Any, children: list[Any]) -> Any:
        left, right = children
        if isinstance(left, ConstraintExpr):
            a, b = shown(left), shown(right)
            err = KldslTypeError(
                f"`{a} | {b}`: in .kl text `|` conditions a model; combine constraints "
                f"with `or`: `{a} or {b}`"
            )
            raise self._located(err, meta)
        if isinstance(right, graph.Mean):
            err = KldslTypeError(f"`| {right}`: set the mean to a number: `| {right} == μ`")
            raise self._located(err, meta)
        if not isinstance(left, Model):
            raise self._located(
                KldslTypeError(
                    f"`... | {shown(right)}`: the left of `|` must be a model, not {_kind(left)}"
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
            hint = (
                f"; for a reward write `-{shown(value)}`" if isinstance(value, RewardExpr) else ""
            )
            raise self._located(
                KldslTypeError(f"`not` applies to constraints, not {_kind(value)}{hint}"), meta
            )
        return self._apply(meta, lambda c: ~c, value)

    def eq(self, meta: Any, children: list[Any]) -> Any:
        left, right = children
        if not isinstance(left, graph.Mean):
            if isinstance(left, RewardExpr):
                hint = f"write `mean({shown(left)}) == ...`"
            elif isinstance(left, ConstraintExpr):
                hint = f"a constraint's rate is `mean(indicator({shown(left)})) == ...`"
            else:
                hint = "write `mean(φ) == μ` with a reward φ"
            err = KldslTypeError(
                f"`==` sets the posterior mean of a reward, but its left is {_kind(left)}; {hint}"
            )
            raise self._located(err, meta)
        if isinstance(right, bool) or not isinstance(right, int | float):
            err = KldslTypeError(
                f"`{left} == ...` sets the mean to a number μ, not to {_kind(right)}"
            )
            raise self._located(err, meta)
        return self._apply(meta, lambda a, b: a == b, left, right)

    @staticmethod
    def _logic(op: str, left: Any, right: Any) -> Any:
        if any(isinstance(side, graph.Moment) for side in (left, right)):
            raise KldslTypeError(
                f"`{op}` combines pointwise constraints; a distributional constraint is a "
                "condition of its own: `model | mean(φ1) == 0.5 | mean(φ2) == 0.2`"
            )
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
            return self._apply(meta, lambda x: -x, value)
        raise self._located(
            KldslTypeError(f"unary `-` applies to numbers and rewards, not {_kind(value)}"), meta
        )


def _arith(op: str) -> Callable[[Any, Any], Any]:
    def apply(left: Any, right: Any) -> Any:
        if isinstance(left, int | float) and isinstance(right, int | float):
            return _number_op(op, left, right)
        if op == "+":
            if isinstance(left, RewardExpr):
                return left + right
        elif op == "-":
            if isinstance(left, RewardExpr):
                return left - right
        elif op == "*":
            if isinstance(left, int | float) and isinstance(right, Model):
                raise KldslTypeError("a model cannot be scaled by a number")
            if isinstance(left, Node) or (
                isinstance(left, int | float) and isinstance(right, Node)
            ):
                return left * right
        elif op == "/":
            if isinstance(left, RewardExpr):
                return left / right
        elif op == "**":
            if isinstance(left, graph.Prior):
                return left**right
            raise KldslTypeError(
                f"`**` tempers a prior (`prior(...) ** 0.5`); got {_kind(left)} on the left"
            )
        hint = ""
        if op == "*" and isinstance(left, str | LM) and isinstance(right, Model):
            name = left.name if isinstance(left, LM) else left
            if name:
                hint = f"; an LM is a factor as a prior: `prior({shorten(json.dumps(name))}) * ...`"
        raise KldslTypeError(f"`{op}` does not apply to {_kind(left)} and {_kind(right)}{hint}")

    return apply


def _number_op(op: str, left: float | int, right: float | int) -> float | int:
    """``left op right`` on numbers; the result must be a finite number."""
    a, b = (f"({shown(x)})" if x < 0 else shown(x) for x in (left, right))
    where = f"`{a} {op} {b}`"
    if (op == "/" and right == 0) or (op == "**" and left == 0 and right < 0):
        raise ZeroDivisionError
    try:
        if op == "+":
            value = left + right
        elif op == "-":
            value = left - right
        elif op == "*":
            value = left * right
        elif op == "/":
            value = left / right
        else:
            value = math.pow(left, right)
        finite = math.isfinite(value)  # float(value): a too large int overflows here too
    except OverflowError:
        finite = False
    except ValueError:  # math.pow of a negative number to a fractional power
        raise KldslTypeError(f"{where} has no real value") from None
    if not finite:
        raise KldslTypeError(f"{where} is too large: numbers are finite (below about 1.8e308)")
    return value
