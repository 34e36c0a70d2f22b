"""The trio adapter over real sockets on loopback (TCP, TLS, unix), under trio and
anyio, against itself (against real Twisted peers: tests/interop/test_tcp_matrix.py)."""

from __future__ import annotations

import gc
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pbcore_trio
import pytest
import trio

from pbcore import Copyable, Referenceable, Root
from pbcore.banana import Limits
from pbcore.broker import Broker
from pbcore.cred import (
    Anonymous,
    Unauthorized,
    UsernamePassword,
)
from pbcore.errors import CallTimedOut, ConnectionTimedOut, DeadReferenceError, Error, NoSuchMethod, PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import MAX_BROKER_REFS, CopiedFailure
from pbcore.serving import TooManyCalls
from pbcore.timers import Timeouts
from tests.adapters.certs import make_certificate
from tests.adapters.services import (
    CounterCache,
    PeerRoot,
    PointCopy,
    Realm,
    Shared,
    Twice,
    login_factory,
)

T = TypeVar("T")

# -- what the servers offer: tests/adapters/services.py, plus two trio methods -------------------


class TrioShared(Shared):
    def __init__(self) -> None:
        super().__init__()
        self.hanging = trio.Event()
        self.hang_cancelled = False
        self.hangs = 0
        self.order: list[Any] = []


class NoState(Copyable):
    def getStateToCopy(self) -> Any:
        raise RuntimeError("the application's getStateToCopy bug")


class TrioPeerRoot(PeerRoot):
    shared: TrioShared

    async def remote_slow(self, seconds: float) -> str:
        await trio.sleep(seconds)
        return "late"

    async def remote_hang(self) -> None:
        self.shared.hangs += 1
        self.shared.hanging.set()
        try:
            await trio.sleep_forever()
        finally:
            self.shared.hang_cancelled = True

    def remote_big_padded(self, size: int, pad: bytes) -> bytes:
        return self.remote_big(size)

    async def remote_record(self, n: Any) -> Any:
        self.shared.order.append(n)  # before the first await
        await trio.sleep(0)
        return n

    def remote_tell_then_answer(self, ref: Any, n: Any) -> Any:
        ref.callRemote("record", n, pbanswer=False)  # sent just before the answer
        return n

    def remote_order(self) -> list[Any]:
        return self.shared.order

    def remote_no_state(self) -> NoState:
        return NoState()

    def remote_raising_notifier(self) -> None:
        def notifier() -> None:
            raise RuntimeError("the application's disconnect notifier bug")

        self.broker.notifyOnDisconnect(notifier)

    async def remote_close_me(self) -> None:
        await trio.sleep(0)
        self.broker.connection_lost(None)  # the application closes its connection, from a task
        await trio.sleep_forever()  # cancelled: the connection has ended


class TrioPeerRootMaker(Root):
    def __init__(self) -> None:
        self.shared = TrioShared()

    def rootObject(self, broker: Any) -> TrioPeerRoot:
        return TrioPeerRoot(broker, self.shared)


# -- helpers --------------------------------------------------------------------------------------


def run(body: Callable[[], Awaitable[T]], timeout: float = 10) -> T:
    """Run one async test body under trio, bounded in time."""

    async def bounded() -> T:
        with trio.fail_after(timeout):
            return await body()

    return trio.run(bounded)


@asynccontextmanager
async def serving(factory: PBServerFactory, **options: Any) -> AsyncIterator[pbcore_trio.Server]:
    async with trio.open_nursery() as nursery:
        server: pbcore_trio.Server = await nursery.start(
            lambda task_status: pbcore_trio.serve(factory, "127.0.0.1", 0, task_status=task_status, **options)
        )
        try:
            yield server
        finally:
            server.close()


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        gc.collect()
        await trio.sleep(0.01)


def the_connection(server: pbcore_trio.Server) -> pbcore_trio.Connection:
    (connection,) = server.connections
    return connection


def waiting(factory: PBClientFactory) -> dict[int, Any]:
    assert factory.broker is not None
    return factory.broker._waiting  # the calls the broker still waits for


# -- trio against trio ------------------------------------------------------------------------------


def test_calls_references_copies_errors_and_one_way_calls() -> None:
    async def body() -> None:
        maker = TrioPeerRootMaker()
        async with serving(PBServerFactory(maker)) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                assert connection.broker is factory.broker
                root = await factory.getRootObject()
                assert await root.callRemote("echo", 1, "two", b"three", key=None) == [
                    [1, "two", b"three"],
                    {"key": None},
                ]

                # A reference from the server, called, then released.
                thing = await root.callRemote("thing", 5)
                assert await thing.callRemote("n") == 5
                server_broker = the_connection(server).broker
                assert len(server_broker.localObjects) == 2
                del thing
                await until(lambda: len(server_broker.localObjects) == 1)

                # A reference to the client's object, called back by the server, then released.
                twice = Twice()
                assert await root.callRemote("call_back", twice, 21) == 42
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

                # One-way calls are written at once and run in the order they were sent.
                for n in range(50):
                    assert root.callRemote("note", n, pbanswer=False) is None
                assert await root.callRemote("notes") == list(range(50))
                assert waiting(factory) == {}

    run(body)


def test_caches_follow_updates_and_are_released() -> None:
    async def body() -> None:
        maker = TrioPeerRootMaker()
        async with serving(PBServerFactory(maker)) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
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

    run(body)


def test_many_pipelined_calls_that_call_back_do_not_stall() -> None:
    async def body() -> None:
        async with serving(PBServerFactory(TrioPeerRootMaker())) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                root = await factory.getRootObject()
                twice = Twice()
                pending = [root.callRemote("call_back", twice, n) for n in range(300)]
                assert [await result for result in pending] == [2 * n for n in range(300)]

    run(body)


def test_a_reference_released_in_another_thread_is_flushed_by_the_wake_up() -> None:
    async def body() -> None:
        async with serving(PBServerFactory(TrioPeerRootMaker())) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                root = await factory.getRootObject()
                held = [await root.callRemote("thing", 1)]
                server_broker = the_connection(server).broker
                assert len(server_broker.localObjects) == 2

                def release() -> None:
                    held.clear()
                    gc.collect()

                await trio.to_thread.run_sync(release)
                # No call of ours follows: only the wake-up can have sent the decref.
                while len(server_broker.localObjects) != 1:
                    await trio.sleep(0.01)

    run(body)


def test_login_with_right_and_wrong_passwords_anonymously_and_viewpoints() -> None:
    async def body() -> None:
        realm = Realm()
        async with serving(login_factory(realm)) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
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

    run(body)


def test_a_cancelled_call_is_forgotten_and_its_late_answer_dropped() -> None:
    async def body() -> None:
        async with serving(PBServerFactory(TrioPeerRootMaker())) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                root = await factory.getRootObject()
                with trio.move_on_after(0.05) as scope:
                    await root.callRemote("slow", 0.3)
                assert scope.cancelled_caught
                assert waiting(factory) == {}  # forgotten at once
                with pytest.raises(trio.TooSlowError), trio.fail_after(0.05):
                    await root.callRemote("slow", 0.3)
                assert waiting(factory) == {}

                # A slow call does not hold up the others.
                slow = root.callRemote("slow", 0.3)
                with trio.fail_after(0.2):
                    assert await root.callRemote("echo", "quick") == [["quick"], {}]
                assert await slow == "late"
                await trio.sleep(0.4)  # the late answers arrive and are dropped
                assert await root.callRemote("echo", "still fine") == [["still fine"], {}]
                assert waiting(factory) == {}

    run(body)


def test_an_error_in_the_block_comes_out_as_itself_and_closes_the_connection() -> None:
    async def body() -> None:
        async with serving(PBServerFactory(TrioPeerRootMaker())) as server:
            factory = PBClientFactory()
            with pytest.raises(KeyError):  # not wrapped in an ExceptionGroup
                async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                    root = await factory.getRootObject()
                    assert await root.callRemote("echo", 1) == [[1], {}]
                    raise KeyError("mine")
            assert connection.closed.is_set()
            await until(lambda: not server.connections)

    run(body)


def test_a_dropped_connection_fails_the_pending_call() -> None:
    async def body() -> None:
        maker = TrioPeerRootMaker()
        async with serving(PBServerFactory(maker)) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                outcome: list[BaseException] = []

                async def call() -> None:
                    try:
                        await root.callRemote("hang")
                    except PBConnectionLost as error:
                        outcome.append(error)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call)
                    await maker.shared.hanging.wait()
                    the_connection(server).close()  # the server drops it mid-call
                assert len(outcome) == 1
                await connection.wait_closed()
                with pytest.raises(DeadReferenceError):
                    root.callRemote("echo")
                await until(lambda: maker.shared.hang_cancelled and not server.connections)

    run(body)


def test_a_peer_sending_garbage_is_dropped_and_the_others_go_on() -> None:
    async def body() -> None:
        async with serving(PBServerFactory(TrioPeerRootMaker())) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                root = await factory.getRootObject()
                raw = await trio.open_tcp_stream("127.0.0.1", server.port)
                assert await raw.receive_some(1024)  # the dialect offer
                await raw.send_all(b"\x02\x82pb\xffgarbage")
                try:
                    while await raw.receive_some(1024):
                        pass  # the server's version message, then EOF
                except trio.BrokenResourceError:
                    pass  # or a reset
                await raw.aclose()
                await until(lambda: len(server.connections) == 1)
                assert await root.callRemote("echo", "alive") == [["alive"], {}]

    run(body)


def test_a_peer_that_never_reads_makes_the_server_stop_reading_not_buffer() -> None:
    # Calls padded so that one read brings only a few: the calls already read all
    # start (a call never waits), but nothing more is read while the backlog is high.
    size, calls, pad = 500_000, 200, 10_000
    calls_per_read = pbcore_trio.CHUNK // pad + 1

    async def body() -> None:
        maker = TrioPeerRootMaker()
        async with serving(PBServerFactory(maker)) as server:
            raw = await trio.open_tcp_stream("127.0.0.1", server.port)
            broker = Broker(is_client=True)
            broker.connection_made()
            while not broker.ready:
                broker.receive_data(bytes(await raw.receive_some(65536)))
                await raw.send_all(broker.data_to_send())
            for _ in range(calls):
                broker.root().callRemote("big_padded", size, b"p" * pad)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(raw.send_all, broker.data_to_send())  # and never read
                await until(lambda: maker.shared.big_calls > 0)
                await trio.sleep(0.5)
                connection = the_connection(server)
                served = maker.shared.big_calls
                assert served < calls // 2  # it stopped reading ...
                assert connection.backlog <= pbcore_trio.HIGH_WATER + calls_per_read * (size + 100)  # ... bounded
                await trio.sleep(0.2)
                assert maker.shared.big_calls == served  # still waiting, not growing

                factory = PBClientFactory()  # the server still serves others
                async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                    root = await factory.getRootObject()
                    assert await root.callRemote("echo", 1) == [[1], {}]
                nursery.cancel_scope.cancel()
            await raw.aclose()
            await until(lambda: not server.connections)

    run(body)


def test_tls(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    async def body() -> None:
        async with serving(PBServerFactory(TrioPeerRootMaker()), ssl_context=server_context) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(
                factory, "127.0.0.1", server.port, ssl_context=client_context, server_hostname="localhost"
            ) as connection:
                root = await factory.getRootObject()
                assert await root.callRemote("echo", "secret") == [["secret"], {}]
                # The peers' addresses, from the sockets under TLS.
                assert connection.peer == ("127.0.0.1", server.port) == connection.broker.peer
                local = connection.stream.transport_stream.socket.getsockname()  # type: ignore[attr-defined]
                assert the_connection(server).peer == local == the_connection(server).broker.peer
                big = await root.callRemote("big", 300_000)
                assert big == b"x" * 300_000
            # A client that does not trust the certificate is refused; the server goes on.
            with pytest.raises(trio.BrokenResourceError):
                async with pbcore_trio.open_connection(
                    PBClientFactory(), "127.0.0.1", server.port, ssl_context=ssl.create_default_context()
                ):
                    pass

    run(body)


def test_unix_sockets(tmp_path: Path) -> None:
    path = tmp_path / "pb.sock"

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            server: pbcore_trio.Server = await nursery.start(
                pbcore_trio.serve_unix, PBServerFactory(TrioPeerRootMaker()), path
            )
            assert server.addresses == [str(path)]
            with pytest.raises(ValueError):
                server.port  # noqa: B018
            factory = PBClientFactory()
            async with pbcore_trio.open_unix_connection(factory, path):
                root = await factory.getRootObject()
                thing = await root.callRemote("thing", 7)
                assert await thing.callRemote("n") == 7
            server.close()
        assert not path.exists()

    run(body)


def test_under_anyio_with_the_trio_backend() -> None:
    async def body() -> None:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                server: pbcore_trio.Server = await group.start(
                    pbcore_trio.serve, PBServerFactory(TrioPeerRootMaker()), "127.0.0.1", 0
                )
                factory = PBClientFactory()
                async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                    root = await factory.getRootObject()
                    assert await root.callRemote("echo", "anyio") == [["anyio"], {}]
                    with anyio.move_on_after(0.05) as scope:
                        await root.callRemote("slow", 1.0)
                    assert scope.cancelled_caught and waiting(factory) == {}
                    assert await root.callRemote("call_back", Twice(), 4) == 8
                server.close()

    anyio.run(body, backend="trio")


# -- faults, the dispatcher, closing ----------------------------------------------------------------


class RaisingRealm(Realm):
    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        interface, avatar, _ = super().requestAvatar(avatar_id, mind, *interfaces)

        def logout() -> None:
            raise RuntimeError("the application's logout bug")

        return interface, avatar, logout


class FirstRootRaises(TrioPeerRootMaker):
    def __init__(self) -> None:
        super().__init__()
        self.made = 0

    def rootObject(self, broker: Any) -> TrioPeerRoot:
        self.made += 1
        if self.made == 1:
            raise RuntimeError("the application's rootObject bug")
        return super().rootObject(broker)


async def read_to_eof(stream: trio.abc.Stream) -> None:
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass  # a reset is an end too


def test_an_application_bug_never_takes_the_server_down(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        maker = FirstRootRaises()
        async with serving(PBServerFactory(maker)) as server, serving(login_factory(RaisingRealm())) as login:
            # The broker of the first connection cannot be made: that connection is closed, and logged.
            raw = await trio.open_tcp_stream("127.0.0.1", server.port)
            await read_to_eof(raw)
            await raw.aclose()
            assert [r for r in caplog.records if r.name == "pbcore.trio" and r.levelno == logging.ERROR]

            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                root = await factory.getRootObject()
                with pytest.raises(CopiedFailure) as failed:  # a Copyable that cannot give its state
                    await root.callRemote("no_state")
                assert failed.value.type == "builtins.RuntimeError"
                await root.callRemote("raising_notifier")  # runs when this connection closes
            await until(lambda: not server.connections)

            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", login.port):
                alice = await factory.login(UsernamePassword("alice", "secret"))
                assert await alice.callRemote("hello") == "hello alice"
            await until(lambda: not login.connections)  # the logout raised

            # Both still serve.
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                root = await factory.getRootObject()
                assert await root.callRemote("echo", 1) == [[1], {}]
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", login.port):
                anonymous = await factory.login(Anonymous())
                assert await anonymous.callRemote("hello") == "hello anonymous"

    run(body)


def test_a_broker_that_closes_itself_closes_its_connection_at_once() -> None:
    async def body() -> None:
        maker = TrioPeerRootMaker()
        async with serving(PBServerFactory(maker)) as server:
            # The application calls connection_lost from a served call's task ...
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                with pytest.raises(PBConnectionLost):
                    await root.callRemote("close_me")
                await connection.wait_closed()
            await until(lambda: not server.connections)

            # ... or from a task of its own, while a call runs (it is cancelled).
            raw = await trio.open_tcp_stream("127.0.0.1", server.port)
            client = Broker(is_client=True)
            client.connection_made()
            while not client.ready:
                client.receive_data(bytes(await raw.receive_some(65536)))
                await raw.send_all(client.data_to_send())
            client.root().callRemote("hang")
            await raw.send_all(client.data_to_send())  # and never send again
            await maker.shared.hanging.wait()
            the_connection(server).broker.connection_lost(None)
            await read_to_eof(raw)  # the server closed the socket with no further input
            await raw.aclose()
            await until(lambda: maker.shared.hang_cancelled and not server.connections)

            # ... or a peer asks for more than MAX_BROKER_REFS references a fourth time.
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                results = [root.callRemote("thing", n) for n in range(MAX_BROKER_REFS + 5)]
                held, refused, lost = [], 0, 0
                for result in results:
                    try:
                        held.append(await result)
                    except CopiedFailure:
                        refused += 1
                    except PBConnectionLost:
                        lost += 1
                # The answers sent before the fourth refusal arrive; then the connection closes.
                assert (len(held), refused, lost) == (MAX_BROKER_REFS, 3, 2)
                await connection.wait_closed()
            await until(lambda: not server.connections)

    run(body)


def test_async_methods_begin_in_arrival_order_before_the_next_call_runs() -> None:
    async def body() -> None:
        maker = TrioPeerRootMaker()
        async with serving(PBServerFactory(maker)) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                root = await factory.getRootObject()
                first = root.callRemote("record", 0)
                seen = root.callRemote("order")  # a plain method, sent right after
                later = [root.callRemote("record", n) for n in range(1, 50)]
                assert await seen == [0]  # the async method had begun before the next call ran
                assert [await first] + [await result for result in later] == list(range(50))
                assert maker.shared.order == list(range(50))

    run(body)


class Recorder(Referenceable):
    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def remote_record(self, n: Any) -> None:
        self.seen.append(n)  # before the first await
        await trio.sleep(0)


def test_an_answer_wakes_its_caller_after_the_async_call_that_came_before_it_began() -> None:
    async def body() -> None:
        async with serving(PBServerFactory(TrioPeerRootMaker())) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                root = await factory.getRootObject()
                recorder = Recorder()
                for n in range(30):  # trio runs woken tasks in no set order: try it often
                    assert await root.callRemote("tell_then_answer", recorder, n) == n
                    assert recorder.seen == list(range(n + 1))

    run(body)


def test_calls_awaiting_their_caller_never_wait_for_a_slot() -> None:
    # Each call_back awaits a call to the client; past any fixed number of slots, a
    # slot-bound server would stop reading the answers that free them.
    async def body() -> None:
        async with serving(PBServerFactory(TrioPeerRootMaker())) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                root = await factory.getRootObject()
                twice = Twice()
                pending = [root.callRemote("call_back", twice, n) for n in range(1200)]
                assert [await result for result in pending] == [2 * n for n in range(1200)]

    run(body, timeout=30)


def test_calls_past_max_running_calls_are_refused_and_running_calls_cancelled_at_close() -> None:
    async def body() -> None:
        maker = TrioPeerRootMaker()
        async with serving(PBServerFactory(maker, limits=Limits(max_running_calls=5))) as server:
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                root = await factory.getRootObject()
                hanging = [root.callRemote("hang") for _ in range(5)]
                with pytest.raises(CopiedFailure) as failed:
                    await root.callRemote("hang")
                assert failed.value.check(TooManyCalls) is TooManyCalls or "TooManyCalls" in failed.value.type
                assert maker.shared.hangs == 5
                assert len(the_connection(server).dispatcher.running) == 5
                assert await root.callRemote("echo", "plain") == [["plain"], {}]  # plain methods still run
                the_connection(server).close()
                for result in hanging:
                    with pytest.raises(PBConnectionLost):
                        await result
            await until(lambda: maker.shared.hang_cancelled and not server.connections)

    run(body)


def test_peer_addresses_and_connection_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pbcore.trio")

    async def body() -> None:
        async with serving(PBServerFactory(TrioPeerRootMaker())) as server:
            assert server.addresses[0][1] == server.port
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                await factory.getRootObject()
                assert connection.peer == ("127.0.0.1", server.port) == connection.broker.peer
                assert connection.dispatcher.broker is connection.broker
                served = the_connection(server)
                local = connection.stream.socket.getsockname()  # type: ignore[attr-defined]
                assert served.peer == local == served.broker.peer
            await served.wait_closed()
        logged = [r.getMessage() for r in caplog.records if r.name == "pbcore.trio" and r.levelno == logging.DEBUG]
        assert any("accepted" in m and str(local) in m for m in logged)
        assert any("closed" in m and str(local) in m for m in logged)

    run(body)


async def refused(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


def test_server_close_with_grace_lets_running_calls_finish_then_closes_every_connection() -> None:
    async def body() -> None:
        maker = TrioPeerRootMaker()
        async with pbcore_trio.open_server(PBServerFactory(maker)) as server:
            port = server.port
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", port) as connection:
                root = await factory.getRootObject()
                slow = root.callRemote("slow", 0.3)
                await until(lambda: bool(the_connection(server).dispatcher.running))
                server.close(grace=10)
                assert await refused(port)  # it stopped accepting at once
                assert await slow == "late"  # the running call finished ...
                await connection.wait_closed()  # ... then the connection was closed
                await server.wait_closed()
                assert not server.connections

    run(body)


def test_server_close_without_grace_cancels_running_calls() -> None:
    async def body() -> None:
        maker = TrioPeerRootMaker()
        async with trio.open_nursery() as nursery:
            server: pbcore_trio.Server = await nursery.start(pbcore_trio.serve, PBServerFactory(maker))
            forever_returned = trio.Event()

            async def forever() -> None:
                await server.serve_forever()
                forever_returned.set()

            nursery.start_soon(forever)
            factory = PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                hang = root.callRemote("hang")
                await maker.shared.hanging.wait()
                await server.aclose(grace=0.1)  # the call does not finish in time
                with pytest.raises(PBConnectionLost):
                    await hang
                await connection.wait_closed()
            assert maker.shared.hang_cancelled and not server.connections
            assert await refused(server.port)
            await forever_returned.wait()
        # serve() returned once closed, so the nursery could end.

    run(body)


def test_async_with_server_closes_on_exit() -> None:
    async def body() -> None:
        async with pbcore_trio.open_server(PBServerFactory(TrioPeerRootMaker())) as outer:
            async with outer as server:
                assert server is outer
                factory = PBClientFactory()
                async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                    root = await factory.getRootObject()
                    assert await root.callRemote("echo", 2) == [[2], {}]
            assert await refused(server.port) and not server.connections
            await server.wait_closed()

        with pytest.raises(KeyError):  # open_server lets an error out as itself
            async with pbcore_trio.open_server(PBServerFactory(TrioPeerRootMaker())) as server:
                raise KeyError("mine")
        await server.wait_closed()

    run(body)


# -- timers: pbcore.timers run on trio's clock ------------------------------------------------------

SHORT = Timeouts(handshake=0.5, idle=0.3, probe=0.3)


@asynccontextmanager
async def listening() -> AsyncIterator[trio.SocketListener]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        yield listener
    finally:
        await listener.aclose()


def port_of(listener: trio.SocketListener) -> int:
    port: int = listener.socket.getsockname()[1]
    return port


async def silent_pb_server(stream: trio.abc.Stream) -> None:
    """Complete the PB handshake as a server would, then never read or write again."""
    server = Broker(is_client=False)
    server.connection_made()
    await stream.send_all(server.data_to_send())  # the dialect offer
    server.receive_data(bytes(await stream.receive_some(65536)))  # the client's choice
    await stream.send_all(server.data_to_send())


def test_a_port_that_never_speaks_fails_get_root_object_with_a_handshake_timeout() -> None:
    async def body() -> None:
        async with listening() as listener:
            factory = PBClientFactory(timeouts=SHORT)
            async with pbcore_trio.open_connection(factory, "127.0.0.1", port_of(listener)) as connection:
                accepted = await listener.accept()
                started = trio.current_time()
                with pytest.raises(PBConnectionLost) as lost:
                    await factory.getRootObject()
                assert trio.current_time() - started < 5
                (reason,) = lost.value.args
                assert isinstance(reason, ConnectionTimedOut) and "nothing arrived" in str(reason)
                with trio.fail_after(5):
                    await connection.wait_closed()
                assert connection.close_reason is reason
                with trio.fail_after(5):
                    await read_to_eof(accepted)  # this side closed the socket
                await accepted.aclose()

    run(body)


@pytest.mark.parametrize("call", [True, False], ids=["a-call-pending", "nothing-sent"])
def test_a_server_gone_silent_after_the_handshake_is_probed_then_dropped(call: bool) -> None:
    # A long handshake timeout: keepalive runs from the read that completed the
    # handshake on (nothing is written after it when no call is made).
    async def body() -> None:
        async with listening() as listener:
            factory = PBClientFactory(timeouts=Timeouts(handshake=30, idle=0.3, probe=0.3))
            async with pbcore_trio.open_connection(factory, "127.0.0.1", port_of(listener)) as connection:
                accepted = await listener.accept()
                await silent_pb_server(accepted)
                root = await factory.getRootObject()
                started = trio.current_time()
                if call:
                    with pytest.raises(PBConnectionLost) as lost, trio.fail_after(5):
                        await root.callRemote("echo", 1)
                    (reason,) = lost.value.args
                    assert reason is connection.close_reason
                with trio.fail_after(5):
                    await connection.wait_closed()
                assert trio.current_time() - started < 5  # idle + probe is 0.6 s
                reason = connection.close_reason
                assert isinstance(reason, ConnectionTimedOut) and "taken for gone" in str(reason)
                assert factory.broker is not None and factory.broker.closed
                with trio.fail_after(5):
                    await read_to_eof(accepted)  # the call, the probe, then the end
                await accepted.aclose()

    run(body)


def test_a_client_gone_silent_after_the_handshake_is_dropped_by_the_server() -> None:
    async def body() -> None:
        async with serving(PBServerFactory(TrioPeerRootMaker(), timeouts=SHORT)) as server:
            raw = await trio.open_tcp_stream("127.0.0.1", server.port)
            client = Broker(is_client=True)
            client.connection_made()
            while not client.ready:
                client.receive_data(bytes(await raw.receive_some(65536)))
                await raw.send_all(client.data_to_send())
            # and never reads or writes again
            await until(lambda: len(server.connections) == 1)
            served = the_connection(server)
            with trio.fail_after(5):
                await served.wait_closed()
            reason = served.close_reason
            assert isinstance(reason, ConnectionTimedOut) and "taken for gone" in str(reason)
            await until(lambda: not server.connections)
            with trio.fail_after(5):
                await read_to_eof(raw)  # the probe, then the end
            await raw.aclose()

    run(body)


def test_keepalive_probes_answered_keep_an_idle_connection() -> None:
    async def body() -> None:
        quick = Timeouts(idle=0.2, probe=0.2)
        async with serving(PBServerFactory(TrioPeerRootMaker(), timeouts=quick)) as server:
            factory = PBClientFactory(timeouts=quick)
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                served = the_connection(server)
                before = (connection.broker.bytes_received, served.broker.bytes_received)
                await trio.sleep(2)  # nothing but probes and their answers
                after = (connection.broker.bytes_received, served.broker.bytes_received)
                assert after[0] > before[0] and after[1] > before[1]  # both sides probed, both answered
                assert await root.callRemote("echo", "still here") == [["still here"], {}]
                assert not connection.closed.is_set() and served is the_connection(server)
                assert connection.timers.broker is connection.broker

    run(body)


def test_a_call_past_its_pbtimeout_fails_and_the_connection_goes_on() -> None:
    async def body() -> None:
        maker = TrioPeerRootMaker()
        async with serving(PBServerFactory(maker)) as server:
            factory = PBClientFactory()  # the default timeouts: only the call's deadline is short
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port) as connection:
                root = await factory.getRootObject()
                started = trio.current_time()
                with pytest.raises(CallTimedOut) as timed_out, trio.fail_after(5):
                    await root.callRemote("hang", pbtimeout=0.3)
                assert trio.current_time() - started < 5
                assert "hang" in str(timed_out.value)
                assert maker.shared.hangs == 1  # the server got it and never answered
                assert await root.callRemote("echo", "next") == [["next"], {}]
                assert connection.broker.calls_in_flight == 0
                assert not connection.closed.is_set()

    run(body)
