"""One attack message against a server, measured; a series of them at growing sizes, judged.

:func:`attack` connects a :class:`~tests.hostile.wire.RawPeer` (logging in
first for the ``post-login`` phase), starts the well-behaved
:class:`~tests.hostile.probe.Probe`, sends one call carrying the bomb and
waits for its reply, bounded twice: by :data:`CPU_BUDGET` seconds of the
server's CPU (read from ``/proc``, steady on a loaded machine) and by
:data:`WALL_CAP` seconds. A server over either bound is killed (the pool
starts a fresh one for the next attack). Then it checks that the attacker's
connection still works.

The intended behaviour (issue 9), which :func:`problems` holds each outcome to:

* the call gets a reply, and quickly: an *error answer* (a ``JellyError``
  refusal) where the message is refused, or, for what a server may accept
  (shared values that are never hashed, colliding keys handled in linear
  time), the answer;
* any failure text that comes back is bounded;
* the connection stays open (a plain call on it afterwards is answered);
* the server's CPU for the attack is under a generous hang bound (the
  budget above), its
  process neither crashes nor grows by hundreds of megabytes;
* the concurrent well-behaved client's every call returns within
  :data:`LATENCY_BOUND`.

Bounds can be changed through the environment: ``HOSTILE_CPU_BUDGET``,
``HOSTILE_WALL_CAP`` (seconds).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Final

import attrs
import pytest

from . import bombs, report
from .bombs import Sexp
from .probe import Probe, ProbeResult
from .processes import ServerPool, ServerProcess
from .serve import PASSWORD, USER
from .wire import NoReply, PeerClosed, RawPeer, Reply, error_summary, failure_fields, preview

__all__ = [
    "CPU_BUDGET",
    "PHASES",
    "Expect",
    "Outcome",
    "attack",
    "check_series",
    "problems",
    "run_series",
]

#: Before login (the bomb is ``root.login``'s argument) and after (the avatar's ``echo``). A third
#: phase, ``mid-login``, sends it to the challenger's ``respond`` (after ``login``, before the check).
PHASES: Final = ("pre-login", "post-login")
#: Server CPU one attack may use before the server counts as hung (and is killed): the hang
#: bound, asserted. A defended server refuses a bomb in milliseconds; this is 100 times that.
CPU_BUDGET: Final = float(os.environ.get("HOSTILE_CPU_BUDGET", "2"))
#: Wall-clock seconds one attack may take, whatever the CPU.
WALL_CAP: Final = float(os.environ.get("HOSTILE_WALL_CAP", "10"))
#: Each of the concurrent client's calls must return within this.
LATENCY_BOUND: Final = 2.0
#: Failure text coming back (an error answer's message) must stay under this many characters.
TEXT_BOUND: Final = 10_000
#: An attack may grow the server's peak RSS by at most this.
RSS_BOUND: Final = 512 * 1024**2


class Expect:
    """What a reply must be: a refusal (an error answer naming a JellyError) or any reply."""

    REFUSAL: Final = "refusal"
    ANY: Final = "any reply"


@attrs.frozen
class Outcome:
    server: str
    phase: str
    kind: str
    size: str
    message_bytes: int
    reply: Reply | None
    no_reply: str | None  # why there was no reply (hung, connection dropped)
    cpu: float
    wall: float
    rss_growth: int
    connection_kept: str | None  # None: a call on the attacker's connection afterwards was answered
    probe: ProbeResult | None
    server_status: str  # "running", "killed by SIGKILL" (by us, after a hang), "killed by SIGSEGV", ...
    log_tail: str

    @property
    def error_type(self) -> str:
        return error_summary(self.reply.body)[0] if self.reply is not None and self.reply.kind == "error" else ""

    @property
    def text(self) -> str:
        """The failure text that came back (an error answer's, or an echoed failure's), else ""."""
        if self.reply is None:
            return ""
        fields = failure_fields(self.reply.body)
        if self.reply.kind == "error" or fields:
            value = fields.get("value", "")
            return value if isinstance(value, str) else preview(value)
        return ""

    def result(self) -> str:
        if self.reply is None:
            return f"no reply: {self.no_reply}"
        if self.reply.kind == "error":
            kind, text = error_summary(self.reply.body)
            return f"error {kind}: {text[:80]!r} ({len(self.text)} chars)"
        if failure_fields(self.reply.body):
            return f"answer: a failure copy ({len(self.text)} chars of text)"
        return f"answer {preview(self.reply.body, 60)}"


def attack(
    server: ServerProcess,
    phase: str,
    kind: str,
    size: str,
    body: Sexp,
    *,
    cpu_budget: float = CPU_BUDGET,
    wall_cap: float = WALL_CAP,
) -> Outcome:
    """Send *body* as the one argument of a call (``login`` before login, ``echo`` after); measure."""
    message_bytes = bombs.message_size(body)
    peer = RawPeer.connect("127.0.0.1", server.port)
    try:
        call_args = bombs.args(body)
        if phase == "pre-login":
            target: bytes | int = b"root"
            method = b"login"
        elif phase == "mid-login":  # the challenger's respond(response, mind): before any password is checked
            _, target = peer.challenge(USER)
            method = b"respond"
            call_args = bombs.args(body, bombs.none())
        else:
            target = peer.login(USER, PASSWORD)
            method = b"echo"
        probe = Probe(server.port, call_timeout=LATENCY_BOUND)
        reply: Reply | None = None
        no_reply: str | None = None
        hung = False
        with probe:
            cpu_start, peak_start, start = server.cpu(), server.peak_rss(), time.monotonic()

            last_cpu = [cpu_start]  # the last figure read: all there is once the process has died

            def give_up() -> str | None:
                if not server.alive:
                    return f"the server ended ({server.exit_status()})"
                last_cpu[0] = max(last_cpu[0], server.cpu())
                used = last_cpu[0] - cpu_start
                if used > cpu_budget:
                    return f"the server used over {cpu_budget} s of CPU without replying (hung: killed)"
                return None

            try:
                request = peer.send_call(target, method, call_args)
                reply = peer.wait_reply(request, wall_cap, give_up)
            except NoReply as why:
                no_reply, hung = str(why), True
            except PeerClosed as why:
                no_reply = f"the connection was closed ({why})"
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.process.wait(1.0)  # closed because the process died? then say how
            wall = time.monotonic() - start
            cpu = (server.cpu() if server.alive else last_cpu[0]) - cpu_start
            peak = server.peak_rss()
            log_tail = ""
            if not server.alive:
                log_tail = server.log_tail()
            elif hung:
                server.kill()  # stuck (in C code, likely): a fresh server for the next attack
        probe_result = probe.stop()
        status = server.exit_status()
        connection_kept: str | None = "no reply to the attack"
        if reply is not None and server.alive:
            connection_kept = _still_serves(peer, phase, target)
        return Outcome(
            server.name,
            phase,
            kind,
            size,
            message_bytes,
            reply,
            no_reply,
            cpu,
            wall,
            max(peak - peak_start, 0),
            connection_kept,
            probe_result,
            status,
            log_tail,
        )
    finally:
        peer.close()


def _still_serves(peer: RawPeer, phase: str, target: bytes | int) -> str | None:
    """None if a plain call on the attacker's connection is answered, else why not."""
    try:
        if phase in ("pre-login", "mid-login"):
            peer.challenge(USER, timeout=5.0)
            return None
        reply = peer.call(target, b"echo", bombs.args(1), timeout=5.0)
    except (NoReply, PeerClosed, AssertionError) as why:
        return f"a plain call on it afterwards failed: {why}"
    if reply.kind != "answer" or reply.body != 1:
        return f"a plain echo(1) on it afterwards got {reply.kind} {preview(reply.body)}"
    return None


def problems(outcome: Outcome, expect: str, cpu_bound: float = CPU_BUDGET) -> list[str]:
    """What is wrong with *outcome*, as judged by the intended behaviour (empty: all is well)."""
    found: list[str] = []
    if outcome.reply is None:
        found.append(f"no reply: {outcome.no_reply}")
        if outcome.server_status not in ("running", "killed by SIGKILL"):
            found.append(f"the server crashed: {outcome.server_status}; its log ends {outcome.log_tail[-300:]!r}")
    else:
        if expect == Expect.REFUSAL:
            if outcome.reply.kind != "error":
                found.append(f"it was answered ({preview(outcome.reply.body, 80)}), not refused with an error answer")
            elif "Jelly" not in outcome.error_type:
                found.append(f"refused with {outcome.error_type}, not a JellyError: {outcome.text[:120]!r}")
        if len(outcome.text) > TEXT_BOUND:
            found.append(f"the failure text that came back is {len(outcome.text)} characters (over {TEXT_BOUND})")
        if outcome.connection_kept is not None:
            found.append(f"the attacker's connection was not kept: {outcome.connection_kept}")
        if outcome.server_status != "running":
            found.append(f"the server ended: {outcome.server_status}")
    if outcome.cpu > cpu_bound:
        found.append(f"the server used {outcome.cpu:.2f} s of CPU (over {cpu_bound} s)")
    if outcome.rss_growth > RSS_BOUND:
        found.append(f"the server's peak RSS grew by {outcome.rss_growth / 1024**2:.0f} MB")
    probe = outcome.probe
    if probe is not None and (probe.failures or probe.worst > LATENCY_BOUND):
        found.append(f"the concurrent client suffered: {probe.summary()}")
    return found


def run_series(
    pool: ServerPool,
    server_name: str,
    phase: str,
    kind: str,
    sizes: Sequence[int],
    *,
    expect: str,
    label: Callable[[int], str] = lambda n: f"depth {n}",
    build: Callable[[int], Sexp] | None = None,
    cpu_budget: float = CPU_BUDGET,
) -> list[tuple[Outcome, list[str]]]:
    """Attack with *kind* at each size in turn; stop after one that got no reply (the rest would hang too)."""
    results: list[tuple[Outcome, list[str]]] = []
    make = build if build is not None else (lambda n: bombs.build(kind, n))
    for n in sizes:
        server = pool.get(server_name)
        outcome = attack(server, phase, kind, label(n), make(n), cpu_budget=cpu_budget)
        found = problems(outcome, expect, cpu_budget)
        results.append((outcome, found))
        report.record(
            report.Row(
                outcome.server,
                phase,
                kind,
                outcome.size,
                outcome.message_bytes,
                outcome.result(),
                outcome.cpu,
                outcome.wall,
                outcome.rss_growth,
                outcome.probe.summary() if outcome.probe is not None else "",
                not found,
            )
        )
        if outcome.reply is None:
            break
    return results


def check_series(results: list[tuple[Outcome, list[str]]], sizes: Sequence[int], expect: str) -> None:
    """Fail the test, with every size's figures, if any attack of the series went wrong."""
    if all(not found for _, found in results) and len(results) == len(sizes):
        return
    lines = [f"expected: {expect}, quickly, the connection kept, the concurrent client unharmed"]
    for outcome, found in results:
        lines.append(
            f"  {outcome.server} {outcome.phase} {outcome.kind} {outcome.size} ({outcome.message_bytes} bytes):"
            f" cpu {outcome.cpu:.3f} s, wall {outcome.wall:.3f} s, +rss {outcome.rss_growth / 1024**2:.1f} MB;"
            f" {outcome.result()}"
        )
        if outcome.probe is not None:
            lines.append(f"      concurrent client: {outcome.probe.summary()}")
        lines.extend(f"      PROBLEM: {problem}" for problem in found)
    skipped = [str(n) for n in sizes[len(results) :]]
    if skipped:
        lines.append(f"  not tried (a smaller size got no reply): {', '.join(skipped)}")
    pytest.fail("\n".join(lines), pytrace=False)
