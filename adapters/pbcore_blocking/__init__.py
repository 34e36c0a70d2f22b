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
the broker and hands the calls the peer makes to the core's
:class:`~pbcore.serving.Dispatcher`, which runs them in that thread, one after
the other, and answers every one. The broker is used, and its output written,
under the connection's lock, by whichever thread has something to send; the
holder sends what is queued before it lets go. :meth:`BlockingConnection.call`
blocks the calling thread until the answer arrives (or the timeout expires:
the call is then cancelled and a late answer dropped); it waits without
holding the lock. ``timeout=None`` means no timeout, as for sockets.

Back-pressure: this adapter holds no output of its own (the holder of the
lock writes what the broker has, synchronously), so the dispatcher stops
starting calls once the broker holds ``Limits.output_high_water`` bytes of
answers; they are written, and the reader starts the calls that waited, and
writes again, until none waits. Only then does it read more: it never reads
while the dispatcher holds calls, let alone ``Limits.max_queued_calls``. A
peer that does not read holds the reader in its write (for up to the write
timeout) with at most that much of its answers built.

A reference collected by the garbage collector, in any thread, queues a decref
and wakes its connection up. The wake-up never waits for a lock: it sends at
once if the lock is free, else it leaves a flag, and the holder (even the same
thread, inside the broker) sends the decref after what it was sending, then
looks at the flag once more after releasing the lock. So a collection in a
thread holding another connection's lock cannot deadlock, and one in the
thread holding the same connection's lock cannot re-enter the broker or
reorder its output. A failed write only shuts the socket down (a wake-up
must not run disconnect callbacks): the reader thread reports the loss. The
broker wakes its connection up once more when it closes (the application
called ``broker.connection_lost``, or a peer went over MAX_BROKER_REFS): the
flush then finds it closed and shuts the socket down at once.

Each connection runs the core's timers (``connection.timers``, a
:class:`~pbcore.timers.ConnectionTimers`: handshake timeout, keepalive
probes, dead-peer detection, ``callRemote(..., pbtimeout=s)`` deadlines, as
the factory's ``timeouts=`` say). Whoever holds the connection's lock polls
them with ``time.monotonic()`` before sending on the way out, so after
connection_made, after every read and after every call made in any thread;
the reader waits for input at most until the deadline they return, and at
most POLL_INTERVAL, so that a deadline moved earlier by another thread's call
is seen within that bound. Wake-ups from finalizers (decrefs) do not poll
them. A timer that closes the broker closes the connection as any close does.

The blocking adapter has no event loop. A coroutine method (``async def``)
runs in a :class:`~pbcore.driver.CoroutineDriver` that accepts only PB calls
over its own connection: it may await calls back to the peer's objects (the
reader thread runs it up to that ``await``, serves other calls meanwhile,
and runs it on when the answer arrives). One that awaits anything else (an
event loop, a PB call over another connection) has a RuntimeError thrown in
at that ``await``, which becomes its error answer. A method must not make
*blocking* calls over its own connection (the reader thread that would
deliver the answer is the one running it): that raises RuntimeError.

Known limits: a served method runs in the reader thread holding its
connection's lock, so a slow one holds up its connection, and other threads
using that connection wait while it runs (a decref collected meanwhile goes
out when it returns). A running method cannot be interrupted: closing a
connection (or the server) shuts its socket down at once, so the peer sees
the end at once, but waits at most JOIN_TIMEOUT for the method to return
before giving up on that thread (the broker closes when it returns). A
wake-up that finds the lock free writes in the collecting thread, so it may
wait (up to the write timeout, for ever with ``timeout=None``) for a peer
that does not read. Over TLS the reader reads holding the lock (an SSL
object is not safe to use from two threads at once), so a peer that stops
in the middle of a TLS record holds up that connection's writers the same
way.

All the protocol and the call policy live in :mod:`pbcore`; this module only
moves bytes, hands calls to the dispatcher, steps coroutines through the
driver and wires the broker's wake-up.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl as ssl_module
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Any, TypeVar

from pbcore.broker import Broker, PendingCall
from pbcore.driver import CoroutineDriver
from pbcore.errors import PBConnectionLost, ProtocolError
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import RemoteReference
from pbcore.serving import Dispatcher
from pbcore.timers import ConnectionTimers

__all__ = [
    "BlockingConnection",
    "BlockingServer",
    "ReconnectingClient",
    "connect",
    "serve",
]

T = TypeVar("T")

log = logging.getLogger("pbcore.blocking")

#: How long close() waits for a thread to finish.
JOIN_TIMEOUT = 5.0
#: How often blocked loops look at their stop flag (and the reader at its timers' deadline).
POLL_INTERVAL = 0.2
#: The accept loop's back-off after a failed accept (or a reader thread that could not start):
#: from the first figure, doubling up to the second.
ACCEPT_BACKOFF = (0.1, 1.0)
_READ_SIZE = 65536


class _Pending(PendingCall):
    """A call's pending result that knows its connection."""

    def __init__(self, connection: BlockingConnection) -> None:
        super().__init__()
        self.connection = connection


class _RunDriver(CoroutineDriver):
    """Runs one coroutine for :meth:`BlockingConnection.run`, remembering the call it waits for."""

    def __init__(self, connection: BlockingConnection) -> None:
        super().__init__(connection._owns, log_errors=False)  # run() raises what the coroutine raises
        self.waiting: PendingCall | None = None

    def accepts(self, pending: PendingCall) -> bool:
        if not super().accepts(pending):
            return False
        self.waiting = pending  # cancelled if it is not answered in time
        return True


class BlockingConnection:
    """One PB connection driven by a reader thread; usable from any thread.

    *timeout* (seconds, or None for no timeout) bounds each socket write and
    is the default timeout of :meth:`call`, :meth:`root`, :meth:`run` and
    :meth:`login`.
    """

    def __init__(
        self,
        sock: socket.socket,
        factory: PBClientFactory | PBServerFactory,
        *,
        timeout: float | None = 30.0,
        tls_handshake: bool = False,
        on_close: Callable[[BlockingConnection], object] | None = None,
    ) -> None:
        self._sock = sock
        self.timeout = timeout
        #: The peer's address (``sock.getpeername()``), also ``broker.peer``.
        self.peer: Any = sock.getpeername()
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
        self._closed = False
        self._stopping = False
        self._busy = False  # the reader is serving what it read
        self._factory = factory
        self._reader = threading.Thread(target=self._read_loop, name="pbcore-blocking-reader", daemon=True)
        options: dict[str, Any] = {
            "pending_factory": self._new_pending,
            "wake_up": self._wake_up,
            "peer": self.peer,
            "settled_events": False,  # only the dispatcher reads events: it wants calls
        }
        if isinstance(factory, PBClientFactory):
            options["close"] = self.close
        self.broker: Broker = factory.make_broker(**options)
        #: The broker's timers (see :mod:`pbcore.timers`), run under the lock.
        self.timers = ConnectionTimers(self.broker)
        if self.broker.timeouts.tcp_keepalive is not None:
            self.broker.timeouts.tcp_keepalive.apply(sock, socket)
        self._deadline: float | None = None  # when the timers want to run next (None: only after input or output)
        # How the reader waits for input (select.select where there is no poll).
        self._poller: Any = None
        if hasattr(select, "poll"):
            self._poller = select.poll()
            self._poller.register(sock, select.POLLIN)
        # Runs the served coroutines (in the reader thread): they may await only this connection's calls.
        self._driver = CoroutineDriver(self._owns)
        #: Runs the calls the peer makes (in the reader thread).
        self.dispatcher = Dispatcher(self.broker, self._driver.spawn_call)

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
        """Run a coroutine that awaits PB calls over this connection (``await ref.callRemote(...)``) to completion.

        *timeout* (default: the connection's) bounds each call it waits for;
        awaiting anything else throws RuntimeError into the coroutine.
        """
        self._check_thread()
        limit = self._limit(timeout)
        driver = _RunDriver(self)
        with self._hold():
            task = driver.spawn(awaitable)
            driver.run_ready()
        try:
            while not task.done:
                self._wait_for(lambda: driver.ready > 0 or self._closed, limit)
                with self._hold():
                    if not driver.ready:
                        waiting = driver.waiting
                        if not self._closed:
                            if waiting is not None:
                                self.broker.cancel(waiting)  # a late answer is dropped
                            raise TimeoutError("the PB call was not answered in time")
                        if waiting is not None:
                            waiting.fail(PBConnectionLost(self.broker.close_reason))
                        if not driver.ready:
                            raise PBConnectionLost(self.broker.close_reason)
                    driver.run_ready()
        finally:
            if not task.done:
                with self._hold():
                    task.cancel()
        if task.error is not None:
            raise task.error
        return task.result  # type: ignore[no-any-return]

    def root(self, timeout: float | None = None) -> RemoteReference:
        """The peer's root object, once the handshake is done."""
        self._check_thread()
        self._wait_for(lambda: self.broker.ready or self._closed or self.broker.closed, self._limit(timeout))
        with self._hold():
            if self.broker.ready and not self.broker.closed:
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
        self._close(JOIN_TIMEOUT)

    def _close(self, join_timeout: float) -> None:
        self._shut()  # no lock: the reader may be busy running a call
        if self._owner == threading.get_ident():
            # Holding the lock (a coroutine run() is stepping closes it): the
            # reader could not finish; close now, and it finds the broker closed.
            self._lost(None)
            return
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join(join_timeout)
            if self._reader.is_alive():
                log.warning("%s: a served call is still running; the connection closes when it returns", self._who())
                return
        self._lost(None)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the connection is closed (at most *timeout* seconds; None: for ever); whether it is."""
        self._wait_for(lambda: self._closed, timeout)
        return self._closed

    def __enter__(self) -> BlockingConnection:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _who(self) -> str:
        return f"peer {self.peer}"

    def _client_factory(self) -> PBClientFactory:
        if not isinstance(self._factory, PBClientFactory):
            raise RuntimeError("login() is for client connections")
        return self._factory

    def start(self) -> None:
        """Start the reader thread (the server's offer is sent from it)."""
        self._reader.start()

    def _owns(self, pending: PendingCall) -> bool:
        """Whether *pending* is a call over this connection (what its coroutines may await)."""
        return isinstance(pending, _Pending) and pending.connection is self

    def _limit(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

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
                try:
                    self._tick()  # arms the deadlines of the calls just made, does what is due
                finally:
                    self._flush_locked()
            finally:
                self._owner = None
                self._lock.release()
            self._flush_flagged()  # a wake-up may have come after our flush

    def _tick(self) -> None:
        """Holding the lock: run the timers, and note when they want to run again."""
        while not self._closed:
            now = time.monotonic()
            due = self._deadline is not None and now >= self._deadline
            self._deadline = self.timers.poll(now)
            if not due:
                return
            self._notify()  # a call may have expired, or the connection closed: wake its waiters
            if threading.current_thread() is not self._reader or not self._driver.ready:
                return
            self._driver.run_ready()  # the served coroutines whose calls expired; then arm what they called

    def _due(self) -> bool:
        """Whether the reader, woken with nothing to read, has timers to run (or coroutines another thread woke)."""
        deadline = self._deadline
        return (deadline is not None and time.monotonic() >= deadline) or self._driver.ready > 0

    def _wait_time(self) -> float:
        """How long the reader waits for input: until the deadline, at most POLL_INTERVAL.

        The bound is how soon it sees a deadline moved earlier by another
        thread (a call with a ``pbtimeout``) and its stop flag.
        """
        deadline = self._deadline
        if deadline is None:
            return POLL_INTERVAL
        return min(POLL_INTERVAL, max(0.0, deadline - time.monotonic()))

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
        if self.broker.closed:
            self._shut()  # it closed itself: the peer sees the end now, the reader reports it
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
            self._shut()

    def _shut(self) -> None:
        """Stop the reader and shut the socket down (from any thread, holding the lock or not)."""
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
        """Wait, not holding the connection's lock, until *condition* holds or *timeout* (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not condition():
                if deadline is None:
                    self._changed.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._changed.wait(remaining)

    def _idle(self) -> bool:
        """Whether no call of the peer's is running (none being served, no coroutine waiting)."""
        return self._closed or not (self._busy or self.dispatcher.running or self.dispatcher.queued)

    def _check_thread(self) -> None:
        if threading.current_thread() is self._reader:
            raise RuntimeError("a blocking call from the connection's own reader thread would never be answered")

    def _wait(self, pending: PendingCall, timeout: float | None) -> None:
        self._check_thread()
        self._wait_for(lambda: pending.done or self._closed, self._limit(timeout))
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
                data = self._receive(self._wait_time())
                if data is None:
                    if self._due():
                        with self._hold():
                            self._serve()  # leaving, the timers run
                    continue
                if not data:
                    break
                self._busy = True
                try:
                    with self._hold():
                        try:
                            self.broker.receive_data(data)
                        except ProtocolError as error:
                            reason = error  # the broker has closed (and logged why): close this connection only
                            break
                        self._serve()
                    self._start_waiting()  # before reading more
                finally:
                    self._busy = False  # after the flush: the answers are out
                    self._notify()
        except (OSError, ValueError) as error:  # ValueError: the socket was closed meanwhile
            reason = error
        except Exception as error:
            log.exception("%s: the reader failed; closing the connection", self._who())
            reason = error
        finally:
            self._shut()
            self._lost(self._failure if self._failure is not None else reason)

    def _serve(self) -> None:
        # Holding the lock: start the calls that arrived, resume the coroutines their answers woke.
        self.dispatcher.dispatch(self.broker.events())
        self._driver.run_ready()

    def _start_waiting(self) -> None:
        """In the reader: start the calls that waited for the output to drain, until none waits.

        Leaving :meth:`_hold` writes what the broker has, and waits until it
        is written: each round starts calls until their answers are over the
        high-water mark again. (A round that starts none would wait for an
        async call's first step, which the driver takes at once.)
        """
        dispatcher = self.dispatcher
        while dispatcher.queued and not self._stopping:
            queued = dispatcher.queued
            with self._hold():
                dispatcher.resume()
                self._driver.run_ready()
            if dispatcher.queued >= queued:
                break

    def _readable(self, wait: float) -> bool:
        """Wait up to *wait* seconds for input (or the end); whether there is some."""
        if self._poller is None:
            readable, _, _ = select.select([self._sock], [], [], wait)
            return bool(readable)
        return bool(self._poller.poll(wait * 1000.0))

    def _receive(self, wait: float) -> bytes | None:
        """Bytes read, b"" at end of file, None if nothing came within *wait* seconds."""
        if not self._tls:
            if not self._readable(wait):
                return None
            try:
                return self._sock.recv(_READ_SIZE)
            except TimeoutError:
                return None
        # An SSL object is not safe to read and write from two threads at once:
        # wait for input outside the lock, read under it.
        assert isinstance(self._sock, ssl_module.SSLSocket)
        if not self._sock.pending() and not self._readable(wait):
            return None
        with self._hold():
            try:
                return self._sock.recv(_READ_SIZE)
            except (TimeoutError, ssl_module.SSLWantReadError):
                return None

    def _new_pending(self) -> _Pending:
        return _Pending(self)

    def _lost(self, reason: BaseException | None) -> None:
        with self._hold():
            first = not self._closed
            self.broker.connection_lost(reason)  # the dispatcher cancels the calls still running
            self._serve()
            self._closed = True
            self._deadline = None  # the timers are done
            self._notify()
        if first:
            with suppress(OSError):
                self._sock.close()
            log.debug("%s: connection closed (%s)", self._who(), "no reason given" if reason is None else reason)
            if self._on_close is not None:
                self._on_close(self)


def connect(
    factory: PBClientFactory,
    host: str,
    port: int,
    *,
    timeout: float | None = 30.0,
    ssl_context: ssl_module.SSLContext | None = None,
    server_hostname: str | None = None,
) -> BlockingConnection:
    """Connect *factory* to a PB server over TCP (TLS with *ssl_context*); the connection.

    *timeout* (None: no timeout) bounds connecting and each write, and is the
    default timeout of the connection's blocking calls.
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
    log.debug("%s: connected", connection._who())
    connection.start()
    return connection


def _set_send_timeout(sock: socket.socket, timeout: float | None) -> None:
    if timeout is None:
        return  # the default: writes wait as long as it takes
    seconds = int(timeout)
    micros = int((timeout - seconds) * 1_000_000)
    with suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros))


class BlockingServer:
    """A listening socket, an accept thread and one reader thread per connection.

    ``port`` is the bound port, ``addresses`` the listener's socket names,
    ``connections`` the live connections. :meth:`close` stops it (``with``
    does on exit); :meth:`serve_forever` blocks until it is closed.
    """

    def __init__(
        self,
        factory: PBServerFactory,
        listener: socket.socket,
        ssl_context: ssl_module.SSLContext | None,
        timeout: float | None,
    ) -> None:
        self.factory = factory
        self._listener = listener
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._lock = threading.Lock()
        self._closing = False
        self._stopping = threading.Event()  # close() has begun
        self._done = threading.Event()  # close() has finished
        #: The open connections.
        self.connections: set[BlockingConnection] = set()
        #: Every listener's socket name.
        self.addresses: list[Any] = [listener.getsockname()]
        #: The (first) listener's port.
        self.port: int = self.addresses[0][1]
        listener.settimeout(POLL_INTERVAL)
        self._acceptor = threading.Thread(target=self._accept_loop, name="pbcore-blocking-accept", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        backoff = 0.0
        while not self._closing:
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except Exception as error:  # EMFILE, ENOBUFS, ECONNABORTED...: the next accept may work
                if self._closing or self._listener.fileno() == -1:
                    break  # the listener is closed
                backoff = min(ACCEPT_BACKOFF[1], 2 * backoff) if backoff else ACCEPT_BACKOFF[0]
                log.warning(
                    "accepting a connection failed (%s); trying again in %.1f s",
                    error,
                    backoff,
                    exc_info=not isinstance(error, OSError),
                )
                self._stopping.wait(backoff)
                continue
            try:
                failure = self._start(sock, address)
            except Exception:  # never lose the accept thread
                log.exception("setting up the connection from %s failed; closed it", address)
                with suppress(OSError):
                    sock.close()
                failure = None
            if failure is None:
                backoff = 0.0
                continue
            # Out of threads (or memory for one): the connections waiting would fare no
            # better, so leave them in the backlog for a while, as when accept fails.
            backoff = min(ACCEPT_BACKOFF[1], 2 * backoff) if backoff else ACCEPT_BACKOFF[0]
            log.warning(
                "starting a reader for the connection from %s failed (%s); closed it, accepting again in %.1f s",
                address,
                failure,
                backoff,
            )
            self._stopping.wait(backoff)

    def _start(self, sock: socket.socket, address: Any) -> Exception | None:
        """Set the connection up and start its reader; what starting the reader raised, if it failed."""
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
            log.warning("setting up the connection from %s failed; closed it", address, exc_info=True)
            sock.close()
            return None
        with self._lock:
            refused = self._closing
            if not refused:
                self.connections.add(connection)
        if refused:
            connection.close()
            return None
        log.debug("%s: accepted", connection._who())
        try:
            connection.start()
        except Exception as error:  # no thread to be had ("can't start new thread")
            connection.close()
            return error
        return None

    def _forget(self, connection: BlockingConnection) -> None:
        with self._lock:
            self.connections.discard(connection)

    def close(self, grace: float = 0.0) -> None:
        """Stop accepting; wait up to *grace* seconds for the calls running to finish; close every connection.

        Returns when it is done (a call that does not return is waited for at
        most JOIN_TIMEOUT; its peer sees the end at once all the same).
        """
        with self._lock:
            closing, self._closing = self._closing, True
        if closing:
            if not self._runs_in(threading.current_thread()):
                self._done.wait()  # being closed by another thread: done when it is
            return
        self._stopping.set()
        try:
            with suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the acceptor where the platform allows
            if self._acceptor is not threading.current_thread():
                self._acceptor.join(JOIN_TIMEOUT)
            with suppress(OSError):
                self._listener.close()
            with self._lock:
                connections = list(self.connections)
            deadline = time.monotonic() + grace
            for connection in connections:
                connection._wait_for(connection._idle, max(0.0, deadline - time.monotonic()))
            for connection in connections:
                connection._shut()  # every peer sees the end now
            deadline = time.monotonic() + JOIN_TIMEOUT
            for connection in connections:
                connection._close(max(0.0, deadline - time.monotonic()))
        finally:
            self._done.set()

    def _runs_in(self, thread: threading.Thread) -> bool:
        """Whether *thread* is one of this server's own (the acceptor, a reader)."""
        with self._lock:
            readers = [connection._reader for connection in self.connections]
        return thread is self._acceptor or thread in readers

    def serve_forever(self) -> None:
        """Block until the server is closed (from another thread)."""
        self._done.wait()

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
    backlog: int = 128,
    timeout: float | None = 30.0,
) -> BlockingServer:
    """Serve *factory* on TCP (TLS with *ssl_context*) in background threads; the server.

    *timeout* (None: no timeout) bounds each write to a peer (and TLS handshakes).
    """
    listener = socket.create_server((host, port), backlog=backlog)
    try:
        return BlockingServer(factory, listener, ssl_context, timeout)
    except BaseException:
        listener.close()
        raise


# At the end: the reconnecting client is built on what this module defines.
from .reconnect import ReconnectingClient  # noqa: E402
