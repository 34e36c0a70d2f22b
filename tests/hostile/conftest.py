"""Fixtures of the attack suite: the servers under attack, and the summary of what was measured."""

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
