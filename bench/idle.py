"""What an idle PB connection costs a server: resident memory per connection, pbcore against Twisted.

A server runs in a subprocess of its own (``--serve SIDE``): Twisted's
``twisted.spread.pb`` on its default reactor, or pbcore on asyncio, uvloop or
trio. A client process opens ``--connections`` PB connections to it, each
through the handshake to the root object, and holds them open. The server's
resident set (``VmRSS``, after a ``gc.collect()``) is read before the first
connection and once all are up; the figure is the difference over the count,
in KiB. Run ``python bench/idle.py``; ``--quick`` for a smoke run. Figures:
docs/performance.md, "Idle connections".
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pbcore_asyncio

import pbcore

SIDES = ("twisted", "asyncio", "uvloop", "trio")


def rss_kib() -> int:
    """This process's resident set, in KiB, after a collection."""
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def answer_requests() -> None:
    # The parent writes a line whenever it wants a reading; the answer is one line of JSON.
    for _line in sys.stdin:
        print(json.dumps({"rss_kib": rss_kib()}), flush=True)


class Root(pbcore.Root):
    def remote_echo(self, value: Any) -> Any:
        return value


def serve(side: str) -> None:
    """Serve PB on a free port, print it, then answer memory readings until stdin closes."""
    if side == "twisted":
        reactor: Any = importlib.import_module("twisted.internet.reactor")
        pb: Any = importlib.import_module("twisted.spread.pb")

        class TwistedRoot(pb.Root):  # type: ignore[misc]
            def remote_echo(self, value: Any) -> Any:
                return value

        port = reactor.listenTCP(0, pb.PBServerFactory(TwistedRoot()), interface="127.0.0.1", backlog=1024)
        print(port.getHost().port, flush=True)

        def answer_then_stop() -> None:
            answer_requests()
            reactor.callFromThread(reactor.stop)

        threading.Thread(target=answer_then_stop, daemon=True).start()
        reactor.run(installSignalHandlers=False)
        return
    if side == "trio":
        trio: Any = importlib.import_module("trio")
        pbcore_trio: Any = importlib.import_module("pbcore_trio")

        async def main_trio() -> None:
            async with pbcore_trio.open_server(pbcore.PBServerFactory(Root()), backlog=1024) as server:
                print(server.port, flush=True)
                await trio.to_thread.run_sync(answer_requests)

        trio.run(main_trio)
        return

    async def main() -> None:
        server = await pbcore_asyncio.serve(pbcore.PBServerFactory(Root()), "127.0.0.1", 0, backlog=1024)
        print(server.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, answer_requests)
        await server.aclose()

    if side == "uvloop":
        importlib.import_module("uvloop").run(main())
    else:
        asyncio.run(main())


async def hold(port: int, count: int, ready: Any) -> None:
    """Open *count* PB connections to *port*, each up to its root object, call *ready*, keep them open."""
    connections = []
    for start in range(0, count, 100):  # in batches, within the server's accept backlog
        batch = [pbcore.PBClientFactory() for _ in range(min(100, count - start))]
        connections += await asyncio.gather(*(pbcore_asyncio.connect(f, "127.0.0.1", port) for f in batch))
        await asyncio.gather(*(f.getRootObject() for f in batch))
    await asyncio.get_running_loop().run_in_executor(None, ready)
    for connection in connections:
        connection.close()
    for connection in connections:
        await connection.wait_closed()


def measure(side: str, count: int) -> dict[str, Any]:
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", side],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        port = int(server.stdout.readline())

        def reading() -> int:
            assert server.stdin is not None and server.stdout is not None
            server.stdin.write("\n")
            server.stdin.flush()
            return int(json.loads(server.stdout.readline())["rss_kib"])

        before = reading()
        after: list[int] = []
        asyncio.run(hold(port, count, lambda: after.append(reading())))
        return {"side": side, "connections": count, "before_kib": before, "after_kib": after[0]}
    finally:
        server.stdin.close()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="servers started per side (the best is shown)")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--quick", action="store_true", help="50 connections, one round: a smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write every reading")
    parser.add_argument("--serve", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    count, rounds = (50, 1) if args.quick else (args.connections, args.rounds)
    sides = [s for s in args.sides.split(",") if s != "uvloop" or importlib.util.find_spec("uvloop")]
    records = []
    for _ in range(rounds):
        for side in sides:
            records.append(measure(side, count))
    print(f"resident memory per idle PB connection on the server, {count} connections (best of {rounds})")
    best: dict[str, float] = {}
    for side in sides:
        per = [(r["after_kib"] - r["before_kib"]) / count for r in records if r["side"] == side]
        best[side] = min(per)
        spread = f"{min(per):.1f}-{max(per):.1f}"
        print(f"{side:>8}: {min(per):6.1f} KiB  (range {spread} KiB)")
    if "twisted" in best:
        for side, kib in best.items():
            if side != "twisted":
                print(f"{side:>8}: {kib / best['twisted']:.2f}x Twisted's")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
