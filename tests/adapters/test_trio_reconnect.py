"""pbcore_trio.reconnect.ReconnectingClient over real sockets on loopback: servers of ours
restarted on the same port, no server at all, a refused login, a Twisted server killed
and started again, stop() in each state."""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pbcore_trio
import pytest
import trio
from pbcore_trio.reconnect import ClientStopped, ReconnectingClient

from pbcore.cred import UsernamePassword
from pbcore.errors import ConnectionTimedOut, DeadReferenceError, PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import RemoteReference
from pbcore.reconnect import Backoff, ClientState, is_login_refusal
from pbcore.timers import Timeouts
from tests.adapters.certs import make_certificate
from tests.adapters.services import PeerRootMaker, Realm, login_factory
from tests.interop.peers import PEER, _environment, _read_port

T = TypeVar("T")

HOST = "127.0.0.1"
FAST = Backoff(initial=0.05, maximum=0.2, jitter=0.0)
ALICE = UsernamePassword("alice", "secret")


def run(body: Callable[[], Awaitable[T]], timeout: float = 20) -> T:
    """Run one async test body under trio, bounded in time."""

    async def bounded() -> T:
        with trio.fail_after(timeout):
            return await body()

    return trio.run(bounded)


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.01)


def free_port() -> int:
    """A port nothing listens on (for now)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def start(nursery: trio.Nursery, client: ReconnectingClient) -> trio.Event:
    """Run *client* in *nursery*; the event is set once run() has returned (normally)."""
    returned = trio.Event()

    async def running() -> None:
        await client.run()
        returned.set()

    nursery.start_soon(running)
    return returned


class Attempts:
    """A factory that notes trio's clock at each attempt."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self) -> PBClientFactory:
        self.times.append(trio.current_time())
        return PBClientFactory()


# -- 1. restarts ------------------------------------------------------------------------------


def test_logs_in_again_after_each_restart_of_the_server_on_the_same_port() -> None:
    avatars: list[RemoteReference] = []

    async def note(avatar: RemoteReference) -> None:  # an async on_connect
        await trio.sleep(0)
        avatars.append(avatar)

    async def body() -> None:
        realm = Realm()
        port = free_port()
        client = ReconnectingClient(HOST, port, credentials=ALICE, on_connect=note, backoff=FAST)
        previous: RemoteReference | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)  # nothing listens yet: it tries, and waits
            for round_ in range(4):  # the first server, then three restarts on the same port
                async with pbcore_trio.open_server(login_factory(realm), HOST, port):
                    avatar = await client.connected()  # waits, while the client tries again
                    assert client.state is ClientState.CONNECTED and client.reference is avatar
                    assert client.policy.connections == round_ + 1
                    await until(lambda: len(avatars) == client.policy.connections)
                    assert avatars[-1] is avatar and avatar is not previous
                    assert await avatar.callRemote("hello") == "hello alice"
                # The server closed its connections: the client is disconnected, and waits or tries again.
                await until(lambda: client.state is not ClientState.CONNECTED)
                assert client.reference is None
                assert isinstance(client.last_error, PBConnectionLost)
                with trio.fail_after(1), pytest.raises(DeadReferenceError):
                    await avatar.callRemote("hello")  # at once: the old avatar is dead
                previous = avatar
            client.stop()
        assert len(avatars) == 4 and len({id(avatar) for avatar in avatars}) == 4
        assert realm.logouts == ["alice"] * 4

    run(body)


# -- 2. backoff -------------------------------------------------------------------------------


def test_the_delays_between_attempts_are_the_backoffs() -> None:
    async def body() -> None:
        attempts = Attempts()
        backoff = Backoff(initial=0.05, factor=2, maximum=0.2, jitter=0)
        client = ReconnectingClient(HOST, free_port(), factory=attempts, backoff=backoff)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            await until(lambda: len(attempts.times) >= 7)
            client.stop()
        assert isinstance(client.last_error, OSError)  # connection refused
        times = attempts.times
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)][:6]
        for gap, expected in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2, 0.2], strict=True):
            assert expected - 1e-6 <= gap < expected + 1.0, gaps  # each delay waited (plus the attempt's time)
        assert gaps[-1] < 1.0, gaps  # capped at 0.2 (1.6 without the maximum)

    run(body)


# -- 3. a refused login -----------------------------------------------------------------------


def test_a_refused_login_stops_the_client() -> None:
    async def body() -> None:
        async with pbcore_trio.open_server(login_factory(), HOST, 0) as server:
            attempts = Attempts()
            wrong = UsernamePassword("alice", "wrong")
            client = ReconnectingClient(HOST, server.port, credentials=wrong, factory=attempts, backoff=FAST)
            with pytest.raises(Exception) as raised:
                await client.run()
            refusal = raised.value
            assert is_login_refusal(refusal) and client.last_error is refusal
            assert client.state is ClientState.STOPPED and client.reference is None
            assert len(attempts.times) == 1
            with pytest.raises(Exception) as waited:
                await client.connected()
            assert waited.value is refusal
            await trio.sleep(0.3)  # no other attempt comes
            assert len(attempts.times) == 1

    run(body)


def test_a_refused_login_is_tried_again_if_asked() -> None:
    async def body() -> None:
        async with pbcore_trio.open_server(login_factory(), HOST, 0) as server:
            attempts = Attempts()
            wrong = UsernamePassword("alice", "wrong")
            client = ReconnectingClient(
                HOST, server.port, credentials=wrong, factory=attempts, backoff=FAST, retry_refused_login=True
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.run)  # returns normally after stop()
                await until(lambda: len(attempts.times) >= 4 and client.state is ClientState.WAITING)
                assert client.connection is None and client.reference is None  # between attempts
                assert client.last_error is not None and is_login_refusal(client.last_error)
                client.stop()

    run(body)


def test_a_refused_login_ends_the_async_with_block() -> None:
    async def body() -> None:
        async with pbcore_trio.open_server(login_factory(), HOST, 0) as server:
            wrong = UsernamePassword("alice", "wrong")
            # The block waits for the avatar: it gets the refusal.
            with pytest.raises(Exception) as raised:
                async with ReconnectingClient(HOST, server.port, credentials=wrong, backoff=FAST) as client:
                    await client.connected()
            assert is_login_refusal(raised.value) and client.last_error is raised.value
            # The block does something else: it is cancelled, and the refusal raised.
            with trio.fail_after(5), pytest.raises(Exception) as raised:
                async with ReconnectingClient(HOST, server.port, credentials=wrong, backoff=FAST) as client:
                    await trio.sleep_forever()
            assert is_login_refusal(raised.value) and client.state is ClientState.STOPPED

    run(body)


# -- 4. a Twisted server, killed and started again ------------------------------------------------


def start_twisted_server(port: int) -> subprocess.Popen[str]:
    """tests/interop/twisted_peer.py's login server on *port* (peers.twisted_server always asks for port 0)."""
    command = [sys.executable, str(PEER), "server", "--port", str(port), "--login", "--timeout", "60"]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_environment()
    )
    try:
        assert _read_port(process, 20.0) == port
    except BaseException:
        kill(process)
        raise
    return process


def kill(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait(timeout=10)
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()


def test_reconnects_to_a_twisted_server_killed_and_started_again() -> None:
    pytest.importorskip("twisted.spread.pb")
    port = free_port()
    avatars: list[RemoteReference] = []

    async def body() -> None:
        process = await trio.to_thread.run_sync(start_twisted_server, port)
        try:
            async with ReconnectingClient(
                HOST, port, credentials=ALICE, on_connect=avatars.append, backoff=FAST
            ) as client:
                first = await client.connected()
                assert await first.callRemote("hello") == "hello alice"
                await trio.to_thread.run_sync(kill, process)
                await until(lambda: client.state is not ClientState.CONNECTED)
                with pytest.raises(DeadReferenceError):
                    first.callRemote("hello")
                process = await trio.to_thread.run_sync(start_twisted_server, port)
                second = await client.connected()
                assert second is not first
                assert await second.callRemote("hello") == "hello alice"
                await until(lambda: len(avatars) == 2)
                assert avatars == [first, second]
            assert client.state is ClientState.STOPPED
        finally:
            await trio.to_thread.run_sync(kill, process)

    run(body, timeout=60)


# -- 5. stop() --------------------------------------------------------------------------------


def test_stop_while_connected_closes_the_connection() -> None:
    async def body() -> None:
        async with pbcore_trio.open_server(PBServerFactory(PeerRootMaker()), HOST, 0) as server:
            client = ReconnectingClient(HOST, server.port, backoff=FAST)  # no credentials: the root object
            async with trio.open_nursery() as nursery:
                returned = start(nursery, client)
                root = await client.connected()
                assert await root.callRemote("echo", 1) == [[1], {}]
                connection = client.connection
                assert connection is not None and len(server.connections) == 1
                client.stop()
                with trio.fail_after(2):
                    await connection.wait_closed()
                    await returned.wait()  # run() returned normally
                    await until(lambda: not server.connections)  # the server saw it close
            assert client.state is ClientState.STOPPED and client.reference is None and client.connection is None
            with pytest.raises(DeadReferenceError):
                root.callRemote("echo", 1)
            with pytest.raises(ClientStopped):
                await client.connected()
            await trio.sleep(0.2)
            assert not server.connections  # it did not come back

    run(body)


def test_stop_while_waiting_or_connecting_ends_at_once() -> None:
    async def body() -> None:
        # Waiting: nothing listens, and the next attempt is a minute away.
        attempts = Attempts()
        client = ReconnectingClient(HOST, free_port(), factory=attempts, backoff=Backoff(initial=60, jitter=0))
        async with trio.open_nursery() as nursery:
            returned = start(nursery, client)
            await until(lambda: client.state is ClientState.WAITING and len(attempts.times) == 1)
            waiter_failed: list[BaseException] = []

            async def wait_for_it() -> None:
                try:
                    await client.connected()
                except ClientStopped as error:
                    waiter_failed.append(error)

            nursery.start_soon(wait_for_it)
            await trio.sleep(0.05)
            client.stop()
            with trio.fail_after(1):
                await returned.wait()
        assert client.state is ClientState.STOPPED and len(waiter_failed) == 1

        # Connecting: a port that accepts TCP connections and never says a word.
        with trio.socket.socket() as silent:
            await silent.bind((HOST, 0))
            silent.listen(8)
            client = ReconnectingClient(HOST, silent.getsockname()[1], factory=attempts, backoff=FAST)
            async with trio.open_nursery() as nursery:
                returned = start(nursery, client)
                await until(lambda: client.connection is not None)  # TCP is up, the PB handshake never comes
                assert client.state is ClientState.CONNECTING
                client.stop()
                with trio.fail_after(1):
                    await returned.wait()
            assert client.policy.stopped

        # Stopped before it ran: run() returns at once, without an attempt.
        client = ReconnectingClient(HOST, free_port(), factory=attempts, backoff=FAST)
        client.stop()
        count = len(attempts.times)
        with trio.fail_after(1):
            await client.run()
        assert len(attempts.times) == count
        with pytest.raises(RuntimeError):
            await client.run()  # once only

    run(body)


def test_a_connection_that_does_not_come_up_in_time_is_a_failed_attempt() -> None:
    def quick() -> PBClientFactory:
        return PBClientFactory(timeouts=Timeouts(handshake=0.2))

    async def body() -> None:
        with trio.socket.socket() as silent:  # accepts TCP connections (the kernel does) and never says a word
            await silent.bind((HOST, 0))
            silent.listen(8)
            port = silent.getsockname()[1]
            # TLS: its handshake never ends; the attempt's deadline is the factory's handshake timeout.
            client = ReconnectingClient(
                HOST, port, factory=quick, backoff=FAST, ssl_context=ssl.create_default_context()
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.run)
                await until(lambda: client.policy.failures >= 2)
                client.stop()
            assert isinstance(client.last_error, ConnectionTimedOut), repr(client.last_error)
            assert f"no connection to {HOST}:{port} within 0.2 s" in str(client.last_error)
            # Plain TCP: the core's handshake timer fails the attempt.
            client = ReconnectingClient(HOST, port, factory=quick, backoff=FAST)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.run)
                await until(lambda: client.policy.failures >= 2)
                client.stop()
            assert "no PB handshake" in str(client.last_error), repr(client.last_error)

    run(body)


# -- on_connect, async with, TLS --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "async"])
def test_an_on_connect_that_raises_is_logged_and_the_client_goes_on(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    def plain(root: RemoteReference) -> None:
        raise RuntimeError("the application's on_connect bug")

    async def asynchronous(root: RemoteReference) -> None:
        await trio.sleep(0)
        raise RuntimeError("the application's on_connect bug")

    on_connect: Callable[[RemoteReference], Any] = plain if kind == "plain" else asynchronous

    async def body() -> None:
        async with (
            pbcore_trio.open_server(PBServerFactory(PeerRootMaker()), HOST, 0) as server,
            ReconnectingClient(HOST, server.port, on_connect=on_connect, backoff=FAST) as client,
        ):
            root = await client.connected()
            await until(lambda: any("on_connect bug" in record.getMessage() for record in caplog.records))
            assert await root.callRemote("echo", 2) == [[2], {}]
            assert client.state is ClientState.CONNECTED and client.reference is root

    with caplog.at_level(logging.ERROR, logger="pbcore.trio"):
        run(body)
    (record,) = [record for record in caplog.records if "on_connect bug" in record.getMessage()]
    assert record.name == "pbcore.trio" and record.levelno == logging.ERROR


def test_over_tls(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    async def body() -> None:
        factory = login_factory()
        async with pbcore_trio.open_server(factory, HOST, 0, ssl_context=server_context) as server:
            async with ReconnectingClient(
                HOST,
                server.port,
                credentials=ALICE,
                backoff=FAST,
                ssl_context=client_context,
                server_hostname="localhost",
            ) as client:
                avatar = await client.connected()
                assert await avatar.callRemote("hello") == "hello alice"
                connection = client.connection
                assert connection is not None and isinstance(connection.stream, trio.SSLStream)
            assert client.state is ClientState.STOPPED

    run(body)
