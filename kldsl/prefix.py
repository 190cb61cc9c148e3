"""Prefix checks: hard constraints decided, soundly, on unfinished sequences.

One more interpretation of a model's factors (beside :func:`kldsl.density.full_values`):
on the text p of an unfinished sequence each hard constraint gets a three-valued verdict,
*sure true* (every text that starts with p satisfies it), *sure false* (none does) or
unknown. A sequence is dead when a condition is sure false: no extension can reach
p̃ > 0, so a token-level sampler may drop it the step it happens without biasing anything.

Leaves decide by their declared prefix semantics (:class:`kldsl.graph.Constraint`):
a ``prefix=`` rule (the built-ins ``contains``, ``curse`` and ``regex`` have one), else
``closed="prefix"`` (sure false when the complete words of p violate it) or
``closed="upward"`` (sure true when they satisfy it), else never decided. ``not`` swaps
the verdicts; ``and`` is sure true when both sides are and sure false when either is;
``or`` the reverse. Each rule is sound when its parts are (induction on the graph): if
no extension satisfies c, every extension satisfies ``not c``; if every extension
satisfies both sides, it satisfies ``and``; if none satisfies one side, none satisfies
``and``; ``or`` likewise. Unknown is always safe, so a leaf without a declaration, or a
tokenizer whose decoding cannot be trusted (:func:`prefix_text`), only decides less.

The texts must be prefixes of the final text: :func:`prefix_text` gives one.

Example:
    >>> import kldsl as kl
    >>> lm = kl.ToyLM(vocab="ab")
    >>> check = prefix_check(kl.prior(lm, max_tokens=4) | ~kl.contains("b"))
    >>> check.dead(["aa", "ab", "ab"], [False, False, True]).tolist()
    [False, True, True]
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from kldsl.density import Batch, factors_of, full_values, unknown_node
from kldsl.errors import KldslRewardError, shorten
from kldsl.graph import (
    And,
    Condition,
    Constraint,
    ConstraintExpr,
    Model,
    Not,
    Or,
    Power,
    Prior,
    Tilt,
)
from kldsl.lm import LM

#: Cached verdicts kept per leaf before the cache is emptied (a bound on memory).
CACHE_SIZE = 100_000

#: Random token sequences (of ``PROBE_LENGTH`` tokens) on which :func:`prefix_text` checks
#: that an LM's decoding is prefix-monotone before trusting it.
PROBE_SEQUENCES, PROBE_LENGTH = 48, 6
_PROBE_TEXTS = (
    "Hello world, it's a test. Don't stop !",
    "  two  spaces\n\nnew lines\t tab ,comma",
    "héllo €😀 naïve 日本語 ünïcode",
    "abc ab ba cab",
)

Verdict = tuple[Tensor, Tensor]  # (sure true [N] bool, sure false [N] bool)


def complete_words(text: str) -> str:
    """``text`` up to and including its last whitespace character ("" when it has none):
    the part of a prefix text whose words are complete, as ``closed=`` rules read it.

    Example:
        >>> complete_words("I am sh"), complete_words("word")
        ('I am ', '')
    """
    for i in range(len(text) - 1, -1, -1):
        if text[i].isspace():
            return text[: i + 1]
    return ""


def prefix_text(lm: LM, ids: Sequence[int]) -> str:
    """The text of generated ``ids`` that is a prefix of the text of every extension.

    A sequence ending in EOS is final: its text is :meth:`LM.text`. Otherwise the decoded
    text loses its trailing U+FFFD characters: byte-level tokenizers decode an incomplete
    UTF-8 sequence (a character split across tokens) to U+FFFD, which the next token may
    turn into the character. An LM whose decoding is not prefix-monotone on a probe (the
    text of a prefix of ids is not always a prefix of the text of the ids, e.g. a
    tokenizer that cleans up spaces) gets "" for every unfinished sequence: nothing is
    decided on its prefixes. The probe (a few texts and random token sequences, once per
    LM) is a test, not a proof: the decoders of kldsl's LMs (ToyLM, and byte-level, fused
    and metaspace Hugging Face decoders, which kldsl runs without space clean-up) are
    prefix-monotone by construction up to split UTF-8 characters.

    Example:
        >>> from kldsl.lm import ToyLM
        >>> prefix_text(ToyLM(vocab="ab"), [1, 2, 1])
        'aba'
    """
    ids = list(ids)
    if ids and ids[-1] == lm.eos_id:
        return lm.text(ids)
    if not _monotone(lm):
        return ""
    return lm.decode(ids).rstrip("\ufffd")


_MONOTONE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _monotone(lm: LM) -> bool:
    """Whether ``lm``'s decoding is prefix-monotone on the probe (cached per LM)."""
    try:
        return _MONOTONE[lm]
    except KeyError:
        pass
    except TypeError:  # not weakly referable: probe without caching
        return _probe(lm)
    _MONOTONE[lm] = result = _probe(lm)
    return result


def _probe(lm: LM) -> bool:
    sequences: list[list[int]] = []
    for text in _PROBE_TEXTS:
        try:
            sequences.append(list(lm.encode(text)))
        except Exception:  # characters outside a small vocabulary: probe the rest
            continue
    gen = torch.Generator().manual_seed(0)
    sequences += torch.randint(
        lm.vocab_size, (PROBE_SEQUENCES, PROBE_LENGTH), generator=gen
    ).tolist()
    for ids in sequences:
        ids = [t for t in ids if t != lm.eos_id]  # unfinished sequences hold no EOS
        try:
            texts = [lm.decode(ids[:k]) for k in range(len(ids) + 1)]
        except Exception:  # ids this LM cannot decode are ids it never generates
            continue
        stable = [t.rstrip("\ufffd") for t in texts]
        for shorter, longer in zip(stable, stable[1:]):
            if not (longer.startswith(shorter) and texts[-1].startswith(shorter)):
                return False
    return True


class PrefixCheck:
    """The hard constraints of a model, checked on prefixes of sequences in batches.

    ``trivial`` is True when no condition can ever be found sure false on a prefix (then
    checking unfinished sequences is pointless). Verdicts are cached per leaf and text.
    """

    def __init__(self, model: Model, lms: Mapping[LM | str, LM] | None = None):
        self.model, self.lms = model, lms
        self.base = model.base()
        self.factors = factors_of(model)
        self.conditions = [f.node for f in self.factors if isinstance(f.node, Condition)]
        self.trivial = not any(_can_fail(c.constraint) for c in self.conditions)
        self._cache: dict[Constraint, dict[str, tuple[bool, bool]]] = {}

    def dead(self, texts: list[str], finished: Sequence[bool]) -> Tensor:
        """[N] bool: for an unfinished sequence's prefix text, True only when no extension
        can satisfy every hard constraint; for a finished sequence's text, True exactly
        when it violates one (the density interpreter's values)."""
        if len(texts) != len(finished):
            raise ValueError(f"{len(texts)} texts but {len(finished)} finished flags")
        out = torch.zeros(len(texts), dtype=torch.bool)
        done = [i for i, f in enumerate(finished) if f]
        open_ = [i for i, f in enumerate(finished) if not f]
        if done:
            final = [texts[i] for i in done]
            batch = Batch(self.base, [()] * len(final), final, 64, {}, self.lms)
            bad = torch.zeros(len(done), dtype=torch.bool)
            for node in self.conditions:
                bad |= full_values(node, batch) == -math.inf
            out[done] = bad
        if open_ and not self.trivial:
            prefixes = [texts[i] for i in open_]
            bad = torch.zeros(len(open_), dtype=torch.bool)
            for f in self.factors:
                bad |= self._prefix_values(f.node, prefixes)
            out[open_] = bad
        return out

    def allowed(self, lm: LM, ids: Sequence[int], tokens: Tensor, max_tokens: int) -> Tensor:
        """[k] bool: which next ``tokens`` keep the sequence ``ids`` alive (not :meth:`dead`),
        an extension being finished when it ends in EOS or reaches ``max_tokens`` tokens;
        the ``valid`` of :func:`kldsl.awrs.awrs` for one particle.

        Example:
            >>> import kldsl as kl, torch
            >>> lm = kl.ToyLM(vocab="ab")
            >>> check = prefix_check(kl.prior(lm, max_tokens=4) | ~kl.contains("b"))
            >>> check.allowed(lm, [1], torch.tensor([0, 1, 2]), max_tokens=4).tolist()
            [True, True, False]
        """
        ids = list(ids)
        seqs = [[*ids, int(t)] for t in tokens.tolist()]
        finished = [s[-1] == lm.eos_id or len(s) >= max_tokens for s in seqs]
        texts = [lm.text(s) if f else prefix_text(lm, s) for s, f in zip(seqs, finished)]
        return ~self.dead(texts, finished)

    def _prefix_values(self, node: Model, texts: list[str]) -> Tensor:
        """Whether a factor rules out every extension of each prefix text [N] bool."""
        match node:
            case Prior() | Power() | Tilt():
                return torch.zeros(len(texts), dtype=torch.bool)
            case Condition(_, constraint):
                return self._verdict(constraint, texts)[1]
            case _:
                raise unknown_node(node, "the prefix checks")

    def _verdict(self, expr: ConstraintExpr, texts: list[str]) -> Verdict:
        match expr:
            case Constraint():
                return self._leaf(expr, texts)
            case Not(inner):
                sure_true, sure_false = self._verdict(inner, texts)
                return sure_false, sure_true
            case And(left, right):
                (lt, lf), (rt, rf) = self._verdict(left, texts), self._verdict(right, texts)
                return lt & rt, lf | rf
            case Or(left, right):
                (lt, lf), (rt, rf) = self._verdict(left, texts), self._verdict(right, texts)
                return lt | rt, lf & rf
            case _:
                raise unknown_node(expr, "the prefix checks")

    def _leaf(self, leaf: Constraint, texts: list[str]) -> Verdict:
        if leaf.prefix is None and leaf.closed not in ("prefix", "upward"):
            none = torch.zeros(len(texts), dtype=torch.bool)
            return none, none.clone()
        cache = self._cache.setdefault(leaf, {})
        if len(cache) > CACHE_SIZE:
            cache.clear()
        keys = texts if leaf.prefix is not None else [complete_words(t) for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in cache))
        if missing:
            cache.update(zip(missing, self._decide(leaf, missing)))
        sure_true = torch.tensor([cache[k][0] for k in keys], dtype=torch.bool)
        sure_false = torch.tensor([cache[k][1] for k in keys], dtype=torch.bool)
        return sure_true, sure_false

    def _decide(self, leaf: Constraint, keys: list[str]) -> list[tuple[bool, bool]]:
        """(sure true, sure false) of a leaf on each key (a prefix text, or its complete
        words for a ``closed=`` rule)."""
        if leaf.prefix is not None:
            return [(v is True, v is False) for v in _prefix_call(leaf, keys)]
        batch = Batch(self.base, [()] * len(keys), keys, 64, {}, self.lms)
        holds = batch.value(leaf).tolist()
        if leaf.closed == "prefix":  # a violation of the complete words persists
            return [(False, not h) for h in holds]
        return [(h, False) for h in holds]  # "upward": a satisfaction persists


def prefix_check(model: Model, lms: Mapping[LM | str, LM] | None = None) -> PrefixCheck:
    """The prefix checks of ``model``'s hard constraints (``lms``: resolved LMs, as the
    density interpreter takes them)."""
    return PrefixCheck(model, lms)


def _can_fail(expr: ConstraintExpr) -> bool:
    """Whether a constraint can ever be judged sure false on a prefix."""
    return _can(expr)[1]


def _can(expr: ConstraintExpr) -> tuple[bool, bool]:
    """(can be sure true, can be sure false) by the leaves' declarations."""
    match expr:
        case Constraint():
            if expr.prefix is not None:
                return True, True
            return expr.closed == "upward", expr.closed == "prefix"
        case Not(inner):
            can_true, can_false = _can(inner)
            return can_false, can_true
        case And(left, right):
            (lt, lf), (rt, rf) = _can(left), _can(right)
            return lt and rt, lf or rf
        case Or(left, right):
            (lt, lf), (rt, rf) = _can(left), _can(right)
            return lt or rt, lf and rf
        case _:
            raise unknown_node(expr, "the prefix checks")


def _prefix_call(leaf: Constraint, texts: list[str]) -> list[bool | None]:
    """A leaf's ``prefix=`` rule on texts, its values checked (True, False or None)."""
    assert leaf.prefix is not None
    try:
        raw = list(leaf.prefix(list(texts)))
    except Exception as err:
        raise KldslRewardError(
            f"the prefix rule of constraint `{leaf}` raised {type(err).__name__}: "
            f"{shorten(str(err))}"
        ) from err
    if len(raw) != len(texts):
        raise KldslRewardError(
            f"the prefix rule of constraint `{leaf}` returned {len(raw)} values for "
            f"{len(texts)} prefix texts; it returns one True, False or None per text"
        )
    out: list[bool | None] = []
    for value, text in zip(raw, texts):
        if value is None:
            out.append(None)
        elif isinstance(value, bool | numbers.Integral) and value in (0, 1):
            out.append(bool(value))
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0 and value.item() in (0, 1):
            out.append(bool(value.item()))
        else:
            raise KldslRewardError(
                f"the prefix rule of constraint `{leaf}` returned {shorten(repr(value))} on the "
                f"prefix {shorten(repr(text))}; it returns True (every extension satisfies), "
                "False (none does) or None (cannot tell) per text"
            )
    return out
