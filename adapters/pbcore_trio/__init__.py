"""pbcore over trio: ``serve()`` and ``open_connection()`` (TCP, TLS, unix sockets).

::

    import pbcore, pbcore_trio, trio

    async def main():
        async with trio.open_nursery() as nursery:
            server = await nursery.start(pbcore_trio.serve, pbcore.PBServerFactory(MyRoot()), "127.0.0.1", 0)
            factory = pbcore.PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                with trio.fail_after(5):
                    print(await root.callRemote("echo", "hello"))
            server.close()

``serve`` is nursery friendly: ``await nursery.start(serve, ...)`` returns a
:class:`Server` once it is listening (``server.port`` is the bound port,
``server.listeners`` trio's listeners, ``server.connections`` the live
:class:`Connection` objects); it serves until cancelled or
:meth:`Server.close`, and each connection runs in its own task. A call's result
is a :class:`PendingResult` that trio awaits; cancelling the awaiting task
(``trio.move_on_after``, ``trio.fail_after``) forgets the call, so a late
answer is dropped. Remote methods may be ``async`` (trio code): a plain
method is answered at once, an async one goes on in a task of its own, so a
slow method does not hold up the others.

This is also the adapter for anyio applications on the trio backend (they run
on trio, so everything here works unchanged under ``anyio.run(...,
backend="trio")``). An anyio application on the asyncio backend uses
``pbcore_asyncio`` instead.

Memory stays bounded when a peer stops reading: bytes go out through the
stream's ``send_all`` up to :data:`HIGH_WATER` at a time, and while more than
:data:`HIGH_WATER` bytes wait to be written this side stops reading from the
peer and starts no new call; at most :data:`MAX_CONCURRENT_CALLS` async calls
of one connection run at once (the next waits, and so does reading). A peer that
sends garbage gets its own connection closed; the others go on. (Back-pressure
has its price: two peers that both send more than they read, beyond
:data:`HIGH_WATER` and the sockets' buffers, wait for each other for ever;
likewise a connection with :data:`MAX_CONCURRENT_CALLS` calls all waiting for
answers that come after the next call. Bound such waits with
``trio.fail_after``.)

Ordering is Twisted's: calls are invoked in the order they arrived, and a task
awaiting an answer wakes up only after the calls that arrived before that
answer (a cache's ``observe_`` update, say) have been invoked.

All the protocol lives in :mod:`pbcore`; this module moves bytes, runs calls
with :func:`pbcore.broker.serve_call` and wires the broker's wake-up to trio.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from typing import Any

import trio

from pbcore.broker import Broker, serve_call
from pbcore.errors import ProtocolError
from pbcore.events import CallReceived
from pbcore.factory import PBClientFactory, PBServerFactory

__all__ = [
    "CHUNK",
    "CLOSE_TIMEOUT",
    "HIGH_WATER",
    "MAX_CONCURRENT_CALLS",
    "Connection",
    "PendingResult",
    "Server",
    "open_connection",
    "open_unix_connection",
    "serve",
    "serve_listeners",
    "serve_unix",
]

#: Bytes read at a time.
CHUNK = 64 * 1024
#: Above this many unwritten bytes, a connection stops reading and starting calls;
#: also the most written at once.
HIGH_WATER = 256 * 1024
#: Async calls one connection runs at once; the next one (and reading) waits for a free slot.
#: Large, because a call may wait for an answer from the peer that is queued behind
#: the calls that wait for a slot: only past this many such calls does that stall.
MAX_CONCURRENT_CALLS = 1000
#: How long :meth:`Connection.aclose` waits for queued bytes to be written.
CLOSE_TIMEOUT = 5.0

log = logging.getLogger(__name__)
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class PendingResult:
    """A call's result: the broker settles it, trio awaits it.

    Cancelling the task that awaits it calls *on_cancel* (the connection makes
    the broker forget the call, so a late answer is dropped). *on_settle*, if
    given, decides when the awaiting task wakes up (by calling :meth:`wake`).
    """

    def __init__(
        self,
        on_cancel: Callable[[PendingResult], object] | None = None,
        on_settle: Callable[[PendingResult], object] | None = None,
    ) -> None:
        self._on_cancel = on_cancel
        self._on_settle = on_settle
        self._event = trio.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self.done = False

    def resolve(self, value: Any) -> None:
        if not self.done:
            self.done, self._value = True, value
            self._settled()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done, self._error = True, error
            self._settled()

    def _settled(self) -> None:
        if self._on_settle is None:
            self.wake()
        else:
            self._on_settle(self)

    def wake(self) -> None:
        """Let the awaiting task go on."""
        self._event.set()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        if not self._event.is_set():
            try:
                await self._event.wait()
            except trio.Cancelled:
                if not self.done and self._on_cancel is not None:
                    self._on_cancel(self)
                raise
        if self._error is not None:
            raise self._error
        return self._value


class Connection:
    """One PB connection over a trio stream: its broker, a reader, a writer and the calls it runs.

    :meth:`run` serves it until EOF, a stream error, bad input from the peer
    (a ProtocolError: only this connection closes) or :meth:`close`; then the
    calls still waiting fail with PBConnectionLost, the calls still running are
    cancelled and the stream is closed.
    """

    def __init__(self, stream: trio.abc.Stream, make_broker: Callable[..., Broker]) -> None:
        self.stream = stream
        self._token = trio.lowlevel.current_trio_token()
        self._outgoing = bytearray()
        self._wanted = trio.Event()  # set: the writer has bytes to write
        self._progress = trio.Event()  # set: the writer wrote a chunk, or the connection stops
        self._slots = trio.Semaphore(MAX_CONCURRENT_CALLS)
        self._scope = trio.CancelScope()
        self._stopping = False
        self._flush_scheduled = False
        # True while our own code drives the broker synchronously and flushes right after.
        self._flush_follows = False
        self._thread = threading.get_ident()
        # While the reader handles what one chunk brought, settled results wait
        # here: their tasks wake up once the calls that came before the answer
        # (a cache's observe_ update, say) have started, as in Twisted.
        self._held: list[PendingResult] | None = None
        #: Set once the connection is closed.
        self.closed = trio.Event()
        #: Why it closed: None for EOF or a local close, else the error.
        self.close_reason: BaseException | None = None
        self.broker = make_broker(
            pending_factory=self._new_pending, wake_up=self._wake_up, on_output=self._output_queued
        )

    @property
    def backlog(self) -> int:
        """Bytes queued for the peer and not written yet."""
        return len(self._outgoing)

    def close(self) -> None:
        """Close now (unwritten bytes are dropped; pending calls fail with PBConnectionLost)."""
        self._stop(None)

    async def aclose(self) -> None:
        """Write what is queued (for up to :data:`CLOSE_TIMEOUT` seconds), close, and wait until closed."""
        try:
            self._flush()
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._wait_backlog(0)
        finally:
            self._stop(None)
        await self.closed.wait()

    async def wait_closed(self) -> None:
        await self.closed.wait()

    async def run(self) -> None:
        """Serve the connection until it closes (see the class docstring)."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self.broker.connection_made()
                    self._flush()
                    nursery.start_soon(self._writer)
                    await self._reader(nursery)
        finally:
            self._stopping = True
            self.broker.connection_lost(self.close_reason)  # once; pending calls fail
            self.broker.events()
            self._outgoing.clear()
            self.closed.set()
            await trio.aclose_forcefully(self.stream)

    # -- inside --------------------------------------------------------------------------------

    def _stop(self, reason: BaseException | None) -> None:
        if not self._stopping:
            self._stopping = True
            self.close_reason = reason
            self._progress.set()
            self._scope.cancel()

    def _new_pending(self) -> PendingResult:
        return PendingResult(self.broker.cancel, self._settled)

    def _settled(self, pending: PendingResult) -> None:
        if self._held is None:
            pending.wake()
        else:
            self._held.append(pending)

    def _release_held(self) -> None:
        held, self._held = self._held or [], None
        for pending in held:
            pending.wake()

    def _wake_up(self) -> None:
        # The broker has something new to send. Called from any thread, even
        # from a finalizer in the middle of our own code: only schedule (once).
        if self._flush_follows and threading.get_ident() == self._thread:
            return  # our own code is driving the broker and flushes next
        if not self._flush_scheduled:
            self._flush_scheduled = True
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._scheduled_flush)

    def _output_queued(self) -> None:
        # The application (a call, a late answer) queued output, and the
        # broker is consistent: hand it to the writer now, sparing the
        # wake-up's trip through trio's wake-up socket on every call.
        if threading.get_ident() != self._thread:
            self._wake_up()
        elif not self._flush_follows:
            self._flush()

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        """Take what the broker has to send; the writer task writes it."""
        if self._stopping:
            return
        data = self.broker.data_to_send()
        if data:
            self._outgoing += data
            self._wanted.set()
        if self.broker.closed:  # it closed itself (a peer over MAX_BROKER_REFS)
            self._stop(self.broker.close_reason)

    async def _wait_backlog(self, limit: int) -> None:
        while len(self._outgoing) > limit and not self._stopping:
            self._progress = trio.Event()
            await self._progress.wait()

    async def _reader(self, nursery: trio.Nursery) -> None:
        while True:
            await self._wait_backlog(HIGH_WATER)
            try:
                data = await self.stream.receive_some(CHUNK)
            except _STREAM_ERRORS as error:
                self._stop(error)
                return
            if not data:  # EOF
                self._stop(None)
                return
            self._held = []
            self._flush_follows = True
            try:
                self.broker.receive_data(data if isinstance(data, bytes) else bytes(data))
            except ProtocolError as error:
                # The broker has closed (pending calls failed); drop this connection only.
                log.info("pbcore_trio: closing a connection after bad input: %s", error)
                self._release_held()
                self._stop(error)
                return
            finally:
                self._flush_follows = False
            self._flush()
            try:
                await self._start_calls(nursery)
            finally:
                self._release_held()
            self._flush()

    async def _start_calls(self, nursery: trio.Nursery) -> None:
        # A function of its own, so that no event (holding a result, which may
        # be a reference the application has dropped since) outlives the loop.
        for event in self.broker.events():
            if not isinstance(event, CallReceived) or self.broker.closed:
                continue
            if len(self._outgoing) > HIGH_WATER:
                self._release_held()  # keep nobody waiting on us while we wait
                await self._wait_backlog(HIGH_WATER)
            # The method runs now, in arrival order; a plain result is answered at once.
            self._flush_follows = True
            try:
                rest = serve_call(self.broker, event)
            finally:
                self._flush_follows = False
            if rest is not None:
                if self._slots.value == 0:
                    self._release_held()
                await self._slots.acquire()
                # start() returns once the coroutine has run up to its first
                # checkpoint, so async methods also begin in arrival order.
                await nursery.start(self._finish_call, rest, event.method)
            self._flush()

    async def _finish_call(
        self,
        rest: Coroutine[Any, Any, None],
        method: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        try:
            await rest
        except Exception:  # serve_call answers what methods raise: this is a failure to answer
            log.exception("pbcore_trio: could not answer a call of %s", method)
        finally:
            self._slots.release()
            self._flush()

    async def _writer(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            while self._outgoing:
                chunk = self._outgoing[:HIGH_WATER]  # a large message in one send
                try:
                    await self.stream.send_all(chunk)
                except _STREAM_ERRORS as error:
                    self._stop(error)
                    return
                del self._outgoing[: len(chunk)]
                self._progress.set()


# -- servers ---------------------------------------------------------------------------------


class Server:
    """What :func:`serve` hands to ``nursery.start``: its listeners and live connections."""

    def __init__(self, listeners: list[trio.abc.Listener[trio.abc.Stream]]) -> None:
        self.listeners = listeners
        self.connections: set[Connection] = set()
        self._scope = trio.CancelScope()

    @property
    def port(self) -> int:
        """The port of the first listener (TCP only): the bound one when asked for port 0."""
        listener: Any = self.listeners[0]
        listener = getattr(listener, "transport_listener", listener)  # under trio.SSLListener
        port: int = listener.socket.getsockname()[1]
        return port

    def close(self) -> None:
        """Stop listening and close every connection (serve() then returns)."""
        self._scope.cancel()


async def serve_listeners(
    factory: PBServerFactory,
    listeners: list[trio.abc.Listener[trio.abc.Stream]],
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *factory* on listeners you made (TLS over them with *ssl_context*)."""
    if ssl_context is not None:
        listeners = [trio.SSLListener(listener, ssl_context, https_compatible=False) for listener in listeners]
    server = Server(listeners)

    async def handle(stream: trio.abc.Stream) -> None:
        connection = Connection(stream, factory.make_broker)
        server.connections.add(connection)
        try:
            await connection.run()
        finally:
            server.connections.discard(connection)

    try:
        with server._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(trio.serve_listeners, handle, listeners, handler_nursery=nursery))
                task_status.started(server)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def serve(
    factory: PBServerFactory,
    host: str | None,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    backlog: int | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *factory* on TCP *host*:*port* (port 0: a free one; TLS with *ssl_context*) until cancelled."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    await serve_listeners(factory, list(listeners), ssl_context=ssl_context, task_status=task_status)


async def serve_unix(
    factory: PBServerFactory,
    path: str | os.PathLike[str],
    *,
    ssl_context: ssl.SSLContext | None = None,
    backlog: int = 128,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *factory* on a unix socket at *path* (removed again when serving stops)."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(path))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    try:
        listener: trio.abc.Listener[trio.abc.Stream] = trio.SocketListener(sock)
        await serve_listeners(factory, [listener], ssl_context=ssl_context, task_status=task_status)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


# -- clients ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _client(factory: PBClientFactory, stream: trio.abc.Stream) -> AsyncIterator[Connection]:
    def close() -> None:
        connection.close()  # make_broker runs inside Connection(): look the name up later

    def make_broker(**options: Any) -> Broker:
        return factory.make_broker(close=close, **options)

    connection = Connection(stream, make_broker)
    raised: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        try:
            yield connection
        except BaseException as error:
            # Raised again outside the nursery, so that it is not wrapped in an ExceptionGroup.
            raised = error
            connection.close()
        else:
            await connection.aclose()
    if raised is not None:
        raise raised


async def _start_tls(stream: trio.abc.Stream, context: ssl.SSLContext, server_hostname: str) -> trio.SSLStream[Any]:
    tls = trio.SSLStream(stream, context, server_hostname=server_hostname, https_compatible=False)
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


@contextlib.asynccontextmanager
async def open_connection(
    factory: PBClientFactory,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> AsyncIterator[Connection]:
    """Connect *factory* to a PB server over TCP (TLS with *ssl_context*); closes on exit.

    Inside the block, ``await factory.getRootObject()`` and ``await
    factory.login(...)`` work; on exit queued bytes are written (bounded) and
    the connection is closed.
    """
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if ssl_context is not None:
        stream = await _start_tls(stream, ssl_context, server_hostname or host)
    async with _client(factory, stream) as connection:
        yield connection


@contextlib.asynccontextmanager
async def open_unix_connection(
    factory: PBClientFactory,
    path: str | os.PathLike[str],
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> AsyncIterator[Connection]:
    """Connect *factory* to a PB server on a unix socket; closes on exit."""
    stream: trio.abc.Stream = await trio.open_unix_socket(os.fspath(path))
    if ssl_context is not None:
        stream = await _start_tls(stream, ssl_context, server_hostname or "localhost")
    async with _client(factory, stream) as connection:
        yield connection
