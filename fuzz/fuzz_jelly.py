"""Atheris harness for Jelly (:mod:`pbcore.jelly`) on top of Banana.

Run it with ``python fuzz/fuzz_jelly.py fuzz/corpus -max_total_time=60``
(see fuzz/README.md). The bounded CI fuzz in ``fuzz/test_fuzz_bounded.py``
imports this module and calls :func:`test_one_input` directly; importing it
does not need atheris.

Each input is decoded as a Banana stream (dialect ``pb``, so the jelly type
names cost one byte each) and every expression is unjellied, with three copy
tags known: a registered :class:`~pbcore.jelly.Unjellyable`, a class built by a
registered factory and a plain class allowed by
:meth:`~pbcore.jelly.SecurityOptions.allowInstancesOf`. Whatever unjellies
must travel back: it is jellied, encoded, decoded and unjellied again, and a
second round gives the same bytes as the first.

A :class:`~pbcore.errors.ProtocolError` while decoding or unjellying the input
is the expected outcome for bad input and passes silently; so does a
:class:`~pbcore.errors.BananaError` while sending a value back (a value can be
deeper on the way out than on the way in: CPython shares the empty tuple, so
jelly adds references the input did not have). Anything else is a crash.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Final


def _instrumentation() -> contextlib.AbstractContextManager[object]:
    """Atheris's import hook when run as the fuzzer, so pbcore is instrumented as it loads."""
    if __name__ == "__main__":
        import atheris  # noqa: PLC0415 (only the fuzzer needs atheris; CI does not install it)

        return atheris.instrument_imports(include=["pbcore"])  # type: ignore[no-any-return]
    return contextlib.nullcontext()


from fuzz_cost import within_budget  # noqa: E402 (not instrumented: it is not pbcore)

with _instrumentation():
    from pbcore.banana import Decoder, Sexp, decode, encode
    from pbcore.errors import BananaError, NotJellyable, ProtocolError
    from pbcore.flavors import RemoteCopy
    from pbcore.jelly import (
        Jellier,
        Jellyable,
        SecurityOptions,
        Unjellyable,
        jelly,
        setUnjellyableFactoryForClass,
        setUnjellyableForClass,
        unjelly,
    )

#: pbcore bugs that the checks step around, so that fuzzing can go past them
#: until they are fixed. Each has a strict-xfail reproducer in
#: test_fuzz_bounded.py that runs without the allowance: when that test starts
#: to pass (and so fails as XPASS), delete the entry here and the xfail mark.
KNOWN_ISSUES: Final[frozenset[str]] = frozenset()

# The classes say they live in `pbcore_fuzz`, so their copy tags are the same
# whether this file runs as __main__ (atheris) or is imported (pytest).


class Thing(Jellyable, Unjellyable):
    """A registered copy tag: travels as ``[b"pbcore_fuzz.Thing", state]``."""

    __module__ = "pbcore_fuzz"


class Made(Jellyable):
    """Built from its state by a registered factory."""

    __module__ = "pbcore_fuzz"

    def __init__(self, state: Any) -> None:
        self.state = state

    def getStateFor(self, jellier: Jellier) -> Any:
        """Send the state the factory was given."""
        return self.state


class Plain:
    """Neither Jellyable nor registered: allowed by the security options only."""

    __module__ = "pbcore_fuzz"


setUnjellyableForClass(Thing, Thing)
setUnjellyableFactoryForClass(Made, Made)

#: The security options of both directions: the basic types and Plain.
TASTER: Final = SecurityOptions()
TASTER.allowInstancesOf(Plain)


def _has_form(sexp: Sexp, head: bytes) -> bool:
    """Whether some list in *sexp* starts with *head*."""
    pending = [sexp]
    while pending:
        item = pending.pop()
        if isinstance(item, list) and item:
            if item[0] == head:
                return True
            pending.extend(item)
    return False


def _sorted_sets(sexp: Sexp) -> Sexp:
    """*sexp* with the items of every set and frozenset form in a canonical order."""
    if not isinstance(sexp, list):
        return sexp
    items = [_sorted_sets(item) for item in sexp]
    if items and items[0] in (b"set", b"frozenset"):
        items[1:] = sorted(items[1:], key=encode)
    return items


def _comparable(sexp: Sexp) -> bytes | None:
    """Bytes that two jellyings of equal values share, or None if there are none.

    A set's iteration order depends on its insertion history, so the same set
    can jelly its items in another order after a round trip: sort them. When
    references are involved too, their numbering follows that order: give up.
    """
    if not (_has_form(sexp, b"set") or _has_form(sexp, b"frozenset")):
        return encode(sexp)
    if _has_form(sexp, b"reference"):
        return None
    return encode(_sorted_sets(sexp))


def _send_back(value: Any) -> bytes | None:
    """The bytes that carry *value*, or None if it cannot travel back.

    That is: over a size or depth limit, or holding a received copy (a
    RemoteCopy, such as a CopiedFailure) that has no form to be sent in.
    """
    try:
        return encode(jelly(value, TASTER))
    except BananaError:
        return None
    except NotJellyable:
        if not _holds_remote_copy(value):
            raise
        return None


def _holds_remote_copy(value: Any) -> bool:
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, RemoteCopy):
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return False


def check(expression: Sexp) -> None:
    """Unjelly one expression; if it unjellies, check that the value travels back."""
    try:
        value = unjelly(expression, TASTER)
    except ProtocolError:
        return
    first = _send_back(value)
    if first is None:
        return
    decoder = Decoder()
    decoder.feed(first)
    try:
        again = decoder.next_expression()
        assert again is not None and decoder.at_boundary, first.hex()
        copy = unjelly(again, TASTER)
    except ProtocolError as error:
        raise AssertionError(f"a jellied value does not unjelly: {error} (bytes {first.hex()})") from error
    second = _send_back(copy)
    assert second is not None, first.hex()
    if second != first:
        # Allowed only if the two differ in the order of set items.
        ours, theirs = _comparable(again), _comparable(decode(second)[0])
        assert ours is None or ours == theirs, (first.hex(), second.hex())


def test_one_input(data: bytes) -> None:
    """The fuzz target: unjelly every expression *data* holds, and send each value back, at a linear cost."""
    within_budget(_unjelly_all, data)


def _unjelly_all(data: bytes) -> None:
    decoder = Decoder()
    try:
        decoder.feed(data)
        for expression in decoder:
            check(expression)
    except ProtocolError:
        pass


def main() -> None:
    """Run atheris on :func:`test_one_input` (arguments are libFuzzer's)."""
    import atheris  # noqa: PLC0415 (only the fuzzer needs atheris; CI does not install it)

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
