"""PBServerFactory and PBClientFactory: what a server serves, how a client logs in.

They hold no I/O: an adapter calls :meth:`PBServerFactory.make_broker` for
each accepted connection and :meth:`PBClientFactory.make_broker` for the
connection it opens, and feeds those brokers bytes. The client's
:meth:`~PBClientFactory.getRootObject` and :meth:`~PBClientFactory.login`
are coroutines that await the broker's pending results, so the same code runs
under asyncio, trio, a blocking driver or :class:`pbcore.testing.BrokerPair`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .banana import DEFAULT_LIMITS, Limits
from .broker import Broker, Pending
from .budget import DEFAULT_BUDGET, MemoryBudget
from .cred import Anonymous, respond
from .errors import ConnectionTimedOut, Error, connection_lost_error
from .flavors import RemoteReference
from .jelly import SecurityOptions, globalSecurity
from .timers import DEFAULT_TIMEOUTS, Timeouts

__all__ = ["PBClientFactory", "PBServerFactory"]


class PBServerFactory:
    """Serves *root* (a Root, anything with ``rootObject(broker)``, or a Portal to log in through)."""

    def __init__(
        self,
        root: Any,
        unsafeTracebacks: bool = False,
        security: SecurityOptions = globalSecurity,
        limits: Limits = DEFAULT_LIMITS,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        *,
        budget: MemoryBudget = DEFAULT_BUDGET,
    ) -> None:
        self.root = root
        #: The process-wide bound on unfinished messages its connections count against (pbcore.budget).
        self.budget = budget
        self.unsafeTracebacks = unsafeTracebacks
        self.security = security
        self.limits = limits
        #: Handshake, keepalive and dead-peer timeouts of every connection (see pbcore.timers).
        self.timeouts = timeouts

    def make_broker(self, **adapter_options: Any) -> Broker:
        """A broker for one accepted connection (*adapter_options*: pending_factory, wake_up, on_output)."""
        return Broker(
            is_client=False,
            root=self.root,
            security=self.security,
            limits=self.limits,
            unsafe_tracebacks=self.unsafeTracebacks,
            timeouts=self.timeouts,
            budget=self.budget,
            **adapter_options,
        )


class PBClientFactory:
    """Connects to one server and logs in."""

    def __init__(
        self,
        unsafeTracebacks: bool = False,
        security: SecurityOptions = globalSecurity,
        limits: Limits = DEFAULT_LIMITS,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        *,
        budget: MemoryBudget = DEFAULT_BUDGET,
    ) -> None:
        self.budget = budget
        self.unsafeTracebacks = unsafeTracebacks
        self.security = security
        self.limits = limits
        #: Handshake, keepalive and dead-peer timeouts of the connection (see pbcore.timers).
        self.timeouts = timeouts
        self.broker: Broker | None = None
        self._close: Callable[[], object] | None = None

    def make_broker(self, close: Callable[[], object] | None = None, **adapter_options: Any) -> Broker:
        """The broker for the connection the adapter opened; *close* closes that connection."""
        self.broker = Broker(
            is_client=True,
            security=self.security,
            limits=self.limits,
            unsafe_tracebacks=self.unsafeTracebacks,
            timeouts=self.timeouts,
            budget=self.budget,
            **adapter_options,
        )
        self._close = close
        return self.broker

    async def getRootObject(self, timeout: float | None = None) -> RemoteReference:
        """The server's root object, once the handshake is done.

        With a *timeout* (seconds) it fails with
        :class:`~pbcore.errors.ConnectionTimedOut` if the handshake is not
        done by then (the connection's timers keep the time; the handshake
        timeout of :class:`~pbcore.timers.Timeouts` bounds it in any case).
        """
        broker = self._connected()
        if not broker.ready:
            ready: Pending = broker.pending_factory()
            broker.notifyOnConnect(lambda: ready.resolve(None))
            broker.notifyOnDisconnect(lambda: ready.fail(connection_lost_error(broker.close_reason)))
            if timeout is not None:
                broker.watch(ready, timeout, ConnectionTimedOut(f"no PB handshake within {timeout} s"))
            await ready  # type: ignore[misc]
        return broker.root()

    async def login(self, credentials: Any, client: Any = None, timeout: float | None = None) -> RemoteReference:
        """Log in (username/password by challenge-response, or Anonymous); the avatar's reference.

        *client* is the "mind" the server's realm receives, as a reference
        (a Referenceable of yours), or None. *timeout* bounds the handshake
        and each of the login's calls (``pbtimeout``).
        """
        root = await self.getRootObject(timeout)
        if isinstance(credentials, Anonymous):
            avatar: RemoteReference = await root.callRemote("loginAnonymous", client, pbtimeout=timeout)
            return avatar
        challenge, challenger = await root.callRemote("login", credentials.username, pbtimeout=timeout)
        answer = respond(challenge, credentials.password)
        avatar = await challenger.callRemote("respond", answer, client, pbtimeout=timeout)
        return avatar

    def disconnect(self) -> None:
        """Close the connection (through the adapter)."""
        if self._close is not None:
            self._close()

    def _connected(self) -> Broker:
        if self.broker is None:
            raise Error("not connected: an adapter must connect this factory first")
        if self.broker.closed:
            raise connection_lost_error(self.broker.close_reason)
        return self.broker
