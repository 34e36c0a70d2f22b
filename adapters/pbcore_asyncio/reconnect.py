"""A client that stays connected: connects, logs in, and does it again whenever the connection is lost.

::

    client = ReconnectingClient("127.0.0.1", 8789, credentials=UsernamePassword("alice", "secret"),
                                on_connect=subscribe, backoff=Backoff(initial=1.0, maximum=60.0))
    async with client:                     # runs it in a background task; stops it on exit
        avatar = await client.connected()  # the current avatar (waits while disconnected)
        print(await avatar.callRemote("hello"))

or ``await client.run()``, which runs until :meth:`ReconnectingClient.stop`
(and raises the error of a refused login, which stops it too). The policy
(when to try again, when to give up) is the core's
:class:`pbcore.reconnect.Reconnector` (``client.policy``), told of every
attempt, connection, failure and loss with ``loop.time()``; this module only
connects, logs in, waits and sleeps.

Each attempt uses a fresh factory (``factory()``, by default
:class:`~pbcore.factory.PBClientFactory`), so the application sets its
timeouts and security there. Connecting over TCP is bounded by the factory's
``timeouts.handshake``, as the PB handshake after it is. A reference of an
earlier connection stays dead: its calls raise
:class:`~pbcore.errors.DeadReferenceError` at once, and ``on_connect`` is
given each new one.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any

from pbcore.errors import ConnectionTimedOut, connection_lost_error
from pbcore.factory import PBClientFactory
from pbcore.flavors import RemoteReference
from pbcore.isolation import describe
from pbcore.reconnect import Backoff, ClientState, Reconnector

from . import Connection, connect

__all__ = ["ReconnectingClient"]

log = logging.getLogger("pbcore.asyncio")


class ReconnectingClient:
    """Stays connected to the PB server at *host*:*port*, logged in with *credentials*.

    *credentials*: a :class:`~pbcore.cred.UsernamePassword` or
    :class:`~pbcore.cred.Anonymous` to log in with (None: the server's root
    object, ``getRootObject()``); *mind*: the object the server's realm is
    given at login. *on_connect(reference)* is called with each new avatar
    (or root): a plain function, or an async one, which runs in a task of its
    own, cancelled when that connection is lost; what it raises is logged
    under ``pbcore.asyncio``. *factory* makes the
    :class:`~pbcore.factory.PBClientFactory` of each attempt. *backoff* and
    *retry_refused_login* are the policy's (:class:`~pbcore.reconnect.Reconnector`).
    *ssl_context* and *server_hostname*: TLS, as for :func:`pbcore_asyncio.connect`.

    ``state``, ``last_error``, ``policy``, ``reference`` (None while
    disconnected) and ``connection`` tell where it stands; ``await
    connected()`` waits for the current reference. Use it from the event
    loop's thread.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        credentials: Any = None,
        mind: Any = None,
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
        #: The policy: state, backoff, whether to give up.
        self.policy = Reconnector(backoff, retry_refused_login=retry_refused_login)
        #: The current avatar (or root), None while disconnected.
        self.reference: RemoteReference | None = None
        #: The current :class:`pbcore_asyncio.Connection`, None while disconnected.
        self.connection: Connection | None = None
        self._running = False
        self._stop_requested = False
        self._stopping: asyncio.Future[None] | None = None  # set by stop(), while run() runs
        self._changed: asyncio.Future[None] | None = None  # what connected() waits for
        self._on_connect_task: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None  # run(), under `async with`

    @property
    def state(self) -> ClientState:
        """Connecting, connected, waiting (between attempts) or stopped."""
        return self.policy.state

    @property
    def last_error(self) -> BaseException | None:
        """Why the last attempt failed or the last connection was lost (None: no trouble yet)."""
        return self.policy.last_error

    # -- the application's side -----------------------------------------------------------------

    async def connected(self) -> RemoteReference:
        """The current avatar (or root), once connected; once stopped, the refused login or ClientStopped."""
        while True:
            if self.reference is not None:
                return self.reference
            if self.policy.stopped:
                raise self.policy.stopped_error()
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._changed)

    def stop(self) -> None:
        """Close the current connection, if any, and try no more: run() returns."""
        if not self.policy.stopped:
            self._stop_requested = True
            self.policy.stop()
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(None)
        self._close()
        self._notify()

    async def run(self) -> None:
        """Connect, log in, wait for the connection to end, again, until stopped.

        Returns once :meth:`stop` was called; raises the error of a refused
        login if that stopped the client. Cancelled, it stops the client.
        """
        if self._running:
            raise RuntimeError("this client is already running")
        loop = asyncio.get_running_loop()
        self._running = True
        self._stopping = stopping = loop.create_future()
        try:
            while (when := self.policy.next_attempt()) is not None:
                delay = when - loop.time()
                if delay > 0:
                    await asyncio.wait({stopping}, timeout=delay)  # stop() ends the wait
                    if self.policy.stopped:
                        break
                await self._attempt(loop, stopping)
        finally:
            self._running = False
            self._stopping = None
            if not self.policy.stopped:  # cancelled
                self.policy.stop()
            self._close()
            self._notify()
        if not self._stop_requested and self.policy.last_error is not None:
            raise self.policy.last_error  # the refused login

    async def __aenter__(self) -> ReconnectingClient:
        if self._task is not None:
            raise RuntimeError("this client is already running")
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        task, self._task = self._task, None
        self.stop()
        if task is None:
            return
        try:
            await task
        except Exception:
            if error is None:  # else the block's own error goes on (most likely this one, from connected())
                raise

    def __repr__(self) -> str:
        return f"<pbcore_asyncio.ReconnectingClient {self.host}:{self.port} {self.policy!r}>"

    # -- one attempt ------------------------------------------------------------------------------------

    async def _attempt(self, loop: asyncio.AbstractEventLoop, stopping: asyncio.Future[None]) -> None:
        self.policy.attempt_started(loop.time())
        self._notify()
        log.debug("connecting to %s:%s", self.host, self.port)
        try:
            factory = self.factory()
            outcome = await self._unless_stopped(self._connect(factory), stopping)
        except Exception as error:
            self.policy.failed(error, loop.time())
            self._failed(error, loop)
            return
        if outcome is None:  # stopped meanwhile
            return
        connection, reference = outcome
        broker = connection.broker
        if broker.closed:  # lost between the login's answer and now
            gone = connection_lost_error(broker.close_reason)
            self.policy.failed(gone, loop.time())
            self._failed(gone, loop)
            return
        lost: asyncio.Future[None] = loop.create_future()

        def disconnected() -> None:
            # Run by the broker as it closes: no moment with a dead reference for connected() to return.
            self.reference = self.connection = None
            self.policy.lost(connection_lost_error(broker.close_reason), loop.time())
            if not self.policy.stopped:
                log.info("the connection to %s:%s was lost: %s", self.host, self.port, self.policy.last_error)
            if not lost.done():
                lost.set_result(None)
            self._notify()

        broker.notifyOnDisconnect(disconnected)
        self.connection, self.reference = connection, reference
        self.policy.connected(loop.time())
        log.info("connected to %s:%s", self.host, self.port)
        self._call_on_connect(reference, loop)
        self._notify()
        try:
            await lost
        finally:
            task, self._on_connect_task = self._on_connect_task, None
            if task is not None and not task.done():
                task.cancel()  # its reference is dead
                await asyncio.wait({task})

    async def _connect(self, factory: PBClientFactory) -> tuple[Connection, RemoteReference]:
        connection = await self._open(factory)
        try:
            if self.credentials is None:
                reference = await factory.getRootObject()
            else:
                reference = await factory.login(self.credentials, self.mind)
        except BaseException:
            connection.close()
            raise
        return connection, reference

    async def _open(self, factory: PBClientFactory) -> Connection:
        # The TCP (and TLS) connection, bounded by the factory's handshake timeout. Not
        # asyncio.wait_for: before 3.12 it may swallow a cancellation (stop()) that comes
        # as the connection is made, and keep the connection.
        timeout = factory.timeouts.handshake
        opening = asyncio.get_running_loop().create_task(
            connect(factory, self.host, self.port, ssl_context=self.ssl_context, server_hostname=self.server_hostname)
        )
        try:
            await asyncio.wait({opening}, timeout=timeout)
        except BaseException:  # cancelled (stop())
            if not opening.cancel() and not opening.cancelled() and opening.exception() is None:
                opening.result().close()  # made as this was cancelled
            raise
        if not opening.done():
            opening.cancel()  # asyncio closes the socket it was opening
            await asyncio.wait({opening})
            if opening.cancelled():
                raise ConnectionTimedOut(f"no connection to {self.host}:{self.port} within {timeout} s")
        return opening.result()

    async def _unless_stopped(
        self, attempt: Coroutine[Any, Any, tuple[Connection, RemoteReference]], stopping: asyncio.Future[None]
    ) -> tuple[Connection, RemoteReference] | None:
        # The attempt's outcome, or None if stop() came first (the attempt is then cancelled).
        task = asyncio.get_running_loop().create_task(attempt)
        task.add_done_callback(_retrieve)  # even if this is cancelled before looking at it
        try:
            either: set[asyncio.Future[Any]] = {task, stopping}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})  # it closes the connection it made
        if task.cancelled():
            return None
        if self.policy.stopped:
            if task.exception() is None:
                task.result()[0].close()  # done at the moment stop() was called
            return None
        return task.result()

    def _failed(self, error: BaseException, loop: asyncio.AbstractEventLoop) -> None:
        when = self.policy.next_attempt()
        if self.policy.stopped:
            log.warning("the login to %s:%s was refused; stopping: %s", self.host, self.port, error)
        elif when is not None:
            log.info(
                "connecting to %s:%s failed (%r); next attempt in %.2f s",
                self.host,
                self.port,
                error,
                max(0.0, when - loop.time()),
            )
        self._notify()

    # -- on_connect ---------------------------------------------------------------------------------------

    def _call_on_connect(self, reference: RemoteReference, loop: asyncio.AbstractEventLoop) -> None:
        callback = self.on_connect
        if callback is None:
            return
        try:
            result = callback(reference)
        except Exception as error:
            log.error("on_connect %.80r raised; carrying on\n%s", callback, describe(error))
            return
        if inspect.isawaitable(result):
            self._on_connect_task = loop.create_task(self._await_on_connect(callback, result))

    async def _await_on_connect(self, callback: object, result: Awaitable[object]) -> None:
        try:
            await result
        except Exception as error:
            log.error("on_connect %.80r raised; carrying on\n%s", callback, describe(error))

    # -- helpers ----------------------------------------------------------------------------------------------

    def _close(self) -> None:
        connection = self.connection
        if connection is not None:
            connection.close()  # the broker's disconnect notifier forgets it

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Look at a task's exception, so that asyncio does not log it as never retrieved.
    if not task.cancelled():
        task.exception()
