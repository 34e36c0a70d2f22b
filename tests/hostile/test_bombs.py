"""The attack suite's own tools, checked at sizes where expanding is cheap.

If a generator built something else than it says (a laughs that does not
double, keys that do not collide, a deep key that is shallow), the attack
tests would pass against an undefended server for the wrong reason.
"""

from __future__ import annotations

from typing import Any

import pytest

from pbcore import banana
from pbcore.errors import JellyError
from pbcore.flavors import CopiedFailure
from pbcore.jelly import unjelly

from . import bombs
from .wire import HostileServer, RawPeer, capture, error_summary, failure_fields, preview


def _leaves(value: Any) -> int:
    if isinstance(value, (tuple, list, set, frozenset)):
        return sum(_leaves(item) for item in value)
    if isinstance(value, dict):
        return sum(_leaves(item) for item in value.values())
    return 1


@pytest.mark.parametrize("container", ["tuple", "list", "dictionary"])
@pytest.mark.parametrize("nested", [False, True])
def test_laughs_doubles_per_level(container: bombs.Container, nested: bool) -> None:
    for depth in (1, 2, 5, 9):
        sexp = bombs.laughs(depth, container=container, nested=nested)
        assert _leaves(unjelly(sexp)) == bombs.leaves(depth, nested=nested)
    # ...while the message grows by a constant per level.
    sizes = [bombs.size(bombs.laughs(depth, container=container, nested=nested)) for depth in (10, 20, 30)]
    assert sizes[2] - sizes[1] == sizes[1] - sizes[0] <= 10 * 40  # at most 40 bytes a level


def test_laughs_stays_shared() -> None:
    top = unjelly(bombs.laughs(6, nested=True))
    assert top[0][0] is top[0][1]  # one object, referenced twice: the expansion is never built


def test_sibling_laughs_fits_under_the_default_limits() -> None:
    sexp = bombs.laughs(200)
    data = banana.encode(bombs.call(1, b"root", b"login", bombs.args(bombs.dict_key_bomb(200))))
    assert len(data) < 5000
    message: Any = banana.decode(data)[0]
    assert message[5][1][1][0] == sexp  # decodes with the default limits (depth included)


def test_hash_bombs_hash_their_laughs() -> None:
    key = unjelly(bombs.laughs(8))
    assert list(unjelly(bombs.dict_key_bomb(8))) == [key]
    assert unjelly(bombs.set_bomb(8)) == {key}
    assert unjelly(bombs.frozenset_bomb(8)) == frozenset({key})
    pair = unjelly(bombs.equal_pair_bomb(8))
    assert len(pair) == 1  # the two are equal...
    pieces = bombs.equal_pair_bomb(3)
    first, second = unjelly(pieces[1]), unjelly(pieces[2])
    assert first == second and first[-1] is not second[-1]  # ...and distinct at every level


def test_failure_bomb_is_a_failure_copy() -> None:
    copied = unjelly(bombs.failure_bomb(3))
    assert isinstance(copied, CopiedFailure)
    assert copied.remoteType == "builtins.ValueError"
    assert copied.parents == ["builtins.ValueError"]
    fields = failure_fields(bombs.failure_bomb(3))
    assert fields["tag"] == bombs.FAILURE_TAG.decode() and fields["type"] == "builtins.ValueError"


def test_colliding_keys_hash_alike() -> None:
    keys = bombs.colliding_ints(50)
    assert len(set(keys)) == 50 and {hash(k) for k in keys} == {0}
    pairs = unjelly(bombs.collision_tuples(50))
    assert len(pairs) == 50 and len({hash(pair) for pair in pairs}) == 1
    assert len(unjelly(bombs.collision_dict(50))) == len(unjelly(bombs.collision_set(50))) == 50


def test_deep_key_is_deep_through_shallow_definitions() -> None:
    sexp = bombs.deep_key(300)
    # The message is a few lists deep...
    assert banana.decode(banana.encode(sexp))[0] == sexp
    # ...the key is 300 tuples deep (unjelly today builds it; a defence may refuse it).
    try:
        value = unjelly(sexp)
    except JellyError:
        return
    (key,) = (k for k in value if k != 0)
    depth = 0
    while isinstance(key, tuple):
        key, depth = key[0], depth + 1
    assert depth == 300


def test_messages() -> None:
    assert bombs.call(3, b"root", b"login", bombs.args(b"x")) == [
        b"message",
        3,
        b"root",
        b"login",
        1,
        [b"tuple", b"x"],
        [b"dictionary"],
    ]
    assert bombs.answer(2, 5) == [b"answer", 2, 5]
    assert bombs.error(2, 5) == [b"error", 2, 5]
    assert bombs.kwargs(a=1) == [b"dictionary", [[b"unicode", b"a"], 1]]


def test_preview_is_bounded() -> None:
    text = preview(bombs.collision_set(10_000), 100)
    assert len(text) <= 103
    assert error_summary(bombs.failure(bombs.text("boom")))[1] == "boom"


def test_raw_peer_against_the_hostile_server() -> None:
    """The two raw peers speak PB to each other: handshake, a call, its reply."""
    with (
        HostileServer(lambda request: bombs.answer(request, [b"tuple", 7])) as server,
        RawPeer.connect("127.0.0.1", server.port, timeout=5.0) as peer,
    ):
        reply = peer.call(b"root", b"echo", bombs.args(1), timeout=5.0)
    assert reply.kind == "answer" and reply.body == [b"tuple", 7]


def test_capture_decodes() -> None:
    data = capture([bombs.answer(1, 2)])
    expressions = banana.decode(data)
    assert expressions == [[b"pb", b"none"], [b"version", 6], [b"answer", 1, 2]]
