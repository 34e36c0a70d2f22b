"""pbcore over anyio alone, on either of its backends: ``serve``, ``open_server``, ``open_connection``.

::

    import anyio, pbcore, pbcore_anyio

    async def main():
        async with pbcore_anyio.open_server(pbcore.PBServerFactory(MyRoot())) as server:
            factory = pbcore.PBClientFactory()
            async with pbcore_anyio.open_connection(factory, "127.0.0.1", server.port):
                root = await factory.getRootObject()
                with anyio.fail_after(5):
                    print(await root.callRemote("echo", "hello"))

    anyio.run(main)                      # or anyio.run(main, backend="trio")

The adapter for libraries that do not choose a backend: it uses anyio's API
only (TCP and unix sockets, TLS through ``anyio.streams.tls``). ``serve`` is
task-group friendly (``server = await task_group.start(serve, factory, ...)``);
:class:`Server` and :class:`Connection` have the shape of docs/adapters.md.
A call's result is a :class:`PendingResult`; cancelling the task that awaits
it (``anyio.move_on_after``, ``fail_after``) forgets the call, so a late
answer is dropped. Served ``async`` methods are anyio code, one task each.

Everything else is the core's: :class:`pbcore.serving.Dispatcher` starts the
calls, answers them and cancels them when the connection ends; it starts no
call while more than the broker's ``Limits.output_high_water`` bytes are
unwritten (this module's backlog counted). This module moves bytes, runs the
tasks it is handed, starts the calls that waited once its writer has written
some, stops reading from a peer while the dispatcher wants no input (calls
wait for that output to drain, or ``Limits.max_queued_calls`` wait), and
closes.

Timers are the core's too: each connection runs its broker's
:class:`pbcore.timers.ConnectionTimers` (``connection.timers``) on
``anyio.current_time()``, polling it after the connection starts, after every
read and whenever the broker has new output (in the writer task it wakes, so a
``pbtimeout`` is armed as soon as the call is made). One task per connection
sleeps in a cancel scope until the time the timers ask for, and polls then;
that deadline is brought forward when they ask for an earlier time and left
alone when they ask for a later one (each read does): woken early, the task
polls and is given the later time. The figures (handshake timeout, keepalive,
dead-peer detection) are the factory's ``timeouts``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Sequence
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketAttribute, SocketListener, TaskGroup, TaskStatus
from anyio.streams.tls import TLSStream

from pbcore.banana import DEFAULT_LIMITS
from pbcore.broker import Broker, PendingCall
from pbcore.errors import ProtocolError
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.isolation import describe
from pbcore.serving import Dispatcher
from pbcore.timers import ConnectionTimers

__all__ = [
    "CHUNK",
    "Connection",
    "HIGH_WATER",
    "PendingResult",
    "ReconnectingClient",
    "Server",
    "open_connection",
    "open_server",
    "open_unix_connection",
    "serve",
    "serve_unix",
]

#: Bytes read at a time.
CHUNK = 64 * 1024
#: The default ``Limits.output_high_water``: above that many unwritten bytes a connection stops
#: reading and starting calls; also the most written at once. (Each connection uses its broker's.)
HIGH_WATER = DEFAULT_LIMITS.output_high_water
#: How long a client leaving its ``async with`` block waits for its queued bytes to be written.
CLOSE_TIMEOUT = 5.0
#: How long a TLS handshake may take.
HANDSHAKE_TIMEOUT = 30.0
#: After a failed accept (out of file descriptors, say), the wait before the next: from the
#: first figure, doubling up to the second while it keeps failing (the figures of every adapter).
ACCEPT_BACKOFF = (0.1, 1.0)

log = logging.getLogger("pbcore.anyio")
_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class PendingResult(PendingCall):
    """A call's result: the broker settles it, anyio code awaits it (cancelling the wait forgets the call).

    It is a :class:`~pbcore.broker.PendingCall` too: ``add_callbacks`` works.
    """

    def __init__(self, on_cancel: Callable[[PendingResult], object]) -> None:
        super().__init__()
        self._on_cancel = on_cancel

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        if not self.done:
            settled = anyio.Event()  # made here, in a task: callRemote may have been called outside one
            self.add_callbacks(lambda _: settled.set(), lambda _: settled.set())
            try:
                await settled.wait()
            except anyio.get_cancelled_exc_class():
                if not self.done:
                    self._on_cancel(self)  # the broker forgets it: a late answer is dropped
                raise
        return self.unwrap()


class _Waker:
    """Runs callbacks in the event loop when asked from any thread, even a finalizer: never blocks.

    A socket pair that one task waits on (anyio has no non-blocking
    call-soon-threadsafe of its own).
    """

    def __init__(self) -> None:
        self._receiver, self._sender = socket.socketpair()
        self._receiver.setblocking(False)
        self._sender.setblocking(False)
        self._due: collections.deque[Callable[[], object]] = collections.deque()

    def call_soon(self, callback: Callable[[], object]) -> None:
        self._due.append(callback)
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway; closed: nobody to wake
            self._sender.send(b"\0")

    async def run(self) -> None:
        try:
            while True:
                await anyio.wait_readable(self._receiver)
                with contextlib.suppress(OSError):
                    self._receiver.recv(4096)
                while self._due:
                    try:
                        self._due.popleft()()
                    except Exception as error:
                        log.error("a wake-up failed\n%s", describe(error))
        finally:
            self._receiver.close()
            self._sender.close()


class Connection:
    """One PB connection over an anyio byte stream: its broker, dispatcher, reader and writer.

    :meth:`run` serves it until EOF, a stream error, bad input from the peer
    (only this connection closes), :meth:`close` or the broker closing; then
    pending calls fail with PBConnectionLost, running calls are cancelled and
    the stream is closed.
    """

    def __init__(
        self, stream: ByteStream, make_broker: Callable[..., Broker], call_soon: Callable[[Callable[[], None]], None]
    ) -> None:
        self.stream = stream
        #: The peer's address (a (host, port) tuple; a path for unix sockets).
        self.peer: Any = stream.extra(SocketAttribute.remote_address, None)
        #: Why it closed: None for EOF or a local close, else the error.
        self.close_reason: BaseException | None = None
        self._call_soon = call_soon
        self._thread = threading.get_ident()
        self._outgoing = bytearray()
        self._wanted = anyio.Event()  # set: the writer has bytes to write
        self._written = anyio.Event()  # set: the writer wrote some
        self._input_wanted = anyio.Event()  # set: the dispatcher, having held too many calls, wants more
        self._closed = anyio.Event()
        self._scope = anyio.CancelScope()
        self._write_scope = anyio.CancelScope()  # bounds the last writes once the broker closed itself
        self._task_group: TaskGroup | None = None
        self._stopping = False
        self._flush_scheduled = False
        self._deadline = math.inf  # when the timers want to be polled next (as the last poll said)
        self._wake_at = math.inf  # when the timer task polls next: never later than _deadline
        self._timer_scope: anyio.CancelScope | None = None  # the timer task's sleep, its deadline _wake_at
        self.broker = make_broker(
            pending_factory=self._new_pending,
            wake_up=self._wake_up,
            on_output=self._on_output,
            peer=self.peer,
            settled_events=False,  # only the dispatcher reads events: it wants calls
        )
        #: The broker's timers (handshake, keepalive, dead peer, call deadlines), polled by this connection.
        self.timers = ConnectionTimers(self.broker)
        keepalive = self.broker.timeouts.tcp_keepalive
        raw = stream.extra(SocketAttribute.raw_socket, None)
        if keepalive is not None and raw is not None:
            keepalive.apply(raw, socket)
        self._high_water = self.broker.limits.output_high_water
        self.dispatcher = Dispatcher(
            self.broker, self._spawn, backlog=self._unwritten, on_input_wanted=self._want_input
        )

    @property
    def backlog(self) -> int:
        """Bytes queued for the peer and not written yet."""
        return len(self._outgoing)

    def _unwritten(self) -> int:
        return len(self._outgoing)  # the dispatcher's backlog (a bound method is cheaper than the property)

    def _want_input(self) -> None:
        self._input_wanted.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Close at once (unwritten bytes are dropped, pending calls fail, running calls are cancelled)."""
        self._stop(None)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def run(self) -> None:
        """Serve the connection until it closes (see the class docstring)."""
        try:
            with self._scope:
                async with anyio.create_task_group() as self._task_group:
                    try:
                        self._task_group.start_soon(self._writer)
                        self._task_group.start_soon(self._timer)
                        self.broker.connection_made()
                        self._poll()
                        await self._reader()
                    finally:
                        # Cancelled from outside too: the calls (shielded) are cancelled through the dispatcher.
                        self._stop(self.close_reason)
        finally:
            self._outgoing.clear()
            try:
                await anyio.aclose_forcefully(self.stream)
            finally:
                self._closed.set()

    # -- inside --------------------------------------------------------------------------------

    def _stop(self, reason: BaseException | None) -> None:
        if not self._stopping:
            self._stopping = True
            self.close_reason = reason
            self._scope.cancel()  # the timer task too
            self.broker.connection_lost(reason)  # fails pending calls, cancels running ones

    def _new_pending(self) -> PendingResult:
        return PendingResult(self.broker.cancel)

    def _on_output(self) -> None:
        # Our thread, the broker consistent: take the bytes now. (Another thread: schedule it.)
        if threading.get_ident() == self._thread:
            self._flush()
        else:
            self._wake_up()

    def _wake_up(self) -> None:
        # From any thread, even a finalizer in the middle of our own code: only schedule (once).
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        if self._stopping:
            return
        data = self.broker.data_to_send()
        if data:
            self._outgoing += data
            self._wanted.set()
        if self.broker.closed:  # it closed itself (bad input, too many references, the application):
            self._wanted.set()  # the writer writes what it queued, then closes (within CLOSE_TIMEOUT)
            self._write_scope.deadline = min(self._write_scope.deadline, anyio.current_time() + CLOSE_TIMEOUT)

    async def _wait_written(self, limit: int) -> None:
        while len(self._outgoing) > limit and not self._stopping:
            if self._written.is_set():
                self._written = anyio.Event()
            await self._written.wait()

    async def _wait_to_read(self) -> None:
        # Read nothing more while the dispatcher wants no input: calls wait for the output to
        # drain, or as many wait as may (see pbcore.serving, back-pressure).
        while not self._stopping and not self.dispatcher.wants_input:
            wanted = self._input_wanted = anyio.Event()
            await wanted.wait()

    async def _reader(self) -> None:
        while True:
            await self._wait_to_read()
            try:
                data = await self.stream.receive(CHUNK)
            except anyio.EndOfStream:
                self._stop(None)
                return
            except _STREAM_ERRORS as error:
                self._stop(error)
                return
            with contextlib.suppress(ProtocolError):  # the broker closed (and logged why)
                self.broker.receive_data(data)
            self.dispatcher.dispatch(self.broker.events())
            self._poll()
            if self.broker.closed:
                await anyio.sleep_forever()  # until the writer has written what it queued and closes

    def _poll(self) -> None:
        """Run the timers now; bring the timer task's wake-up forward if they want to be polled sooner.

        Never called from inside the broker: output the timers make (a probe,
        a call from a timed-out call's callback) wakes the writer, which polls.
        """
        deadline = self.timers.poll(anyio.current_time())
        self._deadline = wake_at = math.inf if deadline is None else deadline
        # Moved earlier only: each read pushes the keepalive's deadline later, and moving a cancel scope's deadline
        # costs a timer of the event loop's. A wake-up that comes before the deadline polls (the core returns the
        # later one) and sleeps again: at most one early wake-up per deadline.
        if wake_at < self._wake_at:
            self._wake_at = wake_at
            if self._timer_scope is not None:
                self._timer_scope.deadline = wake_at

    async def _timer(self) -> None:
        # The connection's one pending wake-up: a sleep whose deadline _poll moves. Cancelled with the connection.
        while not self._stopping:
            with anyio.CancelScope(deadline=self._wake_at) as self._timer_scope:
                await anyio.sleep_forever()
            self._timer_scope = None
            self._wake_at = math.inf  # passed: the poll sets the next one
            if not self._stopping:
                self._poll()

    def _spawn(self, call: Coroutine[Any, Any, None]) -> Callable[[], object]:
        # Shielded: a call ends with its connection, through the dispatcher (which sends no answer then).
        scope = anyio.CancelScope(shield=True)
        assert self._task_group is not None
        self._task_group.start_soon(self._run_call, call, scope)
        return scope.cancel

    async def _run_call(self, call: Coroutine[Any, Any, None], scope: anyio.CancelScope) -> None:
        try:
            with scope:
                await call
        except Exception as error:  # the call answers what its method raises: a bug, kept in this connection
            log.error("%s: running a call failed\n%s", self.peer, describe(error))

    async def _writer(self) -> None:
        with self._write_scope:
            while True:
                await self._wanted.wait()
                self._wanted = anyio.Event()
                # The broker's output hook fired (_flush): poll here, once the operation that queued the output is
                # over, for callRemote records a pbtimeout only after queueing the call (and calling the hook).
                self._poll()
                while self._outgoing:
                    chunk = bytes(self._outgoing[: self._high_water])
                    try:
                        await self.stream.send(chunk)
                    except _STREAM_ERRORS as error:
                        self._stop(error)
                        return
                    del self._outgoing[: len(chunk)]
                    self._written.set()
                    if self.dispatcher.queued:
                        # Start the calls that waited for the output to drain (their answers, if plain, join
                        # _outgoing now and go out in this loop).
                        self.dispatcher.resume()
                    if self._wanted.is_set():  # output queued during a slow send: armed now, not after the backlog
                        self._poll()
                if self.broker.closed:
                    break
        self._stop(self.broker.close_reason)


# -- servers ---------------------------------------------------------------------------------


class Server:
    """What :func:`serve` hands to ``task_group.start``: its listeners and live connections."""

    def __init__(self, listeners: Sequence[SocketListener]) -> None:
        self.listeners = list(listeners)
        self.connections: set[Connection] = set()
        self._accepting = anyio.CancelScope()
        self._grace = 0.0
        self._closed = anyio.Event()

    @property
    def port(self) -> int:
        """The first listener's port (TCP): the bound one when asked for port 0."""
        port: int = self.listeners[0].extra(SocketAttribute.local_port)
        return port

    @property
    def addresses(self) -> list[Any]:
        """Every listener's socket name."""
        return [listener.extra(SocketAttribute.local_address) for listener in self.listeners]

    def close(self, grace: float = 0.0) -> None:
        """Stop accepting now; after up to *grace* seconds for running calls to finish, close every connection."""
        self._grace = grace
        self._accepting.cancel()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def aclose(self, grace: float = 0.0) -> None:
        self.close(grace)
        await self.wait_closed()

    async def serve_forever(self) -> None:
        """Wait until the server is closed."""
        await self.wait_closed()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _accept(self, listener: SocketListener, handle: Callable[[ByteStream], Any], tg: TaskGroup) -> None:
        backoff = 0.0
        while True:
            try:
                stream = await listener.accept()
            except anyio.ClosedResourceError:
                return
            except (OSError, anyio.BrokenResourceError) as error:  # EMFILE, ENFILE, ENOBUFS, ENOMEM...
                # On trio, anyio says BrokenResourceError (with no message) from the OSError.
                reason = error.__cause__ if isinstance(error.__cause__, OSError) else error
                backoff = min(ACCEPT_BACKOFF[1], 2 * backoff) if backoff else ACCEPT_BACKOFF[0]
                log.warning("accepting a connection failed (%s); trying again in %.1f s", reason, backoff)
                await anyio.sleep(backoff)
                continue
            backoff = 0.0
            tg.start_soon(handle, stream)

    async def _handle(
        self, factory: PBServerFactory, ssl_context: ssl.SSLContext | None, waker: _Waker, stream: ByteStream
    ) -> None:
        peer = stream.extra(SocketAttribute.remote_address, None)
        try:
            if ssl_context is not None:
                try:
                    stream = await _start_tls(stream, ssl_context, None)
                except Exception as error:
                    log.warning("the TLS handshake with %s failed: %r", peer, error)
                    return
            connection = Connection(stream, factory.make_broker, waker.call_soon)
        except Exception as error:  # the application's rootObject(), say
            log.error("could not serve %s\n%s", peer, describe(error))
            await anyio.aclose_forcefully(stream)
            return
        log.debug("accepted a connection from %s", peer)
        self.connections.add(connection)
        try:
            await connection.run()
        except Exception as error:
            log.error("serving %s failed\n%s", peer, describe(error))
        finally:
            self.connections.discard(connection)
            log.debug("the connection from %s closed (%s)", peer, connection.close_reason or "no error")

    async def _shut_down(self, tg: TaskGroup) -> None:
        with anyio.move_on_after(self._grace):  # for the running calls to end, and their answers to go out
            for connection in list(self.connections):
                while connection.dispatcher.running:
                    await anyio.sleep(0.01)
                await connection._wait_written(0)
        for connection in list(self.connections):
            connection.close()
        tg.cancel_scope.cancel()  # TLS handshakes under way, the waker


async def _serve(
    factory: PBServerFactory,
    listeners: Sequence[SocketListener],
    ssl_context: ssl.SSLContext | None,
    task_status: TaskStatus[Server],
) -> None:
    server = Server(listeners)
    waker = _Waker()
    handle = functools.partial(server._handle, factory, ssl_context, waker)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(waker.run)
            try:
                with server._accepting:
                    async with anyio.create_task_group() as accepting:
                        for listener in server.listeners:
                            accepting.start_soon(server._accept, listener, handle, tg)
                        task_status.started(server)
            finally:
                for listener in server.listeners:
                    await anyio.aclose_forcefully(listener)
            await server._shut_down(tg)
    finally:
        server._closed.set()


async def serve(
    factory: PBServerFactory,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
    backlog: int = 128,
    task_status: TaskStatus[Server] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *factory* on TCP *host*:*port* (TLS with *ssl_context*) until closed or cancelled."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port, backlog=backlog)
    sockets = [each for each in listener.listeners if isinstance(each, SocketListener)]
    await _serve(factory, sockets, ssl_context, task_status)


async def serve_unix(
    factory: PBServerFactory,
    path: str | os.PathLike[str],
    *,
    ssl_context: ssl.SSLContext | None = None,
    backlog: int = 128,
    task_status: TaskStatus[Server] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *factory* on a unix socket at *path* (removed when serving stops)."""
    listener = await anyio.create_unix_listener(path, backlog=backlog)
    try:
        await _serve(factory, [listener], ssl_context, task_status)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextlib.asynccontextmanager
async def open_server(
    factory: PBServerFactory,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
    backlog: int = 128,
) -> AsyncIterator[Server]:
    """:func:`serve` for the duration of an ``async with`` block (closed on exit)."""
    raised: BaseException | None = None
    async with anyio.create_task_group() as tg:
        server: Server = await tg.start(
            functools.partial(serve, factory, host, port, ssl_context=ssl_context, backlog=backlog)
        )
        try:
            yield server
        except BaseException as error:  # raised again outside, not wrapped in an ExceptionGroup
            raised = error
        server.close()
    if raised is not None:
        raise raised


# -- clients ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _client(factory: PBClientFactory, stream: ByteStream) -> AsyncIterator[Connection]:
    def close() -> None:
        connection.close()  # the broker is made inside Connection(): look the name up later

    waker = _Waker()
    connection = Connection(stream, functools.partial(factory.make_broker, close), waker.call_soon)
    raised: BaseException | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(waker.run)
        tg.start_soon(connection.run)
        try:
            yield connection
        except BaseException as error:  # raised again outside, not wrapped in an ExceptionGroup
            raised = error
        else:
            with anyio.move_on_after(CLOSE_TIMEOUT):
                connection._flush()
                await connection._wait_written(0)
        connection.close()
        tg.cancel_scope.cancel()
    if raised is not None:
        raise raised


async def _start_tls(stream: ByteStream, ssl_context: ssl.SSLContext, hostname: str | None) -> ByteStream:
    """TLS over *stream*: the server side when *hostname* is None; *stream* is closed if it fails."""
    try:
        with anyio.fail_after(HANDSHAKE_TIMEOUT):
            return await TLSStream.wrap(
                stream,
                server_side=hostname is None,
                hostname=hostname,
                ssl_context=ssl_context,
                standard_compatible=False,
            )
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise


@contextlib.asynccontextmanager
async def open_connection(
    factory: PBClientFactory,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> AsyncIterator[Connection]:
    """Connect *factory* over TCP (TLS with *ssl_context*); inside, ``await factory.getRootObject()`` works.

    On a normal exit, queued bytes are written (for up to :data:`CLOSE_TIMEOUT`
    seconds) before the connection closes; on an exception it closes at once.
    """
    stream: ByteStream = await anyio.connect_tcp(host, port)
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
    stream: ByteStream = await anyio.connect_unix(path)
    if ssl_context is not None:
        stream = await _start_tls(stream, ssl_context, server_hostname or "localhost")
    async with _client(factory, stream) as connection:
        yield connection


# At the end: the reconnecting client is built on what this module defines.
from .reconnect import ReconnectingClient  # noqa: E402
