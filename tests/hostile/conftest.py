"""The attack suite of issue 9: hostile but well-formed PB input, over real sockets, on every adapter.

* bombs.py: the attacks, as raw s-expressions; wire.py: a raw attacker client
  and a hostile server (neither ever unjellies);
* processes.py, serve.py, client.py: the pbcore peers under attack, each in
  a subprocess (killable when stuck in C code); probe.py: a well-behaved
  client calling the server throughout each attack; attacks.py: one attack
  measured, a series at growing sizes judged against the intended behaviour;
* test_server_bombs.py, test_client_bombs.py, test_decode_bombs.py: the
  attacks; test_bombs.py: the tools themselves.

Every wait is bounded: a server over ``HOSTILE_CPU_BUDGET`` seconds of CPU
for one attack (2 by default) is killed and the test fails at once. What was
measured is printed at the end of the run (this file's terminal summary);
figures are reported, never asserted beyond the hang bounds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import report
from .processes import ServerPool


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    """One server process of each kind, started when first asked for, fresh after one was killed."""
    pool = ServerPool(Path(tmp_path_factory.mktemp("hostile-servers")))
    try:
        yield pool
    finally:
        pool.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not report.ROWS:
        return
    terminalreporter.section("hostile: the cost of each attack message (measured, not asserted)")
    for line in report.table(report.ROWS):
        terminalreporter.write_line(line)
