"""pbcore over asyncio: ``serve()`` and ``connect()`` (TCP, TLS, unix sockets).

::

    import pbcore, pbcore_asyncio

    server = await pbcore_asyncio.serve(pbcore.PBServerFactory(MyRoot()), "127.0.0.1", 8787)

    factory = pbcore.PBClientFactory()
    connection = await pbcore_asyncio.connect(factory, "127.0.0.1", 8787)
    root = await factory.getRootObject()
    print(await root.callRemote("echo", "hello"))
    connection.close()

A call's result is an :class:`asyncio.Future`; ``asyncio.wait_for(ref.callRemote(...),
timeout)`` and task cancellation cancel it, and a late answer is dropped.
Remote methods may be ``async``: each call runs in its own task. This is
also the adapter for anyio applications on the asyncio backend (on trio, use
``pbcore_trio``). It uses only the event loop's public API, so it runs on
uvloop too.

All the protocol lives in :mod:`pbcore`; this module only moves bytes, runs
calls (:func:`pbcore.broker.serve_call`) and wires the broker's wake-up to the
loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl as ssl_module
import threading
from collections.abc import Callable, Coroutine
from typing import Any, cast

from pbcore.broker import Broker, serve_call
from pbcore.errors import ProtocolError
from pbcore.events import CallReceived
from pbcore.factory import PBClientFactory, PBServerFactory

__all__ = [
    "MAX_CONCURRENT_CALLS",
    "READ_SIZE",
    "WRITE_SIZE",
    "PBProtocol",
    "PendingFuture",
    "connect",
    "connect_unix",
    "serve",
    "serve_unix",
]


class PendingFuture(asyncio.Future[Any]):
    """A call's result: an asyncio Future the broker settles."""

    def resolve(self, value: Any) -> None:
        if not self.done():
            self.set_result(value)

    def fail(self, error: BaseException) -> None:
        if not self.done():
            self.set_exception(error)


#: Calls one connection runs at once; more wait their turn.
MAX_CONCURRENT_CALLS = 32


#: Bytes read at most at once, into one buffer reused for the connection's life.
READ_SIZE = 64 * 1024
#: Answers collected while running a batch of calls are written once they reach this.
WRITE_SIZE = 64 * 1024


class PBProtocol(asyncio.BufferedProtocol):
    """One PB connection: feeds the broker, runs calls, writes what it has to send.

    Memory stays bounded when the peer stops reading: while the transport's
    write buffer is over its high-water mark, no waiting call is started and
    nothing more is read, and at most :data:`MAX_CONCURRENT_CALLS` calls run.
    """

    def __init__(self, make_broker: Callable[..., Broker]) -> None:
        self._make_broker = make_broker
        self._loop = asyncio.get_running_loop()
        self.broker: Broker | None = None
        self.transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting_calls: collections.deque[CallReceived] = collections.deque()
        self._paused = False
        self._flush_scheduled = False
        self._loop_thread = threading.get_ident()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        # A buffer of our own: asyncio's default reads allocate (and glibc may
        # map and unmap) a fresh 256 KiB buffer for every read.
        self._read_buffer = memoryview(bytearray(READ_SIZE))

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the Transport methods without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.broker = self._make_broker(pending_factory=self._new_pending, wake_up=self._wake_up)
        self.broker.connection_made()
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        broker = self.broker
        assert broker is not None
        try:
            broker.receive_data(self._read_buffer[:nbytes])  # the broker copies what it keeps
        except ProtocolError:
            # The broker has closed (pending calls failed); close this connection only.
            self._run_events()
            self.close()
            return
        self._run_events()
        self._flush()

    def eof_received(self) -> bool | None:
        return None  # close the transport: PB has no half-open state

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting_calls.clear()
        if self.broker is not None:
            self.broker.connection_lost(exc)
            self._run_events()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        # The peer is not reading: stop reading its requests and starting
        # calls, so that answers cannot pile up in the write buffer.
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._start_calls()

    # -- the connection ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (pending calls fail with PBConnectionLost)."""
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed."""
        await asyncio.shield(self._closed)

    def _new_pending(self) -> PendingFuture:
        pending = PendingFuture(loop=self._loop)
        pending.add_done_callback(self._forget_if_cancelled)
        return pending

    def _forget_if_cancelled(self, pending: asyncio.Future[Any]) -> None:
        if pending.cancelled() and self.broker is not None:
            self.broker.cancel(pending)  # type: ignore[arg-type]

    def _run_events(self) -> None:
        assert self.broker is not None
        for event in self.broker.events():
            if isinstance(event, CallReceived):
                self._waiting_calls.append(event)
        self._start_calls()

    def _start_calls(self) -> None:
        # Calls start now and in order; only those still awaiting something
        # continue as tasks (and count against the limit).
        assert self.broker is not None
        while self._waiting_calls and not self._paused and len(self._tasks) < MAX_CONCURRENT_CALLS:
            rest = serve_call(self.broker, self._waiting_calls.popleft())
            if rest is not None:
                task = self._loop.create_task(self._finish(rest))
                self._tasks.add(task)
                task.add_done_callback(self._call_done)
            # Answers go out together, in one write per batch; but a batch
            # that has collected enough is written now, so that the transport
            # can pause us (pause_writing) before the next call adds more.
            if self.broker.bytes_to_send >= WRITE_SIZE:
                self._flush()
        self._flush()

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._start_calls()

    async def _finish(self, rest: Coroutine[Any, Any, None]) -> None:
        await rest
        self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.broker is None or self.transport is None or self.transport.is_closing():
            return
        data = self.broker.data_to_send()
        if data:
            self.transport.write(data)

    def _wake_up(self) -> None:
        # The broker has output: schedule one flush. From another thread (a
        # finalizer's decref) go through the thread-safe path; a closed loop
        # raises RuntimeError, and then the connection is gone anyway.
        if threading.get_ident() != self._loop_thread:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._flush)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)


async def serve(
    factory: PBServerFactory,
    host: str | None = None,
    port: int = 0,
    *,
    ssl: ssl_module.SSLContext | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """Start serving *factory* on TCP (TLS with an *ssl* context); returns the started server."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: PBProtocol(factory.make_broker), host, port, ssl=ssl, **kwargs)


async def serve_unix(
    factory: PBServerFactory, path: str, *, ssl: ssl_module.SSLContext | None = None, **kwargs: Any
) -> asyncio.Server:
    """Start serving *factory* on a unix socket at *path*."""
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: PBProtocol(factory.make_broker), path, ssl=ssl, **kwargs)


def _client_protocol(factory: PBClientFactory) -> PBProtocol:
    def make(**options: Any) -> Broker:
        # Called from connection_made, once `protocol` exists.
        return factory.make_broker(close=protocol.close, **options)

    protocol = PBProtocol(make)
    return protocol


async def connect(
    factory: PBClientFactory,
    host: str,
    port: int,
    *,
    ssl: ssl_module.SSLContext | None = None,
    server_hostname: str | None = None,
    **kwargs: Any,
) -> PBProtocol:
    """Connect *factory* to a PB server over TCP (TLS with an *ssl* context)."""
    loop = asyncio.get_running_loop()
    if ssl is not None and server_hostname is not None:
        kwargs["server_hostname"] = server_hostname
    _, protocol = await loop.create_connection(lambda: _client_protocol(factory), host, port, ssl=ssl, **kwargs)
    return protocol


async def connect_unix(
    factory: PBClientFactory, path: str, *, ssl: ssl_module.SSLContext | None = None, **kwargs: Any
) -> PBProtocol:
    """Connect *factory* to a PB server on a unix socket."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_unix_connection(lambda: _client_protocol(factory), path, ssl=ssl, **kwargs)
    return protocol
