"""Atheris harness for the Banana decoder (:mod:`pbcore.banana`).

Run it with ``python fuzz/fuzz_banana.py fuzz/corpus -max_total_time=60``
(see fuzz/README.md). The bounded CI fuzz in ``fuzz/test_fuzz_bounded.py``
imports this module and calls :func:`test_one_input` directly; importing it
does not need atheris.

Each input is decoded as a Banana stream in both dialects, with the default
limits and with tight ones, and checked:

* feeding it whole, a byte at a time, or in chunks chosen from the input's
  checksum gives the same expressions and the same error, message included;
* after an error, the decoder keeps raising that error;
* every decoded expression encodes again (same dialect and limits) and decodes
  back to itself.

A :class:`~pbcore.errors.ProtocolError` is the expected outcome for bad input
and passes silently; any other exception, or a failed check, is a crash.
"""

from __future__ import annotations

import contextlib
import random
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Final


def _instrumentation() -> contextlib.AbstractContextManager[object]:
    """Atheris's import hook when run as the fuzzer, so pbcore is instrumented as it loads."""
    if __name__ == "__main__":
        import atheris  # noqa: PLC0415 (only the fuzzer needs atheris; CI does not install it)

        return atheris.instrument_imports(include=["pbcore"])  # type: ignore[no-any-return]
    return contextlib.nullcontext()


from fuzz_cost import within_budget  # noqa: E402 (not instrumented: it is not pbcore)

with _instrumentation():
    from pbcore.banana import DIALECTS, Decoder, Encoder, Limits, Sexp
    from pbcore.errors import BananaError, ProtocolError

#: pbcore bugs that the checks step around, so that fuzzing can go past them
#: until they are fixed. Each has a strict-xfail reproducer in
#: test_fuzz_bounded.py that runs without the allowance: when that test starts
#: to pass (and so fails as XPASS), delete the entry here and the xfail mark.
KNOWN_ISSUES: Final[frozenset[str]] = frozenset()

#: The limits Twisted uses, and small ones so that fuzzing reaches every limit check.
LIMITS: Final = (
    Limits(),
    Limits(prefix_limit=6, size_limit=40, max_depth=5, max_expression_bytes=200),
)

#: What decoding a stream gives: the expressions (as their canonical bytes, so
#: that NaNs compare equal) and the error message, if any.
Outcome = tuple[list[bytes], str | None]


def _chunkings(data: bytes) -> Iterator[Sequence[int]]:
    """The chunk sizes to feed *data* in: whole, byte by byte (if short), and pseudo-random."""
    yield [len(data)]
    if len(data) <= 512:  # longer inputs would cost more than they find
        yield [1] * len(data)
    rng = random.Random(zlib.crc32(data))
    sizes: list[int] = []
    left = len(data)
    while left > 0:
        size = min(left, rng.choice((1, 2, 3, 5, 8, 13, 64)))
        sizes.append(size)
        left -= size
    yield sizes


def _canonical(expression: Sexp, encoder: Encoder) -> bytes:
    """The bytes of *expression*; a decoded expression must always encode."""
    try:
        return encoder.encode(expression)
    except BananaError as error:
        raise AssertionError(f"a decoded expression does not encode again: {error}") from error


def _decode(data: bytes, sizes: Sequence[int], dialect: bytes, limits: Limits, encoder: Encoder) -> Outcome:
    decoder = Decoder(dialect, limits)
    expressions: list[bytes] = []
    position = 0
    try:
        for size in sizes:
            decoder.feed(data[position : position + size])
            position += size
            expressions.extend(_canonical(expression, encoder) for expression in decoder)
    except BananaError as error:
        # A failed decoder stays failed, with the same error.
        retries: list[Callable[[], object]] = [decoder.next_expression, lambda: decoder.feed(b"x")]
        for again in retries:
            try:
                again()
            except BananaError as repeated:
                assert str(repeated) == str(error), (repeated, error)
            else:
                raise AssertionError("a decoder that failed accepted more input") from None
        return expressions, str(error)
    if not decoder.at_boundary:
        return expressions, "incomplete"
    assert decoder.offset == len(data), (decoder.offset, len(data))
    return expressions, None


def check(data: bytes, dialect: bytes, limits: Limits) -> None:
    """Check one stream in one dialect with one set of limits (see the module docstring)."""
    encoder = Encoder(dialect, limits)
    outcomes = [_decode(data, sizes, dialect, limits, encoder) for sizes in _chunkings(data)]
    for outcome in outcomes[1:]:
        assert outcome == outcomes[0], (outcome, outcomes[0])
    for blob in outcomes[0][0]:
        decoder = Decoder(dialect, limits)
        decoder.feed(blob)
        try:
            again = decoder.next_expression()
        except BananaError as error:
            raise AssertionError(f"an encoded expression does not decode: {error}") from error
        assert again is not None and decoder.at_boundary, blob.hex()
        assert _canonical(again, encoder) == blob, blob.hex()


def test_one_input(data: bytes) -> None:
    """The fuzz target: decode *data* every way and check the results agree, at a linear cost."""
    within_budget(_decode_every_way, data)


def _decode_every_way(data: bytes) -> None:
    try:
        for dialect in DIALECTS:
            for limits in LIMITS:
                check(data, dialect, limits)
    except ProtocolError:
        pass


def main() -> None:
    """Run atheris on :func:`test_one_input` (arguments are libFuzzer's)."""
    import atheris  # noqa: PLC0415 (only the fuzzer needs atheris; CI does not install it)

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
