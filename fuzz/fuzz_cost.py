"""The cost check both harnesses apply: an input must cost work linear in its size.

pbcore's rule is that no input costs more than a small multiple of its size
(docs/security.md). A fuzzer that only looks for exceptions misses an input of
500 bytes that costs a minute: so each input's CPU time and the growth of the
process's peak memory are measured, and one over its budget is a finding (an
``AssertionError`` naming both figures).

The budgets are generous (a second of CPU, plus a millisecond a byte; 64 MiB
plus 200 bytes a byte), so that a loaded machine never trips them: the bugs
they are for cost minutes, hours or gigabytes. ``PBCORE_FUZZ_COST_SCALE``
multiplies both (a slow machine, or a sanitizer build).

A defence that is missing entirely can make one input run for hours inside a
C function (a hash), where no check can interrupt it: under atheris, also give
libFuzzer ``-timeout=`` and ``-rss_limit_mb=`` (fuzz/README.md); the bounded CI
run replays the bomb seeds in a subprocess with a timeout.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Final

CPU_BASE: Final = 1.0  # seconds
CPU_PER_BYTE: Final = 1e-3
MEMORY_BASE: Final = 64 * 1024 * 1024  # bytes of peak RSS growth
MEMORY_PER_BYTE: Final = 200


def _scale() -> float:
    return float(os.environ.get("PBCORE_FUZZ_COST_SCALE", "1"))


def _peak_rss() -> int:
    """The process's peak resident memory in bytes (0 where it cannot be read).

    Linux's VmHWM, which starts afresh at exec; ``getrusage``'s ``ru_maxrss``
    keeps the peak of the process it was forked from (a test suite's), so a
    child's own growth would not show.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource  # noqa: PLC0415 (not on Windows)
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # kilobytes elsewhere


def within_budget(run: Callable[[bytes], None], data: bytes) -> None:
    """``run(data)``, then fail if it cost more CPU or peak memory than its size allows."""
    scale = _scale()
    rss_before = _peak_rss()
    started = time.process_time()
    run(data)
    spent = time.process_time() - started
    grown = _peak_rss() - rss_before
    cpu_budget = scale * (CPU_BASE + CPU_PER_BYTE * len(data))
    memory_budget = scale * (MEMORY_BASE + MEMORY_PER_BYTE * len(data))
    assert spent <= cpu_budget, f"an input of {len(data)} bytes cost {spent:.2f} s of CPU (budget {cpu_budget:.2f} s)"
    assert grown <= memory_budget, (
        f"an input of {len(data)} bytes grew the peak memory by {grown / 2**20:.0f} MiB "
        f"(budget {memory_budget / 2**20:.0f} MiB)"
    )
