"""Unit, property and bad-input tests for the Banana codec (:mod:`pbcore.banana`).

Wire facts come from Twisted 26.x: the byte vectors below were checked
against ``twisted.spread.banana``, and :func:`test_encoding_matches_twisted`
keeps checking them against it.
"""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.spread import banana as _twisted_banana

from pbcore.banana import (
    DEFAULT_LIMITS,
    DIALECTS,
    VOCABULARY,
    Decoder,
    Encoder,
    Limits,
    Sexp,
    b128_to_int,
    decode,
    encode,
    int_to_b128,
)
from pbcore.errors import BananaError, JellyError, ProtocolError
from pbcore.jelly import jelly, unjelly
from tests.strategies import BANANA_INT_LIMIT, same_structure, sexps, values

twisted_banana: Any = _twisted_banana  # Twisted is untyped: calls go through Any

SIZE_LIMIT = 640 * 1024


def drain(decoder: Decoder) -> list[Sexp]:
    """Every expression the decoder can complete from what it was fed."""
    out: list[Sexp] = []
    while (expression := decoder.next_expression()) is not None:
        out.append(expression)
    return out


def float_bits(value: float) -> bytes:
    return struct.pack(">d", value)


# ---------------------------------------------------------------------------
# Known byte vectors


@pytest.mark.parametrize(
    ("sexp", "dialect", "hexbytes"),
    [
        ([b"list", 1, 2], b"pb", "0380088701810281"),
        ([b"list", 1, 2], b"none", "038004826c69737401810281"),
        ([b"None"], b"pb", "01800187"),
        ([], b"pb", "0080"),
        ([[]], b"pb", "01800080"),
        (0, b"pb", "0081"),
        (1, b"pb", "0181"),
        (127, b"pb", "7f81"),
        (128, b"pb", "000181"),
        (2**31 - 1, b"pb", "7f7f7f7f0781"),
        (2**31, b"pb", "0000000008" + "85"),
        (-1, b"pb", "0183"),
        (-(2**31), b"pb", "0000000008" + "83"),
        (-(2**31) - 1, b"pb", "0100000008" + "86"),
        (b"", b"pb", "0082"),
        (b"abc", b"pb", "0382616263"),
        (b"uncache", b"pb", "1f87"),
        (b"uncache", b"none", "0782" + b"uncache".hex()),
        (1.5, b"pb", "843ff8000000000000"),
        (-0.0, b"pb", "848000000000000000"),
        (float("inf"), b"pb", "847ff0000000000000"),
    ],
)
def test_known_vectors(sexp: Sexp, dialect: bytes, hexbytes: str) -> None:
    data = bytes.fromhex(hexbytes)
    assert encode(sexp, dialect) == data
    assert Encoder(dialect).encode(sexp) == data
    [decoded] = decode(data, dialect)
    assert same_structure(decoded, sexp)


def test_jellied_none_vector() -> None:
    assert encode(jelly(None)) == bytes.fromhex("01800187")
    assert unjelly(decode(bytes.fromhex("01800187"))[0]) is None


def test_vocabulary_is_twisteds() -> None:
    assert VOCABULARY[b"None"] == 1
    assert VOCABULARY[b"list"] == 8
    assert VOCABULARY[b"uncache"] == 31
    assert sorted(VOCABULARY.values()) == list(range(1, 32))
    assert DIALECTS == (b"pb", b"none")


@pytest.mark.parametrize("value", [0, 1, 127, 128, 16383, 16384, 2**31, 2**448 - 1, 10**100])
def test_b128_round_trip(value: int) -> None:
    prefix = int_to_b128(value)
    assert all(byte < 0x80 for byte in prefix)
    assert b128_to_int(prefix) == value


def test_b128_refuses_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        int_to_b128(-1)


# ---------------------------------------------------------------------------
# Round trips of every type


INT_CASES = [
    0,
    1,
    -1,
    127,
    128,
    -128,
    4095,
    4096,
    -4095,
    -4096,
    2**31 - 1,
    2**31,
    2**31 + 1,
    -(2**31) + 1,
    -(2**31),
    -(2**31) - 1,
    2**63,
    -(2**63),
    2**448 - 1,
    -(2**448) + 1,
]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("value", INT_CASES)
def test_int_round_trip(dialect: bytes, value: int) -> None:
    data = encode(value, dialect)
    [decoded] = decode(data, dialect)
    assert type(decoded) is int
    assert decoded == value


@pytest.mark.parametrize(
    ("value", "type_byte"),
    [
        (2**31 - 1, 0x81),
        (2**31, 0x85),
        (-(2**31), 0x83),
        (-(2**31) - 1, 0x86),
        (0, 0x81),
        (-1, 0x83),
    ],
)
def test_int_type_byte_at_the_boundaries(value: int, type_byte: int) -> None:
    assert encode(value)[-1] == type_byte


@pytest.mark.parametrize(
    "value",
    [
        0.0,
        -0.0,
        1.5,
        -2.25,
        1e308,
        -1e-308,
        5e-324,
        float("inf"),
        float("-inf"),
        float("nan"),
        struct.unpack(">d", bytes.fromhex("7ff8000000000123"))[0],  # a NaN with a payload
        struct.unpack(">d", bytes.fromhex("fff8000000000000"))[0],  # a negative NaN
    ],
)
def test_float_round_trip_is_bit_exact(value: float) -> None:
    data = encode(value)
    assert data == b"\x84" + float_bits(value)
    [decoded] = decode(data)
    assert type(decoded) is float
    assert float_bits(decoded) == float_bits(value)


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("value", [b"", b"x", b"\x00\x80\xff", bytes(range(256)) * 20, b"a" * SIZE_LIMIT])
def test_bytes_round_trip(dialect: bytes, value: bytes) -> None:
    [decoded] = decode(encode(value, dialect), dialect)
    assert type(decoded) is bytes
    assert decoded == value


@pytest.mark.parametrize("word", sorted(VOCABULARY))
def test_vocabulary_items_in_pb_dialect(word: bytes) -> None:
    data = encode(word, b"pb")
    assert data == int_to_b128(VOCABULARY[word]) + b"\x87"
    assert decode(data, b"pb") == [word]


@pytest.mark.parametrize("word", sorted(VOCABULARY))
def test_vocabulary_words_are_plain_strings_in_none_dialect(word: bytes) -> None:
    data = encode(word, b"none")
    assert data == int_to_b128(len(word)) + b"\x82" + word
    assert decode(data, b"none") == [word]


def test_vocabulary_item_refused_in_none_dialect() -> None:
    with pytest.raises(BananaError, match="vocabulary"):
        decode(bytes.fromhex("0887"), b"none")


def test_unknown_vocabulary_index_refused() -> None:
    with pytest.raises(BananaError, match="vocabulary index 99"):
        decode(int_to_b128(99) + b"\x87")
    with pytest.raises(BananaError, match="vocabulary index 0"):
        decode(b"\x00\x87")


@pytest.mark.parametrize("type_byte", [0x88, 0x90, 0xC0, 0xFF])
def test_unknown_type_byte_refused(type_byte: int) -> None:
    with pytest.raises(BananaError, match=f"type byte 0x{type_byte:02x}"):
        decode(bytes([1, type_byte]))


def test_lists_round_trip() -> None:
    value: list[Any] = [[], [[]], [1, [b"x", [2.5, [-7, [b"list"]]]]], list(range(5000))]
    for dialect in DIALECTS:
        [decoded] = decode(encode(value, dialect), dialect)
        assert decoded == value


def test_tuples_and_subclasses_encode_as_their_base_type() -> None:
    class MyBytes(bytes):
        pass

    class MyInt(int):
        pass

    class MyFloat(float):
        pass

    class MyList(list[Any]):
        pass

    value: Any = (True, False, MyBytes(b"list"), MyInt(5), MyFloat(2.5), MyList([1, (2,)]))
    assert encode(value) == encode([1, 0, b"list", 5, 2.5, [1, [2]]])
    assert decode(encode(value)) == [[1, 0, b"list", 5, 2.5, [1, [2]]]]


@pytest.mark.parametrize("value", ["text", None, {1: 2}, {1}, object(), 1j])
def test_encoder_refuses_other_types(value: Any) -> None:
    with pytest.raises(BananaError, match="cannot encode"):
        encode(value)
    with pytest.raises(BananaError, match="cannot encode"):
        encode([1, [value]])


def test_unknown_dialect_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="dialect"):
        Decoder(b"xml")
    with pytest.raises(ValueError, match="dialect"):
        Encoder(b"xml")


@given(sexps(), st.sampled_from(DIALECTS))
def test_sexp_round_trip(sexp: Any, dialect: bytes) -> None:
    data = encode(sexp, dialect)
    assert same_structure(decode(data, dialect), [sexp])


@given(sexps(), st.sampled_from(DIALECTS))
def test_encode_into_appends(sexp: Any, dialect: bytes) -> None:
    out = bytearray(b"head")
    Encoder(dialect).encode_into(sexp, out)
    assert bytes(out) == b"head" + encode(sexp, dialect)


def twisted_encode(sexp: Any, dialect: bytes) -> bytes:
    peer = twisted_banana.Banana()
    peer.setPrefixLimit(64)
    peer.currentDialect = dialect
    out = io.BytesIO()
    peer._encode(sexp, out.write)
    return out.getvalue()


def twisted_decode(data: bytes, dialect: bytes) -> list[Any]:
    received: list[Any] = []
    peer = twisted_banana.Banana()
    peer.setPrefixLimit(64)
    peer.currentDialect = dialect
    peer.expressionReceived = received.append
    peer.dataReceived(data)
    return received


@settings(max_examples=50)
@given(sexps(), st.sampled_from(DIALECTS))
def test_encoding_matches_twisted(sexp: Any, dialect: bytes) -> None:
    ours = encode(sexp, dialect)
    assert ours == twisted_encode(sexp, dialect)
    assert same_structure(twisted_decode(ours, dialect), [sexp])


# ---------------------------------------------------------------------------
# The incremental decoder


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[Any], bytes, bytes]:
    """A few expressions, their dialect and their concatenated encoding."""
    dialect = draw(st.sampled_from(DIALECTS))
    expressions = draw(st.lists(sexps(max_leaves=10), min_size=1, max_size=4))
    return expressions, dialect, b"".join(encode(e, dialect) for e in expressions)


@given(streams(), st.data())
def test_any_chunking_gives_the_same_expressions(stream: tuple[list[Any], bytes, bytes], data: st.DataObject) -> None:
    expressions, dialect, encoded = stream
    cuts = sorted(data.draw(st.lists(st.integers(0, len(encoded)), max_size=12)))
    chunks = [encoded[a:b] for a, b in zip([0, *cuts], [*cuts, len(encoded)], strict=True)]
    assert b"".join(chunks) == encoded

    whole = Decoder(dialect)
    whole.feed(encoded)
    expected = drain(whole)
    assert same_structure(expected, expressions)
    assert whole.at_boundary

    chunked = Decoder(dialect)
    got: list[Sexp] = []
    for chunk in chunks:
        chunked.feed(chunk)
        got.extend(drain(chunked))
    assert same_structure(got, expected)
    assert chunked.at_boundary
    assert chunked.offset == len(encoded)
    assert chunked.buffered == 0


@settings(max_examples=30)
@given(streams())
def test_one_byte_at_a_time(stream: tuple[list[Any], bytes, bytes]) -> None:
    expressions, dialect, encoded = stream
    # Where each expression ends in the stream.
    ends: list[int] = []
    position = 0
    for expression in expressions:
        position += len(encode(expression, dialect))
        ends.append(position)

    decoder = Decoder(dialect)
    got: list[Sexp] = []
    for index in range(len(encoded)):
        decoder.feed(encoded[index : index + 1])
        expression = decoder.next_expression()
        if index + 1 in ends:
            # Complete exactly when its last byte arrives, and not before.
            assert expression is not None
            got.append(expression)
            assert decoder.at_boundary
        else:
            assert expression is None
            assert not decoder.at_boundary
        assert decoder.next_expression() is None
    assert same_structure(got, expressions)


@given(sexps(), st.sampled_from(DIALECTS), st.data())
def test_every_strict_prefix_waits(sexp: Any, dialect: bytes, data: st.DataObject) -> None:
    encoded = encode(sexp, dialect)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    decoder = Decoder(dialect)
    decoder.feed(encoded[:cut])
    assert decoder.next_expression() is None
    assert decoder.next_expression() is None
    assert decoder.at_boundary == (cut == 0)
    # ... and the rest completes it.
    decoder.feed(encoded[cut:])
    assert same_structure(drain(decoder), [sexp])
    assert decoder.at_boundary


def test_every_strict_prefix_waits_exhaustively() -> None:
    value: Any = [b"list", 2**40, [-(2**40), 1.5, b"x" * 130, [b"reference", -5]], [], 2**300]
    for dialect in DIALECTS:
        encoded = encode(value, dialect)
        for cut in range(len(encoded)):
            decoder = Decoder(dialect)
            decoder.feed(encoded[:cut])
            assert decoder.next_expression() is None, cut
            assert decoder.at_boundary == (cut == 0), cut
            if cut:
                with pytest.raises(BananaError, match="ends inside"):
                    decode(encoded[:cut], dialect)
        assert decode(b"", dialect) == []


def test_dialect_switch_between_expressions_in_one_chunk() -> None:
    # What PB's handshake does: the dialect is picked by one expression and
    # used from the next one on, which may already sit in the same chunk.
    chunk = encode(b"pb", b"none") + encode([b"version", 6], b"pb")
    assert bytes.fromhex("1387") in chunk  # the vocabulary item for b"version"

    decoder = Decoder(b"none")
    decoder.feed(chunk)
    assert decoder.next_expression() == b"pb"
    decoder.dialect = b"pb"
    assert decoder.next_expression() == [b"version", 6]
    assert decoder.next_expression() is None
    assert decoder.at_boundary

    # Without the switch the same bytes are refused.
    stubborn = Decoder(b"none")
    stubborn.feed(chunk)
    assert stubborn.next_expression() == b"pb"
    with pytest.raises(BananaError, match="vocabulary"):
        stubborn.next_expression()


def test_iteration_yields_complete_expressions_only() -> None:
    decoder = Decoder()
    decoder.feed(encode([1, 2]) + encode(b"abc") + encode([3])[:-1])
    assert list(decoder) == [[1, 2], b"abc"]
    assert not decoder.at_boundary
    decoder.feed(encode([3])[-1:])
    assert list(decoder) == [[3]]


def test_feed_accepts_bytearray_and_memoryview() -> None:
    encoded = encode([b"x" * 10, 5])
    decoder = Decoder()
    decoder.feed(bytearray(encoded[:4]))
    decoder.feed(memoryview(encoded)[4:])
    assert drain(decoder) == [[b"x" * 10, 5]]


def test_large_string_in_1k_chunks() -> None:
    payload = bytes(range(256)) * 800  # 200 KiB
    encoded = encode([payload, b"tail"])
    decoder = Decoder()
    got: list[Sexp] = []
    for start in range(0, len(encoded), 1024):
        decoder.feed(encoded[start : start + 1024])
        got.extend(drain(decoder))
    assert got == [[payload, b"tail"]]


def test_string_one_byte_at_a_time() -> None:
    # Linear cost is not timed here; this shows a long string fed one byte
    # per call completes, exactly once, with the right value.
    payload = bytes(range(256)) * 120  # 30 KiB
    encoded = encode(payload) + encode(7)
    decoder = Decoder()
    got: list[Sexp] = []
    for index in range(len(encoded)):
        decoder.feed(encoded[index : index + 1])
        got.extend(drain(decoder))
        if index < len(encoded) - 3:
            assert got == [] and decoder.buffered == index + 1
    assert got == [payload, 7]
    assert decoder.at_boundary


# ---------------------------------------------------------------------------
# Limits


def test_limits_defaults() -> None:
    assert Limits() == DEFAULT_LIMITS
    assert DEFAULT_LIMITS.prefix_limit == 64
    assert DEFAULT_LIMITS.size_limit == 640 * 1024
    assert DEFAULT_LIMITS.max_depth == 100
    assert DEFAULT_LIMITS.max_expression_bytes == 8 * 1024 * 1024


def test_limits_are_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        DEFAULT_LIMITS.max_depth = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_depth": 0},
        {"max_depth": 10**6},
        {"max_depth": -1},
        {"prefix_limit": 0},
        {"size_limit": 0},
        {"size_limit": -5},
        {"max_expression_bytes": 0},
    ],
)
def test_limits_validation(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Limits(**kwargs)


def test_prefix_limit() -> None:
    # 64 bytes of prefix is the most Twisted accepts: 2**448 - 1 fits exactly.
    top = encode(2**448 - 1)
    assert len(top) == 65
    assert decode(top) == [2**448 - 1]

    decoder = Decoder()
    decoder.feed(b"\x7f" * 64)
    assert decoder.next_expression() is None  # could still be a 64-byte prefix
    decoder.feed(b"\x7f")
    with pytest.raises(BananaError, match="prefix longer than the limit of 64"):
        decoder.next_expression()


@pytest.mark.parametrize("digits", [1, 2, 3, 4])
def test_prefix_limit_is_configurable(digits: int) -> None:
    # The decoder reads prefixes of one to three digits without the general way: each length at
    # and past each limit.
    limits = Limits(prefix_limit=digits)
    top = 128**digits - 1
    assert decode(encode(top), limits=limits) == [top]
    assert decode(encode(-top), limits=limits) == [-top]
    if digits > 1:
        assert decode(encode([b"x" * 200, top]), limits=limits) == [[b"x" * 200, top]]
    else:  # a string of 200 bytes needs two digits
        with pytest.raises(BananaError, match="prefix longer than the limit"):
            decode(encode([b"x" * 200]), limits=limits)
    with pytest.raises(BananaError, match="prefix longer than the limit"):
        decode(encode(top + 1), limits=limits)


def test_string_size_limit_refused_before_the_data() -> None:
    decoder = Decoder()
    decoder.feed(int_to_b128(10**6) + b"\x82")  # the header alone, no body
    with pytest.raises(BananaError, match="size limit") as caught:
        decoder.next_expression()
    assert "1000000" in str(caught.value)


def test_string_at_the_size_limit_is_accepted() -> None:
    limits = Limits(size_limit=10)
    assert decode(encode(b"x" * 10), limits=limits) == [b"x" * 10]
    decoder = Decoder(limits=limits)
    decoder.feed(b"\x0b\x82")  # claims 11 bytes
    with pytest.raises(BananaError, match="size limit of 10"):
        decoder.next_expression()


def test_list_size_limit_refused_before_the_items() -> None:
    decoder = Decoder()
    decoder.feed(int_to_b128(SIZE_LIMIT + 1) + b"\x80")
    with pytest.raises(BananaError, match="size limit"):
        decoder.next_expression()
    limits = Limits(size_limit=3)
    assert decode(encode([1, 2, 3]), limits=limits) == [[1, 2, 3]]
    with pytest.raises(BananaError, match="list of 4 items is over the size limit"):
        decode(b"\x04\x80", limits=limits)


def nested(depth: int) -> bytes:
    """The encoding of *depth* nested one-item lists around a 0."""
    return b"\x01\x80" * depth + b"\x00\x81"


def test_nesting_limit() -> None:
    value = decode(nested(100))[0]
    for _ in range(100):
        assert isinstance(value, list)
        value = value[0]
    assert value == 0
    decoder = Decoder()
    decoder.feed(nested(101)[:202])  # the headers only
    with pytest.raises(BananaError, match="nested deeper than the limit of 100"):
        decoder.next_expression()
    with pytest.raises(BananaError, match="nested"):
        decode(nested(6), limits=Limits(max_depth=5))


def test_expression_length_limit() -> None:
    limits = Limits(max_expression_bytes=100)
    assert decode(encode([b"x" * 40, b"y" * 40]), limits=limits) == [[b"x" * 40, b"y" * 40]]
    with pytest.raises(BananaError, match="expression longer than the limit of 100"):
        decode(encode([b"x" * 20] * 5), limits=limits)
    # Separate expressions each get the whole budget.
    assert decode(encode([b"x" * 80]) * 3, limits=limits) == [[b"x" * 80]] * 3


def test_expression_length_claim_refused_before_the_data() -> None:
    decoder = Decoder(limits=Limits(max_expression_bytes=100))
    decoder.feed(b"\x01\x80" + int_to_b128(200) + b"\x82")  # [<200 bytes>], no body
    with pytest.raises(BananaError, match="expression longer"):
        decoder.next_expression()


def test_many_small_items_hit_the_expression_limit() -> None:
    limits = Limits(max_expression_bytes=1000)
    decoder = Decoder(limits=limits)
    decoder.feed(int_to_b128(SIZE_LIMIT) + b"\x80")
    with pytest.raises(BananaError, match="expression longer"):
        for _ in range(600):
            decoder.feed(b"\x00\x80")  # empty lists: 2 bytes each
            assert decoder.next_expression() is None


def test_decoder_keeps_raising_after_an_error() -> None:
    decoder = Decoder()
    decoder.feed(b"\x01\xff")
    with pytest.raises(BananaError, match="type byte") as first:
        decoder.next_expression()
    with pytest.raises(BananaError, match="type byte") as again:
        decoder.next_expression()
    assert again.value is first.value
    with pytest.raises(BananaError, match="type byte"):
        decoder.feed(encode(1))
    with pytest.raises(BananaError):
        list(decoder)


def test_error_message_says_where() -> None:
    decoder = Decoder()
    decoder.feed(encode([1, 2]) + b"\x01\xfe")
    assert decoder.next_expression() == [1, 2]
    with pytest.raises(BananaError, match="at byte 6 of the stream"):
        decoder.next_expression()


def test_decode_refuses_a_truncated_stream() -> None:
    with pytest.raises(BananaError, match="ends inside an expression"):
        decode(encode([1, b"abc"])[:-2])


# -- the encoder's refusals


def test_encoder_refuses_a_string_over_the_size_limit() -> None:
    assert len(encode(b"x" * SIZE_LIMIT)) > SIZE_LIMIT
    with pytest.raises(BananaError, match="size limit"):
        encode(b"x" * (SIZE_LIMIT + 1))


def test_encoder_honours_a_small_size_limit() -> None:
    # A peer decoding with these limits would refuse these, so the encoder must too.
    encoder = Encoder(limits=Limits(size_limit=5))
    assert decode(encoder.encode([b"abcde", [1, 2, 3, 4, 5]]), limits=Limits(size_limit=5))
    with pytest.raises(BananaError, match="size limit of 5"):
        encoder.encode(b"abcdef")
    with pytest.raises(BananaError, match="size limit of 5"):
        encoder.encode([1, 2, 3, 4, 5, 6])


def test_encoder_refuses_a_list_over_the_size_limit() -> None:
    with pytest.raises(BananaError, match="size limit"):
        encode([0] * (SIZE_LIMIT + 1))


@pytest.mark.parametrize("value", [2**448, -(2**448), 2**500, -(2**1000)])
def test_encoder_refuses_huge_ints(value: int) -> None:
    with pytest.raises(BananaError, match="prefix limit"):
        encode(value)
    with pytest.raises(BananaError, match="prefix limit"):
        encode([value])


def test_encoder_int_limits_are_the_strategy_bounds() -> None:
    assert decode(encode(BANANA_INT_LIMIT - 1)) == [BANANA_INT_LIMIT - 1]
    assert decode(encode(-(BANANA_INT_LIMIT - 1))) == [-(BANANA_INT_LIMIT - 1)]


def test_encoder_refuses_deep_nesting_and_cycles() -> None:
    deep: list[Any] = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(BananaError, match="nested deeper"):
        encode(deep)
    assert len(encode(deep[0])) == 200
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(BananaError, match="cycle"):
        encode(cycle)
    with pytest.raises(BananaError, match="nested deeper than 3"):
        encode([[[[]]]], limits=Limits(max_depth=3))


# ---------------------------------------------------------------------------
# Bad input: only ProtocolError, whatever the bytes


def decode_and_unjelly(data: bytes, dialect: bytes, chunk: int = 0) -> None:
    """Decode *data* and unjelly every expression, as a broker would."""
    decoder = Decoder(dialect)
    pieces = [data] if chunk <= 0 else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        decoder.feed(piece)
        while (expression := decoder.next_expression()) is not None:
            unjelly(expression)


def assert_only_protocol_errors(data: bytes, dialect: bytes, chunk: int = 0) -> None:
    try:
        decode_and_unjelly(data, dialect, chunk)
    except ProtocolError as error:
        assert isinstance(error, (BananaError, JellyError))
        assert str(error)
    except Exception as error:  # the bug this test exists to find
        pytest.fail(f"{type(error).__name__} (not a ProtocolError) from {data!r:.300}: {error}")


EDITS = ["flip", "set", "insert", "delete", "truncate"]
mutations = st.lists(
    st.tuples(st.sampled_from(EDITS), st.integers(0, 10**6), st.integers(0, 255)),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, byte in edits:
        index = where % (len(out) + 1)
        if kind == "insert":
            out.insert(index, byte)
        elif kind == "truncate":
            del out[index:]
        elif out:
            index %= len(out)
            if kind == "flip":
                out[index] ^= 1 << (byte % 8)
            elif kind == "set":
                out[index] = byte
            else:
                del out[index]
    return bytes(out)


@given(values(), st.sampled_from(DIALECTS), mutations, st.integers(0, 7))
def test_mutated_jelly_streams_raise_only_protocol_errors(
    value: Any, dialect: bytes, edits: list[tuple[str, int, int]], chunk: int
) -> None:
    data = encode(jelly(value), dialect) + encode(jelly([1, "two"]), dialect)
    assert_only_protocol_errors(mutate(data, edits), dialect, chunk)


@given(sexps(max_leaves=15), st.sampled_from(DIALECTS), mutations)
def test_mutated_banana_streams_raise_only_protocol_errors(
    sexp: Any, dialect: bytes, edits: list[tuple[str, int, int]]
) -> None:
    assert_only_protocol_errors(mutate(encode(sexp, dialect), edits), dialect)


@given(st.binary(max_size=300), st.sampled_from(DIALECTS))
def test_random_bytes_raise_only_protocol_errors(data: bytes, dialect: bytes) -> None:
    assert_only_protocol_errors(data, dialect)


@given(
    st.lists(
        st.sampled_from([0x00, 0x01, 0x02, 0x05, 0x7F, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88]),
        max_size=200,
    ),
    st.sampled_from(DIALECTS),
)
def test_type_byte_soup_raises_only_protocol_errors(data: list[int], dialect: bytes) -> None:
    # Random bytes rarely form items; these mostly do.
    assert_only_protocol_errors(bytes(data), dialect)


def test_float_payload_survives_chunking() -> None:
    value = struct.unpack(">d", bytes.fromhex("7ff0000000000001"))[0]  # a signalling NaN pattern
    encoded = encode([value, -0.0])
    decoder = Decoder()
    for index in range(len(encoded)):
        decoder.feed(encoded[index : index + 1])
    [[first, second]] = drain(decoder)  # type: ignore[misc]
    assert isinstance(first, float)
    assert isinstance(second, float)
    assert math.isnan(first)
    assert float_bits(second) == float_bits(-0.0)
