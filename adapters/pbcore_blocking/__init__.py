"""pbcore over plain sockets and threads: a synchronous client and a threaded server.

::

    import pbcore, pbcore_blocking

    server = pbcore_blocking.serve(pbcore.PBServerFactory(MyRoot()), "127.0.0.1", 0)

    factory = pbcore.PBClientFactory()
    with pbcore_blocking.connect(factory, "127.0.0.1", server.port) as connection:
        root = connection.root()
        print(connection.call(root, "echo", "hello", timeout=5))

    server.close()

Each connection has one background reader thread: it reads the socket, feeds
the broker and runs the calls the peer makes on our objects, one after the
other, in that thread. The broker is used, and its output written, under the
connection's lock, by whichever thread has something to send; the holder sends
what is queued before it lets go. :meth:`BlockingConnection.call` blocks the
calling thread until the answer arrives (or the timeout expires: the call is
then cancelled and a late answer dropped); it waits without holding the lock.

A reference collected by the garbage collector, in any thread, queues a decref
and wakes its connection up. The wake-up never waits for a lock: it sends at
once if the lock is free, else it leaves a flag, and the holder (even the same
thread, inside the broker) sends the decref after what it was sending, then
looks at the flag once more after releasing the lock. So a collection in a
thread holding another connection's lock cannot deadlock, and one in the
thread holding the same connection's lock cannot re-enter the broker or
reorder its output. A failed write only shuts the socket down (a wake-up
must not run disconnect callbacks): the reader thread reports the loss.

The blocking adapter has no event loop. A coroutine method (``async def``)
may await PB calls over its own connection (calling back the peer's
objects): the reader thread runs it up to that ``await``, serves other
calls meanwhile, and runs it on when the answer arrives. One that awaits
anything else (an event loop, a PB call over another connection) gets an
error answer instead. A method must not make *blocking* calls over its own
connection (the reader thread that would deliver the answer is the one
running it): that raises RuntimeError.

Known limits: a served method runs holding its connection's lock, so other
threads using that connection wait while it runs (a decref collected
meanwhile goes out when it returns). A wake-up that finds the lock free
writes in the collecting thread, so it may wait (up to the write timeout)
for a peer that does not read.

All the protocol lives in :mod:`pbcore`; this module only moves bytes, runs
calls (:func:`pbcore.broker.serve_call`) and wires the broker's wake-up.
"""

from __future__ import annotations

import collections
import select
import socket
import ssl as ssl_module
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Any, TypeVar

from pbcore.broker import Broker, PendingCall, serve_call
from pbcore.errors import PBConnectionLost, ProtocolError
from pbcore.events import CallReceived
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import RemoteReference

__all__ = ["BlockingConnection", "BlockingServer", "connect", "serve"]

T = TypeVar("T")

#: How long close() waits for a thread to finish.
JOIN_TIMEOUT = 5.0
#: How often blocked loops look at their stop flag.
POLL_INTERVAL = 0.2
_READ_SIZE = 65536


class _Pending(PendingCall):
    """A call's pending result that knows its connection."""

    def __init__(self, connection: BlockingConnection) -> None:
        super().__init__()
        self.connection = connection


class BlockingConnection:
    """One PB connection driven by a reader thread; usable from any thread.

    *timeout* bounds each socket write and is the default timeout of
    :meth:`call`, :meth:`root` and :meth:`login`.
    """

    def __init__(
        self,
        sock: socket.socket,
        factory: PBClientFactory | PBServerFactory,
        *,
        timeout: float = 30.0,
        tls_handshake: bool = False,
        on_close: Callable[[BlockingConnection], object] | None = None,
    ) -> None:
        self._sock = sock
        self.timeout = timeout
        self._tls = isinstance(sock, ssl_module.SSLSocket)
        self._tls_handshake = tls_handshake
        self._on_close = on_close
        # Not re-entrant, so that a wake-up in the holding thread cannot take it
        # again; _hold() lets its owner nest.
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread holding the lock, if any
        self._flagged = False  # a wake-up found the lock busy: output is waiting
        self._failure: OSError | None = None  # a write failed: the reader reports it
        # Waiters sleep on their own lock, not the connection's, so that only
        # _hold() releases the connection's lock (and looks at the flag then).
        self._changed = threading.Condition()
        # Served coroutines whose PB call has settled, to run on from _run_events.
        self._resumable: collections.deque[tuple[CallReceived, Generator[Any, None, None]]] = collections.deque()
        self._closed = False
        self._stopping = False
        self._factory = factory
        self._reader = threading.Thread(target=self._read_loop, name="pbcore-blocking-reader", daemon=True)
        options: dict[str, Any] = {"pending_factory": self._new_pending, "wake_up": self._wake_up}
        if isinstance(factory, PBClientFactory):
            options["close"] = self.close
        self.broker: Broker = factory.make_broker(**options)

    # -- public API -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the connection is gone."""
        return self._closed

    def call(self, ref: RemoteReference, name: str, *args: Any, timeout: float | None = None, **kw: Any) -> Any:
        """``ref.callRemote(name, *args, **kw)`` and wait for the answer (or raise its error).

        On timeout (default: the connection's) the call is cancelled and TimeoutError raised.
        """
        with self._hold():
            pending = ref.callRemote(name, *args, **kw)
        if not isinstance(pending, PendingCall):
            raise TypeError(f"callRemote returned {pending!r}, not a PendingCall")
        self._wait(pending, timeout)
        return pending.unwrap()

    def run(self, awaitable: Awaitable[T], timeout: float | None = None) -> T:
        """Run a coroutine that awaits PB calls (``await ref.callRemote(...)``) to completion.

        *timeout* bounds each call it waits for.
        """
        steps = awaitable.__await__()
        try:
            while True:
                with self._hold():
                    try:
                        waiting = steps.send(None)
                    except StopIteration as done:
                        return done.value  # type: ignore[no-any-return]
                if not isinstance(waiting, PendingCall):
                    raise RuntimeError(f"awaited {waiting!r}: the blocking adapter can only wait for PB calls")
                self._wait(waiting, timeout)
        finally:
            steps.close()

    def root(self, timeout: float | None = None) -> RemoteReference:
        """The peer's root object, once the handshake is done."""
        self._check_thread()
        self._wait_for(lambda: self.broker.ready or self._closed or self.broker.closed, timeout)
        with self._hold():
            if self.broker.ready:
                return self.broker.root()
            if self._closed or self.broker.closed:
                raise PBConnectionLost(self.broker.close_reason)
        raise TimeoutError("the PB handshake did not complete in time")

    def login(self, credentials: Any, mind: Any = None, timeout: float | None = None) -> RemoteReference:
        """Log in through the server's portal (the client factory's login); the avatar."""
        factory = self._client_factory()
        return self.run(factory.login(credentials, mind), timeout)

    def close(self) -> None:
        """Close the connection: pending calls fail with PBConnectionLost; waits for the reader."""
        self._stopping = True  # no lock: the reader may be busy running a call
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join(JOIN_TIMEOUT)
            if self._reader.is_alive():
                return  # still running a call: it closes the broker when that call returns
        self._lost(None)

    def __enter__(self) -> BlockingConnection:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _client_factory(self) -> PBClientFactory:
        if not isinstance(self._factory, PBClientFactory):
            raise RuntimeError("login() is for client connections")
        return self._factory

    def start(self) -> None:
        """Start the reader thread (the server's offer is sent from it)."""
        self._reader.start()

    @contextmanager
    def _hold(self) -> Iterator[None]:
        """Hold the lock while using the broker (nests in its thread); send on the way out."""
        me = threading.get_ident()
        if self._owner == me:
            yield
            return
        self._lock.acquire()
        self._owner = me
        try:
            yield
        finally:
            try:
                self._flush_locked()
            finally:
                self._owner = None
                self._lock.release()
            self._flush_flagged()  # a wake-up may have come after our flush

    def _flush_flagged(self) -> None:
        # Never waits: a busy lock's holder looks at the flag after releasing it.
        while self._flagged and self._lock.acquire(blocking=False):
            self._owner = threading.get_ident()
            try:
                self._flush_locked()
            finally:
                self._owner = None
                self._lock.release()

    def _flush_locked(self) -> None:
        self._flagged = False  # before taking the output: a later wake-up flags again
        if self._closed:
            return
        data = self.broker.data_to_send()
        if not data:
            return
        try:
            self._sock.sendall(data)
        except OSError as error:
            # Only stop here (this may be a finalizer): the reader reports the loss.
            if self._failure is None:
                self._failure = error
            self._stopping = True
            with suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def _wake_up(self) -> None:
        # The broker's hook, called from any thread, in any state (a finalizer's
        # decref): flag the output, and send it now only if the lock is free.
        self._flagged = True
        self._flush_flagged()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _wait_for(self, condition: Callable[[], bool], timeout: float | None) -> None:
        """Wait, not holding the connection's lock, until *condition* holds or the timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._changed:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._changed.wait(remaining)

    def _check_thread(self) -> None:
        if threading.current_thread() is self._reader:
            raise RuntimeError("a blocking call from the connection's own reader thread would never be answered")

    def _wait(self, pending: PendingCall, timeout: float | None) -> None:
        self._check_thread()
        self._wait_for(lambda: pending.done or self._closed, timeout)
        with self._hold():
            if pending.done:
                return
            if self._closed:
                pending.fail(PBConnectionLost(self.broker.close_reason))
                return
            self.broker.cancel(pending)
        raise TimeoutError("the PB call was not answered in time")

    def _read_loop(self) -> None:
        reason: BaseException | None = None
        try:
            if self._tls_handshake:
                assert isinstance(self._sock, ssl_module.SSLSocket)
                self._sock.do_handshake()
            with self._hold():
                self.broker.connection_made()
            while not self._stopping:
                data = self._receive()
                if data is None:
                    continue
                if not data:
                    break
                with self._hold():
                    try:
                        self.broker.receive_data(data)
                    except ProtocolError as error:
                        reason = error  # the broker has closed: close this connection only
                        self._run_events()
                        break
                    self._run_events()
                    self._notify()
        except OSError as error:
            reason = error
        finally:
            with suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._lost(self._failure if self._failure is not None else reason)

    def _receive(self) -> bytes | None:
        """Bytes read, b"" at end of file, None if nothing yet (timeout)."""
        if not self._tls:
            try:
                return self._sock.recv(_READ_SIZE)
            except TimeoutError:
                return None
        # An SSL object is not safe to read and write from two threads at once:
        # wait for input outside the lock, read under it.
        assert isinstance(self._sock, ssl_module.SSLSocket)
        if not self._sock.pending():
            readable, _, _ = select.select([self._sock], [], [], POLL_INTERVAL)
            if not readable:
                return None
        with self._hold():
            try:
                return self._sock.recv(_READ_SIZE)
            except (TimeoutError, ssl_module.SSLWantReadError):
                return None

    def _new_pending(self) -> _Pending:
        return _Pending(self)

    def _run_events(self) -> None:
        # In the reader thread, holding the lock.
        for event in self.broker.events():
            if isinstance(event, CallReceived):
                rest = serve_call(self.broker, event)
                if rest is not None:
                    self._step(event, rest.__await__())
        while self._resumable:
            self._step(*self._resumable.popleft())

    def _step(self, event: CallReceived, steps: Generator[Any, None, None]) -> None:
        """Run a served coroutine until it finishes (it has answered) or waits again."""
        try:
            waiting = steps.send(None)
        except StopIteration:
            return
        if isinstance(waiting, _Pending) and waiting.connection is self:
            # Settled by this reader (an answer, or the connection's loss), which
            # then resumes the coroutine from _run_events.
            def resume(_: object) -> None:
                self._resumable.append((event, steps))

            waiting.add_callbacks(resume, resume)
            return
        steps.close()
        if event.answer_required and not self.broker.closed:
            self.broker.send_error(
                event.request_id,
                RuntimeError(
                    f"{event.method}: a method served by the blocking adapter can wait only for"
                    " PB calls over its own connection"
                ),
            )

    def _lost(self, reason: BaseException | None) -> None:
        with self._hold():
            first = not self._closed
            self.broker.connection_lost(reason)
            self._run_events()
            self._closed = True
            self._notify()
        if first:
            with suppress(OSError):
                self._sock.close()
            if self._on_close is not None:
                self._on_close(self)


def connect(
    factory: PBClientFactory,
    host: str,
    port: int,
    *,
    timeout: float = 30.0,
    ssl_context: ssl_module.SSLContext | None = None,
    server_hostname: str | None = None,
) -> BlockingConnection:
    """Connect *factory* to a PB server over TCP (TLS with *ssl_context*); the connection.

    *timeout* bounds connecting and each write, and is the default timeout of
    the connection's blocking calls.
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
        sock.settimeout(timeout if ssl_context is not None else None)
        if ssl_context is None:
            # Reads block in the reader thread; writes are bounded by a send timeout.
            _set_send_timeout(sock, timeout)
        connection = BlockingConnection(sock, factory, timeout=timeout)
    except BaseException:
        sock.close()
        raise
    connection.start()
    return connection


def _set_send_timeout(sock: socket.socket, timeout: float) -> None:
    seconds = int(timeout)
    micros = int((timeout - seconds) * 1_000_000)
    with suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros))


class BlockingServer:
    """A listening socket, an accept thread and one reader thread per connection."""

    def __init__(
        self,
        factory: PBServerFactory,
        listener: socket.socket,
        ssl_context: ssl_module.SSLContext | None,
        timeout: float,
    ) -> None:
        self.factory = factory
        self._listener = listener
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._lock = threading.Lock()
        self._closing = False
        #: The open connections.
        self.connections: set[BlockingConnection] = set()
        self.port: int = listener.getsockname()[1]
        listener.settimeout(POLL_INTERVAL)
        self._acceptor = threading.Thread(target=self._accept_loop, name="pbcore-blocking-accept", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._ssl_context is not None:
                    sock.settimeout(self._timeout)
                    sock = self._ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                else:
                    sock.settimeout(None)
                    _set_send_timeout(sock, self._timeout)
                connection = BlockingConnection(
                    sock,
                    self.factory,
                    timeout=self._timeout,
                    tls_handshake=self._ssl_context is not None,
                    on_close=self._forget,
                )
            except Exception:
                sock.close()
                continue
            with self._lock:
                refused = self._closing
                if not refused:
                    self.connections.add(connection)
            if refused:
                sock.close()
                break
            connection.start()

    def _forget(self, connection: BlockingConnection) -> None:
        with self._lock:
            self.connections.discard(connection)

    def close(self) -> None:
        """Stop accepting, close every connection and wait (bounded) for the threads."""
        with self._lock:
            self._closing = True
            connections = list(self.connections)
        with suppress(OSError):
            self._listener.close()
        if self._acceptor is not threading.current_thread():
            self._acceptor.join(JOIN_TIMEOUT)
        for connection in connections:
            with suppress(OSError):
                connection._sock.shutdown(socket.SHUT_RDWR)
        for connection in connections:
            connection.close()

    def __enter__(self) -> BlockingServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def serve(
    factory: PBServerFactory,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl_module.SSLContext | None = None,
    timeout: float = 30.0,
    backlog: int = 128,
) -> BlockingServer:
    """Serve *factory* on TCP (TLS with *ssl_context*) in background threads; the server.

    *timeout* bounds each write to a peer (and TLS handshakes).
    """
    listener = socket.create_server((host, port), backlog=backlog)
    try:
        return BlockingServer(factory, listener, ssl_context, timeout)
    except BaseException:
        listener.close()
        raise
