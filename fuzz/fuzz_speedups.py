"""Atheris harness: the compiled Banana codec (pbcore/_speedups.c) against the pure one.

Run it with ``python fuzz/fuzz_speedups.py fuzz/corpus -max_total_time=60``
(see fuzz/README.md). Importing it does not need atheris: the bounded CI run
in ``fuzz/test_fuzz_speedups.py`` calls :func:`test_one_input` directly, and
``python fuzz/fuzz_speedups.py FILE...`` without atheris installed replays
files (crash inputs, corpus files) through it.

Each input is decoded, in both dialects, with Twisted's limits and with tight
ones, fed whole, a byte at a time and in chunks chosen from its checksum, by
``PyDecoder`` and by the compiled ``Decoder``, switching dialect after some
expressions; both must give the same expressions (same types, float bits and
shared vocabulary words), the same error message, and the same ``offset``,
``buffered``, ``held`` and ``at_boundary`` after every step. Every expression
decoded is then encoded by ``PyEncoder`` and the compiled ``Encoder`` with each
set of limits: the same bytes or the same error. Each expression, and each of
its first items (a PB message's values), is also read by jelly's plain-value
reader, compiled and pure: the same value, or both leave it to the unjellier.
Any difference is a crash.

Coverage feedback comes from the pure code (atheris instruments Python, not
the extension); the compiled code is checked against it on every input.
"""

from __future__ import annotations

import contextlib
import random
import struct
import sys
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Final


def _instrumentation() -> contextlib.AbstractContextManager[object]:
    """Atheris's import hook when run as the fuzzer, so pbcore is instrumented as it loads."""
    if __name__ == "__main__":
        try:
            import atheris  # noqa: PLC0415 (only the fuzzer needs atheris; CI does not install it)
        except ImportError:  # replaying files without atheris
            return contextlib.nullcontext()
        return atheris.instrument_imports(include=["pbcore"])  # type: ignore[no-any-return]
    return contextlib.nullcontext()


from fuzz_cost import within_budget  # noqa: E402 (not instrumented: it is not pbcore)

with _instrumentation():
    from pbcore import banana, jelly
    from pbcore.banana import DIALECTS, Limits, PyDecoder, PyEncoder
    from pbcore.errors import BananaError

_speedups = banana._load_speedups()
#: Whether there is a compiled codec to compare (without one every input passes).
BUILT: Final = _speedups is not None

LIMITS: Final = (
    Limits(),
    Limits(prefix_limit=6, size_limit=40, max_depth=5, max_expression_bytes=200, max_decoded_bytes=2000),
    Limits(prefix_limit=2, size_limit=3, max_depth=2, max_expression_bytes=12, max_decoded_bytes=150),
)
_WORD_IDS: Final = frozenset(id(word) for word in banana._WORDS.values())


def _canonical(value: Any) -> Any:
    kind = type(value)
    if kind is list:
        return [_canonical(item) for item in value]
    if kind is bytes:
        return ("bytes", value, id(value) in _WORD_IDS)
    if kind is int:
        return ("int", value)
    if kind is float:
        return ("float", struct.pack(">d", value))
    raise AssertionError(f"a decoder gave a {kind.__name__}")


def _chunkings(data: bytes) -> Iterator[Sequence[int]]:
    yield [len(data)]
    if len(data) <= 512:
        yield [1] * len(data)
    rng = random.Random(zlib.crc32(data))
    sizes: list[int] = []
    left = len(data)
    while left > 0:
        size = min(left, rng.choice((0, 1, 2, 3, 5, 8, 13, 64)))
        sizes.append(size)
        left -= size
    yield sizes


def _state(decoder: Any) -> tuple[int, int, int, bool]:
    return decoder.offset, decoder.buffered, decoder.held, decoder.at_boundary


def _trace(cls: Any, data: bytes, sizes: Sequence[int], dialect: bytes, limits: Limits) -> tuple[list[Any], list[Any]]:
    """What one decoder does with *data*: every step, and the expressions it gave."""
    decoder = cls(dialect, limits)
    steps: list[Any] = [_state(decoder)]
    expressions: list[Any] = []
    position = 0
    try:
        for size in sizes:
            decoder.feed(data[position : position + size])
            position += size
            steps.append(_state(decoder))
            while (expression := decoder.next_expression()) is not None:
                expressions.append(expression)
                steps.append((_canonical(expression), _state(decoder)))
                if zlib.crc32(bytes(len(expressions))) % 3 == 0:  # switch now and then, the same way
                    decoder.dialect = DIALECTS[len(expressions) % 2]
    except BananaError as error:
        steps.append((type(error).__name__, str(error), _state(decoder)))
        for again in (decoder.next_expression, lambda: decoder.feed(b"\x81")):
            try:
                again()
            except BananaError as repeated:
                steps.append(str(repeated))
            else:
                steps.append("accepted more input after an error")
        steps.append(_state(decoder))
    return steps, expressions


def _encoded(cls: Any, expression: Any, dialect: bytes, limits: Limits) -> Any:
    try:
        return cls(dialect, limits).encode(expression)
    except BananaError as error:
        return str(error)


def _compare_flat(expression: Any, limits: Limits) -> None:
    # jelly's plain-value reader, compiled and pure, on whatever the stream decoded to.
    assert _speedups is not None
    allowed, levels = jelly.globalSecurity.allowedTypes, min(limits.max_depth, jelly._FLAT_LEVELS)
    if type(expression) is not list:
        return
    for sexp in [expression, *expression[:8]]:  # a PB message's values are its items
        if type(sexp) is not list:
            continue
        pure = jelly._flat(sexp, allowed, limits, levels)
        compiled = _speedups.flat_value(sexp, allowed, limits.max_hash_collisions, levels, jelly.NOT_FLAT)
        assert (compiled is jelly.NOT_FLAT) == (pure is jelly.NOT_FLAT), (sexp, compiled, pure)
        if pure is not jelly.NOT_FLAT:
            assert type(compiled) is type(pure) and repr(compiled) == repr(pure), (sexp, compiled, pure)


def check(data: bytes) -> None:
    """Compare the two codecs on *data* (see the module docstring)."""
    assert _speedups is not None
    for dialect in DIALECTS:
        for limits in LIMITS:
            for sizes in _chunkings(data):
                pure, expressions = _trace(PyDecoder, data, sizes, dialect, limits)
                compiled, _ = _trace(_speedups.Decoder, data, sizes, dialect, limits)
                assert compiled == pure, (dialect, limits, sizes, compiled, pure)
            for expression in expressions[:20]:
                _compare_flat(expression, limits)
                for encoding_limits in LIMITS:
                    for encoding_dialect in DIALECTS:
                        mine = _encoded(_speedups.Encoder, expression, encoding_dialect, encoding_limits)
                        theirs = _encoded(PyEncoder, expression, encoding_dialect, encoding_limits)
                        assert mine == theirs, (expression, mine, theirs)


def test_one_input(data: bytes) -> None:
    """The fuzz target: both codecs, every way, must agree (at a linear cost)."""
    if BUILT:
        within_budget(check, data)


def main() -> None:
    """Run atheris on :func:`test_one_input` (arguments are libFuzzer's); without atheris, replay files."""
    if not BUILT:
        sys.exit("fuzz_speedups: pbcore._speedups is not built (pip install -e . with a C compiler)")
    try:
        import atheris  # noqa: PLC0415 (only the fuzzer needs atheris; CI does not install it)
    except ImportError:
        for name in sys.argv[1:]:
            with open(name, "rb") as file:
                test_one_input(file.read())
            print(f"fuzz_speedups: {name}: the codecs agree")
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
