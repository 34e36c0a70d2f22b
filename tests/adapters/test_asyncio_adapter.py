"""The asyncio adapter over real sockets on loopback (TCP, TLS, unix)."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import threading
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pbcore_asyncio
import pytest

from pbcore import Cacheable, Copyable, Referenceable, RemoteCache, RemoteCopy, Root, flavors
from pbcore import broker as broker_module
from pbcore.broker import Broker
from pbcore.cred import Anonymous, UsernamePassword
from pbcore.errors import CallTimedOut, ConnectionTimedOut, NoSuchMethod, PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import CopiedFailure
from pbcore.timers import Timeouts
from tests.adapters.certs import make_certificate
from tests.adapters.services import login_factory

T = TypeVar("T")


#: How the tests run a coroutine to completion: asyncio's own loop, or uvloop's.
_runner: list[Callable[[Coroutine[Any, Any, Any]], Any]] = [asyncio.run]


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def event_loop(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test of this module runs on asyncio's loop, then on uvloop when it is installed."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        _runner.append(uvloop.run)
    try:
        yield request.param
    finally:
        del _runner[1:]


def run(test: Callable[[], Awaitable[T]], timeout: float = 20) -> T:
    """Run one async test body on the current loop, bounded in time."""

    async def bounded() -> T:
        return await asyncio.wait_for(test(), timeout)

    result: T = _runner[-1](bounded())
    return result


class Thing(Referenceable):
    def __init__(self, n: int) -> None:
        self.n = n

    def remote_n(self) -> int:
        return self.n


class Point(Copyable):
    def __init__(self, x: int) -> None:
        self.x = x

    def getTypeToCopy(self) -> bytes:
        return b"tests.adapters.Point"


class PointCopy(RemoteCopy):
    x: int


class Gauge(Cacheable):
    def __init__(self) -> None:
        self.value = 0
        self.observers: list[flavors.RemoteCacheObserver] = []

    def getTypeToCopy(self) -> bytes:
        return b"tests.adapters.Gauge"

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: flavors.RemoteCacheObserver) -> Any:
        self.observers.append(observer)
        return {"value": self.value}

    def stoppedObserving(self, perspective: Any, observer: flavors.RemoteCacheObserver) -> None:
        self.observers.remove(observer)


class GaugeCache(RemoteCache):
    value: int

    def observe_value(self, value: int) -> None:
        self.value = value


flavors.setCopierForClass(b"tests.adapters.Point", PointCopy)
flavors.setCopierForClass(b"tests.adapters.Gauge", GaugeCache)


class ServerRoot(Root):
    def __init__(self) -> None:
        self.gauge = Gauge()
        self.woken = asyncio.Event()
        self.hanging = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.brokers: list[Broker] = []
        self.big_calls = 0
        self.asked: Any = None
        self.asked_whom: Any = None

    def rootObject(self, broker: Broker) -> ServerRoot:
        self.brokers.append(broker)  # the server side's brokers, for the tests to look at
        return self

    def remote_echo(self, *args: Any, **kw: Any) -> Any:
        return [list(args), kw]

    def remote_thing(self, n: int) -> Thing:
        return Thing(n)

    def remote_point(self, x: int) -> Point:
        return Point(x)

    def remote_gauge(self) -> Gauge:
        return self.gauge

    def remote_set(self, value: int) -> None:
        self.gauge.value = value
        for observer in self.gauge.observers:
            observer.callRemote("value", value)

    async def remote_slow(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "late"

    def remote_fail(self) -> None:
        raise ValueError("nope")

    async def remote_call_back(self, ref: Any, x: int) -> Any:
        return await ref.callRemote("twice", x)

    def remote_big(self, size: int) -> bytes:
        self.big_calls += 1
        return b"x" * size

    async def remote_relay(self, ref: Any, x: int) -> Any:
        return await ref.callRemote("twice", x)

    async def remote_poll(self) -> str:
        await self.woken.wait()
        return "woken"

    def remote_wake(self) -> None:
        self.woken.set()

    async def remote_hang(self) -> None:
        self.hanging.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    def remote_ask_back(self, ref: Any, timeout: float) -> None:
        # Served during the read that brought it: the call back is made there.
        self.asked = ref.callRemote("hang", pbtimeout=timeout)
        self.asked_whom = ref  # kept: its decref would make the server poll anyway

    def remote_hang_up(self) -> None:
        self.brokers[-1].connection_lost(None)  # the application closes its own broker


class Doubler(Referenceable):
    def remote_twice(self, x: int) -> int:
        return 2 * x


class Hanger(Referenceable):
    async def remote_hang(self) -> None:
        await asyncio.sleep(3600)


class EchoingDoubler(Referenceable):
    """Answers the server's call by calling the server first."""

    def __init__(self, root: Any) -> None:
        self.root = root

    async def remote_twice(self, x: int) -> int:
        [[echoed], _] = await self.root.callRemote("echo", x)
        return 2 * int(echoed)


async def served(factory: PBServerFactory | None = None, **kwargs: Any) -> pbcore_asyncio.Server:
    return await pbcore_asyncio.serve(factory or PBServerFactory(ServerRoot()), "127.0.0.1", 0, **kwargs)


async def until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Wait (polling) until *condition* holds; fail after *timeout* seconds."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_calls_references_copies_caches_and_errors() -> None:
    async def body() -> None:
        root_object = ServerRoot()
        server = await served(PBServerFactory(root_object))
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", server.port)
        root = await factory.getRootObject()
        assert await root.callRemote("echo", 1, "two", k=None) == [[1, "two"], {"k": None}]
        thing = await root.callRemote("thing", 7)
        assert await thing.callRemote("n") == 7
        point = await root.callRemote("point", 3)
        assert isinstance(point, PointCopy) and point.x == 3
        gauge = await root.callRemote("gauge")
        await root.callRemote("set", 5)
        await root.callRemote("echo")  # the update went out before this answer
        assert gauge.value == 5
        with pytest.raises(CopiedFailure) as caught:
            await root.callRemote("fail")
        assert caught.value.check(ValueError)
        with pytest.raises(CopiedFailure) as missing:
            await root.callRemote("missing")
        assert missing.value.check(NoSuchMethod)
        assert await root.callRemote("call_back", Doubler(), 21) == 42  # the server awaits our answer
        # Letting go: the server's tables come back to the root alone.
        [server_connection] = server.connections
        server_broker = server_connection.broker
        del thing, gauge

        def released() -> bool:
            gc.collect()
            return list(server_broker.localObjects) == [b"root"] and not server_broker.remotelyCachedObjects

        await until(released, "the server's tables to empty")
        assert root_object.gauge.observers == []
        connection.close()
        await connection.wait_closed()
        await server.aclose()

    run(body)


def test_a_reference_collected_in_another_thread_is_released() -> None:
    async def body() -> None:
        server = await served()
        factory = PBClientFactory()
        async with await pbcore_asyncio.connect(factory, "127.0.0.1", server.port):
            root = await factory.getRootObject()
            held = [await root.callRemote("thing", 1)]
            [server_connection] = server.connections
            assert len(server_connection.broker.localObjects) == 2
            await until(lambda: gc.get_referrers(held[0]) == [held], "the call's future to let go of its result")

            def drop() -> None:
                held.clear()  # the last reference: its decref is queued from this thread
                gc.collect()

            worker = threading.Thread(target=drop)
            worker.start()
            worker.join(10)
            await until(lambda: list(server_connection.broker.localObjects) == [b"root"], "the decref")
        await server.aclose()

    run(body)


def test_login_through_a_portal() -> None:
    async def body() -> None:
        server = await served(login_factory())
        for credentials, expected in (
            (UsernamePassword("alice", "secret"), "hello alice"),
            (Anonymous(), "hello anonymous"),
        ):
            factory = PBClientFactory()
            async with await pbcore_asyncio.connect(factory, "127.0.0.1", server.port):
                avatar = await factory.login(credentials)
                assert await avatar.callRemote("hello") == expected
        factory = PBClientFactory()
        async with await pbcore_asyncio.connect(factory, "127.0.0.1", server.port):
            with pytest.raises(CopiedFailure) as caught:
                await factory.login(UsernamePassword("alice", "wrong"))
            assert caught.value.type == "twisted.cred.error.UnauthorizedLogin"
        await server.aclose()

    run(body)


def test_a_timed_out_call_is_dropped_and_the_connection_goes_on() -> None:
    async def body() -> None:
        server = await served()
        factory = PBClientFactory()
        async with await pbcore_asyncio.connect(factory, "127.0.0.1", server.port):
            root = await factory.getRootObject()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(root.callRemote("slow", 0.3), 0.05)
            assert factory.broker is not None and factory.broker._waiting == {}  # forgotten at once
            await asyncio.sleep(0.4)  # the late answer arrives and is dropped
            assert await root.callRemote("echo", 1) == [[1], {}]
            assert not factory.broker.closed
        await server.aclose()

    run(body)


def test_a_dropped_connection_fails_the_calls_in_flight() -> None:
    async def body() -> None:
        server = await served()
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", server.port)
        root = await factory.getRootObject()
        call = asyncio.ensure_future(root.callRemote("slow", 5))
        await until(lambda: any(c.dispatcher.running for c in server.connections), "the call to start")
        for server_connection in list(server.connections):
            server_connection.close()  # the server drops the connection mid-call
        with pytest.raises(PBConnectionLost):
            await call
        await connection.wait_closed()
        await server.aclose()

    run(body)


def test_garbage_closes_only_its_connection() -> None:
    async def body() -> None:
        server = await served()
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", server.port)
        root = await factory.getRootObject()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\xff" * 100)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) != b"garbage accepted"  # read to EOF: closed
        assert reader.at_eof()
        assert await root.callRemote("echo", "still here") == [["still here"], {}]
        writer.close()
        connection.close()
        await server.aclose()

    run(body)


def test_a_peer_that_stops_reading_is_no_longer_read() -> None:
    answer_size = 200_000
    calls = 400  # 80 MB of answers if the server kept reading and answering

    async def body() -> None:
        root_object = ServerRoot()
        server = await served(PBServerFactory(root_object))
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each call its own segment
        client = Broker(is_client=True)
        client.connection_made()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        while not client.ready:  # the handshake, read normally
            client.receive_data(await loop.sock_recv(sock, 65536))
            await loop.sock_sendall(sock, client.data_to_send())
        [server_connection] = server.connections
        transport = server_connection.transport
        assert transport is not None
        for sent in range(1, calls + 1):  # one call per read, and never read an answer
            client.root().callRemote("big", answer_size)
            await loop.sock_sendall(sock, client.data_to_send())
            await until(
                lambda sent=sent: root_object.big_calls == sent or not transport.is_reading(),  # type: ignore[misc]
                "the call to be served",
            )
            if not transport.is_reading():
                break
        answered = root_object.big_calls
        assert answered < calls
        assert transport.get_write_buffer_size() <= 10 * answer_size
        for _ in range(20):  # more calls: they wait in the socket, unread
            client.root().callRemote("big", answer_size)
        await loop.sock_sendall(sock, client.data_to_send())
        await asyncio.sleep(0.2)
        assert root_object.big_calls == answered
        assert not transport.is_reading()
        sock.close()
        await server.aclose()

    run(body)


def test_tls(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    async def body() -> None:
        server = await served(ssl_context=server_context)
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(
            factory, "127.0.0.1", server.port, ssl_context=client_context, server_hostname="localhost"
        )
        root = await factory.getRootObject()
        assert await root.callRemote("echo", "secure") == [["secure"], {}]
        assert connection.transport is not None and connection.transport.get_extra_info("ssl_object") is not None
        assert connection.peer == ("127.0.0.1", server.port)
        await server.aclose()  # closes the TLS connection too
        await asyncio.wait_for(connection.wait_closed(), 10)

    run(body)


def test_unix_socket(tmp_path: Path) -> None:
    async def body() -> None:
        path = tmp_path / "pb.sock"
        server = await pbcore_asyncio.serve_unix(PBServerFactory(ServerRoot()), path)
        assert server.addresses == [str(path)]
        assert not hasattr(server, "port")
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect_unix(factory, path)
        root = await factory.getRootObject()
        assert await root.callRemote("echo", "local") == [["local"], {}]
        await server.aclose()
        await asyncio.wait_for(connection.wait_closed(), 10)

    run(body)


# -- the dispatcher: no call waits for a slot; calls end with their connection --------------------


def test_many_calls_that_call_back_through_the_server_do_not_deadlock() -> None:
    async def body() -> None:
        server = await served()
        factory = PBClientFactory()
        async with await pbcore_asyncio.connect(factory, "127.0.0.1", server.port):
            root = await factory.getRootObject()
            doubler = EchoingDoubler(root)
            # Each call awaits the client, which awaits a call to the server, while all 40 run.
            results = await asyncio.gather(*(root.callRemote("relay", doubler, n) for n in range(40)))
            assert results == [2 * n for n in range(40)]
        await server.aclose()

    run(body, timeout=15)


def test_long_polls_do_not_hold_back_the_call_that_ends_them() -> None:
    async def body() -> None:
        root_object = ServerRoot()
        server = await served(PBServerFactory(root_object))
        factory = PBClientFactory()
        async with await pbcore_asyncio.connect(factory, "127.0.0.1", server.port) as connection:
            root = await factory.getRootObject()
            polls = [asyncio.ensure_future(root.callRemote("poll")) for _ in range(40)]
            [server_connection] = server.connections
            await until(lambda: len(server_connection.dispatcher.running) == 40, "the polls to start")
            await root.callRemote("wake")
            assert await asyncio.gather(*polls) == ["woken"] * 40
            assert connection.dispatcher.running == set()
        await server.aclose()

    run(body, timeout=15)


def test_a_served_call_is_cancelled_when_its_connection_ends() -> None:
    async def body() -> None:
        root_object = ServerRoot()
        server = await served(PBServerFactory(root_object))
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", server.port)
        root = await factory.getRootObject()
        call = asyncio.ensure_future(root.callRemote("hang"))
        await asyncio.wait_for(root_object.hanging.wait(), 10)
        connection.close()
        with pytest.raises(PBConnectionLost):
            await call
        await asyncio.wait_for(root_object.cancelled.wait(), 5)
        await until(lambda: not server.connections, "the server to forget the connection")
        await server.aclose()

    run(body)


def test_a_broker_the_application_closes_closes_its_socket() -> None:
    async def body() -> None:
        server = await served()
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", server.port)
        root = await factory.getRootObject()
        with pytest.raises(PBConnectionLost):
            await asyncio.wait_for(root.callRemote("hang_up"), 5)
        await asyncio.wait_for(connection.wait_closed(), 5)
        await until(lambda: not server.connections, "the server to forget the connection")
        await server.aclose()

    run(body)


def test_a_broker_that_closes_itself_over_max_broker_refs_closes_its_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_module, "MAX_BROKER_REFS", 4)

    async def body() -> None:
        server = await served()
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", server.port)
        root = await factory.getRootObject()
        kept = []
        refused = 0
        with pytest.raises(PBConnectionLost):
            for n in range(20):  # 4 refused, then the server goes
                try:
                    kept.append(await asyncio.wait_for(root.callRemote("thing", n), 5))
                except CopiedFailure:
                    refused += 1
        assert refused == 3
        await asyncio.wait_for(connection.wait_closed(), 5)
        await server.aclose()

    run(body)


def test_answers_sent_before_the_broker_closed_itself_still_go_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_module, "MAX_BROKER_REFS", 4)

    async def body() -> None:
        server = await served()
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", server.port)
        root = await factory.getRootObject()
        # One batch: 4 answers, 3 refusals, then the fourth refusal closes the server's broker.
        calls = [root.callRemote("thing", n) for n in range(8)]
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        kinds = [type(outcome).__name__ for outcome in outcomes]
        assert kinds == ["RemoteReference"] * 4 + ["CopiedFailure"] * 3 + ["PBConnectionLost"]
        await asyncio.wait_for(connection.wait_closed(), 5)
        await server.aclose()

    run(body)


# -- timers: the core's ConnectionTimers, polled with loop.time() -----------------------------------

SHORT = Timeouts(handshake=0.5, idle=0.3, probe=0.3)


async def silent_pb_server(accepted: list[asyncio.StreamWriter]) -> asyncio.Server:
    """A raw server that does the PB handshake (a bare Broker's bytes), then never reads or writes again."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        broker = Broker(is_client=False)
        broker.connection_made()
        writer.write(broker.data_to_send())
        while not broker.ready:
            broker.receive_data(await reader.read(65536))
        writer.write(broker.data_to_send())
        accepted.append(writer)  # kept open, and silent

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def silent_pb_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client that does the PB handshake (a bare Broker's bytes), then never reads or writes again."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    broker = Broker(is_client=True)
    broker.connection_made()
    while not broker.ready:
        broker.receive_data(await reader.read(65536))
        writer.write(broker.data_to_send())
    return reader, writer


def test_a_port_that_never_speaks_fails_the_handshake() -> None:
    async def body() -> None:
        accepted: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append((reader, writer))  # accepts, and says nothing (the writer kept: not collected)

        listener = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        factory = PBClientFactory(timeouts=SHORT)
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", port)
        assert connection.timers.broker is connection.broker
        with pytest.raises(PBConnectionLost) as caught:
            await asyncio.wait_for(factory.getRootObject(), 10)
        [reason] = caught.value.args
        assert isinstance(reason, ConnectionTimedOut)
        assert "nothing arrived" in str(reason)
        await asyncio.wait_for(connection.wait_closed(), 5)
        assert connection._wake is None  # no wake-up left behind
        await until(lambda: accepted, "the connection to be accepted")
        [(reader, writer)] = accepted
        assert await asyncio.wait_for(reader.read(), 5) == b""  # our side closed the socket
        writer.close()
        listener.close()

    run(body)


def test_a_server_gone_silent_is_taken_for_gone() -> None:
    async def body() -> None:
        accepted: list[asyncio.StreamWriter] = []
        listener = await silent_pb_server(accepted)
        port = listener.sockets[0].getsockname()[1]
        factory = PBClientFactory(timeouts=SHORT)
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", port)
        root = await asyncio.wait_for(factory.getRootObject(), 5)
        with pytest.raises(PBConnectionLost) as caught:
            await asyncio.wait_for(root.callRemote("echo", 1), 10)  # idle + probe: 0.6 s
        [reason] = caught.value.args
        assert isinstance(reason, ConnectionTimedOut)
        assert "taken for gone" in str(reason)
        await asyncio.wait_for(connection.wait_closed(), 5)
        assert connection.broker.closed
        for writer in accepted:
            writer.close()
        listener.close()

    run(body)


def test_a_client_gone_silent_is_dropped_by_the_server() -> None:
    async def body() -> None:
        server = await served(PBServerFactory(ServerRoot(), timeouts=SHORT))
        reader, writer = await silent_pb_client(server.port)
        await until(lambda: server.connections, "the server to see the connection")
        [server_connection] = server.connections
        await until(lambda: server_connection.broker.ready, "the handshake")
        await until(lambda: not server.connections, "the server to drop the silent client")
        reason = server_connection.broker.close_reason
        assert isinstance(reason, ConnectionTimedOut) and "taken for gone" in str(reason)
        probe = await asyncio.wait_for(reader.read(), 5)  # the probe, then the end
        assert b"pbcore_keepalive" in probe
        assert reader.at_eof()
        writer.close()
        await server.aclose()

    run(body)


def test_keepalive_probes_to_a_live_peer_keep_the_connection() -> None:
    async def body() -> None:
        quick = Timeouts(handshake=0.5, idle=0.2, probe=0.2)
        server = await served(PBServerFactory(ServerRoot(), timeouts=quick))
        factory = PBClientFactory(timeouts=quick)
        async with await pbcore_asyncio.connect(factory, "127.0.0.1", server.port) as connection:
            root = await factory.getRootObject()
            assert await root.callRemote("echo", 1) == [[1], {}]
            [server_connection] = server.connections
            received = connection.broker.bytes_received, server_connection.broker.bytes_received
            await asyncio.sleep(2)  # nothing from the application: only probes and their answers
            assert connection.broker.bytes_received > received[0]  # answers (and the server's probes)
            assert server_connection.broker.bytes_received > received[1]
            assert await root.callRemote("echo", 2) == [[2], {}]
            assert not connection.broker.closed and server.connections == {server_connection}
            assert connection._wake is not None  # the next probe's
        await server.aclose()
        assert connection._wake is None and server_connection._wake is None  # cancelled with their connections

    run(body)


def test_a_call_past_its_pbtimeout_fails_and_the_connection_goes_on() -> None:
    async def body() -> None:
        server = await served()
        factory = PBClientFactory()
        async with await pbcore_asyncio.connect(factory, "127.0.0.1", server.port) as connection:
            root = await factory.getRootObject()
            with pytest.raises(CallTimedOut, match="hang"):
                await asyncio.wait_for(root.callRemote("hang", pbtimeout=0.3), 10)
            assert await root.callRemote("echo", 1) == [[1], {}]
            assert connection.broker.calls_in_flight == 0
            assert not connection.broker.closed
        await server.aclose()

    run(body)


def test_calls_do_not_remake_the_wake_up() -> None:
    async def body() -> None:
        server = await served()
        factory = PBClientFactory()
        async with await pbcore_asyncio.connect(factory, "127.0.0.1", server.port) as connection:
            root = await factory.getRootObject()
            await root.callRemote("echo", 0)
            [server_connection] = server.connections
            wake_ups = connection._wake, server_connection._wake  # the handshake's 30 s, early now
            assert None not in wake_ups
            for n in range(50):  # each read moves the idle deadline on, each call adds a later one
                await root.callRemote("echo", n, pbtimeout=120)
            assert connection._wake is wake_ups[0] and server_connection._wake is wake_ups[1]
        await server.aclose()

    run(body)


def test_a_pbtimeout_call_made_while_serving_a_read_is_armed_at_once() -> None:
    async def body() -> None:
        root_object = ServerRoot()
        server = await served(PBServerFactory(root_object))
        factory = PBClientFactory()
        async with await pbcore_asyncio.connect(factory, "127.0.0.1", server.port):
            root = await factory.getRootObject()
            await root.callRemote("ask_back", Hanger(), 0.3)  # the server calls us back, and we never answer
            with pytest.raises(CallTimedOut, match="hang"):
                await asyncio.wait_for(root_object.asked, 10)  # no other traffic: only its deadline wakes the server
            [server_connection] = server.connections
            assert server_connection.broker.calls_in_flight == 0
        await server.aclose()

    run(body)


# -- the server: where, who, closing --------------------------------------------------------------


def test_serve_defaults_port_addresses_and_peers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pbcore.asyncio")

    async def body() -> None:
        server = await pbcore_asyncio.serve(PBServerFactory(ServerRoot()))  # 127.0.0.1, a free port
        assert server.port > 0
        assert [address[:2] for address in server.addresses] == [("127.0.0.1", server.port)]
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", server.port)
        assert connection.peer == ("127.0.0.1", server.port) == connection.broker.peer
        await (await factory.getRootObject()).callRemote("echo")
        [server_connection] = server.connections
        assert connection.transport is not None
        local = connection.transport.get_extra_info("sockname")
        assert server_connection.peer == local == server_connection.broker.peer
        assert server_connection.dispatcher.broker is server_connection.broker
        await server.aclose()
        await connection.wait_closed()
        messages = [record.getMessage() for record in caplog.records if record.name == "pbcore.asyncio"]
        assert f"accepted a connection from {local}" in messages
        assert any(message.startswith(f"the connection with {local} closed") for message in messages)

    run(body)


def test_close_waits_for_running_calls_up_to_the_grace_then_closes_every_connection() -> None:
    async def body() -> None:
        root_object = ServerRoot()
        server = await served(PBServerFactory(root_object))
        factories = [PBClientFactory() for _ in range(3)]
        connections = [await pbcore_asyncio.connect(factory, "127.0.0.1", server.port) for factory in factories]
        roots = [await factory.getRootObject() for factory in factories]
        await until(lambda: len(server.connections) == 3, "the server to see 3 connections")
        slow = asyncio.ensure_future(roots[0].callRemote("slow", 0.2))
        await until(lambda: any(c.dispatcher.running for c in server.connections), "the slow call to start")
        server.close(grace=30)
        assert await slow == "late"  # finished within the grace
        await asyncio.wait_for(server.wait_closed(), 10)
        assert server.connections == set()
        for connection in connections:
            await asyncio.wait_for(connection.wait_closed(), 10)
        with pytest.raises(OSError):  # no longer accepting
            await pbcore_asyncio.connect(PBClientFactory(), "127.0.0.1", server.port)

    run(body)


def test_close_past_the_grace_cancels_running_calls() -> None:
    async def body() -> None:
        root_object = ServerRoot()
        server = await served(PBServerFactory(root_object))
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", server.port)
        root = await factory.getRootObject()
        call = asyncio.ensure_future(root.callRemote("hang"))
        await asyncio.wait_for(root_object.hanging.wait(), 10)
        await asyncio.wait_for(server.aclose(grace=0.1), 10)
        with pytest.raises(PBConnectionLost):
            await call
        await asyncio.wait_for(root_object.cancelled.wait(), 5)
        await asyncio.wait_for(connection.wait_closed(), 5)

    run(body)


def test_serve_forever_and_async_with() -> None:
    async def body() -> None:
        async with await served() as server:
            forever = asyncio.ensure_future(server.serve_forever())
            factory = PBClientFactory()
            async with await pbcore_asyncio.connect(factory, "127.0.0.1", server.port) as connection:
                assert await (await factory.getRootObject()).callRemote("echo", 1) == [[1], {}]
            assert connection.broker.closed
            await asyncio.wait_for(connection.wait_closed(), 5)
            assert not forever.done()
            other = await pbcore_asyncio.connect(PBClientFactory(), "127.0.0.1", server.port)
        assert server.closing
        await asyncio.wait_for(forever, 10)  # returns once the server is closed
        await asyncio.wait_for(other.wait_closed(), 5)

        server = await served()
        other = await pbcore_asyncio.connect(PBClientFactory(), "127.0.0.1", server.port)
        forever = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0.01)
        forever.cancel()  # as asyncio.run does on Ctrl-C
        with pytest.raises(asyncio.CancelledError):
            await forever
        assert server.closing and server.connections == set()
        await asyncio.wait_for(other.wait_closed(), 5)

    run(body)


def test_nothing_is_printed(capfd: pytest.CaptureFixture[str]) -> None:
    async def body() -> None:
        async with await served() as server:
            factory = PBClientFactory()
            async with await pbcore_asyncio.connect(factory, "127.0.0.1", server.port):
                root = await factory.getRootObject()
                with pytest.raises(CopiedFailure):
                    await root.callRemote("fail")

    run(body)
    assert capfd.readouterr() == ("", "")


def test_idle_connections_cost_a_few_kib_each() -> None:
    # Each connection used to own a 64 KiB read buffer; the loop's connections now share one
    # (a read is handled before the loop reads again), and brokers share their encoders.
    count = 40

    async def main() -> float:
        server = await pbcore_asyncio.serve(PBServerFactory(Root()), "127.0.0.1", 0)
        connections: list[pbcore_asyncio.Connection] = []
        try:
            first = PBClientFactory()  # the first of each kind makes what is shared
            connections.append(await pbcore_asyncio.connect(first, "127.0.0.1", server.port))
            await first.getRootObject()
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            factories = [PBClientFactory() for _ in range(count)]
            for factory in factories:
                connections.append(await pbcore_asyncio.connect(factory, "127.0.0.1", server.port))
                await factory.getRootObject()
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            return grown / count / 1024
        finally:
            for connection in connections:
                connection.close()
            await server.aclose()

    per_pair = run(main)
    # Both ends are in this process: a client and a server connection, about 13 KiB together
    # as measured (each end held 64 KiB more before).
    assert per_pair < 40, f"{per_pair:.1f} KiB a connection pair"


def test_a_server_closed_without_waiting_as_its_loop_ends_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    # asyncio.run cancels the close under way; nothing of it may be left for
    # asyncio to report ("exception was never retrieved").
    caplog.set_level(logging.DEBUG, logger="asyncio")

    async def body() -> None:
        server = await pbcore_asyncio.serve(PBServerFactory(ServerRoot()), "127.0.0.1", 0)
        factory = PBClientFactory()
        await pbcore_asyncio.connect(factory, "127.0.0.1", server.port)
        await factory.getRootObject()
        server.close()

    run(body)
    gc.collect()  # an unretrieved exception is reported when its future is collected
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
