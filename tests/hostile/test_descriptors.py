"""Servers out of file descriptors: every adapter backs off, logs why, and serves again once some are free.

Each server runs in a child process (``fd_server.py``) whose RLIMIT_NOFILE is
lowered, so that running out cannot hurt the test process. The test holds
plain sockets open to it until its accept fails with EMFILE, keeps it there
a few seconds (more connections waiting in its backlog, so that its listener
stays readable: the condition that makes a careless accept loop spin), then
closes them and checks that a fresh pbcore client is served.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("resource", reason="RLIMIT_NOFILE needs the resource module (POSIX)")

import pbcore_blocking

from pbcore.errors import PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from tests.hostile.fd_server import Echo

HELPER = Path(__file__).with_name("fd_server.py")
#: How long any one step may take before it counts as a hang.
STEP = 20.0
#: The server's file descriptor limit: a few for the interpreter and its loop, the rest for connections.
LIMIT = 64
#: Connections the test opens: more than the server can hold, the rest wait in its backlog (128).
HOGS = LIMIT + 16
#: How long the server is kept out of descriptors while its CPU time is measured.
EXHAUSTED = 2.0
#: At most this many log records a second while out of descriptors (the servers back off to one retry a second).
MAX_RECORDS_PER_SECOND = 5.0
#: What an accept failing with EMFILE says.
EMFILE_TEXT = os.strerror(errno.EMFILE)

ADAPTERS = [
    pytest.param("asyncio"),
    pytest.param("uvloop", marks=pytest.mark.skipif(find_spec("uvloop") is None, reason="uvloop is not installed")),
    pytest.param("trio", marks=pytest.mark.skipif(find_spec("trio") is None, reason="trio is not installed")),
    pytest.param("anyio-asyncio"),
    pytest.param("anyio-trio", marks=pytest.mark.skipif(find_spec("trio") is None, reason="trio is not installed")),
    pytest.param("blocking"),
]


class Child:
    """The server process: its stdout replies, its log records (parsed), its raw stderr."""

    def __init__(self, adapter: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HELPER), adapter, str(LIMIT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._replies: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        self.stderr: list[str] = []  # what was not a record (a crash, say)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._replies.put(line.strip())

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            with self._lock:
                if isinstance(record, dict):
                    self.records.append(record)
                else:
                    self.stderr.append(line)

    def reply(self, prefix: str) -> str:
        try:
            line = self._replies.get(timeout=STEP)
        except queue.Empty:
            raise AssertionError(f"the server said nothing in {STEP} s; {self.describe()}") from None
        assert line.startswith(prefix + " "), line
        return line[len(prefix) + 1 :]

    def cpu(self) -> float:
        """The CPU time (user + system) the server has used so far."""
        assert self.process.stdin is not None
        self.process.stdin.write("cpu\n")
        self.process.stdin.flush()
        return float(self.reply("cpu"))

    def logged(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self._lock:
            return [record for record in self.records if predicate(record)]

    def describe(self) -> str:
        with self._lock:
            return f"exit status {self.process.poll()}; log {self.records[-5:]}; stderr {''.join(self.stderr)[-2000:]}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()  # the server exits at the end of its stdin
        try:
            self.process.wait(STEP)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def child(adapter: str) -> Iterator[Child]:
    server = Child(adapter)
    try:
        yield server
    finally:
        server.close()


def wait_for(condition: Callable[[], object], timeout: float = STEP) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def out_of_descriptors(record: dict[str, Any]) -> bool:
    """A pbcore record that names the error (EMFILE's text, in its message or its traceback)."""
    text = f"{record['message']}\n{record['exc'] or ''}"
    return str(record["name"]).startswith("pbcore.") and EMFILE_TEXT in text


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed *sock* (a non-blocking socket; what it sent, its PB offer, is read and dropped)."""
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False  # open, nothing (more) to read
    except OSError:
        return True  # reset
    return True  # the end


def served(port: int) -> bool:
    with contextlib.suppress(PBConnectionLost, OSError):
        return bool(echo(port) == 1)
    return False


def echo(port: int) -> Any:
    """A fresh pbcore client's ``callRemote("echo", 1)`` (each step bounded by STEP)."""
    with pbcore_blocking.connect(PBClientFactory(), "127.0.0.1", port, timeout=STEP) as connection:
        return connection.call(connection.root(), "echo", 1)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_server_out_of_descriptors_backs_off_logs_and_recovers(adapter: str) -> None:
    with child(adapter) as server:
        port = int(server.reply("port"))
        assert echo(port) == 1  # it serves to begin with
        hogs: list[socket.socket] = []
        try:
            for _ in range(HOGS):
                hogs.append(socket.create_connection(("127.0.0.1", port), timeout=STEP))
                hogs[-1].setblocking(False)
            if adapter == "uvloop":
                # libuv's own answer to EMFILE: it accepts and closes what waits (with a descriptor it
                # keeps in reserve) and tells no one, so there is nothing to log. The hogs it closed are seen.
                assert wait_for(lambda: any(closed_by_peer(hog) for hog in hogs)), server.describe()
            else:
                assert wait_for(lambda: server.logged(out_of_descriptors)), (
                    f"no pbcore log record names {EMFILE_TEXT!r}; {server.describe()}"
                )
            # Out of descriptors, with connections waiting: the server must wait, not spin.
            cpu, wall = server.cpu(), time.monotonic()
            logged = len(server.logged(lambda record: True))
            time.sleep(EXHAUSTED)
            cpu, wall = server.cpu() - cpu, time.monotonic() - wall
            logged = len(server.logged(lambda record: True)) - logged
            sys.stderr.write(f"{adapter}: {cpu / wall:.1%} CPU, {logged / wall:.1f} log records/s while exhausted\n")
            assert cpu < 0.5 * wall, f"{cpu:.2f} s of CPU in {wall:.2f} s out of descriptors"
            # Every record, pbcore's and the runtime's: a retry that multiplies shows as a flood.
            assert logged <= MAX_RECORDS_PER_SECOND * wall, f"{logged} log records in {wall:.2f} s"
            dropped = sum(closed_by_peer(hog) for hog in hogs)
            sys.stderr.write(f"{adapter}: {dropped} of {len(hogs)} connections dropped by the server\n")
            if adapter != "uvloop":
                assert dropped == 0  # the ones it could not accept wait in its backlog
            assert server.process.poll() is None, server.describe()
        finally:
            for hog in hogs:
                hog.close()
        started = time.monotonic()
        if adapter == "uvloop":
            # A client that comes before the server has closed the hogs is dropped too: try until one is served.
            assert wait_for(lambda: served(port)), server.describe()
        assert echo(port) == 1  # a fresh client is served once descriptors are free again
        took = time.monotonic() - started
        sys.stderr.write(f"{adapter}: served again {took:.2f} s after the descriptors were freed\n")
        assert server.process.poll() is None, server.describe()


# -- the blocking server, out of threads -----------------------------------------------------------


def test_the_blocking_server_backs_off_and_recovers_when_it_cannot_start_a_thread(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pbcore.blocking")
    start = threading.Thread.start
    failing = True
    attempts = 0

    def start_or_fail(thread: threading.Thread) -> None:
        # What Thread.start raises when the process has no thread to give (RLIMIT_NPROC, memory).
        nonlocal attempts
        if failing and thread.name == "pbcore-blocking-reader":
            attempts += 1
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_or_fail)
    with pbcore_blocking.serve(PBServerFactory(Echo()), "127.0.0.1", 0) as server:
        raws = [socket.create_connection(("127.0.0.1", server.port), timeout=STEP) for _ in range(20)]
        try:
            assert raws[0].recv(4096) == b""  # accepted, no reader for it: closed, with no offer
            time.sleep(0.5)
            # Backing off (0.1 s, doubling): a few attempts; without, one per waiting connection at once.
            assert attempts < 10, f"{attempts} threads tried in 0.5 s"
        finally:
            for raw in raws:
                raw.close()
        failing = False
        assert echo(server.port) == 1  # the next one is served
        assert server._acceptor.is_alive()
    logged = [record.getMessage() for record in caplog.records if record.name == "pbcore.blocking"]
    assert any("can't start new thread" in message for message in logged), logged
