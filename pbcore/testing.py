"""A connected pair of brokers in memory, for tests (ours and yours).

::

    pair = BrokerPair(server_root=MyRoot())
    root = pair.client.root()
    pending = root.callRemote("echo", 1)
    pair.pump()
    assert pending.unwrap() == 1

:meth:`BrokerPair.pump` moves bytes both ways and runs every call that
arrives (through each side's :class:`~pbcore.serving.Dispatcher`, so exactly
as an adapter would), until nothing moves. Methods may be plain functions or
coroutine functions that await PB calls over the pair (the
:class:`~pbcore.driver.CoroutineDriver` runs them); awaiting anything else is
an error answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .broker import Broker, PendingCall
from .driver import CoroutineDriver
from .events import CallReceived, Event
from .serving import Dispatcher

__all__ = ["BrokerPair"]

T = TypeVar("T")


class BrokerPair:
    """A client broker and a server broker joined back to back in memory.

    Every event either broker emits is kept, in order, in ``client_events``
    and ``server_events`` (calls are run and answered by :meth:`pump`). The
    logged events keep their values alive: call :meth:`clear_events` before
    checking that a dropped reference is released.
    """

    def __init__(
        self,
        server_root: Any = None,
        client_root: Any = None,
        *,
        broker_factory: Callable[..., Broker] = Broker,
        handshake: bool = True,
        **options: Any,
    ) -> None:
        self.server = broker_factory(is_client=False, root=server_root, pending_factory=PendingCall, **options)
        self.client = broker_factory(is_client=True, root=client_root, pending_factory=PendingCall, **options)
        self.driver = CoroutineDriver(log_errors=False)
        self._dispatchers = {
            broker: Dispatcher(broker, self.driver.spawn_call) for broker in (self.server, self.client)
        }
        self.server_events: list[Event] = []
        self.client_events: list[Event] = []
        self.server.connection_made()
        self.client.connection_made()
        if handshake:
            self.pump()

    def pump(self, rounds: int = 1000) -> int:
        """Exchange bytes and run calls until both sides are idle; returns the rounds taken."""
        for count in range(rounds):
            moved = False
            for source, target, log in (
                (self.server, self.client, self.client_events),
                (self.client, self.server, self.server_events),
            ):
                data = source.data_to_send()
                if data:
                    moved = True
                    target.receive_data(data)
                events = target.events()
                log.extend(events)
                if any(isinstance(event, CallReceived) for event in events):
                    moved = True
                    self._dispatchers[target].dispatch(events)
                if self.driver.run_ready():
                    moved = True
            if not moved:
                return count
        raise RuntimeError(f"the brokers are still talking after {rounds} rounds")

    def run(self, awaitable: Awaitable[T], rounds: int = 1000) -> T:
        """Run a coroutine that awaits calls over this pair (``await ref.callRemote(...)``).

        The pair is pumped until it finishes; its result is returned (or its
        error raised).
        """
        task = self.driver.spawn(awaitable)
        self.pump(rounds)
        if not task.done:
            task.cancel()
            raise RuntimeError("the coroutine still waits although both brokers are idle")
        if task.error is not None:
            raise task.error
        return task.result  # type: ignore[no-any-return]

    def clear_events(self) -> None:
        """Forget the logged events: they hold values (and so references) alive."""
        self.client_events.clear()
        self.server_events.clear()

    def disconnect(self, reason: BaseException | None = None) -> None:
        """Drop the connection on both sides."""
        self.client.connection_lost(reason)
        self.server.connection_lost(reason)
        self.client_events.extend(self.client.events())
        self.server_events.extend(self.server.events())
