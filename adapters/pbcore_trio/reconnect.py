"""A trio client that stays connected: it connects, logs in, and does it again whenever the connection is lost.

::

    client = ReconnectingClient("127.0.0.1", 8789, credentials=UsernamePassword("alice", "secret"),
                                on_connect=lambda avatar: print("logged in"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)             # runs until client.stop() (or a refused login)
        avatar = await client.connected()          # the current avatar, waiting for it if need be
        print(await avatar.callRemote("hello"))
        client.stop()

or ``async with client:`` (a nursery runs it; it stops on exit, and a refused
login cancels the block and is raised from it). When to try
again is :class:`pbcore.reconnect.Reconnector`'s business (``client.policy``):
growing, jittered delays between failed attempts, reset by a connection; a
refused login stops the client unless ``retry_refused_login`` is set. The
times it is given are ``trio.current_time()``.

Each attempt gets a fresh :class:`~pbcore.factory.PBClientFactory` from
*factory* (so the application sets its timeouts, limits and security) and
logs in with *credentials* (or takes the root object, without them); its
TCP connection (and TLS handshake) must come up within the factory's
``Timeouts.handshake``, and the core's timers bound the rest. Every
new avatar (or root) goes to *on_connect*, plain or async, in a task of its
own that is cancelled when that connection ends; what it raises is logged
under ``pbcore.trio`` and the client goes on. A reference of a connection that
is gone is dead: calling it raises :class:`~pbcore.errors.DeadReferenceError`
at once, so ask :meth:`ReconnectingClient.connected` for the current one.

The client belongs to one trio run: call its methods from that run's thread.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import ssl
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from types import TracebackType

import trio

from pbcore.broker import Broker
from pbcore.cred import Anonymous, UsernamePassword
from pbcore.errors import ConnectionTimedOut, connection_lost_error
from pbcore.factory import PBClientFactory
from pbcore.flavors import RemoteReference
from pbcore.isolation import describe
from pbcore.reconnect import Backoff, ClientState, ClientStopped, Reconnector

from . import Connection, open_connection

__all__ = ["ClientStopped", "ReconnectingClient"]

log = logging.getLogger("pbcore.trio")


class ReconnectingClient:
    """Stays connected (and logged in) to a PB server at *host*:*port*; see the module docstring.

    ``state`` and ``last_error`` are the policy's (``client.policy``);
    ``reference`` is the current avatar (or root), None while disconnected;
    ``connection`` the current :class:`pbcore_trio.Connection`, or None.
    *ssl_context* and *server_hostname* are :func:`pbcore_trio.open_connection`'s.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        credentials: UsernamePassword | Anonymous | None = None,
        mind: object = None,
        on_connect: Callable[[RemoteReference], object] | None = None,
        backoff: Backoff = Backoff(),
        retry_refused_login: bool = False,
        factory: Callable[[], PBClientFactory] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.credentials = credentials
        self.mind = mind
        self.on_connect = on_connect
        self.factory: Callable[[], PBClientFactory] = PBClientFactory if factory is None else factory
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        #: When to try again, and the state (pbcore.reconnect.Reconnector).
        self.policy = Reconnector(backoff, retry_refused_login=retry_refused_login)
        #: The current avatar (or root object); None while disconnected.
        self.reference: RemoteReference | None = None
        #: The current connection; None while disconnected.
        self.connection: Connection | None = None
        self._scope = trio.CancelScope()  # the whole loop: stop() cancels it
        self._changed = trio.Event()  # set (and replaced) whenever the state changes
        self._ran = False
        self._refused = False  # a refused login stopped the client
        self._block: AbstractAsyncContextManager[trio.Nursery] | None = None  # ``async with client``'s nursery

    @property
    def state(self) -> ClientState:
        """Connecting, connected, waiting or stopped."""
        return self.policy.state

    @property
    def last_error(self) -> BaseException | None:
        """Why the last attempt failed or the last connection was lost (None: no trouble yet)."""
        return self.policy.last_error

    def stop(self) -> None:
        """Close the current connection, if any, and end :meth:`run` (at once, whatever it is doing)."""
        self.policy.stop()
        self.reference = None
        self._scope.cancel()  # the current connection closes with it
        self._notify()

    async def connected(self) -> RemoteReference:
        """The current avatar (or root), waiting while the client connects or waits to try again.

        Once the client is stopped, raises the refused login's error if that
        is what stopped it, else :class:`ClientStopped`.
        """
        while True:
            reference = self.reference
            if self.policy.state is ClientState.CONNECTED and reference is not None and not reference.broker.closed:
                return reference
            if self.policy.stopped:
                raise self.policy.stopped_error()
            await self._changed.wait()

    async def run(self) -> None:
        """Connect, log in, wait for the connection to end, and again, until stopped.

        Returns after :meth:`stop`; raises the error of a refused login if
        that stopped the client. Runs once per client.
        """
        if self._ran:
            raise RuntimeError("a ReconnectingClient runs only once")
        self._ran = True
        try:
            with self._scope:
                while (when := self.policy.next_attempt()) is not None:
                    await trio.sleep_until(when)
                    await self._attempt()
        finally:
            self.policy.stop()  # also when cancelled from outside: nothing more will come
            self.reference = None
            self.connection = None
            self._notify()
        if self._refused and self.policy.last_error is not None:
            raise self.policy.last_error

    async def __aenter__(self) -> ReconnectingClient:
        block = trio.open_nursery()
        nursery = await block.__aenter__()
        self._block = block
        nursery.start_soon(self._run_in_block, nursery.cancel_scope)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self.stop()
        block, self._block = self._block, None
        assert block is not None, "__aexit__ without __aenter__"
        try:
            swallowed = bool(await block.__aexit__(exc_type, exc, tb))
        except BaseException as raised:
            if exc is not None and all(leaf is exc or isinstance(leaf, trio.Cancelled) for leaf in _leaves(raised)):
                return False  # the block's own exception, raised again as it was (not in an ExceptionGroup)
            raise
        if self._refused and self.policy.last_error is not None and (exc is None or swallowed):
            raise self.policy.last_error  # the refused login cancelled the block
        return swallowed

    # -- inside --------------------------------------------------------------------------------

    async def _run_in_block(self, block: trio.CancelScope) -> None:
        try:
            await self.run()
        except Exception:
            if not self._refused:
                raise
            block.cancel()  # __aexit__ raises the refused login's error

    async def _attempt(self) -> None:
        policy = self.policy
        policy.attempt_started(trio.current_time())
        self._notify()
        log.debug("connecting to %s:%s", self.host, self.port)
        outcome: Exception | None = None
        up = False
        try:
            factory = self.factory()
            timeout = factory.timeouts.handshake
            with trio.CancelScope() as connecting:
                if timeout is not None:  # for the TCP connection (and TLS); the core's timers do the rest
                    connecting.deadline = trio.current_time() + timeout
                async with open_connection(
                    factory, self.host, self.port, ssl_context=self.ssl_context, server_hostname=self.server_hostname
                ) as connection:
                    connecting.deadline = math.inf
                    self.connection = connection
                    if self.credentials is None:
                        reference = await factory.getRootObject()
                    else:
                        reference = await factory.login(self.credentials, self.mind)
                    broker = connection.broker
                    if broker.closed:  # lost between the answer and now
                        raise connection_lost_error(broker.close_reason)
                    # Run by the broker as it closes: no moment when connected() could return a dead reference.
                    broker.notifyOnDisconnect(functools.partial(self._lost, broker))
                    up = True
                    self.reference = reference
                    policy.connected(trio.current_time())
                    self._notify()
                    log.info("connected to %s:%s", self.host, self.port)
                    async with trio.open_nursery() as nursery:
                        if self.on_connect is not None:
                            nursery.start_soon(self._call_on_connect, self.on_connect, reference)
                        await connection.wait_closed()
                        nursery.cancel_scope.cancel()  # on_connect's work was for this connection
            if connecting.cancelled_caught:
                outcome = ConnectionTimedOut(f"no connection to {self.host}:{self.port} within {timeout} s")
        except Exception as error:
            outcome = error
        finally:
            self.reference = None
            self.connection = None
        if up:
            if outcome is not None:
                log.error("closing the connection to %s:%s failed\n%s", self.host, self.port, describe(outcome))
            return
        assert outcome is not None
        stopped_before = policy.stopped
        policy.failed(outcome, trio.current_time())
        if policy.stopped and not stopped_before:
            self._refused = True
            log.warning("%s:%s refused the login; stopping: %s", self.host, self.port, outcome)
        else:
            log.info("connecting to %s:%s failed (%r)%s", self.host, self.port, outcome, self._retry())
        self._notify()

    def _lost(self, broker: Broker) -> None:
        self.reference = None
        self.connection = None
        if not self.policy.stopped:
            self.policy.lost(connection_lost_error(broker.close_reason), trio.current_time())
            log.info("lost the connection to %s:%s (%s)%s", self.host, self.port, self.last_error, self._retry())
        self._notify()

    def _retry(self) -> str:
        when = self.policy.next_attempt()
        return "" if when is None else f"; trying again in {max(0.0, when - trio.current_time()):.2f} s"

    async def _call_on_connect(
        self, on_connect: Callable[[RemoteReference], object], reference: RemoteReference
    ) -> None:
        try:
            result = on_connect(reference)
            if inspect.isawaitable(result):
                await result
        except Exception as error:
            # As text, not exc_info: a handler keeping records would keep the frames alive.
            log.error("on_connect raised; the client carries on\n%s", describe(error))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"<ReconnectingClient {self.host}:{self.port} {self.policy!r}>"


def _leaves(error: BaseException) -> Iterator[BaseException]:
    inner = getattr(error, "exceptions", None)  # an ExceptionGroup (exceptiongroup's on 3.10)
    if inner is None:
        yield error
    else:
        for each in inner:
            yield from _leaves(each)
