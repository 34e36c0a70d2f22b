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

__all__ = ["describe", "run_isolated"]


def describe(error: BaseException) -> str:
    """The exception and its traceback, as text for a log line."""
    return "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip()


def run_isolated(logger: logging.Logger, what: str, callback: Callable[..., object], *args: Any) -> bool:
    """Call ``callback(*args)``; log what it raises (naming *what*) and return False then."""
    try:
        callback(*args)
    except Exception as error:
        logger.error("%s raised; carrying on\n%s", what, describe(error))
        return False
    return True
