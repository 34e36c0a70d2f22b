"""An anyio client that stays connected: it connects, logs in, and does it again whenever the connection is lost.

::

    client = ReconnectingClient("127.0.0.1", 8789, credentials=UsernamePassword("alice", "secret"),
                                on_connect=subscribe, backoff=Backoff(initial=1.0, maximum=60.0))
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.run)                # runs until client.stop() (or a refused login)
        avatar = await client.connected()        # the current avatar, waiting for it if need be
        print(await avatar.callRemote("hello"))
        client.stop()

or ``async with client:`` (a task group runs it; it stops on exit). It runs
on either of anyio's backends. When to try again is the core's
:class:`pbcore.reconnect.Reconnector` (``client.policy``): growing, jittered
delays between failed attempts, reset by a connection; a refused login stops
the client unless ``retry_refused_login`` is set. The times it is given are
``anyio.current_time()``; this module only connects, logs in, waits and
sleeps.

Each attempt gets a fresh :class:`~pbcore.factory.PBClientFactory` from
*factory* (so the application sets its timeouts, limits and security there);
opening the TCP connection is bounded by its ``timeouts.handshake``, as the
PB handshake after it is. It logs in with *credentials* (or takes the root
object, without them). Every new avatar (or root) goes to *on_connect*, plain
or async (an async one runs in a task of its own, cancelled when that
connection ends); what it raises is logged under ``pbcore.anyio`` and the
client goes on. A reference of a connection that is gone is dead: calling it
raises :class:`~pbcore.errors.DeadReferenceError` at once, so ask
:meth:`ReconnectingClient.connected` for the current one.

The client belongs to one event loop: use it from that loop's thread.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType

import anyio
from anyio.abc import TaskGroup

from pbcore.cred import Anonymous, UsernamePassword
from pbcore.errors import ConnectionTimedOut, PBConnectionLost, connection_lost_error
from pbcore.factory import PBClientFactory
from pbcore.flavors import RemoteReference
from pbcore.isolation import describe
from pbcore.reconnect import Backoff, ClientState, ClientStopped, Reconnector

from . import Connection, open_connection

__all__ = ["ClientStopped", "ReconnectingClient"]

log = logging.getLogger("pbcore.anyio")


class ReconnectingClient:
    """Stays connected (and logged in) to the PB server at *host*:*port*; see the module docstring.

    *credentials*: a :class:`~pbcore.cred.UsernamePassword` or
    :class:`~pbcore.cred.Anonymous` to log in with (None: the server's root
    object, ``getRootObject()``); *mind*: the object the server's realm is
    given at login. *factory* makes each attempt's
    :class:`~pbcore.factory.PBClientFactory`. *backoff* and
    *retry_refused_login* are the policy's. *ssl_context* and
    *server_hostname* are :func:`pbcore_anyio.open_connection`'s.

    ``state`` and ``last_error`` are the policy's (``client.policy``);
    ``reference`` is the current avatar (or root), None while disconnected;
    ``connection`` the current :class:`pbcore_anyio.Connection`, or None.
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
        # anyio's primitives need a running event loop: made by run() and connected(), not here.
        self._scope: anyio.CancelScope | None = None  # run()'s loop: stop() cancels it
        self._changed: anyio.Event | None = None  # set (and forgotten) whenever the state changes
        self._ran = False
        self._refusal: BaseException | None = None  # the refused login that stopped the client
        self._block: contextlib.AbstractAsyncContextManager[None] | None = None  # ``async with client``

    @property
    def state(self) -> ClientState:
        """Connecting, connected, waiting (between attempts) or stopped."""
        return self.policy.state

    @property
    def last_error(self) -> BaseException | None:
        """Why the last attempt failed or the last connection was lost (None: no trouble yet)."""
        return self.policy.last_error

    # -- the application's side ----------------------------------------------------------------

    def stop(self) -> None:
        """Close the current connection, if any, and end :meth:`run` (at once, whatever it is doing)."""
        self.policy.stop()
        self.reference = None
        connection = self.connection
        if connection is not None:
            connection.close()
        if self._scope is not None:
            self._scope.cancel()
        self._notify()

    async def connected(self) -> RemoteReference:
        """The current avatar (or root), waiting while the client connects or waits to try again.

        Once the client is stopped, raises the refused login's error if that
        is what stopped it, else :class:`ClientStopped`.
        """
        while True:
            reference = self.reference
            if reference is not None and self.policy.state is ClientState.CONNECTED:
                return reference
            if self.policy.stopped:
                raise self.policy.stopped_error()
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    async def run(self) -> None:
        """Connect, log in, wait for the connection to end, and again, until stopped.

        Returns after :meth:`stop`; raises the error of a refused login if
        that stopped the client. Cancelled, it stops the client. Runs once.
        """
        if self._ran:
            raise RuntimeError("a ReconnectingClient runs only once")
        self._ran = True
        self._scope = anyio.CancelScope()
        try:
            with self._scope:
                while (when := self.policy.next_attempt()) is not None:
                    await anyio.sleep_until(when)
                    await self._attempt()
        finally:
            self.policy.stop()  # also when cancelled from outside: nothing more will come
            self.reference = None
            self.connection = None
            self._notify()
        if self._refusal is not None:
            raise self._refusal

    async def __aenter__(self) -> ReconnectingClient:
        if self._block is not None:
            raise RuntimeError("this client is already running")
        block = self._running()
        await block.__aenter__()
        self._block = block
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        block, self._block = self._block, None
        assert block is not None, "__aexit__ without __aenter__"
        return await block.__aexit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"<pbcore_anyio.ReconnectingClient {self.host}:{self.port} {self.policy!r}>"

    # -- inside --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        # run() in a task group for the block; the block's own exception comes out as itself (not in an
        # ExceptionGroup), and a refused login that ended the block as the login's error.
        raised: BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._run_in_block, tg.cancel_scope)
            try:
                yield
            except anyio.get_cancelled_exc_class():
                raise  # for the cancel scopes: ours (a refused login) or the caller's
            except BaseException as error:
                raised = error
            finally:
                self.stop()
        if raised is not None:
            raise raised
        if self._refusal is not None:
            raise self._refusal

    async def _run_in_block(self, block: anyio.CancelScope) -> None:
        try:
            await self.run()
        except Exception as error:
            if error is not self._refusal:
                raise
            block.cancel()  # _running raises the refused login's error

    async def _attempt(self) -> None:
        policy = self.policy
        policy.attempt_started(anyio.current_time())
        self._notify()
        log.debug("connecting to %s:%s", self.host, self.port)
        up = False
        outcome: Exception | None = None
        try:
            factory = self.factory()
            timeout = factory.timeouts.handshake
            deadline = math.inf if timeout is None else anyio.current_time() + timeout
            with anyio.CancelScope(deadline=deadline) as connecting:
                async with open_connection(
                    factory, self.host, self.port, ssl_context=self.ssl_context, server_hostname=self.server_hostname
                ) as connection:
                    connecting.deadline = math.inf  # connected: the connection's handshake timer takes over
                    self.connection = connection
                    if self.credentials is None:
                        reference = await factory.getRootObject()
                    else:
                        reference = await factory.login(self.credentials, self.mind)
                    up = self._up(connection, reference)
                    if up:
                        await self._serve(connection, reference)
            if connecting.cancelled_caught:
                raise ConnectionTimedOut(f"no connection to {self.host}:{self.port} within {timeout} s")
        except Exception as error:
            outcome = error
        finally:
            self.reference = None
            self.connection = None
        now = anyio.current_time()
        if up:
            if policy.state is ClientState.CONNECTED:  # not told by the broker (it always tells, as it closes)
                policy.lost(outcome or connection_lost_error(None), now)
            if outcome is not None:
                log.error("the connection to %s:%s ended with an error\n%s", self.host, self.port, describe(outcome))
        elif outcome is not None:
            stopped_before = policy.stopped
            policy.failed(outcome, now)
            if policy.stopped and not stopped_before:
                self._refusal = outcome
                log.warning("%s:%s refused the login (%s): stopping", self.host, self.port, outcome)
            else:
                log.info("connecting to %s:%s failed (%r)%s", self.host, self.port, outcome, self._retry(now))
        self._notify()

    def _up(self, connection: Connection, reference: RemoteReference) -> bool:
        """Logged in: hand the reference out, and take it back the moment the broker closes."""
        broker = connection.broker
        if broker.closed:  # lost between the login's answer and now
            raise connection_lost_error(broker.close_reason)

        def disconnected() -> None:
            # Run by the broker as it closes: connected() never sees a dead reference as the current one.
            self.reference = None
            self.connection = None
            now = anyio.current_time()
            self.policy.lost(connection_lost_error(broker.close_reason), now)
            if not self.policy.stopped:
                log.info(
                    "lost the connection to %s:%s (%s)%s",
                    self.host,
                    self.port,
                    self.policy.last_error,
                    self._retry(now),
                )
            self._notify()

        broker.notifyOnDisconnect(disconnected)
        self.policy.connected(anyio.current_time())
        if self.policy.state is not ClientState.CONNECTED:
            return False  # stopped meanwhile: leaving the block closes the connection
        self.reference = reference
        log.info("connected to %s:%s (%s)", self.host, self.port, connection.peer)
        self._notify()
        return True

    async def _serve(self, connection: Connection, reference: RemoteReference) -> None:
        """Run on_connect and wait for the connection to end (on_connect's task is cancelled then)."""
        async with anyio.create_task_group() as tg:
            self._call_on_connect(connection, reference, tg)
            await connection.wait_closed()
            tg.cancel_scope.cancel()  # on_connect's work was for this connection

    def _call_on_connect(self, connection: Connection, reference: RemoteReference, tg: TaskGroup) -> None:
        callback = self.on_connect
        if callback is None:
            return
        try:
            result = callback(reference)
        except Exception as error:
            self._on_connect_failed(connection, callback, error)
            return
        if inspect.isawaitable(result):
            tg.start_soon(self._await_on_connect, connection, callback, result)

    async def _await_on_connect(self, connection: Connection, callback: object, result: Awaitable[object]) -> None:
        try:
            await result
        except Exception as error:
            self._on_connect_failed(connection, callback, error)

    def _on_connect_failed(self, connection: Connection, callback: object, error: Exception) -> None:
        if connection.broker.closed and isinstance(error, PBConnectionLost):
            log.info("on_connect %.80r ended with its connection: %s", callback, error)
        else:  # as text, not exc_info: a handler keeping records would keep the frames alive
            log.error("on_connect %.80r raised; the client carries on\n%s", callback, describe(error))

    def _retry(self, now: float) -> str:
        when = self.policy.next_attempt()
        return "" if when is None else f"; trying again in {max(0.0, when - now):.2f} s"

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()
