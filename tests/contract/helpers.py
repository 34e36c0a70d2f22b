"""Small coroutines the contract tests run in a client's runtime, and a way to wait for a condition."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pbcore.factory import PBClientFactory, PBServerFactory
from tests.contract.kits import Client, Kit, Server
from tests.contract.service import ContractRoot


async def outcome(ref: Any, name: str, *args: Any) -> Any:
    """The call's result, or the exception it failed with."""
    try:
        return await ref.callRemote(name, *args)
    except Exception as error:
        return error


async def send(ref: Any, name: str, *args: Any) -> Any:
    """Send a call and return its pending result without waiting for it."""
    return ref.callRemote(name, *args)


async def settled(pending: Any) -> Any:
    """What a pending result settled with (its value, or its exception)."""
    try:
        return await pending
    except Exception as error:
        return error


def eventually(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Whether *condition* holds within *seconds* (polled)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def started(kit: Kit, root: Any = None) -> tuple[Any, Server, Client, Any]:
    """A server of *root* (a ContractRoot by default), one client connected, and its root reference."""
    root = ContractRoot() if root is None else root
    server = kit.serve(PBServerFactory(root))
    client = kit.connect(PBClientFactory(), server.port)
    return root, server, client, client.root()
