"""The model graph: building, printing, type errors, log_density, explain."""

import math

import pytest
import torch

import kldsl as kl
from kldsl.errors import KldslRewardError, KldslTypeError
from kldsl.graph import MAX_DEPTH, RNeg


@pytest.fixture
def toy():
    return kl.ToyLM(vocab="ab", seed=0, name="toy")


def test_card_model_prints(toy):
    m = kl.prior(toy, max_tokens=4) * kl.exp(kl.sentiment / 0.2) | ~kl.curse
    assert str(m) == "prior(toy, max_tokens=4) * exp(sentiment / 0.2) | not curse"


def test_nodes_are_hashable_and_equal_by_structure(toy):
    a = kl.prior(toy) * kl.exp(kl.length / 2.0) | kl.contains("a")
    b = kl.prior(toy) * kl.exp(kl.length / 2.0) | kl.contains("a")
    assert a == b and hash(a) == hash(b)
    assert a != kl.prior(toy) * kl.exp(kl.length / 3.0) | kl.contains("a")
    assert len({a, b}) == 1


def test_printing_parenthesises_by_precedence(toy):
    c = kl.contains("a") | kl.contains("b")
    m = (kl.prior(toy) | c & ~(kl.curse & kl.regex("x"))) * kl.exp(-(kl.length + kl.sentiment) * 2)
    assert str(m) == (
        '(prior(toy) | (contains("a") or contains("b")) and not (curse and regex("x")))'
        " * exp(-(length + sentiment) * 2.0)"
    )


def test_reward_bounds_follow_the_arithmetic():
    assert (kl.sentiment / 0.5).bounds() == (-2.0, 2.0)
    assert (-kl.offensive * 3).bounds() == (-3.0, -0.0)
    assert (kl.sentiment + kl.offensive).bounds() == (-1.0, 2.0)
    assert (kl.length / 2).bounds() == (0.0, math.inf)


def test_prefix_closure_propagates():
    assert not kl.curse.prefix_closed and kl.curse.upward_closed
    assert (~kl.curse).prefix_closed
    assert (~kl.curse & ~kl.contains("x")).prefix_closed
    assert not (~kl.curse & kl.contains("x")).prefix_closed
    assert (kl.contains("a") | kl.curse).upward_closed


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda lm: kl.exp(kl.curse), "condition on it with `model | curse`"),
        (lambda lm: kl.prior(lm) | kl.sentiment, "`|` conditions on a constraint"),
        (lambda lm: kl.sentiment / 0, "β must be > 0"),
        (lambda lm: kl.sentiment / -0.5, "exp(-sentiment / β)"),
        (lambda lm: kl.prior(lm) * kl.sentiment, "tilt by it with `* exp(sentiment / β)`"),
        (lambda lm: kl.prior(lm) * kl.curse, "condition with `| curse`"),
        (lambda lm: (kl.exp(kl.sentiment) | kl.curse).check(), "has no prior"),
        (lambda lm: kl.prior(lm) ** 0, "α > 0"),
        (lambda lm: kl.prior(lm, max_tokens=0), "max_tokens must be a positive integer"),
        (lambda lm: kl.prior(3.0), "prior() takes an LM or a model name"),
        (lambda lm: kl.exp(lambda t: t), "exp() takes a reward"),
    ],
)
def test_type_errors_say_what_to_write(toy, build, message):
    with pytest.raises(KldslTypeError) as info:
        build(toy)
    assert message in str(info.value)


def test_log_density_matches_hand_computation(toy):
    @kl.reward(bounds=(0, 10))
    def n_a(texts):
        return [t.count("a") for t in texts]

    m = kl.prior(toy, max_tokens=3) * kl.exp(n_a / 0.5) | ~kl.contains("bb")
    seqs = [[1, 1, 0], [2, 2, 1], [2, 1]]
    d = m.log_density(seqs)
    log_a = toy.score(seqs)
    assert d.texts == ["aa", "bba", "ba"]
    expected = log_a + torch.tensor([2 / 0.5, 1 / 0.5, 1 / 0.5], dtype=torch.float64)
    expected[1] = -math.inf
    assert torch.equal(d.log_p, expected)
    assert d.constraints['not contains("bb")'].tolist() == [True, False, True]
    assert d.rewards["n_a"].tolist() == [2.0, 1.0, 1.0]
    assert set(d.terms) == {"log a", "n_a / 0.5", '1[not contains("bb")]'}


def test_log_density_uses_given_base_log_probs_and_batches(toy):
    m = kl.prior(toy, max_tokens=3) * kl.exp(kl.length * 1.0)
    batch = toy.sample(10, 3, seed=1)
    d1 = m.log_density(batch.ids, base_log_probs=batch.log_probs, batch_size=3)
    d2 = m.log_density(batch.ids)
    assert torch.allclose(d1.log_p, d2.log_p)
    # deliberately different base log-probs are the ones used, not the LM's own scores
    other = batch.log_probs - torch.arange(10, dtype=batch.log_probs.dtype)
    d3 = m.log_density(batch.ids, base_log_probs=other, batch_size=3)
    assert torch.allclose(d3.terms["log a"], other.double())
    assert torch.allclose(d3.log_p - d2.log_p, (other - batch.log_probs).double())


def test_product_of_experts_and_tempering(toy):
    other = kl.ToyLM(vocab="ab", seed=5, name="other")
    m = kl.prior(toy, max_tokens=3) * kl.prior(other) ** 0.5
    seqs = [[1, 2, 0], [2]]
    d = m.log_density(seqs)
    assert torch.allclose(d.log_p, toy.score(seqs) + 0.5 * other.score(seqs))
    assert str(m) == "prior(toy, max_tokens=3) * prior(other) ** 0.5"


def test_product_of_experts_needs_one_tokenizer(toy):
    other = kl.ToyLM(vocab="xyz", seed=5, name="other")
    with pytest.raises(KldslTypeError, match="share a tokenizer"):
        (kl.prior(toy) * kl.prior(other)).log_density([[1, 0]])


def test_reward_errors_name_the_reward_and_the_sample(toy):
    @kl.reward
    def shaky(texts):
        return [float("nan") if "b" in t else 0.0 for t in texts]

    @kl.reward
    def boom(texts):
        if any("a" in t for t in texts):
            raise RuntimeError("no a please")
        return [0.0] * len(texts)

    @kl.reward
    def short(texts):
        return [0.0]

    with pytest.raises(KldslRewardError, match=r"reward `shaky` returned nan on the sample 'ab'"):
        (kl.prior(toy) * kl.exp(shaky)).log_density([[1, 2]])
    with pytest.raises(
        KldslRewardError, match=r"`boom` raised RuntimeError: no a please on the sample 'a'"
    ):
        (kl.prior(toy) * kl.exp(boom)).log_density([[2], [1]])
    with pytest.raises(KldslRewardError, match="returned 1 values for 2 texts"):
        (kl.prior(toy) * kl.exp(short)).log_density([[2], [1]])


def test_explain_gives_the_formula_and_a_factor_table(toy):
    m = kl.prior(toy, max_tokens=4) * kl.exp(kl.sentiment / 0.2) | ~kl.curse
    text = m.explain()
    assert "p̃(x) = a(x)·exp(sentiment(x)/0.2)·1[¬curse(x)]" in text
    assert "VADER" in text and "prefix-closed" in text
    assert text.splitlines()[0] == str(m)


# --- limits: depth, finite numbers, printable names, short messages --------------------


def _under(frames, fn):
    """``fn()`` called from ``frames`` stack frames deeper than here."""
    return _under(frames - 1, fn) if frames else fn()


def test_no_graph_deeper_than_max_depth_can_be_built(toy):
    r = kl.length
    for _ in range(MAX_DEPTH - 1):
        r = -r
    assert r.depth == MAX_DEPTH
    m = kl.prior(toy) * kl.exp(r.expr.expr)  # MAX_DEPTH levels too
    # what recurses over a graph has room to spare at MAX_DEPTH
    assert _under(300, lambda: (str(m), m.explain(), hash(m), m == kl.parse(str(m), {"toy": toy})))
    values = {kl.length: torch.tensor([1.0, 2.0], dtype=torch.float64)}
    assert r.evaluate(values).tolist() == [-1.0, -2.0]  # MAX_DEPTH - 1 is odd
    assert r.leaves() == [kl.length] and r.bounds() == (-math.inf, -0.0)
    assert str(r) == "-" * (MAX_DEPTH - 1) + "length"
    for build in [lambda: -r, lambda: r + kl.length, lambda: r * 2, lambda: RNeg(r)]:
        with pytest.raises(KldslTypeError, match=f"nests {MAX_DEPTH + 1} levels deep"):
            build()
    c = kl.curse
    for _ in range(MAX_DEPTH - 1):
        c = c | kl.curse
    with pytest.raises(KldslTypeError, match="levels deep"):
        c = ~c
    m = kl.prior(toy)
    for _ in range(MAX_DEPTH - 1):
        m = m | kl.curse
    assert m.depth == MAX_DEPTH
    with pytest.raises(KldslTypeError, match="levels deep"):
        m | kl.curse
    wide = kl.prior(toy)
    for _ in range(1000):  # products are flat: width is no depth
        wide = wide * kl.exp(kl.length)
    assert wide.depth == 3 and len(wide.factors()) == 1001
    assert "exp(length(x))" in wide.explain()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda lm: kl.length / float("inf"), "β in `length / β` must be a finite number, got inf"),
        (lambda lm: kl.length / float("nan"), "must be a finite number, got nan"),
        (lambda lm: kl.length * float("nan"), "c in `length * c` must be a finite number, got nan"),
        (lambda lm: float("-inf") * kl.length, "must be a finite number, got -inf"),
        (lambda lm: kl.prior(lm) ** float("inf"), "α in `prior ** α` must be a finite number"),
        (lambda lm: kl.prior(lm) ** float("nan"), "must be a finite number, got nan"),
    ],
)
def test_beta_alpha_and_factors_must_be_finite(toy, build, message):
    with pytest.raises(KldslTypeError) as info:
        build(toy)
    assert message in str(info.value)


def test_lm_names_print_bare_only_when_they_read_back_as_names():
    for name, shown in [
        ("toy", "toy"),
        ("toy+fit", '"toy+fit"'),
        ("not", '"not"'),
        ("2b", '"2b"'),
        ("β_1", "β_1"),
        ('a "b"', '"a \\"b\\""'),
    ]:
        assert str(kl.prior(kl.ToyLM(vocab="ab", name=name))) == f"prior({shown})"


def test_prompts_must_be_valid_unicode(toy):
    with pytest.raises(KldslTypeError, match="lone surrogate '\\\\ud800' at index 1"):
        kl.prior(toy, prompt="a\ud800")


def test_messages_quote_values_cut_short(toy):
    long = "x" * 1_000_000
    for build in [
        lambda: kl.prior(toy) * long,
        lambda: kl.length + long,
        lambda: kl.length * long,
        lambda: kl.prior(toy) | long,
        lambda: kl.prior(toy, max_tokens=long),
        lambda: kl.exp(long),
    ]:
        with pytest.raises(KldslTypeError) as info:
            build()
        assert len(str(info.value)) < 400 and "…" in str(info.value)
    wide = kl.exp(kl.length)
    for _ in range(1000):
        wide = wide * kl.exp(kl.length)
    with pytest.raises(KldslTypeError, match="has no prior") as info:
        wide.check()
    assert len(str(info.value)) < 400


def _no_loading(name):
    raise AssertionError(f"{name!r} was loaded")


def test_a_named_prior_loads_nothing_until_inference(monkeypatch):
    monkeypatch.setattr("kldsl.models.load_lm", _no_loading)
    m = kl.prior("kldsl-tests/no-such-model", max_tokens=3) * kl.exp(kl.length / 1.0)
    m = m | ~kl.contains("a")
    text = str(m)
    assert text.startswith('prior("kldsl-tests/no-such-model", max_tokens=3)')
    assert kl.parse("m = " + text) == m
    assert "no-such-model" in m.explain()
    with pytest.raises(AssertionError, match="was loaded"):  # inference is what resolves
        kl.infer(m, n=4)
    monkeypatch.undo()
    monkeypatch.setattr("kldsl.hf._hub_reachable", lambda: False)
    with pytest.raises(kl.KldslModelLoadError, match="kldsl-tests/no-such-model"):
        kl.infer(m, n=4)


def test_a_target_resolves_each_model_once_and_evaluates_without_loading(monkeypatch):
    lm = kl.ToyLM(vocab="ab", seed=0, name="named")
    calls = []

    def load(name):
        calls.append(name)
        return lm

    monkeypatch.setattr("kldsl.models.load_lm", load)
    base = kl.prior("named", max_tokens=3)
    m = base * kl.prior("named", prompt="b", max_tokens=3) ** 0.5 * kl.exp(kl.length / 1.0)
    target = kl.Target(m)
    assert calls == ["named"] and target.lm is lm and target.lms == {"named": lm}
    monkeypatch.setattr("kldsl.models.load_lm", _no_loading)
    draw = target.draw(8, torch.Generator().manual_seed(0))
    direct = kl.prior(lm, max_tokens=3) * kl.prior(lm, prompt="b", max_tokens=3) ** 0.5
    expected = (direct * kl.exp(kl.length / 1.0)).log_density(draw.ids)
    assert torch.equal(draw.density.log_p, expected.log_p)


def test_log_density_with_lms_refuses_a_prior_it_has_no_lm_for(toy):
    m = kl.prior("named", max_tokens=2)
    with pytest.raises(KldslTypeError, match="no LM was resolved"):
        m.log_density([[1]], lms={toy: toy})
    assert m.log_density([[1]], lms={"named": toy}).log_p.shape == (1,)


def test_resolve_returns_an_lm_itself_and_knows_the_hf_and_vllm_runtimes(toy):
    assert kl.resolve(toy) is toy and kl.resolve(kl.prior(toy)) is toy
    assert kl.resolve(toy, runtime="vllm") is toy  # an LM object runs as it is
    m = kl.prior(toy, max_tokens=2)
    for call in (
        lambda: kl.resolve(toy, runtime="onnx"),
        lambda: kl.Target(m, runtime="onnx"),
        lambda: kl.infer(m, n=4, runtime="onnx"),
        lambda: kl.infer(m, n=4, runtime=kl.Runtime("onnx")),
    ):
        with pytest.raises(kl.KldslNameError, match="unknown runtime 'onnx'") as err:
            call()
        assert "known: hf, vllm" in str(err.value)
    with pytest.raises(kl.KldslError, match="runs on the hf runtime"):
        kl.infer(m, engine="variational", runtime="vllm")
    assert kl.infer(m, n=4, runtime="hf").engine == "importance"
