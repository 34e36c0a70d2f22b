"""The asyncio adapter over real sockets on loopback (TCP, TLS, unix)."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pbcore_asyncio
import pytest

from pbcore import Cacheable, Copyable, Referenceable, RemoteCache, RemoteCopy, Root, flavors
from pbcore.broker import Broker
from pbcore.cred import Anonymous, UsernamePassword
from pbcore.errors import NoSuchMethod, PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import CopiedFailure
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
        return b"x" * size


class Doubler(Referenceable):
    def remote_twice(self, x: int) -> int:
        return 2 * x


@pytest.fixture
def protocols(monkeypatch: pytest.MonkeyPatch) -> list[pbcore_asyncio.PBProtocol]:
    """Every PBProtocol made during the test, server side included (for introspection)."""
    made: list[pbcore_asyncio.PBProtocol] = []
    original = pbcore_asyncio.PBProtocol.connection_made

    def tracking(self: pbcore_asyncio.PBProtocol, transport: asyncio.BaseTransport) -> None:
        made.append(self)
        original(self, transport)

    monkeypatch.setattr(pbcore_asyncio.PBProtocol, "connection_made", tracking)
    return made


def server_side(protocols: list[pbcore_asyncio.PBProtocol]) -> list[pbcore_asyncio.PBProtocol]:
    return [protocol for protocol in protocols if protocol.broker is not None and not protocol.broker.is_client]


async def served(factory: PBServerFactory | None = None, **kwargs: Any) -> tuple[asyncio.Server, int]:
    server = await pbcore_asyncio.serve(factory or PBServerFactory(ServerRoot()), "127.0.0.1", 0, **kwargs)
    return server, server.sockets[0].getsockname()[1]


def test_calls_references_copies_caches_and_errors(protocols: list[pbcore_asyncio.PBProtocol]) -> None:
    async def body() -> None:
        root_object = ServerRoot()
        server, port = await served(PBServerFactory(root_object))
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", port)
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
        [server_protocol] = server_side(protocols)
        server_broker = server_protocol.broker
        assert server_broker is not None
        del thing, gauge
        for _ in range(500):  # up to 5 s on a loaded machine; done in a few ms normally
            gc.collect()
            await asyncio.sleep(0.01)
            if list(server_broker.localObjects) == [b"root"] and not server_broker.remotelyCachedObjects:
                break
        assert list(server_broker.localObjects) == [b"root"]
        assert root_object.gauge.observers == []
        connection.close()
        await connection.wait_closed()
        server.close()
        await server.wait_closed()

    run(body)


def test_login_through_a_portal() -> None:
    async def body() -> None:
        server, port = await served(login_factory())
        for credentials, expected in (
            (UsernamePassword("alice", "secret"), "hello alice"),
            (Anonymous(), "hello anonymous"),
        ):
            factory = PBClientFactory()
            connection = await pbcore_asyncio.connect(factory, "127.0.0.1", port)
            avatar = await factory.login(credentials)
            assert await avatar.callRemote("hello") == expected
            connection.close()
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", port)
        with pytest.raises(CopiedFailure) as caught:
            await factory.login(UsernamePassword("alice", "wrong"))
        assert caught.value.type == "twisted.cred.error.UnauthorizedLogin"
        connection.close()
        server.close()
        await server.wait_closed()

    run(body)


def test_a_timed_out_call_is_dropped_and_the_connection_goes_on() -> None:
    async def body() -> None:
        server, port = await served()
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", port)
        root = await factory.getRootObject()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(root.callRemote("slow", 0.3), 0.05)
        assert factory.broker is not None and factory.broker._waiting == {}  # forgotten at once
        await asyncio.sleep(0.4)  # the late answer arrives and is dropped
        assert await root.callRemote("echo", 1) == [[1], {}]
        assert not factory.broker.closed
        connection.close()
        server.close()
        await server.wait_closed()

    run(body)


def test_a_dropped_connection_fails_the_calls_in_flight(protocols: list[pbcore_asyncio.PBProtocol]) -> None:
    async def body() -> None:
        server, port = await served()
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", port)
        root = await factory.getRootObject()
        call = asyncio.ensure_future(root.callRemote("slow", 5))
        await asyncio.sleep(0.05)
        server.close()
        for protocol in server_side(protocols):
            protocol.close()  # the server drops the connection mid-call
        with pytest.raises(PBConnectionLost):
            await call
        await connection.wait_closed()

    run(body)


def test_garbage_closes_only_its_connection() -> None:
    async def body() -> None:
        server, port = await served()
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", port)
        root = await factory.getRootObject()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\xff" * 100)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) != b"garbage accepted"  # read to EOF: closed
        assert reader.at_eof()
        assert await root.callRemote("echo", "still here") == [["still here"], {}]
        writer.close()
        connection.close()
        server.close()
        await server.wait_closed()

    run(body)


def test_a_peer_that_stops_reading_does_not_make_the_server_buffer_without_bound(
    protocols: list[pbcore_asyncio.PBProtocol],
) -> None:
    answer_size = 200_000
    calls = 400  # 80 MB of answers if the server kept writing

    async def body() -> None:
        server, port = await served()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client = Broker(is_client=True)
        client.connection_made()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        while not client.ready:  # the handshake, read normally
            client.receive_data(await loop.sock_recv(sock, 65536))
            await loop.sock_sendall(sock, client.data_to_send())
        for _ in range(calls):
            client.root().callRemote("big", answer_size)
        await loop.sock_sendall(sock, client.data_to_send())  # and never read again
        [protocol] = server_side(protocols)
        assert protocol.transport is not None
        for _ in range(1000):  # until the server has stopped starting calls (bounded by run())
            await asyncio.sleep(0.01)
            if protocol._paused and protocol._waiting_calls:
                break
        buffered = protocol.transport.get_write_buffer_size()
        assert protocol._waiting_calls, "the server should have stopped starting calls"
        assert buffered <= (pbcore_asyncio.MAX_CONCURRENT_CALLS + 2) * answer_size
        sock.close()
        server.close()
        await server.wait_closed()

    run(body)


def test_tls(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    async def body() -> None:
        server, port = await served(ssl=server_context)
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect(
            factory, "127.0.0.1", port, ssl=client_context, server_hostname="localhost"
        )
        root = await factory.getRootObject()
        assert await root.callRemote("echo", "secure") == [["secure"], {}]
        assert connection.transport is not None and connection.transport.get_extra_info("ssl_object") is not None
        connection.close()
        server.close()
        await server.wait_closed()

    run(body)


def test_unix_socket(tmp_path: Path) -> None:
    async def body() -> None:
        path = str(tmp_path / "pb.sock")
        server = await pbcore_asyncio.serve_unix(PBServerFactory(ServerRoot()), path)
        factory = PBClientFactory()
        connection = await pbcore_asyncio.connect_unix(factory, path)
        root = await factory.getRootObject()
        assert await root.callRemote("echo", "local") == [["local"], {}]
        connection.close()
        server.close()
        await server.wait_closed()

    run(body)
