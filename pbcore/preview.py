"""Bounded text for values that came from a peer.

A value unjellied from a few hundred bytes can be a structure of 10**20 leaves
(jelly's shared references), so ``repr`` or ``str`` of it never finishes. Every
place that turns a peer's value into text (a failure's message, an error
answer, a log line, the CLI) goes through :func:`preview` instead: it stops
after about *limit* characters, whatever the shape, in work proportional to
*limit*. :func:`error_text` does the same for an exception whose arguments may
hold such a value.
"""

from __future__ import annotations

import datetime
import decimal
from typing import Any, Final

__all__ = ["ERROR_TEXT_LIMIT", "PREVIEW_LIMIT", "error_text", "preview"]

#: The default length of a preview, in characters.
PREVIEW_LIMIT: Final = 200
#: How much of an exception's text an error answer or a log line keeps.
ERROR_TEXT_LIMIT: Final = 2000

_ELLIPSIS: Final = "..."
_MAX_LEVELS: Final = 12  # deeper than this is shown as "..."
_ATOMS: Final = frozenset(
    {bool, type(None), float, complex, decimal.Decimal}
    | {datetime.datetime, datetime.date, datetime.time, datetime.timedelta}
)
_OPEN: Final[dict[type, tuple[str, str]]] = {
    list: ("[", "]"),
    tuple: ("(", ")"),
    set: ("{", "}"),
    frozenset: ("frozenset({", "})"),
    dict: ("{", "}"),
}


class _Out:
    """Collects pieces until the budget is spent; then everything else is dropped."""

    __slots__ = ("left", "parts")

    def __init__(self, limit: int) -> None:
        self.parts: list[str] = []
        self.left = limit

    def put(self, text: str) -> bool:
        """Add *text* (cut to what is left); False once the budget is spent."""
        if self.left <= 0:
            return False
        if len(text) > self.left:
            text = text[: self.left]
        self.parts.append(text)
        self.left -= len(text)
        return self.left > 0


def preview(value: object, limit: int = PREVIEW_LIMIT) -> str:
    """A repr-like text of *value*, at most about *limit* characters, built in O(limit) steps.

    Containers are walked only as far as the text goes. An instance is shown
    as ``Name(attribute=value, ...)`` from its ``__dict__`` (or by its type's
    name), never by its own ``__repr__``, which is application code and may
    walk the whole value; a class can show itself with a
    ``__preview__(self, limit) -> str`` method.
    """
    out = _Out(max(limit, 1))
    _walk(value, out, 0)
    text = "".join(out.parts)
    return text + _ELLIPSIS if out.left <= 0 else text


def _walk(value: object, out: _Out, level: int) -> bool:
    kind = type(value)
    if kind is str or kind is bytes:
        # Cut before repr: repr of an 8 MB string is 8 MB of work and memory.
        return out.put(repr(value[: out.left + 1]))  # type: ignore[index]
    if kind is int:
        number: int = value  # type: ignore[assignment]
        return out.put(repr(number) if number.bit_length() <= 512 else f"<int of {number.bit_length()} bits>")
    if kind in _ATOMS:
        return out.put(repr(value))
    brackets = _OPEN.get(kind)
    if brackets is None:
        own = getattr(kind, "__preview__", None)
        if own is not None:  # a class that knows how to show itself within a budget
            return out.put(own(value, out.left))
        state = getattr(value, "__dict__", None)
        if type(state) is dict and level < _MAX_LEVELS:
            return _instance(kind.__qualname__, state, out, level)
        return out.put(f"<{kind.__module__}.{kind.__qualname__} object>")
    if not value and (kind is set or kind is frozenset):
        return out.put(f"{kind.__name__}()")
    opening, closing = brackets
    if level >= _MAX_LEVELS:
        return out.put(opening + _ELLIPSIS + closing)
    if not out.put(opening):
        return False
    items: Any = value.items() if kind is dict else value  # type: ignore[attr-defined]
    first = True
    for item in items:
        if not first and not out.put(", "):
            return False
        first = False
        if kind is dict:
            key, item_value = item
            if not (_walk(key, out, level + 1) and out.put(": ") and _walk(item_value, out, level + 1)):
                return False
        elif not _walk(item, out, level + 1):
            return False
    if kind is tuple and len(value) == 1:  # type: ignore[arg-type]
        out.put(",")
    return out.put(closing)


def _instance(name: str, state: dict[str, Any], out: _Out, level: int) -> bool:
    """An instance as ``Name(attribute=value, ...)``, from its ``__dict__`` (a copy's state)."""
    if not out.put(name + "("):
        return False
    for index, (key, item) in enumerate(state.items()):
        if index and not out.put(", "):
            return False
        label = key if type(key) is str and key.isidentifier() else preview(key, 40)
        if not (out.put(label + "=") and _walk(item, out, level + 1)):
            return False
    return out.put(")")


# The __str__ methods that render the exception's arguments (KeyError's with repr).
_ARGS_STR: Final = (BaseException.__str__, KeyError.__str__)


def error_text(error: BaseException, limit: int = ERROR_TEXT_LIMIT) -> str:
    """``str(error)``, at most about *limit* characters, without rendering its arguments whole.

    An exception that keeps the default ``__str__`` (or KeyError's) is
    rendered from its arguments: a string is cut at *limit*, anything else is
    a :func:`preview` of at most :data:`ERROR_TEXT_LIMIT`: a
    ``ValueError(value)`` of a peer's value costs that, not the value's
    expanded size. One with its own ``__str__`` is trusted to be cheap.
    """
    if type(error).__str__ not in _ARGS_STR:
        try:
            text = str(error)
        except Exception as failure:  # an application's __str__ may be broken
            return f"<{type(error).__qualname__}: str() failed with {type(failure).__qualname__}>"
        return text if len(text) <= limit else text[:limit] + _ELLIPSIS
    args = error.args
    if not args:
        return ""
    if len(args) == 1:
        only = args[0]
        if type(only) is str and not isinstance(error, KeyError):  # KeyError shows its key's repr
            return only if len(only) <= limit else only[:limit] + _ELLIPSIS
        return preview(only, min(limit, ERROR_TEXT_LIMIT))
    return preview(args, min(limit, ERROR_TEXT_LIMIT))
