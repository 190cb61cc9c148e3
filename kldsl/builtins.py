"""Built-in rewards, constraints and LM names, usable from Python and from .kl text.

Rewards: ``sentiment`` (VADER compound score in [-1, 1]), ``offensive``
(alt-profanity-check probability in [0, 1]), ``length`` (number of words),
``reward_model(path, label=...)`` (log-probability of a label under a local sequence
classifier). Constraints: ``curse`` (better-profanity word list), ``contains(w)``,
``regex(p)``.

Example:
    >>> from kldsl.builtins import sentiment, contains
    >>> [round(v, 2) for v in sentiment(["I love it", "I hate it"]).tolist()]
    [0.64, -0.57]
    >>> contains("Paris")(["Paris in May", "Rome"]).tolist()
    [True, False]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kldsl.errors import KldslModelLoadError, KldslTypeError, shorten
from kldsl.graph import Constraint, Reward


@functools.cache
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _sentiment(texts: list[str]) -> list[float]:
    analyzer = _vader()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


def _offensive(texts: list[str]) -> list[float]:
    from profanity_check import predict_prob

    return [float(p) for p in predict_prob(list(texts))] if texts else []


def _length(texts: list[str]) -> list[float]:
    return [float(len(t.split())) for t in texts]


@functools.cache
def _profanity() -> Any:
    from better_profanity import Profanity

    checker = Profanity()  # our own instance: its word list is wrapped below
    checker.CENSOR_WORDSET = _Wordset(checker.CENSOR_WORDSET)
    return checker


class _Wordset(list):
    """better-profanity's word list with its membership test remembered per string.

    The checker asks ``word in wordset`` for every word of a text (and for runs of
    following words); each answer compares the string with every listed word's spelling
    variants, milliseconds a question. The list never changes here, so the answer is a
    function of the string, and SMC asks about the same words at every step."""

    #: strings whose answer is kept (the memory is emptied when it holds more)
    KEPT = 1 << 16

    def __init__(self, words: list[Any]):
        super().__init__(words)
        self._known: dict[str, bool] = {}

    def __contains__(self, word: object) -> bool:
        if not isinstance(word, str):
            return list.__contains__(self, word)
        hit = self._known.get(word)
        if hit is None:
            if len(self._known) >= self.KEPT:
                self._known.clear()
            hit = self._known[word] = list.__contains__(self, word)
        return hit


def _curse(texts: list[str]) -> list[bool]:
    checker = _profanity()
    return [checker.contains_profanity(t) for t in texts]


def _curse_prefix(texts: list[str]) -> list[bool | None]:
    """True where the complete words of a prefix text already hold a curse (then every
    extension does); None otherwise (a later word may be one).

    better-profanity reads a word as a run of its word characters (letters, digits,
    ``@$*"'``) and checks each word (and runs of following words) when the character after
    it arrives; a text cut just after its last non-word character ends every word in it,
    so a curse found there stays found whatever follows.
    """
    from better_profanity.constants import ALLOWED_CHARACTERS

    cut = [_complete_words(t, ALLOWED_CHARACTERS) for t in texts]
    return [True if hit else None for hit in _curse(cut)]


def _complete_words(text: str, word_characters: set[str]) -> str:
    """``text`` up to and including its last character outside ``word_characters``."""
    for i in range(len(text) - 1, -1, -1):
        if text[i] not in word_characters:
            return text[: i + 1]
    return ""


sentiment = Reward(
    name="sentiment",
    fn=_sentiment,
    key=("builtin", "sentiment", (), ()),
    lo=-1.0,
    hi=1.0,
    doc="VADER compound sentiment score in [-1, 1]",
)
offensive = Reward(
    name="offensive",
    fn=_offensive,
    key=("builtin", "offensive", (), ()),
    lo=0.0,
    hi=1.0,
    doc="probability that the text is offensive (alt-profanity-check), in [0, 1]",
)
length = Reward(
    name="length",
    fn=_length,
    key=("builtin", "length", (), ()),
    lo=0.0,
    doc="number of whitespace-separated words",
)
curse = Constraint(
    name="curse",
    fn=_curse,
    key=("builtin", "curse", (), ()),
    closed="upward",
    doc="the text holds a word of better-profanity's curse list",
    prefix=_curse_prefix,
)


def contains(word: str) -> Constraint:
    """The text contains ``word`` (case-sensitive substring)."""
    if not isinstance(word, str) or not word:
        raise KldslTypeError(
            f'contains() takes a non-empty string, e.g. contains("Paris"); got {word!r}'
        )
    return Constraint(
        name="contains",
        fn=lambda texts: [word in t for t in texts],
        key=("builtin", "contains", (word,), ()),
        args=(word,),
        closed="upward",
        doc=f"the text contains {word!r}",
        prefix=lambda texts: [True if word in t else None for t in texts],
    )


#: longest regex() pattern accepted, in characters
MAX_PATTERN = 10_000


def regex(pattern: str) -> Constraint:
    """The text matches the regular expression ``pattern`` somewhere (a search).

    Patterns run on RE2, whose matching time is linear in the text, so no pattern (a .kl
    file's included) can hang a run. RE2 reads Python's syntax except for the features that
    need backtracking: lookahead and lookbehind (``(?=``, ``(?!``, ``(?<=``, ``(?<!``),
    backreferences (``\\1``, ``(?P=name)``), possessive and atomic groups, and
    conditionals; those are a clear error.
    """
    if not isinstance(pattern, str):
        raise KldslTypeError(f"regex() takes a pattern string; got {pattern!r}")
    if len(pattern) > MAX_PATTERN:
        raise KldslTypeError(
            f"regex(): the pattern has {len(pattern):,} characters, more than {MAX_PATTERN:,}"
        )
    compiled = _compile_regex(pattern)
    return Constraint(
        name="regex",
        fn=lambda texts: [compiled.search(t) is not None for t in texts],
        key=("builtin", "regex", (pattern,), ()),
        args=(pattern,),
        doc=f"the text matches /{pattern}/",
        prefix=_regex_prefix(pattern),
    )


def _regex_prefix(pattern: str) -> Callable[[list[str]], list[bool | None]] | None:
    """The prefix rule of ``regex(pattern)``: True where a match ends before the last
    character of the prefix text p (then every text that starts with p matches), else None.

    Proof. Search ``(?:pattern)(?s:.)`` in p: a hit is a match of the pattern on p[i:j]
    with j < len(p) (one more character follows it). In any text t = p + s, the pattern
    matches t[i:j] too: the characters it reads are t[i:j] = p[i:j], and every assertion
    it evaluates at a position k ≤ j (``^ $ \\A \\z \\b \\B`` and their multi-line forms)
    looks only at the characters at k − 1 and k and at whether k is 0 or the end; k ≤ j <
    len(p) ≤ len(t), so t[k−1], t[k] = p[k−1], p[k] and k is the end of neither. (In RE2,
    ``$`` without ``(?m)`` is the end of the text, which k is not.) The wrapper is exact
    because a pattern that compiles alone has balanced groups, except that ``\\Q`` quotes
    to the end of the pattern: such patterns get no rule (never decided on a prefix).
    """
    if "\\Q" in pattern:
        return None
    try:
        persistent = _compile_regex(f"(?:{pattern})(?s:.)")
    except KldslTypeError:  # e.g. past RE2's size limits: decided on full texts only
        return None
    return lambda texts: [True if persistent.search(t) is not None else None for t in texts]


def _compile_regex(pattern: str) -> Any:
    import re2

    options = re2.Options()
    options.log_errors = False  # the error goes into our message, not onto stderr
    try:
        return re2.compile(pattern, options=options)
    except re2.error as err:
        reason = err.args[0].decode() if err.args and isinstance(err.args[0], bytes) else err
        shown = pattern if len(pattern) <= 60 else pattern[:59] + "…"
        unsupported = (
            "; RE2 (linear-time matching) has no lookaround, backreferences, atomic or "
            "possessive groups, or conditionals"
            if "perl operator" in str(reason) or "escape" in str(reason)
            else ""
        )
        raise KldslTypeError(
            f"regex({shown!r}) is not a regular expression kldsl can run: {reason}{unsupported}"
        ) from None


@functools.cache
def _classifier(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
        model = model.eval()
    except Exception as err:
        raise KldslModelLoadError(
            f"reward_model({path!r}): could not load a sequence-classification model from that "
            f"folder ({type(err).__name__}: {err}); pass a local folder written by "
            "save_pretrained() holding a model and its tokenizer"
        ) from err
    return tokenizer, model


def reward_model(path: str, label: str | int = 1) -> Reward:
    """log P(label | text) under a local ``AutoModelForSequenceClassification`` folder."""
    if not isinstance(path, str):
        raise KldslTypeError(f"reward_model() takes a folder path string; got {path!r}")
    try:
        found = Path(path).exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        found = False
    if not found:
        raise KldslModelLoadError(
            f"reward_model({shorten(repr(path))}): no such folder; give the path of a model "
            "saved with save_pretrained()"
        )

    def score(texts: list[str]) -> list[float]:
        import torch

        tokenizer, model = _classifier(path)
        index = label
        if isinstance(label, str):
            names = {v: int(k) for k, v in model.config.id2label.items()}
            if label not in names:
                raise KldslTypeError(
                    f"reward_model({path!r}) has labels {sorted(names)}, not {label!r}"
                )
            index = names[label]
        with torch.no_grad():
            enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True)
            logits = model(**enc).logits
        return torch.log_softmax(logits.float(), dim=-1)[:, int(index)].tolist()

    kwargs = (("label", label),) if label != 1 else ()
    return Reward(
        name="reward_model",
        fn=score,
        key=("builtin", "reward_model", (path,), kwargs),
        args=(path,),
        kwargs=kwargs,
        hi=0.0,
        doc=f"log-probability of label {label!r} under the classifier in {path}",
    )


#: Names that .kl text can use without an ``env``: leaves, factories and LM names.
BUILTIN_VALUES: dict[str, Any] = {
    "sentiment": sentiment,
    "offensive": offensive,
    "length": length,
    "curse": curse,
}
BUILTIN_FACTORIES: dict[str, Callable[..., Any]] = {
    "contains": contains,
    "regex": regex,
    "reward_model": reward_model,
}
