"""Running coroutines with no event loop: they may await PB calls, and nothing else.

Whoever drives a broker from a selector loop, a thread or a test (and the
blocking adapter) can still serve ``async`` methods, a Portal's login among
them, and write client code as coroutines::

    driver = CoroutineDriver()
    dispatcher = Dispatcher(broker, driver.spawn_call)
    ...
    broker.receive_data(data)               # answers settle PendingCalls
    dispatcher.dispatch(broker.events())    # runs calls; async ones up to their first wait
    driver.run_ready()                      # resume what those answers woke up
    send(broker.data_to_send())

A coroutine runs up to its first ``await`` of a pending call
(:class:`~pbcore.broker.PendingCall`) when spawned, and on from there each
time :meth:`CoroutineDriver.run_ready` finds that call settled. Resuming is
never done from inside the broker (where the answer settles the call): only
from :meth:`~CoroutineDriver.run_ready`, so the coroutine may use the broker
freely. Awaiting anything else (a sleep, an event loop's future) throws a
RuntimeError into the coroutine, which for a served call becomes its error
answer.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

from .broker import PendingCall
from .isolation import describe

__all__ = ["CoroutineDriver", "DriverTask"]

log = logging.getLogger("pbcore.driver")


class DriverTask:
    """One coroutine run by a :class:`CoroutineDriver`.

    ``done`` says whether it has finished; then ``result`` is its value, or
    ``error`` what it raised.
    """

    def __init__(self, driver: CoroutineDriver, awaitable: Awaitable[Any]) -> None:
        self._driver = driver
        self._steps: Generator[Any, None, Any] | None = awaitable.__await__()
        self._throw: BaseException | None = None
        self._running = False
        self._cancel_requested = False
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def cancel(self) -> None:
        """Stop the coroutine (``GeneratorExit`` at its ``await``); at once, or when it next waits."""
        if self.done:
            return
        if self._running:
            self._cancel_requested = True  # it is cancelling itself: close it once it waits
            return
        self._close()

    def _close(self) -> None:
        steps, self._steps = self._steps, None
        self.done = True
        if steps is not None:
            try:
                steps.close()
            except Exception as error:  # raised while unwinding
                self.error = error
                log.error("a coroutine raised while being cancelled\n%s", describe(error))

    def _step(self) -> None:
        steps = self._steps
        if steps is None:
            return
        throw, self._throw = self._throw, None
        self._running = True
        try:
            waiting = steps.send(None) if throw is None else steps.throw(throw)
        except StopIteration as stop:
            self._finish(stop.value, None)
            return
        except BaseException as error:
            self._finish(None, error)
            if not isinstance(error, Exception):
                raise
            return
        finally:
            self._running = False
        if self._cancel_requested:
            self._close()
            return
        if isinstance(waiting, PendingCall) and self._driver.accepts(waiting):
            waiting.add_callbacks(self._wake, self._wake)
        else:
            what = "an event loop's sleep or future" if waiting is None else f"a {type(waiting).__name__}"
            self._throw = RuntimeError(
                f"awaited {what}: with no event loop, a coroutine can wait only for PB calls"
                " (those of its own connection)"
            )
            self._driver._ready.append(self)

    def _wake(self, _: object) -> None:
        if not self.done:
            self._driver._ready.append(self)

    def _finish(self, result: Any, error: BaseException | None) -> None:
        self._steps = None
        self.done, self.result, self.error = True, result, error
        if error is not None and self._driver.log_errors:
            log.error("a coroutine run by the driver raised %s\n%s", type(error).__name__, describe(error))


class CoroutineDriver:
    """Steps coroutines that await PB calls, with no event loop (see the module docstring).

    *accepts*, if given, decides which pending calls a coroutine may wait for
    (the blocking adapter takes only its own connection's); by default any
    :class:`~pbcore.broker.PendingCall`. With *log_errors* a coroutine that
    raises is logged (the ``pbcore.driver`` logger); a served call's never does.
    """

    def __init__(self, accepts: Callable[[PendingCall], bool] | None = None, *, log_errors: bool = True) -> None:
        self._accepts = accepts
        self.log_errors = log_errors
        self._ready: collections.deque[DriverTask] = collections.deque()

    def accepts(self, pending: PendingCall) -> bool:
        """Whether a coroutine of this driver may wait for *pending*."""
        return self._accepts is None or self._accepts(pending)

    def spawn(self, awaitable: Awaitable[Any]) -> DriverTask:
        """Run *awaitable* up to its first wait (it may finish at once); its task."""
        task = DriverTask(self, awaitable)
        task._step()
        return task

    def spawn_call(self, coroutine: Coroutine[Any, Any, None]) -> Callable[[], None]:
        """A :class:`~pbcore.serving.Dispatcher`'s *spawn*: run *coroutine*; how to cancel it."""
        return self.spawn(coroutine).cancel

    @property
    def ready(self) -> int:
        """How many coroutines wait to be resumed by :meth:`run_ready`."""
        return len(self._ready)

    def run_ready(self) -> int:
        """Resume every coroutine whose call has settled (and those they wake); how many steps ran."""
        steps = 0
        while self._ready:
            task = self._ready.popleft()
            if not task.done:
                steps += 1
                task._step()
        return steps
