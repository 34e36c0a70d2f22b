"""The codec benchmark runs end to end (bench/codec.py --quick).

This checks that the benchmark works, never how fast anything is: the figures
from a shared, noisy machine mean nothing, so there are no timing assertions.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("twisted")

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "codec.py"


def _positive_numbers(figures: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = figures[key]
        assert isinstance(value, (int, float)), (key, value)
        assert value > 0, (key, value)


def test_quick_run_prints_the_table_and_writes_the_record(tmp_path: Path) -> None:
    record_path = tmp_path / "codec.json"
    completed = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(record_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    for text in (
        "encode: Twisted",
        "decode: Twisted",
        "MB/s",
        "ratio",
        "two-step encode",
        "linearity:",
        "decode chunking",
        "targets:",
    ):
        assert text in out, text

    record = json.loads(record_path.read_text(encoding="utf-8"))
    for key in ("date", "python", "platform", "twisted", "pbcore", "settings", "results", "targets", "all_met"):
        assert key in record, key
    assert record["pbcore"]
    assert record["twisted"]

    results = record["results"]
    assert [row["n"] for row in results] == record["settings"]["sizes"] == [10, 30]
    for row in results:
        assert row["bytes"] > 0
        # The table has one line per size, starting with N then the payload bytes.
        assert any(line.split()[:2] == [str(row["n"]), str(row["bytes"])] for line in out.splitlines())
        for op in ("encode", "decode"):
            _positive_numbers(
                row[op], ("twisted_s", "pbcore_s", "pbcore_mb_s", "ratio", "twisted_loops", "pbcore_loops")
            )
        _positive_numbers(row["encode_two_step"], ("pbcore_s", "pbcore_mb_s", "ratio", "pbcore_loops"))

    linearity = record["linearity"]
    _positive_numbers(linearity, ("pbcore_decode", "twisted_decode", "bytes"))

    chunking = record["chunking"]
    for name in ("pbcore", "twisted"):
        entry = chunking[name]
        for key in ("one_feed", "chunks_1024"):
            _positive_numbers(entry[key], ("seconds", "ratio", "feeds", "loops"))
    _positive_numbers(chunking["pbcore"]["chunks_64"], ("seconds", "ratio", "feeds", "loops"))

    for target in record["targets"]:
        assert set(target) == {"target", "measured", "met"}


def test_broker_benchmark_runs() -> None:
    """bench/broker.py --quick works and prints one row per payload (no timing is checked)."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "broker.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    rows = [line for line in completed.stdout.splitlines() if line.rstrip().endswith("x")]
    assert len(rows) == 3, completed.stdout


def test_sockets_benchmark_runs(tmp_path: Path) -> None:
    """bench/sockets.py --quick works: one row per scenario and side, and the record (no timing is checked)."""
    optional = {"uvloop": "uvloop", "trio": "trio"}  # sides that need a package of their own
    sides = [
        side
        for side in ("twisted", "asyncio", "asyncio-pure", "uvloop", "trio", "blocking", "echo")
        if side not in optional or importlib.util.find_spec(optional[side]) is not None
    ]
    record_path = tmp_path / "sockets.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "sockets.py"),
            "--quick",
            "--sides",
            ",".join(sides),
            "--json",
            str(record_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    # With the raw echo among the sides, each row ends with the side's share of it.
    rows = [line.split("|") for line in completed.stdout.splitlines() if line.rstrip().endswith("%")]
    last_words = {"twisted": "Twisted", "asyncio-pure": "(pure)"}
    expected = [last_words.get(side, side) for side in sides]
    assert [row[0].split()[-1] for row in rows] == expected * 4, completed.stdout
    assert all(row[-1].strip() == "100.0%" for row in rows if row[0].split()[-1] == "echo"), completed.stdout
    for scenario in ("sequential int", "pipelined int", "100 dicts", "100 KB bytes"):
        assert scenario in completed.stdout, scenario

    record = json.loads(record_path.read_text(encoding="utf-8"))
    results = record["results"]
    assert [(row["scenario"], row["side"]) for row in results] == [
        (scenario, side) for scenario in ("seq", "pipe", "dicts", "bytes") for side in sides
    ]
    for row in results:
        _positive_numbers(row, ("calls", "best_s", "median_s", "calls_per_s", "ratio", "ratio_wall", "ratio_cpu"))


def test_idle_benchmark_runs() -> None:
    """bench/idle.py --quick works and prints a figure per side (no figure is checked)."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "idle.py"), "--quick", "--sides", "twisted,asyncio"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "per idle PB connection" in completed.stdout
    for side in ("twisted", "asyncio"):
        assert any(line.split(":")[0].strip() == side and "KiB" in line for line in completed.stdout.splitlines())
    assert "x Twisted's" in completed.stdout
