"""Run ``tests/interop/twisted_peer.py`` as a subprocess: a real Twisted PB server or
client on real sockets, for the adapters' interop tests.

``twisted_server(login=False)`` is a context manager that starts the server, waits
(bounded) for its ``PORT <n>`` line, yields the port and stops the process when the
block ends (closing its stdin, then terminating, then killing it).
``run_twisted_client(port, script)`` runs the client mode to completion (bounded) and
returns its JSON lines as dicts; see ``twisted_peer.py`` for the scripts and steps.

Both block the calling thread: from async code run them in a worker thread (for
example ``trio.to_thread.run_sync``), since the peer on the other side of the socket
needs the event loop to keep running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

PEER = Path(__file__).with_name("twisted_peer.py")
START_TIMEOUT = 20.0
CLIENT_TIMEOUT = 30.0


class PeerError(RuntimeError):
    """The Twisted peer did not start, did not finish in time, or failed."""


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _read_port(process: subprocess.Popen[str], timeout: float) -> int:
    """Read the ``PORT <n>`` line in a helper thread so the wait is bounded."""
    assert process.stdout is not None
    stdout = process.stdout
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or not line[0].startswith("PORT "):
        got = line[0].strip() if line else "nothing"
        raise PeerError(f"the Twisted server did not report its port within {timeout} s (got {got!r})")
    return int(line[0].split()[1])


def _stop(process: subprocess.Popen[str]) -> None:
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with suppress(OSError):
                stream.close()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextmanager
def twisted_server(login: bool = False, timeout: float = 60.0, log_file: Path | None = None) -> Iterator[int]:
    """Start a Twisted PB server on 127.0.0.1 and yield its port.

    ``login`` serves a Portal (alice/secret and anonymous) instead of the plain root.
    The server exits on its own after ``timeout`` seconds at the latest.
    With ``log_file``, Twisted's log (what the server says of the errors its peers
    receive, say) is written to that file.
    """
    with twisted_server_process(login, timeout, log_file) as (port, _):
        yield port


@contextmanager
def twisted_server_process(
    login: bool = False, timeout: float = 60.0, log_file: Path | None = None
) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """:func:`twisted_server`, yielding its process too (to stop it with a signal, say)."""
    command = [sys.executable, str(PEER), "server", "--port", "0", "--timeout", str(timeout)]
    if login:
        command.append("--login")
    if log_file is not None:
        command.extend(["--log", str(log_file)])
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_environment(),
    )
    try:
        yield _read_port(process, START_TIMEOUT), process
    finally:
        _stop(process)


def run_twisted_client(
    port: int, script: str, host: str = "127.0.0.1", timeout: float = CLIENT_TIMEOUT
) -> list[dict[str, Any]]:
    """Run a Twisted PB client script against ``host:port``; return its steps' results."""
    command = [
        sys.executable,
        str(PEER),
        "client",
        "--host",
        host,
        "--port",
        str(port),
        "--script",
        script,
        "--timeout",
        str(timeout),
    ]
    try:
        completed = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout + 10,
            env=_environment(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"the Twisted client ({script}) did not finish in time") from exc
    steps: list[dict[str, Any]] = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    if completed.returncode != 0:
        raise PeerError(
            f"the Twisted client ({script}) exited with {completed.returncode}: {steps!r}\n{completed.stderr[-2000:]}"
        )
    return steps


def by_step(steps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Index a client's results by step name."""
    return {entry["step"]: entry for entry in steps}
