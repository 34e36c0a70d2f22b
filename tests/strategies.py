"""Hypothesis strategies for jelly values and Banana s-expressions, and a
structural comparison that understands sharing and cycles.

Plain ``==`` is no use for these values: it recurses forever on a cycle and
cannot tell a shared list from two equal ones. :func:`same_structure` walks
both values together and requires the same shape of sharing on both sides.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st

# Banana carries ints below 2**448 in magnitude (64 bytes of 7-bit prefix).
BANANA_INT_LIMIT = 2 ** (7 * 64)

banana_ints = st.one_of(
    st.integers(-(2**40), 2**40),
    st.integers(-(BANANA_INT_LIMIT - 1), BANANA_INT_LIMIT - 1),
    st.sampled_from([0, 127, 128, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, BANANA_INT_LIMIT - 1]),
)
floats = st.floats(allow_nan=True, allow_infinity=True)
small_bytes = st.binary(max_size=40) | st.sampled_from([b"None", b"list", b"tuple", b"dictionary", b"reference"])

naive_datetimes = st.datetimes()
naive_times = st.times()
finite_decimals = st.decimals(allow_nan=False, allow_infinity=False, places=None)


def atoms() -> st.SearchStrategy[Any]:
    """Values jelly sends without containers."""
    return st.one_of(
        st.none(),
        st.booleans(),
        banana_ints,
        floats,
        small_bytes,
        st.text(max_size=20),
        naive_datetimes,
        st.dates(),
        naive_times,
        st.timedeltas(),
        finite_decimals,
    )


def hashables() -> st.SearchStrategy[Any]:
    """Hashable values: atoms and tuples/frozensets of them."""
    base = st.one_of(st.none(), st.booleans(), banana_ints, small_bytes, st.text(max_size=10), st.dates())
    return st.recursive(
        base,
        lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
        max_leaves=6,
    )


def trees() -> st.SearchStrategy[Any]:
    """Nested lists, tuples, dicts, sets and frozensets of atoms (no sharing yet)."""
    return st.recursive(
        atoms(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=5),
            st.lists(inner, max_size=4).map(tuple),
            st.dictionaries(hashables(), inner, max_size=4),
            st.sets(hashables(), max_size=4),
            st.frozensets(hashables(), max_size=4),
        ),
        max_leaves=20,
    )


@st.composite
def shared_and_cyclic(draw: st.DrawFn) -> Any:
    """A structure in which containers appear more than once, possibly inside themselves.

    Builds a few mutable "nodes" (lists and dicts), then fills each with a mix
    of atoms, trees, other nodes and tuples holding nodes, so both plain
    sharing and cycles (including cycles through tuples) come out.
    """
    count = draw(st.integers(1, 4))
    nodes: list[Any] = [draw(st.sampled_from([list, dict]))() for _ in range(count)]
    tuples: list[tuple[Any, ...]] = []

    def part() -> Any:
        choice = draw(st.integers(0, 4))
        if choice == 0:
            return draw(atoms())
        if choice == 1:
            return draw(trees())
        if choice == 2:
            return draw(st.sampled_from(nodes))
        if choice == 3 and tuples:
            return draw(st.sampled_from(tuples))
        made = (draw(st.sampled_from(nodes)), draw(atoms()))
        tuples.append(made)
        return made

    for node in nodes:
        for index in range(draw(st.integers(0, 4))):
            if isinstance(node, list):
                node.append(part())
            else:
                node[f"k{index}"] = part()
    root = draw(st.sampled_from(nodes + tuples)) if draw(st.booleans()) else [part() for _ in range(3)]
    return root


def values() -> st.SearchStrategy[Any]:
    """Everything jelly can carry: atoms, trees, shared and cyclic structures."""
    return st.one_of(atoms(), trees(), shared_and_cyclic())


def sexps(max_leaves: int = 30) -> st.SearchStrategy[Any]:
    """Raw Banana s-expressions: nested lists of ints, floats and byte strings."""
    leaf = st.one_of(banana_ints, floats, small_bytes, st.binary(min_size=100, max_size=3000))
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=6), max_leaves=max_leaves)


def same_structure(left: Any, right: Any) -> bool:
    """True when *left* and *right* are equal values with the same sharing.

    Containers are matched by identity as they are walked: a container met
    again on one side must be met again, as the same partner, on the other.
    Floats compare bit for bit (so NaN equals NaN, and -0.0 differs from 0.0).
    """
    pairs: dict[int, int] = {}
    reverse: dict[int, int] = {}
    keep: list[Any] = []

    def walk(a: Any, b: Any) -> bool:
        if type(a) is not type(b):
            return False
        if isinstance(a, float):
            return math.copysign(1, a) == math.copysign(1, b) and (a == b or (math.isnan(a) and math.isnan(b)))
        if not isinstance(a, (list, tuple, dict, set, frozenset)):
            return bool(a == b)
        if id(a) in pairs or id(b) in reverse:
            return pairs.get(id(a)) == id(b) and reverse.get(id(b)) == id(a)
        pairs[id(a)] = id(b)
        reverse[id(b)] = id(a)
        keep.extend((a, b))
        if len(a) != len(b):
            return False
        if isinstance(a, (list, tuple)):
            return all(walk(x, y) for x, y in zip(a, b, strict=True))
        if isinstance(a, dict):
            # Keys are hashable values, so ordinary equality finds the partner.
            return all(key in b and walk(value, b[key]) for key, value in a.items())
        return bool(a == b)

    return walk(left, right)


def plain_atoms(*extra: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The atoms of plain values (pbcore.codec's and pbcore.jelly's fast paths), with vocabulary words, and *extra*."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**80), 2**80),
        st.floats(allow_nan=True),
        st.binary(max_size=12) | st.sampled_from([b"None", b"tuple", b""]),
        st.text(max_size=12) | st.sampled_from(["None", "list"]),
        *extra,
    )


def plain_values(atoms: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Containers of *atoms* nested a few deep, some holding a container twice or themselves (no longer plain)."""

    def cycle(_: Any) -> list[Any]:
        box: list[Any] = [1]
        box.append(box)
        return box

    keys = atoms.filter(lambda v: not (isinstance(v, float) and math.isnan(v)))  # NaN keys never compare equal
    return st.recursive(
        atoms,
        lambda inner: st.one_of(
            st.lists(inner, max_size=8),
            st.lists(inner, max_size=8).map(tuple),
            st.dictionaries(keys, inner, max_size=6),
            st.frozensets(st.integers(0, 99), max_size=4),
            inner.map(lambda v: [v, v]),
            st.just(None).map(cycle),
        ),
        max_leaves=16,
    )
