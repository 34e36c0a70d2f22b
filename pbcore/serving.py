"""The call dispatcher: what becomes of a call the peer makes, the same on every adapter.

::

    dispatcher = Dispatcher(broker)
    broker.receive_data(data)
    for task in dispatcher.dispatch(broker.events()):
        schedule(task)          # the adapter runs ``await task.run()`` in a task of its own,
                                # after task.set_canceller(<how to cancel that task>)

The rules, in one place:

* **Order.** Calls start in the order they arrived. A plain method runs at
  once and is answered at once; an ``async`` one is invoked at once too (its
  coroutine is made) and handed back as a :class:`CallTask` for the adapter
  to run.
* **Every outcome is an answer.** Whatever the method raises, sync or async,
  and whatever goes wrong serializing its result, the caller gets an error
  answer naming the original exception's type (a relayed
  :class:`~pbcore.flavors.CopiedFailure` keeps the far end's type, value,
  traceback and parents). Nothing the application does drops the connection
  or leaves the caller waiting. An exception that is not a
  :class:`~pbcore.errors.Error` is logged with its traceback (the
  ``pbcore.serving`` logger), as Twisted logs what its peer will receive.
* **No deadlock.** A call never waits for a slot: PB's central idiom is a
  call that awaits a call back into its caller, which awaits a call to us,
  and so on; a slot that only a later message can free deadlocks such a call
  graph. So there is no queue: past ``Limits.max_running_calls`` async calls
  running on one connection, the next is *refused* at once with a
  :class:`TooManyCalls` error answer. Memory is bounded by that figure, and by
  the adapter's back-pressure on reading (it stops reading while the peer
  does not read what it is sent).
* **Cancel on close.** When the connection ends, every call still running is
  cancelled through the canceller its adapter installed, and no answer is
  sent for it.

Nothing here does I/O, reads a clock or knows an event loop: the adapter
decides how a :class:`CallTask` runs (an asyncio task, a trio task, the
:class:`~pbcore.driver.CoroutineDriver` with no loop at all).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .broker import Broker
from .errors import Error
from .events import CallReceived, Event

__all__ = ["CallTask", "Dispatcher", "TooManyCalls"]

log = logging.getLogger("pbcore.serving")


class TooManyCalls(Error):
    """A call was refused: the connection already has ``Limits.max_running_calls`` calls running."""


class CallTask:
    """One served ``async`` call, for the adapter to run: ``await task.run()``.

    The adapter installs, with :meth:`set_canceller`, a function that cancels
    the task it runs this in; the dispatcher calls it when the connection
    ends. :meth:`run` never raises an :class:`Exception`: it answers.
    """

    __slots__ = ("_awaitable", "_cancelled", "_canceller", "_dispatcher", "_event", "_started", "method")

    def __init__(self, dispatcher: Dispatcher, event: CallReceived, awaitable: Awaitable[Any]) -> None:
        self._dispatcher = dispatcher
        self._event: CallReceived | None = event
        self._awaitable: Awaitable[Any] | None = awaitable
        self._canceller: Callable[[], object] | None = None
        self._cancelled = False
        self._started = False
        #: The method's name (for the adapter's logs and task names).
        self.method = event.method

    def set_canceller(self, canceller: Callable[[], object]) -> None:
        """How to cancel the task running :meth:`run` (``task.cancel``, ``scope.cancel``...)."""
        self._canceller = canceller
        if self._cancelled:
            canceller()

    @property
    def cancelled(self) -> bool:
        """Whether the dispatcher has cancelled this call (its connection ended)."""
        return self._cancelled

    def cancel(self) -> None:
        """Cancel the call: no answer will be sent (called by the dispatcher when the connection ends)."""
        if self._cancelled:
            return
        self._cancelled = True
        if not self._started:
            self._close_unstarted()
        if self._canceller is not None:
            self._canceller()

    async def run(self) -> None:
        """Await the method, then send its answer (or error answer)."""
        event, awaitable = self._event, self._awaitable
        if event is None or awaitable is None or self._cancelled:
            return
        self._started = True
        # Drop what the call holds as soon as it is over: the arguments may be
        # references the peer counts, and a task object may outlive the call.
        self._event = self._awaitable = None
        try:
            result = await awaitable
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


class Dispatcher:
    """Runs the calls one connection's peer makes, and answers every one (see the module docstring)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        #: The async calls running now.
        self.running: set[CallTask] = set()
        broker.notifyOnDisconnect(self._cancel_all)

    def dispatch(self, events: Iterable[Event]) -> list[CallTask]:
        """Start the calls among *events*, in order; return the async ones, for the adapter to run."""
        tasks: list[CallTask] = []
        for event in events:
            if isinstance(event, CallReceived):
                task = self.start(event)
                if task is not None:
                    tasks.append(task)
        return tasks

    def start(self, event: CallReceived) -> CallTask | None:
        """Invoke one call: answered now (None returned), or a :class:`CallTask` to run."""
        broker = self.broker
        if broker.closed:
            return None
        try:
            result = event.invoke()
        except Exception as error:
            self._fail(event, error)
            return None
        if not inspect.isawaitable(result):
            self._answer(event, result)
            return None
        limit = broker.limits.max_running_calls
        if len(self.running) >= limit:
            close = getattr(result, "close", None)
            if close is not None:
                close()
            refusal = TooManyCalls(f"refused {event.method}: {limit} calls of this connection are already running")
            log.warning("%s: %s", _peer(broker), refusal)
            if event.answer_required:
                broker.send_error(event.request_id, refusal)
            return None
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
                "%s: the result of %s could not be sent; the caller gets an error answer",
                _peer(self.broker),
                event.method,
                exc_info=unsent,
            )

    def _fail(self, event: CallReceived, error: BaseException, *, log_it: bool = True) -> None:
        if log_it:
            # As Twisted: a pb.Error is an expected answer; anything else is a bug worth a traceback.
            level = logging.DEBUG if isinstance(error, Error) else logging.ERROR
            log.log(
                level,
                "%s: %s raised %s; %s",
                _peer(self.broker),
                event.method,
                type(error).__name__,
                "the caller gets an error answer" if event.answer_required else "it was a one-way call",
                exc_info=error,
            )
        if event.answer_required:
            self.broker.send_error(event.request_id, error)

    def _finished(self, task: CallTask) -> None:
        self.running.discard(task)

    def _cancel_all(self) -> None:
        running, self.running = self.running, set()
        for task in running:
            try:
                task.cancel()
            except Exception:
                log.exception("%s: cancelling %r failed", _peer(self.broker), task)


def _peer(broker: Broker) -> str:
    peer = broker.peer
    return "a peer" if peer is None else f"peer {peer}"
