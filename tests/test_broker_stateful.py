"""A hypothesis state machine over a BrokerPair: references, copies and caches
sent both ways, held, called, dropped and collected, calls left in flight, and
disconnection.

Invariants, checked after every step:

* the server counts, for each object, exactly as many references as the
  client holds RemoteReference objects for it (and likewise for caches);
* every call is settled at most once; once both sides are idle, every call
  that expected an answer is settled;
* every cache the client holds shows the value its Cacheable has;
* stoppedObserving runs exactly once per observer handed out.

At teardown everything is dropped: both sides' tables are back to baseline.
"""

from __future__ import annotations

import gc
from collections import Counter
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pbcore import Cacheable, Copyable, Referenceable, RemoteCache, RemoteCopy, RemoteReference, Root, flavors
from pbcore.broker import PendingCall
from pbcore.errors import DeadReferenceError, PBConnectionLost
from pbcore.testing import BrokerPair

COPY_TAG = b"tests.test_broker_stateful.Point"
CACHE_TAG = b"tests.test_broker_stateful.Gauge"


class Thing(Referenceable):
    def __init__(self, n: int) -> None:
        self.n = n

    def remote_n(self) -> int:
        return self.n


class Point(Copyable):
    def __init__(self, x: int) -> None:
        self.x = x

    def getTypeToCopy(self) -> bytes:
        return COPY_TAG


class PointCopy(RemoteCopy):
    x: int


class Gauge(Cacheable):
    def __init__(self) -> None:
        self.value = 0
        self.observers: list[flavors.RemoteCacheObserver] = []
        self.handed_out = 0
        self.stopped: list[flavors.RemoteCacheObserver] = []

    def getTypeToCopy(self) -> bytes:
        return CACHE_TAG

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: flavors.RemoteCacheObserver) -> Any:
        self.observers.append(observer)
        self.handed_out += 1
        return {"value": self.value}

    def stoppedObserving(self, perspective: Any, observer: flavors.RemoteCacheObserver) -> None:
        assert observer in self.observers, "stoppedObserving for an observer not handed out (or twice)"
        self.observers.remove(observer)
        self.stopped.append(observer)

    def set(self, value: int) -> None:
        self.value = value
        for observer in self.observers:
            observer.callRemote("value", value, pbanswer=False)


class GaugeCache(RemoteCache):
    value: int

    def observe_value(self, value: int) -> None:
        self.value = value


class Helper(Referenceable):
    """A client-side object the server is given and calls back."""

    def __init__(self) -> None:
        self.pokes = 0

    def remote_poke(self) -> int:
        self.pokes += 1
        return self.pokes


class ServerRoot(Root):
    def __init__(self) -> None:
        self.things = [Thing(n) for n in range(3)]
        self.gauges = [Gauge() for _ in range(2)]
        self.kept: list[RemoteReference] = []

    def remote_thing(self, index: int) -> Thing:
        return self.things[index]

    def remote_thing_twice(self, index: int) -> list[Thing]:
        return [self.things[index], self.things[index]]

    def remote_point(self, x: int) -> list[Point]:
        point = Point(x)
        return [point, point]  # one copy, shared

    def remote_gauge(self, index: int) -> Gauge:
        return self.gauges[index]

    def remote_is_mine(self, thing: Any, index: int) -> bool:
        return thing is self.things[index]

    def remote_keep(self, helper: RemoteReference) -> None:
        self.kept.append(helper)

    def remote_poke_all(self) -> int:
        # One-way: waiting for the answers would need an event loop (an adapter).
        for helper in self.kept:
            helper.callRemote("poke", pbanswer=False)
        return len(self.kept)


class PairMachine(RuleBasedStateMachine):
    # What the client holds lives here, not in hypothesis bundles: hypothesis
    # keeps every bundle value alive, and this machine checks that dropped
    # references are collected and released.

    def __init__(self) -> None:
        super().__init__()
        # Collections below look only at objects made from here on: the rest
        # of the test process's heap would make every gc.collect() slow.
        gc.freeze()
        flavors.setCopierForClass(COPY_TAG, PointCopy)
        flavors.setCopierForClass(CACHE_TAG, GaugeCache)
        self.root = ServerRoot()
        self.pair = BrokerPair(self.root)
        self.connected = True
        self.held_refs: list[RemoteReference] = []
        self.held_caches: list[tuple[int, GaugeCache]] = []
        self.settled: Counter[int] = Counter()
        self.unanswered: dict[int, PendingCall] = {}
        self.calls = 0
        self.helpers: list[Helper] = []  # the client's own objects (not references)

    # -- plumbing --------------------------------------------------------------------

    def pump(self) -> None:
        self.pair.pump()
        # The pair's logs would keep references alive: this machine checks counts.
        self.pair.client_events.clear()
        self.pair.server_events.clear()

    def collect(self) -> None:
        gc.collect()
        if self.connected:
            self.pump()

    def call(self, name: str, *args: Any, wait: bool = True) -> PendingCall:
        pending = self.pair.client.root().callRemote(name, *args)
        assert isinstance(pending, PendingCall)
        key = self.calls = self.calls + 1
        self.unanswered[key] = pending

        def settled(_: object) -> None:
            self.settled.update([key])
            self.unanswered.pop(key, None)

        pending.add_callbacks(settled, settled)
        if wait:
            self.pump()
        return pending

    # -- rules -------------------------------------------------------------------------

    @precondition(lambda self: self.connected)
    @rule(index=st.integers(0, 2))
    def get_thing(self, index: int) -> None:
        ref = self.call("thing", index).unwrap()
        assert isinstance(ref, RemoteReference)
        self.held_refs.append(ref)

    @precondition(lambda self: self.connected)
    @rule(index=st.integers(0, 2))
    def get_thing_twice_and_drop(self, index: int) -> None:
        first, second = self.call("thing_twice", index).unwrap()
        assert first == second and first is not second

    @precondition(lambda self: self.connected and self.held_refs)
    @rule(pick=st.integers(0, 50))
    def call_thing(self, pick: int) -> None:
        ref = self.held_refs[pick % len(self.held_refs)]
        answer = ref.callRemote("n")
        assert isinstance(answer, PendingCall)
        self.pump()
        assert answer.unwrap() in (0, 1, 2)

    @precondition(lambda self: self.connected and self.held_refs)
    @rule(pick=st.integers(0, 50))
    def send_back(self, pick: int) -> None:
        ref = self.held_refs[pick % len(self.held_refs)]
        assert [self.call("is_mine", ref, index).unwrap() for index in range(3)].count(True) == 1

    @precondition(lambda self: self.held_refs)
    @rule(pick=st.integers(0, 50))
    def drop_ref(self, pick: int) -> None:
        del self.held_refs[pick % len(self.held_refs)]
        self.collect()

    @precondition(lambda self: self.connected)
    @rule(x=st.integers())
    def get_copy(self, x: int) -> None:
        first, second = self.call("point", x).unwrap()
        assert isinstance(first, PointCopy) and first is second and first.x == x

    @precondition(lambda self: self.connected)
    @rule(index=st.integers(0, 1))
    def get_cache(self, index: int) -> None:
        cache = self.call("gauge", index).unwrap()
        assert isinstance(cache, GaugeCache)
        self.held_caches.append((index, cache))

    @precondition(lambda self: self.connected)
    @rule(index=st.integers(0, 1), value=st.integers())
    def set_gauge(self, index: int, value: int) -> None:
        self.root.gauges[index].set(value)
        self.pump()

    @precondition(lambda self: self.held_caches)
    @rule(pick=st.integers(0, 50))
    def drop_cache(self, pick: int) -> None:
        del self.held_caches[pick % len(self.held_caches)]
        self.collect()

    @precondition(lambda self: self.connected)
    @rule()
    def give_helper_and_poke(self) -> None:
        helper = Helper()
        self.helpers.append(helper)
        self.call("keep", helper)
        before = [h.pokes for h in self.helpers]
        assert self.call("poke_all").unwrap() == len(self.root.kept)
        poked = [after - earlier for after, earlier in zip([h.pokes for h in self.helpers], before, strict=True)]
        assert sum(poked) == len(self.root.kept)

    @precondition(lambda self: self.connected)
    @rule()
    def server_lets_helpers_go(self) -> None:
        self.root.kept.clear()
        self.collect()
        assert list(self.pair.client.localObjects) == []

    @precondition(lambda self: self.connected)
    @rule(in_flight=st.integers(0, 3))
    def disconnect(self, in_flight: int) -> None:
        # Calls still unanswered when the connection drops (the invariants
        # pump after every step, so they must be made here).
        for index in range(in_flight):
            self.call("thing", index, wait=False)
        pending = list(self.unanswered.values())
        assert len(pending) == in_flight
        self.pair.disconnect(ConnectionResetError("dropped"))
        self.connected = False
        assert all(isinstance(call.error, PBConnectionLost) for call in pending)
        assert not self.unanswered
        for gauge in self.root.gauges:
            assert gauge.observers == [], "every observer stops when the connection drops"

    @precondition(lambda self: not self.connected)
    @rule()
    def reconnect(self) -> None:
        # What was held belongs to the dead connection: calling it is refused.
        for ref in self.held_refs:
            with pytest.raises(DeadReferenceError):
                ref.callRemote("n")
        self.held_refs.clear()
        self.held_caches.clear()
        self.root.kept.clear()
        gc.collect()
        self.pair = BrokerPair(self.root)
        self.connected = True

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def settled_at_most_once(self) -> None:
        assert all(count == 1 for count in self.settled.values())

    @invariant()
    def counts_match_what_is_held(self) -> None:
        if not self.connected:
            return
        self.collect()
        self.collect()
        assert not self.unanswered, "idle brokers, yet a call is unanswered"
        held = Counter(ref.luid for ref in self.held_refs)
        counted = {luid: local.refcount for luid, local in self.pair.server.localObjects.items() if luid != b"root"}
        assert counted == dict(held)
        caches = Counter(cache.luid for _, cache in self.held_caches)
        cached = {luid: local.refcount for luid, local in self.pair.server.remotelyCachedObjects.items()}
        assert cached == dict(caches)
        kept = Counter(ref.luid for ref in self.root.kept)
        assert {luid: local.refcount for luid, local in self.pair.client.localObjects.items()} == dict(kept)
        for index, cache in self.held_caches:
            assert cache.value == self.root.gauges[index].value

    @invariant()
    def every_observer_stops_once(self) -> None:
        for gauge in self.root.gauges:
            assert gauge.handed_out == len(gauge.observers) + len(gauge.stopped)
            assert len(set(map(id, gauge.stopped))) == len(gauge.stopped)

    def teardown(self) -> None:
        try:
            if self.connected:
                self.held_refs.clear()
                self.held_caches.clear()
                self.root.kept.clear()
                self.collect()
                self.collect()
                assert list(self.pair.server.localObjects) == [b"root"]
                assert self.pair.server.remotelyCachedObjects == {}
                assert self.pair.client.locallyCachedObjects == {}
                assert list(self.pair.client.localObjects) == []
                for gauge in self.root.gauges:
                    assert gauge.observers == []
        finally:
            flavors.copyTags.pop(COPY_TAG, None)
            flavors.copyTags.pop(CACHE_TAG, None)
            gc.unfreeze()


PairMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
TestPairMachine = PairMachine.TestCase
