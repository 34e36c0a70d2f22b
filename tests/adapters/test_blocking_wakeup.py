"""The blocking adapter's wake-up: what a collected RemoteReference does to its connection.

A RemoteReference dropped in any thread queues a decref and calls its
connection's wake-up hook, from inside whatever that thread is doing: maybe
holding another connection's lock, maybe holding its own. These tests force
those interleavings by hand (the last reference is dropped at a chosen point,
so its finalizer runs there, no collector timing involved) and hold a
connection's lock through ``BlockingConnection._hold``. Every wait is bounded:
a wake-up that blocks makes a test fail, not hang.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pbcore_blocking
import pytest

from pbcore import Referenceable, Root
from pbcore.factory import PBServerFactory
from pbcore.flavors import RemoteReference
from tests.adapters.test_blocking_adapter import TIMEOUT, connect, wait_until


class Thing(Referenceable):
    def __init__(self, n: int) -> None:
        self.n = n


class Service(Root):
    def remote_thing(self, n: int) -> Thing:
        return Thing(n)

    def remote_n_of(self, thing: Thing) -> int:
        return thing.n


@pytest.fixture
def server() -> Iterator[pbcore_blocking.BlockingServer]:
    with pbcore_blocking.serve(PBServerFactory(Service()), "127.0.0.1", 0) as served:
        yield served


def released_everything(server: pbcore_blocking.BlockingServer) -> bool:
    """Whether the server holds nothing for its peers but their roots (every decref arrived)."""
    return all(set(served.broker.localObjects) == {b"root"} for served in list(server.connections))


def thread(target: Callable[[], object], name: str) -> threading.Thread:
    started = threading.Thread(target=target, name=name, daemon=True)  # daemon: a deadlock must not hang pytest
    started.start()
    return started


def test_crossed_wake_ups_do_not_deadlock(server: pbcore_blocking.BlockingServer) -> None:
    """Thread 1 holds A's lock and drops B's last reference; thread 2 holds B's and drops A's."""
    with connect(server.port) as a, connect(server.port) as b:
        refs: dict[str, RemoteReference] = {"a": a.call(a.root(), "thing", 1), "b": b.call(b.root(), "thing", 2)}
        assert wait_until(lambda: sum(len(served.broker.localObjects) for served in list(server.connections)) == 4)
        gone = {name: weakref.ref(ref) for name, ref in refs.items()}
        both_held = threading.Barrier(2, timeout=TIMEOUT)

        def holding(connection: pbcore_blocking.BlockingConnection, other: str) -> Callable[[], None]:
            def run() -> None:
                with connection._hold():
                    both_held.wait()  # each thread now holds its own connection's lock
                    del refs[other]  # the last reference: its finalizer wakes the *other* connection up

            return run

        threads = [thread(holding(a, "b"), "holds-a"), thread(holding(b, "a"), "holds-b")]
        for started in threads:
            started.join(TIMEOUT)
        assert not any(started.is_alive() for started in threads), "the two wake-ups deadlocked"
        assert gone["a"]() is None and gone["b"]() is None
        assert wait_until(lambda: released_everything(server)), "a decref queued by a wake-up was never sent"
        assert a.call(a.root(), "n_of", a.call(a.root(), "thing", 3)) == 3  # both connections still work
        assert b.call(b.root(), "n_of", b.call(b.root(), "thing", 4)) == 4


@pytest.mark.parametrize("where", ["in its body", "after taking the output"])
def test_a_wake_up_does_not_wait_for_a_busy_lock(
    server: pbcore_blocking.BlockingServer, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread holds the connection's lock: the wake-up returns at once, and the holder sends the decref."""
    with connect(server.port) as connection:
        root = connection.root()
        refs = [connection.call(root, "thing", 5)]
        assert wait_until(lambda: not released_everything(server))
        holding, let_go = threading.Event(), threading.Event()

        def hold_on() -> None:
            holding.set()
            let_go.wait(TIMEOUT)

        def hold() -> None:
            with connection._hold():
                if where == "in its body":
                    hold_on()

        if where == "after taking the output":
            # The holder has taken the broker's output and is about to send it
            # and release the lock when the reference goes.
            taken = connection.broker.data_to_send

            def data_to_send() -> bytes:
                data = taken()
                if threading.current_thread().name == "holder" and not holding.is_set():
                    hold_on()
                return data

            monkeypatch.setattr(connection.broker, "data_to_send", data_to_send)

        holder = thread(hold, "holder")
        assert holding.wait(TIMEOUT)
        dropper = thread(refs.clear, "dropper")  # the finalizer queues the decref and wakes the connection up
        dropper.join(TIMEOUT)
        finished_while_held = not dropper.is_alive() and holder.is_alive()
        let_go.set()
        holder.join(TIMEOUT)
        dropper.join(TIMEOUT)
        assert finished_while_held, "the wake-up waited for the lock"
        assert not holder.is_alive() and not dropper.is_alive()
        assert wait_until(lambda: released_everything(server)), "the flagged decref was never sent"
        assert connection.call(root, "n_of", connection.call(root, "thing", 6)) == 6


def test_a_wake_up_in_the_holding_thread_does_not_re_enter(
    server: pbcore_blocking.BlockingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference goes while its own connection is taking its output to send, in that thread.

    The message just taken passes the reference back to the server; its
    decref must follow the message, not overtake it (the server would free
    the object before the message naming it arrives).
    """
    with connect(server.port) as connection:
        root = connection.root()
        held: list[Any] = [connection.call(root, "thing", 7)]
        assert wait_until(lambda: not released_everything(server))
        taken = connection.broker.data_to_send

        def data_to_send() -> bytes:
            data = taken()
            if data and held and threading.current_thread().name == "caller":
                held.clear()  # the last reference goes now, in the thread holding the lock
            return data

        monkeypatch.setattr(connection.broker, "data_to_send", data_to_send)

        async def pass_it_back() -> Any:
            return await root.callRemote("n_of", held[0])

        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append(connection.run(pass_it_back(), timeout=TIMEOUT))
            except Exception as error:
                outcome.append(error)

        caller = thread(run, "caller")
        caller.join(2 * TIMEOUT)
        assert not caller.is_alive(), "the wake-up blocked the thread holding the lock"
        assert not held
        assert outcome == [7], f"the decref overtook the message naming the object: {outcome!r}"
        assert wait_until(lambda: released_everything(server))
