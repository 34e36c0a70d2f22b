"""Running the application's callbacks so that one that raises cannot break the broker.

Every callback the core runs on the application's behalf (disconnect
notifiers, ``stoppedObserving``, logouts, release callbacks) goes through
:func:`run_isolated`: an exception is logged with its traceback and the
caller carries on with the next one.

Exceptions are logged with their traceback as text (:func:`describe`), not
as ``exc_info``: a handler that keeps log records (a test's capture, an
error reporter) would otherwise keep the traceback, and with it every
frame's locals: the call's arguments among them, references the peer counts
and would never see released.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

from .preview import error_text

__all__ = ["describe", "run_isolated"]


def describe(error: BaseException) -> str:
    """The exception and its traceback (and what it was raised from), as text for a log line.

    Like :func:`traceback.format_exception`, except that each exception's own
    text is :func:`~pbcore.preview.error_text`: an application's
    ``ValueError(value)`` of a peer's value must not make logging it walk
    the value expanded.
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(chain) < _MAX_CHAIN and all(current is not seen for seen in chain):
        chain.append(current)
        current = (
            current.__cause__
            if current.__cause__ is not None
            else (None if current.__suppress_context__ else current.__context__)
        )
    parts: list[str] = []
    for index, exception in enumerate(reversed(chain)):
        if index:
            caused = exception.__cause__ is chain[len(chain) - index]
            parts.append(f"\n{_CAUSE if caused else _CONTEXT}\n\n")
        if exception.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.format_tb(exception.__traceback__))
        kind = type(exception)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        text = error_text(exception)
        parts.append(f"{name}: {text}" if text else name)
    return "".join(parts).rstrip()


_MAX_CHAIN = 10
_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def run_isolated(logger: logging.Logger, what: str, callback: Callable[..., object], *args: Any) -> bool:
    """Call ``callback(*args)``; log what it raises (naming *what*) and return False then."""
    try:
        callback(*args)
    except Exception as error:
        logger.error("%s raised; carrying on\n%s", what, describe(error))
        return False
    return True
