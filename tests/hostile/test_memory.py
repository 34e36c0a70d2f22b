"""Memory under attack, over sockets: many connections each holding an unfinished message.

One connection's decoder is bounded by ``Limits.max_decoded_bytes``; all of them together by
the process-wide :class:`pbcore.MemoryBudget`. Here each server (in a subprocess, with a
budget of 64 MiB) gets 16 connections, each sending 1.5 MB of a message it never finishes
(short strings: 11 times their size in memory). Without the budget the server holds
about 320 MB (measured); with it, the connections past the budget are closed (``OverBudget``), the
others keep what they sent, the server's resident memory grows by about the budget, and a
well-behaved client is served throughout.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Final

import pytest

from pbcore import banana

from .probe import Probe
from .processes import memory, start_server
from .report import Row, record
from .serve import ADAPTERS, BUDGET_VARIABLE
from .wire import RawPeer

BUDGET: Final = 64 * 1024 * 1024
CONNECTIONS: Final = 16
SENT: Final = 1_500_000  # bytes each connection sends, of a message that never ends


def unfinished_message() -> bytes:
    """The start of a call whose one argument is a list of 600,000 two-byte strings, cut at SENT bytes."""
    head = b"".join(banana.encode(atom) for atom in (b"message", 1, b"root", b"echo", 1))
    body = banana.int_to_b128(600_000) + b"\x80" + b"\x02\x82ab" * 600_000
    return (banana.int_to_b128(7) + b"\x80" + head + body)[:SENT]


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed *sock* (reads what it sent: nothing else is expected)."""
    sock.settimeout(0.5)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_unfinished_messages_on_many_connections_stay_within_the_process_budget(
    adapter: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BUDGET_VARIABLE, str(BUDGET))
    server = start_server(adapter, tmp_path)
    peers: list[RawPeer] = []
    try:
        baseline = memory(server.pid, "VmRSS")
        data = unfinished_message()
        with Probe(server.port) as probe:
            for _ in range(CONNECTIONS):
                peer = RawPeer.connect("127.0.0.1", server.port)
                peers.append(peer)
                with contextlib.suppress(OSError):  # closed while we wrote: over the budget
                    peer.send_raw(data)
            closed = sum(closed_by_server(peer._stream.sock) for peer in peers)
            grown = memory(server.pid, "VmHWM") - baseline
            result = probe.stop()
        record(
            Row(
                target=adapter,
                phase="post-handshake",
                kind="unfinished x16",
                size=f"{SENT} B each",
                message_bytes=SENT,
                result=f"{closed} of {CONNECTIONS} closed (OverBudget)",
                cpu=None,
                wall=0.0,
                rss_growth=grown,
                probe=result.summary(),
                ok=closed >= 10 and grown < 1.6 * BUDGET,
            )
        )
        # Each connection holds about 11 x 1.5 MB = 16.5 MB counted: four fit in 64 MiB.
        assert 10 <= closed <= 13, f"{closed} of {CONNECTIONS} connections closed"
        assert grown < 1.6 * BUDGET, f"the server grew by {grown / 2**20:.0f} MiB (budget {BUDGET / 2**20:.0f} MiB)"
        assert not result.failures and result.worst < 2.0, result.summary()
        assert "OverBudget" in server.log_tail(20_000)
        assert server.alive
    finally:
        for peer in peers:
            peer.close()
        server.kill()
