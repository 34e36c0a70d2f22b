"""A pbcore server with few file descriptors, for test_descriptors.py (run as a script, in a child process).

``python fd_server.py ADAPTER LIMIT`` serves an echo root on 127.0.0.1 with the
adapter named (asyncio, trio, anyio-asyncio, anyio-trio, blocking) after
lowering its RLIMIT_NOFILE to LIMIT. On stdout it writes ``port N`` once
listening, then ``cpu SECONDS`` (the CPU time it has used) for each ``cpu``
line read on stdin; it exits when stdin ends. Every log record (WARNING and
up) goes to stderr as one JSON object a line, so that the test can read
multi-line records (tracebacks) whole.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import sys
import threading
from typing import Any

import anyio
import pbcore_anyio
import pbcore_asyncio
import pbcore_blocking

from pbcore.factory import PBServerFactory
from pbcore.flavors import Root


class Echo(Root):
    def remote_echo(self, value: Any) -> Any:
        return value


class JsonLines(logging.Handler):
    """One log record, traceback included, per line of stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = json.dumps(
                {
                    "name": record.name,
                    "level": record.levelname,
                    "message": record.getMessage(),
                    "exc": logging.Formatter().formatException(record.exc_info) if record.exc_info else None,
                }
            )
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def answer_commands() -> None:
    # In a thread of its own, so that it answers whatever the server's loop is doing.
    for line in sys.stdin:
        if line.strip() == "cpu":
            times = os.times()
            say(f"cpu {times.user + times.system!r}")
    os._exit(0)  # stdin ended: the test is over (no clean shutdown needed)


async def serve_asyncio(factory: PBServerFactory) -> None:
    server = await pbcore_asyncio.serve(factory, "127.0.0.1", 0)
    say(f"port {server.port}")
    await server.serve_forever()


async def serve_trio(factory: PBServerFactory) -> None:
    import pbcore_trio  # noqa: PLC0415 (trio is optional; imported before the limit is lowered)
    import trio  # noqa: PLC0415

    async with pbcore_trio.open_server(factory, "127.0.0.1", 0) as server:
        say(f"port {server.port}")
        await trio.sleep_forever()


async def serve_anyio(factory: PBServerFactory) -> None:
    async with pbcore_anyio.open_server(factory, "127.0.0.1", 0) as server:
        say(f"port {server.port}")
        await anyio.sleep_forever()


def main(adapter: str, limit: int) -> None:
    handler = JsonLines()
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    # Every module the server needs is imported before the limit is lowered.
    if adapter in ("trio", "anyio-trio"):
        import pbcore_trio  # noqa: F401, PLC0415 (trio is optional)
        import trio  # noqa: PLC0415
    elif adapter == "uvloop":
        import uvloop  # noqa: PLC0415 (uvloop is optional)
    elif adapter not in ("asyncio", "anyio-asyncio", "blocking"):
        raise SystemExit(f"unknown adapter {adapter!r}")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    threading.Thread(target=answer_commands, name="commands", daemon=True).start()
    factory = PBServerFactory(Echo())
    if adapter == "asyncio":
        asyncio.run(serve_asyncio(factory))
    elif adapter == "uvloop":
        uvloop.run(serve_asyncio(factory))
    elif adapter == "trio":
        trio.run(serve_trio, factory)
    elif adapter.startswith("anyio-"):
        anyio.run(serve_anyio, factory, backend=adapter.removeprefix("anyio-"))
    else:
        server = pbcore_blocking.serve(factory, "127.0.0.1", 0)
        say(f"port {server.port}")
        server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
