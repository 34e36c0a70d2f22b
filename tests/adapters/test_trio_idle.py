"""What an idle trio connection is made of, and that the timers and faults still work with so little.

An idle connection on a plain socket is one task, its reader, which runs the
timers too (it waits for input under a cancel scope whose deadline is
theirs); a TLS connection has a timer task as well. The writer task runs only
while output waits for the socket. A served connection's tasks run in the
server's nursery, and a connection that fails closes only itself. These tests
count tasks and watch which ones exist; they measure no time or memory beyond
"on time, not at the old deadline".
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pbcore_trio
import pytest
import trio
import trio.testing

from pbcore.broker import Broker, PendingCall
from pbcore.errors import CallTimedOut, ConnectionTimedOut, PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import Root
from pbcore.timers import Timeouts
from tests.adapters.certs import make_certificate

T = TypeVar("T")


def run(body: Callable[[], Awaitable[T]], timeout: float = 20) -> T:
    async def bounded() -> T:
        with trio.fail_after(timeout):
            return await body()

    return trio.run(bounded)


class Service(Root):
    def remote_echo(self, value: Any) -> Any:
        return value

    async def remote_hang(self) -> None:
        await trio.sleep_forever()

    def remote_block(self, seconds: float) -> str:
        time.sleep(seconds)  # blocks the loop: a deadline passes meanwhile
        return "blocked"

    async def remote_later(self) -> str:
        await trio.sleep(0.05)
        return "later"


def tasks() -> list[trio.lowlevel.Task]:
    """Every task of this trio run."""
    found, stack = [], [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        assert task is not None
        found.append(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return found


async def settled() -> int:
    """The number of tasks, once every task is blocked (the idle state)."""
    await trio.testing.wait_all_tasks_blocked(0.05)
    return len(tasks())


async def raw_client(port: int) -> tuple[trio.SocketStream, Broker]:
    """A PB client driven by hand (it has no task): connected, handshake done."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    broker = Broker(is_client=True)
    broker.connection_made()
    while not broker.ready:
        await stream.send_all(broker.data_to_send())
        broker.receive_data(bytes(await stream.receive_some(65536)))
    await stream.send_all(broker.data_to_send())
    return stream, broker


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.01)


@asynccontextmanager
async def tls_pair(tmp_path: Path, server_factory: PBServerFactory) -> AsyncIterator[Any]:
    cert, key = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    async with pbcore_trio.open_server(server_factory, ssl_context=server_context) as server:
        factory = PBClientFactory()
        async with pbcore_trio.open_connection(
            factory, "127.0.0.1", server.port, ssl_context=client_context, server_hostname="localhost"
        ) as connection:
            yield server, factory, connection


def test_an_idle_plain_connection_is_one_task_on_either_side() -> None:
    async def body() -> None:
        async with pbcore_trio.open_server(PBServerFactory(Service())) as server:
            before = await settled()
            stream, _broker = await raw_client(server.port)
            (served,) = server.connections
            assert await settled() == before + 1  # the served connection: its reader, nothing else
            assert served._writer is None and served._tasks == 0
            # The server's nursery holds the reader itself: no nursery of the connection's.
            assert served._nursery is not None and served._nursery.parent_task is not None
            reader = [t for t in served._nursery.child_tasks if t.name == "pbcore_trio.connection"]
            assert len(reader) == 1 and not reader[0].child_nurseries
            await stream.aclose()
            await served.wait_closed()

            # A client connection of pbcore_trio's: one task too, once it is idle.
            before = await settled()
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                assert await root.callRemote("echo", 1) == 1
                # Its reader, and the served connection's reader: a task each.
                assert await settled() == before + 2
                assert connection._writer is None and connection._tasks == 0

    run(body)


def test_a_keepalive_probe_and_a_dead_peer_timeout_fire_on_an_idle_connection_whose_reader_waits() -> None:
    # No timer task: the reader's wait ends at the timers' deadline. The hand-driven peer
    # answers the first probe (so the probe went out), then goes silent: it is dropped.
    async def body() -> None:
        factory = PBServerFactory(Service(), timeouts=Timeouts(idle=0.2, probe=0.3))
        async with pbcore_trio.open_server(factory) as server:
            stream, broker = await raw_client(server.port)
            (served,) = server.connections
            before = await settled()
            received = served.broker.bytes_received
            with trio.fail_after(3):
                probe = await stream.receive_some(65536)  # the keepalive probe, unasked
            broker.receive_data(bytes(probe))
            await stream.send_all(broker.data_to_send())  # its answer: the error for object id 0
            await until(lambda: served.broker.bytes_received > received)
            assert not served.closed.is_set()
            assert len(tasks()) <= before  # still no task but the reader for the timers
            with trio.fail_after(3):
                await served.wait_closed()  # the next probe unanswered: taken for gone
            assert isinstance(served.close_reason, ConnectionTimedOut)
            await stream.aclose()

    run(body)


def test_a_deadline_armed_from_another_task_moves_the_readers_wait() -> None:
    # The client's reader waits under the idle deadline (60 s away); a call made from the
    # test's task with pbtimeout=0.3 must move it: the call times out on time.
    async def body() -> None:
        async with pbcore_trio.open_server(PBServerFactory(Service())) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                await settled()
                sleep = connection._sleep
                assert sleep is not None and sleep is connection._wait  # the reader waits, and runs the timers
                idle_deadline = sleep.deadline
                assert idle_deadline - trio.current_time() > 10  # the handshake's or the idle one
                started = trio.current_time()
                with pytest.raises(CallTimedOut), trio.fail_after(5):
                    await root.callRemote("hang", pbtimeout=0.3)
                assert 0.25 <= trio.current_time() - started < 3
                assert await root.callRemote("echo", 2) == 2  # and the connection goes on

    run(body)


def test_the_timers_deadline_passing_while_the_reader_waits_for_a_call_to_start_breaks_nothing() -> None:
    # One chunk: a plain call that blocks past the reader's deadline, then an async one. The
    # reader waits for the async call's first step when its scope is cancelled by the
    # deadline: that wait does not end on it (it cannot be cancelled); the reader finishes the
    # chunk, runs the timers at its next wait for input, and reads on.
    async def body() -> None:
        factory = PBServerFactory(Service(), timeouts=Timeouts(idle=0.1, probe=5.0))
        async with pbcore_trio.open_server(factory) as server:
            stream, broker = await raw_client(server.port)
            (served,) = server.connections
            first = broker.root().callRemote("block", 0.3)
            second = broker.root().callRemote("later")
            await stream.send_all(broker.data_to_send())  # both calls in one send
            with trio.fail_after(5):
                while not (first.done and second.done):
                    broker.receive_data(bytes(await stream.receive_some(65536)))
                    await stream.send_all(broker.data_to_send())  # (a probe's answer, maybe)
            assert isinstance(first, PendingCall) and first.result == "blocked"
            assert isinstance(second, PendingCall) and second.result == "later"
            assert not served.closed.is_set() and served._parked is None
            third = broker.root().callRemote("echo", 3)
            await stream.send_all(broker.data_to_send())
            with trio.fail_after(5):
                while not third.done:
                    broker.receive_data(bytes(await stream.receive_some(65536)))
            assert isinstance(third, PendingCall) and third.result == 3
            await stream.aclose()

    run(body)


def test_the_writer_task_exists_only_while_output_waits() -> None:
    # A hand-driven peer asks for answers larger than the socket takes and reads nothing
    # for a while: the server's writer task appears (and the server stops reading that
    # peer while calls wait for the output); once the peer reads it all, it is gone.
    big = b"x" * 400_000

    async def body() -> None:
        async with pbcore_trio.open_server(PBServerFactory(Service())) as server:
            stream, broker = await raw_client(server.port)
            (served,) = server.connections
            idle = await settled()
            pending = [broker.root().callRemote("echo", big) for _ in range(12)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, broker.data_to_send())
                await until(lambda: served._writer is not None and served.backlog > 0)
                await trio.sleep(0.2)
                assert served._writer is not None and served._sending
                assert not served.dispatcher.wants_input or served.dispatcher.queued == 0
                assert len(tasks()) > idle  # the writer (and the send of our calls)
                while not all(result.done for result in pending):
                    broker.receive_data(bytes(await stream.receive_some(65536)))
            for result in pending:
                assert isinstance(result, PendingCall) and result.result == big
            assert served.backlog == 0
            assert await settled() == idle  # the writer has ended
            assert served._writer is None and served._tasks == 0
            await stream.aclose()

    run(body)


class Bug(Exception):
    pass


class BrokenSends:
    """Stands for a served connection's socket: reads as it does, but no send at once takes anything."""

    def __init__(self, raw: socket.socket) -> None:
        self.raw = raw

    def send(self, data: Any) -> int:
        raise BlockingIOError

    def recv(self, size: int) -> bytes:
        return self.raw.recv(size)

    def fileno(self) -> int:
        return self.raw.fileno()


def test_a_served_connection_that_fails_closes_itself_only(caplog: pytest.LogCaptureFixture) -> None:
    # One connection's writer task raises (a bug), another's reader does: each closes and is
    # logged; the server, its nursery and a third connection go on, and new ones are accepted.
    async def body() -> None:
        async with pbcore_trio.open_server(PBServerFactory(Service())) as server:
            factories = [PBClientFactory() for _ in range(3)]
            async with (
                pbcore_trio.open_connection(factories[0], "127.0.0.1", server.port) as first,
                pbcore_trio.open_connection(factories[1], "127.0.0.1", server.port) as second,
                pbcore_trio.open_connection(factories[2], "127.0.0.1", server.port) as third,
            ):
                roots = [await factory.getRootObject() for factory in factories]
                serving = {c.peer: c for c in server.connections}
                by_root = [serving[c.stream.socket.getsockname()] for c in (first, second, third)]  # type: ignore[attr-defined]
                writer_bug, reader_bug, healthy = by_root

                async def raising(data: Any) -> None:
                    raise Bug("in the writer")

                assert writer_bug._raw is not None
                writer_bug._raw = BrokenSends(writer_bug._raw)  # type: ignore[assignment]
                writer_bug.stream.send_all = raising  # type: ignore[method-assign]

                def receive_data(data: Any) -> None:
                    raise Bug("in the reader")

                reader_bug.broker.receive_data = receive_data  # type: ignore[method-assign]
                with caplog.at_level(logging.ERROR, logger="pbcore.trio"):
                    for root in roots[:2]:
                        with pytest.raises(PBConnectionLost), trio.fail_after(3):
                            await root.callRemote("echo", 1)  # the server closes the connection
                    with trio.fail_after(3):
                        await writer_bug.wait_closed()
                        await reader_bug.wait_closed()
                assert isinstance(writer_bug.close_reason, Bug)
                assert sum("the server goes on" in r.getMessage() for r in caplog.records) == 2
                assert writer_bug not in server.connections and reader_bug not in server.connections
                assert await roots[2].callRemote("echo", 2) == 2
                assert not healthy.closed.is_set()
                factory = PBClientFactory()
                async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                    root = await factory.getRootObject()
                    assert await root.callRemote("echo", 3) == 3

    run(body)


def test_tls_connections_keep_a_timer_task_and_their_timers_run(tmp_path: Path) -> None:
    # TLS: trio's SSLStream may not be cancelled in receive_some, so the timers have a task of
    # their own: the server's keepalive probes go out (and are answered) while the connection
    # is idle, and a client call's deadline holds.
    async def body() -> None:
        factory = PBServerFactory(Service(), timeouts=Timeouts(idle=0.1, probe=2.0))
        async with tls_pair(tmp_path, factory) as (server, client_factory, connection):
            root = await client_factory.getRootObject()
            (served,) = server.connections
            assert served._raw is None and connection._raw is None
            assert served._tasks == 1 == connection._tasks  # the timer task, each
            received = served.broker.bytes_received
            await trio.sleep(0.5)  # idle: probed, and the answers came
            assert served.broker.bytes_received > received
            with pytest.raises(CallTimedOut), trio.fail_after(5):
                await root.callRemote("hang", pbtimeout=0.3)
            assert await root.callRemote("echo", 1) == 1

    run(body)
