"""PB over real loopback TCP sockets: pbcore's adapters against Twisted, same run.

Each side runs a PB server and a client in one process, on 127.0.0.1 TCP, and
times echo calls from the client to the server's root:

* ``twisted``: ``twisted.spread.pb`` client and server in one reactor (the
  default one: epoll on Linux);
* ``asyncio``: ``pbcore_asyncio`` client and server in one asyncio loop;
* ``uvloop``: the same on a uvloop loop (if uvloop is installed);
* ``trio``: ``pbcore_trio`` client and server in one ``trio.run`` (if trio is installed);
* ``blocking``: a ``pbcore_blocking`` client (the main thread, plus its reader
  thread) against a ``pbcore_asyncio`` server whose loop runs in a thread of
  the same process;
* ``asyncio-pure``: the ``asyncio`` side with the pure-Python codec forced
  (``PBCORE_PURE=1``), whether or not the compiled one is built;
* ``echo``: no PB at all: what the loop itself moves, the same bytes (each
  payload's ``pbcore.codec.dumps``) echoed raw over the same asyncio sockets,
  framed by a 4-byte length. The last column gives each side's best time as a
  share of it.

The scenarios: sequential round trips of an int (latency), calls of an int
pipelined (a window of calls issued, then all awaited in order: throughput),
and sequential echoes of a list of 100 dicts and of 100 KB of bytes (bulk).

Each side runs in a subprocess of its own (Twisted's reactor and asyncio do not
share a thread). A run is ``--rounds`` rounds; in each round every side's
subprocess is launched once (the order of the sides rotating from round to
round, so that a change in the machine's load hits every side) and measures
each scenario ``--repeat`` times after a warm-up. A figure is the **best**
(smallest) time over all rounds and repeats; the ratio is Twisted's best over
the side's best, on the wall clock and on CPU time (``process_time``, all the
threads of the side's process). The JSON record keeps every time and the
median (the table shows the median per call too). Run ``python bench/sockets.py``; ``--quick`` for a smoke run,
``--steady-malloc`` to raise glibc's mmap and trim thresholds in the sides
(some processes otherwise map and unmap asyncio's 256 KiB read buffer on
every read, others not), ``--profile SIDE`` to cProfile one side in this
process. Figures and findings: docs/performance.md, "Over sockets".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pbcore_asyncio
import pbcore_blocking

import pbcore
from pbcore import codec

SIDES: Final = ("twisted", "asyncio", "asyncio-pure", "uvloop", "trio", "blocking", "echo")
LABELS: Final = {
    "twisted": "Twisted",
    "asyncio": "asyncio",
    "asyncio-pure": "asyncio (pure)",
    "uvloop": "uvloop",
    "trio": "trio",
    "blocking": "blocking",
    "echo": "raw echo",
}
#: Sides run with the pure-Python codec forced (PBCORE_PURE=1), whatever is compiled.
PURE: Final = frozenset({"asyncio-pure"})
#: Sides that need an optional package, and which.
OPTIONAL: Final = {"uvloop": "uvloop", "trio": "trio"}
BYTES_SIZE: Final = 100_000


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    payload_name: str
    #: Calls per measurement.
    calls: int
    #: Calls in flight at once: 1 for sequential round trips.
    window: int = 1


def make_payload(name: str) -> Any:
    if name == "int":
        return 1
    if name == "100 dicts":
        return [{"name": f"user-{i}", "id": i, "score": i * 1.5, "ok": True} for i in range(100)]
    if name == "100 KB bytes":
        return bytes(range(256)) * (BYTES_SIZE // 256) + bytes(BYTES_SIZE % 256)
    raise ValueError(name)


def make_scenarios(settings: dict[str, int]) -> list[Scenario]:
    return [
        Scenario("seq", "sequential int", "int", settings["calls"]),
        Scenario("pipe", "pipelined int", "int", settings["pipelined"], settings["window"]),
        Scenario("dicts", "100 dicts", "100 dicts", settings["dict_calls"]),
        Scenario("bytes", "100 KB bytes", "100 KB bytes", settings["bytes_calls"]),
    ]


DEFAULTS: Final = {
    "calls": 2000,
    "pipelined": 5000,
    "window": 1000,
    "dict_calls": 50,
    "bytes_calls": 200,
    "repeat": 3,
    "rounds": 3,
}
QUICK: Final = {
    "calls": 20,
    "pipelined": 100,
    "window": 50,
    "dict_calls": 3,
    "bytes_calls": 3,
    "repeat": 1,
    "rounds": 1,
}
WARM_UP_CALLS: Final = 100
#: glibc settings for --steady-malloc: no mmap below 4 MiB, no heap trimming below 16 MiB.
STEADY_MALLOC: Final = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=16777216"


# ---------------------------------------------------------------------------
# What one side does: connect, warm up and check the echo, time each scenario.
#
# A side's driver is an async function taking ``echo(payload) -> awaitable``;
# every side awaits its calls one after the other, in order (a pipelined
# window is issued first, then awaited call by call), so that the client code
# is the same shape everywhere.

Times = dict[str, list[tuple[float, float]]]


async def drive(call: Callable[[Any], Awaitable[Any]], scenarios: list[Scenario], repeat: int) -> Times:
    """Warm up, check the echo, then time each scenario *repeat* times (wall, CPU)."""
    payloads = {s.payload_name: make_payload(s.payload_name) for s in scenarios}
    for payload in payloads.values():
        answer = await call(payload)
        if answer != payload:
            raise AssertionError(f"the echo came back different: {answer!r:.80}")
    for _ in range(WARM_UP_CALLS):
        await call(1)
    times: Times = {}
    for scenario in scenarios:
        payload = payloads[scenario.payload_name]
        for _ in range(repeat):
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            if scenario.window == 1:
                for _ in range(scenario.calls):
                    await call(payload)
            else:
                left = scenario.calls
                while left:
                    batch = min(left, scenario.window)
                    pending = [call(payload) for _ in range(batch)]
                    for one in pending:
                        await one
                    left -= batch
            times.setdefault(scenario.key, []).append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


class EchoRoot(pbcore.Root):
    def remote_echo(self, value: Any) -> Any:
        return value


def run_twisted(scenarios: list[Scenario], repeat: int, nodelay: bool = False) -> Times:
    reactor: Any = importlib.import_module("twisted.internet.reactor")
    defer: Any = importlib.import_module("twisted.internet.defer")
    pb: Any = importlib.import_module("twisted.spread.pb")

    class Root(pb.Root):  # type: ignore[misc]
        def remote_echo(self, value: Any) -> Any:
            return value

    class ServerFactory(pb.PBServerFactory):  # type: ignore[misc]
        def clientConnectionMade(self, protocol: Any) -> None:
            if nodelay:
                protocol.transport.setTcpNoDelay(True)

    port = reactor.listenTCP(0, ServerFactory(Root()), interface="127.0.0.1")
    client_factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", port.getHost().port, client_factory)
    result: dict[str, Any] = {}

    async def main() -> None:
        try:
            root = await client_factory.getRootObject()
            if nodelay:
                root.broker.transport.setTcpNoDelay(True)
            result["times"] = await drive(lambda value: root.callRemote("echo", value), scenarios, repeat)
        except BaseException as error:
            result["error"] = error
        finally:
            client_factory.disconnect()
            await port.stopListening()
            reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(main()))
    reactor.run(installSignalHandlers=False)
    if "error" in result:
        raise result["error"]
    times: Times = result["times"]
    return times


def run_asyncio(scenarios: list[Scenario], repeat: int, loop_factory: Callable[[], Any] | None = None) -> Times:
    async def main() -> Times:
        server = await pbcore_asyncio.serve(pbcore.PBServerFactory(EchoRoot()), "127.0.0.1", 0)
        factory = pbcore.PBClientFactory()
        connection = await pbcore_asyncio.connect(factory, "127.0.0.1", server.port)
        try:
            root = await factory.getRootObject()
            return await drive(lambda value: root.callRemote("echo", value), scenarios, repeat)
        finally:
            connection.close()
            await connection.wait_closed()
            await server.aclose()

    loop = (loop_factory or asyncio.new_event_loop)()
    try:
        times: Times = loop.run_until_complete(main())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
    return times


class _Echo(asyncio.Protocol):
    """Both ends of the raw echo: frames of a 4-byte length and the bytes; the server sends each back."""

    def __init__(self, answers: collections.deque[tuple[asyncio.Future[Any], Any]] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.answers = answers  # the client's futures, in order, and what each resolves to
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        buffer, start = self.buffer, 0
        while len(buffer) - start >= 4:
            end = start + 4 + int.from_bytes(buffer[start : start + 4], "big")
            if end > len(buffer):
                break
            if self.answers is None:
                assert self.transport is not None
                self.transport.write(bytes(buffer[start:end]))
            else:
                future, value = self.answers.popleft()
                future.set_result(value)
            start = end
        del buffer[:start]


def run_echo(scenarios: list[Scenario], repeat: int) -> Times:
    """What the loop itself moves: the PB message's bytes echoed raw over the same asyncio sockets."""

    async def main() -> Times:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Echo, "127.0.0.1", 0)
        answers: collections.deque[tuple[asyncio.Future[Any], Any]] = collections.deque()
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(lambda: _Echo(answers), "127.0.0.1", port)
        frames: dict[int, tuple[Any, bytes]] = {}  # id(payload) -> (payload, its frame)

        def call(value: Any) -> asyncio.Future[Any]:
            known = frames.get(id(value))
            if known is None or known[0] is not value:
                data = codec.dumps(value)  # as many bytes as PB's (less its call header)
                known = frames[id(value)] = (value, len(data).to_bytes(4, "big") + data)
            future = loop.create_future()
            answers.append((future, value))
            transport.write(known[1])
            return future

        try:
            return await drive(call, scenarios, repeat)
        finally:
            transport.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def run_uvloop(scenarios: list[Scenario], repeat: int) -> Times:
    uvloop: Any = importlib.import_module("uvloop")
    return run_asyncio(scenarios, repeat, uvloop.new_event_loop)


def run_trio(scenarios: list[Scenario], repeat: int) -> Times:
    # trio is an optional extra: imported only by the trio side.
    trio: Any = importlib.import_module("trio")
    pbcore_trio: Any = importlib.import_module("pbcore_trio")

    async def main() -> Times:
        async with pbcore_trio.open_server(pbcore.PBServerFactory(EchoRoot())) as server:
            factory = pbcore.PBClientFactory()
            async with pbcore_trio.open_connection(factory, "127.0.0.1", server.port):
                root = await factory.getRootObject()
                return await drive(lambda value: root.callRemote("echo", value), scenarios, repeat)

    times: Times = trio.run(main)
    return times


def run_blocking(scenarios: list[Scenario], repeat: int) -> Times:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="asyncio-server", daemon=True)
    thread.start()
    try:
        server = asyncio.run_coroutine_threadsafe(
            pbcore_asyncio.serve(pbcore.PBServerFactory(EchoRoot()), "127.0.0.1", 0), loop
        ).result()
        with pbcore_blocking.connect(pbcore.PBClientFactory(), "127.0.0.1", server.port) as connection:
            root = connection.root()
            # connection.run drives the coroutine in this thread: each awaited
            # call blocks until answered; a window's calls are all issued first.
            times: Times = connection.run(drive(lambda value: root.callRemote("echo", value), scenarios, repeat))

        asyncio.run_coroutine_threadsafe(server.aclose(), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    return times


def run_side(side: str, scenarios: list[Scenario], repeat: int, twisted_nodelay: bool = False) -> Times:
    if side == "twisted":
        return run_twisted(scenarios, repeat, twisted_nodelay)
    runners: dict[str, Callable[[list[Scenario], int], Times]] = {
        "asyncio": run_asyncio,
        "asyncio-pure": run_asyncio,
        "uvloop": run_uvloop,
        "echo": run_echo,
        "trio": run_trio,
        "blocking": run_blocking,
    }
    return runners[side](scenarios, repeat)


# ---------------------------------------------------------------------------
# The orchestrator: subprocesses, rounds, the table.


def worker_command(side: str, args: argparse.Namespace, settings: dict[str, int]) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--only", args.only]
    for key in ("calls", "pipelined", "window", "dict_calls", "bytes_calls", "repeat"):
        command += [f"--{key.replace('_', '-')}", str(settings[key])]
    if args.twisted_nodelay:
        command.append("--twisted-nodelay")
    if args.cpu is not None:
        command += ["--cpu", str(args.cpu)]
    return command


def run_worker(side: str, args: argparse.Namespace, settings: dict[str, int]) -> Times:
    env = dict(os.environ)
    if side in PURE:
        env["PBCORE_PURE"] = "1"
    if args.steady_malloc:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), STEADY_MALLOC]))
    completed = subprocess.run(
        worker_command(side, args, settings), capture_output=True, text=True, timeout=600, check=False, env=env
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the {side} side failed:\n{completed.stderr}")
    record: dict[str, list[list[float]]] = json.loads(completed.stdout.strip().splitlines()[-1])
    return {key: [(wall, cpu) for wall, cpu in values] for key, values in record.items()}


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.1f} us"


def selected(scenarios: list[Scenario], only: str) -> list[Scenario]:
    keys = [key.strip() for key in only.split(",") if key.strip()]
    unknown = set(keys) - {s.key for s in scenarios}
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return [s for s in scenarios if s.key in keys]


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("pbcore", "twisted", "trio", "uvloop"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def available_sides() -> list[str]:
    """Every side whose optional package (trio, uvloop) is installed."""
    return [side for side in SIDES if side not in OPTIONAL or importlib.util.find_spec(OPTIONAL[side]) is not None]


def profile_side(side: str, scenarios: list[Scenario], repeat: int, top: int, nodelay: bool) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run_side(side, scenarios, repeat, nodelay)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, help=f"sequential int calls (default {DEFAULTS['calls']})")
    parser.add_argument("--pipelined", type=int, help=f"pipelined int calls (default {DEFAULTS['pipelined']})")
    parser.add_argument("--window", type=int, help=f"pipelined calls in flight (default {DEFAULTS['window']})")
    parser.add_argument("--dict-calls", type=int, help=f"sequential 100-dict calls (default {DEFAULTS['dict_calls']})")
    parser.add_argument("--bytes-calls", type=int, help=f"sequential 100 KB calls (default {DEFAULTS['bytes_calls']})")
    parser.add_argument("--repeat", type=int, help=f"timings per scenario per round (default {DEFAULTS['repeat']})")
    parser.add_argument("--rounds", type=int, help=f"subprocess launches per side (default {DEFAULTS['rounds']})")
    parser.add_argument(
        "--sides", default=",".join(available_sides()), help="comma separated, from: " + ", ".join(SIDES)
    )
    parser.add_argument("--only", default="seq,pipe,dicts,bytes", help="scenarios: seq, pipe, dicts, bytes")
    parser.add_argument(
        "--clock",
        choices=("perf_counter", "process_time"),
        default="perf_counter",
        help="the clock of the time columns (both ratios are always shown)",
    )
    parser.add_argument("--twisted-nodelay", action="store_true", help="set TCP_NODELAY on Twisted's sockets too")
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help="run the sides with glibc's mmap and trim thresholds raised (GLIBC_TUNABLES), so that a large"
        " read buffer is not mapped and unmapped on every read in some processes and not in others"
        " (no effect on --profile)",
    )
    parser.add_argument(
        "--cpu",
        type=int,
        metavar="N",
        help="run every side on CPU N alone (sched_setaffinity): the kernel's loopback work is then charged to"
        " the side's process; unpinned, some of it runs on another CPU, uncounted, more in some processes than"
        " in others (Linux only)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the raw times")
    parser.add_argument("--quick", action="store_true", help="a few calls, one round: a smoke test")
    parser.add_argument("--profile", metavar="SIDE", choices=SIDES, help="cProfile one side in this process")
    parser.add_argument("--top", type=int, default=25, help="functions listed by --profile")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    base = QUICK if args.quick else DEFAULTS
    settings = {key: getattr(args, key) if getattr(args, key) is not None else base[key] for key in DEFAULTS}
    scenarios = selected(make_scenarios(settings), args.only)

    if args.worker:
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        times = run_side(args.worker, scenarios, settings["repeat"], args.twisted_nodelay)
        print(json.dumps(times))
        return 0
    if args.profile:
        profile_side(args.profile, scenarios, settings["repeat"], args.top, args.twisted_nodelay)
        return 0

    sides = [side.strip() for side in args.sides.split(",") if side.strip()]
    if not set(sides) <= set(SIDES):
        parser.error(f"--sides: choose from {', '.join(SIDES)}")
    if "twisted" not in sides:
        sides.insert(0, "twisted")  # the baseline of every ratio
    clock = 0 if args.clock == "perf_counter" else 1
    print(
        f"PB echo calls over 127.0.0.1 TCP, client and server in one process per side; best of "
        f"{settings['rounds']} rounds x {settings['repeat']} repeats ({args.clock})"
        + ("; glibc malloc thresholds raised (--steady-malloc)" if args.steady_malloc else "")
        + (f"; every side on CPU {args.cpu} (--cpu)" if args.cpu is not None else "")
    )
    print(
        f"sequential int: {settings['calls']} calls; pipelined int: {settings['pipelined']} calls, "
        f"{settings['window']} in flight; 100 dicts: {settings['dict_calls']} calls; "
        f"100 KB bytes: {settings['bytes_calls']} calls"
    )
    all_times: dict[str, dict[str, list[tuple[float, float]]]] = {side: {} for side in sides}
    for round_number in range(settings["rounds"]):
        shift = round_number % len(sides)
        for side in sides[shift:] + sides[:shift]:
            for key, measured in run_worker(side, args, settings).items():
                all_times[side].setdefault(key, []).extend(measured)

    def figures(side: str, key: str, which: int = clock) -> list[float]:
        return [value[which] for value in all_times[side][key]]

    print(
        f"{'scenario':>15} {'side':>14} | {'time':>10} {'per call':>10} {'median':>10} {'calls/s':>9} |"
        f" {'Twisted/side: wall':>18} {'CPU':>6}" + (" | of the echo" if "echo" in sides else "")
    )
    results: list[dict[str, Any]] = []
    for scenario in scenarios:
        baseline = min(figures("twisted", scenario.key))
        baselines = [min(figures("twisted", scenario.key, which)) for which in (0, 1)]
        for side in sides:
            values = figures(side, scenario.key)
            seconds = min(values)
            ratios = [baselines[which] / min(figures(side, scenario.key, which)) for which in (0, 1)]
            label = scenario.label if side == sides[0] else ""
            median = statistics.median(values) / scenario.calls
            # The raw echo's best time over this side's: the share of what the loop itself moves.
            of_echo = f" | {min(figures('echo', scenario.key)) / seconds:>11.1%}" if "echo" in sides else ""
            print(
                f"{label:>15} {LABELS[side]:>14} | {fmt_time(seconds):>10} {fmt_time(seconds / scenario.calls):>10}"
                f" {fmt_time(median):>10} {scenario.calls / seconds:>9.0f} | {ratios[0]:>17.2f}x {ratios[1]:>5.2f}x"
                + of_echo
            )
            results.append(
                {
                    "scenario": scenario.key,
                    "side": side,
                    "calls": scenario.calls,
                    "window": scenario.window,
                    "best_s": seconds,
                    "median_s": statistics.median(values),
                    "calls_per_s": scenario.calls / seconds,
                    "ratio": baseline / seconds,
                    "ratio_wall": ratios[0],
                    "ratio_cpu": ratios[1],
                    "times": all_times[side][scenario.key],
                }
            )
    if args.json:
        record = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "versions": versions(),
            "settings": {
                **settings,
                "clock": args.clock,
                "twisted_nodelay": args.twisted_nodelay,
                "steady_malloc": args.steady_malloc,
                "cpu": args.cpu,
            },
            "results": results,
        }
        Path(args.json).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
