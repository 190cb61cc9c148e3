"""The exceptions kldsl raises. Every one subclasses :class:`KldslError`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KldslError(Exception):
    """Base class of every error kldsl raises on purpose."""


class KldslTypeError(KldslError, TypeError):
    """A model graph was built from parts that do not fit (``exp`` of a constraint, ...)."""


class KldslSyntaxError(KldslError, SyntaxError):
    """A .kl text does not parse. ``str(err)`` shows the line, a caret and a label."""

    def __init__(
        self, label: str, line: int, column: int, source_line: str, source: str = "<text>"
    ):
        self.label = label
        self.line = line
        self.column = column
        self.source_line = source_line
        self.source = source
        caret = " " * max(column - 1, 0) + "^"
        message = f"{source}:{line}:{column}: {label}\n    {source_line}\n    {caret}"
        super().__init__(message)

    def __str__(self) -> str:  # SyntaxError's own __str__ appends "(line N)"
        return self.args[0]


class KldslNameError(KldslError, NameError):
    """A name in a .kl text (or an engine, or a model) is unknown; suggests the closest one."""

    def __init__(self, name: str, known: Iterable[str], what: str = "name", hint: str = ""):
        self.name = name
        self.known = sorted(set(known))
        self.suggestion = closest(name, self.known)
        message = f"unknown {what} {name!r}"
        if self.suggestion is not None:
            message += f"; did you mean {self.suggestion!r}?"
        if hint:
            message += f" {hint}"
        message += f"\n  known: {', '.join(self.known)}"
        super().__init__(message)


class KldslModelLoadError(KldslError):
    """An LM could not be loaded; the message says what was tried and what to do."""


class KldslInferenceError(KldslError):
    """An engine could not produce a trustworthy answer (no sample satisfied a constraint, ...)."""


class KldslRewardError(KldslError, ValueError):
    """A reward or constraint raised, returned NaN, or returned the wrong number of values."""


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to ``name`` by edit similarity, or None when none is close."""
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    if matches:
        return matches[0]
    lowered = {k.lower(): k for k in known}
    return lowered.get(name.lower())
