"""Banana: the byte encoding of s-expressions that PB runs on.

An s-expression is a list (of s-expressions), an int, a float or a byte
string. Each item on the wire is a base-128 little-endian *prefix* (the
length, or the value, 7 bits a byte, high bit clear) followed by one *type
byte* with the high bit set::

    0x80 list       prefix = number of items, the items follow
    0x81 int        prefix = value            (0 <= v < 2**31)
    0x82 bytes      prefix = length, the bytes follow
    0x83 negative   prefix = -value           (-2**31 <= v < 0)
    0x84 float      no prefix; 8 bytes of big-endian IEEE double follow
    0x85 long int   prefix = value            (v >= 2**31)
    0x86 long neg   prefix = -value           (v < -2**31)
    0x87 vocabulary prefix = index into VOCABULARY (``pb`` dialect only)

The :class:`Decoder` is incremental and its cost is linear in the input
whatever the chunking: it keeps its place in the stream rather than
re-scanning, so a byte-at-a-time feed costs the same per byte as one big feed.
Every limit in :class:`Limits` is checked against the *claimed* size before
anything is read into memory for it.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import attrs

from .errors import BananaError

__all__ = [
    "DEFAULT_LIMITS",
    "ACCELERATED",
    "DIALECTS",
    "VOCABULARY",
    "Decoder",
    "Encoder",
    "Limits",
    "PyDecoder",
    "PyEncoder",
    "Sexp",
    "b128_to_int",
    "decode",
    "encode",
    "int_to_b128",
]

#: An s-expression as Banana carries it. Tuples are accepted when encoding and
#: sent as lists; decoding always gives lists.
Sexp: TypeAlias = "list[Sexp] | tuple[Sexp, ...] | int | float | bytes"

LIST: Final = 0x80
INT: Final = 0x81
STRING: Final = 0x82
NEG: Final = 0x83
FLOAT: Final = 0x84
LONGINT: Final = 0x85
LONGNEG: Final = 0x86
VOCAB: Final = 0x87

#: The dialects a server offers, in order of preference.
DIALECTS: Final = (b"pb", b"none")

#: The ``pb`` dialect's abbreviations: these byte strings travel as one index.
VOCABULARY: Final[dict[bytes, int]] = {
    word: index
    for index, word in enumerate(
        [
            b"None",
            b"class",
            b"dereference",
            b"reference",
            b"dictionary",
            b"function",
            b"instance",
            b"list",
            b"module",
            b"persistent",
            b"tuple",
            b"unpersistable",
            b"copy",
            b"cache",
            b"cached",
            b"remote",
            b"local",
            b"lcache",
            b"version",
            b"login",
            b"password",
            b"challenge",
            b"logged_in",
            b"not_logged_in",
            b"cachemessage",
            b"message",
            b"answer",
            b"error",
            b"decref",
            b"decache",
            b"uncache",
        ],
        start=1,
    )
}
_WORDS: Final[dict[int, bytes]] = {index: word for word, index in VOCABULARY.items()}

# The encoder, jelly and unjelly recurse (up to two frames a level); this keeps
# them well inside Python's default recursion limit of 1000, with room for callers.
_MAX_DEPTH_CEILING: Final = 250


def _positive(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, not {value}")


def _depth(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= _MAX_DEPTH_CEILING:
        raise ValueError(f"max_depth must be between 1 and {_MAX_DEPTH_CEILING}, not {value}")


@attrs.frozen
class Limits:
    """What one connection will accept from its peer (its decoder, and its call dispatcher).

    ``prefix_limit`` and ``size_limit`` are Twisted's (64 bytes of prefix, so
    ints below 2**448 in magnitude; 640 KiB for one list or byte string).
    ``max_depth`` and ``max_expression_bytes`` are pbcore's own: Twisted has no
    bound on nesting or on a whole expression, so a peer could exhaust the
    stack or the memory. ``max_decoded_bytes`` bounds what an expression's
    objects take once decoded (PB messages decode to 7-13 times their size on
    the wire, a stream of tiny lists to 70 times), counted as an upper bound
    as each list is complete. With the defaults one connection's
    decoder holds at most about 115 MB (docs/security.md has the
    measurements).
    """

    prefix_limit: int = attrs.field(default=64, validator=_positive)
    size_limit: int = attrs.field(default=640 * 1024, validator=_positive)
    max_depth: int = attrs.field(default=100, validator=_depth)
    max_expression_bytes: int = attrs.field(default=8 * 1024 * 1024, validator=_positive)
    #: Async calls one connection may have running at once; one more is refused with an
    #: error answer (:class:`pbcore.serving.TooManyCalls`), never queued (see pbcore.serving).
    #: What the objects decoded from one expression may take, as the decoder counts them
    #: when each list is complete (:data:`LIST_COST`, :data:`ITEM_COST`).
    max_decoded_bytes: int = attrs.field(default=160 * 1024 * 1024, validator=_positive)
    max_running_calls: int = attrs.field(default=10_000, validator=_positive)
    #: Calls received and not started yet (they wait while the connection's output is over
    #: ``output_high_water``, or for an earlier async call's first wait): at this many the
    #: adapter stops reading from the connection until they have started.
    max_queued_calls: int = attrs.field(default=1000, validator=_positive)
    #: Bytes answered and not yet written to the peer past which no further call starts (a
    #: peer that never reads costs this, not every answer), and the adapter stops reading.
    output_high_water: int = attrs.field(default=256 * 1024, validator=_positive)
    #: The tuple and frozenset keys of one message (dictionary keys, set members), counted
    #: expanded, may hold at most this many items, and at most a small multiple of the items
    #: the message has (see pbcore.keys): shared references make hashing exponential otherwise.
    max_key_items: int = attrs.field(default=1_000_000, validator=_positive)
    #: Keys of one dictionary or set that may share a hash (int, float and tuple hashes are
    #: not salted, so a peer could make every insertion walk all the others).
    max_hash_collisions: int = attrs.field(default=64, validator=_positive)
    #: Caches (RemoteCache) the peer may have this side hold at once on one connection; one
    #: more is refused (a JellyError). Twisted bounds only the references it gives out.
    max_caches: int = attrs.field(default=10_000, validator=_positive)


DEFAULT_LIMITS: Final = Limits()

#: What decoding costs beyond the bytes on the wire, for ``Limits.max_decoded_bytes``, in
#: bytes of CPython objects (64-bit), counted when a list is complete: the list itself,
#: and for each item a slot and the largest object an item other than a list can be (a
#: short byte string; an int or a float is smaller, a vocabulary word shared). Counting
#: per list, not per item, keeps the decoder's loop as fast as it was; the sum is an upper
#: bound of what a decoded expression holds: about 1.3 times it for PB messages, up to
#: 2.5 times for streams of tiny lists (tests/test_cost.py). The items of the lists still
#: open (at most ``max_depth`` of them) count in :attr:`Decoder.held`, not in the limit:
#: their atoms take at most about 14 times their bytes.
LIST_COST: Final = 64
ITEM_COST: Final = 48


def int_to_b128(value: int) -> bytes:
    """Encode a non-negative int as a base-128 little-endian prefix."""
    if value < 0:
        raise ValueError("a Banana prefix is never negative")
    if value < 0x200000:  # up to three digits (request ids, mostly): no loop
        if value < 0x80:
            return bytes((value,))
        if value < 0x4000:
            return bytes((value & 0x7F, value >> 7))
        return bytes((value & 0x7F, (value >> 7) & 0x7F, value >> 14))
    out = bytearray()
    while True:
        out.append(value & 0x7F)
        value >>= 7
        if not value:
            return bytes(out)


def b128_to_int(prefix: bytes | bytearray | memoryview) -> int:
    """Decode a base-128 little-endian prefix (high bits are expected clear)."""
    value = 0
    for shift, byte in enumerate(prefix):
        value |= byte << (7 * shift)
    return value


# Headers for small numbers, computed once: most items on the wire use them.
_TABLE_SIZE: Final = 4096
_INT_HEAD: Final = [int_to_b128(i) + b"\x81" for i in range(_TABLE_SIZE)]
_NEG_HEAD: Final = [int_to_b128(i) + b"\x83" for i in range(_TABLE_SIZE)]
_STR_HEAD: Final = [int_to_b128(i) + b"\x82" for i in range(_TABLE_SIZE)]
_LIST_HEAD: Final = [int_to_b128(i) + b"\x80" for i in range(_TABLE_SIZE)]
_VOCAB_ITEMS: Final = {word: int_to_b128(i) + b"\x87" for word, i in VOCABULARY.items()}
_POSITIVE: Final = frozenset({INT, LONGINT})
_NEGATIVE: Final = frozenset({NEG, LONGNEG})
_pack_double = struct.Struct(">d").pack
_unpack_double = struct.Struct(">d").unpack_from


def _check_dialect(dialect: bytes) -> bytes:
    if dialect not in DIALECTS:
        raise ValueError(f"unknown Banana dialect {dialect!r}; expected one of {DIALECTS}")
    return dialect


class PyEncoder:
    """Encodes s-expressions for one dialect and one set of limits (the pure-Python reference).

    Refuses (with :class:`BananaError`) what a Twisted peer would refuse to
    send: lists and byte strings over ``size_limit``, ints of more than
    ``prefix_limit`` base-128 digits. Also refuses nesting deeper than
    ``max_depth``, which is how a cyclic list is caught.
    """

    def __init__(self, dialect: bytes = b"pb", limits: Limits = DEFAULT_LIMITS) -> None:
        self.dialect = _check_dialect(dialect)
        self.limits = limits
        self._encode_into = _build_encoder(_VOCAB_ITEMS if dialect == b"pb" else {}, limits)

    def encode(self, sexp: Sexp) -> bytes:
        """Return the bytes for one s-expression."""
        out = bytearray()
        self._encode_into(sexp, out, 0)
        return bytes(out)

    def encode_into(self, sexp: Sexp, out: bytearray, depth: int = 0) -> None:
        """Append the bytes for one s-expression, which sits at nesting *depth*, to *out*."""
        self._encode_into(sexp, out, depth)


def _build_encoder(vocab: dict[bytes, bytes], limits: Limits) -> Callable[[Any, bytearray, int], None]:
    size_limit = limits.size_limit
    max_depth = limits.max_depth
    long_limit = 2 ** (7 * limits.prefix_limit)
    int_head, neg_head, str_head, list_head = _INT_HEAD, _NEG_HEAD, _STR_HEAD, _LIST_HEAD
    table_size = _TABLE_SIZE  # ints below this have precomputed headers
    short = min(_TABLE_SIZE, size_limit + 1)  # lengths below this need no size check
    pack_double = _pack_double

    def encode_int(value: int, out: bytearray) -> None:
        magnitude = value if value >= 0 else -value
        if magnitude < table_size:
            out += int_head[magnitude] if value >= 0 else neg_head[magnitude]
            return
        if magnitude >= long_limit:
            raise BananaError(f"cannot encode int {value}: over the {limits.prefix_limit}-byte prefix limit")
        out += int_to_b128(magnitude)
        if value >= 0:
            out.append(INT if value < 2**31 else LONGINT)
        else:
            out.append(NEG if magnitude <= 2**31 else LONGNEG)

    def encode_bytes(value: bytes, out: bytearray) -> None:
        n = len(value)
        if n > size_limit:
            raise BananaError(f"cannot encode a byte string of {n} bytes: over the size limit of {size_limit}")
        out += int_to_b128(n)
        out.append(STRING)
        out += value

    def encode(obj: Any, out: bytearray, depth: int) -> None:  # Any: the checks are dynamic
        kind = type(obj)
        if kind is bytes:
            word = vocab.get(obj)
            if word is not None:
                out += word
            elif len(obj) < short:
                out += str_head[len(obj)]
                out += obj
            else:
                encode_bytes(obj, out)
        elif kind is list or kind is tuple:
            n = len(obj)
            if depth >= max_depth:
                raise BananaError(f"cannot encode: lists nested deeper than {max_depth} (or a cycle)")
            if n < short:
                out += list_head[n]
            elif n > size_limit:
                raise BananaError(f"cannot encode a list of {n} items: over the size limit of {size_limit}")
            else:
                out += int_to_b128(n)
                out.append(LIST)
            depth += 1
            for item in obj:
                kind = type(item)
                # The two commonest items are inlined; the rest recurse.
                if kind is int and 0 <= item < table_size:
                    out += int_head[item]
                elif kind is bytes and item not in vocab and len(item) < short:
                    out += str_head[len(item)]
                    out += item
                else:
                    encode(item, out, depth)
        elif kind is int:
            encode_int(obj, out)
        elif kind is float:
            out.append(FLOAT)
            out += pack_double(obj)
        elif isinstance(obj, bool):
            encode_int(int(obj), out)
        else:
            # Subclasses of the four types go the slow way, as their base type.
            for base in (bytes, int, float):
                if isinstance(obj, base):
                    encode(base(obj), out, depth)  # type: ignore[arg-type]
                    return
            if isinstance(obj, (list, tuple)):
                encode(list(obj), out, depth)
                return
            raise BananaError(f"Banana cannot encode {type(obj).__qualname__} objects: {obj!r:.80}")

    return encode


_ENCODERS: dict[tuple[bytes, Limits], PyEncoder] = {}


def encode(sexp: Sexp, dialect: bytes = b"pb", limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Encode one s-expression (shorthand for :meth:`Encoder.encode`)."""
    encoder = _ENCODERS.get((dialect, limits))
    if encoder is None:
        encoder = _ENCODERS[dialect, limits] = Encoder(dialect, limits)
    return encoder.encode(sexp)


class PyDecoder:
    """Turns a byte stream, in any chunking, into complete s-expressions (the pure-Python reference).

    Usage::

        decoder = PyDecoder()
        decoder.feed(data)
        while (expression := decoder.next_expression()) is not None:
            ...

    Expressions are handed out one at a time so that a caller can change
    :attr:`dialect` between two of them (PB's handshake does). After a
    :class:`BananaError` the stream is unusable: every later call raises again.

    *untracked* is for a caller that reads each expression and lets it go, as
    the broker and :func:`pbcore.codec.loads` do: the compiled decoder then
    makes lists that the cycle collector does not track, which takes the
    collector's passes over them off the decoding of a large message (a
    fresh s-expression is a tree of atoms, so it cannot be part of a cycle;
    one that a caller mutates into a cycle would never be collected). The
    pure decoder cannot untrack objects and ignores it.
    """

    def __init__(self, dialect: bytes = b"pb", limits: Limits = DEFAULT_LIMITS, *, untracked: bool = False) -> None:
        self.dialect = _check_dialect(dialect)
        self.limits = limits
        self._buf = b""
        self._pos = 0  # where parsing resumes, within _buf
        self._base = 0  # stream offset of _buf[0]
        # Fed chunks not yet joined to _buf: they are joined only once they can
        # complete the item in progress, so a large string arriving in small
        # pieces is copied once, not once per piece.
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._need = 0  # bytes needed past _pos before parsing can progress
        self._expr_start = 0  # stream offset where the current expression began
        self._cost = 0  # what the objects of the current expression take, as counted (see LIST_COST)
        self._stack: list[tuple[list[Sexp], int]] = []  # open lists and their claimed lengths
        self._failed: BananaError | None = None
        self._fail_at = 0  # the stream offset of the item that failed
        self._header = re.compile(b"[\\x00-\\x7f]{0,%d}[\\x80-\\xff]" % limits.prefix_limit)

    @property
    def offset(self) -> int:
        """How many bytes of the stream have been consumed into items."""
        return self._base + self._pos

    @property
    def buffered(self) -> int:
        """How many bytes have been fed but not yet made into a complete item."""
        return len(self._buf) - self._pos + self._pending_len

    @property
    def held(self) -> int:
        """What the unfinished expression costs so far, as ``max_decoded_bytes`` counts (0 at a boundary)."""
        if not self._stack:
            return self.buffered
        # The lists still open count what they hold so far.
        open_lists = sum(LIST_COST + ITEM_COST * len(items) for items, _ in self._stack)
        return self._base + self._pos - self._expr_start + self._cost + open_lists + self.buffered

    @property
    def at_boundary(self) -> bool:
        """True when no expression is partly received."""
        return not self._stack and self.buffered == 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the peer."""
        if self._failed is not None:
            raise self._failed
        if data:
            chunk = bytes(data)
            self._pending.append(chunk)
            self._pending_len += len(chunk)

    def __iter__(self) -> Iterator[Sexp]:
        """Yield every expression that the bytes fed so far complete."""
        while (expression := self.next_expression()) is not None:
            yield expression

    def next_expression(self) -> Sexp | None:
        """Return the next complete expression, or None if more bytes are needed."""
        if self._failed is not None:
            raise self._failed
        pos = self._pos
        if self._pending:
            available = len(self._buf) - pos + self._pending_len
            if available < self._need:
                return None
            self._base += pos
            self._pending.insert(0, self._buf[pos:])
            self._buf = b"".join(self._pending)
            self._pending.clear()
            self._pending_len = 0
            pos = 0
        elif len(self._buf) - pos < max(self._need, 1):
            return None
        try:
            result, self._pos = self._parse(self._buf, pos)
        except BananaError as error:
            self._failed = error
            # Unusable from now on: let go of what it held (up to max_decoded_bytes). The
            # offset stays where parsing failed, and nothing is buffered.
            self._stack.clear()
            self._buf = b""
            self._base = self._fail_at
            self._pos = 0
            self._pending.clear()
            self._pending_len = 0
            self._need = 0
            raise
        return result

    def _fail(self, pos: int, message: str) -> BananaError:
        self._fail_at = self._base + pos
        return BananaError(f"{message} (at byte {self._fail_at} of the stream)")

    def _over_decoded(self, pos: int) -> BananaError:
        limit = self.limits.max_decoded_bytes
        return self._fail(pos, f"expression over the limit of {limit} bytes decoded (Limits.max_decoded_bytes)")

    def _parse(self, buf: bytes, pos: int) -> tuple[Sexp | None, int]:
        """Parse items from *pos* until an expression completes or the bytes run out.

        Returns the expression (or None) and where parsing stopped. On running
        out it stops at the start of the incomplete item and records in
        ``_need`` how many bytes that item needs, so it is not retried early.
        """
        limits = self.limits
        size_limit = limits.size_limit
        max_depth = limits.max_depth
        max_bytes = limits.max_expression_bytes
        max_decoded = limits.max_decoded_bytes
        list_cost, item_cost = LIST_COST, ITEM_COST  # locals: read for every list
        digits = limits.prefix_limit
        vocabulary = _WORDS if self.dialect == b"pb" else None
        end = len(buf)
        stack = self._stack
        if not stack:
            self._expr_start = self._base + pos
            self._cost = 0
        expr_start = self._expr_start - self._base  # negative if it began in an earlier buffer
        # While the buffer cannot hold an over-long expression, skip the per-item check.
        check_size = end - expr_start > max_bytes
        top, want = stack[-1] if stack else (None, 0)
        self._need = 0
        cost = self._cost  # a local in the loop; stored back however the loop ends
        try:
            while pos < end:
                start = pos
                first = buf[pos]
                if first & 0x80:
                    kind = first
                    num = 0
                    pos += 1
                elif pos + 1 < end and buf[pos + 1] & 0x80:
                    kind = buf[pos + 1]
                    num = first
                    pos += 2
                elif pos + 2 < end and buf[pos + 2] & 0x80 and digits > 1:
                    # Two and three digits without the general way below: request ids grow.
                    kind = buf[pos + 2]
                    num = first | buf[pos + 1] << 7
                    pos += 3
                elif pos + 3 < end and buf[pos + 3] & 0x80 and digits > 2:
                    kind = buf[pos + 3]
                    num = first | buf[pos + 1] << 7 | buf[pos + 2] << 14
                    pos += 4
                else:
                    match = self._header.match(buf, pos)
                    if match is None:
                        if end - pos > limits.prefix_limit:
                            raise self._fail(start, f"prefix longer than the limit of {limits.prefix_limit} bytes")
                        self._need = end - pos + 1
                        return None, start
                    pos = match.end()
                    kind = buf[pos - 1]
                    num = b128_to_int(buf[start : pos - 1])

                item: Sexp
                if kind == STRING:  # the commonest item, so tested first
                    stop = pos + num
                    if stop > end or num > size_limit:
                        if num > size_limit:
                            raise self._fail(
                                start, f"byte string of {num} bytes is over the size limit of {size_limit}"
                            )
                        # Refuse an over-long claim now, rather than after buffering it.
                        if stop - expr_start > max_bytes:
                            raise self._fail(start, f"expression longer than the limit of {max_bytes} bytes")
                        self._need = stop - start
                        return None, start
                    item = buf[pos:stop]
                    pos = stop
                elif kind == LIST:
                    if num > size_limit:
                        raise self._fail(start, f"list of {num} items is over the size limit of {size_limit}")
                    if len(stack) >= max_depth:  # the encoder's rule: no list at depth max_depth
                        raise self._fail(start, f"lists nested deeper than the limit of {max_depth}")
                    if num:
                        top = []
                        want = num
                        stack.append((top, want))
                        continue
                    item = []
                    # A list is 1 or 2 bytes on the wire and 56 or more once decoded: counted (when
                    # complete, with its items' slots), so that a stream of lists cannot take 70
                    # times max_expression_bytes. A claim costs nothing until its items arrive.
                    cost += list_cost
                    if cost > max_decoded:
                        raise self._over_decoded(start)
                elif kind == VOCAB:
                    if vocabulary is None:
                        raise self._fail(start, "vocabulary item outside the pb dialect")
                    word = vocabulary.get(num)
                    if word is None:
                        raise self._fail(start, f"unknown vocabulary index {num}")
                    item = word
                elif kind in _POSITIVE:
                    item = num
                elif kind in _NEGATIVE:
                    item = -num
                elif kind == FLOAT:
                    if pos + 8 > end:
                        self._need = pos + 8 - start
                        return None, start
                    item = _unpack_double(buf, pos)[0]
                    pos += 8
                else:
                    raise self._fail(start, f"unknown type byte 0x{kind:02x}")

                if check_size and pos - expr_start > max_bytes:
                    raise self._fail(start, f"expression longer than the limit of {max_bytes} bytes")
                # Put the item in its list; a list that is now full is itself an item.
                while top is not None:
                    top.append(item)
                    if len(top) < want:
                        break
                    stack.pop()
                    cost += list_cost + item_cost * want
                    if cost > max_decoded:
                        raise self._over_decoded(start)
                    item = top
                    top, want = stack[-1] if stack else (None, 0)
                else:
                    return item, pos
            return None, pos
        finally:
            self._cost = cost


def _load_speedups() -> Any:
    """The compiled codec module, configured, or None if it is not built (or does not load)."""
    try:
        from . import _speedups  # type: ignore[attr-defined]  # noqa: PLC0415 (optional, compiled)
    except ImportError:
        return None
    _speedups._configure(BananaError, _WORDS, _VOCAB_ITEMS, DIALECTS, DEFAULT_LIMITS)
    return _speedups


def _accelerated() -> tuple[type[PyDecoder], type[PyEncoder], bool]:
    """The compiled classes, unless PBCORE_PURE asks for the pure ones or they are not built."""
    if os.environ.get("PBCORE_PURE", "") not in ("", "0"):
        return PyDecoder, PyEncoder, False
    speedups = _load_speedups()
    if speedups is None:
        return PyDecoder, PyEncoder, False
    return speedups.Decoder, speedups.Encoder, True


#: The s-expression codec in use: the compiled one (pbcore/_speedups.c) when it was built
#: and ``PBCORE_PURE`` is unset, empty or "0"; else the pure-Python :class:`PyDecoder` and
#: :class:`PyEncoder`. Both give the same values, bytes and errors (tests/test_speedups.py).
ACCELERATED: bool
if TYPE_CHECKING:  # the compiled classes have the pure ones' API
    Decoder = PyDecoder
    Encoder = PyEncoder
    ACCELERATED = False
else:
    Decoder, Encoder, ACCELERATED = _accelerated()
#: The compiled module when ACCELERATED (its plain-value paths serve pbcore.jelly and pbcore.codec), else None.
_SPEEDUPS: Any = _load_speedups() if ACCELERATED else None


def decode(data: bytes, dialect: bytes = b"pb", limits: Limits = DEFAULT_LIMITS) -> list[Sexp]:
    """Decode every expression in *data*, which must end on an expression boundary."""
    decoder = Decoder(dialect, limits)
    decoder.feed(data)
    expressions = list(decoder)
    if not decoder.at_boundary:
        raise BananaError(f"stream ends inside an expression ({decoder.buffered} bytes left over)")
    return expressions
