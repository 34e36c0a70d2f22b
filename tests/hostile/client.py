"""A pbcore client against a hostile server, run as ``python -m tests.hostile.client ADAPTER PORT TIMEOUT``.

ADAPTER is ``asyncio``, ``trio``, ``anyio`` (asyncio backend) or
``blocking``. It connects to 127.0.0.1:PORT, calls ``root.callRemote("echo",
1)`` with a deadline of TIMEOUT seconds, and writes one JSON line on standard
output: what the call gave (``{"outcome": "answer", "type": ..., "shape":
...}`` or ``{"outcome": "error", "type": ..., "text_length": ..., "text":
...}``) and how long it took. Taking ``str()`` of the error is part of the
test: that text must be bounded, whatever the server sent.

It runs in a subprocess because a bomb may hold it in C code (hashing,
``str``) where no timeout of its own can interrupt it; the test kills it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from pbcore.factory import PBClientFactory
from pbcore.jelly import qual

ADAPTERS = ("asyncio", "trio", "anyio", "blocking")


async def _asyncio(port: int, timeout: float) -> Any:
    import pbcore_asyncio  # noqa: PLC0415

    factory = PBClientFactory()
    connection = await pbcore_asyncio.connect(factory, "127.0.0.1", port)
    try:
        root = await factory.getRootObject()
        return await root.callRemote("echo", 1, pbtimeout=timeout)
    finally:
        connection.close()


async def _trio(port: int, timeout: float) -> Any:
    import pbcore_trio  # noqa: PLC0415

    factory = PBClientFactory()
    async with pbcore_trio.open_connection(factory, "127.0.0.1", port):
        root = await factory.getRootObject()
        return await root.callRemote("echo", 1, pbtimeout=timeout)


async def _anyio(port: int, timeout: float) -> Any:
    import pbcore_anyio  # noqa: PLC0415

    factory = PBClientFactory()
    async with pbcore_anyio.open_connection(factory, "127.0.0.1", port):
        root = await factory.getRootObject()
        return await root.callRemote("echo", 1, pbtimeout=timeout)


def _blocking(port: int, timeout: float) -> Any:
    import pbcore_blocking  # noqa: PLC0415

    with pbcore_blocking.connect(PBClientFactory(), "127.0.0.1", port, timeout=timeout) as connection:
        return connection.call(connection.root(), "echo", 1, timeout=timeout)


def shape(value: Any, budget: int = 40) -> str:
    """A bounded description of a value that may be a shared structure of 2**64 leaves (no hashing, no repr)."""
    left = [budget]

    def walk(item: Any, depth: int) -> str:
        left[0] -= 1
        if isinstance(item, (tuple, list)):
            if depth > 3 or left[0] <= 0:
                return f"{type(item).__name__}[{len(item)}]"
            return f"{type(item).__name__}({', '.join(walk(sub, depth + 1) for sub in item[:3])})"
        if isinstance(item, (int, float, bytes, str)) and len(repr(item)) < 40:
            return repr(item)
        return type(item).__name__

    return walk(value, 0)


def call(adapter: str, port: int, timeout: float) -> Any:
    if adapter == "asyncio":
        return asyncio.run(_asyncio(port, timeout))
    if adapter == "trio":
        import trio  # noqa: PLC0415

        return trio.run(_trio, port, timeout)
    if adapter == "anyio":
        import anyio  # noqa: PLC0415

        return anyio.run(_anyio, port, timeout)
    return _blocking(port, timeout)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ADAPTERS:
        sys.stderr.write(f"usage: python -m tests.hostile.client {{{','.join(ADAPTERS)}}} PORT TIMEOUT\n")
        return 2
    adapter, port, timeout = argv[0], int(argv[1]), float(argv[2])
    start = time.monotonic()
    result: dict[str, Any]
    try:
        value = call(adapter, port, timeout)
    except BaseException as error:
        text = str(error)  # bounded, or this never ends: the test sees which
        result = {
            "outcome": "error",
            "type": qual(type(error)),
            "remote_type": str(getattr(error, "remoteType", ""))[:200],
            "text_length": len(text),
            "text": text[:300],
        }
    else:
        result = {"outcome": "answer", "type": qual(type(value)), "shape": shape(value)}
    result["seconds"] = time.monotonic() - start
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
