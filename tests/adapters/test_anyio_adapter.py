"""The anyio adapter over real sockets on loopback (TCP, TLS, unix), on both of anyio's
backends, against itself (against real Twisted peers: tests/interop/test_tcp_matrix.py)."""

from __future__ import annotations

import gc
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pbcore_anyio
import pytest

from pbcore import Referenceable, Root
from pbcore.broker import Broker
from pbcore.cred import Anonymous, Unauthorized, UsernamePassword
from pbcore.errors import CallTimedOut, ConnectionTimedOut, DeadReferenceError, Error, NoSuchMethod, PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import CopiedFailure
from pbcore.timers import ConnectionTimers, Timeouts
from tests.adapters.certs import make_certificate
from tests.adapters.services import CounterCache, PeerRoot, PointCopy, Realm, Shared, Twice, login_factory

HOST = "127.0.0.1"

# -- what the servers offer: tests/adapters/services.py, plus two anyio methods ------------------


class AnyioShared(Shared):
    def __init__(self) -> None:
        super().__init__()
        self.hanging = anyio.Event()
        self.hang_cancelled = False


class AnyioPeerRoot(PeerRoot):
    shared: AnyioShared

    async def remote_slow(self, seconds: float) -> str:
        await anyio.sleep(seconds)
        return "late"

    async def remote_slow_big(self, seconds: float, count: int) -> list[bytes]:
        await anyio.sleep(seconds)
        return [b"x" * 500_000] * count

    def remote_bounce(self, data: bytes) -> bytes:
        self.shared.big_calls += 1
        return data

    def remote_hang_up(self) -> None:
        self.broker.connection_lost(None)  # the application drops the connection

    def remote_last_words(self, ref: Any, words: bytes) -> None:
        ref.callRemote("record", words, pbanswer=False)
        self.broker.close()  # the application closes the connection: what it queued still goes out

    def remote_flood_then_close(self, count: int) -> None:
        for _ in range(count):  # one-way calls to the peer's root: megabytes to write
            self.broker.root().callRemote("flood", b"x" * 600_000, pbanswer=False)
        self.broker.close()

    async def remote_hang(self) -> None:
        self.shared.hanging.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.shared.hang_cancelled = True


class AnyioPeerRootMaker(Root):
    def __init__(self) -> None:
        self.shared = AnyioShared()

    def rootObject(self, broker: Any) -> AnyioPeerRoot:
        return AnyioPeerRoot(broker, self.shared)


# -- helpers --------------------------------------------------------------------------------------


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def run(backend: str, body: Callable[[], Awaitable[None]], timeout: float = 20) -> None:
    """Run one async test body on *backend*, bounded in time."""

    async def bounded() -> None:
        with anyio.fail_after(timeout):
            await body()

    anyio.run(bounded, backend=backend)


@asynccontextmanager
async def connected(
    factory: PBServerFactory, **options: Any
) -> AsyncIterator[tuple[pbcore_anyio.Server, PBClientFactory, pbcore_anyio.Connection]]:
    """A server of *factory* and a client connected to it."""
    async with pbcore_anyio.open_server(factory, **options) as server:
        client = PBClientFactory()
        async with pbcore_anyio.open_connection(client, HOST, server.port) as connection:
            yield server, client, connection


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        gc.collect()
        await anyio.sleep(0.01)


def the_connection(server: pbcore_anyio.Server) -> pbcore_anyio.Connection:
    (connection,) = server.connections
    return connection


def waiting(factory: PBClientFactory) -> dict[int, Any]:
    assert factory.broker is not None
    return factory.broker._waiting  # the calls the broker still waits for


# -- anyio against anyio, on each backend ------------------------------------------------------------


def test_calls_references_copies_errors_and_one_way_calls(backend: str) -> None:
    async def body() -> None:
        async with connected(PBServerFactory(AnyioPeerRootMaker())) as (server, factory, connection):
            assert connection.broker is factory.broker and connection.dispatcher.broker is connection.broker
            root = await factory.getRootObject()
            assert await root.callRemote("echo", 1, "two", b"three", key=None) == [[1, "two", b"three"], {"key": None}]
            assert await root.callRemote("slow", 0) == "late"  # an async method

            # The peer's address, on both sides.
            served = the_connection(server)
            assert served.peer == served.broker.peer == connection.stream.extra(anyio.abc.SocketAttribute.local_address)
            assert connection.peer == connection.broker.peer == (HOST, server.port)

            # A reference from the server, called, then released.
            thing = await root.callRemote("thing", 5)
            assert await thing.callRemote("n") == 5
            assert len(served.broker.localObjects) == 2
            del thing
            await until(lambda: len(served.broker.localObjects) == 1)

            # A reference to the client's object, called back by the server, then released.
            assert await root.callRemote("call_back", Twice(), 21) == 42
            client_broker = factory.broker
            assert client_broker is not None
            await until(lambda: len(client_broker.localObjects) == 0)

            point = await root.callRemote("point")
            assert isinstance(point, PointCopy) and (point.x, point.y) == (3, 4)

            with pytest.raises(CopiedFailure) as failed:
                await root.callRemote("fail")
            assert failed.value.type == "builtins.ValueError" and failed.value.value == "nope"
            with pytest.raises(CopiedFailure) as failed:
                await root.callRemote("known")
            assert failed.value.check(Error) is Error
            with pytest.raises(CopiedFailure) as failed:
                await root.callRemote("missing")
            assert failed.value.check(NoSuchMethod) is NoSuchMethod

            # One-way calls run in the order they were sent.
            for n in range(50):
                assert root.callRemote("note", n, pbanswer=False) is None
            assert await root.callRemote("notes") == list(range(50))
            assert waiting(factory) == {}

    run(backend, body)


def test_caches_follow_updates_and_are_released(backend: str) -> None:
    async def body() -> None:
        maker = AnyioPeerRootMaker()
        async with connected(PBServerFactory(maker)) as (_, factory, _):
            root = await factory.getRootObject()
            cache = await root.callRemote("counter")
            assert isinstance(cache, CounterCache) and cache.value == 0
            assert await root.callRemote("bump") == 1
            assert cache.value == 1  # the update arrived before the answer
            again = await root.callRemote("counter")
            assert again == cache and len(maker.shared.counter.observers) == 1
            assert await root.callRemote("bump") == 2 and again.value == 2
            del cache, again
            await until(lambda: not maker.shared.counter.observers)  # decache, then uncache

    run(backend, body)


def test_many_pipelined_calls_that_call_back_do_not_stall(backend: str) -> None:
    async def body() -> None:
        async with connected(PBServerFactory(AnyioPeerRootMaker())) as (_, factory, _):
            root = await factory.getRootObject()
            twice = Twice()
            pending = [root.callRemote("call_back", twice, n) for n in range(300)]
            assert [await result for result in pending] == [2 * n for n in range(300)]

    run(backend, body)


def test_a_reference_released_in_another_thread_is_flushed_by_the_wake_up(backend: str) -> None:
    async def body() -> None:
        async with connected(PBServerFactory(AnyioPeerRootMaker())) as (server, factory, _):
            root = await factory.getRootObject()
            held = [await root.callRemote("thing", 1)]
            server_broker = the_connection(server).broker
            assert len(server_broker.localObjects) == 2

            def release() -> None:
                held.clear()
                gc.collect()

            await anyio.to_thread.run_sync(release)
            # No call of ours follows: only the wake-up can have sent the decref.
            while len(server_broker.localObjects) != 1:
                await anyio.sleep(0.01)

    run(backend, body)


def test_login_with_right_and_wrong_passwords_anonymously_and_viewpoints(backend: str) -> None:
    async def body() -> None:
        realm = Realm()
        async with connected(login_factory(realm)) as (_, factory, _):
            alice = await factory.login(UsernamePassword("alice", "secret"))
            assert await alice.callRemote("hello") == "hello alice"
            board = await alice.callRemote("board")  # a Viewable: seen through alice's perspective
            assert await board.callRemote("whoami") == "alice"
            with pytest.raises(CopiedFailure) as failed:
                await factory.login(UsernamePassword("alice", "wrong"))
            assert failed.value.check(Unauthorized) is Unauthorized
            anonymous = await factory.login(Anonymous())
            assert await anonymous.callRemote("hello") == "hello anonymous"
            del alice, board
            await until(lambda: realm.logouts == ["alice"])
        await until(lambda: sorted(realm.logouts) == ["alice", "anonymous"])  # the connection closed

    run(backend, body)


def test_a_cancelled_wait_forgets_the_call_and_its_late_answer_is_dropped(backend: str) -> None:
    async def body() -> None:
        async with connected(PBServerFactory(AnyioPeerRootMaker())) as (_, factory, _):
            root = await factory.getRootObject()
            with anyio.move_on_after(0.05) as scope:
                await root.callRemote("slow", 0.3)
            assert scope.cancelled_caught
            assert waiting(factory) == {}  # forgotten at once
            with pytest.raises(TimeoutError), anyio.fail_after(0.05):
                await root.callRemote("slow", 0.3)
            assert waiting(factory) == {}

            # A slow call does not hold up the others.
            slow = root.callRemote("slow", 0.3)
            with anyio.fail_after(0.25):
                assert await root.callRemote("echo", "quick") == [["quick"], {}]
            assert await slow == "late"
            await anyio.sleep(0.4)  # the late answers arrive and are dropped
            assert await root.callRemote("echo", "still fine") == [["still fine"], {}]
            assert waiting(factory) == {}

    run(backend, body)


def test_an_error_in_the_block_comes_out_as_itself_and_closes_the_connection(backend: str) -> None:
    async def body() -> None:
        async with pbcore_anyio.open_server(PBServerFactory(AnyioPeerRootMaker())) as server:
            factory = PBClientFactory()
            with pytest.raises(KeyError):  # not wrapped in an ExceptionGroup
                async with pbcore_anyio.open_connection(factory, HOST, server.port) as connection:
                    root = await factory.getRootObject()
                    assert await root.callRemote("echo", 1) == [[1], {}]
                    raise KeyError("mine")
            assert connection.closed
            await until(lambda: not server.connections)
        with pytest.raises(KeyError):  # the same for the server's block
            async with pbcore_anyio.open_server(PBServerFactory(AnyioPeerRootMaker())):
                raise KeyError("mine")

    run(backend, body)


def test_the_server_dropping_a_connection_fails_the_pending_call(backend: str) -> None:
    async def body() -> None:
        maker = AnyioPeerRootMaker()
        async with connected(PBServerFactory(maker)) as (server, factory, connection):
            root = await factory.getRootObject()
            outcome: list[BaseException] = []

            async def call() -> None:
                try:
                    await root.callRemote("hang")
                except PBConnectionLost as error:
                    outcome.append(error)

            async with anyio.create_task_group() as group:
                group.start_soon(call)
                await maker.shared.hanging.wait()
                the_connection(server).close()  # the server drops it mid-call
            assert len(outcome) == 1
            await connection.wait_closed()
            with pytest.raises(DeadReferenceError):
                root.callRemote("echo")
            await until(lambda: maker.shared.hang_cancelled and not server.connections)

    run(backend, body)


def test_a_served_call_is_cancelled_when_its_client_goes_away(backend: str) -> None:
    async def body() -> None:
        maker = AnyioPeerRootMaker()
        async with connected(PBServerFactory(maker)) as (server, factory, connection):
            root = await factory.getRootObject()
            pending = root.callRemote("hang")
            await maker.shared.hanging.wait()
            assert len(the_connection(server).dispatcher.running) == 1
            connection.close()
            with pytest.raises(PBConnectionLost):
                await pending
            await until(lambda: maker.shared.hang_cancelled and not server.connections)

    run(backend, body)


class Recorder(Referenceable):
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def remote_record(self, value: Any) -> None:
        self.seen.append(value)


def test_the_application_closing_the_broker_closes_the_connection(backend: str) -> None:
    async def body() -> None:
        async with connected(PBServerFactory(AnyioPeerRootMaker())) as (server, factory, connection):
            root = await factory.getRootObject()
            with pytest.raises(PBConnectionLost):
                await root.callRemote("hang_up")
            await connection.wait_closed()
            await until(lambda: not server.connections)

        # broker.close(): what was queued before is written, then the connection closes.
        async with connected(PBServerFactory(AnyioPeerRootMaker())) as (server, factory, connection):
            root = await factory.getRootObject()
            recorder, words = Recorder(), b"x" * 600_000
            with pytest.raises(PBConnectionLost):
                await root.callRemote("last_words", recorder, words)
            await connection.wait_closed()
            assert recorder.seen == [words]
            await until(lambda: not server.connections)

    run(backend, body)


def test_a_closed_broker_whose_peer_does_not_read_is_closed_after_a_while(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pbcore_anyio, "CLOSE_TIMEOUT", 0.2)

    async def body() -> None:
        async with pbcore_anyio.open_server(PBServerFactory(AnyioPeerRootMaker())) as server:
            raw = await anyio.connect_tcp(HOST, server.port)
            broker = Broker(is_client=True)
            broker.connection_made()
            while not broker.ready:
                broker.receive_data(await raw.receive())
                await raw.send(broker.data_to_send())
            broker.root().callRemote("flood_then_close", 20, pbanswer=False)
            await raw.send(broker.data_to_send())  # and never read
            await until(lambda: not server.connections)
            await raw.aclose()

    run(backend, body)


def test_a_peer_sending_garbage_is_dropped_and_the_others_go_on(backend: str) -> None:
    async def body() -> None:
        async with connected(PBServerFactory(AnyioPeerRootMaker())) as (server, factory, _):
            root = await factory.getRootObject()
            raw = await anyio.connect_tcp(HOST, server.port)
            assert await raw.receive()  # the dialect offer
            await raw.send(b"\x02\x82pb\xffgarbage")
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                while True:
                    await raw.receive()  # the server's version message, then EOF (or a reset)
            await raw.aclose()
            await until(lambda: len(server.connections) == 1)
            assert await root.callRemote("echo", "alive") == [["alive"], {}]

    run(backend, body)


def test_a_failing_root_is_logged_and_only_that_connection_refused(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Failing(Root):
        fail = True

        def rootObject(self, broker: Any) -> Any:
            if Failing.fail:
                Failing.fail = False
                raise RuntimeError("no root for you")
            return AnyioPeerRoot(broker, AnyioShared())

    async def body() -> None:
        async with pbcore_anyio.open_server(PBServerFactory(Failing())) as server:
            raw = await anyio.connect_tcp(HOST, server.port)
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await raw.receive()  # closed before saying anything
            await raw.aclose()
            factory = PBClientFactory()
            async with pbcore_anyio.open_connection(factory, HOST, server.port):
                root = await factory.getRootObject()
                assert await root.callRemote("echo", 1) == [[1], {}]

    Failing.fail = True
    with caplog.at_level(logging.DEBUG, logger="pbcore.anyio"):
        run(backend, body)
    errors = [r for r in caplog.records if r.name == "pbcore.anyio" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "no root for you" in caplog.text
    assert any(r.getMessage().startswith("accepted a connection from") for r in caplog.records)


def test_a_peer_that_never_reads_makes_the_server_stop_reading(backend: str) -> None:
    size, calls = 100_000, 200  # calls larger than a read: each read starts at most one

    async def body() -> None:
        maker = AnyioPeerRootMaker()
        async with pbcore_anyio.open_server(PBServerFactory(maker)) as server:
            raw = await anyio.connect_tcp(HOST, server.port)
            broker = Broker(is_client=True)
            broker.connection_made()
            while not broker.ready:
                broker.receive_data(await raw.receive())
                await raw.send(broker.data_to_send())
            for _ in range(calls):
                broker.root().callRemote("bounce", b"x" * size)
            with anyio.move_on_after(1):  # and never read: the sockets' buffers fill up
                await raw.send(broker.data_to_send())
            connection = the_connection(server)
            served = maker.shared.big_calls
            assert served < calls  # it stopped reading ...
            assert connection.backlog <= pbcore_anyio.HIGH_WATER + 2 * size + 1000  # ... and buffers a bounded amount
            await anyio.sleep(0.2)
            assert maker.shared.big_calls == served  # still waiting, not growing

            factory = PBClientFactory()  # the server still serves others
            async with pbcore_anyio.open_connection(factory, HOST, server.port):
                root = await factory.getRootObject()
                assert await root.callRemote("echo", 1) == [[1], {}]
            await raw.aclose()
            await until(lambda: not server.connections)

    run(backend, body)


def test_closing_the_server_with_idle_and_busy_clients(backend: str) -> None:
    async def body() -> None:
        maker = AnyioPeerRootMaker()
        async with pbcore_anyio.open_server(PBServerFactory(maker)) as server:
            idle, busy = PBClientFactory(), PBClientFactory()
            async with (
                pbcore_anyio.open_connection(idle, HOST, server.port) as idle_connection,
                pbcore_anyio.open_connection(busy, HOST, server.port) as busy_connection,
            ):
                await idle.getRootObject()
                root = await busy.getRootObject()
                slow = root.callRemote("slow_big", 0.3, 8)  # an answer that takes a while to write
                await until(lambda: any(c.dispatcher.running for c in server.connections))
                server.close(grace=10)
                # Accepting stopped at once: refused, or dropped unanswered ...
                try:
                    late = await anyio.connect_tcp(HOST, server.port)
                except OSError:
                    pass
                else:
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        await late.receive()
                    await late.aclose()
                # ... the busy connection's call finished and was answered, then both closed.
                assert await slow == [b"x" * 500_000] * 8
                await server.wait_closed()
                assert not server.connections
                await idle_connection.wait_closed()
                await busy_connection.wait_closed()

        # No grace: a running call is cancelled, and its caller's wait fails.
        maker = AnyioPeerRootMaker()
        async with connected(PBServerFactory(maker)) as (server, factory, connection):
            root = await factory.getRootObject()
            pending = root.callRemote("hang")
            await maker.shared.hanging.wait()
            await server.aclose()
            assert maker.shared.hang_cancelled
            with pytest.raises(PBConnectionLost):
                await pending
            await connection.wait_closed()

        # A grace that runs out: the call is cancelled all the same.
        maker = AnyioPeerRootMaker()
        async with connected(PBServerFactory(maker)) as (server, factory, connection):
            root = await factory.getRootObject()
            pending = root.callRemote("hang")
            await maker.shared.hanging.wait()
            await server.aclose(grace=0.1)
            assert maker.shared.hang_cancelled
            with pytest.raises(PBConnectionLost):
                await pending

    run(backend, body)


def test_serve_in_a_task_group_until_closed(backend: str) -> None:
    async def body() -> None:
        async with anyio.create_task_group() as group:
            server: pbcore_anyio.Server = await group.start(
                pbcore_anyio.serve, PBServerFactory(AnyioPeerRootMaker()), HOST, 0
            )
            assert server.addresses == [(HOST, server.port)]
            factory = PBClientFactory()
            async with pbcore_anyio.open_connection(factory, HOST, server.port):
                root = await factory.getRootObject()
                assert await root.callRemote("echo", "tg") == [["tg"], {}]
            group.start_soon(server.serve_forever)  # returns once closed
            async with server:
                pass
        assert not server.connections

    run(backend, body)


def test_tls(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(pbcore_anyio, "HANDSHAKE_TIMEOUT", 0.3)
    cert, key = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    async def body() -> None:
        async with pbcore_anyio.open_server(
            PBServerFactory(AnyioPeerRootMaker()), ssl_context=server_context
        ) as server:
            factory = PBClientFactory()
            async with pbcore_anyio.open_connection(
                factory, HOST, server.port, ssl_context=client_context, server_hostname="localhost"
            ):
                root = await factory.getRootObject()
                assert await root.callRemote("echo", "secret") == [["secret"], {}]
                assert await root.callRemote("big", 300_000) == b"x" * 300_000
            # A client that does not trust the certificate is refused; the server goes on.
            with pytest.raises(ssl.SSLError):
                async with pbcore_anyio.open_connection(
                    PBClientFactory(), HOST, server.port, ssl_context=ssl.create_default_context()
                ):
                    pass
            # Plain text, or silence, where a handshake is due: that connection is dropped.
            for opening in (b"\x02\x82pb", b""):
                raw = await anyio.connect_tcp(HOST, server.port)
                if opening:
                    await raw.send(opening)
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    while True:
                        await raw.receive()
                await raw.aclose()
            factory = PBClientFactory()
            async with pbcore_anyio.open_connection(
                factory, HOST, server.port, ssl_context=client_context, server_hostname="localhost"
            ):
                root = await factory.getRootObject()
                assert await root.callRemote("echo", "again") == [["again"], {}]

    with caplog.at_level(logging.WARNING, logger="pbcore.anyio"):
        run(backend, body)
    failed = [r for r in caplog.records if r.getMessage().startswith("the TLS handshake with")]
    assert len(failed) == 3  # the untrusting client, the plain text, the silence


def test_unix_sockets(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "pb.sock"

    async def body() -> None:
        async with anyio.create_task_group() as group:
            server: pbcore_anyio.Server = await group.start(
                pbcore_anyio.serve_unix, PBServerFactory(AnyioPeerRootMaker()), path
            )
            factory = PBClientFactory()
            async with pbcore_anyio.open_unix_connection(factory, path):
                root = await factory.getRootObject()
                thing = await root.callRemote("thing", 7)
                assert await thing.callRemote("n") == 7
                assert await root.callRemote("call_back", Twice(), 2) == 4
            await server.aclose()
        assert not path.exists()

    run(backend, body)


# -- timers: the core's ConnectionTimers, run by the adapter on anyio's clock -----------------------

QUICK = Timeouts(handshake=0.5, idle=0.3, probe=0.3)


def timed_out(error: BaseException, words: str) -> bool:
    """*error* is a PBConnectionLost carrying a ConnectionTimedOut that says *words*."""
    reason = error.args[0] if isinstance(error, PBConnectionLost) and error.args else None
    return isinstance(reason, ConnectionTimedOut) and words in str(reason)


async def closed_by_peer(stream: anyio.abc.ByteStream) -> None:
    """Read *stream* until the peer closes it."""
    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
        while True:
            await stream.receive()


@asynccontextmanager
async def silent_server(handshake: bool) -> AsyncIterator[tuple[int, list[anyio.abc.SocketStream]]]:
    """A TCP port that accepts and then says nothing (after the PB handshake, if *handshake*)."""
    accepted: list[anyio.abc.SocketStream] = []

    async def handle(stream: anyio.abc.SocketStream) -> None:
        accepted.append(stream)
        if handshake:
            broker = Broker(is_client=False)  # the server's handshake bytes
            broker.connection_made()
            await stream.send(broker.data_to_send())
            while not broker.ready:
                broker.receive_data(await stream.receive())
                await stream.send(broker.data_to_send())
        await anyio.sleep_forever()  # never reads nor writes again

    listener = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, handle)
        yield listener.extra(anyio.abc.SocketAttribute.local_port), accepted
        group.cancel_scope.cancel()


def test_a_port_that_never_speaks_fails_the_handshake_and_is_closed(backend: str) -> None:
    async def body() -> None:
        async with silent_server(handshake=False) as (port, accepted):
            factory = PBClientFactory(timeouts=QUICK)
            async with pbcore_anyio.open_connection(factory, HOST, port) as connection:
                assert isinstance(connection.timers, ConnectionTimers)
                assert connection.timers.broker is connection.broker
                with anyio.fail_after(5), pytest.raises(PBConnectionLost) as failed:
                    await factory.getRootObject()
                assert timed_out(failed.value, "nothing arrived"), failed.value
                with anyio.fail_after(5):
                    await connection.wait_closed()
                    await closed_by_peer(accepted[0])

    run(backend, body)


def test_a_server_gone_silent_after_the_handshake_is_taken_for_gone(backend: str) -> None:
    async def body() -> None:
        async with silent_server(handshake=True) as (port, accepted):
            factory = PBClientFactory(timeouts=QUICK)
            async with pbcore_anyio.open_connection(factory, HOST, port) as connection:
                root = await factory.getRootObject()
                with anyio.fail_after(5), pytest.raises(PBConnectionLost) as failed:
                    await root.callRemote("echo", 1)  # never answered, nor anything else
                assert timed_out(failed.value, "taken for gone"), failed.value
                with anyio.fail_after(5):
                    await connection.wait_closed()
                    await closed_by_peer(accepted[0])
                assert timed_out(PBConnectionLost(connection.close_reason), "taken for gone")

    run(backend, body)


def test_a_client_gone_silent_after_the_handshake_is_dropped_by_the_server(backend: str) -> None:
    async def body() -> None:
        async with pbcore_anyio.open_server(PBServerFactory(AnyioPeerRootMaker(), timeouts=QUICK)) as server:
            raw = await anyio.connect_tcp(HOST, server.port)
            broker = Broker(is_client=True)
            broker.connection_made()
            while not broker.ready:
                broker.receive_data(await raw.receive())
                await raw.send(broker.data_to_send())
            await until(lambda: len(server.connections) == 1 and the_connection(server).broker.ready)
            served = the_connection(server)
            with anyio.fail_after(5):  # and the raw client never reads nor writes again
                await until(lambda: not server.connections)
            assert timed_out(PBConnectionLost(served.close_reason), "taken for gone"), served.close_reason
            assert served.closed
            with anyio.fail_after(5):
                await closed_by_peer(raw)
            await raw.aclose()

    run(backend, body)


def test_keepalive_probes_keep_a_live_but_quiet_connection(backend: str) -> None:
    keep = Timeouts(idle=0.2, probe=0.2)

    async def body() -> None:
        async with pbcore_anyio.open_server(PBServerFactory(AnyioPeerRootMaker(), timeouts=keep)) as server:
            factory = PBClientFactory(timeouts=keep)
            async with pbcore_anyio.open_connection(factory, HOST, server.port) as connection:
                root = await factory.getRootObject()
                served = the_connection(server)
                heard, served_heard = connection.broker.bytes_received, served.broker.bytes_received
                polls = [0]
                poll = connection.timers.poll

                def counted(now: float) -> float | None:
                    polls[0] += 1
                    return poll(now)

                connection.timers.poll = counted  # type: ignore[method-assign]
                await anyio.sleep(2)  # nothing of ours: only the probes and their answers
                assert connection.broker.bytes_received > heard and served.broker.bytes_received > served_heard
                assert 0 < polls[0] < 500  # a few per probe: the timer task does not spin on a past deadline
                with anyio.fail_after(5):
                    assert await root.callRemote("echo", "still") == [["still"], {}]
                assert not connection.closed and server.connections == {served}

    run(backend, body)


def test_a_call_past_its_pbtimeout_fails_and_the_connection_goes_on(backend: str) -> None:
    async def body() -> None:
        maker = AnyioPeerRootMaker()
        async with connected(PBServerFactory(maker)) as (_, factory, connection):
            root = await factory.getRootObject()
            with anyio.fail_after(5), pytest.raises(CallTimedOut) as failed:
                await root.callRemote("hang", pbtimeout=0.3)  # default timeouts: only this deadline is near
            assert "hang" in str(failed.value)
            assert maker.shared.hanging.is_set()
            with anyio.fail_after(5):
                assert await root.callRemote("echo", "next") == [["next"], {}]
            assert connection.broker.calls_in_flight == 0 and not connection.closed

    run(backend, body)


def test_a_read_that_makes_no_output_still_moves_the_wake_up(backend: str) -> None:
    async def body() -> None:
        maker = AnyioPeerRootMaker()
        async with connected(PBServerFactory(maker)) as (server, factory, _):
            root = await factory.getRootObject()
            assert await root.callRemote("echo", 1) == [[1], {}]
            served = the_connection(server)
            before = served._deadline  # the last input, plus the idle time (60 s)
            assert before != float("inf")
            await anyio.sleep(0.05)
            root.callRemote("note", "quiet", pbanswer=False)  # the server reads it and writes nothing
            await until(lambda: maker.shared.notes == ["quiet"])
            assert served._deadline > before  # the keepalive counts from this read

    run(backend, body)
