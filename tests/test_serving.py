"""The serving runtime in the core, without sockets: pbcore.serving's Dispatcher, pbcore.driver's
CoroutineDriver, and the broker's lifecycle (isolated callbacks, tables emptied on close, the close hook).

Every scenario runs over a BrokerPair, which serves calls exactly as an adapter does (one
Dispatcher per broker, async calls run by a CoroutineDriver).
"""

from __future__ import annotations

import gc
import logging
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from pbcore.banana import Limits
from pbcore.broker import Broker, PendingCall
from pbcore.driver import CoroutineDriver
from pbcore.errors import BananaError, Error, PBConnectionLost
from pbcore.events import ConnectionClosed
from pbcore.flavors import (
    Cacheable,
    CopiedFailure,
    Copyable,
    Referenceable,
    RemoteCache,
    RemoteReference,
    Root,
    copyTags,
    setCopierForClass,
)
from pbcore.serving import Dispatcher, TooManyCalls
from pbcore.testing import BrokerPair


class Boom(Copyable):
    """A Copyable whose serializer raises: the application's bug, found while answering."""

    def getStateToCopy(self) -> Any:
        raise RuntimeError("getStateToCopy is broken")


class Echo(Referenceable):
    def remote_echo(self, value: Any) -> Any:
        return value

    async def remote_slow_echo(self, value: Any) -> Any:
        return value

    def remote_fail(self) -> None:
        raise KeyError("missing")


class Server(Root):
    def __init__(self) -> None:
        self.forever: list[PendingCall] = []
        self.finished: list[str] = []
        self.exported: list[weakref.ref[Any]] = []

    def remote_raise(self) -> None:
        raise ValueError("the method is broken")

    def remote_refuse(self) -> None:
        raise Error("a known refusal")

    def remote_unsendable(self) -> object:
        return object()

    def remote_boom(self) -> Boom:
        return Boom()

    async def remote_async_raise(self) -> None:
        raise ValueError("the async method is broken")

    async def remote_async_boom(self) -> Boom:
        return Boom()

    async def remote_wait(self) -> str:
        # A call that only the end of the connection ends.
        pending = PendingCall()
        self.forever.append(pending)
        try:
            await pending
        finally:
            self.finished.append("wait")
        return "never"

    async def remote_ping_pong(self, client: RemoteReference, depth: int) -> int:
        # A call back into the caller, whose method calls us again: PB's central idiom.
        if depth == 0:
            return 0
        result: int = await client.callRemote("pong", depth - 1)
        return result + 1

    async def remote_relay(self, other: RemoteReference) -> Any:
        return await other.callRemote("fail")

    async def remote_sleep(self) -> None:
        import asyncio  # noqa: PLC0415  (awaiting an event loop's future, which the driver cannot)

        await asyncio.sleep(0)

    def remote_thing(self) -> Echo:
        thing = Echo()
        self.exported.append(weakref.ref(thing))
        return thing

    def remote_take(self, ref: RemoteReference) -> None:
        raise ValueError("refused the argument")

    async def remote_async_take(self, ref: RemoteReference) -> None:
        raise ValueError("refused the argument")


class Client(Referenceable):
    def __init__(self) -> None:
        self.root: RemoteReference | None = None

    async def remote_pong(self, depth: int) -> int:
        assert self.root is not None
        result: int = await self.root.callRemote("ping_pong", self, depth)
        return result

    def remote_fail(self) -> None:
        raise KeyError("far away")


def pair_with_server(**options: Any) -> tuple[BrokerPair, Server, RemoteReference]:
    server = Server()
    pair = BrokerPair(server_root=server, **options)
    return pair, server, pair.client.root()


def outcome(pair: BrokerPair, pending: PendingCall) -> Any:
    pair.pump()
    assert pending.done, "the call was left waiting"
    return pending.error if pending.error is not None else pending.result


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="pbcore")
    yield caplog


# -- every outcome is an answer ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("raise", "builtins.ValueError"),
        ("async_raise", "builtins.ValueError"),
        ("boom", "builtins.RuntimeError"),
        ("async_boom", "builtins.RuntimeError"),
        ("unsendable", "pbcore.errors.NotJellyable"),
    ],
)
def test_an_application_fault_costs_one_call(method: str, kind: str, records: pytest.LogCaptureFixture) -> None:
    pair, _, root = pair_with_server()
    error = outcome(pair, root.callRemote(method))
    assert isinstance(error, CopiedFailure) and error.type == kind
    # The connection lives on: the next call on it is answered.
    assert outcome(pair, root.callRemote("raise")) is not None
    assert not pair.server.closed and not pair.client.closed
    faults = [r for r in records.records if r.name == "pbcore.serving" and r.levelno == logging.ERROR]
    assert faults and "Traceback" in faults[0].getMessage(), "the fault was not logged with its traceback"
    assert method in faults[0].getMessage()


def test_a_pb_error_is_answered_and_logged_quietly(records: pytest.LogCaptureFixture) -> None:
    pair, _, root = pair_with_server()
    error = outcome(pair, root.callRemote("refuse"))
    assert isinstance(error, CopiedFailure) and error.check(Error)
    served = [r for r in records.records if r.name == "pbcore.serving"]
    assert served and all(r.levelno == logging.DEBUG for r in served)


def test_a_one_way_call_that_raises_is_logged(records: pytest.LogCaptureFixture) -> None:
    pair, _, root = pair_with_server()
    assert root.callRemote("raise", pbanswer=False) is None
    pair.pump()
    assert any("one-way" in r.getMessage() for r in records.records if r.name == "pbcore.serving")
    assert b"error" not in b"".join([pair.server.data_to_send()])


def test_an_error_whose_message_cannot_be_sent_still_answers(records: pytest.LogCaptureFixture) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    class Target(Root):
        def remote_odd(self) -> None:
            raise Unprintable()

    pair = BrokerPair(server_root=Target())
    error = outcome(pair, pair.client.root().callRemote("odd"))
    assert isinstance(error, CopiedFailure) and "Unprintable" in error.value
    assert not pair.server.closed


def test_a_relayed_failure_keeps_the_far_end_type_and_parents() -> None:
    pair, _, root = pair_with_server()
    error = outcome(pair, root.callRemote("relay", Client()))
    assert isinstance(error, CopiedFailure)
    assert error.type == "builtins.KeyError"
    assert error.check(KeyError) and error.check(LookupError)
    assert "far away" in error.value


# -- no deadlock, and the limit refuses instead of queueing ---------------------------------------------


def test_calls_that_call_back_into_the_caller_all_complete() -> None:
    pair, _, root = pair_with_server()
    client = Client()
    client.root = root
    pendings = [root.callRemote("ping_pong", client, 3) for _ in range(1000)]
    pair.pump(rounds=10_000)
    assert [p.unwrap() for p in pendings] == [3] * 1000
    assert not pair._dispatchers[pair.server].running


def test_long_polls_then_the_call_that_wakes_them() -> None:
    class Board(Root):
        def __init__(self) -> None:
            self.waiters: list[PendingCall] = []

        async def remote_poll(self) -> str:
            waiter = PendingCall()
            self.waiters.append(waiter)
            result: str = await waiter
            return result

        def remote_post(self, text: str) -> int:
            for waiter in self.waiters:
                waiter.resolve(text)
            return len(self.waiters)

    board = Board()
    pair = BrokerPair(server_root=board)
    root = pair.client.root()
    polls = [root.callRemote("poll") for _ in range(40)]
    pair.pump()
    assert not any(p.done for p in polls)
    assert outcome(pair, root.callRemote("post", "news")) == 40
    assert [p.unwrap() for p in polls] == ["news"] * 40


def test_past_the_limit_a_call_is_refused_not_queued() -> None:
    pair, server, root = pair_with_server(limits=Limits(max_running_calls=3))
    waiting = [root.callRemote("wait") for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refused coroutine is closed, not left "never awaited"
        refused = outcome(pair, root.callRemote("wait"))
        gc.collect()
    assert isinstance(refused, CopiedFailure) and refused.check(TooManyCalls)
    assert "3 calls" in refused.value
    # Plain methods are never refused: they do not run on.
    assert outcome(pair, root.callRemote("refuse")) is not None
    # Once one finishes, a new one is accepted.
    server.forever[0].resolve(None)
    pair.pump()
    assert waiting[0].unwrap() == "never"
    root.callRemote("wait")
    pair.pump()
    assert len(server.forever) == 4
    assert len(pair._dispatchers[pair.server].running) == 3


# -- the end of a connection --------------------------------------------------------------------------


def test_the_end_of_the_connection_cancels_running_calls() -> None:
    pair, server, root = pair_with_server()
    pending = root.callRemote("wait")
    pair.pump()
    assert server.forever and not server.finished
    pair.server.connection_lost(PBConnectionLost("gone"))
    assert server.finished == ["wait"], "the running call was not cancelled"
    assert not pair._dispatchers[pair.server].running
    assert pair.server.data_to_send() == b""  # no answer for a cancelled call
    pair.client.connection_lost(None)
    assert isinstance(pending.error, PBConnectionLost)


def test_a_raising_disconnect_notifier_does_not_stop_the_others(records: pytest.LogCaptureFixture) -> None:
    pair, _, _ = pair_with_server()
    ran: list[str] = []

    def bad() -> None:
        ran.append("bad")
        raise RuntimeError("notifier bug")

    pair.server.notifyOnDisconnect(bad)
    pair.server.notifyOnDisconnect(lambda: ran.append("good"))
    pair.server.connection_lost(None)
    assert ran == ["bad", "good"]
    assert any(isinstance(e, ConnectionClosed) for e in pair.server.events())
    assert any("notifier bug" in r.getMessage() for r in records.records if r.levelno == logging.ERROR)


def test_a_raising_stopped_observing_does_not_stop_the_others() -> None:
    stopped: list[str] = []

    class Watched(Cacheable):
        def __init__(self, name: str) -> None:
            self.name = name

        def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> Any:
            return {"name": self.name}

        def stoppedObserving(self, perspective: Any, observer: Any) -> None:
            stopped.append(self.name)
            raise RuntimeError("observer bug")

    class Home(Root):
        def remote_two(self) -> list[Watched]:
            return [Watched("a"), Watched("b")]

    pair = BrokerPair(server_root=Home())
    tag = f"{Watched.__module__}.{Watched.__qualname__}"
    setCopierForClass(tag, RemoteCache)
    try:
        caches = outcome(pair, pair.client.root().callRemote("two"))
        assert len(caches) == 2
        pair.server.connection_lost(None)
    finally:
        del copyTags[tag.encode()]
    assert sorted(stopped) == ["a", "b"]


def test_a_dropped_connection_retains_nothing_it_exported() -> None:
    pair, server, root = pair_with_server()
    things = [outcome(pair, root.callRemote("thing")) for _ in range(3)]
    assert all(isinstance(t, RemoteReference) for t in things)
    # The application on the server keeps a reference it got from the peer: that keeps the broker alive.
    kept = outcome(pair, root.callRemote("thing"))
    held_by_server = pair.server.root()
    pair.disconnect()
    pair.clear_events()
    del things
    gc.collect()
    assert [ref() for ref in server.exported] == [None] * 4, "a closed broker kept an exported object alive"
    assert not pair.server.localObjects and not pair.client.localObjects
    assert kept is not None and held_by_server is not None


@pytest.mark.parametrize("method", ["take", "async_take"])
def test_with_the_cyclic_collector_off_a_failed_call_leaves_no_count(
    method: str, records: pytest.LogCaptureFixture
) -> None:
    # pytest's capture keeps every record, and so the logged exception's traceback: the
    # dispatcher must not let that keep the call's arguments (its frames' locals) alive.
    pair, _, root = pair_with_server()
    baseline = dict(pair.client.localObjects)
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            error = outcome(pair, root.callRemote(method, Echo()))
            assert isinstance(error, CopiedFailure)
            del error
            pair.clear_events()
            pair.pump()
        assert pair.client.localObjects == baseline, "the server kept references to a failed call's arguments"
    finally:
        gc.enable()
    logged = [r for r in records.records if f"{method} raised ValueError" in r.getMessage()]
    assert len(logged) == 5 and all("refused the argument" in r.getMessage() for r in logged)


def test_closing_calls_the_output_hook_so_the_adapter_closes_its_transport() -> None:
    seen: list[bool] = []
    broker = Broker(is_client=True)
    broker.on_output = lambda: seen.append(broker.closed)
    broker.connection_lost(None)
    assert seen == [True]
    broker.connection_lost(None)
    assert seen == [True], "the hook runs once"


def test_connect_notifiers_are_isolated(records: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []
    pair = BrokerPair(handshake=False)

    def bad() -> None:
        raise RuntimeError("connect bug")

    pair.client.notifyOnConnect(bad)
    pair.client.notifyOnConnect(lambda: ran.append("good"))
    pair.pump()
    assert ran == ["good"] and pair.client.ready


def test_the_peer_address_reaches_the_logs(records: pytest.LogCaptureFixture) -> None:
    pair, _, root = pair_with_server()
    pair.server.peer = ("192.0.2.7", 4242)
    outcome(pair, root.callRemote("raise"))
    assert any("192.0.2.7" in r.getMessage() for r in records.records if r.name == "pbcore.serving")


# -- the coroutine driver ----------------------------------------------------------------------------------


def test_awaiting_anything_but_a_pb_call_is_an_error_answer() -> None:
    pair, _, root = pair_with_server()
    error = outcome(pair, root.callRemote("sleep"))
    assert isinstance(error, CopiedFailure) and error.type == "builtins.RuntimeError"
    assert "can wait only for PB calls" in error.value


def test_the_driver_serves_a_portal_login() -> None:
    from pbcore.cred import InMemoryPasswordChecker, Portal, UsernamePassword  # noqa: PLC0415
    from pbcore.factory import PBClientFactory, PBServerFactory  # noqa: PLC0415

    class Realm:
        def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
            return interfaces[0], Echo(), lambda: None

    portal = Portal(Realm(), [InMemoryPasswordChecker(alice=b"secret")])
    client_factory = PBClientFactory()
    pair = BrokerPair(
        broker_factory=lambda is_client, root=None, **options: (
            client_factory.make_broker(**options) if is_client else PBServerFactory(portal).make_broker(**options)
        )
    )
    avatar = pair.run(client_factory.login(UsernamePassword("alice", "secret"), timeout=5.0))
    assert isinstance(avatar, RemoteReference)


def test_a_driver_task_cancelled_while_it_runs_is_closed_when_it_waits() -> None:
    driver = CoroutineDriver()
    first = PendingCall()
    closed: list[bool] = []
    tasks: list[Any] = []

    async def cancels_itself() -> None:
        await first
        tasks[0].cancel()  # as a call that ends its own connection does
        try:
            await PendingCall()
        finally:
            closed.append(True)

    tasks.append(driver.spawn(cancels_itself()))
    assert not tasks[0].done
    first.resolve(None)
    assert driver.run_ready() == 1
    assert tasks[0].done and closed == [True]


def test_dispatcher_starts_nothing_on_a_closed_broker() -> None:
    pair, server, root = pair_with_server()
    root.callRemote("wait")
    data = pair.client.data_to_send()
    pair.server.receive_data(data)
    events = pair.server.events()
    pair.server.connection_lost(None)
    Dispatcher(pair.server, pair.driver.spawn_call).dispatch(events)
    assert not server.forever


def test_a_call_starts_only_once_the_async_call_before_it_has_waited() -> None:
    # A runtime that runs tasks later (as asyncio does): the call after an async one waits
    # for its first wait, so the long polls are registered before the post that wakes them.
    class Board(Root):
        def __init__(self) -> None:
            self.log: list[str] = []
            self.waiters: list[PendingCall] = []

        async def remote_poll(self, n: int) -> str:
            self.log.append(f"poll {n}")
            waiter = PendingCall()
            self.waiters.append(waiter)
            result: str = await waiter
            return result

        def remote_post(self) -> int:
            self.log.append("post")
            for waiter in self.waiters:
                waiter.resolve("news")
            return len(self.waiters)

    board = Board()
    pair = BrokerPair(server_root=board)
    later: list[Any] = []
    driver = CoroutineDriver()

    def run_later(coroutine: Any) -> Any:
        later.append(coroutine)
        return lambda: None

    dispatcher = Dispatcher(pair.server, run_later)
    root = pair.client.root()
    polls = [root.callRemote("poll", n) for n in range(2)]
    post = root.callRemote("post")
    pair.server.receive_data(pair.client.data_to_send())
    dispatcher.dispatch(pair.server.events())
    assert board.log == [] and dispatcher.queued == 2 and len(later) == 1
    while later:
        driver.spawn(later.pop(0))
    assert board.log == ["poll 0", "poll 1", "post"]
    driver.run_ready()
    pair.client.receive_data(pair.server.data_to_send())
    assert post.unwrap() == 2 and [p.unwrap() for p in polls] == ["news", "news"]


def test_a_call_the_runtime_cannot_spawn_is_an_error_answer() -> None:
    pair, _, root = pair_with_server()

    def refuse(coroutine: Any) -> Any:
        raise RuntimeError("the nursery is closed")

    dispatcher = Dispatcher(pair.server, refuse)
    pending = root.callRemote("async_raise")
    pair.server.receive_data(pair.client.data_to_send())
    dispatcher.dispatch(pair.server.events())
    pair.client.receive_data(pair.server.data_to_send())
    assert isinstance(pending.error, CopiedFailure) and "nursery is closed" in pending.error.value
    assert not dispatcher.running


def test_closing_from_this_side_keeps_what_was_queued_and_losing_the_transport_drops_it() -> None:
    pair, _, root = pair_with_server()
    root.callRemote("echo", 1)
    pair.server.receive_data(pair.client.data_to_send())
    pair.server.events()
    pair.server.send_answer(1, "queued before the close")
    pair.server.close(Error("the application is done with this peer"))
    assert pair.server.closed
    assert b"queued before the close" in pair.server.data_to_send()  # written, then the transport closes

    other, _, other_root = pair_with_server()
    other_root.callRemote("echo", 1)
    other.client.connection_lost(None)
    assert other.client.data_to_send() == b""


def test_a_missing_method_is_one_info_line_without_a_traceback(records: pytest.LogCaptureFixture) -> None:
    pair, _, root = pair_with_server()
    error = outcome(pair, root.callRemote("no_such_thing"))
    assert isinstance(error, CopiedFailure) and "NoSuchMethod" in error.type
    [line] = [r for r in records.records if r.name == "pbcore.serving"]
    assert line.levelno == logging.INFO and "Traceback" not in line.getMessage()
    assert "no_such_thing raised NoSuchMethod" in line.getMessage()


def test_an_answer_over_the_peer_s_limit_is_an_error_answer_not_a_dropped_connection() -> None:
    class Big(Root):
        def remote_big(self, size: int) -> bytes:
            return b"x" * size

        def remote_echo(self, value: Any) -> Any:
            return value

    limits = Limits(max_expression_bytes=10_000)
    pair = BrokerPair(server_root=Big(), limits=limits)
    root = pair.client.root()
    error = outcome(pair, root.callRemote("big", 20_000))
    assert isinstance(error, CopiedFailure) and "over the limit of 10000" in error.value
    assert outcome(pair, root.callRemote("big", 100)) == b"x" * 100  # the connection lives on
    # A call over the limit is refused before it leaves, and nothing is left waiting.
    with pytest.raises(BananaError, match="over the limit"):
        root.callRemote("echo", b"y" * 20_000)
    assert pair.client.calls_in_flight == 0 and not pair.client.closed
    # An echo written by the peer with empty (non-canonical) prefixes is re-encoded canonically,
    # twice its size here: past the limit it is an error answer too, not a dropped connection.
    writer = BrokerPair(server_root=Big(), limits=Limits(max_expression_bytes=100_000))
    writer.server.limits = limits  # the server accepts less than the client may send
    pending = writer.client.root().callRemote("echo", [0] * 6_000)
    canonical = writer.client.data_to_send()
    squeezed = canonical.replace(b"\x00\x81", b"\x81")  # each 0 without its (empty) prefix
    assert len(squeezed) < 10_000 < len(canonical)
    writer.server.receive_data(squeezed)
    writer._dispatchers[writer.server].dispatch(writer.server.events())
    writer.client.receive_data(writer.server.data_to_send())
    assert isinstance(pending.error, CopiedFailure) and "over the limit of 10000" in pending.error.value
    assert not writer.server.closed and not writer.client.closed


# -- back-pressure: a peer that does not read ----------------------------------------------


class Big(Root):
    def __init__(self) -> None:
        self.started = 0

    def remote_big(self) -> bytes:
        self.started += 1
        return b"x" * 100_000


def test_no_call_starts_while_the_output_is_over_the_high_water_mark() -> None:
    big = Big()
    pair = BrokerPair(server_root=big)
    root = pair.client.root()
    woken: list[int] = []
    unwritten = [0]  # what the adapter holds unwritten: the peer is not reading

    def take_output() -> None:
        unwritten[0] += len(pair.server.data_to_send())

    dispatcher = Dispatcher(
        pair.server, pair.driver.spawn_call, backlog=lambda: unwritten[0], on_input_wanted=lambda: woken.append(1)
    )
    calls = [root.callRemote("big") for _ in range(20)]
    pair.server.receive_data(pair.client.data_to_send())
    dispatcher.dispatch(pair.server.events())
    # 256 KiB of high water, 100 KB answers: the third answer takes it over; nothing more starts.
    assert big.started == 3 and dispatcher.queued == 17 and dispatcher.output_full
    take_output()
    dispatcher.resume()
    assert big.started == 3  # still unwritten
    unwritten[0] = 0  # the peer read it all
    dispatcher.resume()
    assert big.started == 6 and dispatcher.queued == 14
    assert not woken  # the queue never reached max_queued_calls
    del calls


def test_reading_stops_while_max_queued_calls_wait_and_resumes_when_they_start() -> None:
    big = Big()
    pair = BrokerPair(server_root=big, limits=Limits(max_queued_calls=5, output_high_water=150_000))
    root = pair.client.root()
    woken: list[int] = []
    unwritten = [0]
    dispatcher = Dispatcher(
        pair.server, pair.driver.spawn_call, backlog=lambda: unwritten[0], on_input_wanted=lambda: woken.append(1)
    )
    for _ in range(8):
        root.callRemote("big")
    pair.server.receive_data(pair.client.data_to_send())
    dispatcher.dispatch(pair.server.events())
    assert big.started == 2 and dispatcher.queued == 6
    assert not dispatcher.wants_input  # the adapter reads no more
    pair.server.data_to_send()  # the adapter took the answers and wrote them
    dispatcher.resume()
    assert big.started == 4 and dispatcher.queued == 4
    # Fewer than max_queued_calls wait now, but they wait for the output: still no input.
    assert not woken and not dispatcher.wants_input
    while dispatcher.queued:
        pair.server.data_to_send()
        dispatcher.resume()
    assert big.started == 8
    assert woken == [1] and dispatcher.wants_input


def test_the_output_alone_never_stops_reading() -> None:
    # A client's own calls may fill its output: it must still read their answers (a peer doing
    # the same would otherwise never write again). Only calls of the peer's waiting stop reading.
    big = Big()
    pair = BrokerPair(server_root=big, client_root=big)
    woken: list[int] = []
    unwritten = [10**9]  # the peer reads nothing
    dispatcher = Dispatcher(
        pair.server, pair.driver.spawn_call, backlog=lambda: unwritten[0], on_input_wanted=lambda: woken.append(1)
    )
    assert dispatcher.output_full and dispatcher.queued == 0
    assert dispatcher.wants_input
    pair.client.root().callRemote("big")  # one call of the peer's: it waits for the output
    pair.server.receive_data(pair.client.data_to_send())
    dispatcher.dispatch(pair.server.events())
    assert big.started == 0 and dispatcher.queued == 1
    assert not dispatcher.wants_input
    unwritten[0] = 0
    dispatcher.resume()
    assert big.started == 1 and dispatcher.queued == 0
    assert woken == [1] and dispatcher.wants_input


def test_calls_waiting_for_the_output_are_dropped_when_the_connection_ends() -> None:
    big = Big()
    pair = BrokerPair(server_root=big)
    root = pair.client.root()
    dispatcher = Dispatcher(pair.server, pair.driver.spawn_call, backlog=lambda: 10**9)
    for _ in range(5):
        root.callRemote("big")
    pair.server.receive_data(pair.client.data_to_send())
    dispatcher.dispatch(pair.server.events())
    assert big.started == 0 and dispatcher.queued == 5
    pair.server.connection_lost(None)
    assert dispatcher.queued == 0
    dispatcher.resume()
    assert big.started == 0


def test_a_flood_of_refused_calls_is_one_warning(records: pytest.LogCaptureFixture) -> None:
    pair, server, root = pair_with_server(limits=Limits(max_running_calls=2))
    for _ in range(50):
        root.callRemote("wait")
    pair.pump()
    warned = [r for r in records.records if r.levelno == logging.WARNING and "refused wait" in r.getMessage()]
    quiet = [r for r in records.records if r.levelno == logging.DEBUG and "refused wait" in r.getMessage()]
    assert len(warned) == 1 and len(quiet) == 47
    server.forever[0].resolve(None)  # a slot frees, a call is accepted: the next refusal warns again
    pair.pump()
    root.callRemote("wait")
    root.callRemote("wait")
    pair.pump()
    assert len([r for r in records.records if r.levelno == logging.WARNING and "refused" in r.getMessage()]) == 2
