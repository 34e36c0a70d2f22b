"""Servers and clients under attack, each in a subprocess: killable even when stuck in C code.

A hash of a laughs tuple runs in one C call that holds the GIL: no timeout
in the same process can interrupt it. So every pbcore peer under attack runs
in a process of its own, with its address space, file size and core dumps
limited (``resource.prlimit``), and is killed when it runs over its bound.

* :func:`start_server` starts one of :data:`SERVERS` and waits (bounded) for
  its port; :class:`ServerProcess` reads the CPU time it used
  (``/proc/<pid>/stat``: utime + stime, all threads) and its peak RSS
  (``VmHWM``).
* :class:`ServerPool` keeps one of each for a test session and starts a
  fresh one when the last attack killed or crashed it.
* :func:`run_bounded` runs a command to completion or kills it at a timeout,
  with its output going to files (a bomb rendered as text would fill a pipe,
  and the test process's memory).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import attrs

from .serve import PASSWORD, USER

__all__ = [
    "SERVERS",
    "Completed",
    "ServerPool",
    "ServerProcess",
    "run_bounded",
    "start_server",
]

ROOT: Final = Path(__file__).resolve().parents[2]
#: The five servers: four adapters serving the demo service, and ``pbcore serve``.
SERVERS: Final = ("asyncio", "trio", "anyio", "blocking", "cli")
#: Bounds on every child: enough for any pbcore peer, small enough that a bomb cannot take the machine.
ADDRESS_SPACE: Final = 3 * 1024**3
FILE_SIZE: Final = 64 * 1024**2
START_TIMEOUT: Final = 20.0
PASSWORD_VARIABLE: Final = "PBCORE_HOSTILE_PASSWORD"

_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PBCORE: Final = Path(sys.executable).with_name("pbcore")


def environment() -> dict[str, str]:
    """The children's environment: unbuffered, and this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env[PASSWORD_VARIABLE] = PASSWORD
    return env


def limit(pid: int) -> None:
    """Bound a child's address space and file sizes, and keep it from dumping core."""
    with contextlib.suppress(OSError, ValueError):  # the child may be gone already
        resource.prlimit(pid, resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (FILE_SIZE, FILE_SIZE))
        resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used by process *pid* so far (every thread)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    # After the ")" that ends the command name: state is field 3, utime 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def memory(pid: int, field: str = "VmHWM") -> int:
    """A ``/proc/<pid>/status`` memory figure (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


@attrs.define
class ServerProcess:
    """One server under attack: its process, its port, its log (standard error)."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    #: Set when an attack killed it (or found it dead): the pool starts a new one.
    spent: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def exit_status(self) -> str:
        """How it ended, in words ("running" if it has not)."""
        code = self.process.poll()
        if code is None:
            return "running"
        if code < 0:
            import signal  # noqa: PLC0415

            return f"killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def cpu(self) -> float:
        """CPU seconds it used so far; the last figure known once it has ended."""
        try:
            return cpu_seconds(self.pid)
        except (OSError, IndexError, ValueError):
            return float("nan")

    def peak_rss(self) -> int:
        try:
            return memory(self.pid, "VmHWM")
        except OSError:
            return 0

    def kill(self) -> None:
        self.spent = True
        if self.alive:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)

    def log_tail(self, size: int = 2000) -> str:
        """The end of what it wrote on standard error."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-size:].decode("utf-8", "replace")


def server_command(name: str) -> list[str]:
    if name == "cli":
        return [
            str(_PBCORE),
            "serve",
            "--port",
            "0",
            "--tick",
            "3600",
            "--user",
            USER,
            "--password-env",
            PASSWORD_VARIABLE,
        ]
    return [sys.executable, "-m", "tests.hostile.serve", name]


_PORT_LINE: Final = re.compile(rb"PORT (\d+)|listening on [^ ]*:(\d+)")


def start_server(name: str, directory: Path, command: Sequence[str] | None = None) -> ServerProcess:
    """Start server *name* (one of :data:`SERVERS`, or any *command* that writes ``PORT <n>``); wait for its port."""
    log_path = directory / f"{name}-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            list(command) if command is not None else server_command(name),
            cwd=ROOT,
            env=environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    limit(process.pid)
    assert process.stdout is not None
    stdout = process.stdout
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT)
    match = _PORT_LINE.search(lines[0]) if lines else None
    if match is None:
        process.kill()
        process.wait(5)
        raise RuntimeError(
            f"server {name} did not report its port within {START_TIMEOUT} s"
            f" (stdout {lines[:1]!r}, stderr {log_path.read_text(errors='replace')[-1000:]!r})"
        )
    port = int(match.group(1) or match.group(2))
    # Keep draining its standard output, so that it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in stdout], daemon=True).start()
    return ServerProcess(name, process, port, log_path)


class ServerPool:
    """One server of each kind for a session; a fresh one after an attack killed or crashed the last."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._servers: dict[str, ServerProcess] = {}
        #: How many times each kind was (re)started.
        self.starts: dict[str, int] = {}

    def get(self, name: str) -> ServerProcess:
        server = self._servers.get(name)
        if server is not None and (server.spent or not server.alive):
            server.kill()
            server = None
        if server is None:
            server = self._servers[name] = start_server(name, self._directory)
            self.starts[name] = self.starts.get(name, 0) + 1
        return server

    def close(self) -> None:
        for server in self._servers.values():
            server.kill()
        self._servers.clear()


@attrs.frozen
class Completed:
    """What a bounded command did: its exit status (None: killed at the timeout), output sizes and heads."""

    returncode: int | None
    seconds: float
    stdout_size: int
    stderr_size: int
    stdout: str
    stderr: str
    timeout: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def describe(self) -> str:
        status = f"killed after {self.timeout} s" if self.timed_out else f"exit {self.returncode}"
        return (
            f"{status} in {self.seconds:.2f} s; stdout {self.stdout_size} bytes {self.stdout[:300]!r};"
            f" stderr {self.stderr_size} bytes {self.stderr[-600:]!r}"
        )


def run_bounded(command: Sequence[str], timeout: float, *, head: int = 4000) -> Completed:
    """Run *command* (cwd: the checkout), killing it after *timeout* s; its output kept in files."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        process = subprocess.Popen(
            list(command), cwd=ROOT, env=environment(), stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        limit(process.pid)
        code: int | None
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            code = None
        seconds = time.monotonic() - start
        sizes = []
        heads = []
        for stream in (out, err):
            stream.seek(0, os.SEEK_END)
            sizes.append(stream.tell())
            stream.seek(0)
            heads.append(stream.read(head).decode("utf-8", "replace"))
    return Completed(code, seconds, sizes[0], sizes[1], heads[0], heads[1], timeout)


@contextlib.contextmanager
def temporary_pool() -> Iterator[ServerPool]:
    with tempfile.TemporaryDirectory(prefix="pbcore-hostile-") as directory:
        pool = ServerPool(Path(directory))
        try:
            yield pool
        finally:
            pool.close()
