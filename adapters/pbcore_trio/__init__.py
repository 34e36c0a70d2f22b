"""pbcore over trio: ``serve()``, ``open_server()`` and ``open_connection()`` (TCP, TLS, unix sockets).

::

    import pbcore, pbcore_trio, trio

    async def main():
        async with pbcore_trio.open_server(pbcore.PBServerFactory(MyRoot())) as server:
            factory = pbcore.PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                with trio.fail_after(5):
                    print(await root.callRemote("echo", "hello"))

The shape is the one every adapter has (docs/adapters.md). ``async with
open_server(factory, host, port) as server`` serves until the block ends;
``await nursery.start(serve, factory, host, port)`` hands the same
:class:`Server` to a nursery of yours and serves until :meth:`Server.close`
or cancelled. ``server.port`` is the bound port, ``server.addresses`` every
listener's address, ``server.connections`` the live :class:`Connection`
objects; ``server.close(grace)`` stops accepting at once, lets the calls
running finish for up to *grace* seconds, then closes every connection. Each
connection's tasks run in the server's nursery (no nursery per connection),
and nothing they raise reaches the server: an application bug costs at most
its own connection (logged under ``pbcore.trio``).

An idle connection on a plain socket is one task, its reader: the writer task
exists only while output waits for the socket, a call's task while it runs,
and the reader runs the timers itself (below).

Calls run through :class:`pbcore.serving.Dispatcher`, which starts them in
arrival order, answers every outcome, refuses a call past
``Limits.max_running_calls`` instead of queueing it, and cancels the calls
still running when the connection ends. Remote methods may be ``async``
(trio code): a plain method is answered at once; an async one goes on in a
task of its own (in a cancel scope the dispatcher can cancel), started before
the next call is invoked, so it runs up to its first ``await`` in arrival
order, as under Twisted. A call's result is a :class:`PendingResult` that trio
awaits; cancelling the awaiting task (``trio.move_on_after``,
``trio.fail_after``) forgets the call, so a late answer is dropped.

This is also the adapter for anyio applications on the trio backend (they run
on trio, so everything here works unchanged under ``anyio.run(...,
backend="trio")``).

On a plain TCP or unix socket, output is written at once (a non-blocking
send, from the task that made it, or by the reader for the answers to what it
read) when no writer task is sending: a round trip needs no task switch.
What the socket does not take, output queued behind a send in progress, and
everything on a TLS stream go out through the writer task, started for it
and ended once all is written.

Memory stays bounded when a peer stops reading: the writer sends through the
stream's ``send_all`` up to the broker's ``Limits.output_high_water`` at a
time; while more than that waits to be written no further call starts (the
dispatcher counts this backlog, see :mod:`pbcore.serving`), and this side
stops reading from that peer while calls of its wait for it (or the
dispatcher holds ``Limits.max_queued_calls`` calls): never for a full output
alone, so the answers to this side's own calls still come in. The writer
starts the calls that waited as the backlog drains. A peer that sends garbage gets its own connection closed;
the others go on. When the broker closes itself (the application called its
``connection_lost``, or a peer asked for too many references), nothing more is
read, what was queued before goes out (for up to :data:`CLOSE_TIMEOUT`
seconds) and the socket is closed.

Time is the core's (:mod:`pbcore.timers`): each connection's
``connection.timers`` is polled on ``trio.current_time()`` after the
connection starts, after every chunk read, when new output is written and
when the deadline it asked for comes. On a plain socket the reader keeps that
deadline: it reads in a cancel scope whose deadline is the timers' (a poll
from any task, a call with a ``pbtimeout`` say, moves it sooner), and wakes
up to run them. A TLS stream has a timer task instead: trio's ``SSLStream``
is left unusable by a cancelled ``receive_some``, so its reader cannot be
woken that way. So a silent port fails ``getRootObject()``, a
peer gone silent is probed and dropped, and ``callRemote(...,
pbtimeout=seconds)`` fails with :class:`~pbcore.errors.CallTimedOut`, as the
factory's ``Timeouts`` say (whose ``tcp_keepalive``, if set, is applied to
each connection's socket as well).

Ordering is Twisted's: calls are invoked in the order they arrived, and a task
awaiting an answer wakes up only after the calls that arrived before that
answer (a cache's ``observe_`` update, say) have been invoked.

All the protocol lives in :mod:`pbcore`; this module moves bytes, runs what the
dispatcher hands it, and wires the broker's wake-up to trio.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import logging
import math
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from typing import Any

import trio

from pbcore.banana import DEFAULT_LIMITS
from pbcore.broker import Broker
from pbcore.errors import ProtocolError
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.isolation import describe
from pbcore.serving import Dispatcher
from pbcore.timers import ConnectionTimers

__all__ = [
    "CHUNK",
    "CLOSE_TIMEOUT",
    "Connection",
    "HIGH_WATER",
    "PendingResult",
    "ReconnectingClient",
    "Server",
    "open_connection",
    "open_server",
    "open_unix_connection",
    "serve",
    "serve_listeners",
    "serve_unix",
]

#: Bytes read at a time.
CHUNK = 64 * 1024
#: The default ``Limits.output_high_water``: above that many unwritten bytes a connection stops
#: reading and starting calls; also the most written at once. (Each connection uses its broker's.)
HIGH_WATER = DEFAULT_LIMITS.output_high_water
#: How long :meth:`Connection.aclose` (and a broker that closed itself) waits for queued bytes to be written.
CLOSE_TIMEOUT = 5.0
#: How long accepting pauses after it failed (out of file descriptors, say): from the first
#: figure, doubling up to the second while it keeps failing (the figures of every adapter).
ACCEPT_BACKOFF = (0.1, 1.0)

log = logging.getLogger("pbcore.trio")
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
        self._woken = False
        self._waiters: list[trio.lowlevel.Task] = []  # the tasks awaiting it, parked until wake()
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
        if not self._woken:
            self._woken = True
            waiters, self._waiters = self._waiters, []
            for task in waiters:
                trio.lowlevel.reschedule(task)

    def __await__(self) -> Generator[Any, None, Any]:
        # What trio.Event().wait() does, without an event per call: park the
        # task until wake() (no checkpoint if woken already, as an event set).
        if not self._woken:
            task = trio.lowlevel.current_task()
            self._waiters.append(task)

            def abort(_: Any) -> trio.lowlevel.Abort:
                self._waiters.remove(task)
                return trio.lowlevel.Abort.SUCCEEDED

            try:
                yield from trio.lowlevel.wait_task_rescheduled(abort).__await__()
            except trio.Cancelled:
                if not self.done and self._on_cancel is not None:
                    self._on_cancel(self)
                raise
        if self._error is not None:
            raise self._error
        return self._value


class Connection:
    """One PB connection over a trio stream: its broker and dispatcher, a reader, a writer and the calls it runs.

    :meth:`run` serves it until EOF, a stream error, bad input from the peer
    (a ProtocolError: only this connection closes), :meth:`close`, or the
    broker closing itself; then the calls still waiting fail with
    PBConnectionLost, the calls still running are cancelled and the stream is
    closed. ``peer`` (also ``broker.peer``) is the peer's address.

    An idle connection is one task: the one reading (on a TLS stream, a timer
    task as well). The writer task runs only while output waits for the
    socket, and the calls' tasks while they run. A served connection's tasks
    run in the server's nursery.
    """

    __slots__ = (
        "__weakref__",
        "_calls_done",
        "_closed",
        "_draining",
        "_ended",
        "_flush_follows",
        "_flush_scheduled",
        "_held",
        "_high_water",
        "_input_wanted",
        "_now",
        "_nursery",
        "_outgoing",
        "_parked",
        "_polling",
        "_progress",
        "_raw",
        "_read_full",
        "_sending",
        "_sent_at_once",
        "_shared",
        "_sleep",
        "_stopping",
        "_tasks",
        "_tasks_ended",
        "_thread",
        "_token",
        "_unpolled",
        "_unstarted",
        "_wait",
        "_wake_at",
        "_writer",
        "broker",
        "close_reason",
        "dispatcher",
        "peer",
        "stream",
        "timers",
    )

    def __init__(self, stream: trio.abc.Stream, make_broker: Callable[..., Broker], peer: Any = None) -> None:
        self.stream = stream
        #: The peer's address, as the socket gives it (None if unknown).
        self.peer = peer
        self._token = trio.lowlevel.current_trio_token()
        self._outgoing = bytearray()
        # The events below are made only when a task is about to wait for them (none in the idle state).
        self._progress: trio.Event | None = None  # set (and dropped) after each chunk written; set when stopping
        self._calls_done: trio.Event | None = None  # set (and dropped) when the last served call running ends
        self._parked: trio.lowlevel.Task | None = None  # the reader, waiting for a spawned call's first step
        self._input_wanted: trio.Event | None = None  # set when the dispatcher, having held too many calls, wants more
        self._tasks_ended: trio.Event | None = None  # set when the last task of this connection's ends
        self._closed: trio.Event | None = None  # the ``closed`` event, once asked for
        self._ended = False  # closed
        self._unstarted = 0  # calls spawned that have not taken their first step
        self._tasks = 0  # this connection's tasks running, besides the reader: the writer, calls, a timer
        self._nursery: trio.Nursery | None = None  # where those run: the server's, or the connection's own
        self._shared = False  # that nursery is the server's: nothing a task raises may reach it
        self._writer: trio.CancelScope | None = None  # the writer task's, while there is one
        # The scope the reader reads in (see _serve), cancelled to stop it: closing, or the broker
        # closed itself.
        self._wait: trio.CancelScope | None = None
        self._stopping = False
        self._draining = False
        self._flush_scheduled = False
        # True while our own code drives the broker synchronously and flushes right after.
        self._flush_follows = False
        # The plain socket under a SocketStream, written at once when the writer is idle (None: a
        # TLS or other stream, written by the writer task only).
        self._raw = _raw_socket_of(stream)
        self._sending = False  # the writer is in send_all (what it sends is still at the head of _outgoing)
        # An output hook has written at once since the writer or the reader last ran: more output
        # from hooks in this step (a window of calls) goes to the writer, in one send.
        self._sent_at_once = False
        self._polling = False
        self._read_full = False  # the last read filled a chunk: read again without waiting
        self._thread = threading.get_ident()
        # While the reader handles what one chunk brought, settled results wait
        # here: their tasks wake up once the calls that came before the answer
        # (a cache's observe_ update, say) have started, as in Twisted.
        self._held: list[PendingResult] | None = None
        #: Why it closed: None for EOF or a local close, else the error.
        self.close_reason: BaseException | None = None
        # settled_events=False: this adapter reads only CallReceived (a call's result settles its
        # PendingResult directly), so the broker queues no AnswerReceived/ErrorReceived per answer.
        self.broker = make_broker(
            pending_factory=self._new_pending,
            wake_up=self._wake_up,
            on_output=self._output_queued,
            peer=peer,
            settled_events=False,
        )
        #: The broker's timers (handshake, keepalive, dead peer, call deadlines), polled on trio's clock.
        self.timers = ConnectionTimers(self.broker)
        # The connection's one wake-up: the scope the reader waits for input in (on a TLS stream,
        # the timer task sleeps in), whose deadline is the timers' next one.
        self._sleep: trio.CancelScope | None = None
        self._wake_at = math.inf  # that deadline
        self._now = trio.lowlevel.current_clock().current_time  # what trio.current_time() reads
        keepalive, sock = self.broker.timeouts.tcp_keepalive, _socket_of(stream)
        if keepalive is not None and sock is not None:
            keepalive.apply(sock, socket)  # the kernel's keepalive too, when asked
        self._unpolled = False  # output taken since the last poll (a call's deadline to arm, maybe)
        self._high_water = self.broker.limits.output_high_water
        #: Runs the calls the peer makes (``dispatcher.running``: the async ones running now).
        self.dispatcher = Dispatcher(
            self.broker, self._spawn, backlog=self._unwritten, on_input_wanted=self._want_input
        )

    @property
    def closed(self) -> trio.Event:
        """Set once the connection is closed."""
        event = self._closed
        if event is None:
            event = self._closed = trio.Event()
            if self._ended:
                event.set()
        return event

    @property
    def backlog(self) -> int:
        """Bytes queued for the peer and not written yet."""
        return len(self._outgoing)

    def _unwritten(self) -> int:
        return len(self._outgoing)  # the dispatcher's backlog (a bound method is cheaper than the property)

    def _want_input(self) -> None:
        if self._input_wanted is not None:
            self._input_wanted.set()

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
        """Wait until the connection is closed."""
        await self.closed.wait()

    async def run(self) -> None:
        """Serve the connection until it closes (see the class docstring)."""
        async with trio.open_nursery() as nursery:
            await self._serve(nursery)

    async def _serve(self, nursery: trio.Nursery, server: Server | None = None) -> None:
        # This task is the reader (one function, not a stack of them: an idle connection's frames
        # are most of what it costs); the other tasks start in *nursery*. Served (*server* given),
        # that is the server's nursery: nothing this connection raises may reach it (an
        # application bug, a rootObject that raises say, costs this connection only).
        self._nursery, self._shared = nursery, server is not None
        dispatcher, raw = self.dispatcher, self._raw
        try:
            self.broker.connection_made()
            self._flush()
            self._poll()
            if raw is None:
                # A TLS (or other) stream: the timers get a task of their own. Trio's SSLStream
                # may not be cancelled in receive_some (that leaves it unusable), so its reader
                # cannot wait under the timers' deadline as a plain socket's does.
                self._start(self._timer)
            # Read until the connection stops or the broker closes itself, in a cancel scope that
            # closing cancels (a new one only once it is: entering one costs more than a round
            # trip's reads). On a plain socket its deadline is the timers' (a poll from any task
            # moves it sooner: see _poll). Cancelled, the reader has read nothing: it was waiting
            # for readability, in SocketStream's receive_some, or for the dispatcher to want input
            # (it does not wait anywhere else: _wait_started cannot be cancelled); on its deadline
            # it runs the timers and reads on in a new scope.
            while not (self._stopping or self._draining):
                if raw is None:
                    scope = self._wait = trio.CancelScope()
                else:
                    scope = self._wait = self._sleep = trio.CancelScope(deadline=self._wake_at)
                with scope:
                    while not (self._stopping or self._draining):
                        try:
                            if not dispatcher.wants_input:
                                await self._wait_to_read()  # (not called when it would return at once: the hot path)
                            if raw is None or self._read_full:
                                data = await self.stream.receive_some(CHUNK)  # after a full chunk, more at once
                            else:
                                # After a read shorter than a chunk (the socket is most likely
                                # empty: a round trip's answer) wait until it is readable, sparing
                                # the read that finds nothing.
                                await trio.lowlevel.wait_readable(raw)
                                try:
                                    data = raw.recv(CHUNK)
                                except (BlockingIOError, InterruptedError):
                                    continue  # woken for nothing: wait again
                                except OSError as error:
                                    raise _stream_error(error) from None
                        except _STREAM_ERRORS as error:
                            self._stop(error)
                            break
                        if not data:  # EOF
                            self._stop(None)
                            break
                        self._read_full = len(data) == CHUNK
                        self._sent_at_once = False  # a new step: a hook may write at once again
                        self._held = []
                        try:
                            self._flush_follows = True
                            try:
                                self.broker.receive_data(data)
                            except ProtocolError as error:
                                # The broker has closed (and logged why); drop this connection only.
                                self._stop(error)
                                break
                            finally:
                                self._flush_follows = False
                            self._start_calls()
                            spawned = self._unstarted
                            if spawned:
                                await self._wait_started()
                        finally:
                            self._release_held()
                        if spawned:
                            self._flush()  # what the async calls wrote in their first steps (else nothing came since)
                        self._poll()
                if scope.cancelled_caught and raw is not None and not (self._stopping or self._draining):
                    self._wake_at = math.inf  # the timers' deadline came
                    self._poll()
            if not self._stopping:
                # The broker closed itself: what it queued before goes out, then the socket closes.
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._wait_backlog(0)
                self._stop(self.close_reason)
        except Exception as error:
            if server is None:
                raise
            # As text, not exc_info: a handler keeping records would keep the connection's frames alive.
            log.error("the connection from %s failed; the server goes on\n%s", self.peer, describe(error))
        except BaseException as error:
            split = getattr(error, "split", None)  # a BaseExceptionGroup: bugs along with Cancelled
            if split is None or server is None:
                raise
            bugs, rest = split(Exception)
            if bugs is None:
                raise
            log.error("the connection from %s failed; the server goes on\n%s", self.peer, describe(bugs))
            if rest is not None:
                raise rest from None
        finally:
            self._stopping = True
            self._cancel_tasks()
            self.broker.connection_lost(self.close_reason)  # once; pending calls fail, running ones are cancelled
            self._outgoing.clear()
            try:
                while self._tasks:  # the writer, a timer, calls: cancelled, ending
                    ended = self._tasks_ended = trio.Event()
                    await ended.wait()
            finally:
                try:
                    await trio.aclose_forcefully(self.stream)
                finally:
                    self._ended = True
                    if server is not None:
                        server.connections.discard(self)
                    if self._closed is not None:
                        self._closed.set()
                    if self._calls_done is not None:
                        self._calls_done.set()
                    self._made_progress()
                    log.debug("closed the connection with %s (%s)", self.peer, self.close_reason or "no error")

    # -- inside --------------------------------------------------------------------------------

    def _stop(self, reason: BaseException | None) -> None:
        if not self._stopping:
            self._stopping = True
            if not self._draining:
                self.close_reason = reason
            self._made_progress()
            self._unpark()  # the reader, waiting for calls to start: it stops now
            self._cancel_tasks()

    def _cancel_tasks(self) -> None:
        # The reader's wait, the writer and a timer task (the calls: the dispatcher cancels
        # them on connection_lost).
        for scope in (self._wait, self._writer, self._sleep):
            if scope is not None:
                scope.cancel()

    def _start(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        # A task of this connection's, counted (the connection closes once they are over).
        assert self._nursery is not None
        self._tasks += 1
        self._nursery.start_soon(self._guarded, fn, *args, name=fn)

    async def _guarded(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        try:
            await fn(*args)
        except Exception as error:
            if not self._shared:
                raise  # the connection's own nursery: as from the reader
            # In the server's nursery: a bug here costs this connection, not the server.
            log.error("the connection with %s failed; the server goes on\n%s", self.peer, describe(error))
            self._stop(error)
        except BaseException as error:
            split = getattr(error, "split", None)  # a BaseExceptionGroup: bugs along with Cancelled
            if split is None or not self._shared:
                raise
            bugs, rest = split(Exception)
            if bugs is not None:
                log.error("the connection with %s failed; the server goes on\n%s", self.peer, describe(bugs))
                self._stop(bugs)
            if rest is not None:
                raise rest from None
        finally:
            self._tasks -= 1
            if not self._tasks and self._tasks_ended is not None:
                self._tasks_ended.set()

    def _made_progress(self) -> None:
        # Output was written (or the connection stops): wake the tasks waiting for the backlog.
        progress = self._progress
        if progress is not None:
            self._progress = None
            progress.set()

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
        # A call, an answer or the broker closing queued output, and the broker
        # is consistent: take it now, sparing the wake-up's trip through trio's
        # wake-up socket on every call. (Even while a chunk is handled: an answer
        # taken now still goes out if a later call closes the broker, which drops
        # what it holds; the flush that follows the chunk writes it.) Outside a
        # chunk (a call the application makes, an async call's answer) it is
        # written at once if the writer is idle: a round trip needs no task switch.
        if threading.get_ident() != self._thread:
            self._wake_up()
        elif self._flush_follows:
            self._flush(_TAKE)
        elif _CALL_OF.get() is self:
            # A call of this connection's peer is running: its answer is written once the
            # call is over (the dispatcher logs a failure after queueing its error answer,
            # and the peer must not see the answer first); the writer is the backstop, for
            # output the call makes before it awaits something.
            self._flush(_TAKE)
            if self._outgoing:
                self._want_writer()
                if self._sending and self._unpolled and not self._polling:
                    self._poll()  # the writer is in a send the peer may never take: arm a deadline now
        else:
            self._flush(_HOOK)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()
        if self._unpolled and not self._polling:
            self._poll()

    def _flush(self, mode: int = 0) -> None:
        """Take what the broker has to send, and write it: at once if the writer is idle, else the writer does.

        *mode* 0: write (all of it the socket takes now, the rest by the writer);
        ``_HOOK``: the same, unless a hook has written at once in this step
        already (then the writer writes it, with what else comes, in one send),
        and poll the timers after (the call just made may have a deadline);
        ``_TAKE``: only take it (the flush that follows writes it).
        """
        if self._stopping:
            return
        data = self.broker.data_to_send()
        if data:
            self._outgoing += data
            self._unpolled = True
        if self._outgoing and mode != _TAKE:
            if (
                self._raw is not None
                and not self._sending
                and not (mode == _HOOK and self._sent_at_once)
                and not self.dispatcher.queued  # calls wait for the output to drain: the writer resumes them
            ):
                self._send_at_once(self._raw)
                if mode == _HOOK:
                    self._sent_at_once = True
            if self._outgoing:
                # The rest (the socket's buffer is full), a TLS stream, or behind a send in
                # progress: the writer's (which polls the timers when it starts).
                self._want_writer()
            if mode == _HOOK and self._unpolled and not self._polling and (self._sending or not self._outgoing):
                # Arm the deadline of the call just made now, as the writer does when it starts:
                # it will not start (all is written), or not soon (it is in a send the peer may never take).
                self._poll()
        if self.broker.closed and not self._draining:
            # It closed itself (the application called connection_lost, or a peer
            # went over MAX_BROKER_REFS): read no more; run() writes what is queued and closes.
            self._draining = True
            self.close_reason = self.broker.close_reason
            if self._wait is not None:
                self._wait.cancel()  # (if the reader is not waiting, it stops before it waits again)

    def _want_writer(self) -> None:
        # Output waits: start the writer task, unless it runs (its loop takes what was added).
        if self._writer is None and self._nursery is not None and not self._stopping:
            self._writer = trio.CancelScope()
            self._start(self._write, self._writer)

    def _send_at_once(self, raw: socket.socket) -> None:
        # Write what the socket takes now, without a task switch; the writer is
        # idle, so _outgoing is all unwritten, in order. A failure closes the
        # connection as the writer's does (with trio's error for it).
        try:
            sent = raw.send(self._outgoing)
        except (BlockingIOError, InterruptedError):
            return  # the writer waits until the socket can take it
        except OSError as error:
            self._stop(_stream_error(error))
            return
        if sent:
            del self._outgoing[:sent]
            self._made_progress()  # as the writer does after each chunk

    async def _wait_backlog(self, limit: int) -> None:
        while len(self._outgoing) > limit and not self._stopping:
            progress = self._progress
            if progress is None:
                progress = self._progress = trio.Event()
            await progress.wait()  # set (and dropped) after each chunk written

    async def _wait_idle(self) -> None:
        """Wait until no call of the peer's runs and what is queued is written (or the connection stops)."""
        while not self._stopping:
            if self.dispatcher.running:
                done = self._calls_done
                if done is None:
                    done = self._calls_done = trio.Event()
                await done.wait()
            elif self._outgoing:
                await self._wait_backlog(0)
            else:
                return

    async def _wait_to_read(self) -> None:
        # Read nothing more while the dispatcher wants no input: calls wait for the output to
        # drain, or as many wait as may (see pbcore.serving, back-pressure).
        while not self._stopping and not self.dispatcher.wants_input:
            wanted = self._input_wanted = trio.Event()
            try:
                await wanted.wait()
            finally:
                self._input_wanted = None

    def _start_calls(self) -> None:
        # A function of its own, so that no event (holding a result, which may
        # be a reference the application has dropped since) outlives the call.
        self._flush_follows = True
        try:
            self.dispatcher.dispatch(self.broker.events())  # a plain method is answered now
        finally:
            self._flush_follows = False
        self._flush()

    async def _wait_started(self) -> None:
        # The dispatcher starts the next call once an async one has run up to its
        # first wait: the results held wake up only once every call read has. This
        # wait cannot be cancelled (its abort fails; the calls take their first step
        # soon, cancelled or not, and closing wakes it): the reader's scope, cancelled
        # on the timers' deadline mid-chunk, stops it at its next wait for input only.
        while self._unstarted and not self._stopping:
            self._parked = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(_cannot_abort)

    def _unpark(self) -> None:
        parked = self._parked
        if parked is not None:
            self._parked = None
            trio.lowlevel.reschedule(parked)

    def _spawn(self, call: Coroutine[Any, Any, None]) -> Callable[[], object]:
        # The dispatcher's way to run an async call: a task of this connection's,
        # in a cancel scope of its own, the dispatcher's to cancel.
        scope = trio.CancelScope()
        self._start(self._run_call, call, scope)
        self._unstarted += 1
        return scope.cancel

    async def _run_call(self, call: Coroutine[Any, Any, None], scope: trio.CancelScope) -> None:
        self._unstarted -= 1
        self._unpark()  # the reader, if it waits: it runs after this step, when the call has reached its first wait
        _CALL_OF.set(self)  # this task's own (trio gives each task a copy of the context)
        try:
            with scope:
                await call  # answers (the output hook takes the answer; written just below)
        finally:
            # The answer, taken while the call ran: written at once now that the dispatcher
            # is done with it (it logs a failure after queueing the error answer).
            self._flush()
            done = self._calls_done
            if done is not None and not self.dispatcher.running:
                self._calls_done = None
                done.set()

    def _poll(self) -> None:
        # Run the timers now. A deadline sooner than the wake-up's moves it; a
        # later one (input moves the idle deadline on every read) waits for the
        # wake-up, which polls and goes back to sleep: the hot path stays a poll.
        # (What a poll queues, a probe say, is flushed from the output hook,
        # which does not poll again.)
        self._unpolled = False
        self._polling = True
        try:
            deadline = self.timers.poll(self._now())
        finally:
            self._polling = False
        if deadline is not None and deadline < self._wake_at:
            self._wake_at = deadline
            if self._sleep is not None:
                self._sleep.deadline = deadline  # the reader's (or the timer task's) wait, if it waits

    async def _timer(self) -> None:
        # A TLS stream's (see _serve); cancelled through _sleep when the connection stops.
        while not self._stopping:
            with trio.CancelScope(deadline=self._wake_at) as scope:
                self._sleep = scope
                await trio.sleep_forever()  # until the deadline
            self._wake_at = math.inf
            if not self._stopping:
                self._poll()

    async def _write(self, scope: trio.CancelScope) -> None:
        # The writer task: started when output waits for the socket, over once it is all written.
        _CALL_OF.set(None)  # started from a call's task, maybe: this one is not a call
        try:
            self._sent_at_once = False
            if self._unpolled:
                # New output, and no poll since: arm the deadlines of the calls just made.
                # Once, here, for a batch of output.
                self._poll()
            with scope:
                while self._outgoing:
                    chunk = self._outgoing[: self._high_water]  # a large message in one send
                    self._sending = True
                    try:
                        await self.stream.send_all(chunk)
                    except _STREAM_ERRORS as error:
                        self._stop(error)
                        return
                    finally:
                        self._sending = False
                    del self._outgoing[: len(chunk)]
                    self._made_progress()
                    if self.dispatcher.queued:
                        # Start the calls that waited for the output to drain (their answers, if plain, join
                        # _outgoing now and go out in this loop).
                        self.dispatcher.resume()
        finally:
            self._writer = None


#: How :meth:`Connection._flush` is called: from the output hook, or only to take the output.
_HOOK, _TAKE = 1, 2


def _cannot_abort(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


#: The name of a served connection's task (a string given: trio makes none per task).
_CONNECTION = "pbcore_trio.connection"
#: In the task of a served call: the connection whose call it is.
_CALL_OF: contextvars.ContextVar[Connection | None] = contextvars.ContextVar("pbcore_trio_call_of", default=None)


def _raw_socket_of(stream: trio.abc.Stream) -> socket.socket | None:
    """The standard socket under a plain :class:`trio.SocketStream` (not TLS), to write to at once; else None."""
    if type(stream) is not trio.SocketStream:
        return None
    raw = getattr(stream.socket, "_sock", None)  # trio's socket wraps a non-blocking standard one
    return raw if isinstance(raw, socket.socket) and raw.type == socket.SOCK_STREAM else None


def _stream_error(error: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """What trio's ``send_all`` raises for *error* (so that a connection closes with the same reason either way)."""
    if error.errno in (errno.EBADF, errno.ENOTSOCK):
        return trio.ClosedResourceError("this socket was already closed")
    broken = trio.BrokenResourceError(f"socket connection broken: {error}")
    broken.__cause__ = error
    return broken


def _socket_of(obj: Any) -> Any:
    """The trio socket under a stream or listener (under TLS, the transport's), or None."""
    inner = getattr(obj, "transport_stream", None) or getattr(obj, "transport_listener", None) or obj
    return getattr(inner, "socket", None)


def _peer_of(stream: trio.abc.Stream) -> Any:
    sock = _socket_of(stream)
    try:
        return (sock.getpeername() or None) if sock is not None else None  # a unix client may have no name
    except OSError:
        return None


# -- servers ---------------------------------------------------------------------------------


class Server:
    """A listening PB server (what :func:`serve` hands to ``nursery.start`` and :func:`open_server` yields).

    ``port``, ``addresses``, ``listeners`` (trio's), ``connections`` (the live
    :class:`Connection` objects); :meth:`close` / :meth:`wait_closed` /
    :meth:`aclose` stop it, ``async with server:`` closes it on exit.
    """

    def __init__(self, factory: PBServerFactory, listeners: list[trio.abc.Listener[trio.abc.Stream]]) -> None:
        self.listeners = listeners
        self.connections: set[Connection] = set()
        self._factory = factory
        self._nursery: trio.Nursery | None = None
        self._accepting = trio.CancelScope()
        self._grace: trio.CancelScope | None = None  # set once closing: its deadline ends the grace
        self._closed = trio.Event()
        sockets = [_socket_of(listener) for listener in listeners]
        self._addresses = [None if sock is None else sock.getsockname() for sock in sockets]  # None: not a socket

    @property
    def port(self) -> int:
        """The port of the first listener (TCP only): the bound one when asked for port 0."""
        address = self._addresses[0]
        if not isinstance(address, tuple):
            raise ValueError(f"the server listens on {address!r}, which has no port")
        port: int = address[1]
        return port

    @property
    def addresses(self) -> list[Any]:
        """Every listener's socket name (still known once closed)."""
        return list(self._addresses)

    def close(self, grace: float = 0.0) -> None:
        """Stop accepting now, let running calls finish for up to *grace* seconds, then close every connection.

        Returns at once (:meth:`wait_closed` waits for the end). Called again
        while closing, a shorter *grace* ends the wait sooner.
        """
        if self._closed.is_set() or self._nursery is None:
            return
        deadline = trio.current_time() + grace
        if self._grace is not None:
            self._grace.deadline = min(self._grace.deadline, deadline)
            return
        self._grace = trio.CancelScope(deadline=deadline)
        self._accepting.cancel()
        for listener in self.listeners:
            sock = _socket_of(listener)
            if sock is not None:
                sock.close()  # at once: a connection attempt from now on is refused
        self._nursery.start_soon(self._shut, self._grace)

    async def wait_closed(self) -> None:
        """Wait until the server is closed: no listener, no connection left."""
        await self._closed.wait()

    async def aclose(self, grace: float = 0.0) -> None:
        """:meth:`close`, then :meth:`wait_closed`."""
        self.close(grace)
        await self.wait_closed()

    async def serve_forever(self) -> None:
        """Wait until the server is closed (it serves from the start: this only waits)."""
        await self._closed.wait()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- inside --------------------------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._accept_all)
                task_status.started(self)
        finally:
            self._closed.set()

    async def _accept_all(self) -> None:
        with self._accepting:
            async with trio.open_nursery() as nursery:
                for listener in self.listeners:
                    nursery.start_soon(self._accept, listener)

    async def _accept(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        backoff = 0.0
        try:
            while True:
                try:
                    stream = await listener.accept()
                except trio.ClosedResourceError:
                    return  # closed by close()
                except OSError as error:  # EMFILE, ENFILE, ENOBUFS, ENOMEM...: the next accept may work
                    backoff = min(ACCEPT_BACKOFF[1], 2 * backoff) if backoff else ACCEPT_BACKOFF[0]
                    log.warning("accepting a connection failed (%s); trying again in %.1f s", error, backoff)
                    await trio.sleep(backoff)
                    continue
                backoff = 0.0
                if self._grace is not None or self._nursery is None:
                    await trio.aclose_forcefully(stream)
                    return
                self._serve_connection(self._nursery, stream)
        finally:
            await trio.aclose_forcefully(listener)

    def _serve_connection(self, nursery: trio.Nursery, stream: trio.abc.Stream) -> None:
        # The connection's reader is a task of the server's nursery (no nursery per connection),
        # which keeps what the connection raises from the server (see Connection._serve).
        peer = _peer_of(stream)
        log.debug("accepted a connection from %s", peer)
        try:
            connection = Connection(stream, self._factory.make_broker, peer)
        except Exception as error:  # the application's make_broker, say
            log.error("the connection from %s failed; the server goes on\n%s", peer, describe(error))
            nursery.start_soon(trio.aclose_forcefully, stream, name=_CONNECTION)
            return
        self.connections.add(connection)
        nursery.start_soon(connection._serve, nursery, self, name=_CONNECTION)

    async def _shut(self, grace: trio.CancelScope) -> None:
        with grace:
            for connection in list(self.connections):
                await connection._wait_idle()
        for connection in list(self.connections):
            connection.close()


async def serve_listeners(
    factory: PBServerFactory,
    listeners: list[trio.abc.Listener[trio.abc.Stream]],
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *factory* on listeners you made (TLS over them with *ssl_context*) until closed or cancelled."""
    if ssl_context is not None:
        listeners = [trio.SSLListener(listener, ssl_context, https_compatible=False) for listener in listeners]
    try:
        await Server(factory, listeners)._run(task_status=task_status)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def serve(
    factory: PBServerFactory,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
    backlog: int = 128,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve *factory* on TCP *host*:*port* (port 0: a free one; TLS with *ssl_context*) until closed or cancelled.

    ``server = await nursery.start(serve, factory, host, port)``; *host* None listens on every interface.
    """
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    await serve_listeners(factory, list(listeners), ssl_context=ssl_context, task_status=task_status)


@contextlib.asynccontextmanager
async def open_server(
    factory: PBServerFactory,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
    backlog: int = 128,
) -> AsyncIterator[Server]:
    """Serve *factory* for the duration of the block (see :func:`serve`); the server closes on exit."""
    raised: BaseException | None = None
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            functools.partial(serve, factory, host, port, ssl_context=ssl_context, backlog=backlog)
        )
        try:
            yield server
        except BaseException as error:
            raised = error  # raised again outside the nursery, so that it is not wrapped in an ExceptionGroup
        finally:
            server.close()
    if raised is not None:
        raise raised


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

    peer = _peer_of(stream)
    log.debug("connected to %s", peer)
    connection = Connection(stream, make_broker, peer)
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


# At the end: the reconnecting client is built on what this module defines.
from .reconnect import ReconnectingClient  # noqa: E402
