"""Unit, property and bad-input tests for Jelly (:mod:`pbcore.jelly`).

The exact forms below are Twisted's (``twisted.spread.jelly``), and
:func:`test_jelly_matches_twisted` keeps comparing against it.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.spread import jelly as _twisted_jelly

import pbcore.jelly
from pbcore.banana import Limits, decode, encode
from pbcore.errors import BananaError, InsecureJelly, JellyError, NotJellyable, ProtocolError
from pbcore.jelly import (
    Jellier,
    Jellyable,
    SecurityOptions,
    Unjellier,
    Unjellyable,
    Unpersistable,
    globalSecurity,
    jelly,
    qual,
    setUnjellyableFactoryForClass,
    setUnjellyableForClass,
    setUnjellyableForClassTree,
    unjelly,
    unjellyableFactoryRegistry,
    unjellyableRegistry,
)
from tests.strategies import same_structure, trees, values

twisted_jelly: Any = _twisted_jelly  # Twisted is untyped: calls go through Any


@contextlib.contextmanager
def restored_registry() -> Iterator[None]:
    """Undo every registration made inside (the registries are global)."""
    registry = dict(unjellyableRegistry)
    factories = dict(unjellyableFactoryRegistry)
    allowed = dict(globalSecurity.allowedTypes)
    try:
        yield
    finally:
        unjellyableRegistry.clear()
        unjellyableRegistry.update(registry)
        unjellyableFactoryRegistry.clear()
        unjellyableFactoryRegistry.update(factories)
        globalSecurity.allowedTypes.clear()
        globalSecurity.allowedTypes.update(allowed)


@pytest.fixture
def registry() -> Iterator[None]:
    """For tests that register copy tags. (Not autouse: hypothesis tests refuse
    function-scoped fixtures, so they use :func:`restored_registry` directly.)"""
    with restored_registry():
        yield


def round_trip(value: Any, taster: SecurityOptions = globalSecurity) -> Any:
    """jelly -> unjelly, and check that going through Banana gives the same."""
    sexp = jelly(value, taster)
    direct = unjelly(sexp, taster)
    [wire] = decode(encode(sexp))
    via_banana = unjelly(wire, taster)
    assert same_structure(direct, via_banana)
    return direct


# ---------------------------------------------------------------------------
# Round trips


ATOMS: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**31,
    -(2**31) - 1,
    2**447,
    -(2**447),
    0.0,
    -0.0,
    1.5,
    float("inf"),
    float("-inf"),
    float("nan"),
    b"",
    b"bytes\x00\xff",
    b"None",
    b"list",
    "",
    "text",
    "ünïcödé ☃ \U0001f600",
    "None",
    datetime.datetime(2024, 2, 29, 23, 59, 58, 999999),
    datetime.datetime.min,
    datetime.datetime.max,
    datetime.date(1, 1, 1),
    datetime.date(9999, 12, 31),
    datetime.date(2000, 6, 15),
    datetime.time(0, 0),
    datetime.time(23, 59, 59, 999999),
    datetime.time(12, 30, 1, 5),
    datetime.timedelta(0),
    datetime.timedelta(days=-1, seconds=5, microseconds=7),
    datetime.timedelta.max,
    datetime.timedelta.min,
    decimal.Decimal("0"),
    decimal.Decimal("1.50"),
    decimal.Decimal("-1.50"),
    decimal.Decimal("1E+10"),
    decimal.Decimal("-0.000123"),
    decimal.Decimal("123456789012345678901234567890.123456789"),
]


@pytest.mark.parametrize("value", ATOMS, ids=repr)
def test_atom_round_trip(value: Any) -> None:
    result = round_trip(value)
    assert type(result) is type(value)
    if isinstance(value, decimal.Decimal):
        # Decimal equality ignores the exponent; the form keeps it.
        assert result.as_tuple() == value.as_tuple()
    else:
        assert same_structure(result, value)


CONTAINERS: list[Any] = [
    [],
    (),
    {},
    set(),
    frozenset(),
    [1, "a", b"b", None, True, 2.5],
    (1, ("nested", (2,)), []),
    {"a": 1, 2: [3], (4, 5): {"x": None}, None: True, b"k": frozenset({1})},
    {1, "two", (3, 4), frozenset({5})},
    frozenset({None, "x", (1, 2)}),
    [[[[[]]]]],
    {"dates": [datetime.date(2020, 1, 1), datetime.timedelta(seconds=1)], "d": decimal.Decimal("2.5")},
]


@pytest.mark.parametrize("value", CONTAINERS, ids=repr)
def test_container_round_trip(value: Any) -> None:
    result = round_trip(value)
    assert type(result) is type(value)
    assert same_structure(result, value)


def test_bool_is_not_int() -> None:
    assert round_trip([True, 1, False, 0]) == [True, 1, False, 0]
    assert [type(x) for x in round_trip([True, 1, False, 0])] == [bool, int, bool, int]


@given(values())
def test_round_trip_property(value: Any) -> None:
    result = round_trip(value)
    assert same_structure(result, value)
    assert_only_known_types(result)


# ---------------------------------------------------------------------------
# Exact forms


@pytest.mark.parametrize(
    ("value", "form"),
    [
        (None, [b"None"]),
        (True, [b"boolean", b"true"]),
        (False, [b"boolean", b"false"]),
        (5, 5),
        (-5, -5),
        (b"raw", b"raw"),
        (1.25, 1.25),
        ("a", [b"unicode", b"a"]),
        ("é", [b"unicode", b"\xc3\xa9"]),
        ({"a": 1}, [b"dictionary", [[b"unicode", b"a"], 1]]),
        ([1, b"x", 1.5], [b"list", 1, b"x", 1.5]),
        ((1,), [b"tuple", 1]),
        ({1}, [b"set", 1]),
        (frozenset({2}), [b"frozenset", 2]),
        ([None, (None,)], [b"list", [b"None"], [b"tuple", [b"None"]]]),
        (datetime.datetime(2024, 1, 2, 3, 4, 5, 6), [b"datetime", b"2024 1 2 3 4 5 6"]),
        (datetime.date(2024, 1, 2), [b"date", b"2024 1 2"]),
        (datetime.time(1, 2, 3, 4), [b"time", b"1 2 3 4"]),
        (datetime.timedelta(days=1, seconds=2, microseconds=3), [b"timedelta", b"1 2 3"]),
        (datetime.timedelta(days=-1, seconds=5), [b"timedelta", b"-1 5 0"]),
        (decimal.Decimal("-1.50"), [b"decimal", -150, -2]),
        (decimal.Decimal("1E+3"), [b"decimal", 1, 3]),
        (Unpersistable("why"), [b"unpersistable", b"why"]),
    ],
    ids=repr,
)
def test_exact_forms(value: Any, form: Any) -> None:
    assert jelly(value) == form


def test_shared_list_form() -> None:
    shared = [1]
    assert jelly([shared, shared]) == [b"list", [b"reference", 1, [b"list", 1]], [b"dereference", 1]]


def test_cyclic_list_form() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    assert jelly(cycle) == [b"reference", 1, [b"list", [b"dereference", 1]]]


def test_unpersistable_forms() -> None:
    assert unjelly([b"unpersistable", b"a socket"]) == Unpersistable("a socket")
    assert isinstance(unjelly([b"persistent", 5]), Unpersistable)


@settings(max_examples=60)
@given(values())
def test_jelly_matches_twisted(value: Any) -> None:
    # Compared as bytes on the wire: sharing inside the s-expression does not matter there.
    assert encode(jelly(value)) == encode(twisted_jelly.jelly(value))


@settings(max_examples=60)
@given(trees())
def test_twisted_reads_what_we_send(value: Any) -> None:
    # Trees only: Twisted's own unjelly fails an assertion on some cycles through tuples.
    [wire] = decode(encode(jelly(value)))
    assert same_structure(twisted_jelly.unjelly(wire), value)


# ---------------------------------------------------------------------------
# Shared and cyclic structures


def test_list_containing_itself() -> None:
    cycle: list[Any] = [1]
    cycle.append(cycle)
    result = round_trip(cycle)
    assert result[0] == 1
    assert result[1] is result
    assert same_structure(result, cycle)


def test_dict_containing_itself() -> None:
    cycle: dict[str, Any] = {"n": 1}
    cycle["self"] = cycle
    result = round_trip(cycle)
    assert result["self"] is result
    assert result["n"] == 1


def test_tuple_on_a_cycle() -> None:
    inner: list[Any] = []
    outer = (inner, "x")
    inner.append(outer)
    result = round_trip(outer)
    assert type(result) is tuple
    assert type(result[0]) is list
    assert result[0][0] is result
    assert result[1] == "x"
    # Entered from the list side instead.
    from_list = round_trip(inner)
    assert from_list[0][0] is from_list


def test_dict_with_tuple_on_a_cycle() -> None:
    cycle: dict[str, Any] = {}
    cycle["t"] = (cycle, 1)
    result = round_trip(cycle)
    assert result["t"][0] is result
    assert result["t"][1] == 1


def test_tuple_on_a_cycle_used_as_a_dict_key_elsewhere() -> None:
    node: list[Any] = []
    key = (1, 2)
    node.extend([key, {key: node}])
    result = round_trip(node)
    assert result[1][result[0]] is result
    assert same_structure(result, node)


def test_shared_sub_lists_stay_shared() -> None:
    shared: list[Any] = [1, 2]
    other: list[Any] = [1, 2]
    value = [shared, shared, {"k": shared}, (shared,), other]
    result = round_trip(value)
    assert result[0] is result[1]
    assert result[0] is result[2]["k"]
    assert result[0] is result[3][0]
    assert result[4] == result[0]
    assert result[4] is not result[0]
    assert same_structure(result, value)
    # and the comparison notices lost sharing
    assert not same_structure([[1, 2], [1, 2], {"k": [1, 2]}, ([1, 2],), [1, 2]], value)


def test_shared_set_dict_and_tuple() -> None:
    shared_set = {1, 2}
    shared_dict = {"a": 1}
    shared_tuple = (1, "x")
    value = [shared_set, shared_dict, shared_tuple, shared_set, shared_dict, shared_tuple]
    result = round_trip(value)
    assert result[0] is result[3]
    assert result[1] is result[4]
    assert result[2] is result[5]


def test_mutual_cycle() -> None:
    left: list[Any] = []
    right: dict[str, Any] = {"left": left}
    left.append(right)
    result = round_trip([left, right])
    assert result[0][0] is result[1]
    assert result[1]["left"] is result[0]


def test_deep_but_shared_structure_is_not_too_deep() -> None:
    shared: list[Any] = [1]
    value = [shared] * 500
    result = round_trip(value)
    assert all(item is result[0] for item in result)


# ---------------------------------------------------------------------------
# Refusals on the sending side


class Plain:
    def __init__(self, x: int = 1) -> None:
        self.x = x

    def method(self) -> int:
        return self.x


def a_function() -> None:
    """Not jellyable."""


@pytest.mark.parametrize(
    "value",
    [
        datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
        datetime.time(1, 2, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        decimal.Decimal("NaN"),
        decimal.Decimal("sNaN"),
        decimal.Decimal("Infinity"),
        decimal.Decimal("-Infinity"),
        Plain(),
        object(),
        a_function,
        lambda: 1,
        len,
        os,
        Plain,
        int,
        Plain().method,
        1j,
        bytearray(b"x"),
        [1, {"deep": [Plain()]}],
    ],
    ids=lambda value: type(value).__name__,
)
def test_not_jellyable(value: Any) -> None:
    with pytest.raises(NotJellyable) as caught:
        jelly(value)
    assert isinstance(caught.value, TypeError)
    assert not isinstance(caught.value, ProtocolError)
    assert str(caught.value)


def test_jelly_depth_limit() -> None:
    deep: list[Any] = []
    for _ in range(150):
        deep = [deep]
    with pytest.raises(BananaError, match="nested deeper"):
        jelly(deep)
    shallow: list[Any] = []
    for _ in range(5):
        shallow = [shallow]
    with pytest.raises(BananaError, match="nested deeper than the limit of 3"):
        jelly(shallow, limits=Limits(max_depth=3))


# ---------------------------------------------------------------------------
# Refusals on the receiving side


class ImportSpy(importlib.abc.MetaPathFinder):
    """Records every import that reaches the finders."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        self.names.append(fullname)
        return None


@pytest.fixture
def import_spy() -> Iterator[ImportSpy]:
    spy = ImportSpy()
    sys.meta_path.insert(0, spy)
    try:
        yield spy
    finally:
        sys.meta_path.remove(spy)


NOT_YET_IMPORTED = "this"  # imported, it prints the Zen of Python: never imported by a test run


@pytest.mark.parametrize(
    "form",
    [
        [b"module", b"os"],
        [b"module", NOT_YET_IMPORTED.encode()],
        [b"class", b"os._wrap_close"],
        [b"class", NOT_YET_IMPORTED.encode() + b".Thing"],
        [b"function", b"os.system"],
        [b"function", NOT_YET_IMPORTED.encode() + b".main"],
        [b"method", b"system", [b"module", b"os"], [b"class", b"os.Foo"]],
        [b"instance", [b"class", b"os._wrap_close"], [b"dictionary"]],
        [b"os.system", [b"list", [b"unicode", b"echo hacked"]]],
        [NOT_YET_IMPORTED.encode() + b".Anything", [b"dictionary"]],
        [b"subprocess.Popen", [b"list", [b"unicode", b"true"]]],
        [b"nosuchtype"],
        [b"nosuchtype", 1, 2],
        [b"list", 1, [b"module", b"os"]],
        [b"dictionary", [[b"unicode", b"k"], [b"function", b"os.system"]]],
    ],
    ids=repr,
)
def test_unjelly_refuses_code_forms_and_unknown_tags(
    form: Any, import_spy: ImportSpy, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args))
    assert NOT_YET_IMPORTED not in sys.modules
    modules_before = set(sys.modules)
    with pytest.raises(InsecureJelly) as caught:
        unjelly(form)
    assert str(caught.value)
    assert import_spy.names == []
    assert set(sys.modules) == modules_before
    assert NOT_YET_IMPORTED not in sys.modules
    assert calls == []


def test_allowing_the_forms_still_loads_no_code(import_spy: ImportSpy) -> None:
    # Even a taster that names the forms and the module gets no module, class or function.
    taster = SecurityOptions()
    taster.allowBasicTypes()
    taster.allowTypes("module", "class", "function", "instance")
    taster.allowModules(NOT_YET_IMPORTED)
    assert taster.isModuleAllowed(NOT_YET_IMPORTED)
    forms: list[Any] = [[b"module", b"this"], [b"class", b"this.X"], [b"function", b"this.f"]]
    for form in forms:
        with pytest.raises(InsecureJelly, match="never unjellied"):
            unjelly(form, taster)
    assert import_spy.names == []
    assert NOT_YET_IMPORTED not in sys.modules


@pytest.mark.parametrize(
    ("form", "words"),
    [
        ([], "empty list"),
        ([5, 1], "type name"),
        ([[b"list"]], "type name"),
        ([b"None", 1], "needs 0 item"),
        ([b"unicode"], "needs 1 item"),
        ([b"unicode", b"a", b"b"], "needs 1 item"),
        ([b"unicode", b"\xff\xfe"], "UTF-8"),
        ([b"unicode", 5], "byte string"),
        ([b"boolean", b"maybe"], "true"),
        ([b"boolean"], "needs 1 item"),
        ([b"dereference", 7], "unknown reference"),
        ([b"dereference", b"x"], "unknown reference"),
        ([b"dereference"], "needs 1 item"),
        ([b"list", [b"dereference", 1], [b"reference", 1, [b"list"]]], "unknown reference"),
        ([b"list", [b"reference", 1, [b"list"]], [b"reference", 1, [b"list"]]], "defined twice"),
        ([b"reference", b"one", [b"list"]], "must be an int"),
        ([b"reference", 1], "needs 2 item"),
        ([b"dictionary", [[b"list"], 1]], "unhashable"),
        ([b"dictionary", [[b"dictionary"], 1]], "unhashable"),
        ([b"dictionary", [1]], "[key, value]"),
        ([b"dictionary", [1, 2, 3]], "[key, value]"),
        ([b"dictionary", 5], "[key, value]"),
        ([b"set", [b"list"]], "unhashable"),
        ([b"frozenset", [b"set"]], "unhashable"),
        ([b"tuple", 1, [b"dictionary", [[b"set"], 2]]], "unhashable"),
        ([b"datetime", b"2024 13 1 0 0 0 0"], "out of range"),
        ([b"datetime", b"yesterday"], "7 integers"),
        ([b"datetime", b"2024 1 1"], "7 integers"),
        ([b"datetime", 20240101], "byte string"),
        ([b"date", b"2024 2 30"], "out of range"),
        ([b"date", b"2024  1 1"], "3 integers"),
        ([b"date", b"0 1 1"], "out of range"),
        ([b"time", b"25 0 0 0"], "out of range"),
        ([b"time", b"1 2 3 4 5"], "4 integers"),
        ([b"timedelta", b"1000000000 0 0"], "out of range"),
        ([b"timedelta", b"1 2"], "3 integers"),
        ([b"timedelta", b"1 2 3.5"], "3 integers"),
        ([b"date", b"99999999999999999999999 1 1"], "3 integers"),
        ([b"decimal", b"1", 2], "two ints"),
        ([b"decimal", 1], "needs 2 item"),
        ([b"decimal", 1.5, 0], "two ints"),
        ([b"unpersistable", 3], "byte string"),
        ([b"list", "text"], "not an s-expression"),
        ([b"list", None], "not an s-expression"),
    ],
    ids=repr,
)
def test_malformed_forms(form: Any, words: str) -> None:
    with pytest.raises(JellyError) as caught:
        unjelly(form)
    assert type(caught.value) is JellyError  # malformed, not refused
    assert words in str(caught.value)


def test_not_an_s_expression() -> None:
    with pytest.raises(JellyError, match="not an s-expression"):
        unjelly("text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "form",
    [
        [b"date", b"--5 1 1"],  # int("--5") is a ValueError
        [b"date", "2024 ² 1".encode()],  # str.isdigit() is true for "²", int() refuses it
        [b"time", "1 2 3 ¹".encode()],
        [b"decimal", 1, 10**18],  # decimal.InvalidOperation
        [b"decimal", 1, 2**63],  # OverflowError
        [b"decimal", 1, -(2**100)],
    ],
    ids=repr,
)
def test_malformed_numbers_are_jelly_errors(form: Any) -> None:
    with pytest.raises(JellyError):
        unjelly(form)


@pytest.mark.parametrize(
    "form",
    [
        # A reference that is its own body.
        [b"reference", 1, [b"dereference", 1]],
        # A tuple that contains itself directly: no Python value is like that.
        [b"reference", 1, [b"tuple", [b"dereference", 1]]],
        [b"reference", 1, [b"frozenset", [b"dereference", 1]]],
        [b"list", [b"reference", 1, [b"tuple", 5, [b"dereference", 1]]]],
    ],
    ids=repr,
)
def test_impossible_self_reference_is_a_jelly_error(form: Any) -> None:
    # Whatever unjelly does with these, it must not hand back a value that
    # still holds an unfilled placeholder.
    with pytest.raises(JellyError):
        unjelly(form)


def test_unhashable_key_found_late_is_a_jelly_error() -> None:
    # The key is a tuple still being built when the dictionary is; once known
    # it turns out to hold the (unhashable) dictionary itself.
    form: Any = [b"reference", 1, [b"tuple", [b"dictionary", [[b"dereference", 1], 1]]]]
    with pytest.raises(JellyError, match="unhashable"):
        unjelly(form)


def test_unjelly_depth_limit() -> None:
    form: Any = [b"None"]
    for _ in range(10):
        form = [b"list", form]
    assert unjelly(form, limits=Limits(max_depth=11)) is not None
    with pytest.raises(JellyError, match="nested deeper than the limit of 5"):
        unjelly(form, limits=Limits(max_depth=5))


KNOWN_TYPES = (
    type(None),
    bool,
    int,
    float,
    bytes,
    str,
    list,
    tuple,
    dict,
    set,
    frozenset,
    datetime.datetime,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    decimal.Decimal,
    Unpersistable,
)


def assert_only_known_types(value: Any) -> None:
    """Walk an unjellied value: only built-in jelly types, and no placeholders."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        assert type(item) in KNOWN_TYPES, f"unjelly produced a {type(item).__qualname__}"
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)


TAGS = [
    b"None",
    b"boolean",
    b"unicode",
    b"list",
    b"tuple",
    b"dictionary",
    b"set",
    b"frozenset",
    b"reference",
    b"dereference",
    b"datetime",
    b"date",
    b"time",
    b"timedelta",
    b"decimal",
    b"unpersistable",
    b"persistent",
    b"module",
    b"class",
    b"function",
    b"instance",
    b"os.system",
]


def form(tag: bytes, *items: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """``[tag, item, ...]`` with one strategy per item."""
    return st.tuples(*items).map(lambda drawn: [tag, *drawn])


def forms(tag: bytes, items: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """``[tag, *items]`` with any number of items."""
    return st.lists(items, max_size=4).map(lambda drawn: [tag, *drawn])


REF = st.integers(-1, 3)
# Small numbers, machine-word boundaries (where C conversions overflow) and anything Banana carries.
BOUNDARIES = [sign * 2**bits + delta for sign in (1, -1) for bits in (31, 32, 63, 64) for delta in (-1, 0, 1)]
NUMBER = st.one_of(st.integers(-3, 40), st.sampled_from(BOUNDARIES), st.integers(-(2**447), 2**447))
TEXT = st.one_of(
    st.binary(max_size=8),
    # number-like text, with the odd sign, dot and non-ASCII digit
    st.text(alphabet="0123456789 -+.²٣", max_size=24).map(str.encode),
    st.sampled_from([b"true", b"false", b"1 2 3", b"2024 1 2 3 4 5 6", b"1 2 3 4", b"\xff"]),
)
TEXT_FORMS = (b"datetime", b"date", b"time", b"timedelta", b"unpersistable", b"unicode", b"boolean")


def jellyish() -> st.SearchStrategy[Any]:
    """S-expressions shaped like jelly, mostly well formed, often subtly not.

    Each form usually has its right arity and item types, but the items are
    drawn loosely (wrong types, out-of-range numbers, odd text, reference
    numbers that collide), and sometimes a form gets arbitrary items.
    """
    leaf = st.one_of(
        NUMBER,
        st.floats(),
        TEXT,
        st.sampled_from(TAGS),
        st.just([b"None"]),
        form(b"dereference", REF),
        *(form(tag, TEXT) for tag in TEXT_FORMS),
        form(b"decimal", NUMBER, NUMBER),
        form(b"module", TEXT),
        form(b"class", TEXT),
        form(b"function", TEXT),
    )

    def extend(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            *(forms(tag, inner) for tag in (b"list", b"tuple", b"set", b"frozenset")),
            forms(b"dictionary", st.one_of(st.tuples(inner, inner).map(list), inner)),
            form(b"reference", REF, inner),
            st.tuples(st.sampled_from(TAGS), st.lists(inner, max_size=4)).map(lambda t: [t[0], *t[1]]),
            st.lists(inner, max_size=3),
        )

    return st.recursive(leaf, extend, max_leaves=20)


def references() -> st.SearchStrategy[Any]:
    """Containers, references and dereferences with colliding numbers: the cycle machinery."""
    leaf = st.one_of(st.integers(0, 2), form(b"dereference", REF), st.just([b"unicode", b"k"]))

    def extend(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            *(forms(tag, inner) for tag in (b"list", b"tuple", b"set", b"frozenset")),
            forms(b"dictionary", st.tuples(inner, inner).map(list)),
            form(b"reference", REF, inner),
            form(b"reference", REF, inner),
        )

    return st.recursive(leaf, extend, max_leaves=8)


def assert_unjelly_is_safe(sexp: Any) -> None:
    """unjelly either raises a JellyError or returns only built-in jelly types."""
    try:
        value = unjelly(sexp)
    except ProtocolError as error:
        assert isinstance(error, JellyError)
        assert str(error)
        return
    except Exception as error:  # the bug these tests exist to find
        pytest.fail(f"{type(error).__name__} (not a ProtocolError) from {sexp!r:.300}: {error}")
    assert_only_known_types(value)


@given(jellyish())
def test_jellyish_garbage_raises_only_protocol_errors(sexp: Any) -> None:
    assert_unjelly_is_safe(sexp)


@given(references())
def test_reference_garbage_raises_only_protocol_errors(sexp: Any) -> None:
    assert_unjelly_is_safe(sexp)


@given(NUMBER, NUMBER)
def test_decimal_garbage_raises_only_protocol_errors(digits: int, exponent: int) -> None:
    assert_unjelly_is_safe([b"decimal", digits, exponent])


@given(st.sampled_from(TEXT_FORMS), TEXT)
def test_text_form_garbage_raises_only_protocol_errors(tag: bytes, text: bytes) -> None:
    assert_unjelly_is_safe([tag, text])


# ---------------------------------------------------------------------------
# SecurityOptions


def test_fresh_security_options_allow_atoms_only() -> None:
    fresh = SecurityOptions()
    with pytest.raises(InsecureJelly, match="list"):
        unjelly([b"list", 1], fresh)
    containers: list[Any] = [[b"tuple", 1], [b"dictionary"], [b"reference", 1, 5], [b"dereference", 1]]
    for container in containers:
        with pytest.raises(InsecureJelly):
            unjelly(container, fresh)
    atoms = [
        None,
        True,
        5,
        2.5,
        b"b",
        "s",
        datetime.datetime(2020, 1, 1),
        datetime.date(2020, 1, 1),
        datetime.time(1),
        datetime.timedelta(1),
        decimal.Decimal("1.5"),
        {1, 2},
        frozenset({3}),
    ]
    for atom in atoms:
        assert same_structure(unjelly(jelly(atom), fresh), atom)


def test_allow_basic_types_allows_containers() -> None:
    taster = SecurityOptions()
    taster.allowBasicTypes()
    shared: list[Any] = [1]
    value = [shared, (shared,), {"k": shared}]
    result = unjelly(jelly(value), taster)
    assert same_structure(result, value)
    assert result[0] is result[1][0]


def test_allow_types() -> None:
    taster = SecurityOptions()
    assert not taster.isTypeAllowed("list")
    taster.allowTypes("list", b"tuple")
    assert taster.isTypeAllowed(b"list")
    assert unjelly([b"list", [b"tuple", 1]], taster) == [(1,)]
    with pytest.raises(InsecureJelly):
        unjelly([b"dictionary"], taster)


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y


def test_allow_instances_of() -> None:
    taster = SecurityOptions()
    taster.allowInstancesOf(Point)
    assert taster.isClassAllowed(Point)
    assert not taster.isClassAllowed(Plain)
    point = Point(1, "two")  # type: ignore[arg-type]
    sexp = jelly(point, taster)
    state = [b"dictionary", [[b"unicode", b"x"], 1], [[b"unicode", b"y"], [b"unicode", b"two"]]]
    assert sexp == [qual(Point).encode(), state]
    assert qual(Point) == "tests.test_jelly.Point"
    result = unjelly(sexp, taster)
    assert type(result) is Point
    assert result.__dict__ == {"x": 1, "y": "two"}
    # Without the allowance it is refused at both ends.
    with pytest.raises(NotJellyable):
        jelly(point)
    with pytest.raises(InsecureJelly):
        unjelly(sexp)


def test_allowed_instances_are_shared() -> None:
    taster = SecurityOptions()
    taster.allowInstancesOf(Point)
    point = Point(1, 2)
    point.me = point  # type: ignore[attr-defined]
    result = unjelly(jelly([point, point], taster), taster)
    assert result[0] is result[1]
    assert result[0].me is result[0]


def test_allowed_instance_class_is_found_not_imported(import_spy: ImportSpy) -> None:
    ghost = type("Ghost", (), {"__module__": "pbcore_ghost_module_never_imported"})
    taster = SecurityOptions()
    taster.allowInstancesOf(ghost)
    instance: Any = ghost()
    instance.value = 42
    sexp: Any = jelly(instance, taster)
    assert sexp[0] == b"pbcore_ghost_module_never_imported.Ghost"
    result = unjelly(sexp, taster)
    assert result.value == 42
    assert type(result) is ghost
    assert import_spy.names == []
    assert "pbcore_ghost_module_never_imported" not in sys.modules


def test_allowed_instance_without_attributes_round_trips() -> None:
    taster = SecurityOptions()
    taster.allowInstancesOf(Plain)
    empty = Plain.__new__(Plain)
    result = unjelly(jelly(empty, taster), taster)
    assert type(result) is Plain
    assert result.__dict__ == {}


# ---------------------------------------------------------------------------
# The copy-tag registry


class SelfBuilt:
    """Registered class that builds itself with unjellyFor."""

    value: Any
    invoker: Any

    def unjellyFor(self, unjellier: Unjellier, jellyList: list[Any]) -> SelfBuilt:
        self.value = unjellier.unjelly(jellyList[1])
        self.invoker = unjellier.invoker
        return self


class Bag:
    """Registered class with no hooks: its state becomes its __dict__."""


class WithSetState:
    received: Any

    def __setstate__(self, state: Any) -> None:
        self.received = ("set", state)


@pytest.mark.usefixtures("registry")
def test_registered_class_with_unjelly_for() -> None:
    setUnjellyableForClass("test.selfbuilt", SelfBuilt)
    sentinel = object()
    result = unjelly([b"test.selfbuilt", [b"list", [b"unicode", b"hi"]]], invoker=sentinel)
    assert type(result) is SelfBuilt
    assert result.value == ["hi"]
    assert result.invoker is sentinel


@pytest.mark.usefixtures("registry")
def test_registered_plain_class_gets_its_dict() -> None:
    setUnjellyableForClass(b"test.bag", Bag)
    result = unjelly([b"test.bag", jelly({"a": 1, "b": [2]})])
    assert type(result) is Bag
    assert result.__dict__ == {"a": 1, "b": [2]}
    with pytest.raises(JellyError, match="dictionary"):
        unjelly([b"test.bag", 5])
    with pytest.raises(JellyError, match="needs 1 item"):
        unjelly([b"test.bag", jelly({}), 5])


@pytest.mark.usefixtures("registry")
def test_registered_class_with_setstate() -> None:
    setUnjellyableForClass("test.setstate", WithSetState)
    result = unjelly([b"test.setstate", [b"tuple", 1, 2]])
    assert type(result) is WithSetState
    assert result.received == ("set", (1, 2))


@pytest.mark.usefixtures("registry")
def test_registration_allows_the_tag_in_global_security() -> None:
    with pytest.raises(InsecureJelly):
        unjelly([b"undotted", jelly({})])
    setUnjellyableForClass("undotted", Bag)
    assert globalSecurity.isTypeAllowed(b"undotted")
    assert type(unjelly([b"undotted", jelly({})])) is Bag
    # A taster of one's own is not changed by the registry.
    with pytest.raises(InsecureJelly):
        unjelly([b"undotted", [b"None"]], SecurityOptions())


@pytest.mark.usefixtures("registry")
def test_registering_by_class_uses_its_qualified_name() -> None:
    setUnjellyableForClass(Bag, Bag)
    assert qual(Bag).encode() in unjellyableRegistry
    assert type(unjelly([qual(Bag).encode(), jelly({})])) is Bag


@pytest.mark.usefixtures("registry")
def test_unjellyable_factory() -> None:
    received: list[Any] = []

    def factory(state: Any) -> Any:
        received.append(state)
        return ("made", state)

    setUnjellyableFactoryForClass("test.factory", factory)
    assert unjelly([b"test.factory", [b"list", 1, [b"unicode", b"x"]]]) == ("made", [1, "x"])
    assert received == [[1, "x"]]
    with pytest.raises(JellyError, match="needs 1 item"):
        unjelly([b"test.factory"])


@pytest.mark.usefixtures("registry")
def test_registry_function_handler() -> None:
    def handler(unjellier: Unjellier, expression: list[Any]) -> Any:
        return ("handled", expression[1:])

    setUnjellyableForClass("test.handler", handler)
    assert unjelly([b"test.handler", 1, 2]) == ("handled", [1, 2])


def make_tree_module() -> types.ModuleType:
    module = types.ModuleType("pbcore_test_tree")

    class Base:
        pass

    class Leaf(Base):
        pass

    class Other:
        pass

    module.Base = Base  # type: ignore[attr-defined]
    module.Leaf = Leaf  # type: ignore[attr-defined]
    module.Other = Other  # type: ignore[attr-defined]
    module.not_a_class = 5  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize(
    ("prefix", "tags"),
    [
        (None, [b"pbcore_test_tree.Base", b"pbcore_test_tree.Leaf"]),
        ("", [b"Base", b"Leaf"]),
        ("remote.tree", [b"remote.tree.Base", b"remote.tree.Leaf"]),
    ],
)
@pytest.mark.usefixtures("registry")
def test_register_class_tree(prefix: str | None, tags: list[bytes]) -> None:
    module = make_tree_module()
    before = set(unjellyableRegistry)
    if prefix is None:
        setUnjellyableForClassTree(module, module.Base)
    else:
        setUnjellyableForClassTree(module, module.Base, prefix)
    added = set(unjellyableRegistry) - before
    assert added == set(tags)
    base_tag, leaf_tag = tags
    assert unjellyableRegistry[base_tag] is module.Base
    assert unjellyableRegistry[leaf_tag] is module.Leaf
    result = unjelly([leaf_tag, jelly({"n": 1})])
    assert type(result) is module.Leaf
    assert result.n == 1


class Thing(Jellyable):
    def __init__(self, name: str) -> None:
        self.name = name


class RemoteThing(Unjellyable):
    name: str


@pytest.mark.usefixtures("registry")
def test_jellyable_round_trips_through_its_unjellyable() -> None:
    thing = Thing("widget")
    sexp = jelly(thing)
    assert sexp == [qual(Thing).encode(), [b"dictionary", [[b"unicode", b"name"], [b"unicode", b"widget"]]]]
    with pytest.raises(InsecureJelly, match="no class is registered"):
        unjelly(sexp)
    setUnjellyableForClass(Thing, RemoteThing)
    result = unjelly(sexp)
    assert type(result) is RemoteThing
    assert result.name == "widget"
    [wire] = decode(encode(sexp))
    assert unjelly(wire).name == "widget"


@pytest.mark.usefixtures("registry")
def test_unjellyable_checks_its_shape() -> None:
    setUnjellyableForClass("test.remotething", RemoteThing)
    with pytest.raises(JellyError, match="expected"):
        unjelly([b"test.remotething", 1, 2])


@pytest.mark.usefixtures("registry")
def test_shared_jellyable_uses_references() -> None:
    setUnjellyableForClass(Thing, RemoteThing)
    thing = Thing("once")
    sexp: Any = jelly([thing, thing])
    assert isinstance(sexp, list)
    assert sexp[1][0] == b"reference"
    assert sexp[2] == [b"dereference", sexp[1][1]]
    result = unjelly(sexp)
    assert result[0] is result[1]
    assert result[0].name == "once"


@pytest.mark.usefixtures("registry")
def test_cyclic_jellyable() -> None:
    setUnjellyableForClass(Thing, RemoteThing)
    thing = Thing("loop")
    thing.me = thing  # type: ignore[attr-defined]
    result = unjelly(jelly(thing))
    assert type(result) is RemoteThing
    assert result.me is result  # type: ignore[attr-defined]


class Hooked(Unjellyable):
    log: list[str] = []  # noqa: RUF012 - shared on purpose: the hooks report here

    def setStateFor(self, unjellier: Unjellier, state: Any) -> None:
        super().setStateFor(unjellier, state)
        Hooked.log.append(f"built {self.name}")  # type: ignore[attr-defined]

    def postUnjelly(self) -> None:
        Hooked.log.append(f"post {self.name}")  # type: ignore[attr-defined]


@pytest.mark.usefixtures("registry")
def test_post_unjelly_runs_after_the_whole_expression() -> None:
    setUnjellyableForClass("test.hooked", Hooked)
    Hooked.log = []
    state_a = jelly({"name": "a"})
    state_b = jelly({"name": "b"})
    result = unjelly([b"list", [b"test.hooked", state_a], [b"list", [b"test.hooked", state_b]]])
    assert Hooked.log == ["built a", "built b", "post a", "post b"]
    assert [type(result[0]), type(result[1][0])] == [Hooked, Hooked]
    # A bare Unjellier.unjelly() does not run them; unjellyFull() does.
    Hooked.log = []
    unjellier = Unjellier()
    unjellier.unjelly([b"test.hooked", state_a])
    assert Hooked.log == ["built a"]


class InvokerAware(Jellyable):
    seen: list[Any] = []  # noqa: RUF012 - shared on purpose

    def getStateFor(self, jellier: Jellier) -> Any:
        InvokerAware.seen.append(jellier.invoker)
        return {"v": 1}


@pytest.mark.usefixtures("registry")
def test_invoker_is_visible_both_ways() -> None:
    InvokerAware.seen = []
    setUnjellyableForClass(InvokerAware, SelfBuilt)
    sender, receiver = object(), object()
    sexp = jelly([InvokerAware()], invoker=sender)
    assert InvokerAware.seen == [sender]
    [result] = unjelly(sexp, invoker=receiver)
    assert type(result) is SelfBuilt
    assert result.invoker is receiver
    assert result.value == {"v": 1}
    jelly(InvokerAware())
    assert InvokerAware.seen == [sender, None]


@pytest.mark.usefixtures("registry")
def test_handlers_take_precedence() -> None:
    calls: list[tuple[Any, list[Any]]] = []

    def remote(unjellier: Unjellier, expression: list[Any]) -> Any:
        calls.append((unjellier.invoker, expression))
        return ("remote", expression[1])

    with pytest.raises(InsecureJelly):
        unjelly([b"remote", 5])
    invoker = object()
    handlers = {b"remote": remote, b"test.selfbuilt": remote, b"list": remote}
    assert unjelly([b"remote", 5], invoker=invoker, handlers=handlers) == ("remote", 5)
    assert calls == [(invoker, [b"remote", 5])]
    # Over the registry ...
    setUnjellyableForClass("test.selfbuilt", SelfBuilt)
    assert unjelly([b"test.selfbuilt", 6], handlers=handlers) == ("remote", 6)
    assert type(unjelly([b"test.selfbuilt", 6])) is SelfBuilt
    # ... and even over the built-in forms and the security options.
    assert unjelly([b"list", 7], SecurityOptions(), handlers=handlers) == ("remote", 7)
    # Nested forms reach the handler too.
    assert unjelly([b"tuple", [b"remote", 8]], handlers={b"remote": remote}) == (("remote", 8),)


def test_restored_registry_undoes_registrations() -> None:
    with restored_registry():
        setUnjellyableForClass("test.temporary", Bag)
        setUnjellyableFactoryForClass("test.temporary_factory", dict)
        assert b"test.temporary" in unjellyableRegistry
        assert b"test.temporary_factory" in unjellyableFactoryRegistry
        assert b"test.temporary" in globalSecurity.allowedTypes
    assert b"test.temporary" not in unjellyableRegistry
    assert b"test.temporary_factory" not in unjellyableFactoryRegistry
    assert b"test.temporary" not in globalSecurity.allowedTypes
    assert globalSecurity.isTypeAllowed(b"list")
    # and nothing registered by the tests above leaked
    assert not any(tag.startswith(b"test.") for tag in unjellyableRegistry)
    assert b"undotted" not in globalSecurity.allowedTypes
    assert pbcore.jelly.unjellyableRegistry is unjellyableRegistry


@settings(max_examples=30)
@given(trees())
def test_round_trip_with_registered_tags_present(value: Any) -> None:
    # Registrations do not disturb the built-in forms.
    with restored_registry():
        setUnjellyableForClass("list.extra", Bag)
        assert same_structure(unjelly(jelly(value)), value)


# -- flat_value: the unjellier-free path for the commonest values -----------------------------

_flat_atom = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.binary(max_size=6),
    st.sampled_from([[b"None"], [b"None", b"x"], [b"boolean", b"true"], [b"boolean", b"false"], [b"boolean", b"yes"]]),
    st.lists(st.sampled_from([b"unicode", b"None", b"tuple", b"boolean"]), min_size=1, max_size=1)
    .flatmap(lambda head: st.tuples(st.just(head[0]), st.binary(max_size=4) | st.text(max_size=3).map(str.encode)))
    .map(list),
)
_flat_sexp = st.recursive(
    _flat_atom,
    lambda inner: st.one_of(
        st.tuples(st.sampled_from([b"tuple", b"list", b"set", b"unicode", b"x.Y"]), st.lists(inner, max_size=5)).map(
            lambda t: [t[0], *t[1]]
        ),
        st.lists(st.lists(inner, min_size=1, max_size=3), max_size=5).map(lambda pairs: [b"dictionary", *pairs]),
    ),
    max_leaves=12,
)


def _unjellied(sexp: Any, taster: SecurityOptions, limits: Limits) -> tuple[str, Any]:
    try:
        return "value", Unjellier(taster, limits=limits).unjellyFull(sexp)
    except ProtocolError as error:
        return "error", type(error)


@given(_flat_sexp, st.integers(1, 3), st.integers(1, 3))
def test_flat_value_is_what_the_unjellier_gives_or_not_flat(sexp: Any, depth: int, collisions: int) -> None:
    limits = Limits(max_depth=depth, max_hash_collisions=collisions)
    got = pbcore.jelly.flat_value(sexp, pbcore.jelly.globalSecurity, limits)
    outcome, expected = _unjellied(sexp, pbcore.jelly.globalSecurity, limits)
    if got is pbcore.jelly.NOT_FLAT:
        return
    assert outcome == "value"  # never a value where the general way refuses
    assert type(got) is type(expected)
    assert same_structure(got, expected)


_common_atom = st.one_of(
    st.integers(-(2**40), 2**40), st.binary(max_size=8), st.text(max_size=8), st.none(), st.booleans()
)


@given(_common_atom.flatmap(lambda a: st.sampled_from([a, (a, a), [a], {a: a}, {"k": [a, a]}, [{"k": a}]])))
def test_flat_value_takes_the_common_shapes(value: Any) -> None:
    sexp = pbcore.jelly.jelly(value)
    got = pbcore.jelly.flat_value(sexp, pbcore.jelly.globalSecurity)
    assert got is not pbcore.jelly.NOT_FLAT
    assert same_structure(got, value)


def test_flat_value_leaves_what_it_cannot_vouch_for() -> None:
    flat = pbcore.jelly.flat_value
    not_flat = pbcore.jelly.NOT_FLAT
    strict = SecurityOptions()  # no containers allowed: the general way refuses
    assert flat([b"tuple", 1], strict) is not_flat
    with pytest.raises(InsecureJelly):
        Unjellier(strict).unjellyFull([b"tuple", 1])

    class Picky(SecurityOptions):
        def isTypeAllowed(self, typeName: str | bytes) -> bool:
            return False

    assert flat([b"tuple", 1], Picky()) is not_flat
    # Keys that could collide are counted by the general way (pbcore.keys.Collisions).
    limits = Limits(max_hash_collisions=2)
    assert flat([b"dictionary", [1, 1], [2, 2]], pbcore.jelly.globalSecurity, limits) == {1: 1, 2: 2}
    assert flat([b"dictionary", [1, 1], [2, 2], [3, 3]], pbcore.jelly.globalSecurity, limits) is not_flat
    assert flat([b"unicode", b"\xff"], pbcore.jelly.globalSecurity) is not_flat  # the general way says why
    assert flat([b"list", [b"list", [b"tuple"]]], pbcore.jelly.globalSecurity) == [[()]]
    assert flat([b"list", [b"list", [b"list", [b"tuple"]]]], pbcore.jelly.globalSecurity) is not_flat  # 4 deep
    assert flat([b"list", [b"list"]], pbcore.jelly.globalSecurity, Limits(max_depth=1)) is not_flat
    assert flat([b"dictionary", [[b"tuple"], 1]], pbcore.jelly.globalSecurity) is not_flat  # a key to meter
    assert flat("text", pbcore.jelly.globalSecurity) is not_flat  # type: ignore[arg-type]  # not an s-expression


def test_a_plain_reader_sees_the_allowed_types_as_they_are_now() -> None:
    # A broker makes its reader once; the security options' table may change afterwards.
    options = SecurityOptions()
    options.allowBasicTypes()
    read = pbcore.jelly.plain_reader(options, Limits(max_depth=2))
    assert read([b"tuple", 1, [b"list"]]) == (1, [])
    assert read([b"tuple", [b"list", [b"list"]]]) is pbcore.jelly.NOT_FLAT  # two levels: Limits.max_depth
    del options.allowedTypes[b"tuple"]
    assert read([b"tuple", 1]) is pbcore.jelly.NOT_FLAT
    assert read(7) == 7 and read("text") is pbcore.jelly.NOT_FLAT  # type: ignore[arg-type]


class _BadHash:
    """A copy class whose __hash__ fails as application code may: not with TypeError."""

    def __hash__(self) -> int:
        raise ValueError("no hash for you")


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize(
    "container",
    [
        lambda bad: [b"dictionary", [bad, 1]],
        lambda bad: [b"set", bad],
        lambda bad: [b"frozenset", bad],
        lambda bad: [b"dictionary", [[b"reference", 1, bad], 1], [[b"dereference", 1], 2]],
    ],
)
def test_a_key_whose_class_cannot_hash_refuses_the_value_not_the_connection(container: Any) -> None:
    setUnjellyableForClass("test.badhash", _BadHash)
    sexp = container([b"test.badhash", [b"dictionary"]])
    with pytest.raises(JellyError, match="cannot be hashed or compared: ValueError: no hash for you") as caught:
        Unjellier().unjellyFull(sexp)
    assert isinstance(caught.value.__cause__, ValueError)
