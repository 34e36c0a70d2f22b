"""A bounded fuzz run for CI: the atheris harnesses' checks, driven by hypothesis.

The harnesses (fuzz_banana.py, fuzz_jelly.py) import without atheris; here
their ``test_one_input`` gets random bytes, valid streams, and mutations of
both, plus every file of the seed corpus. The whole file takes a few seconds;
the open-ended search is atheris's job (see README.md).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fuzz_banana
import fuzz_cost
import fuzz_jelly
import make_corpus
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbcore.banana import DIALECTS, Decoder, Sexp, decode, encode
from pbcore.jelly import jelly

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
CORPUS = {path.name: path.read_bytes() for path in sorted(CORPUS_DIR.iterdir())}
HARNESSES: dict[str, Callable[[bytes], None]] = {
    "banana": fuzz_banana.test_one_input,
    "jelly": fuzz_jelly.test_one_input,
}

bounded = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

# -- inputs ------------------------------------------------------------------

sexps: st.SearchStrategy[Sexp] = st.recursive(
    st.one_of(
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.binary(max_size=20),
        st.sampled_from([b"list", b"tuple", b"reference", b"dereference", b"None", b"remote", b"pbcore_fuzz.Thing"]),
    ),
    lambda children: st.lists(children, max_size=5),
    max_leaves=25,
)

jelly_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.binary(max_size=10),
        st.text(max_size=10),
        st.datetimes(),
        st.decimals(allow_nan=False, allow_infinity=False),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.integers() | st.text(max_size=5), children, max_size=4),
        st.frozensets(st.integers(), max_size=4),
    ),
    max_leaves=20,
)


# Drawn by name: a strategy's repr shows its choices, and names are short.
corpus_files = st.sampled_from(sorted(CORPUS)).map(CORPUS.__getitem__)


def _valid_streams() -> st.SearchStrategy[bytes]:
    """Valid Banana streams: corpus files, random s-expressions, jellied values."""
    return st.one_of(
        corpus_files,
        st.builds(encode, sexps, st.sampled_from(DIALECTS)),
        st.builds(lambda value: encode(jelly(value)), jelly_values),
    )


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid stream with a few byte-level mutations, as a fuzzer would make them."""
    data = bytearray(draw(_valid_streams()))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "duplicate", "splice", "truncate"]))
        if kind == "flip" and where < len(data):
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and where < len(data):
            data[where] = draw(
                st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0xFF])
            )
        elif kind == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[where : where + draw(st.integers(1, 8))]
        elif kind == "duplicate":
            data[where:where] = data[where : where + draw(st.integers(1, 16))]
        elif kind == "splice":
            other = draw(corpus_files)
            data[where:] = other[draw(st.integers(0, len(other))) :]
        elif kind == "truncate":
            del data[where:]
    return bytes(data)


# -- the bounded runs --------------------------------------------------------


@pytest.mark.parametrize("harness", sorted(HARNESSES))
@pytest.mark.parametrize("name", sorted(name for name in CORPUS if not name.startswith("bomb-")))
def test_corpus_file(harness: str, name: str) -> None:
    HARNESSES[harness](CORPUS[name])


@pytest.mark.parametrize("harness", sorted(HARNESSES))
@pytest.mark.parametrize("name", sorted(name for name in CORPUS if name.startswith("bomb-")))
def test_bomb_seed(harness: str, name: str) -> None:
    # In a subprocess: without its defence a bomb runs for hours inside one C call (a hash),
    # where nothing in this process could stop it; the timeout is a hang bound, not a speed test.
    script = f"import sys, fuzz_{harness}; fuzz_{harness}.test_one_input(sys.stdin.buffer.read())"
    run = subprocess.run(
        [sys.executable, "-c", script],
        input=CORPUS[name],
        cwd=Path(__file__).parent,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]


@pytest.mark.parametrize("harness", sorted(HARNESSES))
@bounded
@given(data=st.binary(max_size=300))
def test_random_bytes(harness: str, data: bytes) -> None:
    HARNESSES[harness](data)


@pytest.mark.parametrize("harness", sorted(HARNESSES))
@bounded
@given(data=_valid_streams())
def test_valid_streams(harness: str, data: bytes) -> None:
    HARNESSES[harness](data)


@pytest.mark.parametrize("harness", sorted(HARNESSES))
@bounded
@given(data=mutated())
def test_mutated_streams(harness: str, data: bytes) -> None:
    HARNESSES[harness](data)


# -- the corpus ----------------------------------------------------------------


def test_corpus_is_what_make_corpus_writes() -> None:
    assert make_corpus.seeds() == CORPUS


def test_corpus_files_are_complete_streams() -> None:
    for name, data in CORPUS.items():
        dialect = b"none" if name == "big-items.bin" else b"pb"
        assert decode(data, dialect), name  # raises unless the stream is whole and valid


# -- the harnesses themselves -------------------------------------------------------


def test_harnesses_do_not_need_atheris() -> None:
    # CI installs the test extra only: importing a harness must not import atheris.
    assert "atheris" not in sys.modules


@pytest.mark.parametrize("harness", ["fuzz_banana.py", "fuzz_jelly.py"])
def test_atheris_runs_the_harness(harness: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / harness), "-runs=200", "-seed=1", str(tmp_path)],
        capture_output=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    log = result.stderr.decode(errors="replace")
    assert result.returncode == 0, log
    assert "INFO: Instrumenting pbcore.banana" in log
    assert "Done 200 runs" in log


# -- the checks catch what they should -------------------------------------------


def test_banana_harness_reports_a_decoder_disagreement(monkeypatch: pytest.MonkeyPatch) -> None:
    # A decoder that drops a float when it arrives in pieces must be caught.
    class Forgetful(Decoder):
        def feed(self, data: bytes | bytearray | memoryview) -> None:
            super().feed(bytes(data).replace(b"\x84", b"\x81") if len(data) == 1 else data)

    monkeypatch.setattr(fuzz_banana, "Decoder", Forgetful)
    with pytest.raises(AssertionError):
        fuzz_banana.test_one_input(encode([1.5]))


def test_jelly_harness_reports_a_value_that_does_not_travel_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fuzz_jelly, "unjelly", lambda sexp, taster: math)  # a module is not jellyable
    with pytest.raises(TypeError):
        fuzz_jelly.test_one_input(encode([b"None"]))


# -- known pbcore issues ---------------------------------------------------------
#
# Each reproducer runs its harness without the allowance for its issue. They
# are strict xfails: once pbcore is fixed the test passes, which fails the run
# (XPASS(strict)), as a reminder to drop the xfail mark and the KNOWN_ISSUES entry.

#: issue -> (harness, input as hex, what the harness raises without the allowance)
KNOWN: dict[str, tuple[Callable[[bytes], None], str, type[BaseException]]] = {}

#: Inputs that crashed a harness before pbcore was fixed: they must stay fixed.
FIXED: dict[str, tuple[Callable[[bytes], None], str]] = {
    # [[[[[[]]]]]] (an empty list at depth 6) decoded with max_depth=5, then did not encode.
    "empty-list-past-max-depth": (fuzz_banana.test_one_input, "0180" * 5 + "0080"),
    # [reference, 1, [tuple, [dereference, 1]]] unjellied to pbcore.jelly._Hole.
    "self-containing-tuple-hole": (
        fuzz_jelly.test_one_input,
        encode([b"reference", 1, [b"tuple", [b"dereference", 1]]]).hex(),
    ),
    # An allowed instance without attributes jellied as [tag, [None]], which unjelly refused.
    "allowed-instance-empty-state": (fuzz_jelly.test_one_input, encode([b"pbcore_fuzz.Plain", [b"dictionary"]]).hex()),
    # [decimal, 1, 2**63] raised OverflowError (decimal.InvalidOperation for 2**62).
    # [b"pbcore_fuzz.Thing", 5]: Unjellyable.setStateFor did `self.__dict__ = 5` (TypeError).
    "unjellyable-non-dict-state": (fuzz_jelly.test_one_input, encode([b"pbcore_fuzz.Thing", 5]).hex()),
    # [unpersistable, b"x"] read as "Unpersistable data: x", which grew on every round trip.
    "unpersistable-reason-grows": (fuzz_jelly.test_one_input, encode([b"unpersistable", b"x"]).hex()),
    "decimal-exponent-out-of-range": (
        fuzz_jelly.test_one_input,
        encode([b"decimal", 1, 2**63]).hex() + encode([b"decimal", 1, 2**62]).hex(),
    ),
}


@pytest.mark.parametrize("issue", sorted(FIXED))
def test_fixed_issue_stays_fixed(issue: str) -> None:
    harness, hex_input = FIXED[issue]
    harness(bytes.fromhex(hex_input))


def test_every_known_issue_has_a_reproducer() -> None:
    assert set(KNOWN) == fuzz_banana.KNOWN_ISSUES | fuzz_jelly.KNOWN_ISSUES


@pytest.mark.parametrize("issue", sorted(KNOWN))
def test_known_issue_is_stepped_around(issue: str) -> None:
    harness, hex_input, _ = KNOWN[issue]
    harness(bytes.fromhex(hex_input))


@pytest.mark.parametrize(
    "issue",
    [
        pytest.param(
            issue,
            marks=pytest.mark.xfail(raises=KNOWN[issue][2], strict=True, reason="known pbcore issue, see KNOWN_ISSUES"),
        )
        for issue in sorted(KNOWN)
    ],
)
def test_known_issue_reproducer(issue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    harness, hex_input, _ = KNOWN[issue]
    for module in (fuzz_banana, fuzz_jelly):
        monkeypatch.setattr(module, "KNOWN_ISSUES", module.KNOWN_ISSUES - {issue})
    harness(bytes.fromhex(hex_input))


# -- the cost check ------------------------------------------------------------


def busy(data: bytes) -> None:
    """A harness that takes a few tens of milliseconds over any input."""
    assert sum(range(3 * 10**6)) > len(data)


def test_an_input_over_its_cpu_budget_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fuzz_cost, "CPU_BASE", 0.0)
    monkeypatch.setattr(fuzz_cost, "CPU_PER_BYTE", 1e-9)
    with pytest.raises(AssertionError, match=r"an input of 3 bytes cost .* s of CPU \(budget"):
        fuzz_cost.within_budget(busy, b"abc")


def test_an_input_over_its_memory_budget_is_a_finding() -> None:
    # In a fresh process: the check reads the peak memory, which this test process may have raised.
    script = (
        "import fuzz_cost\n"
        "fuzz_cost.MEMORY_BASE = 2**20\n"
        "fuzz_cost.MEMORY_PER_BYTE = 0\n"
        "hog = []\n"
        "fuzz_cost.within_budget(lambda data: hog.append(b'\\x01' * 2**27), b'abc')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=Path(__file__).parent, capture_output=True, timeout=60
    )
    assert run.returncode == 1 and b"grew the peak memory by" in run.stderr, run.stderr
