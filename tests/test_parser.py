"""The text front-end: same graph as Python, printing round trips, located errors."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kldsl as kl
from kldsl.errors import KldslNameError, KldslSyntaxError, KldslTypeError

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


@st.composite
def models(draw):
    model = draw(priors)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["mul", "cond", "lmul"]))
        if kind == "mul":
            model = model * draw(factors)
        elif kind == "lmul":
            model = draw(st.builds(kl.exp, rewards)) * model
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
