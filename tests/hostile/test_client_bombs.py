"""The client side: pbcore clients (every adapter, and ``pbcore call``) against a hostile server.

The hostile server (wire.HostileServer, in a thread here: it never
unjellies) answers every call with a bomb:

* ``laughs-answer``: an answer that is a laughs tuple of 2**64 leaves
  (shared; nothing hashes it): the client may take the value or fail the
  call, quickly; ``pbcore call`` must print a bounded text;
* ``hash-answer``: an answer that is a dict keyed by such a tuple: the call
  fails with a JellyError, quickly;
* ``failure-answer``: an error answer whose failure's value is such a
  tuple: the call fails, and the error's ``str()`` stays bounded.

Each client runs in a subprocess (client.py, or ``pbcore call``), killed
after :data:`RUN_TIMEOUT`: a client stuck in a hash cannot time out by
itself. The five clients of one bomb run at once, to keep the suite short.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

import pytest

from . import bombs, report
from .bombs import Sexp
from .processes import Completed, run_bounded
from .wire import HostileServer

DEPTH: Final = 64
#: The call's own deadline (pbtimeout=, --timeout): it cannot fire while the client is stuck in C.
CALL_TIMEOUT: Final = 3.0
#: The subprocess is killed after this (its start takes a second on a loaded machine).
RUN_TIMEOUT: Final = 8.0
#: What the command-line client may print, at most.
OUTPUT_BOUND: Final = 10_000
#: An error's str() at most.
TEXT_BOUND: Final = 10_000

CLIENTS: Final = ("asyncio", "trio", "anyio", "blocking", "cli")

REPLIES: Final[dict[str, Callable[[int], Sexp]]] = {
    "laughs-answer": lambda request: bombs.answer(request, bombs.laughs(DEPTH)),
    "hash-answer": lambda request: bombs.answer(request, bombs.dict_key_bomb(DEPTH)),
    "failure-answer": lambda request: bombs.error(request, bombs.failure_bomb(DEPTH)),
}


def _command(client: str, port: int) -> list[str]:
    if client == "cli":
        timeout = str(CALL_TIMEOUT)
        pbcore = [sys.executable, "-m", "pbcore"]
        return [*pbcore, "call", f"127.0.0.1:{port}", "echo", "1", "--timeout", timeout, "--connect-timeout", timeout]
    return [sys.executable, "-m", "tests.hostile.client", client, str(port), str(CALL_TIMEOUT)]


class _Runs:
    """Each bomb's five client runs, made the first time a test asks for that bomb."""

    def __init__(self) -> None:
        self._done: dict[str, dict[str, Completed]] = {}

    def get(self, bomb: str, client: str) -> Completed:
        if bomb not in self._done:
            self._done[bomb] = self._run_all(bomb)
        return self._done[bomb][client]

    def _run_all(self, bomb: str) -> dict[str, Completed]:
        results: dict[str, Completed] = {}
        with HostileServer(REPLIES[bomb]) as server:

            def run(client: str) -> None:
                results[client] = run_bounded(_command(client, server.port), RUN_TIMEOUT)

            threads = [threading.Thread(target=run, args=(client,)) for client in CLIENTS]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(RUN_TIMEOUT + 10)
        for client, completed in results.items():
            report.record(
                report.Row(
                    f"{client} client",
                    "-",
                    bomb,
                    f"depth {DEPTH}",
                    bombs.size(REPLIES[bomb](1)),
                    _result(completed),
                    None,
                    completed.seconds,
                    None,
                    "",
                    not _client_problems(bomb, client, completed),
                )
            )
        return results


def _parsed(completed: Completed) -> dict[str, Any] | None:
    try:
        value = json.loads(completed.stdout.splitlines()[-1])
    except (IndexError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _result(completed: Completed) -> str:
    if completed.timed_out:
        return f"killed after {completed.timeout} s"
    parsed = _parsed(completed)
    if parsed is None:
        return f"exit {completed.returncode}, {completed.stdout_size} bytes out: {completed.stdout[:60]!r}"
    if parsed["outcome"] == "error":
        return f"error {parsed['type']} ({parsed['text_length']} chars): {parsed['text'][:60]!r}"
    return f"answer {parsed['type']} {parsed['shape'][:60]}"


def _client_problems(bomb: str, client: str, completed: Completed) -> list[str]:
    found: list[str] = []
    if completed.timed_out:
        return [f"the client did not finish: killed after {completed.timeout} s (stuck: hashing or rendering the bomb)"]
    if client == "cli":
        if completed.stdout_size + completed.stderr_size > OUTPUT_BOUND:
            found.append(f"pbcore call printed {completed.stdout_size} + {completed.stderr_size} bytes")
        if bomb != "laughs-answer" and completed.returncode != 1:
            found.append(f"pbcore call exited {completed.returncode}, not 1 (the call failed)")
        return found
    parsed = _parsed(completed)
    if parsed is None:
        return [f"no result from the client: {completed.describe()}"]
    if parsed["seconds"] > CALL_TIMEOUT + 2:
        found.append(f"the call took {parsed['seconds']:.1f} s")
    if bomb == "laughs-answer":
        return found
    if parsed["outcome"] != "error":
        found.append(f"the call was answered ({parsed['type']} {parsed['shape'][:80]}), it should fail")
    elif parsed["text_length"] > TEXT_BOUND:
        found.append(f"the error's str() is {parsed['text_length']} characters")
    elif bomb == "hash-answer" and "Jelly" not in parsed["type"]:
        found.append(f"it failed with {parsed['type']}, not a JellyError: {parsed['text'][:100]!r}")
    return found


@pytest.fixture(scope="module")
def runs() -> Iterator[_Runs]:
    yield _Runs()


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("bomb", list(REPLIES))
def test_client_against_hostile_server(runs: _Runs, bomb: str, client: str) -> None:
    completed = runs.get(bomb, client)
    found = _client_problems(bomb, client, completed)
    if found:
        pytest.fail(
            f"{client} client, {bomb} (depth {DEPTH}): {_result(completed)}\n"
            + "\n".join(f"  PROBLEM: {problem}" for problem in found)
            + f"\n  run: {completed.describe()}",
            pytrace=False,
        )
