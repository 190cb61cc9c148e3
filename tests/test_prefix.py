"""Prefix checks are sound: a prefix judged dead has no satisfying extension (exhaustive on
small vocabularies), a finished sequence is judged exactly as the density interpreter
judges it, and prefix texts of real tokenizers are prefixes of the final text."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest
import torch

import kldsl as kl
from kldsl.builtins import contains, curse, regex
from kldsl.errors import KldslRewardError, KldslTypeError
from kldsl.lm import LM, ToyLM
from kldsl.prefix import complete_words, prefix_check, prefix_text


@kl.constraint(closed="prefix")
def no_double_space(texts):
    return ["  " not in t for t in texts]


@kl.constraint(closed="upward")
def has_word_ab(texts):
    return ["ab" in t.split() for t in texts]


@kl.constraint(prefix=lambda texts: [False if len(t) > 3 else None for t in texts])
def short(texts):
    return [len(t) <= 3 for t in texts]


def _starts_a_prefix(texts):
    return [None if not t else t.startswith("a") for t in texts]


@kl.constraint(prefix=_starts_a_prefix)
def starts_a(texts):
    return [t.startswith("a") for t in texts]


@kl.constraint
def undeclared(texts):
    return ["b" in t for t in texts]


def _assert_sound(constraint, chars: str, max_tokens: int) -> int:
    """Check soundness and exactness on every sequence of a ToyLM over ``chars``; return
    how many prefixes were judged dead (so a test can require the check to bite)."""
    lm = ToyLM(vocab=chars, seed=0)
    model = kl.prior(lm, max_tokens=max_tokens) | constraint
    batch = lm.enumerate(max_tokens=max_tokens)
    density = model.log_density(batch.ids)
    ok = density.log_p > -math.inf
    texts = density.texts
    check = prefix_check(model)
    # finished sequences: exactly the density interpreter's verdict
    assert check.dead(texts, [True] * len(texts)).tolist() == (~ok).tolist()
    # unfinished: every prefix of fewer than max_tokens tokens (one character per token)
    satisfiable = {t[:k] for t, good in zip(texts, ok.tolist()) if good for k in range(len(t) + 1)}
    prefixes = sorted({t[:k] for t in texts for k in range(min(len(t) + 1, max_tokens))})
    dead = check.dead(prefixes, [False] * len(prefixes)).tolist()
    unsound = [p for p, d in zip(prefixes, dead) if d and p in satisfiable]
    assert not unsound, f"{constraint}: judged dead but satisfiable: {unsound[:5]}"
    return sum(dead)


BUILTIN_CASES = [
    (~contains("ab"), True),
    (contains("ab"), False),
    (contains("a") & ~contains("bb"), True),
    (~(contains("a ") | contains("ba")), True),
    (~contains("a") | contains("b b"), False),  # the right side is never sure false
    (~(contains("a") & contains("b")), True),
    (~no_double_space, False),
    (no_double_space & ~has_word_ab, True),
    (~has_word_ab, True),
    (short & ~contains("bb"), True),
    (~starts_a | contains("bb"), False),
    (~starts_a & ~contains("bb"), True),
    (~(starts_a & contains("b")), True),
    (~undeclared, False),
    (~undeclared & ~contains("aa"), True),
]


@pytest.mark.parametrize("constraint,bites", BUILTIN_CASES, ids=[str(c) for c, _ in BUILTIN_CASES])
def test_sound_and_exact_on_every_sequence(constraint, bites):
    dead = _assert_sound(constraint, "ab ", max_tokens=6)
    assert (dead > 0) == bites


PATTERNS = [
    "a$",
    "^a",
    "ab",
    r"\bab\b",
    r"(?m)^b",
    r"a\B",
    "(?i)A B",
    "b{2}$",
    "^$",
    "x*",
    "(a|b)+ ",
    r"\Ab",
    r"a\z",
    r"(?m)a$",
    r"\b",
    r"\B",
    "a.b",
    "(?s)a.b",
    "[^a]$",
    "^(ab)+$",
    " $",
    r"\Qa b",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_sound_on_every_sequence(pattern):
    """``not regex(p)`` (dead once the pattern has a persistent match) over "ab \\n"."""
    dead = _assert_sound(~regex(pattern), "ab \n", max_tokens=5)
    # a match that the next character can undo never persists: nothing to decide
    if pattern not in (r"\Qa b", "^$", r"a\z", "^(ab)+$", "a$", "b{2}$", "[^a]$", " $"):
        assert dead > 0


def test_curse_sound_on_every_sequence():
    assert _assert_sound(~curse, "asx ", max_tokens=6) > 0
    assert _assert_sound(~curse & ~contains("xa"), "asx ", max_tokens=5) > 0


def test_curse_sound_over_word_pieces():
    """Multi-word curses ("bull shit", "a ss"): every text built of pieces (up to four),
    judged on each prefix text, never dead while some extension is clean."""
    pieces = ["bull", "shit", " ", "a", "ss", "!", "s"]
    texts = ["".join(p) for n in range(5) for p in itertools.product(pieces, repeat=n)]
    texts = sorted(set(texts))
    clean = dict(zip(texts, (~curse(texts)).tolist()))
    check = prefix_check(kl.prior(ToyLM(), max_tokens=4) | ~curse)
    dead = dict(zip(texts, check.dead(texts, [False] * len(texts)).tolist()))
    # a text is satisfiable when a clean text of the set starts with it
    satisfiable = {t[:k] for t, ok in clean.items() if ok for k in range(len(t) + 1)}
    assert not [t for t in texts if dead[t] and t in satisfiable]
    assert dead["bull shit "] and dead["a ss!"] and not dead["bull shit"]


def test_curse_answers_as_better_profanity_does():
    """The remembered word-list answers change nothing: on texts of pieces with spelling
    variants ("$h1t", "@"), asked twice (the second time from memory), the verdicts are
    those of a fresh better-profanity checker."""
    from better_profanity import Profanity

    pieces = ["bull", "shit", " ", "a", "ss", "!", "$h1t", "@", "s"]
    texts = sorted({"".join(p) for n in range(4) for p in itertools.product(pieces, repeat=n)})
    fresh = Profanity()
    want = [fresh.contains_profanity(t) for t in texts]
    assert any(want) and not all(want)
    assert curse(texts).tolist() == want
    assert curse(texts).tolist() == want


def test_allowed_next_tokens():
    """The AWRS validity of next tokens: EOS and the last token are judged as finished."""
    lm = ToyLM(vocab="ab")
    check = prefix_check(kl.prior(lm, max_tokens=3) | ~contains("b") & short)
    tokens = torch.tensor([lm.eos_id, *lm.encode("ab")])
    assert check.allowed(lm, lm.encode("a"), tokens, max_tokens=3).tolist() == [True, True, False]
    # "aaaa" is too long: the short rule kills it on the prefix already
    assert check.allowed(lm, lm.encode("aaa"), tokens, max_tokens=5).tolist() == [
        True,
        False,
        False,
    ]
    nothing = prefix_check(kl.prior(lm, max_tokens=3) | contains("b") & ~contains("a"))
    # the third token finishes the sequence, so "aab" is checked in full: it has an "a"
    assert nothing.allowed(lm, lm.encode("aa"), tokens, max_tokens=3).tolist() == [False] * 3


def test_complete_words():
    assert complete_words("I am sh") == "I am "
    assert complete_words("a\tb") == "a\t"
    assert complete_words("word") == ""


def test_trivial():
    lm = ToyLM(vocab="ab")
    p = kl.prior(lm, max_tokens=3)
    assert prefix_check(p).trivial
    assert prefix_check(p * kl.exp(kl.length / 1.0)).trivial
    assert prefix_check(p | undeclared).trivial
    assert prefix_check(p | ~undeclared).trivial
    assert prefix_check(p | has_word_ab).trivial  # upward alone never fails early
    assert not prefix_check(p | ~contains("a")).trivial
    assert not prefix_check(p | no_double_space).trivial
    trivial = prefix_check(p | undeclared)
    assert trivial.dead(["a", "ab"], [False, True]).tolist() == [False, False]


def test_verdicts_are_cached():
    calls: list[int] = []

    def rule(texts):
        calls.append(len(texts))
        return [False if "bb" in t else None for t in texts]

    no_bb = kl.constraint(lambda ts: ["bb" not in t for t in ts], name="no_bb", prefix=rule)
    check = prefix_check(kl.prior(ToyLM(vocab="ab"), max_tokens=4) | no_bb)
    texts = ["ab", "abb", "ab", "a"]
    assert check.dead(texts, [False] * 4).tolist() == [False, True, False, False]
    assert calls == [3]  # each distinct text once
    check.dead(texts, [False] * 4)
    assert calls == [3]


@pytest.mark.parametrize(
    "returned",
    [lambda ts: ["yes"] * len(ts), lambda ts: [0.5] * len(ts), lambda ts: [None], lambda ts: 1 / 0],
)
def test_bad_prefix_rules_are_clear_errors(returned):
    bad = kl.constraint(lambda ts: [True] * len(ts), name="bad", prefix=returned)
    check = prefix_check(kl.prior(ToyLM(vocab="ab"), max_tokens=4) | bad)
    with pytest.raises(KldslRewardError, match="prefix rule of constraint `bad`"):
        check.dead(["a", "b"], [False, False])


def test_prefix_must_be_callable():
    with pytest.raises(KldslTypeError, match="prefix="):
        kl.constraint(lambda ts: ts, prefix="no")


class ByteLM(LM):
    """Tokens are single UTF-8 bytes (as in byte-level BPE), decoded with replacement."""

    def __init__(self, text: str):
        self.bytes = sorted(set(text.encode()))
        self.vocab_size, self.eos_id, self.name = len(self.bytes) + 1, 0, "bytes"

    def encode(self, text: str) -> list[int]:
        return [self.bytes.index(b) + 1 for b in text.encode()]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(self.bytes[i - 1] for i in ids if i).decode("utf-8", errors="replace")


def test_prefix_text_of_split_characters_is_a_prefix():
    """Every sequence of up to four byte tokens: the prefix text of each prefix is a
    prefix of the text of the whole, and the check of ``not contains("\\ufffd")`` never
    kills a sequence for a character still being spelled."""
    lm = ByteLM("é€😀a ")
    tokens = range(1, lm.vocab_size)
    for n in range(5):
        for ids in itertools.product(tokens, repeat=n):
            full = lm.decode(ids)
            for k in range(n + 1):
                assert full.startswith(prefix_text(lm, ids[:k]))
    ids = lm.encode("a€😀")
    texts = [prefix_text(lm, ids[:k]) for k in range(len(ids))]
    assert texts == ["", "a", "a", "a", "a€", "a€", "a€", "a€"]
    check = prefix_check(kl.prior(lm, max_tokens=8) | ~contains("\ufffd"))
    assert not check.dead(texts, [False] * len(texts)).any()


class CleanupLM(ToyLM):
    """A decoder that removes the space before punctuation: not prefix-monotone."""

    def decode(self, ids: Sequence[int]) -> str:
        return super().decode(ids).replace(" .", ".")


def test_non_monotone_decoding_decides_nothing():
    lm = CleanupLM(vocab="a .")
    assert prefix_text(lm, lm.encode("a ")) == ""  # "a " is not a prefix of "a."
    assert prefix_text(lm, [*lm.encode("a ."), lm.eos_id]) == "a."  # final text is exact
    check = prefix_check(kl.prior(lm, max_tokens=4) | ~contains(" "))
    assert not check.dead([prefix_text(lm, lm.encode("a "))], [False]).any()


def test_tiny_hf_prefix_text():
    from tiny_hf import tiny_hf

    lm = tiny_hf()
    ids = lm.encode("ab cd")
    assert [prefix_text(lm, ids[:k]) for k in range(len(ids) + 1)] == [
        "ab cd"[:k] for k in range(6)
    ]


@pytest.mark.slow
def test_embedded_tokenizer_utf8_and_spaces(smollm2):
    """SmolLM2's byte-level BPE: an emoji spelled over several tokens, accents, a leading
    space token and a double space; every prefix text is a prefix of the final text and
    holds no U+FFFD; a lipogram check kills exactly where an "e" appears."""
    text = " héllo €😀  world, naïve"
    ids = smollm2.encode(text)
    final = smollm2.text([*ids, smollm2.eos_id])
    assert final == text
    texts = [prefix_text(smollm2, ids[:k]) for k in range(len(ids) + 1)]
    assert all(final.startswith(t) and "\ufffd" not in t for t in texts)
    split = [k for k in range(1, len(ids)) if "\ufffd" in smollm2.decode(ids[:k])]
    assert split, "the emoji is spelled over several tokens"
    assert texts[1].startswith(" ")  # the leading-space token keeps its space
    check = prefix_check(kl.prior(smollm2, max_tokens=16) | ~contains("\ufffd") & ~contains("e"))
    dead = check.dead(texts, [False] * len(texts)).tolist()
    assert dead == ["e" in t for t in texts]
    assert check.dead([final], [True]).tolist() == [True]
    # random token sequences: prefix texts are prefixes of the final text
    gen = torch.Generator().manual_seed(0)
    for row in torch.randint(smollm2.vocab_size, (30, 8), generator=gen).tolist():
        row = [t for t in row if t != smollm2.eos_id]
        whole = smollm2.text(row)
        assert all(whole.startswith(prefix_text(smollm2, row[:k])) for k in range(len(row)))


def _random_constraint(gen: torch.Generator, depth: int):
    leaves = [
        contains("a"),
        contains("ab"),
        contains(" b"),
        regex("b a"),
        regex(r"\ba\b"),
        no_double_space,
        has_word_ab,
        short,
        starts_a,
        undeclared,
    ]
    pick = int(torch.randint(4 if depth else 1, (), generator=gen))
    if pick == 0:
        return leaves[int(torch.randint(len(leaves), (), generator=gen))]
    if pick == 1:
        return ~_random_constraint(gen, depth - 1)
    left, right = _random_constraint(gen, depth - 1), _random_constraint(gen, depth - 1)
    return left & right if pick == 2 else left | right


def test_random_combinations_are_sound():
    """40 random and/or/not trees (depth ≤ 3) over built-in and declared user leaves."""
    gen = torch.Generator().manual_seed(0)
    bit = 0
    for _ in range(40):
        bit += _assert_sound(_random_constraint(gen, 3), "ab ", max_tokens=5) > 0
    assert bit >= 5  # the checks do decide on many of them
