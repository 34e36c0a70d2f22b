"""The interop matrix: each of our adapters against real Twisted PB peers, over loopback TCP.

Twisted runs in its own process with its own reactor (tests/interop/twisted_peer.py,
driven through tests/interop/peers.py); it imports no pbcore. Both directions, for
each adapter (asyncio, trio, anyio on each backend, blocking):

* **our client, a Twisted server.** Each scenario is one coroutine that awaits only
  PB results, so one definition runs under every adapter: :func:`run_client`
  connects a client of the adapter and runs it on that adapter's loop (under the
  blocking adapter, through ``BlockingConnection.run``). The module starts one
  Twisted server for the plain root and one for the login portal.
* **a Twisted client, our server.** Each script of twisted_peer.py runs against a
  fresh server of the adapter offering tests/adapters/services.py (the same service),
  and against the Twisted server as well: the reference row, which shows that
  what is expected of ours is what Twisted itself does.

Covered: plain calls; every flavor both ways (Referenceable, Copyable, Cacheable with
its observer's updates, and a Viewable reached through a perspective); one-way calls;
errors of each kind (an unexpected exception, ``pb.Error`` and a subclass, a missing
method, wrong arguments); login with the right password, a wrong one, an unknown user
and anonymously; and the reference tables back to their baseline once a side lets go.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, NamedTuple

import anyio
import pbcore_anyio
import pbcore_asyncio
import pbcore_blocking
import pbcore_trio
import pytest
import trio

from pbcore.broker import Broker
from pbcore.cred import Anonymous, Unauthorized, UsernamePassword
from pbcore.errors import Error, NoSuchMethod
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import CopiedFailure, RemoteReference
from tests.adapters.services import (
    Counter,
    CounterCache,
    PeerRootMaker,
    Point,
    PointCopy,
    Realm,
    Twice,
    login_factory,
)
from tests.interop.peers import by_step, run_twisted_client, twisted_server

pytest.importorskip("twisted.spread.pb")

HOST = "127.0.0.1"
ADAPTERS = ("asyncio", "trio", "anyio-asyncio", "anyio-trio", "blocking")
#: Bounds each call (blocking adapter), connecting and closing.
CALL_TIMEOUT = 10.0
#: Bounds a whole scenario, or a whole Twisted client script with our server.
SCENARIO_TIMEOUT = 60.0
#: How many round trips a scenario waits for the peer to let go of something.
POLL_ROUNDS = 100
#: How long (s) our server waits, after a Twisted client script, for what follows its exit.
SETTLE_TIMEOUT = 5.0

Scenario = Callable[[PBClientFactory], Coroutine[Any, Any, None]]


class TwistedPorts(NamedTuple):
    plain: int
    login: int


@pytest.fixture(scope="module")
def twisted_ports() -> Iterator[TwistedPorts]:
    """One Twisted server for the plain root, one for the login portal, for the whole module."""
    with twisted_server(timeout=600) as plain, twisted_server(login=True, timeout=600) as login:
        yield TwistedPorts(plain, login)


# -- our client of each adapter, a Twisted server -------------------------------------------------


def run_client(adapter: str, port: int, scenario: Scenario) -> None:
    """Connect a client of *adapter* to the server on *port* and run *scenario* there (bounded)."""
    factory = PBClientFactory()
    if adapter == "asyncio":

        async def on_asyncio() -> None:
            connection = await asyncio.wait_for(pbcore_asyncio.connect(factory, HOST, port), CALL_TIMEOUT)
            try:
                await asyncio.wait_for(scenario(factory), SCENARIO_TIMEOUT)
            finally:
                connection.close()
                await asyncio.wait_for(connection.wait_closed(), CALL_TIMEOUT)

        asyncio.run(on_asyncio())
    elif adapter == "trio":

        async def on_trio() -> None:
            with trio.fail_after(SCENARIO_TIMEOUT):
                async with pbcore_trio.open_connection(factory, HOST, port):
                    await scenario(factory)

        trio.run(on_trio)
    elif adapter.startswith("anyio-"):

        async def on_anyio() -> None:
            with anyio.fail_after(SCENARIO_TIMEOUT):
                async with pbcore_anyio.open_connection(factory, HOST, port):
                    await scenario(factory)

        anyio.run(on_anyio, backend=adapter.removeprefix("anyio-"))
    else:
        assert adapter == "blocking"
        with pbcore_blocking.connect(factory, HOST, port, timeout=CALL_TIMEOUT) as connection:
            connection.run(scenario(factory))  # each call bounded by the connection's timeout


def broker_of(factory: PBClientFactory) -> Broker:
    assert factory.broker is not None
    return factory.broker


async def failure_of(result: Awaitable[Any]) -> CopiedFailure:
    """The remote error that awaiting *result* raises."""
    with pytest.raises(CopiedFailure) as caught:
        await result
    return caught.value


async def until_round_trip(root: RemoteReference, condition: Callable[[], bool]) -> bool:
    """Whether *condition* holds, waiting for it at most ``POLL_ROUNDS`` round trips."""
    for _ in range(POLL_ROUNDS):
        if condition():
            return True
        gc.collect()
        await root.callRemote("echo")
    return condition()


async def calls_and_flavors(factory: PBClientFactory) -> None:
    root = await factory.getRootObject()
    values = (1, -(2**40), "twø", b"three", 4.5, None, True, [1, (2, 3)], {1: {"a"}}, datetime.date(2024, 2, 29))
    assert await root.callRemote("echo", *values, key="value") == [list(values), {"key": "value"}]
    assert await root.callRemote("big", 300_000) == b"x" * 300_000

    thing = await root.callRemote("thing", 5)  # a Referenceable of Twisted's
    assert isinstance(thing, RemoteReference)
    assert await thing.callRemote("n") == 5
    point = await root.callRemote("point")  # a Copyable of Twisted's
    assert isinstance(point, PointCopy) and (point.x, point.y) == (3, 4)
    # A Copyable of ours: Twisted builds its own RemoteCopy for the tag.
    assert await root.callRemote("accept_point", Point(1, 2)) == {"class": "TwistedPointCopy", "x": 1, "y": 2}

    # A Referenceable of ours: Twisted calls it back, then lets go of it.
    assert await root.callRemote("call_back", Twice(), 21) == 42
    broker = broker_of(factory)
    assert await until_round_trip(root, lambda: not broker.localObjects)  # our table is empty again


async def one_way_calls(factory: PBClientFactory) -> None:
    root = await factory.getRootObject()
    for n in range(20):
        assert root.callRemote("note", n, pbanswer=False) is None
    assert broker_of(factory).calls_in_flight == 0  # nothing waits for an answer
    assert await root.callRemote("notes") == list(range(20))  # they all ran, in order, before this call


async def errors(factory: PBClientFactory) -> None:
    root = await factory.getRootObject()
    failure = await failure_of(root.callRemote("fail"))  # an unexpected exception
    assert (failure.type, failure.value) == ("builtins.ValueError", "nope")
    assert failure.check(ValueError) is ValueError and failure.check(Error) is None

    failure = await failure_of(root.callRemote("known"))  # pb.Error
    assert (failure.type, failure.value) == ("twisted.spread.pb.Error", "known")
    assert failure.check(Error) is Error

    failure = await failure_of(root.callRemote("refused"))  # a pb.Error subclass
    assert (failure.type, failure.value) == ("twisted_peer.Refused", "refused")
    assert failure.check(Error) is Error and failure.check(ValueError) is None

    failure = await failure_of(root.callRemote("no_such_method"))
    assert (failure.type, failure.value) == (
        "twisted.spread.flavors.NoSuchMethod",
        "No such method: remote_no_such_method",
    )
    assert failure.check(NoSuchMethod) is NoSuchMethod and failure.check(AttributeError) is AttributeError

    failure = await failure_of(root.callRemote("thing", 1, 2))  # wrong arguments
    assert failure.type == "builtins.TypeError" and "remote_thing()" in failure.value
    assert failure.check(TypeError) is TypeError

    assert await root.callRemote("echo", "alive") == [["alive"], {}]  # none of that hurt the connection


async def references(factory: PBClientFactory) -> None:
    root = await factory.getRootObject()
    before = await root.callRemote("refs")
    assert before == 1  # the root
    thing = await root.callRemote("thing", 5)
    assert await root.callRemote("refs") == before + 1
    [[echoed], _] = await root.callRemote("echo", thing)  # the same object, a second reference to it
    assert echoed == thing and echoed is not thing
    assert await root.callRemote("refs") == before + 1
    del thing
    gc.collect()
    assert await root.callRemote("refs") == before + 1  # one decref of two: Twisted still holds it
    assert await echoed.callRemote("n") == 5
    del echoed
    gc.collect()
    # The decref went out before this call: Twisted's table is back to its baseline.
    assert await root.callRemote("refs") == before


async def caches(factory: PBClientFactory) -> None:
    root = await factory.getRootObject()
    counter = await root.callRemote("counter")  # a Cacheable of Twisted's
    assert isinstance(counter, CounterCache) and counter.value == 0
    assert await root.callRemote("bump") == 1
    assert counter.value == 1  # the observer's update arrived before the answer
    again = await root.callRemote("counter")
    assert again == counter and again is not counter  # the same cache, counted twice
    assert await root.callRemote("bump") == 2
    assert again.value == counter.value == 2
    assert await root.callRemote("observers") == 1
    del counter
    gc.collect()
    assert await root.callRemote("observers") == 1  # `again` still holds it
    del again
    gc.collect()
    assert await root.callRemote("observers") == 0  # decached: Twisted stopped observing

    mine = Counter()  # a Cacheable of ours: Twisted's cache follows our updates
    assert await root.callRemote("keep_cache", mine) == 0
    assert len(mine.observers) == 1
    mine.bump()
    assert await root.callRemote("kept_value") == 1
    mine.bump()
    assert await root.callRemote("kept_value") == 2
    assert await root.callRemote("drop_cache") is None
    assert await until_round_trip(root, lambda: not mine.observers)  # Twisted let go: we stopped observing
    assert not broker_of(factory).remotelyCachedObjects


async def logins(factory: PBClientFactory) -> None:
    alice = await factory.login(UsernamePassword("alice", "secret"))
    assert await alice.callRemote("hello") == "hello alice"
    assert await alice.callRemote("echo", [1, "x"]) == [1, "x"]
    board = await alice.callRemote("board")  # a Viewable: a view of it for alice's perspective
    assert await board.callRemote("whoami") == "alice"
    for wrong in (UsernamePassword("alice", "wrong"), UsernamePassword("mallory", "secret")):
        failure = await failure_of(factory.login(wrong))
        assert failure.type == "twisted.cred.error.UnauthorizedLogin"
        assert failure.check(Unauthorized) is Unauthorized
    anonymous = await factory.login(Anonymous())
    assert await anonymous.callRemote("hello") == "hello anonymous"
    anonymous_board = await anonymous.callRemote("board")
    assert await anonymous_board.callRemote("whoami") == "anonymous"
    assert await board.callRemote("whoami") == "alice"  # each view keeps its own perspective


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize(
    "scenario", [calls_and_flavors, one_way_calls, errors, references, caches], ids=lambda s: s.__name__
)
def test_our_client_against_a_twisted_server(adapter: str, scenario: Scenario, twisted_ports: TwistedPorts) -> None:
    run_client(adapter, twisted_ports.plain, scenario)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_our_client_logs_in_to_a_twisted_server(adapter: str, twisted_ports: TwistedPorts) -> None:
    run_client(adapter, twisted_ports.login, logins)


async def reference_sent_back(factory: PBClientFactory) -> None:
    root = await factory.getRootObject()
    # Twisted decrefs a reference it was given as soon as the method returns,
    # before the answer that sends it back as [local, luid]: the luid is unknown
    # by then, and like Twisted's own client we read it as None.
    assert await root.callRemote("echo", Twice()) == [[None], {}]
    assert await root.callRemote("echo", "alive") == [["alive"], {}]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_our_reference_echoed_back_by_twisted(adapter: str, twisted_ports: TwistedPorts) -> None:
    run_client(adapter, twisted_ports.plain, reference_sent_back)


# -- Twisted clients, our server of each adapter (and Twisted's, for reference) ------------------

SERVERS = ("twisted", *ADAPTERS)


class ScriptRun(NamedTuple):
    #: What each step gave: its value, or for a failure ``{"error", "message", "parents"}``.
    outcomes: dict[str, Any]
    #: Whether the server's *settled* condition held after the script (bounded wait).
    settled: bool


def outcomes_of(steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        name: step["value"] if step["ok"] else {key: step[key] for key in ("type", "message", "parents")}
        for name, step in by_step(steps).items()
    }


def run_script(
    server: str,
    script: str,
    ports: TwistedPorts,
    factory: PBServerFactory,
    settled: Callable[[], bool] = lambda: True,
) -> ScriptRun:
    """Run a Twisted client *script* against *server*: Twisted's, or ours of that adapter serving *factory*.

    Our server then waits (at most ``SETTLE_TIMEOUT``) for *settled* to hold.
    """
    if server == "twisted":
        return ScriptRun(
            outcomes_of(run_twisted_client(ports.login if script == "login" else ports.plain, script)), True
        )
    rounds = int(SETTLE_TIMEOUT / 0.01)
    if server == "asyncio":

        async def on_asyncio() -> ScriptRun:
            listening = await pbcore_asyncio.serve(factory, HOST, 0)
            try:
                steps = await asyncio.to_thread(run_twisted_client, listening.port, script)
                for _ in range(rounds):
                    if settled():
                        break
                    await asyncio.sleep(0.01)
                return ScriptRun(outcomes_of(steps), settled())
            finally:
                await asyncio.wait_for(listening.aclose(), CALL_TIMEOUT)

        return asyncio.run(asyncio.wait_for(on_asyncio(), SCENARIO_TIMEOUT))
    if server == "trio":

        async def on_trio() -> ScriptRun:
            with trio.fail_after(SCENARIO_TIMEOUT):
                async with pbcore_trio.open_server(factory, HOST, 0) as listening:
                    steps = await trio.to_thread.run_sync(run_twisted_client, listening.port, script)
                    for _ in range(rounds):
                        if settled():
                            break
                        await trio.sleep(0.01)
                    return ScriptRun(outcomes_of(steps), settled())

        return trio.run(on_trio)
    if server.startswith("anyio-"):

        async def on_anyio() -> ScriptRun:
            with anyio.fail_after(SCENARIO_TIMEOUT):
                async with pbcore_anyio.open_server(factory, HOST, 0) as listening:
                    steps = await anyio.to_thread.run_sync(run_twisted_client, listening.port, script)
                    for _ in range(rounds):
                        if settled():
                            break
                        await anyio.sleep(0.01)
                    return ScriptRun(outcomes_of(steps), settled())

        return anyio.run(on_anyio, backend=server.removeprefix("anyio-"))
    assert server == "blocking"
    with pbcore_blocking.serve(factory, HOST, 0, timeout=CALL_TIMEOUT) as listening:
        steps = run_twisted_client(listening.port, script)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.01)
        return ScriptRun(outcomes_of(steps), settled())


EXCEPTION = ["builtins.Exception", "builtins.BaseException", "builtins.object"]


def failure(kind: str, message: str, *bases: str) -> dict[str, Any]:
    """A failed step as outcomes_of() shows it: *kind* with *bases*, then Exception's."""
    return {"type": kind, "message": message, "parents": [kind, *bases, *EXCEPTION]}


def ours(server: str) -> bool:
    return server != "twisted"


@pytest.mark.parametrize("server", SERVERS)
def test_twisted_client_calls_and_flavors(server: str, twisted_ports: TwistedPorts) -> None:
    run = run_script(server, "basic", twisted_ports, PBServerFactory(PeerRootMaker()))
    assert run.outcomes == {
        "echo": [[1, "two", {"bytes": "three"}, 4.5, None, [1, 2]], {"key": "value"}],
        "big": 300_000,
        "thing": 5,
        "point": {"class": "TwistedPointCopy", "x": 3, "y": 4},
        # Twisted's Copyable arrived as the server's own RemoteCopy class.
        "accept_point": {"class": "PointCopy" if ours(server) else "TwistedPointCopy", "x": 1, "y": 2},
        "call_back": 42,
        "note": True,  # one-way calls return None ...
        "notes": list(range(20)),  # ... and ran, in order, before the next call
    }


@pytest.mark.parametrize("server", SERVERS)
def test_twisted_client_errors(server: str, twisted_ports: TwistedPorts) -> None:
    run = run_script(server, "errors", twisted_ports, PBServerFactory(PeerRootMaker()))
    refused = "tests.adapters.services.Refused" if ours(server) else "twisted_peer.Refused"
    assert run.outcomes == {
        "fail": failure("builtins.ValueError", "nope"),
        "known": failure("twisted.spread.pb.Error", "known"),
        "refused": failure(refused, "refused", "twisted.spread.pb.Error"),
        "missing": failure(
            "twisted.spread.flavors.NoSuchMethod", "No such method: remote_no_such_method", "builtins.AttributeError"
        ),
        "bad_args": failure(
            "builtins.TypeError", "PeerRoot.remote_thing() takes 2 positional arguments but 3 were given"
        ),
        "alive": [["alive"], {}],
    }


@pytest.mark.parametrize("server", SERVERS)
def test_twisted_client_references(server: str, twisted_ports: TwistedPorts) -> None:
    run = run_script(server, "refs", twisted_ports, PBServerFactory(PeerRootMaker()))
    # The server's table is back to the root alone once Twisted lets go (after, after_call_back).
    assert run.outcomes == {
        "before": 1,
        "thing": 5,
        "held": 2,
        "after": 1,
        "call_back": 42,
        "after_call_back": 1,
    }


@pytest.mark.parametrize("server", SERVERS)
def test_twisted_client_caches(server: str, twisted_ports: TwistedPorts) -> None:
    maker = PeerRootMaker()
    run = run_script(server, "cache", twisted_ports, PBServerFactory(maker), lambda: not maker.shared.counter.observers)
    assert run.outcomes == {
        # Our Cacheable, to Twisted's cache: updates come before the answers.
        "counter": {"value": 0},
        "bump": 1,
        "cached": 1,
        "bump2": 2,
        "cached2": 2,
        "observed": 1,
        "released": 0,  # Twisted dropped its cache: the server stopped observing
        # Twisted's Cacheable, to the server's cache.
        "keep_cache": 0,
        "observing": 1,
        "kept": 1,
        "kept2": 2,
        "drop_cache": None,
        "stopped": 0,  # the server dropped its cache: Twisted stopped observing
    }
    assert run.settled


@pytest.mark.parametrize("server", SERVERS)
def test_twisted_client_logs_in(server: str, twisted_ports: TwistedPorts) -> None:
    realm = Realm()
    run = run_script(
        server, "login", twisted_ports, login_factory(realm), lambda: sorted(realm.logouts) == ["alice", "anonymous"]
    )
    refusals = {name: run.outcomes.pop(name) for name in ("wrong_password", "unknown_user")}
    assert run.outcomes == {
        "login": "<avatar>",
        "hello": "hello alice",
        "echo": "x",
        "board": "<reference>",
        "whoami": "alice",  # the Viewable answered for alice's perspective
        "anonymous_login": "<avatar>",
        "anonymous": "hello anonymous",
        "anonymous_whoami": "anonymous",
    }
    for refusal in refusals.values():
        assert refusal["type"] == "twisted.cred.error.UnauthorizedLogin"
        # Twisted's parents, so that a Twisted client's trap(LoginFailed) matches too.
        assert refusal["parents"] == [
            "twisted.cred.error.UnauthorizedLogin",
            "twisted.cred.error.LoginFailed",
            "twisted.cred.error.Unauthorized",
            *EXCEPTION,
        ]
    assert run.settled  # our realm logged both avatars out when the Twisted client left
