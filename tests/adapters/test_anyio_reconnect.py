"""pbcore_anyio.reconnect.ReconnectingClient over real sockets on loopback, on both of anyio's
backends: servers of ours restarted on the same port, no server at all, a refused login, a
Twisted server killed and started again, stop() in each state."""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pbcore_anyio
import pytest
from anyio.abc import TaskGroup
from anyio.streams.tls import TLSStream
from pbcore_anyio.reconnect import ClientStopped, ReconnectingClient

from pbcore.cred import UsernamePassword
from pbcore.errors import ConnectionTimedOut, DeadReferenceError, PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import RemoteReference
from pbcore.reconnect import Backoff, ClientState, is_login_refusal
from pbcore.timers import Timeouts
from tests.adapters.certs import make_certificate
from tests.adapters.services import PeerRootMaker, Realm, login_factory
from tests.interop.peers import PEER, START_TIMEOUT, _environment, _read_port

HOST = "127.0.0.1"
#: Short delays, so that the tests are quick.
FAST = Backoff(initial=0.05, maximum=0.2, jitter=0.0)
ALICE = UsernamePassword("alice", "secret")
WRONG = UsernamePassword("alice", "wrong")


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def run(backend: str, body: Callable[[], Awaitable[None]], timeout: float = 30) -> None:
    """Run one async test body on *backend*, bounded in time."""

    async def bounded() -> None:
        with anyio.fail_after(timeout):
            await body()

    anyio.run(bounded, backend=backend)


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await anyio.sleep(0.01)


def free_port() -> int:
    """A port nothing listens on (for now)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Attempts:
    """A factory that notes anyio's clock at each attempt."""

    def __init__(self, timeouts: Timeouts | None = None) -> None:
        self.times: list[float] = []
        self.timeouts = timeouts

    def __call__(self) -> PBClientFactory:
        self.times.append(anyio.current_time())
        return PBClientFactory() if self.timeouts is None else PBClientFactory(timeouts=self.timeouts)


class Running:
    """``client.run()`` in a task: ``returned`` is set once it has returned normally."""

    def __init__(self, tg: TaskGroup, client: ReconnectingClient) -> None:
        self.returned = anyio.Event()
        self.client = client
        tg.start_soon(self._run)

    async def _run(self) -> None:
        await self.client.run()
        self.returned.set()


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


# -- 1. restarts ------------------------------------------------------------------------------


def test_logs_in_again_after_each_restart_of_the_server_on_the_same_port(backend: str) -> None:
    avatars: list[RemoteReference] = []

    async def note(avatar: RemoteReference) -> None:  # an async on_connect
        await anyio.sleep(0)
        avatars.append(avatar)

    async def body() -> None:
        realm = Realm()
        port = free_port()
        client = ReconnectingClient(HOST, port, credentials=ALICE, on_connect=note, backoff=FAST)
        seen_at_loss: list[tuple[ClientState, object]] = []
        previous: RemoteReference | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)  # nothing listens yet: it tries, and waits
            await until(lambda: client.state is ClientState.WAITING)
            for round_ in range(4):  # the first server, then three restarts on the same port
                async with pbcore_anyio.open_server(login_factory(realm), HOST, port):
                    avatar = await client.connected()  # waits, while the client tries again
                    assert client.state is ClientState.CONNECTED and client.reference is avatar
                    assert client.policy.connections == round_ + 1 and client.policy.failures == 0
                    await until(lambda: len(avatars) == client.policy.connections)
                    assert avatars[-1] is avatar and avatar is not previous
                    assert await avatar.callRemote("hello") == "hello alice"
                    connection = client.connection
                    assert connection is not None
                    # Told after the client: at the moment its broker closes, the client has let the avatar go.
                    connection.broker.notifyOnDisconnect(lambda: seen_at_loss.append((client.state, client.reference)))
                # The server closed its connections: the client is disconnected, and waits or tries again.
                await until(lambda: client.state is not ClientState.CONNECTED)
                assert seen_at_loss[-1] == (ClientState.WAITING, None)
                assert client.reference is None
                assert isinstance(client.last_error, PBConnectionLost)
                with pytest.raises(DeadReferenceError):
                    avatar.callRemote("hello")  # at once: the old avatar is dead
                previous = avatar
            client.stop()
        assert len(avatars) == 4 and len({id(avatar) for avatar in avatars}) == 4
        assert realm.logouts == ["alice"] * 4
        assert len(seen_at_loss) == 4

    run(backend, body)


# -- 2. backoff -------------------------------------------------------------------------------


def test_the_delays_between_attempts_are_the_backoffs(backend: str) -> None:
    async def body() -> None:
        attempts = Attempts()
        backoff = Backoff(initial=0.05, factor=2, maximum=0.2, jitter=0)
        client = ReconnectingClient(HOST, free_port(), factory=attempts, backoff=backoff)
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await until(lambda: len(attempts.times) >= 6)
            client.stop()
        assert isinstance(client.last_error, OSError)  # connection refused
        between = gaps(attempts.times)[:5]
        for gap, expected in zip(between, [0.05, 0.1, 0.2, 0.2, 0.2], strict=True):
            assert expected - 1e-3 <= gap < expected + 0.4, between
        assert between[-1] < 0.6, between  # capped at 0.2 (0.8 without the maximum)

    run(backend, body)


def test_a_connection_resets_the_backoff(backend: str) -> None:
    async def body() -> None:
        attempts = Attempts()
        # Failures wait 0.05, then 0.5, then 5 s: after a connection, the first wait is 0.05 again.
        client = ReconnectingClient(
            HOST, port := free_port(), factory=attempts, backoff=Backoff(initial=0.05, factor=10, maximum=30, jitter=0)
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            await until(lambda: len(attempts.times) == 2)  # two failures: the next attempt is 0.5 s away
            async with pbcore_anyio.open_server(PBServerFactory(PeerRootMaker()), HOST, port):
                await client.connected()
                assert len(attempts.times) == 3
            lost_at = anyio.current_time()
            await until(lambda: len(attempts.times) == 4)  # nothing listens: fails again
            assert attempts.times[3] - lost_at < 2.0  # 0.05 (it would be 5 s without the reset)
            client.stop()

    run(backend, body)


# -- 3. a refused login -----------------------------------------------------------------------


def test_a_refused_login_stops_the_client(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with pbcore_anyio.open_server(login_factory(), HOST, 0) as server:
            attempts = Attempts()
            client = ReconnectingClient(HOST, server.port, credentials=WRONG, factory=attempts, backoff=FAST)
            with pytest.raises(Exception) as raised:
                await client.run()
            refusal = raised.value
            assert is_login_refusal(refusal) and client.last_error is refusal
            assert client.state is ClientState.STOPPED and client.reference is None
            assert len(attempts.times) == 1
            with pytest.raises(Exception) as waited:
                await client.connected()
            assert waited.value is refusal
            await anyio.sleep(0.3)  # no other attempt comes
            assert len(attempts.times) == 1

    with caplog.at_level(logging.WARNING, logger="pbcore.anyio"):
        run(backend, body)
    assert any(record.name == "pbcore.anyio" and "refused" in record.getMessage() for record in caplog.records)


def test_a_refused_login_is_tried_again_if_asked(backend: str) -> None:
    async def body() -> None:
        async with pbcore_anyio.open_server(login_factory(), HOST, 0) as server:
            attempts = Attempts()
            client = ReconnectingClient(
                HOST, server.port, credentials=WRONG, factory=attempts, backoff=FAST, retry_refused_login=True
            )
            async with anyio.create_task_group() as tg:
                running = Running(tg, client)
                await until(lambda: len(attempts.times) >= 4)
                assert client.state is not ClientState.STOPPED
                assert client.last_error is not None and is_login_refusal(client.last_error)
                client.stop()
            assert running.returned.is_set()  # normally

    run(backend, body)


def test_a_refused_login_ends_the_async_with_block(backend: str) -> None:
    async def body() -> None:
        async with pbcore_anyio.open_server(login_factory(), HOST, 0) as server:
            # The block waits for the avatar: it gets the refusal (itself, not in an ExceptionGroup).
            with pytest.raises(Exception) as raised:
                async with ReconnectingClient(HOST, server.port, credentials=WRONG, backoff=FAST) as client:
                    await client.connected()
            assert is_login_refusal(raised.value) and client.last_error is raised.value
            # The block does something else: it is cancelled, and the refusal raised.
            with anyio.fail_after(5), pytest.raises(Exception) as raised:
                async with ReconnectingClient(HOST, server.port, credentials=WRONG, backoff=FAST) as client:
                    await anyio.sleep_forever()
            assert is_login_refusal(raised.value) and client.state is ClientState.STOPPED
            # The block's own error comes out as itself, and stops the client.
            with pytest.raises(KeyError):
                async with ReconnectingClient(HOST, server.port, credentials=ALICE, backoff=FAST) as client:
                    await client.connected()
                    raise KeyError("the application's")
            assert client.state is ClientState.STOPPED and client.connection is None

    run(backend, body)


# -- 4. a Twisted server, killed and started again --------------------------------------------


def start_twisted_server(port: int) -> subprocess.Popen[str]:
    """tests/interop/twisted_peer.py's login server on *port* (peers.twisted_server always asks for port 0)."""
    command = [sys.executable, str(PEER), "server", "--port", str(port), "--login", "--timeout", "60"]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_environment()
    )
    try:
        assert _read_port(process, START_TIMEOUT) == port
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


def test_reconnects_to_a_twisted_server_killed_and_started_again(backend: str) -> None:
    pytest.importorskip("twisted.spread.pb")
    port = free_port()
    avatars: list[RemoteReference] = []

    async def body() -> None:
        process = await anyio.to_thread.run_sync(start_twisted_server, port)
        try:
            async with ReconnectingClient(
                HOST, port, credentials=ALICE, on_connect=avatars.append, backoff=FAST
            ) as client:
                first = await client.connected()
                assert await first.callRemote("hello") == "hello alice"
                await anyio.to_thread.run_sync(kill, process)
                await until(lambda: client.state is not ClientState.CONNECTED)
                with pytest.raises(DeadReferenceError):
                    first.callRemote("hello")
                await anyio.sleep(0.3)  # a few refused attempts
                process = await anyio.to_thread.run_sync(start_twisted_server, port)
                second = await client.connected()
                assert second is not first
                assert await second.callRemote("hello") == "hello alice"
                assert avatars == [first, second]
            assert client.state is ClientState.STOPPED
        finally:
            await anyio.to_thread.run_sync(kill, process)

    run(backend, body, timeout=60)


# -- 5. stop() --------------------------------------------------------------------------------


def test_stop_while_connected_closes_the_connection(backend: str) -> None:
    async def body() -> None:
        async with pbcore_anyio.open_server(PBServerFactory(PeerRootMaker()), HOST, 0) as server:
            client = ReconnectingClient(HOST, server.port, backoff=FAST)  # no credentials: the root object
            async with anyio.create_task_group() as tg:
                running = Running(tg, client)
                root = await client.connected()
                assert await root.callRemote("echo", 1) == [[1], {}]
                connection = client.connection
                assert connection is not None and len(server.connections) == 1
                client.stop()
                assert connection.broker.closed and client.reference is None  # at once
                with anyio.fail_after(2):
                    await connection.wait_closed()
                    await running.returned.wait()  # run() returned normally
                    await until(lambda: not server.connections)  # the server saw it close
            assert client.state is ClientState.STOPPED and client.reference is None and client.connection is None
            with pytest.raises(DeadReferenceError):
                root.callRemote("echo", 1)
            with pytest.raises(ClientStopped):
                await client.connected()
            await anyio.sleep(0.2)
            assert not server.connections  # it did not come back

    run(backend, body)


def test_stop_while_waiting_or_connecting_ends_at_once(backend: str) -> None:
    async def body() -> None:
        # Waiting: nothing listens, and the next attempt is a minute away.
        attempts = Attempts()
        client = ReconnectingClient(HOST, free_port(), factory=attempts, backoff=Backoff(initial=60, jitter=0))
        waiter_failed: list[BaseException] = []

        async def wait_for_it() -> None:
            try:
                await client.connected()
            except ClientStopped as error:
                waiter_failed.append(error)

        async with anyio.create_task_group() as tg:
            running = Running(tg, client)
            await until(lambda: client.state is ClientState.WAITING and len(attempts.times) == 1)
            tg.start_soon(wait_for_it)
            await anyio.sleep(0.05)
            client.stop()
            with anyio.fail_after(1):
                await running.returned.wait()
                await until(lambda: len(waiter_failed) == 1)
        assert client.state is ClientState.STOPPED and len(attempts.times) == 1

        # Connecting: a port that accepts TCP connections and never says a word.
        with socket.socket() as silent:
            silent.bind((HOST, 0))
            silent.listen(8)
            client = ReconnectingClient(HOST, silent.getsockname()[1], factory=attempts, backoff=FAST)
            async with anyio.create_task_group() as tg:
                running = Running(tg, client)
                await until(lambda: client.connection is not None)  # TCP is up, the PB handshake never comes
                assert client.state is ClientState.CONNECTING
                client.stop()
                with anyio.fail_after(1):
                    await running.returned.wait()
            assert client.policy.stopped and client.connection is None

        # Stopped before it ran: run() returns at once, without an attempt.
        client = ReconnectingClient(HOST, free_port(), factory=attempts, backoff=FAST)
        client.stop()
        count = len(attempts.times)
        with anyio.fail_after(1):
            await client.run()
        assert len(attempts.times) == count
        with pytest.raises(RuntimeError):
            await client.run()  # once only

    run(backend, body)


# -- timeouts, on_connect, TLS ----------------------------------------------------------------


def test_a_connect_that_hangs_is_bounded_by_the_handshake_timeout(backend: str) -> None:
    async def body() -> None:
        # A listener whose accept queue is full: the kernel drops the SYNs, connect() hangs.
        with socket.socket() as full, socket.socket() as filler:
            full.bind((HOST, 0))
            full.listen(0)
            filler.connect(full.getsockname())
            attempts = Attempts(Timeouts(handshake=0.2))
            client = ReconnectingClient(HOST, full.getsockname()[1], factory=attempts, backoff=FAST)
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.run)
                await until(lambda: len(attempts.times) >= 3)
                client.stop()
            assert isinstance(client.last_error, ConnectionTimedOut), repr(client.last_error)
            assert all(gap >= 0.2 + 0.05 - 1e-3 for gap in gaps(attempts.times)), gaps(attempts.times)

    run(backend, body)


@pytest.mark.parametrize("kind", ["plain", "async"])
def test_an_on_connect_that_raises_is_logged_and_the_client_goes_on(
    backend: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    def plain(root: RemoteReference) -> None:
        raise RuntimeError("the application's on_connect bug")

    async def asynchronous(root: RemoteReference) -> None:
        await anyio.sleep(0)
        raise RuntimeError("the application's on_connect bug")

    on_connect: Callable[[RemoteReference], Any] = plain if kind == "plain" else asynchronous

    async def body() -> None:
        async with (
            pbcore_anyio.open_server(PBServerFactory(PeerRootMaker()), HOST, 0) as server,
            ReconnectingClient(HOST, server.port, on_connect=on_connect, backoff=FAST) as client,
        ):
            root = await client.connected()
            await until(lambda: any("on_connect bug" in record.getMessage() for record in caplog.records))
            assert await root.callRemote("echo", 2) == [[2], {}]
            assert client.state is ClientState.CONNECTED and client.reference is root

    with caplog.at_level(logging.ERROR, logger="pbcore.anyio"):
        run(backend, body)
    (record,) = [record for record in caplog.records if "on_connect bug" in record.getMessage()]
    assert record.name == "pbcore.anyio" and record.levelno == logging.ERROR


def test_an_async_on_connect_is_cancelled_when_its_connection_ends(backend: str) -> None:
    async def body() -> None:
        started = anyio.Event()
        cancelled: list[bool] = []

        async def forever(root: RemoteReference) -> None:
            started.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                cancelled.append(True)
                raise

        port = free_port()
        async with ReconnectingClient(HOST, port, on_connect=forever, backoff=FAST) as client:
            async with pbcore_anyio.open_server(PBServerFactory(PeerRootMaker()), HOST, port):
                await client.connected()
                await started.wait()
            await until(lambda: bool(cancelled))
            assert client.state is not ClientState.STOPPED

    run(backend, body)


def test_over_tls(backend: str, tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    async def body() -> None:
        async with pbcore_anyio.open_server(login_factory(), HOST, 0, ssl_context=server_context) as server:
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
                assert connection is not None and isinstance(connection.stream, TLSStream)
            assert client.state is ClientState.STOPPED

    run(backend, body)
