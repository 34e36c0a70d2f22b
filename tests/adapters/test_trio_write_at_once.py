"""The trio adapter writes at once when its writer is idle (a plain socket's
non-blocking send, no task switch), and leaves the rest to the writer task:
what the socket did not take, TLS streams, and what is queued behind a send
in progress. These tests watch which path the bytes take, and check that
whatever the path, every byte arrives, in order."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pbcore_trio
import pytest
import trio

from pbcore.broker import Broker, PendingCall
from pbcore.errors import CallTimedOut, PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from tests.adapters.certs import make_certificate
from tests.adapters.services import PeerRootMaker

T = TypeVar("T")


def run(body: Callable[[], Awaitable[T]], timeout: float = 20) -> T:
    async def bounded() -> T:
        with trio.fail_after(timeout):
            return await body()

    return trio.run(bounded)


@asynccontextmanager
async def serving(factory: PBServerFactory, **options: Any) -> AsyncIterator[pbcore_trio.Server]:
    async with pbcore_trio.open_server(factory, **options) as server:
        yield server


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.01)


class Watched:
    """Stands for a connection's plain socket: counts the sends written at once (and what each took: 0 if none).

    *fail*, once set, is what the next send raises; *limit*, if set, the most
    a send takes (as a socket whose buffer is nearly full would).
    """

    def __init__(self, raw: socket.socket) -> None:
        self.raw = raw
        self.sends: list[tuple[int, int]] = []  # (bytes offered, bytes taken)
        self.fail: OSError | None = None
        self.limit: int | None = None

    def send(self, data: Any) -> int:
        if self.fail is not None:
            raise self.fail
        try:
            sent = self.raw.send(data if self.limit is None else data[: self.limit])
        except BlockingIOError:
            self.sends.append((len(data), 0))  # the socket takes nothing now
            raise
        self.sends.append((len(data), sent))
        return sent

    def recv(self, size: int) -> bytes:
        return self.raw.recv(size)

    def fileno(self) -> int:
        return self.raw.fileno()

    @property
    def partial(self) -> int:
        return sum(1 for offered, taken in self.sends if taken < offered)


def watch(connection: pbcore_trio.Connection) -> tuple[Watched, list[int]]:
    """Watch *connection*: its sends at once, and the sizes of what its writer task sends."""
    raw = connection._raw
    assert raw is not None, "a plain TCP connection writes at once"
    watched = Watched(raw)
    connection._raw = watched  # type: ignore[assignment]
    by_writer: list[int] = []
    send_all = connection.stream.send_all

    async def counting(data: Any) -> None:
        by_writer.append(len(data))
        await send_all(data)

    connection.stream.send_all = counting  # type: ignore[method-assign]
    return watched, by_writer


def test_sequential_calls_are_written_at_once_both_ways_not_by_the_writer_task() -> None:
    async def body() -> None:
        async with serving(PBServerFactory(PeerRootMaker())) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                (served,) = server.connections
                client_sends, client_writer = watch(connection)
                server_sends, server_writer = watch(served)
                for n in range(50):
                    assert await root.callRemote("echo", n) == [[n], {}]
                assert len(client_sends.sends) >= 50 and len(server_sends.sends) >= 50
                assert client_sends.partial == server_sends.partial == 0
                assert client_writer == server_writer == []  # no round trip went through a writer task
                assert connection.backlog == served.backlog == 0

    run(body)


def test_a_window_of_calls_goes_out_in_few_sends_and_every_answer_comes_back() -> None:
    # The first call of a window is written at once; those made in the same step
    # go to the writer, in one send, rather than one send each.
    async def body() -> None:
        async with serving(PBServerFactory(PeerRootMaker())) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                sends, by_writer = watch(connection)
                pending = [root.callRemote("echo", n) for n in range(500)]
                assert [await result for result in pending] == [[[n], {}] for n in range(500)]
                assert len(sends.sends) + len(by_writer) <= 10

    run(body)


def payload(n: int, size: int) -> bytes:
    return (b"%06d" % n) * (size // 6)


def test_a_peer_that_reads_late_gets_every_byte_in_order_once_the_socket_takes_part_of_a_write() -> None:
    # A raw peer sends calls whose answers, large and small mixed, are more than the
    # socket takes, and reads nothing for a while: the server writes part of an
    # answer at once, its writer the rest, and the answers made meanwhile queue
    # behind it. Then the peer reads everything: each answer whole, in order.
    sizes = [300_000, 10, 200_000, 5, 600_000, 1, 150_000, 20] * 3

    async def body() -> None:
        async with serving(PBServerFactory(PeerRootMaker())) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            broker = Broker(is_client=True)
            broker.connection_made()
            while not broker.ready:
                await stream.send_all(broker.data_to_send())
                broker.receive_data(bytes(await stream.receive_some(65536)))
            (served,) = server.connections
            sends, by_writer = watch(served)
            sends.limit = 50_000
            pending: list[Any] = []
            for n, size in enumerate(sizes):
                pending.append(broker.root().callRemote("echo", payload(n, size)))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, broker.data_to_send())
                await until(lambda: served.backlog > 0)  # the socket is full: the writer holds the rest
                await trio.sleep(0.3)
                while not all(result.done for result in pending):
                    broker.receive_data(bytes(await stream.receive_some(65536)))
            for n, (size, result) in enumerate(zip(sizes, pending, strict=True)):
                assert isinstance(result, PendingCall) and result.error is None, n
                assert result.result == [[payload(n, size)], {}], n
            assert sends.sends and by_writer  # both paths were taken ...
            assert sends.partial  # ... and the writer took over a write the socket took part of
            await stream.aclose()

    run(body)


def test_large_calls_and_answers_both_ways_arrive_whole_whatever_path_they_take() -> None:
    async def body() -> None:
        async with serving(PBServerFactory(PeerRootMaker())) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                (served,) = server.connections
                client_sends, client_writer = watch(connection)
                server_sends, server_writer = watch(served)
                client_sends.limit = server_sends.limit = 100_000
                for n in range(6):
                    big, other = payload(n, 600_000), payload(n + 100, 600_000)
                    assert await root.callRemote("echo", big, n, other) == [[big, n, other], {}]
                assert client_sends.partial and server_sends.partial and client_writer and server_writer
                # A window (under the output's high-water mark: past it both sides would stop reading).
                window = [root.callRemote("echo", payload(n, 5000 * (n % 3))) for n in range(40)]
                assert [await result for result in window] == [[[payload(n, 5000 * (n % 3))], {}] for n in range(40)]
                assert not client_writer or len(client_writer) < 40  # one send each, at most: not one per call


def test_a_send_that_fails_at_once_closes_the_connection_as_a_writer_failure_does() -> None:
    async def body() -> None:
        async with serving(PBServerFactory(PeerRootMaker())) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                sends, _ = watch(connection)
                assert await root.callRemote("echo", 1) == [[1], {}]
                sends.fail = ConnectionResetError(104, "Connection reset by peer")
                with pytest.raises(PBConnectionLost):
                    await root.callRemote("echo", 2)
                await connection.wait_closed()
                assert isinstance(connection.close_reason, trio.BrokenResourceError)
                assert isinstance(connection.close_reason.__cause__, ConnectionResetError)

    run(body)


def test_tls_and_unix_sockets_take_the_path_they_can(tmp_path: Path) -> None:
    # TLS: the writer task writes everything (there is no plain socket to write to).
    # A unix socket is a plain socket: written at once.
    cert, key = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    big = payload(1, 500_000)

    async def body() -> None:
        async with serving(PBServerFactory(PeerRootMaker()), ssl_context=server_context) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(
                factory, "127.0.0.1", server.port, ssl_context=client_context, server_hostname="localhost"
            ) as connection:
                root = await factory.getRootObject()
                assert connection._raw is None
                (served,) = server.connections
                assert served._raw is None
                assert await root.callRemote("echo", big) == [[big], {}]
        path = tmp_path / "pb.sock"
        async with trio.open_nursery() as nursery:
            server = await nursery.start(pbcore_trio.serve_unix, PBServerFactory(PeerRootMaker()), path)
            factory = PBClientFactory()
            async with pbcore_trio.open_unix_connection(factory, path) as connection:
                root = await factory.getRootObject()
                sends, _ = watch(connection)
                for n in range(5):
                    assert await root.callRemote("echo", n, big) == [[n, big], {}]
                assert sends.sends
            server.close()

    run(body)


def test_a_call_made_behind_a_send_in_progress_still_has_its_deadline_armed() -> None:
    # The peer completes the handshake and never reads again: the writer ends up
    # inside a send the socket cannot take. A call made then queues behind it
    # (nothing is written at once), and its pbtimeout still runs.
    async def body() -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with listener:
            factory = PBClientFactory()  # the default timeouts: only the call's deadline is short
            port = listener.socket.getsockname()[1]
            async with pbcore_trio.open_connection(factory, "127.0.0.1", port) as connection:
                accepted = await listener.accept()
                peer = Broker(is_client=False)
                peer.connection_made()
                await accepted.send_all(peer.data_to_send())  # the dialect offer
                peer.receive_data(bytes(await accepted.receive_some(65536)))  # the client's choice
                await accepted.send_all(peer.data_to_send())
                root = await factory.getRootObject()
                for n in range(100):
                    root.callRemote("echo", payload(n, 600_000))
                    await trio.sleep(0.01)
                    if connection._sending:
                        break
                assert connection._sending and connection.backlog > 0
                started = trio.current_time()
                with pytest.raises(CallTimedOut), trio.fail_after(5):
                    await root.callRemote("echo", 1, pbtimeout=0.3)
                assert trio.current_time() - started < 5
                connection.close()
                await accepted.aclose()

    run(body)


def test_a_pending_result_wakes_every_task_awaiting_it_and_forgets_a_cancelled_one() -> None:
    async def body() -> None:
        cancelled: list[pbcore_trio.PendingResult] = []
        pending = pbcore_trio.PendingResult(on_cancel=cancelled.append)
        got: list[Any] = []

        async def wait() -> None:
            got.append(await pending)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            nursery.start_soon(wait)
            with trio.move_on_after(0.05):
                await pending  # cancelled while waiting: forgotten, the call told
            assert cancelled == [pending]
            pending.resolve("answer")
        assert got == ["answer", "answer"]
        assert await pending == "answer"  # settled: at once
        failed = pbcore_trio.PendingResult()
        failed.fail(ValueError("no"))
        with pytest.raises(ValueError, match="no"):
            await failed

    run(body)
