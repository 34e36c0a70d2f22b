"""A well-behaved client calling ``echo`` in a loop while an attack runs: the server's other users.

It is a ``pbcore_blocking`` client in a thread of the test process, logged in
as alice; it calls its avatar's ``echo`` every :data:`INTERVAL` s and keeps
each call's latency. A call unanswered after ``call_timeout`` is recorded at
that latency, as a failure; so is a lost connection (and the probe stops).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Final

import attrs
import pbcore_blocking

from pbcore.cred import UsernamePassword
from pbcore.factory import PBClientFactory

from .serve import PASSWORD, USER

__all__ = ["Probe", "ProbeResult"]

#: Pause between two calls: a steady trickle, not a load of its own on a 2-core machine.
INTERVAL: Final = 0.02


@attrs.frozen
class ProbeResult:
    latencies: tuple[float, ...]
    failures: tuple[str, ...]

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def worst(self) -> float:
        return max(self.latencies, default=0.0)

    @property
    def median(self) -> float:
        return statistics.median(self.latencies) if self.latencies else 0.0

    def summary(self) -> str:
        text = f"{self.calls} calls, median {self.median * 1000:.1f} ms, max {self.worst * 1000:.0f} ms"
        if self.failures:
            text += f", {len(self.failures)} failed ({self.failures[0]})"
        return text


class Probe:
    """``with Probe(port) as probe: ...attack...; result = probe.result()``."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", call_timeout: float = 2.0) -> None:
        self._call_timeout = call_timeout
        self._stop = threading.Event()
        self._latencies: list[float] = []
        self._failures: list[str] = []
        self._connection = pbcore_blocking.connect(PBClientFactory(), host, port, timeout=5.0)
        try:
            self._avatar: Any = self._connection.login(UsernamePassword(USER, PASSWORD))
            self._connection.call(self._avatar, "echo", 0, timeout=5.0)  # warm: the first call is not the attack's
        except BaseException:
            self._connection.close()
            raise
        self._thread = threading.Thread(target=self._run, name="hostile-probe", daemon=True)
        self._result: ProbeResult | None = None

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            start = time.monotonic()
            try:
                got = self._connection.call(self._avatar, "echo", n, timeout=self._call_timeout)
            except TimeoutError:
                self._latencies.append(time.monotonic() - start)
                self._failures.append(f"call {n} unanswered after {self._call_timeout} s")
                continue
            except Exception as error:  # the connection is gone (the server was killed, say)
                self._failures.append(f"call {n}: {type(error).__name__}: {str(error)[:100]}")
                return
            self._latencies.append(time.monotonic() - start)
            if got != n:
                self._failures.append(f"call {n} answered {got!r:.40}")
            self._stop.wait(INTERVAL)

    def stop(self) -> ProbeResult:
        """Stop calling (waits for the call in flight, at most its timeout) and close."""
        if self._result is None:
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join(self._call_timeout + 1.0)
            self._connection.close()
            self._result = ProbeResult(tuple(self._latencies), tuple(self._failures))
        return self._result
