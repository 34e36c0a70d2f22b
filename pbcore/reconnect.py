"""The policy of a client that stays connected: when to try again, and when to give up.

Sans-IO, like the rest of the core: the adapter's reconnecting client (for
instance ``pbcore_asyncio.ReconnectingClient``) connects, logs in and waits;
it tells a :class:`Reconnector` what happened, with the time, and asks it when
to try next::

    policy = Reconnector(Backoff(initial=1.0, maximum=60.0))
    while (when := policy.next_attempt()) is not None:
        sleep until *when*
        policy.attempt_started(now)
        try:
            connect, log in
        except Exception as error:
            policy.failed(error, now)          # waiting again, or stopped (a refused login)
            continue
        policy.connected(now)                  # hand the avatar to the application
        wait until the connection is lost
        policy.lost(reason, now)

Delays grow from ``initial`` by ``factor`` after each failure in a row, up to
``maximum``, each spread by up to ``jitter`` (a fraction) either way so that
a crowd of clients does not come back at the same moment; a connection that
was up resets them. A refused login (wrong password, unknown user) stops
the client at once, unless told to retry: trying again will not change the
password.

Waiting for the connection (each adapter's ``connected()``) once the client
has stopped raises the refused login's error, or :class:`ClientStopped`.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable

import attrs

from .cred import LoginFailed
from .errors import PBConnectionLost
from .flavors import CopiedFailure

__all__ = ["Backoff", "ClientState", "ClientStopped", "Reconnector", "is_login_refusal"]


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value!r}")


@attrs.frozen
class Backoff:
    """Seconds to wait before each new attempt: ``initial * factor**n``, at most ``maximum``, +- ``jitter``."""

    initial: float = attrs.field(default=1.0, validator=_non_negative)
    maximum: float = attrs.field(default=60.0, validator=_non_negative)
    factor: float = attrs.field(default=2.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.1, validator=_non_negative)

    def delay(self, failures: int, draw: float) -> float:
        """The wait after *failures* failed attempts in a row (0: the first retry), for a *draw* in [0, 1)."""
        try:
            base = min(self.maximum, self.initial * self.factor ** max(failures, 0))
        except OverflowError:  # a server down for days: the ceiling it is
            base = self.maximum
        return max(0.0, base * (1.0 + self.jitter * (2.0 * draw - 1.0)))


class ClientStopped(PBConnectionLost):
    """The reconnecting client was stopped: there is no connection to wait for any more."""


class ClientState(enum.Enum):
    """Where a reconnecting client stands."""

    CONNECTING = "connecting"  # an attempt (connect, handshake, login) is under way
    CONNECTED = "connected"  # logged in: the application has the avatar (or root)
    WAITING = "waiting"  # between attempts, until next_attempt()
    STOPPED = "stopped"  # stop() was called, or a login was refused


def is_login_refusal(error: BaseException) -> bool:
    """Whether *error* says the server refused the credentials (from pbcore's or Twisted's portal)."""
    if isinstance(error, LoginFailed):
        return True
    return isinstance(error, CopiedFailure) and error.check(LoginFailed) is not None


class Reconnector:
    """The state of a reconnecting client, and when it should try next (see the module docstring).

    *retry_refused_login* keeps trying after a refused login. *draw* returns
    a number in [0, 1) for the jitter (``random.random`` by default; a test
    passes its own).
    """

    def __init__(
        self,
        backoff: Backoff = Backoff(),
        *,
        retry_refused_login: bool = False,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.backoff = backoff
        self.retry_refused_login = retry_refused_login
        self._draw = draw
        self.state = ClientState.WAITING
        #: Why the last attempt failed or the last connection was lost (None: no trouble yet).
        self.last_error: BaseException | None = None
        #: Failed attempts in a row (0 once connected).
        self.failures = 0
        #: How many times the client got connected (logged in) so far.
        self.connections = 0
        #: The refused login that stopped the client, if that is what did.
        self.refusal: BaseException | None = None
        self._next: float | None = 0.0  # the first attempt is at once

    def next_attempt(self) -> float | None:
        """When to start the next attempt (an absolute time; 0: at once), or None: not now (connected or stopped)."""
        return self._next if self.state is ClientState.WAITING else None

    def attempt_started(self, now: float) -> None:
        """An attempt begins (connect, handshake, login)."""
        if self.state is not ClientState.STOPPED:
            self.state = ClientState.CONNECTING

    def connected(self, now: float) -> None:
        """The attempt succeeded: the application gets the avatar (or root)."""
        if self.state is ClientState.STOPPED:
            return
        self.state = ClientState.CONNECTED
        self.failures = 0
        self.connections += 1

    def failed(self, error: BaseException, now: float) -> None:
        """The attempt failed: wait (growing delays), or stop if the login was refused."""
        self.last_error = error
        if self.state is ClientState.STOPPED:
            return
        if is_login_refusal(error) and not self.retry_refused_login:
            self.state = ClientState.STOPPED
            self.refusal = error
            return
        self._wait(now)
        self.failures += 1

    def lost(self, reason: BaseException | None, now: float) -> None:
        """The connection, once up, is gone: try again after the first delay."""
        self.last_error = reason
        if self.state is ClientState.STOPPED:
            return
        self._wait(now)

    def stop(self) -> None:
        """Try no more; the adapter closes any connection it has."""
        self.state = ClientState.STOPPED

    def stopped_error(self) -> BaseException:
        """What waiting for a connection raises once stopped: the refused login, or :class:`ClientStopped`."""
        if self.refusal is not None:
            return self.refusal
        return ClientStopped("the reconnecting client is stopped")

    @property
    def stopped(self) -> bool:
        """Whether the client is stopped (by stop(), or by a refused login)."""
        return self.state is ClientState.STOPPED

    def _wait(self, now: float) -> None:
        self.state = ClientState.WAITING
        self._next = now + self.backoff.delay(self.failures, self._draw())

    def __repr__(self) -> str:
        return f"<Reconnector {self.state.value} failures={self.failures} last_error={self.last_error!r:.80}>"
