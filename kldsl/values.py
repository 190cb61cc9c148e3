"""Checking what a reward or constraint function returned, before any engine uses it.

A reward maps a list of texts to one finite real number per text; a constraint to one
boolean (or 0/1) per text. Anything else (NaN, ``"0"``, ``None``, 0.3 for a constraint,
a complex number, an integer too large for a float, a 2-D array) is a
:class:`KldslRewardError` naming the function, the value and the text, never a silent
truth value.

Example:
    >>> constraint_values("short", ["a", "bb"], [True, 0]).tolist()
    [True, False]
    >>> reward_values("len", ["a"], ["1"])
    Traceback (most recent call last):
    ...
    kldsl.errors.KldslRewardError: reward `len` returned '1' on the sample 'a'; a reward returns one finite real number per text (this value is a str)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kldsl.errors import KldslRewardError, shorten


def reward_values(name: str, texts: Sequence[str], raw: Any) -> Tensor:
    """The values [N] (float64) a reward returned for ``texts``, checked."""
    items = _items("reward", name, texts, raw)
    out = []
    for value, text in zip(items, texts):
        number = _real(value)
        if number is None or not math.isfinite(number):
            raise _bad("reward", name, value, text, "one finite real number per text")
        out.append(number)
    return torch.tensor(out, dtype=torch.float64)


def constraint_values(name: str, texts: Sequence[str], raw: Any) -> Tensor:
    """The truth values [N] (bool) a constraint returned for ``texts``, checked."""
    items = _items("constraint", name, texts, raw)
    out = []
    for value, text in zip(items, texts):
        number = _real(value)
        if number not in (0.0, 1.0):  # None, NaN, 0.3, ... are not truth values
            raise _bad("constraint", name, value, text, "True or False (or 1/0) per text")
        out.append(number == 1.0)
    return torch.tensor(out, dtype=torch.bool)


def _items(kind: str, name: str, texts: Sequence[str], raw: Any) -> list[Any]:
    """The returned values as a flat list of one item per text."""
    if isinstance(raw, Tensor | np.ndarray):
        if raw.ndim != 1:
            raise KldslRewardError(
                f"{kind} `{name}` returned an array of shape {tuple(raw.shape)} for "
                f"{len(texts)} texts; a {kind} returns one value per text (shape ({len(texts)},))"
            )
        raw = raw.tolist()
    elif isinstance(raw, str | bytes | dict) or not hasattr(raw, "__iter__"):
        raise KldslRewardError(
            f"{kind} `{name}` returned a {type(raw).__name__}; a {kind} maps a list of texts "
            "to a list of values, one per text"
        )
    try:
        items = list(raw)
    except Exception as err:  # a generator that raises half-way
        raise KldslRewardError(
            f"{kind} `{name}` returned values that raised {type(err).__name__} when read: "
            f"{shorten(str(err))}"
        ) from err
    if len(items) != len(texts):
        raise KldslRewardError(
            f"{kind} `{name}` returned {len(items)} values for {len(texts)} texts; a {kind} maps "
            "a list of texts to a list of the same length"
        )
    return items


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (bool, int, float, numpy or 0-d tensor)."""
    if isinstance(value, Tensor | np.ndarray | np.generic):
        if getattr(value, "ndim", 0) != 0 or np.iscomplexobj(value):
            return None
        value = value.item()
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an int beyond float range
            return math.inf
    return None


def _bad(kind: str, name: str, value: Any, text: str, want: str) -> KldslRewardError:
    return KldslRewardError(
        f"{kind} `{name}` returned {shorten(repr(value))} on the sample {shorten(repr(text))}; a "
        f"{kind} returns {want} (this value is a {type(value).__name__})"
    )
