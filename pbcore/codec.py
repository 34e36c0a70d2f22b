"""Python values <-> Banana bytes in one step: jelly and banana fused.

``dumps(value)`` gives exactly the bytes of ``banana.encode(jelly.jelly(value))``,
about four times faster, because built-in values are written straight to bytes
instead of being built into an s-expression first. ``loads(data)`` is the
inverse (decode, then unjelly).

How the fused encoder keeps the bytes identical to the two-step path:

* Built-in containers are written in place and their start offset recorded.
  When one is met again, the ``[reference, n`` header is *spliced in* at that
  offset at the end, and ``[dereference, n]`` is written where it was met.
* Anything else (a :class:`~pbcore.jelly.Jellyable`, an allowed instance) goes
  through the ordinary :class:`~pbcore.jelly.Jellier`, which shares the same
  reference tables; its s-expression is encoded only at the end, so a later
  meeting can still turn part of it into a reference in place.
* Reference numbers come from one counter in the order second meetings
  happen, which is the order Twisted numbers them in.
"""

from __future__ import annotations

import datetime
import decimal
import struct
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs

from .banana import (
    _INT_HEAD,
    _LIST_HEAD,
    _STR_HEAD,
    _TABLE_SIZE,
    _VOCAB_ITEMS,
    DEFAULT_LIMITS,
    Decoder,
    Encoder,
    Limits,
    Sexp,
    int_to_b128,
)
from .errors import BananaError, NotJellyable
from .jelly import Handler, Jellier, SecurityOptions, globalSecurity, unjelly

__all__ = ["ValueEncoder", "dumps", "loads"]

_pack_double = struct.Struct(">d").pack
_INT: Final = b"\x81"
_UNICODE: Final = b"\x07\x82unicode"
_UNICODE_HEAD: Final = [b"\x02\x80" + _UNICODE + head for head in _STR_HEAD]


class _FusedJellier(Jellier):
    """One value's serialization: the byte output plus the shared reference tables."""

    def __init__(self, encoder: ValueEncoder, invoker: Any) -> None:
        super().__init__(encoder.taster, invoker, encoder.limits)
        self._banana = encoder._banana
        self._size_limit = encoder.limits.size_limit
        self._short = min(_TABLE_SIZE, self._size_limit + 1)  # lengths below this need no size check
        self._offsets: dict[int, int] = {}  # id -> where a container written here starts
        self._inserts: dict[int, bytes] = {}  # offset -> [reference, n header to splice in
        self._deferred: list[tuple[int, int, Sexp]] = []  # (offset, depth, s-expression)
        self._deepest = 0  # the deepest container written here

    def _seen(self, obj: object) -> list[Any] | None:
        oid = id(obj)
        start = self._offsets.get(oid)
        if start is not None and oid not in self._cooked:
            ref = self._next_ref
            self._next_ref += 1
            self._inserts[start] = _REFERENCE + _int(ref)
            self._cooked[oid] = [b"dereference", ref]
        return super()._seen(obj)

    def run(self, value: Any, depth: int) -> bytes:
        out = bytearray()
        self._write(value, out, depth)
        if not self._inserts and not self._deferred:
            return bytes(out)
        data = self._assemble(out)
        # Each [reference, n, ...] spliced in nests its container one level
        # deeper than when it was written. Forms sit at most two levels below
        # a container, so unless the bound below is close to the limit the
        # result is fine; otherwise check what was actually produced.
        if self._inserts and (self._deferred or self._deepest + 2 + len(self._inserts) >= self._max_depth):
            self._check_depth(data, depth)
        return data

    def _check_depth(self, data: bytes, depth: int) -> None:
        # The value sits *depth* lists down in its message: that much less room for it.
        limits = attrs.evolve(self._banana.limits, max_depth=self._max_depth - depth)
        checker = Decoder(self._banana.dialect, limits)
        checker.feed(data)
        try:
            checker.next_expression()
        except BananaError:
            raise BananaError(
                f"cannot encode: lists nested deeper than {self._max_depth} once shared values are marked as references"
            ) from None

    def _assemble(self, out: bytearray) -> bytes:
        # At one offset, deferred expressions come first (in the order they
        # were met): a container starting there was written after them.
        splices: list[tuple[int, int, int, Any, int]] = [
            (offset, 0, index, sexp, depth) for index, (offset, depth, sexp) in enumerate(self._deferred)
        ]
        splices.extend((offset, 1, 0, header, 0) for offset, header in self._inserts.items())
        splices.sort(key=lambda splice: splice[:3])
        result = bytearray()
        last = 0
        for offset, kind, _index, payload, depth in splices:
            result += out[last:offset]
            last = offset
            if kind:
                result += payload
            else:
                self._banana.encode_into(payload, result, depth)
        result += out[last:]
        return bytes(result)

    def _write(self, value: Any, out: bytearray, depth: int) -> None:
        """Write *value*'s jelly form, which sits at Banana nesting *depth*."""
        kind = type(value)
        if kind is str:
            if depth >= self._max_depth:
                self._too_deep()
            _write_text(value, out, self._short, self._size_limit)
        elif kind is int or kind is bytes or kind is float:
            self._banana.encode_into(value, out, depth)
        elif kind is dict or kind is list or kind is tuple or kind is set or kind is frozenset:
            again = self._seen(value)
            if again is not None:
                self._banana.encode_into(again, out, depth)
                return
            if depth >= self._max_depth:
                self._too_deep()
            self._deepest = max(self._deepest, depth)
            self._offsets[id(value)] = len(out)
            self._alive.append(value)
            size = len(value) + 1
            if size < self._short:
                out += _LIST_HEAD[size]
            else:
                self._check_size(size)
                out += int_to_b128(size) + b"\x80"
            out += _ATOMS[kind]
            depth += 1
            write = self._write
            if kind is dict:
                if value and depth >= self._max_depth:
                    self._too_deep()
                for key, item in value.items():
                    out += b"\x02\x80"
                    write(key, out, depth + 1)
                    write(item, out, depth + 1)
            else:
                for item in value:
                    kind = type(item)
                    # Small ints and short plain strings inline: the commonest items.
                    if kind is int and 0 <= item < _TABLE_SIZE:
                        out += _INT_HEAD[item]
                    else:
                        write(item, out, depth)
        elif value is None:
            if depth >= self._max_depth:
                self._too_deep()
            out += _NONE
        elif kind is bool:
            if depth >= self._max_depth:
                self._too_deep()
            out += _TRUE if value else _FALSE
        elif kind in _UNTRACKED:
            # Dates and decimals: small fixed forms, never shared.
            self._banana.encode_into(Jellier.jelly(self, value), out, depth)
        else:
            # Jellyables and allowed instances build an s-expression, which is
            # encoded at the end so that it can still gain references.
            sexp = Jellier.jelly(self, value)
            if type(sexp) is list:
                self._deferred.append((len(out), depth, sexp))
            else:
                self._banana.encode_into(sexp, out, depth)

    def _too_deep(self) -> None:
        raise BananaError(f"cannot encode: lists nested deeper than {self._max_depth} (or a cycle)")

    def _check_size(self, size: int) -> None:
        if size > self._size_limit:
            raise BananaError(f"cannot encode a list of {size} items: over the size limit of {self._size_limit}")


def _write_text(value: str, out: bytearray, short: int, size_limit: int) -> None:
    """Write a str's ``[unicode, utf-8]`` form."""
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise NotJellyable(f"cannot jelly a str that is not valid Unicode: {error}") from None
    size = len(data)
    word = _VOCAB_ITEMS.get(data)
    if word is not None:  # a string that spells a pb vocabulary word travels as its index
        out += b"\x02\x80" + _UNICODE + word
        return
    if size < short:
        out += _UNICODE_HEAD[size]
    else:
        if size > size_limit:
            raise BananaError(f"cannot encode a byte string of {size} bytes: over the size limit of {size_limit}")
        out += b"\x02\x80" + _UNICODE + int_to_b128(size) + b"\x82"
    out += data


def _int(value: int) -> bytes:
    return _INT_HEAD[value] if value < _TABLE_SIZE else int_to_b128(value) + b"\x81"


_REFERENCE: Final = b"\x03\x80" + _VOCAB_ITEMS[b"reference"]
_NONE: Final = b"\x01\x80" + _VOCAB_ITEMS[b"None"]
_TRUE: Final = b"\x02\x80" + _STR_HEAD[7] + b"boolean" + _STR_HEAD[4] + b"true"
_FALSE: Final = b"\x02\x80" + _STR_HEAD[7] + b"boolean" + _STR_HEAD[5] + b"false"
_ATOMS: Final[dict[type, bytes]] = {
    dict: _VOCAB_ITEMS[b"dictionary"],
    list: _VOCAB_ITEMS[b"list"],
    tuple: _VOCAB_ITEMS[b"tuple"],
    set: _STR_HEAD[3] + b"set",
    frozenset: _STR_HEAD[9] + b"frozenset",
}
#: How deep ValueEncoder._write_flat nests containers (a call's arguments are a tuple).
_FLAT_LEVELS: Final = 3
_UNTRACKED: Final = frozenset({datetime.datetime, datetime.date, datetime.time, datetime.timedelta, decimal.Decimal})


class ValueEncoder:
    """Jellies and encodes values straight to Banana bytes, for one dialect.

    The result is byte for byte ``Encoder(dialect).encode(jelly(value))``.
    Only the ``pb`` dialect abbreviates; in ``none`` every atom is spelled out.
    """

    def __init__(
        self,
        dialect: bytes = b"pb",
        limits: Limits = DEFAULT_LIMITS,
        taster: SecurityOptions = globalSecurity,
    ) -> None:
        self.dialect = dialect
        self.limits = limits
        self.taster = taster
        self._banana = Encoder(dialect, limits)
        self._max_depth = limits.max_depth
        self._size_limit = limits.size_limit
        self._short = min(_TABLE_SIZE, self._size_limit + 1)  # lengths below this need no size check
        self._flat_size = min(_TABLE_SIZE - 1, self._size_limit)  # flat containers below this many items
        self._id_limit = min(2**31, 128**limits.prefix_limit)  # ints below this: an INT header, in the limit
        # The fused tables spell some atoms as vocabulary; outside pb fall
        # back to the two-step path, which is rarely used and still correct.
        self._fused = dialect == b"pb"
        self._words = _VOCAB_ITEMS if self._fused else {}
        # The compiled encoder writes a message of plain values itself: the same bytes, or None.
        self._compiled_message = getattr(self._banana, "encode_message", None) if self._fused else None
        self._compiled_plain = getattr(self._banana, "encode_plain", None) if self._fused else None

    def encode(self, value: Any, invoker: Any = None) -> bytes:
        """The bytes of one value as a complete expression."""
        return self._encode(value, invoker, 0)

    def encode_list(self, head: Sequence[Sexp], values: Sequence[Any], invoker: Any = None) -> bytes:
        """The bytes of ``[*head, jelly(v1), jelly(v2), ...]``.

        *head* items are plain s-expressions (a PB message's command, ids and
        names); each value is jellied on its own, with its own reference
        numbers, as a PB peer serializes each argument list.
        """
        data = self.encode_plain_list(head, values)
        if data is not None:
            return data
        out = self._write_head(head, len(values))
        for value in values:
            if not self._fused:
                out += self._encode(value, invoker, 1)
            elif not self._write_flat(value, out, 1):
                out += _FusedJellier(self, invoker).run(value, 1)
        return bytes(out)

    def encode_plain_list(self, head: Sequence[Sexp], values: Sequence[Any]) -> bytes | None:
        """What :meth:`encode_list` gives, when every value is plain (see :meth:`_write_flat`); else None.

        A plain value holds nothing a jellier counts or asks about (no
        references, no perspective), so a broker sends such a message
        without its bookkeeping for them.
        """
        if self._compiled_message is not None:  # the same, in one call (pbcore/_speedups.c)
            data: bytes | None = self._compiled_message(
                head if type(head) is list else list(head), values if type(values) is list else list(values)
            )
            return data
        if not self._fused:
            return None
        out = self._write_head(head, len(values))
        for value in values:
            if not self._write_flat(value, out, 1):
                return None
        return bytes(out)

    def _write_head(self, head: Sequence[Sexp], values: int) -> bytearray:
        # The list's header and the head's atoms (a command, a vocabulary word; ids; a name).
        size = len(head) + values
        out = bytearray(_LIST_HEAD[size] if size < _TABLE_SIZE else int_to_b128(size) + b"\x80")
        encode_into, words, short, id_limit = self._banana.encode_into, self._words, self._short, self._id_limit
        for item in head:
            if type(item) is int:
                if 0 <= item < _TABLE_SIZE:
                    out += _INT_HEAD[item]
                    continue
                if 0 <= item < id_limit:  # a request id
                    out += int_to_b128(item)
                    out += _INT
                    continue
            elif type(item) is bytes:
                if item in words:
                    out += words[item]
                    continue
                if len(item) < short:  # a name
                    out += _STR_HEAD[len(item)]
                    out += item
                    continue
            encode_into(item, out, 1)
        return out

    def _encode(self, value: Any, invoker: Any, depth: int) -> bytes:
        if not self._fused:
            out = bytearray()
            self._banana.encode_into(Jellier(self.taster, invoker, self.limits).jelly(value), out, depth)
            return bytes(out)
        if self._compiled_plain is not None:
            data = self._compiled_plain(value, depth)
            if data is not None:
                return bytes(data)
        out = bytearray()
        if self._write_flat(value, out, depth):
            return bytes(out)
        return _FusedJellier(self, invoker).run(value, depth)

    def _write_flat(self, value: Any, out: bytearray, depth: int) -> bool:
        """Write a plain value as the fused jellier would; else write nothing and return False.

        Plain: atoms, and containers of them nested at most three deep, none
        met twice. Most call arguments and answers are plain; they need none
        of a jellier's tables, which this saves making for each value.
        Anything near a limit goes the general way, which says what is wrong.
        """
        mark = len(out)
        if self._write_items((value,), out, depth, _FLAT_LEVELS, set()):
            return True
        del out[mark:]
        return False

    def _write_items(self, items: Iterable[Any], out: bytearray, depth: int, levels: int, seen: set[int]) -> bool:
        # The commonest atoms inline; the rest as _FusedJellier._write writes them.
        vocabulary, short, encode_into = _VOCAB_ITEMS, self._short, self._banana.encode_into
        for item in items:
            kind = type(item)
            if kind is int and 0 <= item < _TABLE_SIZE:
                out += _INT_HEAD[item]
            elif kind is bytes and len(item) < short and item not in vocabulary:
                out += _STR_HEAD[len(item)]
                out += item
            elif kind is int or kind is bytes or kind is float:
                encode_into(item, out, depth)
            elif depth + 1 >= self._max_depth:
                return False  # the forms below are lists: let the general way check
            elif kind is str:
                _write_text(item, out, short, self._size_limit)
            elif item is None:
                out += _NONE
            elif kind is bool:
                out += _TRUE if item else _FALSE
            elif kind in _ATOMS and levels and id(item) not in seen:
                seen.add(id(item))  # met again, it would be a reference: the general way
                if len(item) >= self._flat_size or depth + 3 >= self._max_depth:
                    return False
                out += _LIST_HEAD[len(item) + 1]
                out += _ATOMS[kind]
                if kind is dict:
                    for pair in item.items():
                        out += b"\x02\x80"
                        if not self._write_items(pair, out, depth + 2, levels - 1, seen):
                            return False
                elif not self._write_items(item, out, depth + 1, levels - 1, seen):
                    return False
            else:
                return False
        return True


_DEFAULT_ENCODER: Final = ValueEncoder()


def dumps(value: Any, *, invoker: Any = None) -> bytes:
    """Jelly and encode *value* in the pb dialect with the default limits."""
    return _DEFAULT_ENCODER.encode(value, invoker)


def loads(
    data: bytes,
    *,
    dialect: bytes = b"pb",
    limits: Limits = DEFAULT_LIMITS,
    taster: SecurityOptions = globalSecurity,
    invoker: Any = None,
    handlers: dict[bytes, Handler] | None = None,
) -> Any:
    """Decode exactly one expression from *data* and unjelly it."""
    decoder = Decoder(dialect, limits, untracked=True)
    decoder.feed(data)
    sexp = decoder.next_expression()
    if sexp is None or not decoder.at_boundary:
        raise BananaError("expected exactly one complete expression")
    return unjelly(sexp, taster, invoker=invoker, handlers=handlers, limits=limits)
