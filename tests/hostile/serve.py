"""A pbcore server for the attack suite, run as ``python -m tests.hostile.serve ADAPTER``.

ADAPTER is ``asyncio``, ``trio``, ``anyio`` (on its asyncio backend) or
``blocking``. It serves the demo service (:class:`pbcore.demo.DemoService`)
with one user, alice: its root answers ``echo`` and the login methods (a
:mod:`pbcore.cred` portal wrapper), and an avatar answers ``echo`` too. It
writes ``PORT <n>`` on standard output once it listens, then serves until it
is killed. Warnings go to standard error. ``PBCORE_HOSTILE_BUDGET`` in the
environment sets its process-wide memory budget.

``pbcore serve`` (the fifth server of the suite) is started as it is, with
``--user alice --password-env``: see :mod:`tests.hostile.processes`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Final

from pbcore.budget import MemoryBudget
from pbcore.demo import DemoService
from pbcore.factory import PBServerFactory

USER: Final = "alice"
PASSWORD: Final = "s3cret"
ADAPTERS: Final = ("asyncio", "trio", "anyio", "blocking")
#: If set, the server's process-wide MemoryBudget, in bytes (pbcore.budget).
BUDGET_VARIABLE: Final = "PBCORE_HOSTILE_BUDGET"


def _announce(port: int) -> None:
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()


async def _asyncio(factory: PBServerFactory) -> None:
    import pbcore_asyncio  # noqa: PLC0415  (each adapter loads only its own runtime)

    server = await pbcore_asyncio.serve(factory, "127.0.0.1", 0)
    _announce(server.port)
    await server.serve_forever()


async def _trio(factory: PBServerFactory) -> None:
    import pbcore_trio  # noqa: PLC0415
    import trio  # noqa: PLC0415

    async with pbcore_trio.open_server(factory, "127.0.0.1", 0) as server:
        _announce(server.port)
        await trio.sleep_forever()


async def _anyio(factory: PBServerFactory) -> None:
    import anyio  # noqa: PLC0415
    import pbcore_anyio  # noqa: PLC0415

    async with pbcore_anyio.open_server(factory, "127.0.0.1", 0) as server:
        _announce(server.port)
        await anyio.sleep_forever()


def _blocking(factory: PBServerFactory) -> None:
    import pbcore_blocking  # noqa: PLC0415

    server = pbcore_blocking.serve(factory, "127.0.0.1", 0)
    _announce(server.port)
    server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ADAPTERS:
        sys.stderr.write(f"usage: python -m tests.hostile.serve {{{','.join(ADAPTERS)}}}\n")
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    factory = DemoService({USER: PASSWORD}, open=True).server_factory()
    budget = os.environ.get(BUDGET_VARIABLE)
    if budget:  # the memory tests' own process-wide budget
        factory.budget = MemoryBudget(int(budget))
    adapter = argv[0]
    if adapter == "asyncio":
        asyncio.run(_asyncio(factory))
    elif adapter == "trio":
        import trio  # noqa: PLC0415

        trio.run(_trio, factory)
    elif adapter == "anyio":
        import anyio  # noqa: PLC0415

        anyio.run(_anyio, factory)
    else:
        _blocking(factory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
