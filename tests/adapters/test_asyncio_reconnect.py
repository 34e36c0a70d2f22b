"""pbcore_asyncio.reconnect.ReconnectingClient over real sockets on loopback, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pbcore_asyncio
import pytest
from pbcore_asyncio.reconnect import ReconnectingClient

from pbcore import Referenceable
from pbcore.cred import UsernamePassword
from pbcore.errors import ConnectionTimedOut, DeadReferenceError, PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import RemoteReference
from pbcore.reconnect import Backoff, ClientState, ClientStopped, is_login_refusal
from pbcore.timers import Timeouts
from tests.adapters.certs import make_certificate
from tests.adapters.services import PeerRootMaker, Realm, login_factory
from tests.interop import peers

T = TypeVar("T")

HOST = "127.0.0.1"
#: Short delays, so that the tests are quick.
FAST = Backoff(initial=0.05, maximum=0.2, jitter=0.0)
#: Bounds every wait (generously: nothing should take nearly that long).
WAIT = 10.0

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


def run(test: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
    """Run one async test body on the current loop, bounded in time."""

    async def bounded() -> T:
        return await asyncio.wait_for(test(), timeout)

    result: T = _runner[-1](bounded())
    return result


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait (bounded) until *condition* holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(0.01)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (as far as one can tell)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def logged(caplog: pytest.LogCaptureFixture, text: str) -> Callable[[], bool]:
    """Whether *text* has been logged yet."""
    return lambda: text in caplog.text


def gone_event(reference: RemoteReference) -> asyncio.Event:
    """An event set when *reference*'s connection is lost."""
    gone = asyncio.Event()
    reference.notifyOnDisconnect(lambda _reference: gone.set())
    return gone


class Mind(Referenceable):
    pass


class MindRealm(Realm):
    """The tests' realm, which notes the minds it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.minds: list[Any] = []

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        self.minds.append(mind)
        return super().requestAvatar(avatar_id, mind, *interfaces)


def counting(times: list[float]) -> Callable[[], PBClientFactory]:
    """A factory that notes the loop's time of each attempt."""

    def factory() -> PBClientFactory:
        times.append(asyncio.get_running_loop().time())
        return PBClientFactory()

    return factory


def test_a_server_restarted_three_times_is_logged_in_to_again_each_time() -> None:
    async def body() -> None:
        realm = MindRealm()
        server = await pbcore_asyncio.serve(login_factory(realm))
        port = server.port
        seen: list[RemoteReference] = []

        async def on_connect(avatar: RemoteReference) -> None:
            await asyncio.sleep(0)
            seen.append(avatar)

        client = ReconnectingClient(
            HOST,
            port,
            credentials=UsernamePassword("alice", "secret"),
            mind=Mind(),
            on_connect=on_connect,
            backoff=FAST,
        )
        async with client:
            avatars = [await asyncio.wait_for(client.connected(), WAIT)]
            assert await avatars[0].callRemote("hello") == "hello alice"
            for _ in range(3):
                old = avatars[-1]
                gone = gone_event(old)
                await server.aclose()
                await asyncio.wait_for(gone.wait(), WAIT)
                # The client knows at once: no dead reference to hand out, and the old one fails at once.
                assert client.reference is None and client.state is not ClientState.CONNECTED
                with pytest.raises(DeadReferenceError):
                    old.callRemote("hello")
                server = await pbcore_asyncio.serve(login_factory(realm), port=port)
                new = await asyncio.wait_for(client.connected(), WAIT)
                assert new is not old and client.reference is new
                assert await new.callRemote("hello") == "hello alice"
                assert client.state is ClientState.CONNECTED and client.policy.failures == 0
                assert isinstance(client.last_error, PBConnectionLost)  # the loss, from policy.lost()
                avatars.append(new)
            await until(lambda: len(seen) == 4)
            assert [id(avatar) for avatar in seen] == [id(avatar) for avatar in avatars]
            assert client.policy.connections == 4
            assert len(realm.minds) == 4 and all(isinstance(mind, RemoteReference) for mind in realm.minds)
        assert client.state is ClientState.STOPPED and client.reference is None
        await server.aclose()

    run(body)


def test_the_delays_between_attempts_are_the_backoff_s() -> None:
    port = free_port()

    async def body() -> list[float]:
        times: list[float] = []
        backoff = Backoff(initial=0.05, factor=2, maximum=0.2, jitter=0)
        client = ReconnectingClient(HOST, port, factory=counting(times), backoff=backoff)
        async with client:
            await until(lambda: len(times) >= 5)
            assert isinstance(client.last_error, OSError)  # the connection refused
        return times

    times = run(body)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)][:4]
    for gap, delay in zip(gaps, [0.05, 0.1, 0.2, 0.2], strict=True):
        assert delay - 0.005 <= gap < delay + 1.0, (gaps, delay)


def test_a_refused_login_stops_the_client_unless_told_to_retry() -> None:
    async def body() -> None:
        server = await pbcore_asyncio.serve(login_factory())
        wrong = UsernamePassword("alice", "wrong")
        times: list[float] = []
        client = ReconnectingClient(HOST, server.port, credentials=wrong, factory=counting(times), backoff=FAST)
        waiter = asyncio.ensure_future(client.connected())  # waiting before the refusal
        with pytest.raises(Exception) as caught:
            await asyncio.wait_for(client.run(), WAIT)
        refusal = caught.value
        assert is_login_refusal(refusal), refusal
        assert client.state is ClientState.STOPPED and client.last_error is refusal and len(times) == 1
        with pytest.raises(Exception) as waited:
            await asyncio.wait_for(waiter, WAIT)
        assert waited.value is refusal
        with pytest.raises(Exception) as later:
            await client.connected()
        assert later.value is refusal
        await until(lambda: not server.connections)  # the refused connection was closed

        times.clear()
        client = ReconnectingClient(
            HOST, server.port, credentials=wrong, factory=counting(times), backoff=FAST, retry_refused_login=True
        )
        task = asyncio.ensure_future(client.run())
        await until(lambda: len(times) >= 3)
        assert client.state is not ClientState.STOPPED and is_login_refusal(client.last_error or Exception())
        client.stop()
        await asyncio.wait_for(task, WAIT)  # stopped by stop(): returns normally
        await server.aclose()

    run(body)


def _start_twisted(port: int) -> subprocess.Popen[str]:
    # tests/interop/peers.twisted_server takes no port (it always asks for port 0): start the peer on ours.
    command = [sys.executable, str(peers.PEER), "server", "--port", str(port), "--login", "--timeout", "120"]
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=peers._environment(),
    )
    try:
        assert peers._read_port(process, peers.START_TIMEOUT) == port
    except BaseException:
        peers._stop(process)
        raise
    return process


def test_a_twisted_server_killed_and_restarted_is_logged_in_to_again() -> None:
    pytest.importorskip("twisted.spread.pb")
    port = free_port()

    async def body() -> None:
        process = await asyncio.to_thread(_start_twisted, port)
        try:
            client = ReconnectingClient(HOST, port, credentials=UsernamePassword("alice", "secret"), backoff=FAST)
            async with client:
                first = await asyncio.wait_for(client.connected(), WAIT)
                assert await first.callRemote("hello") == "hello alice"
                gone = gone_event(first)
                process.kill()
                await asyncio.to_thread(peers._stop, process)  # closes its pipes, waits for it
                await asyncio.wait_for(gone.wait(), WAIT)
                with pytest.raises(DeadReferenceError):
                    first.callRemote("hello")
                process = await asyncio.to_thread(_start_twisted, port)
                second = await asyncio.wait_for(client.connected(), WAIT)
                assert second is not first
                assert await second.callRemote("echo", "again") == "again"
        finally:
            await asyncio.to_thread(peers._stop, process)

    run(body)


def test_stop_while_connected_closes_the_connection() -> None:
    async def body() -> None:
        server = await pbcore_asyncio.serve(PBServerFactory(PeerRootMaker()))
        seen: list[RemoteReference] = []
        client = ReconnectingClient(HOST, server.port, on_connect=seen.append, backoff=FAST)  # the root
        task = asyncio.ensure_future(client.run())
        root = await asyncio.wait_for(client.connected(), WAIT)
        assert [id(reference) for reference in seen] == [id(root)]
        assert await root.callRemote("echo", 1) == [[1], {}]
        await until(lambda: len(server.connections) == 1)
        connection = client.connection
        assert connection is not None
        client.stop()
        with pytest.raises(DeadReferenceError):
            root.callRemote("echo", 2)
        assert client.state is ClientState.STOPPED and client.reference is None and client.connection is None
        await asyncio.wait_for(task, WAIT)
        await asyncio.wait_for(connection.wait_closed(), WAIT)
        await until(lambda: not server.connections)  # the server saw it close
        with pytest.raises(PBConnectionLost):
            await client.connected()
        await server.aclose()

    run(body)


def test_stop_while_waiting_ends_at_once() -> None:
    port = free_port()

    async def body() -> None:
        client = ReconnectingClient(HOST, port, backoff=Backoff(initial=600.0, jitter=0.0))
        task = asyncio.ensure_future(client.run())
        await until(lambda: client.state is ClientState.WAITING and client.policy.failures == 1)
        waiter = asyncio.ensure_future(client.connected())
        await asyncio.sleep(0.01)
        client.stop()
        await asyncio.wait_for(task, WAIT)
        with pytest.raises(ClientStopped):  # not the refused connect of the last attempt
            await asyncio.wait_for(waiter, WAIT)

    run(body)


def test_stop_while_connecting_ends_the_attempt_and_closes_its_socket() -> None:
    # A port that accepts (the kernel's backlog) but never says a word: the client waits for the handshake.
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen()
        silent.settimeout(WAIT)

        async def body() -> None:
            client = ReconnectingClient(HOST, silent.getsockname()[1], backoff=FAST)
            task = asyncio.ensure_future(client.run())
            accepted, _ = await asyncio.to_thread(silent.accept)
            with accepted:
                accepted.settimeout(WAIT)
                assert client.state is ClientState.CONNECTING
                client.stop()
                await asyncio.wait_for(task, WAIT)
                assert await asyncio.to_thread(accepted.recv, 1) == b""  # the client closed its socket

        run(body)


def test_tls_on_every_connection(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    async def body() -> None:
        factory = login_factory()
        server = await pbcore_asyncio.serve(factory, ssl_context=server_context)
        port = server.port
        client = ReconnectingClient(
            HOST,
            port,
            credentials=UsernamePassword("alice", "secret"),
            backoff=FAST,
            ssl_context=client_context,
            server_hostname="localhost",
        )
        async with client:
            for _ in range(2):
                avatar = await asyncio.wait_for(client.connected(), WAIT)
                assert await avatar.callRemote("hello") == "hello alice"
                connection = client.connection
                assert connection is not None and connection.transport is not None
                assert connection.transport.get_extra_info("ssl_object") is not None
                gone = gone_event(avatar)
                await server.aclose()
                await asyncio.wait_for(gone.wait(), WAIT)
                server = await pbcore_asyncio.serve(factory, port=port, ssl_context=server_context)
        await server.aclose()

    run(body)


def test_a_connect_that_hangs_is_bounded_by_the_handshake_timeout() -> None:
    # A listener whose accept queue (backlog 0) is full: the kernel drops the next SYNs, so connecting hangs.
    with socket.socket() as full, socket.socket() as filler:
        full.bind((HOST, 0))
        full.listen(0)
        filler.connect(full.getsockname())

        async def body() -> None:
            def factory() -> PBClientFactory:
                return PBClientFactory(timeouts=Timeouts(handshake=0.2))

            client = ReconnectingClient(HOST, full.getsockname()[1], factory=factory, backoff=FAST)
            async with client:
                await until(lambda: client.policy.failures >= 2)
                assert isinstance(client.last_error, ConnectionTimedOut), client.last_error
                assert client.state is not ClientState.STOPPED

        run(body)


def test_an_on_connect_that_raises_is_logged_and_the_client_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        server = await pbcore_asyncio.serve(PBServerFactory(PeerRootMaker()))
        for kind in ("plain", "async"):

            def plain(reference: RemoteReference) -> None:
                raise ValueError("plain on_connect")

            async def later(reference: RemoteReference) -> None:
                await asyncio.sleep(0)
                raise ValueError("async on_connect")

            client = ReconnectingClient(HOST, server.port, on_connect=plain if kind == "plain" else later, backoff=FAST)
            async with client:
                root = await asyncio.wait_for(client.connected(), WAIT)
                await until(logged(caplog, f"{kind} on_connect"))
                assert await root.callRemote("echo", kind) == [[kind], {}]
                assert client.state is ClientState.CONNECTED and client.policy.connections == 1
        await server.aclose()

    with caplog.at_level(logging.ERROR, logger="pbcore.asyncio"):
        run(body)
    records = [record for record in caplog.records if "on_connect" in record.getMessage()]
    assert {record.name for record in records} == {"pbcore.asyncio"} and len(records) == 2
