"""Grammar-aware fuzzing of the text front-end.

Three sources of text: valid programs built from the grammar's constructs and the
built-ins, mutations of them (characters and tokens deleted, inserted, swapped), and
random sequences of the grammar's tokens. For every text, ``kl.parse`` either returns a
model or raises a :class:`kldsl.KldslError`; a model prints text that parses back to an
equal model and prints the same text again, and ``explain()`` describes it. Nothing here
loads a model: ``prior(smollm2)`` only names one.

The runs are deterministic (``derandomize``). ``KLDSL_FUZZ_EXAMPLES`` sets the total
number of cases over the three tests (default 3000; ``make fuzz`` runs a long campaign),
and ``KLDSL_FUZZ_SEED`` draws a different (still reproducible) set of cases.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import kldsl as kl

TOTAL = int(os.environ.get("KLDSL_FUZZ_EXAMPLES", "3000"))
SEED = os.environ.get("KLDSL_FUZZ_SEED")
ENV = {
    "toy": kl.ToyLM(vocab="ab", seed=0, name="toy"),
    "toy+fit": kl.ToyLM(vocab="ab", seed=0, name="toy+fit"),  # a name that prints as a string
}
CASES: Counter[tuple[str, str]] = Counter()  # (source, "parsed" or "rejected") -> count
#: The longest message an error may have, whatever the input (echoed text is cut short).
MAX_MESSAGE = 4000


def fuzz(share: float):
    """Hypothesis settings for one test: ``share`` of the cases, deterministic, no deadline."""

    def apply(test):
        test = settings(
            max_examples=max(1, int(TOTAL * share)),
            derandomize=SEED is None,
            database=None,
            deadline=None,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.filter_too_much,
                HealthCheck.large_base_example,
            ],
        )(test)
        return seed(int(SEED))(test) if SEED is not None else test

    return apply


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    sources = sorted({source for source, _ in CASES})
    detail = ", ".join(
        f"{s} {CASES[s, 'parsed'] + CASES[s, 'rejected']} ({CASES[s, 'parsed']} parsed)"
        for s in sources
    )
    print(f"\nfuzz: {sum(CASES.values())} cases: {detail}")


def check(text: str, source: str) -> kl.Model | None:
    """Parse ``text``: a model that round-trips through its printed text, or None after a
    KldslError. Any other exception fails the test."""
    try:
        model = kl.parse(text, env=ENV)
    except kl.KldslError as err:
        message = str(err)
        assert message.encode("utf-8") and len(message) <= MAX_MESSAGE  # printable and short
        CASES[source, "rejected"] += 1
        return None
    CASES[source, "parsed"] += 1
    printed = str(model)
    printed.encode("utf-8")  # what `kldsl explain` writes: valid Unicode
    again = kl.parse(printed, env=ENV)
    assert again == model, (text, printed)
    assert str(again) == printed
    assert model.explain().split("\n")[0] == printed
    return model


# --- valid programs -----------------------------------------------------------------------

# Precedence levels of the grammar, loosest first (as in kldsl.graph).
P_COND, P_OR, P_AND, P_NOT, P_SUM, P_PROD, P_NEG, P_POW, P_ATOM = range(1, 10)

SPACE = st.sampled_from([" ", " ", " ", "  ", "\t", "\f", " \\\n  ", " \\\r\n"])
TIGHT = st.one_of(SPACE, st.just(""))  # around a symbol; a keyword needs a space
POSITIVE = ["1", "2", "3", "0.5", ".5", "3.", "2e-1", "1E1", "007", "0.25", "10", "1e2", "٣"]
SMALL = ["0", "1", "2", "0.5", "3"]
STRINGS = [
    '""',
    '"a"',
    '"Hello, world"',
    '"q\\"uote"',
    '"back\\\\slash"',
    '"new\\nline"',
    '"\\u00e9t\\u00e9"',
    '"ünï ☃"',
    '"\\ud83d\\ude00"',
    '"tab\\there"',
    '"#not a comment"',
    '"line\u2028sep"',
]
WORDS = ['"a"', '"Paris"', '"q\\"uote"', '"é"', '"\\t"']
PATTERNS = ['"a+b"', '"^The"', '"[0-9]{2,3}"', '"(a|b)*c$"', '"\\\\d+"', '"é."']
LMS = ["smollm2", '"smollm2"', '"gpt2"', "toy", '"toy+fit"', '"./models/mine"']
PREFIXES = ["v", "β", "r_", "ünï", "Ω", "x"]


class Program:
    """The state of one generated program: names bound so far, by kind."""

    def __init__(self, draw):
        self.draw = draw
        self.names: dict[str, list[str]] = {k: [] for k in ("pos", "int", "r", "c", "m", "p")}
        self.count = 0

    def new_name(self) -> str:
        self.count += 1
        return f"{self.draw(st.sampled_from(PREFIXES))}{self.count}"

    def pick(self, kind: str) -> str | None:
        names = self.names[kind]
        return self.draw(st.sampled_from(names)) if names and self.draw(st.booleans()) else None

    def op(self, left: str, symbol: str, right: str) -> str:
        spaces = SPACE if symbol.isalpha() else TIGHT
        return f"{left}{self.draw(spaces)}{symbol}{self.draw(spaces)}{right}"

    def wrap(self, text_prec: tuple[str, int], need: int) -> str:
        text, prec = text_prec
        if prec < need or self.draw(st.integers(0, 11)) == 0:  # sometimes redundant ( )
            return f"({self.draw(st.sampled_from(['', ' ']))}{text})"
        return text

    # numbers: positive ones (for β, α), any, and integers (max_tokens)
    def positive(self, depth: int) -> tuple[str, int]:
        kind = self.draw(st.integers(0, 6 if depth > 0 else 1))
        if kind == 0 or (kind == 1 and not self.names["pos"]):
            return self.draw(st.sampled_from(POSITIVE)), P_ATOM
        if kind == 1:
            return self.draw(st.sampled_from(self.names["pos"])), P_ATOM
        if kind == 2:
            a, b = self.positive(depth - 1), self.positive(depth - 1)
            return self.op(self.wrap(a, P_SUM), "+", self.wrap(b, P_PROD)), P_SUM
        if kind in (3, 4):
            a, b = self.positive(depth - 1), self.positive(depth - 1)
            symbol = "*" if kind == 3 else "/"
            return self.op(self.wrap(a, P_PROD), symbol, self.wrap(b, P_NEG)), P_PROD
        if kind == 5:
            base = self.draw(st.sampled_from(POSITIVE[:4]))
            exponent = self.draw(st.sampled_from(["0", "1", "2", "0.5", "-1"]))
            return self.op(base, "**", exponent), P_POW
        inner = "-" + self.wrap(self.positive(depth - 1), P_NEG)
        return f"-{self.wrap((inner, P_NEG), P_NEG)}", P_NEG  # minus a negative

    def number(self, depth: int) -> tuple[str, int]:
        text, prec = self.positive(depth)
        if self.draw(st.booleans()):
            return f"-{self.wrap((text, prec), P_NEG)}", P_NEG
        return text, prec

    def integer(self) -> str:
        name = self.pick("int")
        return name or str(self.draw(st.integers(1, 64)))

    # rewards and constraints
    def reward(self, depth: int) -> tuple[str, int]:
        kind = self.draw(st.integers(0, 6 if depth > 0 else 0))
        if kind == 0:
            name = self.pick("r")
            if name:
                return name, P_ATOM
            leaf = self.draw(
                st.sampled_from(
                    ["sentiment", "offensive", "length", 'reward_model(".")']
                    + ['reward_model(".", label="pos")', 'reward_model(".", 2)']
                )
            )
            return leaf, P_ATOM
        if kind == 1:
            r, beta = self.reward(depth - 1), self.positive(depth - 1)
            return self.op(self.wrap(r, P_PROD), "/", self.wrap(beta, P_NEG)), P_PROD
        if kind == 2:
            r, c = self.reward(depth - 1), self.number(depth - 1)
            return self.op(self.wrap(r, P_PROD), "*", self.wrap(c, P_NEG)), P_PROD
        if kind == 3:
            c, r = self.number(depth - 1), self.reward(depth - 1)
            return self.op(self.wrap(c, P_PROD), "*", self.wrap(r, P_NEG)), P_PROD
        if kind in (4, 5):
            a, b = self.reward(depth - 1), self.reward(depth - 1)
            return self.op(self.wrap(a, P_SUM), "+-"[kind - 4], self.wrap(b, P_PROD)), P_SUM
        return f"-{self.wrap(self.reward(depth - 1), P_NEG)}", P_NEG

    def constraint(self, depth: int) -> tuple[str, int]:
        kind = self.draw(st.integers(0, 3 if depth > 0 else 0))
        if kind == 0:
            name = self.pick("c")
            if name:
                return name, P_ATOM
            leaf = self.draw(st.sampled_from(["curse", "contains", "regex"]))
            if leaf == "contains":
                leaf = f"contains({self.draw(st.sampled_from(WORDS))})"
            elif leaf == "regex":
                leaf = f"regex({self.draw(st.sampled_from(PATTERNS))})"
            return leaf, P_ATOM
        if kind == 1:
            return self.op("", "not", self.wrap(self.constraint(depth - 1), P_NOT)).lstrip(), P_NOT
        a, b = self.constraint(depth - 1), self.constraint(depth - 1)
        if kind == 2:
            return self.op(self.wrap(a, P_AND), "and", self.wrap(b, P_NOT)), P_AND
        return self.op(self.wrap(a, P_OR), "or", self.wrap(b, P_AND)), P_OR

    # models
    def prior(self) -> tuple[str, int]:
        name = self.pick("p")
        if name:
            return name, P_ATOM
        lm = self.draw(st.sampled_from(LMS))
        args = [f"model={lm}"] if self.draw(st.integers(0, 5)) == 0 else [lm]
        options = []
        if self.draw(st.booleans()):
            options.append(("prompt", self.draw(st.sampled_from(STRINGS))))
        if self.draw(st.booleans()):
            options.append(("max_tokens", self.integer()))
        if self.draw(st.booleans()):
            options.reverse()
        positional = args[0] == lm and [k for k, _ in options] == ["prompt", "max_tokens"]
        if positional and self.draw(st.booleans()):
            args += [v for _, v in options]
        else:
            args += [f"{k}{self.draw(TIGHT)}={self.draw(TIGHT)}{v}" for k, v in options]
        comma = self.draw(st.sampled_from([",", ", ", ",\t"]))
        trailing = "," if self.draw(st.integers(0, 5)) == 0 else ""
        return f"prior({comma.join(args)}{trailing})", P_ATOM

    def factor(self, depth: int) -> tuple[str, int]:
        kind = self.draw(st.integers(0, 3))
        if kind == 0:
            return self.prior()
        if kind == 1:
            p = self.prior()
            return self.op(self.wrap(p, P_ATOM), "**", self.wrap(self.positive(1), P_NEG)), P_POW
        if kind == 2 and self.names["m"]:
            return self.draw(st.sampled_from(self.names["m"])), P_ATOM
        return f"exp({self.draw(TIGHT)}{self.reward(depth)[0]})", P_ATOM

    def model(self, depth: int) -> tuple[str, int]:
        """A model: it always holds a prior (at the front or further on)."""
        text, prec = self.prior()
        for _ in range(self.draw(st.integers(0, 3))):
            kind = self.draw(st.integers(0, 3))
            if kind == 0:
                f = self.factor(depth)
                text, prec = (
                    self.op(self.wrap((text, prec), P_PROD), "*", self.wrap(f, P_NEG)),
                    P_PROD,
                )
            elif kind == 1:
                f = self.factor(depth)
                text, prec = (
                    self.op(self.wrap(f, P_PROD), "*", self.wrap((text, prec), P_NEG)),
                    P_PROD,
                )
            elif kind == 2:
                c = self.constraint(depth)
                text, prec = (
                    self.op(self.wrap((text, prec), P_COND), "|", self.wrap(c, P_OR)),
                    P_COND,
                )
            else:
                m = self.moment(depth)
                text, prec = (
                    self.op(self.wrap((text, prec), P_COND), "|", self.wrap(m, P_OR)),
                    P_COND,
                )
        return text, prec

    def moment(self, depth: int) -> tuple[str, int]:
        """``mean(φ) == μ`` with μ inside φ's bounds: a rate of a constraint, or a length."""
        if self.draw(st.booleans()):
            feature = f"indicator({self.draw(TIGHT)}{self.constraint(depth)[0]})"
            mu = self.draw(st.sampled_from(["0.5", ".25", "0.75", "1 / 4", "3e-1", "1 - 0.1"]))
        else:
            feature = self.draw(st.sampled_from(["length", "length * 2", "-length"]))
            mu = self.draw(st.sampled_from(["1", "2.5", "0.5"]))
            if feature == "-length":
                mu = f"-{mu}"
        mean = f"mean({self.draw(TIGHT)}{feature}{self.draw(TIGHT)})"
        return self.op(mean, "==", mu), P_NOT


LINE_ENDS = ["\n", "\n", "\n", "\r\n", "\n\n", "  # a comment\n", '\n# ünï "x" = 1\n\t\n']


@st.composite
def programs(draw) -> str:
    """A valid program: statements binding numbers, rewards, constraints and models to
    names, then the model (bound to a name or bare)."""
    prog = Program(draw)
    statements = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["pos", "int", "r", "c", "m", "p"]))
        value = {
            "pos": lambda: prog.positive(2)[0],
            "int": lambda: str(draw(st.integers(1, 64))),
            "r": lambda: prog.reward(2)[0],
            "c": lambda: prog.constraint(2)[0],
            "m": lambda: prog.model(1)[0],
            "p": lambda: prog.prior()[0],
        }[kind]()
        name = prog.new_name()
        statements.append(f"{name}{draw(TIGHT)}={draw(TIGHT)}{value}")
        prog.names[kind].append(name)
    last = prog.model(2)[0]
    statements.append(f"{prog.new_name()} = {last}" if draw(st.booleans()) else last)
    text = statements[0]
    for statement in statements[1:]:
        text += draw(st.sampled_from(LINE_ENDS)) + statement
    head = draw(st.sampled_from(["", "", "\n", "# model\n", "\ufeff", "\ufeff# bom\n"]))
    return head + text + draw(st.sampled_from(["", "\n", "\n\n", "  # end\n", "\r\n"]))


@fuzz(0.25)
@given(programs())
def test_valid_programs_parse_and_round_trip(text):
    assert check(text, "valid") is not None, text


# --- mutated programs ---------------------------------------------------------------------

TOKENS = [
    *["prior", "exp", "sentiment", "offensive", "length", "curse", "contains", "regex"],
    *["mean", "indicator", "=="],
    *["reward_model", "smollm2", "toy", "x", "β", "__import__", "eval", "lambda", "__class__"],
    *["not", "and", "or", "nota", "(", ")", ",", "=", "|", "*", "/", "+", "-", "**", "."],
    *["0", "1", "2.5", ".5", "3.", "1e999", "1e-400", "9" * 400, "0" * 40 + "7", "1e308"],
    *['""', '"a"', '"gpt2"', '"toy+fit"', '"\\ud800"', '"\\udc00\\ud800"', '"\\q"', '"\\u00"'],
    *['"a\tb"', '"\\ud83d\\ude00"', "'a'", '"', 'f"{1}"', "#", "\\", "!", "~", "&", ":"],
    *["prompt=", "max_tokens=", "model=", "label=", "\n", "\r\n", "\r", " ", "\t", "\f"],
]
CHARS = list('()"\\=,|*/+-.#0123456789eE_abnotrd \t\n') + [
    *["\r", "\f", "\x0b", "\x00", "\x1b", "\ufeff", "\u2028", "\u2029", "\x85"],
    *["\ud800", "\udfff", "é", "β", "٣", "☃", "'", "!", "~", "&", "[", "{", ";", "$", "@"],
]


@st.composite
def mutated(draw) -> str:
    text = draw(programs())
    for _ in range(draw(st.integers(1, 4))):
        n = len(text)
        i = draw(st.integers(0, n))
        kind = draw(st.integers(0, 5))
        if kind == 0 and n:  # delete a few characters
            j = min(n, i + draw(st.integers(1, 3)))
            text = text[:i] + text[j:]
        elif kind == 1:  # insert a character
            text = text[:i] + draw(st.sampled_from(CHARS)) + text[i:]
        elif kind == 2 and i + 1 < n:  # swap two neighbours
            text = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
        elif kind == 3:  # insert a token
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
        elif kind == 4 and n:  # duplicate a span
            j = min(n, i + draw(st.integers(1, 12)))
            text = text[:j] + text[i:j] + text[j:]
        elif n:  # replace a character
            text = text[: max(i - 1, 0)] + draw(st.sampled_from(CHARS)) + text[i:]
    return text


@fuzz(0.35)
@given(mutated())
def test_mutated_programs_fail_cleanly_or_round_trip(text):
    check(text, "mutated")


# --- random token sequences ---------------------------------------------------------------


@st.composite
def token_soup(draw) -> str:
    tokens = draw(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=30))
    if draw(st.booleans()):  # most texts that parse start like a model
        tokens = ["m", "=", "prior", "(", "smollm2", ")", *tokens]
    out = ""
    for token in tokens:
        out += draw(st.sampled_from([" ", " ", ""])) + token
    return out


@fuzz(0.2)
@given(token_soup())
def test_token_sequences_fail_cleanly_or_round_trip(text):
    check(text, "tokens")


# --- grammatical programs of random types -------------------------------------------------

ATOMS = [
    *["sentiment", "offensive", "length", "curse", "smollm2", "toy", "prior", "exp"],
    *["unknown", "β", "nota", "0", "1", "0.5", "2", "1e308", "1e-320", "0" * 30 + "12"],
    *['""', '"a"', '"gpt2"', '"toy+fit"', '"\\ud800"', '"\\q"', '"."', '"a\tb"'],
    *["exp(length)", "exp(sentiment / 0.5)", "prior(toy)", 'prior("toy+fit")', "curse"],
    *['contains("a")', "(prior(smollm2) | curse)", 'regex("b+")', "exp(-offensive)"],
]
CALLS = ["prior", "exp", "contains", "regex", "reward_model", "unknown", "length", "eval"]
KEYWORDS = ["prompt", "max_tokens", "model", "label", "word", "pattern", "path", "other"]


@st.composite
def any_expression(draw, depth: int = 2) -> tuple[str, int]:
    """Text the grammar accepts, with operands of any type (mostly type errors)."""
    prog = Program(draw)
    kind = draw(st.integers(-6, 9 if depth > 0 else 0))
    if kind <= 0:
        return draw(st.sampled_from(ATOMS)), P_ATOM
    if kind == 1:
        args = []
        for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2, 3])) if depth > 0 else 0):
            arg = draw(any_expression(depth - 1))[0]
            if draw(st.booleans()):
                arg = f"{draw(st.sampled_from(KEYWORDS))}={arg}"
            args.append(arg)
        return f"{draw(st.sampled_from(CALLS))}({', '.join(args)})", P_ATOM
    a, b = draw(any_expression(depth - 1)), draw(any_expression(depth - 1))
    if kind == 2:
        return prog.op(prog.wrap(a, P_COND), "|", prog.wrap(b, P_OR)), P_COND
    if kind == 3:
        return prog.op(prog.wrap(a, P_OR), "or", prog.wrap(b, P_AND)), P_OR
    if kind == 4:
        return prog.op(prog.wrap(a, P_AND), "and", prog.wrap(b, P_NOT)), P_AND
    if kind == 5:
        return f"not {prog.wrap(a, P_NOT)}", P_NOT
    if kind == 6:
        symbol = draw(st.sampled_from("+-"))
        return prog.op(prog.wrap(a, P_SUM), symbol, prog.wrap(b, P_PROD)), P_SUM
    if kind == 7:
        symbol = draw(st.sampled_from("*/"))
        return prog.op(prog.wrap(a, P_PROD), symbol, prog.wrap(b, P_NEG)), P_PROD
    if kind == 8:
        return f"-{prog.wrap(a, P_NEG)}", P_NEG
    return prog.op(prog.wrap(a, P_ATOM), "**", prog.wrap(b, P_NEG)), P_POW


@st.composite
def any_program(draw) -> str:
    statements = [
        f"{name} = {draw(any_expression())[0]}"
        for name in draw(st.lists(st.sampled_from(["a", "b", "length", "toy"]), max_size=2))
    ]
    last = draw(any_expression())[0]
    if draw(st.booleans()):  # a model to start from: more texts get past the types
        prog, part = Program(draw), draw(any_expression())
        last = draw(
            st.sampled_from(
                [
                    f"prior(smollm2) * {prog.wrap(part, P_NEG)}",
                    f"{prog.wrap(part, P_PROD)} * prior(toy)",
                    f"prior(toy) | {prog.wrap(part, P_OR)}",
                ]
            )
        )
    return "\n".join([*statements, last])


@fuzz(0.2)
@given(any_program())
def test_grammatical_programs_of_any_type_fail_cleanly_or_round_trip(text):
    check(text, "typed at random")
