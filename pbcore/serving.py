"""The call dispatcher: what becomes of a call the peer makes, the same on every adapter.

::

    dispatcher = Dispatcher(broker, spawn)  # spawn(coroutine) runs it in a task, returns how to cancel it
    broker.receive_data(data)
    dispatcher.dispatch(broker.events())

The rules, in one place:

* **Order.** Calls start in the order they arrived, as in Twisted: a call's
  method runs only once every earlier call's method has run up to its first
  wait. A plain method runs and is answered at once; an ``async`` one is
  handed to *spawn* as a task (asyncio, trio, anyio, or the
  :class:`~pbcore.driver.CoroutineDriver`), and the calls after it start as
  soon as its coroutine first waits (or ends). So a long poll is registered
  before the call that wakes it, whatever the runtime schedules first.
* **Every outcome is an answer.** Whatever the method raises, sync or async,
  and whatever goes wrong serializing its result, the caller gets an error
  answer naming the original exception's type (a relayed
  :class:`~pbcore.flavors.CopiedFailure` keeps the far end's type, value,
  traceback and parents). Nothing the application does drops the connection
  or leaves the caller waiting. An exception is logged with its traceback
  (the ``pbcore.serving`` logger, at ERROR), as Twisted logs what its peer
  will receive; a refusal meant for the caller (a :class:`~pbcore.errors.Error`,
  a :class:`~pbcore.errors.NoSuchMethod`, a refused login) is one line
  without a traceback (DEBUG for an Error, INFO for the others), so that a
  peer cannot fill the log with them.
* **No deadlock.** A call never waits for a slot: PB's central idiom is a
  call that awaits a call back into its caller, which awaits a call to us,
  and so on; a slot that only a later message can free deadlocks such a call
  graph. So past ``Limits.max_running_calls`` async calls running on one
  connection, the next is *refused* at once with a :class:`TooManyCalls`
  error answer.
* **Back-pressure.** No call starts while more than
  ``Limits.output_high_water`` bytes of this connection's output are
  unwritten (what the broker holds, plus what the adapter's *backlog* says it
  holds): a peer that sends calls and never reads the answers costs that
  much, not every answer. The adapter calls :meth:`Dispatcher.resume` when
  its output has drained. While a call waits for that output (or
  ``Limits.max_queued_calls`` calls wait), :attr:`Dispatcher.wants_input` is
  False: the adapter reads no more from the connection until
  *on_input_wanted* is called. Output alone never stops reading: a client
  whose calls fill its output must still read their answers, or a peer
  doing the same would never write again (a deadlock).
* **Cancel on close.** When the connection ends, every call still running is
  cancelled through the canceller *spawn* returned, no answer is sent for
  it, and the calls not started yet are dropped.

Nothing here does I/O, reads a clock or knows an event loop.
"""

from __future__ import annotations

import collections
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from typing import Any

from .broker import Broker
from .cred import LoginFailed
from .errors import Error, NoSuchMethod
from .events import CallReceived, Event
from .isolation import describe
from .preview import PREVIEW_LIMIT, error_text

__all__ = ["CallTask", "Dispatcher", "TooManyCalls"]

log = logging.getLogger("pbcore.serving")


class TooManyCalls(Error):
    """A call was refused: the connection already has ``Limits.max_running_calls`` calls running."""


class CallTask:
    """One served ``async`` call: the coroutine :meth:`run` is what the dispatcher hands to *spawn*.

    :meth:`run` never raises an :class:`Exception`: it answers. The
    dispatcher cancels it (through the canceller *spawn* returned) when the
    connection ends.
    """

    __slots__ = ("_awaitable", "_cancelled", "_canceller", "_dispatcher", "_event", "_ran", "method")

    def __init__(self, dispatcher: Dispatcher, event: CallReceived, awaitable: Awaitable[Any]) -> None:
        self._dispatcher = dispatcher
        self._event: CallReceived | None = event
        self._awaitable: Awaitable[Any] | None = awaitable
        self._canceller: Callable[[], object] | None = None
        self._cancelled = False
        self._ran = False
        #: The method's name (for the adapter's logs and task names).
        self.method = event.method

    @property
    def cancelled(self) -> bool:
        """Whether the dispatcher has cancelled this call (its connection ended)."""
        return self._cancelled

    def cancel(self) -> None:
        """Cancel the call: no answer will be sent (the dispatcher calls this when the connection ends)."""
        if self._cancelled:
            return
        self._cancelled = True
        if not self._ran:
            self._close_unstarted()
        if self._canceller is not None:
            self._canceller()

    def _set_canceller(self, canceller: Callable[[], object]) -> None:
        self._canceller = canceller
        if self._cancelled:
            canceller()

    async def run(self) -> None:
        """Await the method, then send its answer (or error answer)."""
        event, awaitable = self._event, self._awaitable
        if event is None or awaitable is None or self._cancelled:
            self._dispatcher._waited(self)
            return
        self._ran = True
        # Drop what the call holds as soon as it is over: the arguments may be
        # references the peer counts, and a task object may outlive the call.
        self._event = self._awaitable = None
        try:
            result = await _FirstWait(awaitable, lambda: self._dispatcher._waited(self))
        except BaseException as error:
            self._dispatcher._finished(self)
            if self._cancelled or not isinstance(error, Exception):
                if not self._cancelled and event.answer_required:
                    # The runtime cancelled it on its own (not the end of the connection).
                    self._dispatcher._fail(event, Error(f"the call of {event.method} was cancelled"), log_it=False)
                raise
            self._dispatcher._fail(event, error)
            return
        finally:
            del awaitable
            self._dispatcher._waited(self)  # if it never got as far as a wait
        self._dispatcher._finished(self)
        if not self._cancelled:
            self._dispatcher._answer(event, result)

    def _close_unstarted(self) -> None:
        awaitable, self._awaitable, self._event = self._awaitable, None, None
        close = getattr(awaitable, "close", None)
        if close is not None:
            close()  # a coroutine that will never run: no "never awaited" warning

    def __repr__(self) -> str:
        return f"<CallTask {self.method}{' cancelled' if self._cancelled else ''}>"


class _FirstWait:
    """Awaits *awaitable* as ``await`` would, calling *on_wait* the first time it waits (or ends).

    This is how the dispatcher knows a call's method has run up to its first
    wait, in whatever runtime runs it: the next call may start then.
    """

    __slots__ = ("_awaitable", "_on_wait")

    def __init__(self, awaitable: Awaitable[Any], on_wait: Callable[[], object]) -> None:
        self._awaitable = awaitable
        self._on_wait = on_wait

    def __await__(self) -> Generator[Any, Any, Any]:
        steps = self._awaitable.__await__()
        del self._awaitable
        try:
            value = steps.send(None)
        except StopIteration as done:
            return done.value
        finally:
            self._on_wait()
        # From here on, exactly what ``yield from steps`` does (PEP 380).
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                steps.close()
                raise
            except BaseException as error:
                try:
                    value = steps.throw(error)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    value = steps.send(sent)
                except StopIteration as done:
                    return done.value


class Dispatcher:
    """Runs the calls one connection's peer makes, and answers every one (see the module docstring).

    *spawn* runs a coroutine in a task of the adapter's runtime and returns a
    function that cancels that task: ``lambda c: loop.create_task(c).cancel``
    for asyncio, ``lambda c: driver.spawn(c).cancel`` with no loop.
    """

    def __init__(
        self,
        broker: Broker,
        spawn: Callable[[Coroutine[Any, Any, None]], Callable[[], object]],
        *,
        backlog: Callable[[], int] | None = None,
        on_input_wanted: Callable[[], object] | None = None,
    ) -> None:
        self.broker = broker
        self._spawn = spawn
        self._backlog = backlog
        self._on_input_wanted = on_input_wanted
        self._reader_waits = False  # wants_input said False; on_input_wanted is owed
        self._refusing = False  # a TooManyCalls warning was logged; quiet until a call is accepted again
        #: The async calls running now.
        self.running: set[CallTask] = set()
        # Calls received and not started; None while there are none (an idle
        # connection's empty deque would be 600 bytes).
        self._queue: collections.deque[CallReceived] | None = None
        self._starting: CallTask | None = None  # spawned, and not yet at its first wait
        self._dispatching = False
        broker.notifyOnDisconnect(self._cancel_all)

    @property
    def queued(self) -> int:
        """Calls received and not started yet (waiting for the output to drain, or for an earlier call's first wait)."""
        return len(self._queue) if self._queue is not None else 0

    @property
    def wants_input(self) -> bool:
        """False while calls wait for the output to drain, or ``Limits.max_queued_calls`` wait.

        Then read nothing more until *on_input_wanted* is called.
        """
        if not self._holding():
            return True
        self._reader_waits = True
        return False

    def _holding(self) -> bool:
        # Calls the peer sent wait: reading on would only queue more (each costing its message)
        # behind them. With none waiting, reading goes on however full the output is, so that
        # the answers to our own calls still come in.
        queued = self.queued
        if not queued or self.broker.closed:
            return False
        return queued >= self.broker.limits.max_queued_calls or self.output_full

    @property
    def output_full(self) -> bool:
        """Whether more than ``Limits.output_high_water`` bytes of output are unwritten (no call starts then)."""
        held = self.broker.bytes_to_send
        if self._backlog is not None:
            held += self._backlog()
        return held > self.broker.limits.output_high_water

    def resume(self) -> None:
        """The adapter's output has drained (some of it): start the calls that waited for it."""
        self._start_queued()

    def dispatch(self, events: Iterable[Event]) -> None:
        """Start the calls among *events* in order, after those received before (see the module docstring)."""
        queue = self._queue
        for event in events:
            if isinstance(event, CallReceived):
                if queue is None:
                    queue = self._queue = collections.deque()
                queue.append(event)
        self._start_queued()

    def _start_queued(self) -> None:
        if self._dispatching:
            return  # re-entered from a call spawned (and run up to its first wait) by the loop below
        queue = self._queue
        self._dispatching = True
        try:
            while queue and self._starting is None and not self.broker.closed and not self.output_full:
                event = queue.popleft()
                task = self._start(event)
                if task is None:
                    continue
                self._starting = task
                coroutine = task.run()
                try:
                    canceller = self._spawn(coroutine)
                except Exception as error:  # the runtime is shutting down, say
                    coroutine.close()
                    self._starting = None
                    task._close_unstarted()
                    self._finished(task)
                    self._fail(event, error)
                    continue
                task._set_canceller(canceller)
        finally:
            self._dispatching = False
            if queue is not None and not queue and self._queue is queue:
                self._queue = None
        if self._reader_waits and not self._holding():
            self._reader_waits = False
            if self._on_input_wanted is not None:
                self._on_input_wanted()

    def _start(self, event: CallReceived) -> CallTask | None:
        """Invoke one call: answered now (None returned), or a :class:`CallTask` to spawn."""
        broker = self.broker
        try:
            result = event.invoke()
        except Exception as error:
            self._fail(event, error)
            return None
        if type(result) in _PLAIN_RESULTS or not inspect.isawaitable(result):
            self._answer(event, result)
            return None
        limit = broker.limits.max_running_calls
        if len(self.running) >= limit:
            close = getattr(result, "close", None)
            if close is not None:
                close()
            refusal = TooManyCalls(f"refused {event.method}: {limit} calls of this connection are already running")
            # One warning while the connection stays at its limit: a flood must not flood the log.
            if not self._refusing:
                self._refusing = True
                log.warning(
                    "%s: %s (the next refusals while it stays full are logged at DEBUG)", _peer(broker), refusal
                )
            else:
                log.debug("%s: %s", _peer(broker), refusal)
            if event.answer_required:
                broker.send_error(event.request_id, refusal)
            return None
        self._refusing = False
        task = CallTask(self, event, result)
        self.running.add(task)
        return task

    # -- outcomes ------------------------------------------------------------------------

    def _answer(self, event: CallReceived, result: Any) -> None:
        if not event.answer_required:
            return
        unsent = self.broker.send_answer(event.request_id, result, event.perspective)
        if unsent is not None:
            log.error(
                "%s: the result of %s could not be sent; the caller gets an error answer\n%s",
                _peer(self.broker),
                event.method,
                describe(unsent),
            )

    def _fail(self, event: CallReceived, error: BaseException, *, log_it: bool = True) -> None:
        if log_it:
            peer, outcome = _peer(self.broker), _outcome(event)
            if isinstance(error, _EXPECTED):
                # A refusal the caller is meant to get (a pb.Error, a refused login, a missing
                # method): one line, no traceback, so that a peer cannot flood the log with them.
                level = logging.DEBUG if isinstance(error, Error) else logging.INFO
                text = error_text(error, PREVIEW_LIMIT)
                log.log(level, "%s: %s raised %s: %s; %s", peer, event.method, type(error).__name__, text, outcome)
            else:
                log.error(
                    "%s: %s raised %s; %s\n%s", peer, event.method, type(error).__name__, outcome, describe(error)
                )
        if event.answer_required:
            self.broker.send_error(event.request_id, error)

    def _waited(self, task: CallTask) -> None:
        if self._starting is task:
            self._starting = None
            self._start_queued()

    def _finished(self, task: CallTask) -> None:
        self.running.discard(task)

    def _cancel_all(self) -> None:
        if self._queue is not None:
            self._queue.clear()  # the loop in _start_queued may be holding it
            self._queue = None
        self._starting = None
        running, self.running = self.running, set()
        for task in running:
            try:
                task.cancel()
            except Exception as error:
                log.error("%s: cancelling %r failed\n%s", _peer(self.broker), task, describe(error))


#: Results known not to be awaitable without asking inspect (which asks the Awaitable ABC).
_PLAIN_RESULTS = frozenset({type(None), int, str, bytes, float, bool, list, tuple, dict})

#: Exceptions that are answers, not bugs: logged without a traceback.
_EXPECTED = (Error, NoSuchMethod, LoginFailed)


def _outcome(event: CallReceived) -> str:
    return "the caller gets an error answer" if event.answer_required else "it was a one-way call"


def _peer(broker: Broker) -> str:
    peer = broker.peer
    return "a peer" if peer is None else f"peer {peer}"
