"""Calls through two connected brokers in memory: pbcore against Twisted, same run.

No sockets and no event loop: each side's bytes are handed to the other by
hand, so what is measured is the protocol's own cost per call (encode the
message, decode it, dispatch it, run the method, encode and decode the
answer, resolve the caller's result). Run ``python bench/broker.py``;
``--quick`` for a smoke run. Figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import time
from collections.abc import Callable
from typing import Any

from pbcore import Root
from pbcore.testing import BrokerPair

pb: Any = importlib.import_module("twisted.spread.pb")
iosim: Any = importlib.import_module("twisted.test.iosim")

PAYLOADS: dict[str, Any] = {
    "int": 1,
    "small dict": {"name": "user-7", "id": 7, "tags": ["a", "b"]},
    "100 dicts": [{"name": f"user-{i}", "id": i, "score": i * 1.5, "ok": True} for i in range(100)],
}


class OurRoot(Root):
    def remote_echo(self, value: Any) -> Any:
        return value


class TwistedRoot(pb.Root):  # type: ignore[misc]
    def remote_echo(self, value: Any) -> Any:
        return value


def pbcore_calls(payload: Any, calls: int) -> Callable[[], None]:
    pair = BrokerPair(OurRoot())
    root = pair.client.root()

    def run() -> None:
        for _ in range(calls):
            pending = root.callRemote("echo", payload)
            pair.pump()
            assert pending.done

    return run


def twisted_calls(payload: Any, calls: int) -> Callable[[], None]:
    server_factory = pb.PBServerFactory(TwistedRoot())
    client_factory = pb.PBClientFactory()
    _client, _server, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None), greet=False
    )
    pump.flush()
    roots: list[Any] = []
    client_factory.getRootObject().addCallback(roots.append)
    pump.flush()
    root = roots[0]

    def run() -> None:
        for _ in range(calls):
            done: list[Any] = []
            root.callRemote("echo", payload).addCallback(done.append)
            pump.flush()
            assert done

    return run


def best(run: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a few calls, for a smoke test")
    args = parser.parse_args(argv)
    calls, repeat = (20, 1) if args.quick else (args.calls, args.repeat)
    print(f"{calls} sequential echo calls through two connected brokers in memory (best of {repeat})")
    print(f"{'payload':>12} | {'Twisted':>12} {'pbcore':>12} | {'pbcore calls/s':>14} {'ratio':>6}")
    for name, payload in PAYLOADS.items():
        ours = best(pbcore_calls(payload, calls), repeat)
        theirs = best(twisted_calls(payload, calls), repeat)
        print(
            f"{name:>12} | {theirs / calls * 1e6:>9.1f} us {ours / calls * 1e6:>9.1f} us |"
            f" {calls / ours:>14.0f} {theirs / ours:>5.1f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
