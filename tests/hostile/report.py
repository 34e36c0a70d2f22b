"""What the attacks measured, for the summary at the end of the run (see conftest.py).

The figures are reported, not asserted (the machine is shared and noisy):
the tests assert only generous hang bounds. Each row is one attack message.
"""

from __future__ import annotations

import math
from typing import Final

import attrs

__all__ = ["ROWS", "Row", "record", "table"]


@attrs.frozen
class Row:
    target: str  # the server (or the client) attacked
    phase: str
    kind: str
    size: str
    message_bytes: int
    result: str  # what came back, in a few words
    cpu: float | None  # the victim's CPU seconds for this attack (None: not measured)
    wall: float
    rss_growth: int | None  # bytes its peak RSS grew by
    probe: str  # the concurrent client's latencies, or ""
    ok: bool


ROWS: Final[list[Row]] = []


def record(row: Row) -> None:
    ROWS.append(row)


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def table(rows: list[Row]) -> list[str]:
    """The rows as aligned text lines."""
    header = ("target", "phase", "kind", "size", "bytes", "cpu s", "wall s", "+rss MB", "ok", "result", "probe")
    lines = [header]
    for row in rows:
        rss = None if row.rss_growth is None else row.rss_growth / 1024**2
        lines.append(
            (
                row.target,
                row.phase,
                row.kind,
                row.size,
                str(row.message_bytes),
                _cell(row.cpu, ".3f"),
                _cell(row.wall, ".3f"),
                _cell(rss, ".1f"),
                "yes" if row.ok else "NO",
                row.result,
                row.probe,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 2)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "  " + "  ".join(line[-2:])
        for line in lines
    ]
