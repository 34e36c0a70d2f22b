"""The blocking adapter (plain sockets and threads) over loopback (against real Twisted
peers: tests/interop/test_tcp_matrix.py)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
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
from pbcore.errors import CallTimedOut, ConnectionTimedOut, PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import MAX_BROKER_REFS, CopiedFailure, RemoteReference
from pbcore.timers import Timeouts
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
        assert "can wait only for PB calls" in caught.value.value  # the driver accepts only its own connection's
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


def in_thread(target: Callable[[], Any]) -> Callable[[], Any]:
    """Run *target* in a daemon thread; a function that joins it (bounded) and returns or raises its outcome.

    So a test of a thing that may wait for ever (a timeout of None) fails instead of hanging.
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("value", target()))
        except BaseException as error:  # handed to the test
            outcome.append(("error", error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(TIMEOUT)
        assert outcome, "still waiting"
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return value

    return join


# -- timeout=None ------------------------------------------------------------------------


def test_no_timeout_on_either_side() -> None:
    with pbcore_blocking.serve(PBServerFactory(Service()), "127.0.0.1", 0, timeout=None) as server:
        # A client with a timeout, so that a server dropping the connection fails the test.
        with connect(server.port) as bounded:
            assert bounded.call(bounded.root(), "echo", 1) == [[1], {}]
        connection = pbcore_blocking.connect(PBClientFactory(), "127.0.0.1", server.port, timeout=None)
        with connection:
            assert connection.timeout is None

            def calls() -> Any:
                root = connection.root()  # no timeout: waits as long as it takes
                return connection.call(root, "echo", 2), connection.call(root, "sleep", 0.1)

            assert in_thread(calls)() == ([[2], {}], "slept")
        assert connection.wait_closed(TIMEOUT)


def test_login_with_no_timeout() -> None:
    with (
        pbcore_blocking.serve(login_factory(), "127.0.0.1", 0, timeout=None) as server,
        pbcore_blocking.connect(PBClientFactory(), "127.0.0.1", server.port, timeout=None) as connection,
    ):
        avatar = in_thread(lambda: connection.login(UsernamePassword("alice", "secret")))()
        assert in_thread(lambda: connection.call(avatar, "hello"))() == "hello alice"


# -- the accept loop ---------------------------------------------------------------------


def test_accept_errors_are_logged_and_the_server_keeps_serving(
    server: pbcore_blocking.BlockingServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pbcore.blocking")
    accept = socket.socket.accept
    failures = 3

    def failing_accept(sock: socket.socket) -> tuple[socket.socket, Any]:
        nonlocal failures
        if failures and sock.fileno() != -1 and sock.getsockname() == server.addresses[0]:
            failures -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return accept(sock)

    monkeypatch.setattr(socket.socket, "accept", failing_accept)
    assert wait_until(lambda: failures == 0)
    with connect(server.port) as connection:  # waited in the backlog: accepted once accept works again
        assert connection.call(connection.root(), "echo", 1) == [[1], {}]
    logged = [
        record for record in caplog.records if record.name == "pbcore.blocking" and "open files" in record.message
    ]
    assert len(logged) == 3
    assert all(record.levelno == logging.WARNING for record in logged)


def test_a_connection_that_cannot_be_set_up_is_closed_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pbcore.blocking")

    class Flaky(PBServerFactory):
        fail = 1

        def make_broker(self, **options: Any) -> Broker:
            if self.fail:
                self.fail -= 1
                raise RuntimeError("no broker today")
            return super().make_broker(**options)

    with pbcore_blocking.serve(Flaky(Service()), "127.0.0.1", 0) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw:
            assert raw.recv(4096) == b""  # closed, with no offer
        with connect(server.port) as connection:  # the next one is served
            assert connection.call(connection.root(), "echo", 1) == [[1], {}]
    logged = [record for record in caplog.records if record.name == "pbcore.blocking"]
    assert any("setting up the connection" in record.message and record.exc_info for record in logged)


# -- the broker closing itself -----------------------------------------------------------


class HangUp(Root):
    def rootObject(self, broker: Broker) -> Any:
        return HangUpRoot(broker)


class HangUpRoot(Referenceable):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def remote_hang_up(self) -> str:
        self.broker.connection_lost()  # the application closes the connection
        return "never sent"

    def remote_things(self, n: int) -> list[Thing]:
        return [Thing(i) for i in range(n)]


def test_a_served_method_closing_its_broker_closes_the_socket() -> None:
    with pbcore_blocking.serve(PBServerFactory(HangUp()), "127.0.0.1", 0) as server:
        with connect(server.port) as connection:
            with pytest.raises(PBConnectionLost):
                connection.call(connection.root(), "hang_up")  # the end of file, not the timeout
            assert connection.wait_closed(TIMEOUT)
        assert wait_until(lambda: not server.connections)


def test_a_client_closing_its_broker_closes_the_socket(server: pbcore_blocking.BlockingServer) -> None:
    with connect(server.port) as connection:
        connection.root()
        assert wait_until(lambda: len(server.connections) == 1)
        connection.broker.connection_lost()  # from the application's thread, not holding the lock
        assert wait_until(lambda: not server.connections)  # the server saw the end of file
        assert wait_until(lambda: connection.closed)


def test_a_peer_over_max_broker_refs_a_fourth_time_is_dropped() -> None:
    with pbcore_blocking.serve(PBServerFactory(HangUp()), "127.0.0.1", 0) as server:
        with connect(server.port) as connection:
            root = connection.root()
            for _ in range(3):
                with pytest.raises(CopiedFailure) as caught:
                    connection.call(root, "things", MAX_BROKER_REFS + 1)
                assert "Maximum PB reference count exceeded" in str(caught.value)
            with pytest.raises(PBConnectionLost):
                connection.call(root, "things", MAX_BROKER_REFS + 1)  # the end of file, not the timeout
            assert connection.wait_closed(TIMEOUT)
        assert wait_until(lambda: not server.connections)


# -- the shape: peer, logging, wait_closed, serve_forever --------------------------------


def test_peers_and_logging(server: pbcore_blocking.BlockingServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pbcore.blocking")
    assert server.addresses[0][1] == server.port
    connection = connect(server.port)
    with connection:
        connection.root()
        assert connection.peer == ("127.0.0.1", server.port)
        assert connection.broker.peer == connection.peer
        assert wait_until(lambda: len(server.connections) == 1)
        (served,) = server.connections
        here = connection._sock.getsockname()
        assert served.peer == here
        assert served.broker.peer == here
        assert served.dispatcher.broker is served.broker
    assert connection.wait_closed(0)
    assert wait_until(lambda: not server.connections)
    messages = [record.message for record in caplog.records if record.name == "pbcore.blocking"]
    assert any("accepted" in message and str(here) in message for message in messages)
    assert sum("closed" in message and str(here) in message for message in messages) >= 1
    assert any("closed" in message and str(connection.peer) in message for message in messages)


def test_wait_closed_times_out(server: pbcore_blocking.BlockingServer) -> None:
    with connect(server.port) as connection:
        assert connection.wait_closed(0.05) is False
    assert connection.wait_closed() is True


def test_serve_forever_returns_once_closed() -> None:
    server = pbcore_blocking.serve(PBServerFactory(Service()), "127.0.0.1", 0)
    with server:
        serving = in_thread(server.serve_forever)
        with connect(server.port) as connection:
            assert connection.call(connection.root(), "echo", 1) == [[1], {}]
            closer = in_thread(server.close)
            assert connection.wait_closed(TIMEOUT)
            closer()
            serving()  # returned
    server.serve_forever()  # closed already: returns at once


# -- server.close(grace) -----------------------------------------------------------------


class Busy(Root):
    """Calls that run until the test releases them."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.outcomes: list[str] = []

    def remote_block(self) -> str:
        self.started.set()
        self.release.wait(TIMEOUT)  # a plain method: it runs in the reader thread
        self.outcomes.append("returned")
        return "released"

    async def remote_ask(self, ref: RemoteReference) -> Any:
        self.started.set()
        try:
            return await ref.callRemote("answer")  # waits for the client
        except GeneratorExit:
            self.outcomes.append("cancelled")
            raise


class Answers(Referenceable):
    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def remote_answer(self) -> str:
        self.release.wait(TIMEOUT)  # in the client's reader thread
        return "answered"


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    except ConnectionRefusedError:
        return True
    return False


def test_close_with_idle_connections() -> None:
    server = pbcore_blocking.serve(PBServerFactory(Service()), "127.0.0.1", 0)
    connections = [connect(server.port) for _ in range(3)]
    for connection in connections:
        connection.root()
    assert wait_until(lambda: len(server.connections) == 3)
    server.close(grace=TIMEOUT)  # nothing running: no waiting for the grace
    assert not server.connections
    assert all(connection.wait_closed(TIMEOUT) for connection in connections)
    assert refuses_connections(server.port)
    server.close()  # again: nothing to do


@pytest.mark.parametrize("method", ["block", "ask"])
def test_close_waits_for_running_calls_within_the_grace(method: str) -> None:
    busy = Busy()
    server = pbcore_blocking.serve(PBServerFactory(busy), "127.0.0.1", 0)
    connection = connect(server.port)
    root = connection.root()
    idle = connect(server.port)
    idle.root()
    args = [] if method == "block" else [Answers(busy.release)]
    answer = in_thread(lambda: connection.call(root, method, *args))
    assert busy.started.wait(TIMEOUT)
    closer = in_thread(lambda: server.close(grace=2 * TIMEOUT))
    assert wait_until(lambda: refuses_connections(server.port))  # stopped accepting at once
    assert not connection.closed and not idle.closed  # waiting for the call
    busy.release.set()
    assert answer() == ("released" if method == "block" else "answered")
    closer()
    assert not server.connections
    assert connection.wait_closed(TIMEOUT) and idle.wait_closed(TIMEOUT)
    assert busy.outcomes == (["returned"] if method == "block" else [])


@pytest.mark.parametrize("method", ["block", "ask"])
def test_close_after_a_short_grace_closes_busy_connections(method: str) -> None:
    busy = Busy()
    server = pbcore_blocking.serve(PBServerFactory(busy), "127.0.0.1", 0)
    connection = connect(server.port)
    root = connection.root()
    client_release = threading.Event()
    args = [] if method == "block" else [Answers(client_release)]
    answer = in_thread(lambda: connection.call(root, method, *args))
    assert busy.started.wait(TIMEOUT)
    closer = in_thread(lambda: server.close(grace=0.1))
    if method == "block":
        # The plain method cannot be interrupted; its client sees the end at once all the same.
        with pytest.raises(PBConnectionLost):
            answer()
        assert not busy.outcomes
        busy.release.set()  # it returns, and its connection closes
        closer()
        assert busy.outcomes == ["returned"]
    else:
        closer()  # the served coroutine is cancelled
        assert busy.outcomes == ["cancelled"]
        client_release.set()  # the client's own method returns
        with pytest.raises(PBConnectionLost):
            answer()
    assert not server.connections
    assert connection.wait_closed(TIMEOUT)


# -- run() ---------------------------------------------------------------------------------


def test_run_timeout_cancels_the_call(server: pbcore_blocking.BlockingServer) -> None:
    with connect(server.port) as connection:
        root = connection.root()

        async def slow() -> Any:
            return await root.callRemote("sleep", 1.0)

        with pytest.raises(TimeoutError):
            connection.run(slow(), timeout=0.1)
        assert connection.broker.calls_in_flight == 0

        async def two() -> Any:
            return [await root.callRemote("echo", 1), await root.callRemote("quick")]

        assert connection.run(two()) == [[[1], {}], "quick"]


def test_run_refuses_other_awaitables(server: pbcore_blocking.BlockingServer) -> None:
    with connect(server.port) as connection:
        root = connection.root()

        async def sleeps() -> Any:
            try:
                await asyncio.sleep(0)
            except RuntimeError as error:  # thrown in at the await
                return ["refused", str(error), await root.callRemote("echo", 1)]
            return "slept"

        refused, message, echoed = connection.run(sleeps())
        assert refused == "refused" and "can wait only for PB calls" in message
        assert echoed == [[1], {}]


def test_a_coroutine_run_may_disconnect(
    server: pbcore_blocking.BlockingServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pbcore.blocking")
    factory = PBClientFactory()
    connection = pbcore_blocking.connect(factory, "127.0.0.1", server.port, timeout=TIMEOUT)

    async def echo_then_disconnect() -> Any:
        echoed = await (await factory.getRootObject()).callRemote("echo", 1)
        factory.disconnect()  # closes the connection from inside run(), holding its lock
        return echoed

    assert connection.run(echo_then_disconnect()) == [[1], {}]
    assert connection.closed  # at once: not left to the reader, which was waiting for the lock
    assert not [record for record in caplog.records if record.name == "pbcore.blocking"]
    assert wait_until(lambda: not server.connections)


# -- timers (pbcore.timers) ----------------------------------------------------------------

QUICK = Timeouts(handshake=0.5, idle=0.3, probe=0.3)


@contextlib.contextmanager
def silent_peer(speak: bool) -> Iterator[tuple[int, list[socket.socket]]]:
    """A port that accepts and never speaks, or (*speak*) completes the PB handshake and then goes silent."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            sock, _ = listener.accept()
            accepted.append(sock)
            if speak:
                handshake(sock, Broker(is_client=False))

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        listener.close()
        acceptor.join(TIMEOUT)
        for sock in accepted:
            sock.close()


def handshake(sock: socket.socket, broker: Broker) -> None:
    """Speak the PB handshake over *sock* as *broker*, then neither read nor write again."""
    sock.settimeout(TIMEOUT)
    broker.connection_made()
    sock.sendall(broker.data_to_send())
    while not broker.ready:
        data = sock.recv(65536)
        if not data:
            return
        broker.receive_data(data)
        sock.sendall(broker.data_to_send())


def sees_the_end(sock: socket.socket, timeout: float = TIMEOUT) -> bool:
    """Whether the peer of *sock* closes it within *timeout* (what it sent before is skipped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_a_port_that_never_speaks_fails_the_handshake() -> None:
    with silent_peer(speak=False) as (port, accepted):
        connection = pbcore_blocking.connect(PBClientFactory(timeouts=QUICK), "127.0.0.1", port, timeout=TIMEOUT)
        with connection, pytest.raises(PBConnectionLost) as caught:
            connection.root()  # its timeout (TIMEOUT) is far longer than the handshake's
        reason = caught.value.args[0]
        assert isinstance(reason, ConnectionTimedOut) and "nothing arrived" in str(reason), reason
        assert connection.wait_closed(TIMEOUT)
        assert wait_until(lambda: len(accepted) == 1)
        assert sees_the_end(accepted[0])


def test_a_server_gone_silent_is_taken_for_gone() -> None:
    with silent_peer(speak=True) as (port, accepted):
        connection = pbcore_blocking.connect(PBClientFactory(timeouts=QUICK), "127.0.0.1", port, timeout=TIMEOUT)
        with connection:
            root = connection.root()
            started = time.monotonic()
            with pytest.raises(PBConnectionLost) as caught:
                connection.call(root, "anything")  # never answered: the silence is noticed first
            reason = caught.value.args[0]
            assert isinstance(reason, ConnectionTimedOut) and "taken for gone" in str(reason), reason
            assert time.monotonic() - started < TIMEOUT
            assert connection.wait_closed(TIMEOUT)
            assert sees_the_end(accepted[0])


def test_a_client_gone_silent_is_dropped_by_the_server() -> None:
    factory = PBServerFactory(Service(), timeouts=QUICK)
    with (
        pbcore_blocking.serve(factory, "127.0.0.1", 0) as server,
        socket.create_connection(("127.0.0.1", server.port)) as sock,
    ):
        handshake(sock, Broker(is_client=True))
        assert wait_until(lambda: len(server.connections) == 1)
        assert wait_until(lambda: not server.connections), "the silent client was kept"
        assert sees_the_end(sock)


def test_a_client_that_never_speaks_is_dropped_by_the_server() -> None:
    factory = PBServerFactory(Service(), timeouts=QUICK)
    with (
        pbcore_blocking.serve(factory, "127.0.0.1", 0) as server,
        socket.create_connection(("127.0.0.1", server.port)) as sock,
    ):
        assert wait_until(lambda: len(server.connections) == 1)
        assert wait_until(lambda: not server.connections), "the silent client was kept"
        assert sees_the_end(sock)  # after the server's offer


def test_probes_keep_an_idle_connection() -> None:
    keep = Timeouts(idle=0.2, probe=0.2)
    with pbcore_blocking.serve(PBServerFactory(Service(), timeouts=keep), "127.0.0.1", 0) as server:
        connection = pbcore_blocking.connect(PBClientFactory(timeouts=keep), "127.0.0.1", server.port, timeout=TIMEOUT)
        with connection:
            root = connection.root()
            (served,) = server.connections
            before = connection.broker.bytes_received, served.broker.bytes_received
            time.sleep(2.0)  # several probes each way, and nothing else
            after = connection.broker.bytes_received, served.broker.bytes_received
            assert after[0] > before[0] and after[1] > before[1], "no probe was answered"
            assert connection.call(root, "echo", "still here") == [["still here"], {}]
            assert server.connections == {served}


def forever(broker: Broker) -> Any:
    """A pending call of *broker*'s connection that nothing settles (a served coroutine may await it)."""
    return broker.pending_factory()


class Deadlines(Root):
    def rootObject(self, broker: Broker) -> Any:
        return DeadlinesRoot(broker)


class DeadlinesRoot(Referenceable):
    """Per connection: a method that never answers, and one that calls the client back with a deadline."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def remote_hang(self) -> None:
        await forever(self.broker)

    async def remote_ask(self, ref: RemoteReference) -> str:
        try:
            return str(await ref.callRemote("hang", pbtimeout=0.3))
        except CallTimedOut as error:
            return f"timed out: {error}"

    def remote_echo(self, value: Any) -> Any:
        return value


class Hangs(Referenceable):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def remote_hang(self) -> None:
        await forever(self.broker)


def test_a_call_past_its_deadline_fails_and_the_connection_goes_on() -> None:
    with (
        pbcore_blocking.serve(PBServerFactory(Deadlines()), "127.0.0.1", 0) as server,
        connect(server.port) as connection,  # default timeouts: the next keepalive is a minute away
    ):
        root = connection.root()
        started = time.monotonic()
        with pytest.raises(CallTimedOut, match="hang"):
            connection.call(root, "hang", pbtimeout=0.3)  # made in this thread, expired by the reader
        assert time.monotonic() - started < TIMEOUT  # not the call's own timeout
        assert connection.broker.calls_in_flight == 0
        assert connection.call(root, "echo", 1) == 1

        async def hang_with_deadline() -> Any:
            try:
                return await root.callRemote("hang", pbtimeout=0.3)
            except CallTimedOut as error:
                return error

        failed = connection.run(hang_with_deadline())
        assert isinstance(failed, CallTimedOut) and "hang" in str(failed), failed
        assert connection.broker.calls_in_flight == 0
        # A served coroutine whose call back times out is resumed by its reader.
        answer = connection.call(root, "ask", Hangs(connection.broker))
        assert answer.startswith("timed out: hang"), answer
        assert connection.call(root, "echo", 2) == 2
        assert connection.broker.calls_in_flight == 0
        assert len(server.connections) == 1
