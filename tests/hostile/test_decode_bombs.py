"""``pbcore decode --jelly`` of a capture holding a bomb: it finishes quickly, with bounded output.

A capture is what a client received from a hostile server (the handshake,
then one bomb message), written as raw bytes. ``decode --jelly`` unjellies
every value to print it: hashing a laughs key, or printing a laughs value
expanded, would never finish. Each decode runs in a subprocess killed after
:data:`RUN_TIMEOUT`, all of them at once.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from . import bombs, report
from .bombs import Sexp
from .processes import Completed, run_bounded
from .wire import capture

DEPTH: Final = 64
RUN_TIMEOUT: Final = 8.0
OUTPUT_BOUND: Final = 64_000

CAPTURES: Final[dict[str, Callable[[], Sexp]]] = {
    "laughs-answer": lambda: bombs.answer(1, bombs.laughs(DEPTH)),
    "hash-answer": lambda: bombs.answer(1, bombs.dict_key_bomb(DEPTH)),
    "failure-answer": lambda: bombs.error(1, bombs.failure_bomb(DEPTH)),
    "hash-call": lambda: bombs.call(1, b"root", b"login", bombs.args(bombs.set_bomb(DEPTH))),
}


@pytest.fixture(scope="module")
def decoded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Completed]:
    directory = Path(tmp_path_factory.mktemp("hostile-captures"))
    results: dict[str, Completed] = {}

    def run(name: str) -> None:
        path = directory / f"{name}.bin"
        path.write_bytes(capture([CAPTURES[name]()]))
        results[name] = run_bounded([sys.executable, "-m", "pbcore", "decode", "--jelly", str(path)], RUN_TIMEOUT)

    threads = [threading.Thread(target=run, args=(name,)) for name in CAPTURES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(RUN_TIMEOUT + 10)
    for name, completed in results.items():
        report.record(
            report.Row(
                "pbcore decode",
                "-",
                name,
                f"depth {DEPTH}",
                len(capture([CAPTURES[name]()])),
                "killed" if completed.timed_out else f"exit {completed.returncode}, {completed.stdout_size} bytes out",
                None,
                completed.seconds,
                None,
                "",
                not completed.timed_out and completed.stdout_size + completed.stderr_size <= OUTPUT_BOUND,
            )
        )
    return results


@pytest.mark.parametrize("name", list(CAPTURES))
def test_decode_jelly_of_a_bomb(decoded: dict[str, Completed], name: str) -> None:
    completed = decoded[name]
    if completed.timed_out:
        pytest.fail(f"pbcore decode --jelly of a {name} capture did not finish: {completed.describe()}", pytrace=False)
    size = completed.stdout_size + completed.stderr_size
    if size > OUTPUT_BOUND:
        pytest.fail(
            f"pbcore decode --jelly of a {name} capture printed {size} bytes: {completed.describe()}", pytrace=False
        )
    assert completed.returncode in (0, 1), completed.describe()
    # The messages before the bomb still print: the decoder got through the handshake.
    assert "version" in completed.stdout, completed.describe()
