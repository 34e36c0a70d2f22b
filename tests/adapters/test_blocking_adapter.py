"""The blocking adapter (plain sockets and threads) over loopback (against real Twisted
peers: tests/interop/test_tcp_matrix.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pbcore_blocking
import pytest

from pbcore import Referenceable, Root
from pbcore.broker import Broker
from pbcore.cred import Anonymous, UsernamePassword
from pbcore.errors import PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import CopiedFailure, RemoteReference
from tests.adapters.certs import make_certificate
from tests.adapters.services import login_factory

TIMEOUT = 5.0


class Thing(Referenceable):
    def __init__(self, n: int) -> None:
        self.n = n

    def remote_n(self) -> int:
        return self.n


class Twice(Referenceable):
    def remote_twice(self, x: Any) -> Any:
        return x * 2


class Service(Root):
    def remote_echo(self, *args: Any, **kw: Any) -> Any:
        return [list(args), kw]

    def remote_thing(self, n: int) -> Thing:
        return Thing(n)

    def remote_fail(self) -> None:
        raise ValueError("nope")

    def remote_sleep(self, seconds: float) -> str:
        time.sleep(seconds)
        return "slept"

    async def remote_quick(self) -> str:
        return "quick"

    async def remote_waits(self) -> str:
        await asyncio.sleep(0)  # suspends: the blocking adapter answers with an error
        return "never"

    async def remote_call_back(self, ref: RemoteReference, x: Any) -> Any:
        # Waits for a PB call over the caller's own connection: resumed by its reader.
        doubled = await ref.callRemote("twice", x)
        return await ref.callRemote("twice", doubled)

    def remote_keep(self, ref: RemoteReference) -> None:
        self.kept = ref

    async def remote_ask_kept(self, x: Any) -> Any:
        return await self.kept.callRemote("twice", x)  # over another connection: refused


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def server() -> Iterator[pbcore_blocking.BlockingServer]:
    with pbcore_blocking.serve(PBServerFactory(Service()), "127.0.0.1", 0) as served:
        yield served


def connect(port: int) -> pbcore_blocking.BlockingConnection:
    return pbcore_blocking.connect(PBClientFactory(), "127.0.0.1", port, timeout=TIMEOUT)


def test_calls(server: pbcore_blocking.BlockingServer) -> None:
    with connect(server.port) as connection:
        root = connection.root()
        assert connection.call(root, "echo", 1, "two", x=b"3") == [[1, "two"], {"x": b"3"}]
        assert connection.call(root, "quick") == "quick"
        twice = Twice()  # a reference to our own object comes back as that object
        assert connection.call(root, "echo", twice)[0][0] is twice


def test_a_method_that_waits_gets_an_error(server: pbcore_blocking.BlockingServer) -> None:
    with connect(server.port) as connection:
        root = connection.root()
        with pytest.raises(CopiedFailure) as caught:
            connection.call(root, "waits")
        assert caught.value.check(RuntimeError)
        assert connection.call(root, "echo", 1) == [[1], {}]


def test_a_method_may_wait_for_calls_back_over_its_own_connection(server: pbcore_blocking.BlockingServer) -> None:
    with connect(server.port) as connection:
        root = connection.root()
        assert connection.call(root, "call_back", Twice(), 5) == 20
        assert connection.call(root, "echo", 1) == [[1], {}]


def test_a_method_waiting_for_another_connection_gets_an_error(server: pbcore_blocking.BlockingServer) -> None:
    with connect(server.port) as first, connect(server.port) as second:
        first.call(first.root(), "keep", Twice())
        with pytest.raises(CopiedFailure) as caught:
            second.call(second.root(), "ask_kept", 5)
        assert caught.value.check(RuntimeError)
        assert "can wait only for PB calls over its own connection" in caught.value.value
        assert second.call(second.root(), "echo", 1) == [[1], {}]


def test_a_method_waiting_when_the_connection_drops_finishes_quietly(server: pbcore_blocking.BlockingServer) -> None:
    class Slow(Referenceable):
        def __init__(self) -> None:
            self.asked = threading.Event()

        def remote_twice(self, x: Any) -> Any:
            self.asked.set()
            time.sleep(0.2)  # the client closes meanwhile: the server's call fails
            return x * 2

    slow = Slow()
    connection = connect(server.port)
    root = connection.root()
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            connection.call(root, "call_back", slow, 5)
        except BaseException as error:  # the outcome is what is checked
            outcome.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    assert slow.asked.wait(TIMEOUT)  # the server's method is waiting for our answer
    connection.close()
    caller.join(TIMEOUT)
    assert [type(error) for error in outcome] == [PBConnectionLost]
    assert wait_until(lambda: not server.connections)
    with connect(server.port) as other:  # the server goes on
        assert other.call(other.root(), "echo", 1) == [[1], {}]


def test_tls(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    with pbcore_blocking.serve(PBServerFactory(Service()), "127.0.0.1", 0, ssl_context=server_context) as server:
        connection = pbcore_blocking.connect(
            PBClientFactory(),
            "127.0.0.1",
            server.port,
            timeout=TIMEOUT,
            ssl_context=client_context,
            server_hostname="localhost",
        )
        with connection:
            root = connection.root()
            assert connection.call(root, "echo", "secure") == [["secure"], {}]
            big = b"x" * 300_000
            assert connection.call(root, "echo", big) == [[big], {}]
            thing = connection.call(root, "thing", 4)
            assert connection.call(thing, "n") == 4


def test_references_are_released(server: pbcore_blocking.BlockingServer) -> None:
    with connect(server.port) as connection:
        root = connection.root()
        thing = connection.call(root, "thing", 7)
        assert isinstance(thing, RemoteReference)
        assert connection.call(thing, "n") == 7
        (served,) = server.connections
        assert len(served.broker.localObjects) == 2
        del thing
        gc.collect()
        assert wait_until(lambda: set(served.broker.localObjects) == {b"root"})


def test_errors(server: pbcore_blocking.BlockingServer) -> None:
    with connect(server.port) as connection:
        root = connection.root()
        with pytest.raises(CopiedFailure) as caught:
            connection.call(root, "fail")
        assert caught.value.check(ValueError)
        assert connection.call(root, "echo", 1) == [[1], {}]


def test_login_through_a_portal() -> None:
    with pbcore_blocking.serve(login_factory(), "127.0.0.1", 0) as server:
        for credentials, expected in (
            (UsernamePassword("alice", "secret"), "hello alice"),
            (Anonymous(), "hello anonymous"),
        ):
            with connect(server.port) as connection:
                avatar = connection.login(credentials)
                assert connection.call(avatar, "hello") == expected
        with connect(server.port) as connection:
            with pytest.raises(CopiedFailure) as caught:
                connection.login(UsernamePassword("alice", "wrong"))
            assert caught.value.type == "twisted.cred.error.UnauthorizedLogin"


def test_call_timeout(server: pbcore_blocking.BlockingServer) -> None:
    with connect(server.port) as connection:
        root = connection.root()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            connection.call(root, "sleep", 1.0, timeout=0.1)
        assert time.monotonic() - started < 0.9
        assert connection.broker.calls_in_flight == 0
        assert connection.call(root, "echo", 2) == [[2], {}]


def test_connection_dropped_mid_call() -> None:
    server = pbcore_blocking.serve(PBServerFactory(Service()), "127.0.0.1", 0)
    try:
        with connect(server.port) as connection:
            root = connection.root()
            closer = threading.Timer(0.1, server.close)
            closer.start()
            with pytest.raises(PBConnectionLost):
                connection.call(root, "sleep", 0.5)
            closer.join(TIMEOUT)
            assert connection.closed
    finally:
        server.close()


def test_client_close_fails_waiting_call(server: pbcore_blocking.BlockingServer) -> None:
    connection = connect(server.port)
    root = connection.root()
    closer = threading.Timer(0.1, connection.close)
    closer.start()
    with pytest.raises(PBConnectionLost):
        connection.call(root, "sleep", 0.5)
    closer.join(TIMEOUT)


def test_garbage_closes_only_that_connection(server: pbcore_blocking.BlockingServer) -> None:
    with connect(server.port) as good:
        root = good.root()
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw:
            raw.sendall(b"\xff" * 100)
            received = b""
            while True:
                chunk = raw.recv(4096)  # the offer, then end of file
                if not chunk:
                    break
                received += chunk
        assert wait_until(lambda: len(server.connections) == 1)
        assert good.call(root, "echo", 3) == [[3], {}]


def test_server_close_is_bounded(server: pbcore_blocking.BlockingServer) -> None:
    connections = [connect(server.port) for _ in range(3)]
    for connection in connections:
        connection.root()
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 2
    assert wait_until(lambda: all(connection.closed for connection in connections))
    for connection in connections:
        connection.close()


def test_a_peer_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    # The server's reader thread writes each answer before it reads more, so a
    # peer that never reads stalls only its own connection, holds at most the
    # socket buffers, and is dropped once a write has waited `timeout`.
    answer_size, calls = 200_000, 400  # 80 MB of answers if the server kept them
    with pbcore_blocking.serve(PBServerFactory(Service()), "127.0.0.1", 0, timeout=0.5) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client = Broker(is_client=True)
        client.connection_made()
        while not client.ready:  # the handshake, read normally
            client.receive_data(sock.recv(65536))
            sock.sendall(client.data_to_send())
        for _ in range(calls):
            client.root().callRemote("echo", b"x" * answer_size)
        sending = threading.Thread(target=lambda: _send_quietly(sock, client.data_to_send()), daemon=True)
        sending.start()  # and never read again
        assert wait_until(lambda: not server.connections)  # dropped: its write timed out
        with connect(server.port) as other:  # the server itself goes on
            assert other.call(other.root(), "echo", 1) == [[1], {}]
        sock.close()
        sending.join(TIMEOUT)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)
