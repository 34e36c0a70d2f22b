"""A bounded run of fuzz_speedups.py for CI: the compiled codec against the pure one.

Hypothesis feeds the harness random bytes, valid streams and mutations of them (the
strategies of test_fuzz_bounded.py), and every non-bomb file of the seed corpus. Skipped
when the extension is not built, except under ``PBCORE_BUILD_SPEEDUPS=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fuzz_speedups
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_bounded import CORPUS, _valid_streams, bounded, mutated

from pbcore.banana import encode

if not fuzz_speedups.BUILT:  # pragma: no cover (depends on the build)
    if os.environ.get("PBCORE_BUILD_SPEEDUPS") == "1":
        raise ImportError("PBCORE_BUILD_SPEEDUPS=1 but pbcore._speedups is not built")
    pytest.skip("the compiled codec is not built", allow_module_level=True)


@pytest.mark.parametrize("name", sorted(name for name in CORPUS if not name.startswith("bomb-")))
def test_corpus_file(name: str) -> None:
    fuzz_speedups.test_one_input(CORPUS[name])


@bounded
@given(data=st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    fuzz_speedups.test_one_input(data)


@bounded
@given(data=_valid_streams())
def test_valid_streams(data: bytes) -> None:
    fuzz_speedups.test_one_input(data)


@bounded
@given(data=mutated())
def test_mutated_streams(data: bytes) -> None:
    fuzz_speedups.test_one_input(data)


def test_the_harness_reports_a_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    # A compiled decoder that drops a float when it arrives in pieces must be caught.
    assert fuzz_speedups._speedups is not None
    compiled = fuzz_speedups._speedups.Decoder

    class Forgetful(compiled):  # type: ignore[misc,valid-type]
        def feed(self, data: bytes) -> None:
            super().feed(bytes(data).replace(b"\x84", b"\x81") if len(data) == 1 else data)

    monkeypatch.setattr(fuzz_speedups._speedups, "Decoder", Forgetful)
    with pytest.raises(AssertionError):
        fuzz_speedups.test_one_input(encode([1.5]))


def test_the_harness_replays_files_without_atheris(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    seed.write_bytes(encode([b"version", 6]))
    run = subprocess.run(
        [sys.executable, str(Path(fuzz_speedups.__file__)), str(seed)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(fuzz_speedups.__file__).parent)},
    )
    if "atheris" in sys.modules or run.stderr.startswith("INFO"):  # pragma: no cover (atheris installed)
        return
    assert run.returncode == 0 and "the codecs agree" in run.stdout, run.stderr
