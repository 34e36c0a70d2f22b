"""A connected pair of brokers in memory, for tests (ours and yours).

::

    pair = BrokerPair(server_root=MyRoot())
    root = pair.client.root()
    pending = root.callRemote("echo", 1)
    pair.pump()
    assert pending.unwrap() == 1

:meth:`BrokerPair.pump` moves bytes both ways and runs every call that
arrives, answering it, until nothing moves. Methods may be plain functions or
coroutine functions that finish without waiting on an event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .broker import Broker, PendingCall, serve_call
from .events import CallReceived, Event

__all__ = ["BrokerPair", "run_call"]

T = TypeVar("T")


def run_call(broker: Broker, event: CallReceived) -> None:
    """Run one received call and send its answer or error, synchronously."""
    rest = serve_call(broker, event)
    if rest is not None:
        _finish(rest)


def _finish(awaitable: Any) -> Any:
    """Drive a coroutine that never really suspends; anything else needs a real loop."""
    coroutine = awaitable.__await__()
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("this awaitable waits on an event loop: use an adapter, not BrokerPair")


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
                for event in target.events():
                    log.append(event)
                    if isinstance(event, CallReceived):
                        run_call(target, event)
                        moved = True
            if not moved:
                return count
        raise RuntimeError(f"the brokers are still talking after {rounds} rounds")

    def run(self, awaitable: Awaitable[T], rounds: int = 1000) -> T:
        """Run a coroutine that awaits calls over this pair (``await ref.callRemote(...)``).

        Whenever it waits on a pending call, the pair is pumped until that
        call settles; the coroutine's result is returned (or its error raised).
        """
        steps = awaitable.__await__()
        value: Any = None
        for _ in range(rounds):
            try:
                waiting = steps.send(value)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if not isinstance(waiting, PendingCall):
                steps.close()
                raise RuntimeError(f"awaited {waiting!r}: BrokerPair.run can only wait for PB calls")
            self.pump()
            if not waiting.done:
                steps.close()
                raise RuntimeError("a call was not answered although both brokers are idle")
            value = None
        steps.close()
        raise RuntimeError(f"still running after {rounds} calls")

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
