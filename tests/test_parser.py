"""The text front-end: same graph as Python, printing round trips, located errors."""

import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kldsl as kl
from kldsl.errors import KldslNameError, KldslSyntaxError, KldslTypeError
from kldsl.graph import MAX_DEPTH

TOY = kl.ToyLM(vocab="ab", seed=0, name="toy")
EXAMPLES = Path(__file__).parent.parent / "examples"
OTHER = kl.ToyLM(vocab="ab", seed=1, name="other")


@kl.reward
def happy(texts):
    return [1.0] * len(texts)


@kl.constraint(closed="prefix")
def short(texts):
    return [len(t) < 3 for t in texts]


ENV = {"toy": TOY, "other": OTHER, "happy": happy, "short": short}


def test_card_line_verbatim():
    def f(texts):
        return [0.0] * len(texts)

    lm = kl.ToyLM(name="gpt2")
    text = "posterior = prior(gpt2) * exp(reward/β) | not curse"
    graph = kl.parse(text, env={"reward": f, "β": 0.1, "gpt2": lm})
    assert graph == kl.prior(lm) * kl.exp(kl.reward(f) / 0.1) | ~kl.curse


def test_flagship_example_equals_python_form():
    graph = kl.load(EXAMPLES / "positive_not_curse.kl")
    base = graph.base()
    python = (
        kl.prior("smollm2", prompt=base.prompt, max_tokens=40) * kl.exp(kl.sentiment / 0.2)
        | ~kl.curse
    )
    assert graph == python
    assert kl.parse(str(graph)) == graph


def test_statements_comments_and_names():
    src = """
    # a comment line
    β = 0.5 * 2          # arithmetic on numbers
    r = happy / β - length / 4
    c = not curse and (contains("a") or regex("^b"))

    posterior = prior(toy, prompt="ab", max_tokens=3) * exp(r) | c
    """
    src = "\n".join(line.strip() for line in src.splitlines())
    graph = kl.parse(src, env=ENV)
    expected = kl.prior(TOY, prompt="ab", max_tokens=3) * kl.exp(
        happy / 1.0 - kl.length / 4
    ) | ~kl.curse & (kl.contains("a") | kl.regex("^b"))
    assert graph == expected


def test_unicode_strings_and_escapes_round_trip():
    graph = kl.parse('m = prior(toy, prompt="Ünï \\"q\\" \\n") | contains("é")', env=ENV)
    assert graph.base().prompt == 'Ünï "q" \n'
    assert kl.parse(str(graph), env=ENV) == graph


def test_hub_names_are_strings_and_embedded_names_are_bare():
    assert str(kl.parse('m = prior("gpt2")')) == 'prior("gpt2")'
    assert kl.parse("m = prior(smollm2)") == kl.parse('m = prior("smollm2")')
    assert str(kl.parse("m = prior(smollm2)")) == "prior(smollm2)"


# --- round trip over random graphs -----------------------------------------------------

numbers = st.sampled_from([0.1, 0.5, 2.0, 3.0, 1e-3, 10.0])
reward_leaves = st.sampled_from([kl.sentiment, kl.offensive, kl.length, happy])
constraint_leaves = st.sampled_from(
    [kl.curse, short, kl.contains("a"), kl.contains('q"uote'), kl.regex("a+b")]
)
rewards = st.recursive(
    reward_leaves,
    lambda inner: st.one_of(
        st.builds(lambda r, c: r / c, inner, numbers),
        st.builds(lambda r, c: r * c, inner, numbers),
        st.builds(lambda r, c: r * -c, inner, numbers),
        st.builds(lambda a, b: a + b, inner, inner),
        st.builds(lambda a, b: a - b, inner, inner),
        st.builds(lambda a: -a, inner),
    ),
    max_leaves=5,
)
constraints = st.recursive(
    constraint_leaves,
    lambda inner: st.one_of(
        st.builds(lambda c: ~c, inner),
        st.builds(lambda a, b: a & b, inner, inner),
        st.builds(lambda a, b: a | b, inner, inner),
    ),
    max_leaves=5,
)
priors = st.builds(
    kl.prior,
    st.sampled_from([TOY, OTHER, "smollm2", "gpt2"]),
    prompt=st.sampled_from(["", "ab", "Hello, world"]),
    max_tokens=st.integers(1, 64),
)
factors = st.one_of(
    priors,
    st.builds(lambda p, a: p**a, priors, numbers),
    st.builds(kl.exp, rewards),
)


def moment(feature: kl.RewardExpr, u: float) -> kl.Moment:
    """``mean(feature) == μ`` with μ strictly inside the feature's bounds (``u`` in (0, 1))."""
    lo, hi = feature.bounds()
    if math.isinf(lo) and math.isinf(hi):
        mu = u - 0.5
    elif math.isinf(hi):
        mu = lo + u
    elif math.isinf(lo):
        mu = hi - u
    else:
        mu = lo + (hi - lo) * u
    return kl.mean(feature) == mu


moments = st.builds(
    moment,
    st.one_of(rewards, st.builds(kl.indicator, constraints)),
    st.sampled_from([0.25, 0.5, 0.1]),
)


@st.composite
def models(draw):
    model = draw(priors)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["mul", "cond", "lmul", "moment"]))
        if kind == "mul":
            model = model * draw(factors)
        elif kind == "lmul":
            model = draw(st.builds(kl.exp, rewards)) * model
        elif kind == "moment":
            model = model | draw(moments)
        else:
            model = model | draw(constraints)
    return model


@settings(max_examples=300, deadline=None)
@given(models())
def test_print_parse_round_trip(model):
    text = str(model)
    assert kl.parse(f"m = {text}", env=ENV) == model
    assert str(kl.parse(text, env=ENV)) == text


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "label", "line", "column"),
    [
        ("m = prior(toy) *\n", "missing operand after '*'", 1, 16),
        ("a = 1\nm = prior(toy) * | curse\n", "missing operand after '*'", 2, 16),
        ("m = prior(toy, max_tokens=3\n", "missing ')'", 1, 28),
        ("m = prior(toy))\n", "unbalanced ')'", 1, 15),
        ("m = prior(toy) exp(happy)\n", "missing an operator", 1, 16),
        ("m = prior(toy) | 'x'\n", "strings use double quotes", 1, 18),
        ("m = prior(toy) | !curse\n", "write `not`", 1, 18),
        ("m = prior(toy) | curse & short\n", "write `and`", 1, 24),
        ('m = prior(toy, prompt="abc)\n', "unterminated string", 1, 23),
        ("m = prior(toy) | mean(happy) ==\n", "missing operand after '=='", 1, 31),
        ("m = prior(toy) | mean(happy) == 1 == 2\n", "`==` does not chain", 1, 35),
    ],
)
def test_syntax_errors_point_at_line_and_column(src, label, line, column):
    with pytest.raises(KldslSyntaxError) as info:
        kl.parse(src, env=ENV, source="model.kl")
    err = info.value
    assert label in err.label
    assert (err.line, err.column) == (line, column)
    lines = str(err).splitlines()
    assert lines[0] == f"model.kl:{line}:{column}: {err.label}"
    assert lines[1].strip() == src.splitlines()[line - 1].strip()
    assert lines[2].index("^") - 4 == column - 1


def test_unknown_names_suggest_the_closest():
    with pytest.raises(KldslNameError) as info:
        kl.parse("m = prior(toy) * exp(sentimnet / 0.1)", env=ENV)
    assert info.value.suggestion == "sentiment"
    assert "did you mean 'sentiment'?" in str(info.value)
    assert "<text>:1:22" in str(info.value)
    with pytest.raises(KldslNameError, match="did you mean 'contains'"):
        kl.parse('m = prior(toy) | contain("a")', env=ENV)
    with pytest.raises(KldslNameError, match='write prior\\("gpt2"\\)'):
        kl.parse("m = prior(gpt2)")


@pytest.mark.parametrize(
    ("src", "message"),
    [
        ("m = prior(toy) * exp(curse)", "condition on it with `model | curse`"),
        ("m = prior(toy) | happy", "`|` conditions on a constraint"),
        ("m = prior(toy) * exp(happy / 0)", "β must be > 0"),
        ("m = prior(toy) * exp(happy / -1)", "β must be > 0"),
        ("m = exp(happy)", "has no prior"),
        ("m = happy / 2", "is a reward, not a model"),
        ("m = prior(toy) | curse | short", None),
        ("m = prior(toy) | (curse | short)", "combine constraints with `or`"),
        ("m = prior(toy) | not happy", "`not` applies to constraints"),
        ("m = happy(1)", "only built-ins can be called"),
        ("m = prior(toy, max_token=3)", "unexpected keyword argument 'max_token'"),
        ("m = prior(toy) ** prior(toy)", "a prior is tempered by a number"),
        ("m = prior(toy) ** 0.5 ** happy", "tempers a prior"),
        ("m = prior(toy) | mean(curse) == 0.5", "`mean(indicator(curse))`"),
        ("m = prior(toy) | curse == 0.5", "`mean(indicator(curse)) == ...`"),
        ("m = prior(toy) | happy == 0.5", "write `mean(happy) == ...`"),
        ("m = prior(toy) | mean(happy)", "`| mean(happy) == μ`"),
        ('m = prior(toy) | mean(happy) == "a"', "sets the mean to a number"),
        ("m = prior(toy) | mean(offensive) == 2", "strictly inside (0, 1)"),
        ("m = prior(toy) | mean(happy) == 1 and mean(happy) == 2", "a condition of its own"),
    ],
)
def test_type_errors_are_located(src, message):
    if message is None:  # conditioning twice is fine
        assert kl.parse(src, env=ENV) == kl.prior(TOY) | kl.curse | short
        return
    with pytest.raises(KldslTypeError) as info:
        kl.parse(src, env=ENV)
    assert message in str(info.value)


def test_kl_text_never_runs_python():
    for src in [
        'm = __import__("os")',
        "m = prior(toy).__class__",
        'm = open("x")',
        "m = eval(1)",
    ]:
        with pytest.raises((KldslSyntaxError, KldslNameError)):
            kl.parse(src, env=ENV)


def test_env_values_are_checked():
    with pytest.raises(KldslTypeError, match="env values must be"):
        kl.parse("m = prior(toy)", env={"toy": TOY, "x": object()})


def test_kl_text_never_runs_python_lambdas_fstrings_dunders():
    for src in [
        "m = lambda: prior(toy)",
        'm = f"{prior(toy)}"',
        "m = __builtins__",
        "m = prior(toy).__dict__",
        'm = getattr(prior(toy), "lm")',
    ]:
        with pytest.raises((KldslSyntaxError, KldslNameError)):
            kl.parse(src, env=ENV)


# --- hostile inputs: each ends in a KldslError, never a traceback ----------------------


def test_nesting_deeper_than_max_depth_is_a_located_error():
    deep = {
        "sum": "m = prior(toy) * exp(" + " + ".join(["length"] * 600) + ")",
        "neg": "m = prior(toy) * exp(" + "-" * 600 + "length)",
        "not": "m = prior(toy) | " + "not " * 600 + "curse",
        "or": "m = prior(toy) | curse" + " or curse" * 600,
        "cond": "m = prior(toy)" + " | curse" * 600,
    }
    for kind, src in deep.items():
        with pytest.raises(KldslTypeError, match=f"more than the {MAX_DEPTH} kldsl allows") as info:
            kl.parse(src, env=ENV)
        assert str(info.value).startswith("<text>:1:"), kind
        assert len(str(info.value)) < 400, kind


def test_nesting_built_statement_by_statement_stops_at_max_depth():
    src = "r = length\n" + "r = r + length\n" * 493 + "m = prior(toy) * exp(r)"
    with pytest.raises(KldslTypeError, match="nests 201 levels deep") as info:
        kl.parse(src, env=ENV)
    assert str(info.value).startswith("<text>:201:5: ")


def test_a_model_at_max_depth_prints_parses_and_explains():
    # length (1) under MAX_DEPTH - 3 minus signs, a tilt and a product: MAX_DEPTH levels
    src = "r = length\n" + "r = -r\n" * (MAX_DEPTH - 3) + "m = prior(toy) * exp(r)"
    m = kl.parse(src, env=ENV)
    assert m.depth == MAX_DEPTH
    assert kl.parse(str(m), env=ENV) == m
    assert "tilt" in m.explain()


def test_parentheses_nest_at_most_max_depth():
    def nested(depth):
        return "m = prior(toy) * exp(" + "(" * depth + "length" + ")" * depth + ")"

    assert kl.parse(nested(MAX_DEPTH - 1), env=ENV) == kl.prior(TOY) * kl.exp(kl.length)
    for depth in (MAX_DEPTH, 5000):
        with pytest.raises(
            KldslSyntaxError, match=f"parentheses nest more than {MAX_DEPTH}"
        ) as info:
            kl.parse(f"# ((((\nx = 1\n{nested(depth)}", env=ENV)
        assert (info.value.line, info.value.column) == (3, 21 + MAX_DEPTH)
        assert len(str(info.value)) < 300
    # parentheses in strings and comments do not count
    many = '"' + "(" * 300 + '"'
    assert kl.parse(f"# {'(' * 300}\nm = prior(toy) | contains({many})", env=ENV)


def test_long_number_arithmetic_does_not_recurse():
    numbers = "n = " + " + ".join(["1"] * 5000) + "\nm = prior(toy, max_tokens=n - 4990)"
    assert kl.parse(numbers, env=ENV).base().max_tokens == 10
    negations = "n = " + "-" * 5000 + "3\nm = prior(toy, max_tokens=n)"
    assert kl.parse(negations, env=ENV).base().max_tokens == 3


def test_numbers_must_be_finite():
    assert kl.parse("n = " + "9" * 308 + "\nm = prior(toy)", env=ENV)
    assert (
        kl.parse("m = prior(toy, max_tokens=" + "0" * 5000 + "7)", env=ENV).base().max_tokens == 7
    )
    for src in ["n = " + "9" * 309, "m = prior(toy) * exp(length / 1e999)"]:
        with pytest.raises(KldslSyntaxError, match="number too large") as info:
            kl.parse(src + "\nm = prior(toy)", env=ENV)
        assert len(str(info.value)) < 300
    for src in [
        "m = prior(toy) * exp(length * 1e999)",
        "m = prior(toy) ** 1e999",
        "x = 1e999 - 1e999\nm = prior(toy) * exp(length * x)",
    ]:
        with pytest.raises(KldslSyntaxError, match=r"number too large: 1e999"):
            kl.parse(src, env=ENV)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("10 ** 400", "`10 ** 400` is too large"),
        ("(0-8) ** 0.5", "`(-8) ** 0.5` has no real value"),
        ("0 ** -1", "division by zero"),
        ("1 / 0", "division by zero"),
        ("1e308 * 10", "is too large"),
        ("1e308 + 1e308", "is too large"),
        ("9" * 300 + " * " + "9" * 300, "is too large"),
    ],
)
def test_number_arithmetic_errors_are_located(expr, message):
    with pytest.raises(KldslTypeError, match=re.escape(message)) as info:
        kl.parse(f"x = {expr}\nm = prior(toy)", env=ENV)
    assert str(info.value).startswith("<text>:1:5: ")
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    ("src", "message"),
    [
        (
            "m = smollm2 * exp(length)",
            "a string and a factor with no prior; an LM is a factor as a "
            'prior: `prior("smollm2") * ...`',
        ),
        ('m = "" * prior(toy)', "`*` does not apply to a string and a model"),
        ("m = toy * exp(length)", "`*` does not apply to an LM and a factor with no prior"),
        ('m = prior(toy) * "x"', "cannot multiply a model by 'x'"),
        ("m = prior(toy) * not curse", "`not` cannot follow '*': write `* (not ...)`"),
    ],
)
def test_products_of_names_and_strings_are_type_errors(src, message):
    with pytest.raises((KldslTypeError, KldslSyntaxError), match=re.escape(message)):
        kl.parse(src, env=ENV)


def test_load_rejects_bad_encodings_and_folders(tmp_path):
    bad = tmp_path / "bad.kl"
    bad.write_bytes(b"m = prior(toy)\nx = \xff\n")
    with pytest.raises(
        KldslSyntaxError, match="not UTF-8 text: byte 0xff at byte offset 19"
    ) as info:
        kl.load(bad, env=ENV)
    assert (info.value.line, info.value.column) == (2, 5)
    utf16 = tmp_path / "utf16.kl"
    utf16.write_bytes("m = prior(toy)\n".encode("utf-16"))
    with pytest.raises(KldslSyntaxError, match="UTF-16 byte-order mark; save it as UTF-8"):
        kl.load(utf16, env=ENV)
    assert kl.parse("m = prior(toy)\n".encode("utf-16").decode("utf-16"), env=ENV)
    with pytest.raises(kl.KldslError, match="is a folder, not a .kl file"):
        kl.load(tmp_path, env=ENV)
    with pytest.raises(KldslTypeError, match="must be a str, not bytes"):
        kl.parse(b"m = prior(toy)", env=ENV)


def test_lone_surrogates_in_strings_are_located_errors():
    for src in ['m = prior(toy, prompt="\\ud800")', 'm = prior(toy, prompt="a\ud800")']:
        with pytest.raises(KldslSyntaxError, match="lone surrogate") as info:
            kl.parse(src, env=ENV)
        assert (info.value.line, info.value.column) == (1, 23)
        str(info.value).encode("utf-8")  # the message itself can be printed
    with pytest.raises(KldslSyntaxError, match="lone surrogate") as info:
        kl.parse("m = prior(toy) \ud800", env=ENV)
    str(info.value).encode("utf-8")
    pair = kl.parse('m = prior(toy, prompt="\\ud83d\\ude00")', env=ENV)
    assert pair.base().prompt == "\U0001f600"


def test_messages_echo_user_text_cut_short():
    many = "".join(f"n{i} = 1\n" for i in range(20000)) + "m = zzz"
    with pytest.raises(KldslNameError, match=r"… \(19\d\d\d more\)") as info:
        kl.parse(many, env=ENV)
    assert len(str(info.value)) < 1000
    with pytest.raises(KldslNameError) as info:
        kl.parse("m = " + "a" * 1_000_000, env=ENV)
    assert len(str(info.value)) < 1000 and info.value.name == "a" * 1_000_000
    with pytest.raises(KldslTypeError) as info:
        kl.parse("m = prior(toy, " + "k" * 100_000 + "=1)", env=ENV)
    assert len(str(info.value)) < 1000
    with pytest.raises(KldslSyntaxError) as info:
        kl.parse("m = prior(toy) " + "x " * 100_000 + ")", env=ENV)
    assert len(str(info.value)) < 500


def test_lm_names_that_are_no_identifier_print_as_strings_and_read_back():
    fitted = kl.ToyLM(vocab="ab", seed=0, name="toy+fit")
    m = kl.prior(fitted, max_tokens=3) * kl.exp(kl.length)
    assert str(m) == 'prior("toy+fit", max_tokens=3) * exp(length)'
    assert kl.parse(str(m), env={"toy+fit": fitted}) == m
    assert kl.parse('m = prior(model="toy+fit")', env={"toy+fit": fitted}) == kl.prior(fitted)
    assert kl.parse('m = prior("toy+fit")') == kl.prior("toy+fit")  # without env: a name


def test_graph_name_pattern_is_the_grammar_name_terminal():
    from kldsl import graph
    from kldsl.parser import _parser

    assert graph._NAME.pattern == _parser().get_terminal("NAME").pattern.value


def test_duplicate_keyword_arguments_are_located_errors():
    with pytest.raises(KldslSyntaxError, match="duplicate keyword argument 'prompt'") as info:
        kl.parse('m = prior(toy, prompt="a", prompt="b")', env=ENV)
    assert (info.value.line, info.value.column) == (1, 28)


def test_string_errors_are_located_once_with_the_source_line():
    assert kl.parse('m = prior(toy, prompt="a\\tb")', env=ENV).base().prompt == "a\tb"
    for src, label, column in [
        (
            'm = prior(toy, prompt="a\tb")',
            r"control character U\+0009 in a string; write it as \\t",
            25,
        ),
        ('m = prior(toy, prompt="a\\qb")', "bad string escape", 25),
        ('m = prior(toy, prompt="a\x01b")', r"control character U\+0001", 25),
        ('m = prior(toy, prompt="a", 3)', "positional argument after a keyword argument", 5),
    ]:
        with pytest.raises(KldslSyntaxError, match=label) as info:
            kl.parse(f"x = 1\n{src}", env=ENV)
        lines = str(info.value).splitlines()
        assert lines[0] == f"<text>:2:{column}: {info.value.label}"
        assert lines[1] == f"    {src}"
        assert lines[2].index("^") - 4 == column - 1


def test_byte_order_mark_and_line_ends_are_read_alike_by_parse_and_load(tmp_path):
    expected = kl.parse("x = 2\nm = prior(toy, max_tokens=x)", env=ENV)
    for text in [
        "\ufeffx = 2\nm = prior(toy, max_tokens=x)",
        "x = 2\r\nm = prior(toy, max_tokens=x)\r\n",
        "x = 2\rm = prior(toy, max_tokens=x)\r",
    ]:
        assert kl.parse(text, env=ENV) == expected
        path = tmp_path / "m.kl"
        path.write_bytes(text.encode("utf-8"))
        assert kl.load(path, env=ENV) == expected


@pytest.mark.parametrize(
    "line",
    ["a = 1 \f", "# \u2028 \x0b \x1c \x85 in a comment", 'a = "\u2028 \u2029"'],
    ids=["form-feed", "comment", "string"],
)
def test_errors_count_lines_at_line_feeds_only(line):
    with pytest.raises(KldslSyntaxError) as info:
        kl.parse(f"{line}\nb = 1\nc = $", env=ENV)
    assert (info.value.line, info.value.column) == (3, 5)
    assert str(info.value).splitlines()[1] == "    c = $"


def test_long_lines_show_a_window_around_the_column():
    src = "m = prior(toy) * exp(" + "length + " * 100 + "$)"
    with pytest.raises(KldslSyntaxError) as info:
        kl.parse(src, env=ENV)
    err = info.value
    shown, caret = str(err).splitlines()[1:]
    assert shown.startswith("    …") and len(shown) < 100
    assert shown[caret.index("^")] == "$"


def test_non_finite_env_numbers_are_rejected():
    with pytest.raises(KldslTypeError, match="kldsl numbers are finite"):
        kl.parse("m = prior(toy) * exp(length / b)", env={**ENV, "b": float("inf")})


def test_an_env_lm_prints_under_its_env_name_and_parses_back():
    lm = kl.ToyLM(vocab="ab", seed=0, name="openai-community/gpt2")
    env = {**ENV, "gpt2": lm, "my model": lm}
    for text in ("m = prior(gpt2, max_tokens=3)", 'm = prior("gpt2", max_tokens=3)'):
        graph = kl.parse(text + " * exp(happy / 0.5)", env=env)
        assert str(graph) == "prior(gpt2, max_tokens=3) * exp(happy / 0.5)"
        assert kl.parse("m = " + str(graph), env=env) == graph
    graph = kl.parse('m = prior("my model", prompt="a")', env=env)
    assert str(graph) == 'prior("my model", prompt="a")'
    assert kl.parse("m = " + str(graph), env=env) == graph == kl.prior(lm, prompt="a")
    assert str(kl.with_prompt(graph, "b")) == 'prior("my model", prompt="b")'
    # built in Python, the prior prints the LM's own name, as before
    assert str(kl.prior(lm)) == 'prior("openai-community/gpt2")'
    assert str(kl.parse("m = prior(toy)", env=ENV)) == "prior(toy)"
