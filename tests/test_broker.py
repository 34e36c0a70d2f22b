"""The Broker over an in-memory pair (pbcore.testing.BrokerPair): calls, flavors,
reference counting, connection loss, bad input and dialect negotiation.

Calls are answered synchronously by ``BrokerPair.pump``; crafted input is fed
straight to ``Broker.receive_data`` after a valid handshake.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pbcore.broker
from pbcore import jelly
from pbcore.banana import Decoder, Limits, decode, encode
from pbcore.broker import Broker, PendingCall
from pbcore.errors import (
    DeadReferenceError,
    Error,
    InsecureJelly,
    JellyError,
    NoSuchMethod,
    NotJellyable,
    PBConnectionLost,
    ProtocolError,
)
from pbcore.events import (
    AnswerReceived,
    CallReceived,
    ConnectionClosed,
    DecRefReceived,
    ErrorReceived,
    NotUnderstood,
    Ready,
)
from pbcore.flavors import (
    AsReferenceable,
    Cacheable,
    CopiedFailure,
    Copyable,
    Referenceable,
    RemoteCache,
    RemoteCopy,
    RemoteMethod,
    RemoteReference,
    Root,
    Viewable,
    setCopierForClass,
    setFactoryForClass,
)
from pbcore.serving import Dispatcher
from pbcore.testing import BrokerPair
from tests.strategies import same_structure, sexps, values

# -- the objects served ---------------------------------------------------------------


class Thing(Referenceable):
    """A Referenceable with a number, to tell references apart by calling them."""

    def __init__(self, n: int = 0) -> None:
        self.n = n

    def remote_n(self) -> int:
        return self.n

    def remote_viewable(self) -> Viewer:
        return Viewer()


class Viewer(Viewable):
    """Calls through its ViewPoint run view_* with the perspective first."""

    def view_who(self, perspective: Any, suffix: str = "") -> str:
        return f"{getattr(perspective, 'name', perspective)}{suffix}"


class Perspective:
    def __init__(self, name: str) -> None:
        self.name = name


class Point(Copyable, RemoteCopy):
    """Both ends of a copy: sent by state, and the class its copies are built as."""

    def __init__(self, value: Any = None) -> None:
        self.value = value


class Secret(Copyable):
    """A Copyable whose state and copy tag depend on the perspective it is sent to."""

    def __init__(self, public: int, private: int) -> None:
        self.public = public
        self.private = private

    def getStateToCopyFor(self, perspective: Any) -> Any:
        state: dict[str, Any] = {"public": self.public}
        if perspective is not None:
            state["private"] = self.private
            state["for"] = perspective.name
        return state

    def getTypeToCopyFor(self, perspective: Any) -> bytes:
        return b"test.secret.full" if perspective is not None else b"test.secret.public"


class SecretCopy(RemoteCopy):
    pass


class PublicCopy(RemoteCopy):
    pass


class Unregistered(Copyable):
    """A Copyable nobody registered a RemoteCopy for: the peer refuses it."""

    def __init__(self) -> None:
        self.x = 1


class Built:
    """What a factory registered with setFactoryForClass builds."""

    def __init__(self, state: Any) -> None:
        self.state = state


class Made(Copyable):
    def __init__(self, a: int) -> None:
        self.a = a


class Server(Root):
    def __init__(self) -> None:
        self.recorded: list[Any] = []
        self.kept: list[Any] = []
        self.thing = Thing(1)
        self.stored: Any = None

    def remote_echo(self, *args: Any, **kw: Any) -> Any:
        return [list(args), kw]

    def remote_same(self, value: Any) -> Any:
        return value

    def remote_named(self, name: str) -> str:
        return name

    def remote_fail(self) -> None:
        raise ValueError("nope")

    def remote_known(self) -> None:
        raise Error("known trouble")

    def remote_record(self, value: Any) -> None:
        self.recorded.append(value)

    async def remote_coro(self, x: int) -> int:
        return x + 1

    def remote_thing(self) -> Thing:
        return self.thing

    def remote_new_thing(self, n: int) -> Thing:
        return Thing(n)

    def remote_things(self, n: int) -> list[Thing]:
        return [Thing(i) for i in range(n)]

    def remote_twice(self) -> list[Thing]:
        return [self.thing, self.thing]

    def remote_is_thing(self, value: Any) -> bool:
        return value is self.thing

    def remote_is_root(self, value: Any) -> bool:
        return value is self

    def remote_keep(self, value: Any) -> None:
        self.kept.append(value)

    def remote_viewable(self) -> Viewer:
        return Viewer()

    def remote_point(self, value: Any) -> Point:
        return Point(value)

    def remote_get(self) -> Any:
        return self.stored

    def remote_secret(self) -> Secret:
        return Secret(1, 2)

    def remote_made(self) -> Made:
        return Made(7)


# -- helpers ------------------------------------------------------------------------------


def call(pair: BrokerPair, ref: RemoteReference, name: str | bytes, /, *args: Any, **kw: Any) -> PendingCall:
    pending = ref.callRemote(name, *args, **kw)
    assert isinstance(pending, PendingCall)
    pair.pump()
    assert pending.done, f"{name!r} was not answered"
    return pending


def result(pair: BrokerPair, ref: RemoteReference, name: str | bytes, /, *args: Any, **kw: Any) -> Any:
    return call(pair, ref, name, *args, **kw).unwrap()


def failure(pair: BrokerPair, ref: RemoteReference, name: str, *args: Any) -> CopiedFailure:
    error = call(pair, ref, name, *args).error
    assert isinstance(error, CopiedFailure), repr(error)
    return error


def served(**options: Any) -> tuple[BrokerPair, Server, RemoteReference]:
    server = Server()
    pair = BrokerPair(server, **options)
    return pair, server, pair.client.root()


def release(*pairs: BrokerPair) -> None:
    """Forget the logged events (they keep values alive), collect, and let decrefs flow."""
    for pair in pairs:
        pair.client_events.clear()
        pair.server_events.clear()
    gc.collect()
    for pair in pairs:
        pair.pump()


def others(broker: Broker) -> dict[Any, Any]:
    """The broker's local objects other than the root."""
    return {luid: local for luid, local in broker.localObjects.items() if luid != b"root"}


@contextlib.contextmanager
def saved_registries() -> Iterator[None]:
    """Restore the copy-tag registries and the allowed types afterwards."""
    registry = dict(jelly.unjellyableRegistry)
    factories = dict(jelly.unjellyableFactoryRegistry)
    allowed = dict(jelly.globalSecurity.allowedTypes)
    try:
        yield
    finally:
        jelly.unjellyableRegistry.clear()
        jelly.unjellyableRegistry.update(registry)
        jelly.unjellyableFactoryRegistry.clear()
        jelly.unjellyableFactoryRegistry.update(factories)
        jelly.globalSecurity.allowedTypes.clear()
        jelly.globalSecurity.allowedTypes.update(allowed)


@pytest.fixture(autouse=True, scope="module")
def point_registered() -> Iterator[None]:
    with saved_registries():
        setCopierForClass(Point, Point)
        yield


# -- 1. calls -----------------------------------------------------------------------------

kwarg_names = st.text(min_size=1, max_size=8).filter(lambda name: name not in ("pbanswer", "_name"))


@given(args=st.lists(values(), max_size=3), kwargs=st.dictionaries(kwarg_names, values(), max_size=3))
def test_args_and_kwargs_of_every_jelly_type(args: list[Any], kwargs: dict[str, Any]) -> None:
    pair, _, root = served()
    got_args, got_kwargs = result(pair, root, "echo", *args, **kwargs)
    assert same_structure(got_args, list(args))
    assert same_structure(got_kwargs, kwargs)


def test_the_handshake_makes_both_sides_ready() -> None:
    pair = BrokerPair(Server())
    assert pair.client.ready and pair.server.ready
    assert pair.client.dialect == pair.server.dialect == b"pb"
    assert Ready(b"pb") in pair.client_events and Ready(b"pb") in pair.server_events


def test_missing_method_is_a_no_such_method_answer() -> None:
    pair, _, root = served()
    error = failure(pair, root, "missing")
    assert error.check(NoSuchMethod) is NoSuchMethod
    assert "remote_missing" in error.value
    assert result(pair, root, "named", "alive") == "alive"


def test_a_raised_exception_arrives_as_a_copied_failure() -> None:
    pair, _, root = served()
    error = failure(pair, root, "fail")
    assert error.type == "builtins.ValueError"
    assert error.value == "nope"
    assert error.check(ValueError) is ValueError
    assert error.check(KeyError) is None
    assert "remote_fail" not in error.traceback  # tracebacks are not sent by default
    with pytest.raises(CopiedFailure):
        error.trap(KeyError)


def test_a_raised_pb_error_matches_error() -> None:
    pair, _, root = served()
    error = failure(pair, root, "known")
    assert error.check(Error) is Error
    assert error.value == "known trouble"


def test_tracebacks_travel_only_with_unsafe_tracebacks() -> None:
    pair, _, root = served(unsafe_tracebacks=True)
    error = failure(pair, root, "fail")
    assert "remote_fail" in error.traceback
    assert "ValueError: nope" in error.traceback
    safe_pair, _, safe_root = served()
    assert "remote_fail" not in failure(safe_pair, safe_root, "fail").traceback


def test_call_to_an_unknown_object_id_is_an_error_answer() -> None:
    pair, _, root = served()
    ghost = RemoteReference(None, pair.client, 999, False)
    error = failure(pair, ghost, "n")
    assert error.check(Error) is Error
    assert error.value == "Invalid Object ID"
    assert not pair.server.closed
    assert result(pair, root, "named", "alive") == "alive"


def test_arguments_that_cannot_be_unjellied_are_an_error_answer() -> None:
    pair, _, root = served()
    error = failure(pair, root, "same", Unregistered())
    assert error.check(InsecureJelly) is InsecureJelly
    assert not pair.server.closed and not pair.client.closed
    assert result(pair, root, "named", "alive") == "alive"


@pytest.mark.parametrize("settled_events", [True, False])
def test_settled_events_can_be_left_out_and_the_calls_still_settle(settled_events: bool) -> None:
    pair, _server, root = served(settled_events=settled_events)
    assert result(pair, root, "named", "alive") == "alive"
    assert isinstance(call(pair, root, "fail").error, CopiedFailure)
    kinds = [type(event) for event in pair.client_events]
    assert (AnswerReceived in kinds and ErrorReceived in kinds) is settled_events
    assert (AnswerReceived in kinds or ErrorReceived in kinds) is settled_events
    assert CallReceived in [type(event) for event in pair.server_events]  # calls are never left out


def test_one_way_calls_return_none_and_run() -> None:
    pair, server, root = served()
    assert root.callRemote("record", 5, pbanswer=False) is None
    assert root.callRemote("fail", pbanswer=False) is None  # no error answer either
    pair.pump()
    assert server.recorded == [5]
    assert not any(isinstance(event, AnswerReceived) for event in pair.client_events)
    assert pair.client.data_to_send() == b"" and pair.server.data_to_send() == b""
    # The request ids used by one-way calls are never answered, and nothing waits for them.
    assert result(pair, root, "named", "alive") == "alive"


def test_call_remote_passes_name_as_a_keyword() -> None:
    pair, _, root = served()
    assert result(pair, root, "named", name="x") == "x"
    assert result(pair, root, b"named", "y") == "y"


def test_remote_method() -> None:
    pair, _, root = served()
    echo = root.remoteMethod("echo")
    assert isinstance(echo, RemoteMethod)
    pending = echo(1, k=2)
    pair.pump()
    assert pending.unwrap() == [[1], {"k": 2}]
    assert RemoteMethod(root, "echo") == echo
    assert hash(RemoteMethod(pair.client.root(), "echo")) == hash(echo)
    assert RemoteMethod(root, "same") != echo


def test_a_coroutine_method_that_does_not_suspend_is_answered() -> None:
    pair, _, root = served()
    assert result(pair, root, "coro", 41) == 42


# -- 2. flavors ---------------------------------------------------------------------------


def test_root_is_reached_and_sent_back_as_itself() -> None:
    pair, _, root = served()
    assert root.luid == b"root" and not root.doRefCount
    assert result(pair, root, "is_root", root) is True
    assert others(pair.server) == {}


def test_per_connection_roots() -> None:
    class PerConnection:
        def rootObject(self, broker: Any) -> Server:
            return Server()

    factory = PerConnection()
    first, second = BrokerPair(factory), BrokerPair(factory)
    first_root = first.server.localObjectForID(b"root")
    assert isinstance(first_root, Server)
    assert first_root is not second.server.localObjectForID(b"root")
    assert result(first, first.client.root(), "named", "one") == "one"


def test_a_returned_referenceable_is_a_remote_reference() -> None:
    pair, _, root = served()
    thing = result(pair, root, "new_thing", 7)
    assert isinstance(thing, RemoteReference)
    assert thing.broker is pair.client
    assert result(pair, thing, "n") == 7
    assert len(others(pair.server)) == 1


def test_a_reference_passed_back_is_the_original_object() -> None:
    pair, _, root = served()
    thing = result(pair, root, "thing")
    assert result(pair, root, "is_thing", thing) is True
    assert result(pair, root, "is_thing", [thing][0]) is True
    assert result(pair, root, "same", thing) == thing


def test_a_referenceable_passed_as_an_argument() -> None:
    pair, server, root = served()
    mine = Thing(5)
    assert result(pair, root, "keep", mine) is None
    (theirs,) = server.kept
    assert isinstance(theirs, RemoteReference) and theirs.broker is pair.server
    pending = theirs.callRemote("n")
    pair.pump()
    assert pending.unwrap() == 5
    assert result(pair, root, "same", mine) is mine  # back home as itself
    assert pair.client.localObjectForID(theirs.luid) is mine


def test_equality_and_hash_of_remote_references() -> None:
    pair, _, root = served()
    first = result(pair, root, "thing")
    second = result(pair, root, "thing")
    assert first is not second
    assert first == second and hash(first) == hash(second)
    assert len({first, second}) == 1
    other = result(pair, root, "new_thing", 2)
    assert other != first
    elsewhere, _, elsewhere_root = served()
    foreign = result(elsewhere, elsewhere_root, "thing")
    assert foreign.luid == first.luid and foreign != first  # same id, another connection


def test_the_same_referenceable_twice_in_one_answer() -> None:
    pair, server, root = served()
    first, second = result(pair, root, "twice")
    assert isinstance(first, RemoteReference) and isinstance(second, RemoteReference)
    assert first is not second and first == second
    (local,) = others(pair.server).values()
    assert local.object is server.thing and local.refcount == 2


def test_viewable_calls_run_view_methods_with_the_perspective() -> None:
    pair, server, root = served()
    server.perspective = Perspective("alice")
    view = result(pair, root, "viewable")
    assert isinstance(view, RemoteReference)
    assert result(pair, view, "who", "!") == "alice!"
    assert failure(pair, view, "missing").check(NoSuchMethod) is NoSuchMethod
    # From an object with another perspective, the same kind of object answers for it.
    thing = Thing()
    thing.perspective = Perspective("bob")
    server.thing = thing
    bob_thing = result(pair, root, "thing")
    bob_view = result(pair, bob_thing, "viewable")
    assert result(pair, bob_view, "who") == "bob"


def test_viewable_without_a_perspective() -> None:
    pair, _, root = served()
    view = result(pair, root, "viewable")
    assert result(pair, view, "who") == "None"


def test_copyable_with_a_registered_remote_copy() -> None:
    pair, _, root = served()
    point = result(pair, root, "point", {"x": 1, "y": [2.5, "three"]})
    assert type(point) is Point
    assert point.value == {"x": 1, "y": [2.5, "three"]}
    # and the other way: a Point passed as an argument arrives as a copy.
    back = result(pair, root, "same", Point((1, 2)))
    assert type(back) is Point and back.value == (1, 2)


def test_copyable_with_a_factory() -> None:
    pair, _, root = served()
    with saved_registries():
        setFactoryForClass(Made, Built)
        made = result(pair, root, "made")
    assert isinstance(made, Built)
    assert made.state == {"a": 7}
    # Once the registration is gone, the copy is refused: the answer cannot be unjellied.
    assert isinstance(call(pair, root, "made").error, InsecureJelly)
    assert not pair.client.closed


def test_copy_state_and_tag_depend_on_the_perspective() -> None:
    pair, server, root = served()
    with saved_registries():
        setCopierForClass(b"test.secret.full", SecretCopy)
        setCopierForClass(b"test.secret.public", PublicCopy)
        public = result(pair, root, "secret")
        server.perspective = Perspective("carol")
        full = result(pair, root, "secret")
    assert type(public) is PublicCopy and public.__dict__ == {"public": 1}
    assert type(full) is SecretCopy and full.__dict__ == {"public": 1, "private": 2, "for": "carol"}


def test_copies_nested_in_containers_and_shared() -> None:
    pair, _, root = served()
    shared = Point("s")
    got = result(pair, root, "same", [shared, (shared, {"k": shared}), {"n": [Point(1)]}])
    first, (second, mapping), inner = got
    assert type(first) is Point and first.value == "s"
    assert first is second is mapping["k"]  # one object, as it was sent
    assert type(inner["n"][0]) is Point and inner["n"][0] is not first


class Slot:
    """Where a Thing or a Point goes in a generated skeleton (filled in after drawing)."""

    def __init__(self, kind: str, index: int) -> None:
        self.kind = kind
        self.index = index


class Plain:
    """A plain value in a generated skeleton (not walked when filling in)."""

    def __init__(self, value: Any) -> None:
        self.value = value


# Built once: a strategy made inside a composite on every draw is slow.
plain_values = values()
skeletons = st.recursive(
    plain_values.map(Plain) | st.builds(Slot, st.sampled_from(["thing", "point"]), st.integers(0, 2)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=4),
    ),
    max_leaves=12,
)


def fill(skeleton: Any, things: list[Thing], points: list[Point]) -> Any:
    if isinstance(skeleton, Plain):
        return skeleton.value
    if isinstance(skeleton, Slot):
        pool: list[Any] = things if skeleton.kind == "thing" else points
        return pool[skeleton.index % len(pool)]
    if isinstance(skeleton, dict):
        return {key: fill(value, things, points) for key, value in skeleton.items()}
    items = [fill(item, things, points) for item in skeleton]
    return tuple(items) if isinstance(skeleton, tuple) else items


@st.composite
def flavored(draw: st.DrawFn) -> tuple[Any, list[Thing], list[Point]]:
    """Plain values mixed with Referenceables and Copyables, some of them repeated."""
    things = [Thing(n) for n in range(draw(st.integers(1, 3)))]
    points = [Point(value) for value in draw(st.lists(plain_values, min_size=1, max_size=3))]
    structure = fill(draw(skeletons), things, points)
    if draw(st.booleans()):
        cycle: list[Any] = [structure, draw(st.sampled_from(things + points))]
        cycle.append(cycle)
        structure = cycle
    return structure, things, points


@contextlib.contextmanager
def young_objects_only() -> Iterator[None]:
    """Make gc.collect() in the block look only at objects made in it: a full
    collection of the test process's heap is too slow to run for every example."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def same_flavored(sent: Any, got: Any, same_reference: Callable[[Thing, Any], bool]) -> bool:
    """Like tests.strategies.same_structure, with Points tracked by identity (and compared
    by state) and Things compared by *same_reference*."""
    pairs: dict[int, int] = {}
    reverse: dict[int, int] = {}
    keep: list[Any] = []

    def walk(a: Any, b: Any) -> bool:
        if isinstance(a, Thing):
            return same_reference(a, b)
        if type(a) is not type(b):
            return False
        if isinstance(a, float):
            return math.copysign(1, a) == math.copysign(1, b) and (a == b or (math.isnan(a) and math.isnan(b)))
        if not isinstance(a, (list, tuple, dict, set, frozenset, Point)):
            return bool(a == b)
        if id(a) in pairs or id(b) in reverse:
            return pairs.get(id(a)) == id(b) and reverse.get(id(b)) == id(a)
        pairs[id(a)] = id(b)
        reverse[id(b)] = id(a)
        keep.extend((a, b))
        if isinstance(a, Point):
            return walk(a.value, b.value)
        if len(a) != len(b):
            return False
        if isinstance(a, (list, tuple)):
            return all(walk(x, y) for x, y in zip(a, b, strict=True))
        if isinstance(a, dict):
            return all(key in b and walk(value, b[key]) for key, value in a.items())
        return bool(a == b)

    return walk(sent, got)


@given(flavored())
def test_flavored_structures_sent_and_returned(case: tuple[Any, list[Thing], list[Point]]) -> None:
    """Client -> server -> client: references come home as the originals, copies as copies."""
    structure, _, _ = case
    with young_objects_only():
        pair, _, root = served()
        pending = call(pair, root, "same", structure)
        assert same_flavored(structure, pending.unwrap(), lambda sent, got: got is sent)
        # The server dropped the references it was lent: the client holds nothing for it.
        del pending
        release(pair)
        assert pair.client.localObjects == {}


@given(flavored())
def test_flavored_structures_returned_by_the_server(case: tuple[Any, list[Thing], list[Point]]) -> None:
    """Server -> client: references to the same object are equal, and each counts once."""
    structure, things, _ = case
    pair, server, root = served()
    server.stored = structure

    def check() -> None:
        # In a function, so that every reference the client got is gone when it returns.
        pending = call(pair, root, "get")
        seen: list[tuple[Thing, Any]] = []

        def same_reference(sent: Thing, got: Any) -> bool:
            seen.append((sent, got))
            return isinstance(got, RemoteReference) and got.broker is pair.client

        assert same_flavored(structure, pending.unwrap(), same_reference)
        for sent, got in seen:
            assert all((got == other) == (sent is other_sent) for other_sent, other in seen)
        calls = [(sent, got.callRemote("n")) for sent, got in seen]
        pair.pump()
        assert all(pending_n.unwrap() == sent.n for sent, pending_n in calls)
        counts = {id(local.object): local.refcount for local in others(pair.server).values()}
        for thing in things:
            assert counts.get(id(thing), 0) == sum(1 for sent, _ in seen if sent is thing)

    with young_objects_only():
        check()
        release(pair)
        assert others(pair.server) == {}


# -- 3. reference counting ------------------------------------------------------------


def test_dropping_every_reference_returns_the_server_to_its_baseline() -> None:
    pair, server, root = served()
    baseline = dict(pair.server.localObjects)
    assert list(baseline) == [b"root"]
    server.perspective = Perspective("p")
    held = [
        result(pair, root, "thing"),
        result(pair, root, "thing"),
        result(pair, root, "things", 3),
        result(pair, root, "twice"),
        result(pair, root, "viewable"),
        result(pair, root, "same", {"nested": [result(pair, root, "new_thing", 9)]}),
    ]
    assert len(others(pair.server)) == 1 + 3 + 1 + 1
    release(pair)
    assert len(others(pair.server)) == 6  # still held
    del held
    release(pair)
    assert pair.server.localObjects == baseline
    assert sum(isinstance(event, DecRefReceived) and event.freed for event in pair.server_events) == 6


def test_a_referenceable_sent_twice_needs_two_decrefs() -> None:
    pair, _, root = served()
    first = result(pair, root, "thing")
    second = result(pair, root, "thing")
    ((luid, local),) = others(pair.server).items()
    assert local.refcount == 2
    del first
    release(pair)
    assert others(pair.server) == {luid: local} and local.refcount == 1
    assert pair.server_events == [DecRefReceived(luid, False)]
    del second
    release(pair)
    assert others(pair.server) == {}
    assert pair.server_events == [DecRefReceived(luid, True)]


def test_the_root_reference_is_not_counted() -> None:
    pair, _, root = served()
    another = pair.client.root()
    del another
    release(pair)
    assert pair.client.data_to_send() == b""
    assert list(pair.server.localObjects) == [b"root"]
    assert result(pair, root, "named", "alive") == "alive"


@pytest.fixture
def few_refs(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(pbcore.broker, "MAX_BROKER_REFS", 5)
    return 5


def test_max_broker_refs_is_an_error_answer(few_refs: int) -> None:
    pair, _, root = served()
    error = failure(pair, root, "things", few_refs + 3)
    assert error.check(Error) is Error
    assert not pair.server.closed
    assert result(pair, root, "named", "alive") == "alive"


def test_max_broker_refs_violations_close_the_server(few_refs: int) -> None:
    pair, _, root = served()
    closed: list[bool] = []
    pair.server.notifyOnDisconnect(lambda: closed.append(True))
    errors = []
    for _ in range(4):
        pending = root.callRemote("things", few_refs + 3)
        with contextlib.suppress(Error):
            pair.pump()
        errors.append(pending.error)
    assert pair.server.closed
    assert isinstance(pair.server.close_reason, Error)
    assert closed == [True]
    # Until the fourth violation the connection lived, and each violation was answered.
    assert all(isinstance(error, CopiedFailure) and error.check(Error) for error in errors[:3]), errors


def test_max_broker_refs_violations_close_the_broker_directly(few_refs: int) -> None:
    """The same, through the broker's own API (what an adapter calls)."""
    pair, _, _ = served()
    server = pair.server
    waiting = server.root().callRemote("anything")
    baseline = dict(server.localObjects)
    for attempt in range(3):
        # The answer cannot be sent: the caller gets an error answer instead.
        error = server.send_answer(attempt + 1, [Thing() for _ in range(few_refs + 2)])
        assert isinstance(error, Error) and "Maximum PB reference count" in str(error)
        assert not server.closed
        assert server.localObjects == baseline  # the counts taken for the unsent answer were undone
        assert b"Maximum PB reference count" in server.data_to_send()
    error = server.send_answer(4, [Thing() for _ in range(few_refs + 2)])
    assert isinstance(error, Error) and "Goodbye" in str(error)
    assert server.closed
    assert isinstance(waiting.error, PBConnectionLost)
    assert [type(event) for event in server.events()] == [ConnectionClosed]


# -- 4. connection loss ------------------------------------------------------------------


def test_pending_calls_fail_with_connection_lost() -> None:
    pair, _, root = served()
    first = root.callRemote("named", "x")
    second = root.callRemote("echo")
    pair.disconnect(ConnectionResetError("gone"))
    assert isinstance(first.error, PBConnectionLost)
    assert isinstance(second.error, PBConnectionLost)
    assert ConnectionClosed(pair.client.close_reason) in pair.client_events
    assert isinstance(pair.client.close_reason, ConnectionResetError)


def test_disconnect_notifiers_run_exactly_once() -> None:
    pair, _, root = served()
    thing = result(pair, root, "thing")
    runs: list[Any] = []
    pair.client.notifyOnDisconnect(lambda: runs.append("broker"))
    thing.notifyOnDisconnect(lambda ref: runs.append(("ref", ref)))
    root.notifyOnDisconnect(lambda ref: runs.append(("root", ref)))
    pair.disconnect()
    pair.disconnect()
    pair.client.connection_lost(ConnectionResetError())
    assert sorted(runs, key=repr) == sorted(["broker", ("ref", thing), ("root", root)], key=repr)
    closings = [event for event in pair.client_events + pair.client.events() if isinstance(event, ConnectionClosed)]
    assert closings == [ConnectionClosed(None)]


def test_dont_notify_on_disconnect() -> None:
    pair, _, root = served()
    thing = result(pair, root, "thing")
    runs: list[str] = []

    def on_broker() -> None:
        runs.append("broker")

    def on_ref(ref: RemoteReference) -> None:
        runs.append("ref")

    def on_ref_kept(ref: RemoteReference) -> None:
        runs.append("ref kept")

    pair.client.notifyOnDisconnect(on_broker)
    pair.client.dontNotifyOnDisconnect(on_broker)
    pair.client.dontNotifyOnDisconnect(on_broker)  # not registered: no error
    thing.notifyOnDisconnect(on_ref)
    thing.notifyOnDisconnect(on_ref_kept)
    thing.dontNotifyOnDisconnect(on_ref)
    root.notifyOnDisconnect(on_ref)
    root.dontNotifyOnDisconnect(on_ref)
    pair.disconnect()
    assert runs == ["ref kept"]


def test_notify_on_connect() -> None:
    pair = BrokerPair(Server(), handshake=False)
    runs: list[str] = []
    pair.client.notifyOnConnect(lambda: runs.append("before"))
    assert runs == []
    pair.pump()
    assert runs == ["before"]
    pair.client.notifyOnConnect(lambda: runs.append("after"))
    assert runs == ["before", "after"]  # at once, once ready


def test_notify_on_fail() -> None:
    early = BrokerPair(Server(), handshake=False)
    failed: list[str] = []
    early.client.notifyOnFail(lambda: failed.append("early"))
    early.disconnect()
    late = BrokerPair(Server())
    late.client.notifyOnFail(lambda: failed.append("late"))
    late.disconnect()
    assert failed == ["early"]


def test_call_remote_after_loss_raises_dead_reference() -> None:
    pair, _, root = served()
    thing = result(pair, root, "thing")
    pair.disconnect()
    with pytest.raises(DeadReferenceError):
        root.callRemote("named", "x")
    with pytest.raises(DeadReferenceError):
        thing.callRemote("n")
    with pytest.raises(DeadReferenceError):
        thing.callRemote("n", pbanswer=False)


def test_receive_data_after_close_is_ignored() -> None:
    pair, _, _ = served()
    pair.disconnect()
    pair.server.events()
    pair.server.receive_data(b"\xff\xff garbage that is not banana")
    pair.server.receive_data(encode([b"message", 1, b"root", b"named", 1, [b"tuple"], [b"dictionary"]]))
    assert pair.server.events() == []
    assert pair.server.data_to_send() == b""


def test_decrefs_after_close_are_dropped() -> None:
    pair, _, root = served()
    thing = result(pair, root, "thing")
    pair.disconnect()
    del thing
    release(pair)
    assert pair.client.data_to_send() == b""


# -- 5. bad input -------------------------------------------------------------------------


def feed(broker: Broker, *sexps: Any) -> None:
    assert broker.dialect is not None
    broker.receive_data(b"".join(encode(sexp, broker.dialect) for sexp in sexps))


def replies(broker: Broker) -> list[Any]:
    assert broker.dialect is not None
    return decode(broker.data_to_send(), broker.dialect)


NO_ARGS: list[Any] = [[b"tuple"], [b"dictionary"]]

PROTOCOL_ERRORS = [
    pytest.param(5, id="int"),
    pytest.param(b"message", id="bytes"),
    pytest.param(2.5, id="float"),
    pytest.param([], id="empty-list"),
    pytest.param([1, 2], id="int-command"),
    pytest.param([[b"message"], 1], id="list-command"),
    pytest.param([b"message", 1, b"root", b"echo", 1, [b"tuple"]], id="message-too-short"),
    pytest.param([b"message", 1, b"root", b"echo", 1, *NO_ARGS, 0], id="message-too-long"),
    pytest.param([b"message", b"1", b"root", b"echo", 1, *NO_ARGS], id="message-request-id-bytes"),
    pytest.param([b"message", 1, b"root", 5, 1, *NO_ARGS], id="message-name-int"),
    pytest.param([b"message", 1, b"root", [b"echo"], 1, *NO_ARGS], id="message-name-list"),
    pytest.param([b"message", 1, b"root", b"echo", b"yes", *NO_ARGS], id="message-answer-flag-bytes"),
    pytest.param([b"message", 1, b"root", b"\xff\xfe", 1, *NO_ARGS], id="message-name-not-utf8"),
    pytest.param([b"answer", 1], id="answer-too-short"),
    pytest.param([b"answer", 1, 2, 3], id="answer-too-long"),
    pytest.param([b"answer", 99, 1], id="answer-never-sent"),
    pytest.param([b"answer", 0, 1], id="answer-zero"),
    pytest.param([b"answer", -1, 1], id="answer-negative"),
    pytest.param([b"answer", b"1", 1], id="answer-id-bytes"),
    pytest.param([b"error", 99, [b"None"]], id="error-never-sent"),
    pytest.param([b"error", [b"list"], [b"None"]], id="error-id-list"),
    pytest.param([b"error", 1], id="error-too-short"),
    pytest.param([b"decref", 12345], id="decref-unknown"),
    pytest.param([b"decref", b"nope"], id="decref-bytes"),
    pytest.param([b"decref", [b"list"]], id="decref-list"),
    pytest.param([b"decref"], id="decref-too-short"),
    pytest.param([b"version", 5], id="version-5"),
    pytest.param([b"version", 7], id="version-7"),
    pytest.param([b"version", b"6"], id="version-bytes"),
    pytest.param([b"version"], id="version-too-short"),
    pytest.param([b"decache", 1], id="decache"),
    pytest.param([b"uncache", 1], id="uncache"),
    pytest.param([b"didNotUnderstand"], id="did-not-understand-too-short"),
]


@pytest.mark.parametrize("sexp", PROTOCOL_ERRORS)
def test_bad_messages_are_protocol_errors_that_close_only_this_connection(sexp: Any) -> None:
    pair = BrokerPair(Server(), Server(), handshake=True)
    bystander, _, bystander_root = served()
    waiting = pair.server.root().callRemote("named", "x")  # the server waits for an answer
    pair.server.data_to_send()
    notified: list[str] = []
    pair.server.notifyOnDisconnect(lambda: notified.append("lost"))
    with pytest.raises(ProtocolError) as raised:
        feed(pair.server, sexp)
    assert pair.server.closed
    assert pair.server.close_reason is raised.value
    assert isinstance(waiting.error, PBConnectionLost)
    assert pair.server.events()[-1:] == [ConnectionClosed(raised.value)]
    assert notified == ["lost"]
    assert str(raised.value)  # it says what was wrong
    # Nothing more is read on this connection, and the other one is untouched.
    pair.server.receive_data(encode([b"version", 6]))
    assert pair.server.events() == []
    assert not bystander.server.closed
    assert result(bystander, bystander_root, "named", "alive") == "alive"


def test_a_protocol_error_in_the_middle_of_a_chunk_stops_reading() -> None:
    pair, _, _ = served()
    data = b"".join(
        [
            encode([b"message", 1, b"root", b"record", 0, [b"tuple", 1], [b"dictionary"]]),
            encode([b"decref", 4242]),
            encode([b"message", 2, b"root", b"record", 0, [b"tuple", 2], [b"dictionary"]]),
        ]
    )
    with pytest.raises(ProtocolError):
        pair.server.receive_data(data)
    calls = [event for event in pair.server.events() if isinstance(event, CallReceived)]
    assert [event.args for event in calls] == [(1,)]


def test_banana_garbage_is_a_protocol_error() -> None:
    pair, _, _ = served()
    with pytest.raises(ProtocolError):
        pair.server.receive_data(b"\x01\xff")
    assert pair.server.closed
    pair.server.receive_data(b"\x01\xff")  # ignored from now on, not raised again
    assert pair.server.events()[-1:] == [ConnectionClosed(pair.server.close_reason)]
    assert pair.server.events() == []


def test_an_unknown_command_is_not_understood_and_the_connection_lives() -> None:
    pair, _, root = served()
    feed(pair.server, [b"bogus", 1, 2])
    assert replies(pair.server) == [[b"didNotUnderstand", b"bogus"]]
    assert not pair.server.closed
    assert result(pair, root, "named", "alive") == "alive"
    # The other side reports a didNotUnderstand it receives.
    feed(pair.client, [b"didNotUnderstand", b"bogus"])
    assert pair.client.events() == [NotUnderstood(b"bogus")]


def crafted_call(pair: BrokerPair, *message: Any) -> PendingCall:
    """Send the server a crafted [message, 1, ...] in place of the client's first call;
    the client's pending call 1 receives whatever the server answers."""
    pending = pair.client.root().callRemote("never_sent")
    assert isinstance(pending, PendingCall)
    assert pair.client.data_to_send()  # dropped: the crafted message goes instead
    feed(pair.server, [b"message", 1, *message])
    pair.pump()
    return pending


ERROR_ANSWERS = [
    pytest.param([b"root", b"echo", 1, [b"tuple", [b"remote", b"x"]], [b"dictionary"]], JellyError, id="remote-bytes"),
    pytest.param([b"root", b"echo", 1, [b"tuple", [b"remote"]], [b"dictionary"]], JellyError, id="remote-short"),
    pytest.param(
        [b"root", b"echo", 1, [b"tuple", [b"local", [b"list"]]], [b"dictionary"]], JellyError, id="local-list"
    ),
    pytest.param([b"root", b"echo", 1, [b"tuple", [b"nonsense", 1]], [b"dictionary"]], JellyError, id="bad-form"),
    pytest.param([b"root", b"echo", 1, [b"tuple", [b"module", b"os"]], [b"dictionary"]], InsecureJelly, id="module"),
    pytest.param([b"root", b"echo", 1, 5, [b"dictionary"]], JellyError, id="args-int"),
    pytest.param([b"root", b"echo", 1, [b"tuple"], [b"list"]], JellyError, id="kwargs-list"),
    pytest.param([b"root", b"echo", 1, [b"tuple"], [b"dictionary", [1, 2]]], JellyError, id="kwargs-int-key"),
    pytest.param([b"root", b"echo", 1, [b"tuple"], [b"dictionary", [b"\xff", 2]]], JellyError, id="kwargs-bad-utf8"),
    pytest.param([999, b"echo", 1, *NO_ARGS], Error, id="unknown-object"),
    pytest.param([b"nope", b"echo", 1, *NO_ARGS], Error, id="unknown-name"),
    pytest.param([[b"list"], b"echo", 1, *NO_ARGS], Error, id="object-id-list"),
    pytest.param([b"root", b"missing", 1, *NO_ARGS], NoSuchMethod, id="missing-method"),
]


@pytest.mark.parametrize(("message", "expected"), ERROR_ANSWERS)
def test_bad_calls_are_error_answers_and_the_connection_lives(message: list[Any], expected: type) -> None:
    pair, _, root = served()
    pending = crafted_call(pair, *message)
    assert isinstance(pending.error, CopiedFailure), repr(pending.error)
    assert pending.error.check(expected) is expected, pending.error
    assert not pair.server.closed and not pair.client.closed
    assert result(pair, root, "named", "alive") == "alive"


def test_a_bad_one_way_call_is_dropped_quietly() -> None:
    pair, server, _ = served()
    feed(pair.server, [b"message", 1, 999, b"n", 0, *NO_ARGS])
    feed(pair.server, [b"message", 2, b"root", b"record", 0, [b"tuple", [b"remote", b"x"]], [b"dictionary"]])
    assert pair.server.data_to_send() == b""
    assert not pair.server.closed
    assert server.recorded == []


def test_a_cache_message_for_an_unknown_cache_is_an_error_answer() -> None:
    pair, _, root = served()
    reserved = pair.client.root().callRemote("never_sent")
    assert isinstance(reserved, PendingCall)
    pair.client.data_to_send()
    feed(pair.server, [b"cachemessage", 1, 77, b"x", 1, *NO_ARGS])
    pair.pump()
    assert isinstance(reserved.error, CopiedFailure)
    assert reserved.error.check(Error) is Error
    assert not pair.server.closed
    assert result(pair, root, "named", "alive") == "alive"


def test_a_decref_of_the_root_is_ignored() -> None:
    pair, _, root = served()
    feed(pair.server, [b"decref", b"root"])
    assert list(pair.server.localObjects) == [b"root"]
    assert result(pair, root, "named", "alive") == "alive"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param([b"remote", b"x"], id="remote-bytes"),
        pytest.param([b"list", [b"remote", 1.5]], id="remote-float"),
        pytest.param([b"local", [b"list"]], id="local-list"),
        pytest.param([b"module", b"os"], id="module"),
    ],
)
def test_an_answer_that_cannot_be_unjellied_fails_the_call(answer: Any) -> None:
    pair, _, root = served()
    pending = root.callRemote("named", "x")
    assert isinstance(pending, PendingCall)
    pair.client.data_to_send()  # the call never leaves
    feed(pair.client, [b"answer", 1, answer])
    assert isinstance(pending.error, JellyError)
    assert not pair.client.closed
    assert result(pair, root, "named", "alive") == "alive"


def test_an_unknown_local_reference_reads_as_none_as_in_twisted() -> None:
    # A Twisted peer that returns a reference it was given has decref'd it by
    # the time its answer sends it back: the luid is unknown, the value None.
    pair, _, root = served()
    pending = root.callRemote("named", "x")
    assert isinstance(pending, PendingCall)
    pair.client.data_to_send()  # the call never leaves
    feed(pair.client, [b"answer", 1, [b"list", [b"local", 12345]]])
    assert (pending.done, pending.error, pending.result) == (True, None, [None])
    assert not pair.client.closed
    assert result(pair, root, "named", "alive") == "alive"


def test_an_error_answer_that_is_not_an_exception_still_fails_the_call() -> None:
    pair, _, root = served()
    first = root.callRemote("named", "x")
    second = root.callRemote("named", "y")
    pair.client.data_to_send()
    feed(pair.client, [b"error", 1, [b"unicode", b"just a string"]], [b"error", 2, [b"module", b"os"]])
    assert isinstance(first.error, Exception) and "just a string" in str(first.error)
    assert isinstance(second.error, JellyError)
    assert not pair.client.closed


def test_a_late_answer_to_a_cancelled_call_is_dropped() -> None:
    pair, _, root = served()
    pending = root.callRemote("named", "x")
    assert isinstance(pending, PendingCall)
    pair.client.cancel(1)
    pair.pump()
    assert not pending.done
    assert not pair.client.closed
    assert result(pair, root, "named", "alive") == "alive"


# Valid messages to mutate: every command, with ids that exist on the server under test
# (luid 1, requests 1-3), and arguments that use every kind of form.
RICH_ARGS: list[Any] = [
    b"tuple",
    1,
    -(2**40),
    2.5,
    b"bytes",
    [b"unicode", b"text"],
    [b"None"],
    [b"boolean", b"true"],
    [b"list", [b"local", 1], [b"remote", 7]],
    [b"reference", 1, [b"list", [b"dereference", 1]]],
    [b"dictionary", [b"key", [b"set", 1]], [[b"unicode", b"k"], [b"frozenset"]]],
    [b"tests.test_broker.Point", [b"dictionary", [[b"unicode", b"value"], 1]]],
    [b"decimal", 1, -1],
]
RICH_KWARGS: list[Any] = [b"dictionary", [b"bytes_key", 1], [[b"unicode", b"k"], [b"local", 1]]]
VALID_MESSAGES: list[Any] = [
    [b"message", 1, b"root", b"same", 1, RICH_ARGS, RICH_KWARGS],
    [b"message", 2, 1, b"n", 0, *NO_ARGS],
    [b"answer", 1, RICH_ARGS],
    [b"error", 2, [b"twisted.spread.pb.CopyableFailure", [b"dictionary", [[b"unicode", b"value"], 1]]]],
    [b"decref", 1],
    [b"version", 6],
    [b"didNotUnderstand", b"x"],
    [b"cachemessage", 1, 1, b"x", 1, *NO_ARGS],
    [b"decache", 1],
    [b"uncache", 1],
]


def positions(sexp: Any, path: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """Every place in *sexp*, as paths of list indexes."""
    found = [path]
    if type(sexp) is list:
        for index, item in enumerate(sexp):
            found.extend(positions(item, (*path, index)))
    return found


def replace_at(sexp: Any, path: tuple[int, ...], new: Any) -> Any:
    if not path:
        return new
    copy = list(sexp)
    copy[path[0]] = replace_at(sexp[path[0]], path[1:], new)
    return copy


# Values of the wrong type, more often than random s-expressions.
wrong_types = st.sampled_from(
    [0, -1, 2**40, 1.5, b"", b"\xff", b"root", b"list", [], [b"list"], [b"None"], [b"local", 1]]
)
confusing = st.one_of(wrong_types, wrong_types, sexps(max_leaves=6))
# The messages with arguments have the most places to go wrong: drawn more often.
weighted_messages = st.sampled_from(VALID_MESSAGES) | st.sampled_from([VALID_MESSAGES[0], VALID_MESSAGES[2]])


@st.composite
def mutated_message(draw: st.DrawFn) -> bytes:
    """One chunk of bytes: a valid message, mutated in structure or in bytes, or noise."""
    message = draw(weighted_messages)
    kind = draw(st.sampled_from(["structure", "structure", "structure", "bytes", "bytes", "valid", "cut", "noise"]))
    if kind == "structure":
        for _ in range(draw(st.integers(1, 2))):
            message = replace_at(message, draw(st.sampled_from(positions(message))), draw(confusing))
        return encode(message)
    data = bytearray(encode(message))
    if kind == "valid":
        return bytes(data)
    if kind == "cut":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "noise":
        return draw(st.binary(max_size=30))
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.integers(0, 2))
        if action == 0:
            data[position] = draw(st.integers(0, 255))
        elif action == 1:
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif len(data) > 1:
            del data[position]
    return bytes(data)


def fuzzed_server() -> tuple[BrokerPair, RemoteReference]:
    """A server after a valid handshake, holding luid 1 for the client and waiting on requests 1-3."""
    pair = BrokerPair(Server(), Server())
    thing = result(pair, pair.client.root(), "thing")
    assert thing.luid == 1
    for _ in range(3):
        pair.server.root().callRemote("named", "x")
    pair.server.data_to_send()
    return pair, thing


@settings(max_examples=max(300, settings().max_examples))  # each example is cheap
@given(st.lists(mutated_message(), min_size=1, max_size=6))
def test_mutated_messages_only_raise_protocol_errors(chunks: list[bytes]) -> None:
    connection = fuzzed_server()  # the pair, and the reference that keeps luid 1 alive
    for chunk in chunks:
        server = connection[0].server
        try:
            server.receive_data(chunk)
        except ProtocolError:
            assert server.closed
            assert isinstance(server.events()[-1], ConnectionClosed)
            connection = fuzzed_server()  # go on with a fresh connection
        server.events()
        server.data_to_send()


# -- 6. dialect negotiation -------------------------------------------------------------


def test_a_client_offered_only_none_speaks_none() -> None:
    pair = BrokerPair(Server(), handshake=False)
    assert decode(pair.server.data_to_send(), b"none") == [[b"pb", b"none"]]
    pair.client.receive_data(encode([b"none"], b"none"))
    assert pair.client.dialect == b"none"
    sent = pair.client.data_to_send()
    assert decode(sent, b"none") == [b"none", [b"version", 6]]
    pair.server.receive_data(sent)
    pair.pump()
    assert pair.server.dialect == b"none" and pair.client.ready and pair.server.ready
    # And calls work in the none dialect.
    assert result(pair, pair.client.root(), "echo", "version", b"list", None) == [["version", b"list", None], {}]


@pytest.mark.parametrize(
    "offer",
    [
        pytest.param([b"klingon"], id="unknown"),
        pytest.param([], id="empty"),
        pytest.param([1, [b"pb"]], id="not-names"),
        pytest.param(b"pb", id="not-a-list"),
    ],
)
def test_a_client_offered_nothing_it_knows_fails(offer: Any) -> None:
    client = Broker(is_client=True)
    client.connection_made()
    pending_runs: list[str] = []
    client.notifyOnFail(lambda: pending_runs.append("failed"))
    with pytest.raises(ProtocolError):
        client.receive_data(encode(offer, b"none"))
    assert client.closed and not client.ready
    assert pending_runs == ["failed"]


@pytest.mark.parametrize(
    "choice",
    [
        pytest.param(b"klingon", id="unknown"),
        pytest.param([b"pb"], id="list"),
        pytest.param(6, id="int"),
    ],
)
def test_a_server_receiving_a_dialect_it_did_not_offer_fails(choice: Any) -> None:
    server = Broker(is_client=False, root=Server())
    server.connection_made()
    server.data_to_send()
    with pytest.raises(ProtocolError):
        server.receive_data(encode(choice, b"none"))
    assert server.closed and server.dialect is None


@pytest.mark.parametrize("dialect", [b"pb", b"none"])
def test_expressions_after_the_choice_in_the_same_chunk_use_the_chosen_dialect(dialect: bytes) -> None:
    server = Broker(is_client=False, root=Server())
    server.connection_made()
    server.data_to_send()
    request: list[Any] = [b"message", 1, b"root", b"named", 1, [b"tuple", [b"unicode", b"x"]], [b"dictionary"]]
    chunk = encode(dialect, b"none") + encode([b"version", 6], dialect) + encode(request, dialect)
    if dialect == b"pb":
        assert b"\x87" in chunk[len(encode(dialect, b"none")) :]  # really abbreviated
    server.receive_data(chunk)
    events = server.events()
    assert events[0] == Ready(dialect)
    assert isinstance(events[1], CallReceived) and events[1].args == ("x",)
    decoder = Decoder(dialect)
    decoder.feed(server.data_to_send())
    assert decoder.next_expression() == [b"version", 6]


def test_a_client_reads_the_version_in_the_same_chunk_as_the_offer() -> None:
    client = Broker(is_client=True)
    client.connection_made()
    client.receive_data(encode([b"pb", b"none"], b"none") + encode([b"version", 6], b"pb"))
    assert client.dialect == b"pb"
    assert client.events() == [Ready(b"pb")]


# -- what cannot be sent is not counted ------------------------------------------------------


class Unsendable(Root):
    def remote_half(self) -> list[Any]:
        return [Thing(1), object()]  # the Thing is counted before object() fails

    def remote_gauge_then_bad(self) -> list[Any]:
        return [self.gauge, object()]

    def __init__(self) -> None:
        self.gauge = Gauge()


class Gauge(Cacheable):
    def __init__(self) -> None:
        self.stopped = 0

    def stoppedObserving(self, perspective: Any, observer: Any) -> None:
        self.stopped += 1


def test_an_answer_that_cannot_be_sent_is_an_error_answer_and_nothing_stays_counted() -> None:
    root = Unsendable()
    pair = BrokerPair(root)
    pending = pair.client.root().callRemote("half")
    pair.pump()
    assert isinstance(pending.error, CopiedFailure) and pending.error.check(TypeError)
    assert list(pair.server.localObjects) == [b"root"]
    pending = pair.client.root().callRemote("gauge_then_bad")
    pair.pump()
    assert isinstance(pending.error, CopiedFailure)
    assert pair.server.remotelyCachedObjects == {}
    assert root.gauge.stopped == 1  # the observer handed out for the unsent cache was stopped
    assert not pair.server.closed


def test_a_call_that_cannot_be_sent_raises_and_counts_nothing() -> None:
    pair, _, root = served()
    with pytest.raises(NotJellyable):
        root.callRemote("echo", Thing(1), object())
    assert list(pair.client.localObjects) == []
    assert pair.client.data_to_send() == b""
    assert root.callRemote("echo", 1) is not None  # and the broker goes on


def test_cancel_by_pending_result() -> None:
    pair, _, root = served()
    pending = root.callRemote("echo", 1)
    assert isinstance(pending, PendingCall)
    pair.client.cancel(pending)
    pair.pump()
    assert not pending.done  # the late answer was dropped
    assert not pair.client.closed


def test_nothing_is_sent_after_close() -> None:
    pair, _, root = served()
    root.callRemote("echo", 1)
    pair.client.connection_lost(None)
    assert pair.client.data_to_send() == b""


# -- a cache observed by several peers; releases from other threads --------------------------


class Board(Cacheable):
    def __init__(self) -> None:
        self.value = 0
        self.observers: list[Any] = []
        self.stopped: list[Any] = []

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> Any:
        self.observers.append(observer)
        return {"value": self.value}

    def stoppedObserving(self, perspective: Any, observer: Any) -> None:
        self.observers.remove(observer)
        self.stopped.append(observer)

    def set(self, value: int) -> None:
        self.value = value
        for observer in self.observers:
            observer.callRemote("value", value)


class BoardCache(RemoteCache):
    value: int

    def observe_value(self, value: int) -> None:
        self.value = value


class BoardRoot(Root):
    def __init__(self, board: Board) -> None:
        self.board = board

    def remote_board(self) -> Board:
        return self.board


def test_one_cacheable_observed_by_every_peer() -> None:
    board = Board()
    with saved_registries():
        setCopierForClass(Board, BoardCache)
        pairs = [BrokerPair(BoardRoot(board)) for _ in range(3)]
        caches = []
        for pair in pairs:
            pending = pair.client.root().callRemote("board")
            pair.pump()
            caches.append(pending.unwrap())
        assert len(board.observers) == 3 and len(set(map(id, board.observers))) == 3
        board.set(7)
        for pair in pairs:
            pair.pump()
        assert [cache.value for cache in caches] == [7, 7, 7]
        # One peer lets go, another disconnects: each observer stops once.
        del caches[0], pending
        release(pairs[0])
        pairs[1].disconnect(ConnectionResetError("gone"))
        assert len(board.stopped) == 2 and len(board.observers) == 1
        board.set(8)
        pairs[2].pump()
        assert caches[-1].value == 8


def test_a_reference_released_in_another_thread_wakes_the_broker() -> None:
    woken: list[str] = []
    pair, _, root = served()
    pending = root.callRemote("thing")
    pair.pump()
    holder = [pending.unwrap()]
    del pending
    pair.clear_events()
    # Installed now, so that only the release below wakes it (any output does).
    pair.client.wake_up = lambda: woken.append(threading.current_thread().name)

    def drop() -> None:
        holder.clear()
        gc.collect()

    worker = threading.Thread(target=drop, name="dropper")
    worker.start()
    worker.join()
    assert woken == ["dropper"]  # the wake-up hook ran in the thread that collected it
    assert encode([b"decref", 1]) in pair.client.data_to_send()


def test_on_output_hears_of_calls_and_wake_up_of_releases() -> None:
    heard: list[str] = []
    pair, _, root = served()
    pending = root.callRemote("thing")
    pair.pump()
    held = [pending.unwrap()]
    del pending
    pair.clear_events()
    pair.client.wake_up = lambda: heard.append("wake_up")
    pair.client.on_output = lambda: heard.append("on_output")
    root.callRemote("named", "x")
    root.callRemote("named", "y")  # the output was not taken: no second notice
    assert heard == ["on_output"]
    pair.client.data_to_send()
    held.clear()
    gc.collect()  # a finalizer: it must only schedule, so wake_up is called
    assert heard == ["on_output", "wake_up"]
    assert pair.client.data_to_send() == encode([b"decref", 1])
    root.callRemote("named", "z")
    assert heard == ["on_output", "wake_up", "on_output"]


class Avatarish:
    """Anything with a <kind>MessageReceived method, as an avatar has."""

    def perspectiveMessageReceived(self, broker: Any, message: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        return getattr(self, "perspective_" + message)(*args, **kw)

    def perspective_hello(self, name: str) -> str:
        return f"hello {name}"


class AsRoot(Root):
    def remote_avatar(self) -> AsReferenceable:
        return AsReferenceable(Avatarish(), "perspective")


def test_as_referenceable_forwards_to_the_objects_message_method() -> None:
    pair = BrokerPair(AsRoot())
    pending = pair.client.root().callRemote("avatar")
    pair.pump()
    avatar = pending.unwrap()
    answer = avatar.callRemote("hello", "you")
    pair.pump()
    assert answer.unwrap() == "hello you"


class Refusal(Error, Copyable):
    """An Error that is also Copyable: it travels as itself, not as a failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def getStateToCopy(self) -> dict[str, Any]:
        return {"reason": self.reason}


class RefusalCopy(RemoteCopy, Exception):
    reason: str


class Refuser(Root):
    def remote_refuse(self) -> None:
        raise Refusal("no, thanks")

    def remote_plain_error(self) -> None:
        raise Error("plain")


def test_a_jellyable_error_crosses_as_itself() -> None:
    with saved_registries():
        setCopierForClass(Refusal, RefusalCopy)
        pair = BrokerPair(Refuser())
        pending = pair.client.root().callRemote("refuse")
        pair.pump()
        assert isinstance(pending.error, RefusalCopy)  # the copy, not a CopiedFailure
        assert pending.error.reason == "no, thanks"
        pending = pair.client.root().callRemote("plain_error")
        pair.pump()
        assert isinstance(pending.error, CopiedFailure) and pending.error.check(Error)


def test_brokers_share_their_encoders_when_their_limits_and_security_match() -> None:
    # Encoders are stateless between messages: an idle connection should not carry its own.
    first, second = Broker(is_client=True), Broker(is_client=True)
    assert first._encoders is second._encoders
    other = Broker(is_client=True, limits=Limits(max_depth=7))
    assert other._encoders is not first._encoders
    assert other._encoders[b"pb"].limits.max_depth == 7


def test_security_options_that_cannot_be_hashed_still_serve() -> None:
    class Comparable(jelly.SecurityOptions):
        def __eq__(self, other: object) -> bool:  # no __hash__: unhashable
            return isinstance(other, Comparable)

        __hash__ = None  # type: ignore[assignment]

    security = Comparable()
    security.allowBasicTypes()

    class Echo(Root):
        def remote_echo(self, value: Any) -> Any:
            return value

    pair = BrokerPair(Echo(), security=security)
    pending = pair.client.root().callRemote("echo", {"a": (1, "b")})
    pair.pump()
    assert pending.result == {"a": (1, "b")}


def test_releases_queued_from_threads_while_the_output_is_taken_are_all_sent_in_order() -> None:
    pair, _, _ = served()
    broker = pair.client
    threads, per_thread = 4, 3000
    sent: list[bytes] = []
    done = threading.Event()

    def queue(first: int) -> None:
        for luid in range(first, first + per_thread):
            broker.queueDecRef(luid)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: in the middle of a drain
    try:
        workers = [threading.Thread(target=queue, args=(n * per_thread,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        while not done.is_set():
            sent.append(broker.data_to_send())
            if not any(worker.is_alive() for worker in workers):
                done.set()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(old_interval)
    sent.append(broker.data_to_send())
    luids: list[int] = [message[1] for message in decode(b"".join(sent), broker.dialect or b"none")]  # type: ignore[index,misc]
    assert sorted(luids) == list(range(threads * per_thread))  # none lost, none sent twice
    for n in range(threads):
        mine = [luid for luid in luids if luid // per_thread == n]
        assert mine == sorted(mine)  # each thread's in the order it queued them


def test_an_idle_connection_holds_no_empty_queues() -> None:
    # What an idle served connection costs in the core, counted by tracemalloc
    # (deterministic, unlike RSS): a broker and its dispatcher after the
    # handshake and a few calls. 6.8 KiB before the broker had slots and its
    # empty deques and sets went (an empty deque alone is 600 bytes).
    root = Server()

    def connection() -> tuple[Broker, Dispatcher]:
        server, client = Broker(False, root, settled_events=False), Broker(True)
        dispatcher = Dispatcher(server, lambda coroutine: coroutine.close)
        server.connection_made()
        while not (server.ready and client.ready):
            client.receive_data(server.data_to_send())
            server.receive_data(client.data_to_send())
        for request_id in (1, 2):
            call: list[Any] = [b"message", request_id, b"root", b"named", 1, [b"tuple", b"y"], [b"dictionary"]]
            server.receive_data(encode(call, b"pb"))
            dispatcher.dispatch(server.events())
        assert decode(server.data_to_send(), b"pb") == [[b"answer", 1, b"y"], [b"answer", 2, b"y"]]
        return server, dispatcher

    connection()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        kept = [connection() for _ in range(200)]
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / len(kept)
    assert held < 4.5 * 1024, f"an idle connection holds {held:.0f} bytes"
    assert all(dispatcher._queue is None for _, dispatcher in kept)


def test_an_application_may_still_set_its_own_attributes_on_a_broker() -> None:
    pair, _, _ = served()
    pair.server.worker_name = "w1"  # type: ignore[attr-defined]
    assert pair.server.worker_name == "w1"  # type: ignore[attr-defined]
