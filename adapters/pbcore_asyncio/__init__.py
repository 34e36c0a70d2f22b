"""pbcore over asyncio: ``serve()`` and ``connect()`` (TCP, TLS, unix sockets).

::

    import pbcore, pbcore_asyncio

    async with await pbcore_asyncio.serve(pbcore.PBServerFactory(MyRoot())) as server:
        factory = pbcore.PBClientFactory()
        async with await pbcore_asyncio.connect(factory, "127.0.0.1", server.port):
            root = await factory.getRootObject()
            print(await root.callRemote("echo", "hello"))

A call's result is an :class:`asyncio.Future`; ``asyncio.wait_for(ref.callRemote(...),
timeout)`` and task cancellation cancel it, and a late answer is dropped.
Remote methods may be ``async``: each served call runs in a task of its own,
which is cancelled if its connection ends first. An anyio application on the
asyncio backend may use it too (``pbcore_anyio`` runs on either backend). It
uses only the event loop's public API, so it runs on uvloop too.

The protocol and the call policy live in :mod:`pbcore` (the rules are in
docs/adapters.md): this module moves bytes, runs the calls
:class:`pbcore.serving.Dispatcher` hands it, closes, and keeps track of a
server's connections.

Timers: each connection runs its broker's :class:`pbcore.timers.ConnectionTimers`
(``connection.timers``; the figures are the factory's ``timeouts=``), polled
with ``loop.time()`` once the connection is made, after every read, whenever
the broker has new output (so that ``callRemote(..., pbtimeout=s)`` is armed at
once), and at the deadline a poll returns, for which the connection keeps one
``loop.call_at`` wake-up. It is moved only for an earlier deadline: a later one
(each read moves the idle deadline on) is found when the wake-up, early then,
polls. The core decides what is due (a handshake timeout, a keepalive probe, a
dead peer, a call's deadline); a timer that closes the broker closes the
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
import sys
import threading
from asyncio.constants import ACCEPT_RETRY_DELAY
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, cast

from pbcore.broker import Broker
from pbcore.errors import ProtocolError
from pbcore.events import CallReceived
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.serving import Dispatcher
from pbcore.timers import ConnectionTimers

__all__ = [
    "CLOSE_TIMEOUT",
    "Connection",
    "PendingFuture",
    "READ_SIZE",
    "ReconnectingClient",
    "Server",
    "WRITE_SIZE",
    "connect",
    "connect_unix",
    "serve",
    "serve_unix",
]

log = logging.getLogger("pbcore.asyncio")

#: Bytes read at most at once, into one buffer reused for the connection's life.
READ_SIZE = 64 * 1024
#: Answers collected while serving a batch of calls are written once they reach this.
WRITE_SIZE = 64 * 1024
#: Seconds a closed connection may take to hand its last bytes to a peer that
#: does not read them before the socket is dropped.
CLOSE_TIMEOUT = 5.0


_buffers = threading.local()


def _thread_read_buffer() -> memoryview:
    buffer: memoryview | None = getattr(_buffers, "read", None)
    if buffer is None:
        buffer = _buffers.read = memoryview(bytearray(READ_SIZE))
    return buffer


class PendingFuture(asyncio.Future[Any]):
    """A call's result: an asyncio Future the broker settles.

    Cancelling it (``cancel()``, ``asyncio.wait_for``, or cancelling the task
    awaiting it) tells the broker at once to stop waiting for the call: a
    late answer is dropped.
    """

    # A hook on cancel() rather than a done-callback: a callback would be scheduled on
    # the loop for every call answered, only to find it was not cancelled.
    # (A slot, set by the connection that makes it: no instance dict, no __init__ in Python.)
    __slots__ = ("_broker",)
    _broker: Broker | None

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        broker = getattr(self, "_broker", None)
        if broker is not None:
            self._broker = None
            broker.cancel(self)
        return True

    def resolve(self, value: Any) -> None:
        self._broker = None  # a settled result kept by the application keeps no connection alive
        if not self.done():
            self.set_result(value)

    def fail(self, error: BaseException) -> None:
        self._broker = None
        if not self.done():
            self.set_exception(error)


class Connection(asyncio.BufferedProtocol):
    """One PB connection, client or server side: ``.broker``, ``.dispatcher``, ``.peer``.

    ``close()`` closes it at once (pending calls fail with PBConnectionLost,
    served calls still running are cancelled); ``await wait_closed()``;
    ``async with connection:`` closes on exit.

    Back-pressure: the transport's write buffer pauses at the broker's
    ``Limits.output_high_water``, which is also where the dispatcher stops
    starting calls (it counts that buffer and the broker's unwritten output, see
    :mod:`pbcore.serving`). Nothing more is read from the peer while calls of
    its wait for that output (or the dispatcher holds
    ``Limits.max_queued_calls`` calls), never for a full output alone: the
    answers to this side's own calls still come in. The calls waiting start
    as the output drains.
    """

    def __init__(self, make_broker: Callable[..., Broker], server: Server | None = None) -> None:
        self._make_broker = make_broker
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.transport: asyncio.Transport | None = None
        #: The peer's address (``transport.get_extra_info("peername")``), also ``broker.peer``.
        self.peer: Any = None
        self._broker: Broker | None = None
        self._dispatcher: Dispatcher | None = None
        self._timers: ConnectionTimers | None = None
        self._deadline: float | None = None  # when the wake-up below is due
        self._wake: asyncio.TimerHandle | None = None  # the one pending timers' wake-up
        self._busy = False  # feeding the broker: its output is written at the end
        self._reading = True  # what _update_reading last told the transport
        self._flush_scheduled = False
        # Output taken from the broker as soon as it is queued (so that it
        # survives the broker closing itself), written once per batch.
        self._idle: asyncio.Future[None] | None = None  # set once no served call runs
        self._abort: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()
        # A buffer of our own: asyncio's default reads allocate (and glibc may
        # map and unmap) a fresh 256 KiB buffer for every read. One per thread,
        # shared by its loop's connections: a read is handled (and what the
        # broker keeps copied) before the loop reads again, so an idle
        # connection costs no buffer.
        self._read_buffer = _thread_read_buffer()

    @property
    def broker(self) -> Broker:
        """This connection's broker."""
        if self._broker is None:
            raise RuntimeError("the connection is not made yet")
        return self._broker

    @property
    def dispatcher(self) -> Dispatcher:
        """The dispatcher running the calls the peer makes (``dispatcher.running``: the async ones)."""
        if self._dispatcher is None:
            raise RuntimeError("the connection is not made yet")
        return self._dispatcher

    @property
    def timers(self) -> ConnectionTimers:
        """The broker's timers (handshake, keepalive, dead peer, call deadlines), run by this connection."""
        if self._timers is None:
            raise RuntimeError("the connection is not made yet")
        return self._timers

    # -- asyncio.BufferedProtocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the Transport methods without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        broker = self._broker = self._make_broker(
            pending_factory=self._new_pending,
            wake_up=self._wake_up,
            on_output=self._output_queued,
            peer=self.peer,
            settled_events=False,
        )
        keepalive, sock = broker.timeouts.tcp_keepalive, transport.get_extra_info("socket")
        if keepalive is not None and sock is not None:
            keepalive.apply(sock, socket)
        self._timers = ConnectionTimers(broker)
        # The transport pauses writing where the dispatcher stops starting calls: one figure, the core's.
        self.transport.set_write_buffer_limits(high=broker.limits.output_high_water)
        self._dispatcher = Dispatcher(
            broker, self._spawn, backlog=self._unwritten, on_input_wanted=self._update_reading
        )
        server = self._server
        if server is not None:
            log.debug("accepted a connection from %s", self.peer)
            server.connections.add(self)
        else:
            log.debug("connected to %s", self.peer)
        self._busy = True
        try:
            broker.connection_made()
        finally:
            self._busy = False
        self._flush()
        if server is not None and server.closing:
            self.close()  # accepted just before the server closed

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        broker, dispatcher = self._broker, self._dispatcher
        assert broker is not None and dispatcher is not None
        self._busy = True
        try:
            try:
                broker.receive_data(self._read_buffer[:nbytes])  # the broker copies what it keeps
            except ProtocolError:
                # The broker has closed (and logged why); so does the transport.
                broker.events()
                self._close_transport()
                return
            for event in broker.events():
                if isinstance(event, CallReceived):
                    dispatcher.dispatch((event,))
                    # Answers go out together, in one write per batch of
                    # calls; but a batch that has collected enough is written
                    # now, so that the transport can pause reading early.
                    if broker.bytes_to_send >= WRITE_SIZE:
                        self._flush()
        finally:
            self._busy = False
        self._flush()
        if not dispatcher.wants_input:
            self._update_reading()

    def eof_received(self) -> bool | None:
        return None  # close the transport: PB has no half-open state

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort is not None:
            self._abort.cancel()
        self._cancel_wake()
        broker = self._broker
        if broker is not None:
            broker.connection_lost(exc)  # fails pending calls, cancels running ones
            broker.events()
        self._wake_idle()
        if self._server is not None:
            self._server.connections.discard(self)
        log.debug("the connection with %s closed%s", self.peer, "" if exc is None else f": {exc}")
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        # The peer is not reading: no call starts now (the dispatcher counts the transport's
        # buffer), and reading stops once one waits (see pbcore.serving, back-pressure).
        self._update_reading()

    def resume_writing(self) -> None:
        self._schedule_flush()  # which starts the calls that waited for the output to drain

    def _update_reading(self) -> None:
        # The one place that pauses and resumes reading: when the dispatcher wants no input
        # (calls wait for the output to drain, or too many wait); it calls this again then.
        transport, dispatcher = self.transport, self._dispatcher
        if transport is None or dispatcher is None or transport.is_closing():
            return
        wanted = dispatcher.wants_input
        if wanted != self._reading:
            self._reading = wanted
            if wanted:
                transport.resume_reading()
            else:
                transport.pause_reading()

    # -- the connection ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection at once (what was sent before still goes out)."""
        broker = self._broker
        if broker is None:
            return
        if not broker.closed:
            self._flush()
            broker.connection_lost(None)  # then the broker tells us (_output_queued)
        self._close_transport()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed."""
        await asyncio.shield(self._closed)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        side = "client" if self._server is None else "server"
        return f"<pbcore_asyncio.Connection {side} peer={self.peer!r}>"

    # -- calls --------------------------------------------------------------------------------

    def _spawn(self, call: Coroutine[Any, Any, None]) -> Callable[[], object]:
        # The dispatcher's hook: run a served async call in a task of its own.
        return self._loop.create_task(self._serve(call)).cancel

    async def _serve(self, call: Coroutine[Any, Any, None]) -> None:
        try:
            await call
        finally:
            if self._idle is not None and not self.dispatcher.running:
                self._wake_idle()
        self._flush()

    async def _wait_idle(self) -> None:
        """Wait until no served call is running (or the connection is closed)."""
        while self._dispatcher is not None and self._dispatcher.running and not self._closed.done():
            if self._idle is None:
                self._idle = self._loop.create_future()
            await self._idle

    def _wake_idle(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)

    # -- pending results ------------------------------------------------------------------

    def _new_pending(self) -> PendingFuture:
        pending = PendingFuture(loop=self._loop)
        pending._broker = self._broker
        return pending

    # -- output -----------------------------------------------------------------------------

    def _flush(self) -> None:
        # After connection_made, after every read, on the broker's output hook
        # (a flush scheduled from it) and at the timers' deadline: run the
        # timers, then write what the broker has.
        self._flush_scheduled = False
        broker, transport = self._broker, self.transport
        if broker is None or transport is None:
            return
        if not broker.closed:
            self._poll()
        if broker.closed:
            self._close_transport()
            return
        if transport.is_closing():
            return
        self._write(transport, broker)
        # The output has drained (some): start the calls that waited for it. A
        # write the kernel took whole pauses nothing, so no resume_writing would
        # come: go on while the output is under the high-water mark.
        dispatcher = self._dispatcher
        assert dispatcher is not None
        while dispatcher.queued and not dispatcher.output_full and not broker.closed and not transport.is_closing():
            queued = dispatcher.queued
            busy, self._busy = self._busy, True  # the answers go out in one write, below
            try:
                dispatcher.resume()
            finally:
                self._busy = busy
            self._write(transport, broker)
            if dispatcher.queued >= queued:
                break  # they wait for an async call's first step, not for the output
        if broker.closed:
            self._close_transport()

    def _write(self, transport: asyncio.Transport, broker: Broker) -> None:
        data = broker.data_to_send()  # and the releases queued from other threads
        if data:
            transport.write(data)

    def _unwritten(self) -> int:
        # The dispatcher's backlog: what this side holds unwritten (the broker's own output it counts itself).
        transport = self.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def _close_transport(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._closed.done():
            return
        if self._broker is not None:
            data = self._broker.data_to_send()  # after broker.close(), what it had queued
            if data:  # what was sent before the broker closed still goes out
                transport.write(data)
        self._cancel_wake()
        transport.close()
        # close() waits for the write buffer to drain: not forever.
        self._abort = self._loop.call_later(CLOSE_TIMEOUT, transport.abort)

    # -- timers ------------------------------------------------------------------------------

    def _poll(self) -> None:
        timers = self._timers
        assert timers is not None
        busy, self._busy = self._busy, True  # a probe's bytes go out with this flush
        try:
            deadline = timers.poll(self._loop.time())
        finally:
            self._busy = busy
        # Most polls leave the wake-up alone: the same deadline, or a later one
        # (every read moves the idle deadline on), which the wake-up, early
        # then, finds when it polls. Only an earlier deadline moves it.
        if deadline is None:
            if self._wake is not None:
                self._cancel_wake()
        elif self._deadline is None or deadline < self._deadline:
            self._cancel_wake()
            self._wake = self._loop.call_at(deadline, self._deadline_passed)
            self._deadline = deadline

    def _deadline_passed(self) -> None:
        # Forget the deadline: poll returns the next one (the same one if the
        # loop woke a little early), and the wake-up is made anew.
        self._wake = self._deadline = None
        self._flush()

    def _cancel_wake(self) -> None:
        wake, self._wake, self._deadline = self._wake, None, None
        if wake is not None:
            wake.cancel()

    def _output_queued(self) -> None:
        # The broker, in the loop's thread, has new output (or has closed).
        broker = self._broker
        if broker is None:
            return
        if broker.closed:
            self._close_transport()
            return
        # The broker holds it until the flush, which writes everything queued by then at once
        # (a window of calls, a read's answers): a busy flush follows anyway.
        if not self._busy:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _wake_up(self) -> None:
        # A finalizer queued a decref: only schedule a flush (it may run in
        # the middle of the broker's work, where the broker must not be used).
        # From another thread go through the thread-safe path; a closed loop
        # raises RuntimeError, and then the connection is gone anyway.
        if threading.get_ident() != self._loop_thread:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._flush)
        else:
            self._schedule_flush()


# -- servers -------------------------------------------------------------------------------------

#: What accept() fails with when the process or the system is out of something (asyncio pauses then).
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Listener(socket.socket):
    """A listening socket that ends asyncio's run of accepts at its first failure for want of resources.

    Out of descriptors (or buffers, or memory), asyncio's selector loops (3.10 to
    3.13; CPython gh-151615) log the error and pause the listener for a second, but
    go on calling accept() up to *backlog* times in the same run: each failure is
    logged again and schedules one more resumption, so the resumptions multiply
    while the shortage lasts (after 15 s, thousands of tracebacks a second and most
    of a core). After one such failure this socket says there is nothing to accept
    until the loop's next iteration, so asyncio logs and resumes once a second; and
    pbcore's log says which server it is. Other loops (uvloop's) do not call it.
    """

    _resting = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self._resting:
            raise BlockingIOError(errno.EAGAIN, "resting until the loop's next iteration")
        try:
            return super().accept()
        except OSError as error:
            if error.errno in _OUT_OF_RESOURCES:
                asyncio.get_running_loop().call_soon(self._rest_over)  # accept() runs in asyncio's loop
                self._resting = True
                log.warning(
                    "accepting a connection on %s failed (%s); asyncio tries again in %s s",
                    self.getsockname(),
                    error,
                    ACCEPT_RETRY_DELAY,
                )
            raise

    def _rest_over(self) -> None:
        self._resting = False


async def _tcp_listeners(host: str | None, port: int) -> list[_Listener]:
    """Bound sockets for *host*:*port*, one an address, made as asyncio's create_server makes them."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError("getaddrinfo() returned empty list")
    listeners: list[_Listener] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = _Listener(family, kind, proto)
            listeners.append(sock)
            if os.name == "posix" and sys.platform != "cygwin":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)  # IPv4 has a socket of its own
            try:
                sock.bind(address)
            except OSError as error:
                message = f"error while attempting to bind on address {address!r}: {error.strerror}"
                raise OSError(error.errno, message) from None
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def _unix_listener(path: str) -> _Listener:
    """A socket bound at *path*, replacing a stale socket there, as asyncio's create_unix_server does."""
    sock = _Listener(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not path.startswith("\0"):  # not an abstract socket: a file
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.remove(path)
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    return sock


class Server:
    """A listening PB server: ``port``, ``addresses``, ``connections``; ``close()``, ``wait_closed()``.

    ``close(grace)`` stops accepting at once, waits up to *grace* seconds for
    the calls running on every connection to finish, then closes every
    connection. ``async with server:`` closes it on exit;
    ``await server.serve_forever()`` returns once it is closed (and closes
    it if cancelled).
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._listeners: list[asyncio.AbstractServer] = []  # one a socket (they are pbcore's _Listener)
        self._addresses: list[Any] = []
        #: The live connections.
        self.connections: set[Connection] = set()
        self._closing = False
        self._closer: asyncio.Task[None] | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()

    def _listening(self, listeners: list[asyncio.AbstractServer]) -> Server:
        self._listeners = listeners
        # asyncio.Server forgets its sockets once closed (3.10, 3.11): keep their names.
        self._addresses = [sock.getsockname() for each in listeners for sock in cast(asyncio.Server, each).sockets]
        for address in self._addresses:
            log.debug("listening on %s", address)
        return self

    @property
    def addresses(self) -> list[Any]:
        """Every listener's socket name: ``(host, port, ...)`` tuples, or a unix socket's path."""
        return list(self._addresses)

    @property
    def port(self) -> int:
        """The first listener's port (the bound one when asked for port 0); TCP only."""
        address = self._addresses[0] if self._addresses else None
        if not isinstance(address, tuple):
            raise AttributeError(f"a server listening on {address!r} has no port")
        port: int = address[1]
        return port

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closing

    def close(self, grace: float = 0.0) -> None:
        """Stop accepting; after up to *grace* seconds for running calls to finish, close every connection."""
        if self._closing:
            return
        self._closing = True
        for listener in self._listeners:
            listener.close()
        self._closer = self._loop.create_task(self._shut_down(grace))

    async def wait_closed(self) -> None:
        """Wait until the server is closed and every connection with it."""
        await asyncio.shield(self._closed)

    async def aclose(self, grace: float = 0.0) -> None:
        """:meth:`close`, then :meth:`wait_closed`."""
        self.close(grace)
        await self.wait_closed()

    async def serve_forever(self) -> None:
        """Serve until the server is closed; cancelled, close it (and wait for that)."""
        try:
            await self.wait_closed()
        except asyncio.CancelledError:
            await self.aclose()
            raise

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _shut_down(self, grace: float) -> None:
        try:
            if grace > 0 and self.connections:
                with contextlib.suppress(asyncio.TimeoutError):
                    idle = [connection._wait_idle() for connection in self.connections]
                    await asyncio.wait_for(asyncio.gather(*idle), grace)
            while self.connections:
                connections = list(self.connections)
                for connection in connections:
                    connection.close()
                await asyncio.gather(*(connection.wait_closed() for connection in connections))
            if self._listeners:
                # Every connection is closed: asyncio's (3.12+) and uvloop's
                # servers wait for that; a TLS handshake under way may linger.
                # asyncio.wait, not wait_for(gather()): cancelled (a loop ended
                # without waiting for the close), wait_for leaves the gather's
                # CancelledError unretrieved, and asyncio logs it.
                waits = [asyncio.ensure_future(listener.wait_closed()) for listener in self._listeners]
                await asyncio.wait(waits, timeout=CLOSE_TIMEOUT)
        finally:
            if not self._closed.done():
                self._closed.set_result(None)
            log.debug("the server on %s closed", self._addresses)

    def __repr__(self) -> str:
        state = " closing" if self._closing else ""
        return f"<pbcore_asyncio.Server {self._addresses!r}{state} connections={len(self.connections)}>"


async def serve(
    factory: PBServerFactory,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
    backlog: int = 128,
) -> Server:
    """Serve *factory* on TCP *host*:*port* (port 0: a free one; TLS with *ssl_context*)."""
    loop = asyncio.get_running_loop()
    server = Server()
    sockets = await _tcp_listeners(host, port)
    listeners: list[asyncio.AbstractServer] = []
    try:
        for sock in sockets:
            listeners.append(
                await loop.create_server(
                    lambda: Connection(factory.make_broker, server),
                    sock=sock,
                    ssl=ssl_context,
                    backlog=backlog,
                    start_serving=False,  # all or none, as asyncio's own multi-address server
                )
            )
        for listener in listeners:
            await listener.start_serving()
    except BaseException:
        for listener in listeners:
            listener.close()
        for sock in sockets:
            sock.close()
        raise
    return server._listening(listeners)


async def serve_unix(
    factory: PBServerFactory,
    path: str | os.PathLike[str],
    *,
    ssl_context: ssl.SSLContext | None = None,
    backlog: int = 128,
) -> Server:
    """Serve *factory* on a unix socket at *path*."""
    loop = asyncio.get_running_loop()
    server = Server()
    sock = _unix_listener(os.fspath(path))
    try:
        listener = await loop.create_unix_server(
            lambda: Connection(factory.make_broker, server), sock=sock, ssl=ssl_context, backlog=backlog
        )
    except BaseException:
        sock.close()
        raise
    return server._listening([listener])


def _client(factory: PBClientFactory) -> Connection:
    def make(**options: Any) -> Broker:
        # Called from connection_made, once `connection` exists.
        return factory.make_broker(close=connection.close, **options)

    connection = Connection(make)
    return connection


async def connect(
    factory: PBClientFactory,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Connection:
    """Connect *factory* to a PB server over TCP (TLS with *ssl_context*)."""
    loop = asyncio.get_running_loop()
    options: dict[str, Any] = {} if server_hostname is None else {"server_hostname": server_hostname}
    _, connection = await loop.create_connection(lambda: _client(factory), host, port, ssl=ssl_context, **options)
    return connection


async def connect_unix(
    factory: PBClientFactory,
    path: str | os.PathLike[str],
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Connection:
    """Connect *factory* to a PB server on a unix socket."""
    loop = asyncio.get_running_loop()
    options: dict[str, Any] = {} if server_hostname is None else {"server_hostname": server_hostname}
    _, connection = await loop.create_unix_connection(
        lambda: _client(factory), os.fspath(path), ssl=ssl_context, **options
    )
    return connection


# At the end: the reconnecting client is built on what this module defines.
from .reconnect import ReconnectingClient  # noqa: E402
