"""Calls on every adapter: the call graphs Twisted completes complete, and the limit refuses instead of waiting."""

from __future__ import annotations

from typing import Any

from pbcore.banana import Limits
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import CopiedFailure
from pbcore.serving import TooManyCalls
from tests.contract.helpers import eventually, outcome, send, started
from tests.contract.kits import Kit
from tests.contract.service import ClientSide, ContractRoot


async def ping_pong_many(ref: Any, count: int, depth: int) -> list[int]:
    side = ClientSide(ref)
    pendings = [ref.callRemote("ping_pong", side, depth) for _ in range(count)]
    return [await pending for pending in pendings]


def test_a_thousand_calls_that_call_back_into_the_client_complete(kit: Kit) -> None:
    # Each server call awaits a call into the client, whose method awaits a call to the server.
    _, _, client, ref = started(kit)
    assert client.run(ping_pong_many, ref, 1000, 2) == [2] * 1000


async def polls_then_post(ref: Any, count: int) -> tuple[int, list[Any]]:
    polls = [ref.callRemote("poll") for _ in range(count)]
    woken = await ref.callRemote("post", "news")
    return woken, [await poll for poll in polls]


def test_long_polls_then_the_call_that_wakes_them(kit: Kit) -> None:
    _, _, client, ref = started(kit)
    assert client.run(polls_then_post, ref, 40) == (40, ["news"] * 40)


def test_past_the_limit_a_call_is_refused_at_once(kit: Kit) -> None:
    root = ContractRoot()
    server = kit.serve(PBServerFactory(root, limits=Limits(max_running_calls=5)))
    client = kit.connect(PBClientFactory(), server.port)
    ref = client.root()
    for _ in range(5):
        client.run(send, ref, "hang")
    assert eventually(lambda: root.shared.started == 5)
    refused = client.run(outcome, ref, "hang", timeout=10)
    assert isinstance(refused, CopiedFailure) and refused.check(TooManyCalls), refused
    # Plain methods still run, and the connection is fine.
    assert client.run(outcome, ref, "echo", 7) == 7
