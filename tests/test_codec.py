"""The fused encoder (pbcore.codec) must give exactly the two-step bytes.

The risky part is where the two paths meet: a container first written by the
fused path and met again inside a Jellyable's state (a reference header must
be spliced in), or the other way round (a deferred s-expression must be
rewritten in place), with reference numbers in Twisted's order throughout.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pbcore import banana, codec, jelly
from pbcore.errors import BananaError, JellyError, NotJellyable
from tests.strategies import plain_atoms, plain_values, same_structure, values

twisted_banana: Any = pytest.importorskip("twisted.spread.banana")
twisted_jelly: Any = pytest.importorskip("twisted.spread.jelly")

TAG = "tests.test_codec.Box"


class Box(jelly.Jellyable, jelly.Unjellyable):
    """A Jellyable whose state may hold shared containers."""

    def __init__(self, content: Any) -> None:
        self.content = content

    def jellyFor(self, jellier: jelly.Jellier) -> Any:
        sexp = jellier.prepare(self)
        sexp.extend([TAG.encode(), jellier.jelly(self.getStateFor(jellier))])
        return jellier.preserve(self, sexp)


class TwistedBox(twisted_jelly.Jellyable):  # type: ignore[misc]
    """The same thing on Twisted's side, under the same tag."""

    def __init__(self, content: Any) -> None:
        self.content = content

    def jellyFor(self, jellier: Any) -> Any:
        sexp = jellier.prepare(self)
        sexp.extend([TAG.encode(), jellier.jelly(self.getStateFor(jellier))])
        return jellier.preserve(self, sexp)


@pytest.fixture(autouse=True)
def _box_registered() -> Iterator[None]:
    saved = dict(jelly.unjellyableRegistry), dict(jelly.globalSecurity.allowedTypes)
    jelly.setUnjellyableForClass(TAG, Box)
    yield
    jelly.unjellyableRegistry.clear()
    jelly.unjellyableRegistry.update(saved[0])
    jelly.globalSecurity.allowedTypes.clear()
    jelly.globalSecurity.allowedTypes.update(saved[1])


def two_step(value: Any, dialect: bytes = b"pb") -> bytes:
    return banana.encode(jelly.jelly(value), dialect)


def twisted_bytes(value: Any) -> bytes:
    encoder = twisted_banana.Banana()
    encoder.connectionMade()
    encoder._selectDialect(b"pb")
    out = io.BytesIO()
    encoder._encode(twisted_jelly.jelly(value, twisted_jelly.globalSecurity), out.write)
    return out.getvalue()


def mixed_cases() -> dict[str, tuple[Any, Any]]:
    """(pbcore value, the same shape built with TwistedBox) for each meeting order."""
    cases: dict[str, tuple[Any, Any]] = {}
    for name, box in (("ours", Box), ("twisted", TwistedBox)):
        shared = [1, 2]
        fused_first = [shared, box(shared)]
        deferred_first = [box(shared), shared]
        one = box("x")
        twice = [one, one, {"again": one}]
        outer: list[Any] = []
        outer.append(box(outer))
        inner = box(None)
        inner.content = {"me": inner, "list": shared}
        nested = [inner, [shared, (inner,)]]
        # The box writes no bytes until the end, so the list after it starts
        # at the same offset and its reference header must follow the box.
        same_offset = [box(1), shared, shared]
        tuple_cycle: list[Any] = []
        tuple_cycle.append((box(tuple_cycle), tuple_cycle))
        built = {
            "fused-first": fused_first,
            "deferred-first": deferred_first,
            "box-twice": twice,
            "box-holds-outer": outer,
            "box-holds-itself": nested,
            "tuple-cycle": tuple_cycle,
            "box-then-shared-at-one-offset": same_offset,
        }
        for key, value in built.items():
            ours, theirs = cases.get(key, (None, None))
            cases[key] = (value, theirs) if name == "ours" else (ours, value)
    return cases


CASES = mixed_cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_mixed_paths_match_two_step_and_twisted(name: str) -> None:
    ours, theirs = CASES[name]
    fused = codec.dumps(ours)
    assert fused == two_step(ours)
    assert fused == twisted_bytes(theirs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_mixed_paths_round_trip_with_sharing(name: str) -> None:
    ours, _ = CASES[name]
    back = codec.loads(codec.dumps(ours))

    def plain(value: Any, seen: dict[int, Any]) -> Any:
        """Boxes replaced by ("Box", content) tuples, keeping identity, to compare shapes."""
        if id(value) in seen:
            return seen[id(value)]
        if isinstance(value, Box):
            holder: list[Any] = ["Box"]
            seen[id(value)] = holder
            holder.append(plain(value.content, seen))
            return holder
        if isinstance(value, list):
            result: list[Any] = []
            seen[id(value)] = result
            result.extend(plain(item, seen) for item in value)
            return result
        if isinstance(value, tuple):
            return tuple(plain(item, seen) for item in value)
        if isinstance(value, dict):
            mapping: dict[Any, Any] = {}
            seen[id(value)] = mapping
            mapping.update({key: plain(item, seen) for key, item in value.items()})
            return mapping
        return value

    assert same_structure(plain(ours, {}), plain(back, {}))


def test_shared_box_comes_back_shared() -> None:
    one = Box([1])
    back = codec.loads(codec.dumps([one, one, [one]]))
    assert back[0] is back[1] is back[2][0]
    assert isinstance(back[0], Box)
    assert back[0].content == [1]


@given(values())
def test_fused_equals_two_step(value: Any) -> None:
    assert codec.dumps(value) == two_step(value)


@given(values())
def test_none_dialect_equals_two_step(value: Any) -> None:
    assert codec.ValueEncoder(b"none").encode(value) == two_step(value, b"none")


@given(values())
def test_loads_inverts_dumps(value: Any) -> None:
    assert same_structure(value, codec.loads(codec.dumps(value)))


@given(st.lists(values(), max_size=3), st.lists(st.integers(0, 2**40) | st.binary(max_size=8), max_size=4))
def test_encode_list_is_head_plus_separately_jellied_values(args: list[Any], head: list[Any]) -> None:
    # Each value gets its own reference numbers, as PB serializes args and kwargs apart.
    expected = banana.encode([*head, *(jelly.jelly(value) for value in args)])
    assert codec.ValueEncoder().encode_list(head, args) == expected


def test_strings_that_spell_vocabulary_words() -> None:
    for word in ("None", "list", "module", "reference", "dictionary"):
        assert codec.dumps([word, {word: word}]) == two_step([word, {word: word}])


@pytest.mark.parametrize(
    "value",
    [
        "a" * 6,
        b"a" * 6,
        [1] * 6,
        {n: n for n in range(5)},  # five pairs plus the atom make six items
        (1, 2, 3, 4, 5),
    ],
)
def test_fused_encoder_honours_a_small_size_limit(value: Any) -> None:
    limits = banana.Limits(size_limit=5)
    with pytest.raises(BananaError, match="size limit of 5"):
        codec.ValueEncoder(limits=limits).encode(value)
    with pytest.raises(BananaError, match="size limit of 5"):
        banana.Encoder(limits=limits).encode(jelly.jelly(value))


@pytest.mark.parametrize("leaf", [1, "s", None, True, {}, [], {"a": 1}, Box(1)])
@pytest.mark.parametrize("wrap", ["list", "dict", "tuple", "pair", "shared-pair"])
def test_depth_limit_is_exactly_the_two_step_one(leaf: Any, wrap: str) -> None:
    limits = banana.Limits(max_depth=12)

    def outcome(encode: Any, value: Any) -> str:
        try:
            encode(value)
        except BananaError:
            return "refused"
        return "encoded"

    outcomes = set()
    for depth in range(3, 14):
        value = leaf
        for _ in range(depth):
            value = {
                "list": [value],
                "dict": {"k": value},
                "tuple": (value,),
                "pair": [None, value],
                # The second copy becomes a dereference and the first gains a
                # [reference, n, ...] wrapper: one more level per step.
                "shared-pair": [value, value],
            }[wrap]
        fused = outcome(codec.ValueEncoder(limits=limits).encode, value)
        layered = outcome(lambda v: banana.Encoder(limits=limits).encode(jelly.jelly(v, limits=limits)), value)
        assert fused == layered, depth
        outcomes.add(fused)
    assert outcomes == {"encoded", "refused"}  # the range really crosses the limit


def test_unsendable_values_are_not_jellyable() -> None:
    class Plain:
        pass

    for value in (Plain(), [1, Plain()], {"k": print}, "\ud800", ["ok", "\udfff"]):
        with pytest.raises(NotJellyable):
            codec.dumps(value)
        with pytest.raises(NotJellyable):
            jelly.jelly(value)


def test_loads_wants_exactly_one_expression() -> None:
    data = codec.dumps([1, 2])
    with pytest.raises(BananaError, match="exactly one"):
        codec.loads(data + data)
    with pytest.raises(BananaError, match="exactly one"):
        codec.loads(data[:-1])
    with pytest.raises(JellyError):
        codec.loads(banana.encode([b"reference", 1, [b"dereference", 1]]))


class _Text(str):
    pass


class _Number(int):
    pass


# No lone surrogates here: see test_unsendable_values_are_not_jellyable.
_flat_values = plain_values(plain_atoms(st.builds(_Text, st.text(max_size=3)), st.builds(_Number, st.integers(0, 9))))


def _cycle() -> list[Any]:
    box: list[Any] = [1]
    box.append(box)
    return box


def _outcome(encode: Any, value: Any) -> tuple[str, Any]:
    try:
        return "bytes", encode(value)
    except (BananaError, NotJellyable) as error:
        return type(error).__name__, str(error)


def _same(fused: tuple[str, Any], layered: tuple[str, Any], strict: bool) -> bool:
    if fused[0] == "bytes" or layered[0] == "bytes":
        return fused == layered
    if not strict:  # shared parts: the two general paths word a refusal apart
        return True
    # A value both unjellyable and too deep: the two-step path finds the first first, the fused
    # one (which checks the depth as it writes) may find the second. Both refuse it. And jelly
    # and Banana word "too deep" apart ("values nested deeper", "lists nested deeper").
    too_deep = "nested deeper than"
    return (
        fused == layered
        or layered[0] == "NotJellyable"
        or (fused[0] == layered[0] == "BananaError" and too_deep in fused[1] and too_deep in layered[1])
    )


def _shares(value: Any) -> bool:
    """Whether some container is met twice in *value* (then it travels as a reference)."""
    seen: set[int] = set()

    def walk(item: Any) -> bool:
        if not isinstance(item, (list, tuple, dict, set, frozenset)):
            return False
        if id(item) in seen:
            return True
        seen.add(id(item))
        parts = [p for pair in item.items() for p in pair] if isinstance(item, dict) else item
        return any(walk(part) for part in parts)

    return walk(value)


def test_a_plain_message_takes_the_plain_path_and_anything_else_does_not() -> None:
    encoder = codec.ValueEncoder()
    head: list[banana.Sexp] = [b"message", 3, b"root", b"echo", 1]
    plain = [(1, "two", [3.5, None, True], {"k": b"v"}), {"flag": False}]
    assert encoder.encode_plain_list(head, plain) == encoder.encode_list(head, plain)
    assert encoder.encode_plain_list(head, plain) == banana.encode([*head, *(jelly.jelly(v) for v in plain)])
    shared = [1]
    for not_plain in ([(shared, shared), {}], [(jelly.Jellyable(),), {}], [([[[[1]]]],), {}]):
        assert encoder.encode_plain_list(head, not_plain) is None
    assert codec.ValueEncoder(b"none").encode_plain_list(head, plain) is None  # only pb abbreviates


@pytest.mark.parametrize("prefix_limit", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("request_id", [127, 128, 4095, 4096, 16383, 16384, 2**21, 2**31 - 1, 2**31, 2**40])
def test_a_message_head_is_the_two_step_bytes_at_every_prefix_limit(prefix_limit: int, request_id: int) -> None:
    limits = banana.Limits(prefix_limit=prefix_limit)
    head: list[banana.Sexp] = [b"answer", request_id]
    layered = _outcome(lambda v: banana.Encoder(limits=limits).encode([*head, jelly.jelly(v)]), 1)
    for encode in (codec.ValueEncoder(limits=limits).encode_list, codec.ValueEncoder(b"none", limits).encode_list):
        got = _outcome(lambda v, encode=encode: encode(head, [v]), 1)
        if encode.__self__.dialect == b"pb":  # type: ignore[attr-defined]
            assert got == layered
        else:
            assert got[0] == layered[0]


# Size limits from 9: the fused encoder writes the fixed forms (None, booleans, the names of the
# containers: b"frozenset" is 9 bytes) as constants, and never checks a message's own list, so a size
# limit below them would differ.
@given(_flat_values, st.integers(1, 5), st.integers(9, 14))
@example([0] * 9, 5, 9)  # 10 items with the list's name: one over
@example(dict.fromkeys(range(9)), 5, 9)
@example((1,), 2, 9)  # the deepest a flat container may be
@example({"k": "v"}, 3, 9)  # in a message, the text is one level too deep
@example([[[[1]]]], 5, 9)  # four deep: the general way
@example(([1], [1]), 5, 9)  # equal, not the same: no reference
@example(_cycle(), 3, 9)  # [reference, 1, [1, [dereference, 1]]]: at the limit once inside a message
@example(frozenset(), 1, 9)
def test_flat_values_at_any_limit_are_the_two_step_bytes_or_error(value: Any, depth: int, size: int) -> None:
    # ValueEncoder writes atoms and flat containers without a jellier; near a limit it defers to the
    # general way. Either way: the two-step bytes, or the same refusal.
    head: list[banana.Sexp] = [b"answer", 7]
    for limits in (banana.Limits(), banana.Limits(max_depth=depth, size_limit=size)):
        fused = codec.ValueEncoder(limits=limits)
        plain = banana.Encoder(limits=limits)

        def layered(v: Any, plain: banana.Encoder = plain, limits: banana.Limits = limits) -> bytes:
            return plain.encode(jelly.jelly(v, limits=limits))

        def layered_list(v: Any, plain: banana.Encoder = plain, limits: banana.Limits = limits) -> bytes:
            return plain.encode([*head, jelly.jelly(v, limits=limits)])

        strict = not _shares(value)
        assert _same(_outcome(fused.encode, value), _outcome(layered, value), strict)
        assert _same(
            _outcome(lambda v, fused=fused: fused.encode_list(head, [v]), value), _outcome(layered_list, value), strict
        )
        # The broker's plain path: the same bytes, or None (it never refuses: it leaves that to the above).
        as_plain = fused.encode_plain_list(head, [value])
        if as_plain is not None:
            assert ("bytes", as_plain) == _outcome(layered_list, value)
