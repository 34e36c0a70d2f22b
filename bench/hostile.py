"""The server's CPU for one attack message, pbcore against Twisted, for each bomb of issue 9.

Each side serves a root whose ``echo`` returns its argument, in a subprocess
of its own on 127.0.0.1:

* ``pbcore``: ``python -m tests.hostile.serve asyncio`` (the demo service's
  open root, on pbcore_asyncio: what ``pbcore serve`` runs);
* ``twisted``: this file with ``--serve-twisted``: a ``twisted.spread.pb.Root``
  with ``remote_echo``, served by ``pb.PBServerFactory`` on the default reactor.

For each bomb (tests/hostile/bombs.py) and size, a raw attacker client
(tests/hostile/wire.py: it never unjellies) connects, sends one call
``echo(bomb)`` and waits for the reply. The figure is the server process's
CPU time over that (utime + stime from ``/proc/<pid>/stat``, every thread;
10 ms resolution), and how much its peak RSS (``VmHWM``) grew: one measurement, since these costs run from milliseconds
to hours and the noise of a shared machine does not change their order. A
server still busy after ``--cap`` seconds of CPU is killed and the figure is
``> cap``; the larger sizes of that bomb are then not tried on that side
(they would only be slower). A server that dies (a crash: the C stack) says
so. What came back is shown too: ``answer``, ``error <type>``, ``dropped``.

Run ``python bench/hostile.py`` (about ten minutes, most of it waiting for the
caps); ``--cap 5`` for a shorter run, ``--quick`` for a smoke run (two sizes
a bomb, a cap of 2 s), ``--kinds dict-key,failure`` for some bombs only,
``--json FILE`` to keep the figures. Needs Twisted (a test dependency).
Findings: reported with the attack suite (tests/hostile/).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from tests.hostile import bombs
from tests.hostile.processes import ServerProcess, server_command, start_server
from tests.hostile.wire import NoReply, PeerClosed, RawPeer, error_summary, failure_fields

SIDES: Final = ("pbcore", "twisted")

#: Each bomb and its sizes (laughs depths, key counts, tuple depths), smallest first.
SIZES: Final[dict[str, tuple[int, ...]]] = {
    "dict-key": (16, 20, 24, 28, 32, 64),
    "set-member": (16, 20, 24, 28, 32),
    "equal-pair": (16, 20, 24, 28),
    "dict-key-nested": (16, 20, 24, 28, 32),
    "list-laughs": (16, 64, 200),
    "failure": (12, 16, 20, 24),
    "collision-dict": (1_000, 10_000, 100_000, 300_000),
    "collision-tuples": (1_000, 10_000, 100_000),
    "deep-key": (1_000, 10_000, 100_000, 200_000),
    "deep-holder-key": (1_000, 10_000, 30_000, 100_000),
}
COUNTED: Final = frozenset({"collision-dict", "collision-tuples"})


def label(kind: str, n: int) -> str:
    return f"{n} keys" if kind in COUNTED else f"depth {n}"


def serve_twisted() -> int:
    """The Twisted side: a pb.Root with remote_echo on an ephemeral port; writes ``PORT <n>``."""
    # Twisted only in this mode (and untyped: Any).
    reactor: Any = importlib.import_module("twisted.internet.reactor")
    pb: Any = importlib.import_module("twisted.spread.pb")

    class Root(pb.Root):  # type: ignore[misc]
        def remote_echo(self, *args: Any) -> Any:
            return args[0] if len(args) == 1 else args

    port = reactor.listenTCP(0, pb.PBServerFactory(Root()), interface="127.0.0.1")
    sys.stdout.write(f"PORT {port.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()
    return 0


def command(side: str) -> list[str]:
    if side == "twisted":
        return [sys.executable, str(Path(__file__).resolve()), "--serve-twisted"]
    return server_command("asyncio")


def describe(kind: str, body: Any) -> str:
    if kind == "error":
        name, text = error_summary(body)
        return f"error {name.rsplit('.', 1)[-1]}: {text[:50]!r} ({len(text)} chars)"
    if failure_fields(body):
        value = failure_fields(body).get("value", "")
        return f"answer: a failure ({len(value) if isinstance(value, str) else '?'} chars of value)"
    if isinstance(body, list) and body and isinstance(body[0], bytes):
        return f"answer [{body[0].decode('utf-8', 'replace')[:30]}, ...]"
    return f"answer {type(body).__name__}"


def attack_once(server: ServerProcess, body: Any, cap: float) -> dict[str, Any]:
    """One ``echo(body)`` call: the server's CPU for it, and what came back."""
    peer = RawPeer.connect("127.0.0.1", server.port, timeout=10.0)
    try:
        start_cpu, start_peak, start = server.cpu(), server.peak_rss(), time.monotonic()
        # The last figures read: all there is once the process has died.
        last = [start_cpu]
        peak = [start_peak]

        def give_up() -> str | None:
            if not server.alive:
                return f"crashed ({server.exit_status()})"
            last[0] = max(last[0], server.cpu())
            peak[0] = max(peak[0], server.peak_rss())
            return "over the cap" if last[0] - start_cpu > cap else None

        def grown() -> int:
            return max(max(peak[0], server.peak_rss() if server.alive else 0) - start_peak, 0)

        try:
            reply = peer.wait_reply(peer.send_call(b"root", b"echo", bombs.args(body)), cap * 3 + 10, give_up)
        except NoReply as why:
            over = str(why) == "over the cap" or "no reply within" in str(why)
            rss = grown()
            if server.alive:
                server.kill()
            return {"cpu": None if over else last[0] - start_cpu, "rss": rss, "over_cap": over, "result": str(why)}
        except PeerClosed:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.process.wait(1.0)  # closed because the process died? then say how
            status = "dropped the connection" if server.alive else f"crashed ({server.exit_status()})"
            return {"cpu": last[0] - start_cpu, "rss": grown(), "over_cap": False, "result": status}
        return {
            "cpu": server.cpu() - start_cpu,
            "rss": grown(),
            "wall": time.monotonic() - start,
            "over_cap": False,
            "result": describe(reply.kind, reply.body),
        }
    finally:
        peer.close()


def run(kinds: list[str], cap: float, quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pbcore-bench-hostile-") as directory:
        for kind in kinds:
            sizes = SIZES[kind][:2] if quick else SIZES[kind]
            stopped: dict[str, str] = {}
            servers: dict[str, ServerProcess] = {}
            try:
                for n in sizes:
                    body = bombs.build(kind, n)
                    row: dict[str, Any] = {
                        "kind": kind,
                        "size": label(kind, n),
                        "bytes": bombs.message_size(body),
                    }
                    for side in SIDES:
                        if side in stopped:
                            row[side] = {"cpu": None, "over_cap": False, "result": stopped[side]}
                            continue
                        server = servers.get(side)
                        if server is None or server.spent or not server.alive:
                            server = servers[side] = start_server(side, Path(directory), command(side))
                        figure = attack_once(server, body, cap)
                        row[side] = figure
                        if figure["over_cap"]:
                            stopped[side] = "not tried (smaller was over the cap)"
                        elif not server.alive:
                            stopped[side] = "not tried (smaller crashed it)"
                    rows.append(row)
                    sys.stderr.write(f"  {kind} {row['size']}: " + "; ".join(_cell(row[s], cap) for s in SIDES) + "\n")
            finally:
                for server in servers.values():
                    server.kill()
    return rows


def _cell(figure: dict[str, Any], cap: float) -> str:
    rss = figure.get("rss")
    grew = "" if rss is None else f", +{rss / 1024**2:.0f} MB"
    if figure["over_cap"]:
        return f"> {cap:g} s{grew}"
    cpu = figure["cpu"]
    cost = "-" if cpu is None else f"{cpu:.2f} s"
    return f"{cost}{grew} {figure['result']}"


def table(rows: list[dict[str, Any]], cap: float) -> str:
    header = ["bomb", "size", "bytes", "pbcore (CPU, RSS growth, reply)", "Twisted (CPU, RSS growth, reply)"]
    lines = [header] + [
        [row["kind"], row["size"], str(row["bytes"]), _cell(row["pbcore"], cap), _cell(row["twisted"], cap)]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cap", type=float, default=20.0, help="server CPU seconds before a bomb counts as a hang")
    parser.add_argument("--kinds", default=",".join(SIZES), help="comma-separated bombs (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: two sizes a bomb, a cap of 2 s")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--serve-twisted", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_twisted:
        return serve_twisted()
    kinds = [kind for kind in args.kinds.split(",") if kind]
    unknown = [kind for kind in kinds if kind not in SIZES]
    if unknown:
        parser.error(f"unknown bombs {unknown}; known: {', '.join(SIZES)}")
    cap = 2.0 if args.quick else args.cap
    rows = run(kinds, cap, args.quick)
    print(f"Server CPU for one echo(bomb) call; killed past {cap:g} s of CPU (10 ms resolution)")
    print(table(rows, cap))
    if args.json:
        Path(args.json).write_text(json.dumps({"cap": cap, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
