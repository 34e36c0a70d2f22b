"""The asyncio adapter against real Twisted PB peers, over TCP on loopback.

Our servers offer tests/adapters/services.py (the same API as the Twisted
peer's). Twisted runs in a subprocess with its own reactor (tests/interop/twisted_peer.py,
driven through tests/interop/peers.py): a Twisted server against our asyncio
client, and Twisted clients against our asyncio server.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pbcore_asyncio
import pytest

from pbcore import Error
from pbcore.cred import (
    Anonymous,
    UsernamePassword,
)
from pbcore.errors import NoSuchMethod
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import CopiedFailure
from tests.adapters.services import CounterCache, PeerRootMaker, PointCopy, Twice, login_factory
from tests.interop.peers import run_twisted_client, twisted_server

pytest.importorskip("twisted.spread.pb")

T = TypeVar("T")


def run(test: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(test(), timeout)

    return asyncio.run(bounded())


# -- our asyncio client, a Twisted server -------------------------------------------------------


def test_asyncio_client_against_a_twisted_server() -> None:
    with twisted_server() as port:

        async def body() -> None:
            factory = PBClientFactory()
            connection = await pbcore_asyncio.connect(factory, "127.0.0.1", port)
            root = await factory.getRootObject()
            assert await root.callRemote("echo", 1, "two", k=None) == [[1, "two"], {"k": None}]
            before = await root.callRemote("refs")
            thing = await root.callRemote("thing", 5)
            assert await thing.callRemote("n") == 5
            assert await root.callRemote("refs") == before + 1
            del thing
            for _ in range(500):
                gc.collect()
                await asyncio.sleep(0.01)
                if await root.callRemote("refs") == before:
                    break
            assert await root.callRemote("refs") == before  # Twisted's table is back to its baseline
            with pytest.raises(CopiedFailure) as failed:
                await root.callRemote("fail")
            assert failed.value.check(ValueError)
            with pytest.raises(CopiedFailure) as known:
                await root.callRemote("known")
            assert known.value.check(Error)
            with pytest.raises(CopiedFailure) as missing:
                await root.callRemote("missing")
            assert missing.value.check(NoSuchMethod)
            point = await root.callRemote("point")
            assert isinstance(point, PointCopy) and (point.x, point.y) == (3, 4)
            counter = await root.callRemote("counter")
            assert isinstance(counter, CounterCache)
            start = counter.value
            await root.callRemote("bump")
            assert counter.value == start + 1  # the update came before the answer
            assert await root.callRemote("call_back", Twice(), 21) == 42
            one_way = root.callRemote("echo", 1, pbanswer=False)
            assert one_way is None
            connection.close()
            await connection.wait_closed()

        run(body)


def test_asyncio_client_logs_in_to_a_twisted_server() -> None:
    with twisted_server(login=True) as port:

        async def body() -> None:
            for credentials, expected in (
                (UsernamePassword("alice", "secret"), "hello alice"),
                (Anonymous(), "hello anonymous"),
            ):
                factory = PBClientFactory()
                connection = await pbcore_asyncio.connect(factory, "127.0.0.1", port)
                avatar = await factory.login(credentials)
                assert await avatar.callRemote("hello") == expected
                connection.close()
            factory = PBClientFactory()
            connection = await pbcore_asyncio.connect(factory, "127.0.0.1", port)
            with pytest.raises(CopiedFailure) as refused:
                await factory.login(UsernamePassword("alice", "wrong"))
            assert refused.value.type == "twisted.cred.error.UnauthorizedLogin"
            connection.close()

        run(body)


# -- Twisted clients, our asyncio server ---------------------------------------------------------


def steps_of(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["step"]: line for line in lines}


async def against_our_server(factory: PBServerFactory, script: str) -> dict[str, dict[str, Any]]:
    server = await pbcore_asyncio.serve(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return steps_of(await asyncio.to_thread(run_twisted_client, port, script))
    finally:
        server.close()
        await server.wait_closed()


def test_twisted_client_basic_script_against_our_server() -> None:
    steps = run(lambda: against_our_server(PBServerFactory(PeerRootMaker()), "basic"))
    assert steps["echo"]["ok"]
    assert steps["thing"] == {"step": "thing", "ok": True, "value": 5}
    assert steps["fail"]["ok"] is False and steps["fail"]["type"] == "builtins.ValueError"
    assert steps["known"]["type"] == "twisted.spread.pb.Error"
    assert steps["missing"]["type"] == "twisted.spread.flavors.NoSuchMethod"
    assert steps["point"]["value"] == {"class": "TwistedPointCopy", "x": 3, "y": 4}


def test_twisted_client_refs_and_cache_scripts_against_our_server() -> None:
    steps = run(lambda: against_our_server(PBServerFactory(PeerRootMaker()), "refs"))
    assert steps["held"]["value"] == steps["before"]["value"] + 1
    assert steps["after"]["value"] == steps["before"]["value"]  # Twisted let go: our table is back
    assert steps["call_back"]["value"] == 42
    steps = run(lambda: against_our_server(PBServerFactory(PeerRootMaker()), "cache"))
    assert steps["counter"]["value"] == {"value": 0}
    assert steps["cached"]["value"] == steps["bump"]["value"] == 1
    assert steps["cached2"]["value"] == 2


def test_twisted_client_logs_in_to_our_server() -> None:
    steps = run(lambda: against_our_server(login_factory(), "login"))
    assert steps["hello"]["value"] == "hello alice"
    assert steps["echo"]["value"] == "x"
    assert steps["wrong_password"]["type"] == "twisted.cred.error.UnauthorizedLogin"
    assert steps["anonymous"]["value"] == "hello anonymous"
