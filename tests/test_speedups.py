"""Differential tests: the compiled Banana codec (pbcore/_speedups.c) against the pure one.

``pbcore.banana.PyDecoder`` and ``PyEncoder`` are the reference. For every input
here both implementations must give the same expressions (same types, same
values, NaN bit patterns and shared vocabulary words included), the same bytes,
the same error classes and messages, and the same ``offset``, ``buffered``,
``held`` and ``at_boundary`` after every step, whatever the chunking, dialect
switches and limits.

The module is skipped when the extension is not built, except under
``PBCORE_BUILD_SPEEDUPS=1`` (CI's compiled run), where its absence fails.
It runs under ``PBCORE_PURE=1`` too: it compares the two classes directly.
"""

from __future__ import annotations

import gc
import itertools
import os
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pbcore import banana
from pbcore import jelly as _jelly_module
from pbcore.banana import DIALECTS, Limits, PyDecoder, PyEncoder, int_to_b128
from pbcore.errors import BananaError

_speedups = banana._load_speedups()
if _speedups is None:  # pragma: no cover (depends on the build)
    if os.environ.get("PBCORE_BUILD_SPEEDUPS") == "1":
        raise ImportError("PBCORE_BUILD_SPEEDUPS=1 but pbcore._speedups is not built")
    pytest.skip("the compiled codec is not built", allow_module_level=True)

CDecoder: Any = _speedups.Decoder
CEncoder: Any = _speedups.Encoder
WORDS = {id(word) for word in banana._WORDS.values()}

# -- what an implementation does with an input ----------------------------------------


def canonical(value: Any) -> Any:
    """A comparable picture of a decoded value: types exact, floats as bits, words by identity."""
    kind = type(value)
    if kind is list:
        return ("list", [canonical(item) for item in value])
    if kind is bytes:
        return ("bytes", value, id(value) in WORDS)
    if kind is int:
        return ("int", value)
    if kind is float:
        return ("float", struct.pack(">d", value))
    raise AssertionError(f"a decoder gave a {kind.__name__}: {value!r}")


def state(decoder: Any) -> tuple[int, int, int, bool]:
    return decoder.offset, decoder.buffered, decoder.held, decoder.at_boundary


def error_of(error: BaseException) -> tuple[str, str]:
    return type(error).__name__, str(error)


def run_decoder(
    cls: Any,
    data: bytes,
    sizes: Sequence[int],
    dialect: bytes,
    limits: Limits,
    *,
    switches: Sequence[bytes] = (),
) -> list[Any]:
    """Feed *data* in chunks of *sizes*; every step's result and state, and the error at the end."""
    decoder = cls(dialect, limits)
    trace: list[Any] = [state(decoder)]
    switch = iter(switches)
    position = 0
    try:
        for size in [*sizes, len(data)]:  # the last one feeds whatever is left
            chunk = data[position : position + size]
            position += len(chunk)
            decoder.feed(chunk)
            trace.append(("fed", len(chunk), state(decoder)))
            while (expression := decoder.next_expression()) is not None:
                trace.append(("expression", canonical(expression), state(decoder)))
                new_dialect = next(switch, None)
                if new_dialect is not None:
                    decoder.dialect = new_dialect
            trace.append(("none", state(decoder)))
    except BananaError as error:
        trace.append(("error", error_of(error), state(decoder)))
        for again in (decoder.next_expression, lambda: decoder.feed(b"\x81"), lambda: list(decoder)):
            with pytest.raises(BananaError) as repeated:
                again()
            assert str(repeated.value) == str(error)
            trace.append(("again", state(decoder)))
    return trace


def compare_decoders(
    data: bytes, sizes: Sequence[int], dialect: bytes, limits: Limits, switches: Sequence[bytes] = ()
) -> list[Any]:
    pure = run_decoder(PyDecoder, data, sizes, dialect, limits, switches=switches)
    compiled = run_decoder(CDecoder, data, sizes, dialect, limits, switches=switches)
    assert compiled == pure
    return pure


def run_encoder(cls: Any, sexp: Any, dialect: bytes, limits: Limits, depth: int) -> Any:
    encoder = cls(dialect, limits)
    try:
        whole: Any = encoder.encode(sexp)
    except RecursionError:
        whole = "RecursionError"
    except (BananaError, ValueError, TypeError) as error:
        whole = error_of(error)
    out = bytearray(b"head")
    try:
        encoder.encode_into(sexp, out, depth)
        into: Any = None
    except RecursionError:
        # Where the interpreter's recursion limit falls differs (C frames are not Python
        # frames): the error class is the same, not its message (it names the call it was
        # raised in) nor what was written before it.
        return whole, "RecursionError", None
    except (BananaError, ValueError, TypeError) as error:
        into = error_of(error)
    return whole, into, bytes(out)


def compare_encoders(sexp: Any, dialect: bytes = b"pb", limits: Limits = banana.DEFAULT_LIMITS, depth: int = 0) -> Any:
    pure = run_encoder(PyEncoder, sexp, dialect, limits, depth)
    compiled = run_encoder(CEncoder, sexp, dialect, limits, depth)
    assert compiled == pure
    return pure


# -- inputs ---------------------------------------------------------------------------


class MyBytes(bytes):
    pass


class MyInt(int):
    pass


class MyFloat(float):
    pass


class MyList(list):  # type: ignore[type-arg]
    pass


class MyTuple(tuple):  # type: ignore[type-arg]
    pass


class Odd:
    def __repr__(self) -> str:
        return "Odd(" + "x" * 200 + ")"


INT_EDGES = [0, 1, 127, 128, 4095, 4096, 2**31 - 1, 2**31, 2**31 + 1, 2**56, 2**62, 2**63 - 1, 2**63, 2**64]
INT_EDGES += [2**70, 2**447, 2**448 - 1, 2**448, 2**500]
INT_EDGES += [-value for value in INT_EDGES]

atoms: st.SearchStrategy[Any] = st.one_of(
    st.integers(-(2**40), 2**40),
    st.integers(-(2**460), 2**460),
    st.sampled_from(INT_EDGES),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=30),
    st.sampled_from([*banana.VOCABULARY, b"", b"x" * 4095, b"x" * 4096, b"nonesuch"]),
    st.booleans(),
)
odd_atoms: st.SearchStrategy[Any] = st.one_of(
    st.binary(max_size=10).map(MyBytes),
    st.sampled_from([*banana.VOCABULARY]).map(MyBytes),
    st.integers(-(2**70), 2**70).map(MyInt),
    st.floats().map(MyFloat),
    st.sampled_from([None, "text", {1: 2}, {3}, Odd(), object, 1j]),
)


def nested(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=6),
            st.lists(inner, max_size=6).map(tuple),
            st.lists(inner, max_size=3).map(MyList),
            st.lists(inner, max_size=3).map(MyTuple),
        ),
        max_leaves=30,
    )


sexps = nested(atoms)
anything = nested(st.one_of(atoms, odd_atoms))

tight_limits = st.builds(
    Limits,
    prefix_limit=st.integers(1, 12),
    size_limit=st.integers(1, 40),
    max_depth=st.integers(1, 8),
    max_expression_bytes=st.integers(1, 300),
    max_decoded_bytes=st.integers(1, 3000),
)
limits_strategy = st.one_of(st.just(banana.DEFAULT_LIMITS), tight_limits)
ROOMY = Limits(max_depth=250, prefix_limit=80)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Valid streams, or random bytes, or mutated and truncated valid ones."""
    dialect = draw(st.sampled_from(DIALECTS))
    valid = b"".join(PyEncoder(dialect, ROOMY).encode(sexp) for sexp in draw(st.lists(sexps, max_size=4)))
    how = draw(st.sampled_from(["valid", "random", "mutated", "truncated"]))
    if how == "random":
        return draw(st.binary(max_size=200))
    data = bytearray(valid)
    if how == "mutated":
        for _ in range(draw(st.integers(1, 4))):
            where = draw(st.integers(0, len(data)))
            choice = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
            if choice == "flip" and where < len(data):
                data[where] ^= 1 << draw(st.integers(0, 7))
            elif choice == "set" and where < len(data):
                data[where] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0xFF]))
            elif choice == "insert":
                data[where:where] = draw(st.binary(min_size=1, max_size=8))
            else:
                del data[where : where + draw(st.integers(1, 8))]
    elif how == "truncated":
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@st.composite
def chunkings(draw: st.DrawFn, size: int) -> list[int]:
    how = draw(st.sampled_from(["whole", "bytes", "random"]))
    if how == "whole":
        return [size]
    if how == "bytes":
        return [1] * size
    return draw(st.lists(st.integers(0, 20), max_size=size + 2))


# -- the decoder ----------------------------------------------------------------------


@given(data=st.data(), stream=streams(), dialect=st.sampled_from(DIALECTS), limits=limits_strategy)
def test_decoders_agree(data: st.DataObject, stream: bytes, dialect: bytes, limits: Limits) -> None:
    sizes = data.draw(chunkings(len(stream)))
    switches = data.draw(st.lists(st.sampled_from(DIALECTS), max_size=4))
    compare_decoders(stream, sizes, dialect, limits, switches)


@settings(max_examples=50)
@given(stream=streams(), limits=limits_strategy)
def test_every_chunking_gives_the_same_as_one_feed(stream: bytes, limits: Limits) -> None:
    # Byte at a time, and every two-piece split.
    for dialect in DIALECTS:
        compare_decoders(stream, [1] * len(stream), dialect, limits)
        for cut in range(min(len(stream), 40) + 1):
            compare_decoders(stream, [cut], dialect, limits)


@given(sexp=sexps, dialect=st.sampled_from(DIALECTS))
def test_valid_streams_decode_to_the_same_values(sexp: Any, dialect: bytes) -> None:
    blob = PyEncoder(dialect, ROOMY).encode(sexp)
    trace = compare_decoders(blob * 2, [len(blob) // 2 + 1], dialect, ROOMY)
    assert [step[0] for step in trace].count("expression") == 2


def test_vocabulary_words_are_the_shared_objects() -> None:
    decoder = CDecoder(b"pb")
    decoder.feed(banana.encode([b"version", b"answer", b"versio"]))
    version, answer, other = decoder.next_expression()
    assert version is banana._WORDS[banana.VOCABULARY[b"version"]]
    assert answer is banana._WORDS[banana.VOCABULARY[b"answer"]]
    assert other == b"versio" and type(other) is bytes


def lists_in(sexp: Any) -> list[list[Any]]:
    """Every list of an s-expression, itself first."""
    if type(sexp) is not list:
        return []
    return [sexp, *(inner for item in sexp for inner in lists_in(item))]


@given(sexp=sexps, dialect=st.sampled_from(DIALECTS))
def test_an_untracked_decoder_gives_the_same_expressions_untracked(sexp: Any, dialect: bytes) -> None:
    blob = PyEncoder(dialect, ROOMY).encode(sexp)

    def decode(decoder: Any) -> Any:
        decoder.feed(blob[:3])
        first = decoder.next_expression()  # the lists it leaves open are untracked too
        decoder.feed(blob[3:])
        return first if first is not None else decoder.next_expression()

    untracked = decode(CDecoder(dialect, ROOMY, untracked=True))
    tracked = decode(CDecoder(dialect, ROOMY))
    pure = decode(PyDecoder(dialect, ROOMY, untracked=True))  # accepted, and changes nothing
    assert canonical(untracked) == canonical(tracked) == canonical(pure)
    assert not any(gc.is_tracked(item) for item in lists_in(untracked))
    assert all(gc.is_tracked(item) for item in lists_in(tracked))
    assert all(gc.is_tracked(item) for item in lists_in(pure))


def test_loads_and_the_broker_decode_untracked(monkeypatch: pytest.MonkeyPatch) -> None:
    # Both read each expression and let it go: the collector need not walk what they decode.
    from pbcore import broker, codec  # noqa: PLC0415

    asked: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs)
        return CDecoder(*args, **kwargs)

    monkeypatch.setattr(codec, "Decoder", spy)
    monkeypatch.setattr(broker, "Decoder", spy)
    assert codec.loads(codec.dumps([{"a": [1, 2]}])) == [{"a": [1, 2]}]
    broker.Broker(is_client=False)
    assert asked == [{"untracked": True}, {"untracked": True}]


BOUNDARY_STREAMS = [
    banana.encode([b"abcdefgh", [1, [2, [3, [4, []]]]], 2**60, -(2**100), 1.5], limits=ROOMY),
    banana.encode([[[]] * 5, [[1, 2]] * 3, b"x" * 20, [b"y" * 10] * 4], limits=ROOMY),
    banana.encode([b"version", [b"none", 6], [b"pb"]], limits=ROOMY),
    int_to_b128(2**70) + b"\x81" + int_to_b128(5) + b"\x80" + b"\x80" * 5 + int_to_b128(30) + b"\x82" + b"z" * 30,
    b"\x00" * 15 + b"\x81",
]
ALL_SIZES = [[10**6], [1] * 200, [3, 7, 1, 2] * 20]


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("prefix_limit", range(1, 18)),
        ("size_limit", range(1, 35)),
        ("max_depth", range(1, 8)),
        ("max_expression_bytes", range(1, 120)),
        ("max_decoded_bytes", range(1, 1200, 7)),
    ],
)
def test_every_limit_at_and_around_its_boundary(field: str, values: range) -> None:
    outcomes = set()
    for value in values:
        limits = Limits(**{field: value})
        for stream in BOUNDARY_STREAMS:
            for dialect in DIALECTS:
                for sizes in ALL_SIZES:
                    trace = compare_decoders(stream, sizes, dialect, limits)
                    outcomes.add(trace[-1][0] == "again")
        sexp: Any
        for sexp in ([b"x" * value], [[1]] * value, 2 ** (7 * value), [[[[[[[[]]]]]]]]):
            compare_encoders(sexp, limits=limits)
    assert outcomes == {True, False}  # the range crosses the boundary: some refused, some not


@pytest.mark.parametrize(
    "stream",
    [
        b"\x87",
        b"\x00\x87",
        b"\x7f\x87",
        b"\x7f\x7f\x7f\x7f\x7f\x7f\x7f\x7f\x7f\x7f\x87",
        b"\x88",
        b"\xff",
        b"\x7f" * 64 + b"\x81",
        b"\x7f" * 65 + b"\x81",
        b"\x7f" * 70,
        b"\x7f" * 64 + b"\x82",
        b"\x7f" * 9 + b"\x80",
        b"\x7f" * 9 + b"\x83",
        b"\x7f" * 9 + b"\x85",
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x40\x82",
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x40\x80",
        b"\x7f\x84" + b"\x00" * 7,
        b"\x7f\x84" + b"\x00" * 8,
        b"\x02\x80\x01\x87\x02\x87",
    ],
)
@pytest.mark.parametrize(
    "limits",
    [banana.DEFAULT_LIMITS, Limits(size_limit=2**70, max_expression_bytes=2**80), Limits(prefix_limit=3)],
)
def test_edge_streams(stream: bytes, limits: Limits) -> None:
    for dialect in DIALECTS:
        for sizes in ([len(stream)], [1] * len(stream)):
            compare_decoders(stream, sizes, dialect, limits)


def test_a_failed_decoder_keeps_a_sane_offset_and_buffers_nothing() -> None:
    # The error comes right after pending chunks were joined: offset used to count the
    # consumed bytes twice and buffered went negative.
    good = banana.encode([b"abc", 1]) * 3
    for cls in (PyDecoder, CDecoder):
        decoder = cls()
        decoder.feed(good)
        assert decoder.next_expression() is not None
        decoder.feed(b"\x01\x88")
        assert [decoder.next_expression(), decoder.next_expression()] == [[b"abc", 1], [b"abc", 1]]
        with pytest.raises(BananaError, match=f"unknown type byte 0x88 \\(at byte {len(good)} of"):
            decoder.next_expression()
        assert (decoder.offset, decoder.buffered, decoder.held) == (len(good), 0, 0)


def test_a_failed_decoder_lets_go_of_what_it_held() -> None:
    data = int_to_b128(100_000) + b"\x80" + b"\x02\x82ab" * 99_000
    decoder = CDecoder(b"pb", Limits(max_decoded_bytes=10**9))
    gc.collect()
    tracemalloc.start()
    decoder.feed(data)
    assert decoder.next_expression() is None
    holding = tracemalloc.get_traced_memory()[0]
    decoder.feed(b"\x88")
    with pytest.raises(BananaError):
        decoder.next_expression()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert holding > 4_000_000  # 99,000 byte strings in a list
    assert after < holding / 100, (after, holding)
    assert (decoder.held, decoder.buffered) == (0, 0)


def test_the_compiled_decoder_is_subclassable_and_iter_uses_overrides() -> None:
    calls = []

    class Counting(CDecoder):  # type: ignore[misc]
        def next_expression(self) -> Any:
            calls.append(1)
            return super().next_expression()

    decoder = Counting(b"none")
    assert isinstance(decoder, CDecoder)
    decoder.feed(banana.encode([1], b"none") * 3)
    assert list(decoder) == [[1], [1], [1]]
    assert len(calls) == 4


def test_the_active_classes() -> None:
    pure = os.environ.get("PBCORE_PURE", "") not in ("", "0")
    assert banana.ACCELERATED is not pure
    assert (banana.Decoder is CDecoder) is not pure
    assert (banana.Encoder is CEncoder) is not pure
    assert isinstance(banana.Decoder(), banana.Decoder)
    assert isinstance(banana.Encoder(), banana.Encoder)


@pytest.mark.parametrize(("value", "accelerated"), [("", True), ("0", True), ("1", False), ("yes", False)])
def test_pbcore_pure_forces_the_pure_codec(value: str, accelerated: bool) -> None:
    env = {**os.environ, "PBCORE_PURE": value}
    script = "import pbcore.banana as b; print(b.ACCELERATED, b.Decoder.__module__)"
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split() == [str(accelerated), "pbcore._speedups" if accelerated else "pbcore.banana"]


def test_bad_arguments_are_refused_alike() -> None:
    classes: list[Any] = [PyDecoder, CDecoder, PyEncoder, CEncoder]
    for cls in classes:
        with pytest.raises(ValueError, match=r"unknown Banana dialect b'json'; expected one of \(b'pb', b'none'\)"):
            cls(b"json")
        with pytest.raises(ValueError, match="unknown Banana dialect 'pb'"):
            cls("pb")
    for cls in (PyDecoder, CDecoder):
        decoder = cls()
        decoder.feed(bytearray(b"\x01\x81"))
        decoder.feed(memoryview(b"\x02\x81"))
        decoder.feed(b"")
        assert list(decoder) == [1, 2]


# -- the encoder ----------------------------------------------------------------------


@given(sexp=anything, dialect=st.sampled_from(DIALECTS), limits=limits_strategy, depth=st.integers(-3, 9))
def test_encoders_agree(sexp: Any, dialect: bytes, limits: Limits, depth: int) -> None:
    compare_encoders(sexp, dialect, limits, depth)


@pytest.mark.parametrize("value", [*INT_EDGES, True, False, MyInt(2**40), MyInt(-7)])
@pytest.mark.parametrize("prefix_limit", [1, 2, 5, 9, 10, 64, 65, 100])
def test_ints_at_every_edge(value: int, prefix_limit: int) -> None:
    compare_encoders([value, [value]], limits=Limits(prefix_limit=prefix_limit))


def test_cycles_and_depth() -> None:
    cycle: list[Any] = [1]
    cycle.append(cycle)
    (whole, _, out) = compare_encoders(cycle)
    assert "nested deeper than 100 (or a cycle)" in whole[1]
    assert out.startswith(b"head\x02\x80\x01\x81")  # what was written before the error stays
    # Below depth 0 a cycle runs into the interpreter's recursion limit first: refused, never
    # a crash. (From 3.12, C code has its own, higher limit, so the compiled encoder may reach
    # the depth limit instead: which error comes first is not compared.)
    for cls in (PyEncoder, CEncoder):
        with pytest.raises((RecursionError, BananaError)):
            cls().encode_into(cycle, bytearray(), -1000)
    for depth in range(95, 102):
        compare_encoders([[[[]]]], depth=depth)


def test_unencodable_objects_are_named_alike() -> None:
    (whole, _, _) = compare_encoders([1, [Odd()]])
    assert whole == ("BananaError", "Banana cannot encode Odd objects: Odd(" + "x" * 76)
    for value in (None, "text", {1: 2}, 1j, object(), Odd, print):
        compare_encoders(value)


def test_subclasses_are_converted_by_their_base_type() -> None:
    class Shouting(bytes):
        def __bytes__(self) -> bytes:
            return b"LOUD"

    class Counted(list):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            return iter([1, 2, 3])

    whole, _, _ = compare_encoders([Shouting(b"quiet"), Counted([9]), MyTuple((b"list",)), MyFloat(2.5)])
    assert whole == PyEncoder().encode([b"LOUD", [1, 2, 3], [b"list"], 2.5])


def test_encode_into_needs_a_bytearray() -> None:
    with pytest.raises(TypeError):
        CEncoder().encode_into([1], [])


def test_the_module_helpers_still_work() -> None:
    assert banana.decode(banana.encode([b"list", 1, -1, 1.0])) == [[b"list", 1, -1, 1.0]]
    assert banana.encode(5) == b"\x05\x81"


# -- no leaks ---------------------------------------------------------------------------


def churn(rounds: int) -> None:
    sample: Any = [b"message", 1, b"root", b"x" * 100, [1.5, -(2**70), 2**40, (b"tuple", b"a")], True, MyInt(3)]
    blob = banana.encode(sample)
    limits = Limits(max_depth=5, size_limit=50)
    for _ in range(rounds):
        encoder = CEncoder(b"pb")
        out = bytearray()
        encoder.encode_into(sample, out)
        decoder = CDecoder(b"pb")
        for offset in range(0, len(blob), 7):
            decoder.feed(blob[offset : offset + 7])
            list(decoder)
        bad = CDecoder(b"pb", limits)
        bad.feed(b"\x7f\x80" + blob)
        refused = 0
        for attempt in (bad.next_expression, lambda: CEncoder(b"pb", limits).encode([sample] * 60)):
            try:
                attempt()
            except BananaError:
                refused += 1
        try:
            encoder.encode([Odd()])
        except BananaError:
            refused += 1
        assert refused == 3
        # The plain-value paths: written, read, and left to the Python code (None, NOT_FLAT).
        plain: Any = (1.5, "é", None, True, {"k": [b"x", 2**40]}, frozenset({3}))
        assert encoder.encode_message([b"answer", 1], [plain]) is not None
        assert encoder.encode_plain(plain) is not None
        assert encoder.encode_plain([plain, plain]) is None  # a container met twice
        sexp = [b"tuple", [b"unicode", b"\xc3\xa9t\xc3\xa9"], [b"None"], [b"dictionary", [1, [b"list", 2.5]]]]
        allowed = _jelly_module.globalSecurity.allowedTypes
        not_flat = _jelly_module.NOT_FLAT
        assert _speedups.flat_value(sexp, allowed, 64, 3, not_flat) is not not_flat
        assert _speedups.flat_value([b"tuple", [b"unicode", b"\xff"]], allowed, 64, 3, not_flat) is not_flat


def test_no_leaks() -> None:
    # What the codec allocates is traced to the lines of churn() that called it: one object
    # lost a round would be 3000 * 24 bytes or more there (a float: 72 KB).
    here = [tracemalloc.Filter(True, __file__)]

    def snapshot() -> tracemalloc.Snapshot:
        gc.collect()
        return tracemalloc.take_snapshot().filter_traces(here)

    tracemalloc.start()
    churn(1000)  # warm up caches
    snapshots = [snapshot()]
    for _ in range(2):
        churn(3000)
        snapshots.append(snapshot())
    tracemalloc.stop()
    rounds = [
        sum(stat.size_diff for stat in after.compare_to(before, "lineno"))
        for before, after in itertools.pairwise(snapshots)
    ]
    # A leak grows every round; CPython's free lists (80 lists, 100 floats...) filling, some
    # 20-45 KB depending on what ran before, grow one round at most: the smaller round counts.
    assert min(rounds) < 40_000, (rounds, snapshots[-1].compare_to(snapshots[0], "lineno")[:3])


def test_tests_can_fail() -> None:
    # The comparison notices a difference of one byte position.
    with pytest.raises(AssertionError):

        def differ(cls: Callable[..., Any]) -> list[Any]:
            return run_decoder(cls, b"\x88" if cls is PyDecoder else b"\x01\x88", [1], b"pb", banana.DEFAULT_LIMITS)

        assert differ(PyDecoder) == differ(CDecoder)


# -- the plain-value paths (pbcore.codec, pbcore.jelly): compiled against pure --------------------

from pbcore import codec as _codec  # noqa: E402
from pbcore import jelly as _jelly  # noqa: E402
from tests.strategies import plain_atoms, plain_values, same_structure, values  # noqa: E402

_plain_values = plain_values(plain_atoms(st.just("\ud800")))


def _pure_encode_list(encoder: Any, head: list[Any], items: list[Any]) -> tuple[str, Any]:
    saved = encoder._compiled_message
    encoder._compiled_message = None
    try:
        return "bytes", encoder.encode_list(head, items)
    except Exception as error:  # compared, not handled
        return type(error).__name__, str(error)
    finally:
        encoder._compiled_message = saved


@given(st.lists(_plain_values | values(), max_size=3), st.integers(1, 6), st.integers(5, 12))
@settings(max_examples=300)
@example([(1,), {"a": [1.5, "é"]}], 6, 12)  # every container and atom kind, at the depth limit
@example([[None, True, False, b"None", "None", -(2**40), frozenset({3}), {7}]], 6, 12)
def test_encode_message_is_the_pure_encode_list(items: list[Any], depth: int, size: int) -> None:
    for limits in (Limits(), Limits(max_depth=depth, size_limit=size)):
        encoder = _codec.ValueEncoder(limits=limits)
        compiled_encoder = CEncoder(b"pb", limits)
        encoder._banana = compiled_encoder
        encoder._compiled_message = compiled_encoder.encode_message
        head = [b"answer", 12345]
        try:
            compiled: tuple[str, Any] = ("bytes", encoder._compiled_message(head, items))
        except Exception as error:
            compiled = (type(error).__name__, str(error))
        if compiled == ("bytes", None):
            continue  # not plain: the Python code does it all
        assert compiled == _pure_encode_list(encoder, head, items)


@given(_plain_values | values(), st.integers(1, 4), st.integers(1, 70))
@settings(max_examples=300)
@example(((1, "x"), [None, True, False], {"k": 1.5}), 4, 70)
def test_compiled_flat_value_is_the_pure_one(value: Any, depth: int, collisions: int) -> None:
    limits = Limits(max_depth=depth, max_hash_collisions=collisions)
    try:
        sexp = _jelly.jelly(value)
    except Exception:  # a lone surrogate: nothing to read
        return
    levels = min(limits.max_depth, _jelly._FLAT_LEVELS)
    allowed = _jelly.globalSecurity.allowedTypes
    pure = _jelly._flat(sexp, allowed, limits, levels) if type(sexp) is list else sexp
    compiled = _speedups.flat_value(sexp, allowed, limits.max_hash_collisions, levels, _jelly.NOT_FLAT)
    if pure is _jelly.NOT_FLAT:
        assert compiled is _jelly.NOT_FLAT
    else:
        assert type(compiled) is type(pure) and same_structure(compiled, pure)


@given(_plain_values | values(), st.integers(1, 6), st.integers(5, 12), st.integers(0, 3))
@settings(max_examples=300)
@example((1, "x", [None, True, {"k": 1.5}]), 6, 12, 0)
@example(frozenset({1, 2}), 6, 12, 2)
def test_encode_plain_is_the_pure_write_flat(value: Any, depth: int, size: int, at: int) -> None:
    for limits in (Limits(), Limits(max_depth=depth, size_limit=size)):
        compiled_encoder = CEncoder(b"pb", limits)
        encoder = _codec.ValueEncoder(limits=limits)
        encoder._banana = compiled_encoder
        try:
            compiled: tuple[str, Any] = ("bytes", compiled_encoder.encode_plain(value, at))
        except Exception as error:
            compiled = (type(error).__name__, str(error))
        out = bytearray()
        try:
            pure: tuple[str, Any] = ("bytes", bytes(out) if encoder._write_flat(value, out, at) else None)
        except Exception as error:
            pure = (type(error).__name__, str(error))
        if compiled == ("bytes", None):
            continue  # the compiled code leaves it (and any refusal) to the Python code
        assert compiled == pure


@pytest.mark.parametrize("count", [1, 15, 16, 17, 40])
def test_the_compiled_plain_path_finds_a_container_met_twice_however_many_came_before(count: int) -> None:
    # The compiled encoder keeps the first containers it meets in a small array, the rest in a set.
    encoder = CEncoder(b"pb", Limits())
    pure = _codec.ValueEncoder()
    pure._compiled_message = pure._compiled_plain = None
    items: list[Any] = [[i] for i in range(count)]
    head: list[banana.Sexp] = [b"answer", 1]
    assert encoder.encode_message(head, [items]) == pure.encode_plain_list(head, [items])
    assert encoder.encode_plain(items, 0) == pure.encode(items)
    for again in sorted({0, count // 2, count - 1}):
        shared = [*items, items[again]]  # a reference: left to the general way
        assert encoder.encode_message(head, [shared]) is None
        assert encoder.encode_plain(shared, 0) is None
        assert pure.encode_plain_list(head, [shared]) is None
