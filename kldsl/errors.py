"""The exceptions kldsl raises. Every one subclasses :class:`KldslError`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: Characters of user text (a name, a value, a source line) a message echoes at most.
SHOWN = 80
#: Known names a :class:`KldslNameError` lists at most.
KNOWN_SHOWN = 30


def shorten(text: str, limit: int = SHOWN) -> str:
    """``text`` cut to ``limit`` characters (with an ellipsis), safe to print.

    Lone surrogates (which no encoder writes) are shown as ``\\udXXX`` escapes.
    """
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return _printable(text)


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def snippet(source_line: str, column: int) -> str:
    """Two indented lines: (a window of) ``source_line`` and a caret under ``column``.

    A long line is shown as the :data:`SHOWN` characters around the column; tabs before
    the column are kept in the caret line so that the caret lines up in a terminal.
    """
    start = 0
    if len(source_line) > SHOWN:
        start = min(max(column - 1 - SHOWN // 2, 0), len(source_line) - SHOWN)
    shown = source_line[start : start + SHOWN]
    before = shown[: max(column - 1 - start, 0)]
    head = "…" if start > 0 else ""
    tail = "…" if start + SHOWN < len(source_line) else ""
    pad = "".join("\t" if c == "\t" else " " for c in _printable(head + before))
    return f"    {_printable(head + shown + tail)}\n    {pad}^"


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
        message = f"{source}:{line}:{column}: {label}\n{snippet(source_line, column)}"
        super().__init__(message)

    def __str__(self) -> str:  # SyntaxError's own __str__ appends "(line N)"
        return self.args[0]


class KldslNameError(KldslError, NameError):
    """A name in a .kl text (or an engine, or a model) is unknown; suggests the closest one."""

    def __init__(self, name: str, known: Iterable[str], what: str = "name", hint: str = ""):
        self.known = sorted(set(known))
        self.suggestion = closest(name, self.known)
        message = f"unknown {what} {shorten(repr(name))}"
        if self.suggestion is not None:
            message += f"; did you mean {shorten(repr(self.suggestion))}?"
        if hint:
            message += f" {hint}"
        shown = [shorten(k) for k in self.known[:KNOWN_SHOWN]]
        if len(self.known) > KNOWN_SHOWN:
            shown.append(f"… ({len(self.known) - KNOWN_SHOWN} more)")
        message += f"\n  known: {', '.join(shown)}"
        super().__init__(message)
        self.name = name  # after NameError.__init__, which sets it to None


class KldslModelLoadError(KldslError):
    """An LM could not be loaded; the message says what was tried and what to do."""


class KldslInferenceError(KldslError):
    """An engine could not produce a trustworthy answer (no sample satisfied a constraint, ...)."""


class KldslNoSupportError(KldslInferenceError):
    """No draw of an engine had p̃ > 0: every weight is zero, so Ẑ = 0 and there is no
    sample to return (a fine-tuning step that draws with the engine skips its update)."""


class KldslValueError(KldslError, ValueError):
    """A value kldsl was given is outside what it takes (a prompt a ToyLM cannot spell, ...)."""


class KldslRewardError(KldslError, ValueError):
    """A reward or constraint raised, returned NaN, or returned the wrong number of values."""


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to ``name`` by edit similarity, or None when none is close."""
    if len(name) > SHOWN:  # a name that long is no typo (and would be slow to compare)
        return None
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    if matches:
        return matches[0]
    lowered = {k.lower(): k for k in known}
    return lowered.get(name.lower())
