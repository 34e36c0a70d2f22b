"""Running the application's callbacks so that one that raises cannot break the broker.

Every callback the core runs on the application's behalf (disconnect
notifiers, ``stoppedObserving``, logouts, release callbacks) goes through
:func:`run_isolated`: an exception is logged with its traceback and the
caller carries on with the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["run_isolated"]


def run_isolated(logger: logging.Logger, what: str, callback: Callable[..., object], *args: Any) -> bool:
    """Call ``callback(*args)``; log what it raises (naming *what*) and return False then."""
    try:
        callback(*args)
    except Exception:
        logger.exception("%s raised; carrying on", what)
        return False
    return True
