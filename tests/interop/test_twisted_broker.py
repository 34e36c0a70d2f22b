"""pbcore's Broker against Twisted's own pb.Broker, in memory (StringTransport, no sockets).

Both directions: a pbcore client calling a Twisted server, and a Twisted
client calling a pbcore server. Twisted's Deferreds fire synchronously as the
bytes are fed in, so the exchange is driven by hand, step by step.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import pytest

from pbcore import flavors
from pbcore.broker import Broker, PendingCall
from pbcore.driver import CoroutineDriver
from pbcore.errors import Error, NoSuchMethod, PBConnectionLost, ProtocolError
from pbcore.events import CallReceived, DecRefReceived
from pbcore.serving import Dispatcher
from pbcore.timers import ConnectionTimers

pb: Any = pytest.importorskip("twisted.spread.pb")
testing: Any = pytest.importorskip("twisted.internet.testing")
twisted_jelly: Any = pytest.importorskip("twisted.spread.jelly")
failure: Any = pytest.importorskip("twisted.python.failure")
twisted_logger: Any = pytest.importorskip("twisted.logger")


# -- the Twisted side ------------------------------------------------------------------


class TwistedThing(pb.Referenceable):  # type: ignore[misc]
    def __init__(self, n: int) -> None:
        self.n = n

    def remote_n(self) -> int:
        return self.n


class TwistedPoint(pb.Copyable):  # type: ignore[misc]
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


class TwistedRoot(pb.Root):  # type: ignore[misc]
    def remote_echo(self, *args: Any, **kw: Any) -> Any:
        return [list(args), kw]

    def remote_thing(self, n: int) -> Any:
        return TwistedThing(n)

    def remote_point(self) -> Any:
        return TwistedPoint(3, 4)

    def remote_fail(self) -> None:
        raise ValueError("nope")

    def remote_known(self) -> None:
        raise pb.Error("known")

    def remote_call_back(self, ref: Any, *args: Any) -> Any:
        # Call the caller's object and answer with what it answers.
        return ref.callRemote("twice", *args)

    def remote_same(self, ref: Any) -> Any:
        return ref


class Point(flavors.RemoteCopy):
    """Our copy of TwistedPoint."""

    x: int
    y: int


@pytest.fixture
def point_registered() -> Iterator[None]:
    tag = b"tests.interop.test_twisted_broker.TwistedPoint"
    flavors.setCopierForClass(tag, Point)
    yield
    flavors.copyTags.pop(tag, None)


class Connection:
    """Our broker and Twisted's, joined by a StringTransport, pumped by hand."""

    def __init__(self, ours: Broker, theirs: Any) -> None:
        self.ours = ours
        self.driver = CoroutineDriver()
        self.dispatcher = Dispatcher(ours, self.driver.spawn_call)
        self.theirs = theirs
        self.transport = testing.StringTransport()
        self.events: list[Any] = []
        ours.connection_made()
        theirs.makeConnection(self.transport)
        self.pump()

    def pump(self) -> None:
        for _ in range(100):
            moved = False
            outgoing = self.ours.data_to_send()
            if outgoing:
                moved = True
                self.theirs.dataReceived(outgoing)
            incoming = self.transport.value()
            if incoming:
                moved = True
                self.transport.clear()
                self.ours.receive_data(incoming)
            for event in self.ours.events():
                if not isinstance(event, CallReceived):
                    self.events.append(type(event).__name__ if not isinstance(event, DecRefReceived) else event)
                else:
                    self.dispatcher.dispatch([event])
                    moved = True
            if self.driver.run_ready():
                moved = True
            if not moved:
                return
        raise AssertionError("still talking after 100 rounds")


def served_by_twisted(root: Any = None) -> Connection:
    factory = pb.PBServerFactory(root or TwistedRoot())
    return Connection(Broker(is_client=True), factory.buildProtocol(None))


def call(connection: Connection, ref: Any, name: str, *args: Any, **kw: Any) -> PendingCall:
    pending = ref.callRemote(name, *args, **kw)
    connection.pump()
    assert isinstance(pending, PendingCall)
    assert pending.done, f"{name} was not answered"
    return pending


# -- pbcore client, Twisted server ------------------------------------------------------


def test_handshake_with_a_twisted_server() -> None:
    connection = served_by_twisted()
    assert connection.ours.ready
    assert connection.ours.dialect == b"pb"


def test_calls_with_args_and_kwargs() -> None:
    connection = served_by_twisted()
    root = connection.ours.root()
    assert call(connection, root, "echo", 1, "two", [3.5], k={"x": None}).unwrap() == [
        [1, "two", [3.5]],
        {"k": {"x": None}},
    ]


def test_references_from_twisted_are_counted_and_released() -> None:
    connection = served_by_twisted()
    root = connection.ours.root()
    baseline = dict(connection.theirs.localObjects)
    thing = call(connection, root, "thing", 7).unwrap()
    assert isinstance(thing, flavors.RemoteReference)
    assert call(connection, thing, "n").unwrap() == 7
    assert len(connection.theirs.localObjects) == len(baseline) + 1
    del thing
    gc.collect()
    connection.pump()
    assert connection.theirs.localObjects == baseline


def test_errors_from_twisted(point_registered: None) -> None:
    connection = served_by_twisted()
    root = connection.ours.root()
    failed = call(connection, root, "fail").error
    assert isinstance(failed, flavors.CopiedFailure)
    assert failed.type == "builtins.ValueError" and failed.value == "nope"
    assert failed.check(ValueError) is ValueError
    known = call(connection, root, "known").error
    assert isinstance(known, flavors.CopiedFailure)
    assert known.check(Error) is Error  # Twisted's pb.Error matches pbcore's Error
    missing = call(connection, root, "missing").error
    assert isinstance(missing, flavors.CopiedFailure)
    assert missing.check(NoSuchMethod) is NoSuchMethod
    assert call(connection, root, "echo", 1).unwrap() == [[1], {}]  # and the connection lives


def test_copy_from_twisted(point_registered: None) -> None:
    connection = served_by_twisted()
    point = call(connection, connection.ours.root(), "point").unwrap()
    assert isinstance(point, Point)
    assert (point.x, point.y) == (3, 4)


class Doubler(flavors.Referenceable):
    def remote_twice(self, x: Any) -> Any:
        return x * 2


def test_twisted_calls_back_our_referenceable() -> None:
    connection = served_by_twisted()
    ours = Doubler()
    assert call(connection, connection.ours.root(), "call_back", ours, 21).unwrap() == 42
    # Twisted dropped its reference to our Doubler once the call was done.
    gc.collect()
    connection.pump()
    assert [luid for luid in connection.ours.localObjects if luid != b"root"] == []


def test_reference_sent_back_to_twisted_is_its_own_object() -> None:
    connection = served_by_twisted()
    root = connection.ours.root()
    thing = call(connection, root, "thing", 1).unwrap()
    again = call(connection, root, "same", thing).unwrap()
    assert again == thing  # Twisted got [local, luid] and sent its object back as [remote, luid]


def test_one_way_call() -> None:
    connection = served_by_twisted()
    assert connection.ours.root().callRemote("echo", 1, pbanswer=False) is None
    connection.pump()
    assert not connection.ours._waiting


def test_pending_calls_fail_when_the_connection_drops() -> None:
    connection = served_by_twisted()
    pending = connection.ours.root().callRemote("echo", 1)
    connection.ours.connection_lost(ConnectionResetError("gone"))
    assert isinstance(pending.error, PBConnectionLost)


# -- Twisted client, pbcore server ------------------------------------------------------


class Thing(flavors.Referenceable):
    def __init__(self, n: int) -> None:
        self.n = n

    def remote_n(self) -> int:
        return self.n


class OurRoot(flavors.Root):
    def remote_echo(self, *args: Any, **kw: Any) -> Any:
        return [list(args), kw]

    def remote_thing(self, n: int) -> Thing:
        return Thing(n)

    def remote_fail(self) -> None:
        raise ValueError("nope")

    def remote_known(self) -> None:
        raise Error("known")


def served_by_pbcore() -> tuple[Connection, Any]:
    factory = pb.PBClientFactory()
    connection = Connection(Broker(is_client=False, root=OurRoot()), factory.buildProtocol(None))
    roots: list[Any] = []
    factory.getRootObject().addCallback(roots.append)
    connection.pump()
    assert roots, "Twisted's client did not get our root"
    return connection, roots[0]


def twisted_call(connection: Connection, ref: Any, name: str, *args: Any) -> tuple[str, Any]:
    outcome: list[tuple[str, Any]] = []
    ref.callRemote(name, *args).addCallbacks(lambda v: outcome.append(("ok", v)), lambda f: outcome.append(("err", f)))
    connection.pump()
    assert outcome, f"{name} was not answered"
    return outcome[0]


def test_twisted_client_calls_us() -> None:
    connection, root = served_by_pbcore()
    assert twisted_call(connection, root, "echo", 1, b"two", "three") == ("ok", [[1, b"two", "three"], {}])


def test_twisted_client_gets_and_releases_our_reference() -> None:
    connection, root = served_by_pbcore()
    kind, thing = twisted_call(connection, root, "thing", 9)
    assert kind == "ok"
    assert twisted_call(connection, thing, "n") == ("ok", 9)
    assert len(connection.ours.localObjects) == 2
    del thing
    gc.collect()
    connection.pump()
    assert list(connection.ours.localObjects) == [b"root"]


def test_twisted_client_sees_our_errors_as_failures() -> None:
    connection, root = served_by_pbcore()
    kind, failure = twisted_call(connection, root, "fail")
    assert kind == "err"
    assert failure.check(ValueError) is not None and failure.value == "nope"
    kind, failure = twisted_call(connection, root, "known")
    assert kind == "err"
    assert failure.check(pb.Error) is not None  # our Error travels under Twisted's name
    kind, failure = twisted_call(connection, root, "missing")
    assert kind == "err"
    assert failure.check(pb.NoSuchMethod) is not None
    kind, failure = twisted_call(connection, root, "echo", 1)
    assert kind == "ok"


def test_unknown_command_gets_did_not_understand_and_the_connection_lives() -> None:
    connection, root = served_by_pbcore()
    connection.ours.receive_data(b"\x02\x80\x05\x82bogus\x01\x81")  # [b"bogus", 1]
    assert connection.ours.data_to_send() == b"\x02\x80\x10\x82didNotUnderstand\x05\x82bogus"
    assert twisted_call(connection, root, "echo", 2) == ("ok", [[2], {}])


def test_wrong_version_closes_with_a_protocol_error() -> None:
    ours = Broker(is_client=False, root=OurRoot())
    ours.connection_made()
    ours.data_to_send()
    ours.receive_data(b"\x02\x82pb")  # the client picks pb
    ours.data_to_send()
    with pytest.raises(ProtocolError, match="version 5"):
        ours.receive_data(b"\x02\x80\x13\x87\x05\x81")  # [version, 5]
    assert ours.closed


def test_decref_events_reach_the_application() -> None:
    connection, root = served_by_pbcore()
    _, thing = twisted_call(connection, root, "thing", 1)
    luid = max(k for k in connection.ours.localObjects if k != b"root")
    del thing
    gc.collect()
    connection.pump()
    assert DecRefReceived(luid, True) in connection.events
    assert list(connection.ours.localObjects) == [b"root"]


# -- caches, both ways --------------------------------------------------------------------


class TwistedCounter(pb.Cacheable):  # type: ignore[misc]
    def __init__(self) -> None:
        self.value = 0
        self.observers: list[Any] = []
        self.stopped = 0

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> Any:
        self.observers.append(observer)
        return {"value": self.value}

    def stoppedObserving(self, perspective: Any, observer: Any) -> None:
        self.observers.remove(observer)
        self.stopped += 1

    def bump(self) -> None:
        self.value += 1
        for observer in self.observers:
            observer.callRemote("value", self.value)


class CounterCache(flavors.RemoteCache):
    value: int

    def observe_value(self, value: int) -> None:
        self.value = value


class CounterRoot(pb.Root):  # type: ignore[misc]
    def __init__(self, counter: Any) -> None:
        self.counter = counter

    def remote_counter(self) -> Any:
        return self.counter

    def remote_is_ours(self, cache: Any) -> bool:
        return cache is self.counter


@pytest.fixture
def counter_registered() -> Iterator[None]:
    tags = [b"tests.interop.test_twisted_broker.TwistedCounter", b"tests.interop.test_twisted_broker.Counter"]
    for tag in tags:
        flavors.setCopierForClass(tag, CounterCache)
    yield
    for tag in tags:
        flavors.copyTags.pop(tag, None)


def test_cache_from_twisted_is_updated_sent_back_and_released(counter_registered: None) -> None:
    counter = TwistedCounter()
    connection = served_by_twisted(CounterRoot(counter))
    root = connection.ours.root()
    first = call(connection, root, "counter").unwrap()
    second = call(connection, root, "counter").unwrap()
    assert isinstance(first, CounterCache) and first == second and first is not second
    assert first.value == 0
    counter.bump()
    counter.bump()
    connection.pump()
    assert first.value == second.value == 2
    assert call(connection, root, "is_ours", first).unwrap() is True  # [lcache, id] is the original
    assert counter.stopped == 0
    del first
    gc.collect()
    connection.pump()
    assert counter.stopped == 0  # one copy is still held
    del second
    gc.collect()
    connection.pump()
    assert counter.stopped == 1
    assert connection.theirs.remotelyCachedObjects == {}
    assert connection.ours.locallyCachedObjects == {}  # Twisted said uncache


class Counter(flavors.Cacheable):
    def __init__(self) -> None:
        self.value = 0
        self.observers: list[flavors.RemoteCacheObserver] = []
        self.stopped = 0

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: flavors.RemoteCacheObserver) -> Any:
        self.observers.append(observer)
        return {"value": self.value}

    def stoppedObserving(self, perspective: Any, observer: flavors.RemoteCacheObserver) -> None:
        self.observers.remove(observer)
        self.stopped += 1

    def bump(self) -> None:
        self.value += 1
        for observer in self.observers:
            observer.callRemote("value", self.value)


class TwistedCounterCache(pb.RemoteCache):  # type: ignore[misc]
    def observe_value(self, value: int) -> None:
        self.value = value


class OurCounterRoot(flavors.Root):
    def __init__(self) -> None:
        self.counter = Counter()

    def remote_counter(self) -> Counter:
        return self.counter


def test_twisted_client_caches_ours_and_lets_go() -> None:
    tag = b"tests.interop.test_twisted_broker.Counter"
    pb.setUnjellyableForClass(tag, TwistedCounterCache)
    try:
        factory = pb.PBClientFactory()
        our_root = OurCounterRoot()
        connection = Connection(Broker(is_client=False, root=our_root), factory.buildProtocol(None))
        roots: list[Any] = []
        factory.getRootObject().addCallback(roots.append)
        connection.pump()
        kind, cache = twisted_call(connection, roots[0], "counter")
        assert kind == "ok" and cache.value == 0
        our_root.counter.bump()
        connection.pump()
        assert cache.value == 1
        del cache
        gc.collect()
        connection.pump()
        assert our_root.counter.stopped == 1
        assert connection.ours.remotelyCachedObjects == {}
        assert connection.theirs.locallyCachedObjects == {}
    finally:
        twisted_jelly.unjellyableRegistry.pop(tag, None)


def test_observers_stop_when_the_connection_drops(counter_registered: None) -> None:
    factory = pb.PBClientFactory()
    our_root = OurCounterRoot()
    connection = Connection(Broker(is_client=False, root=our_root), factory.buildProtocol(None))
    roots: list[Any] = []
    factory.getRootObject().addCallback(roots.append)
    connection.pump()
    pb.setUnjellyableForClass(b"tests.interop.test_twisted_broker.Counter", TwistedCounterCache)
    try:
        kind, cache = twisted_call(connection, roots[0], "counter")
        assert kind == "ok"
        connection.ours.connection_lost(ConnectionResetError("gone"))
        assert our_root.counter.stopped == 1
        connection.ours.connection_lost(ConnectionResetError("again"))
        assert our_root.counter.stopped == 1  # exactly once
        # Tell Twisted too, as a transport would, so that its caches are
        # released now, while the StringTransport still takes writes.
        connection.theirs.connectionLost(failure.Failure(ConnectionResetError("gone")))
        del cache
        gc.collect()
    finally:
        twisted_jelly.unjellyableRegistry.pop(b"tests.interop.test_twisted_broker.Counter", None)


# -- keepalive against Twisted (pbcore.timers, driven by a fake clock) --------------------------------


@contextlib.contextmanager
def twisted_log() -> Iterator[list[dict[str, Any]]]:
    """Every event Twisted's global log publisher sees meanwhile."""
    events: list[dict[str, Any]] = []
    observer = events.append
    twisted_logger.globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        twisted_logger.globalLogPublisher.removeObserver(observer)


@pytest.mark.parametrize("side", ["client", "server"])
def test_an_hour_of_keepalive_probes_against_twisted_logs_nothing_there(side: str) -> None:
    """Probed every minute for an hour of (fake) time, a Twisted peer answers each probe and logs nothing."""
    with twisted_log() as logged:
        if side == "client":
            connection, twisted_root = served_by_twisted(), None  # we are Twisted's client
        else:
            connection, twisted_root = served_by_pbcore()  # Twisted is our client
        ours = connection.ours
        timers = ConnectionTimers(ours)
        probes, now = 0, 0.0
        while now < 3600.0:
            deadline = timers.poll(now)
            assert deadline is not None and deadline > now
            now = deadline
            before = ours.bytes_received
            timers.poll(now)  # due: the probe goes out
            probes += b"pbcore_keepalive" in ours._out
            connection.pump()  # Twisted answers at once
            assert ours.bytes_received > before, "Twisted did not answer the probe"
        assert probes >= 59 and not ours.closed
        # And the connection still works both ways.
        if twisted_root is None:
            assert call(connection, ours.root(), "echo", 7).unwrap() == [[7], {}]
        else:
            assert twisted_call(connection, twisted_root, "echo", 7) == ("ok", [[7], {}])
    said = [event for event in logged if event.get("log_level") not in (None, twisted_logger.LogLevel.debug)]
    assert said == [], said
