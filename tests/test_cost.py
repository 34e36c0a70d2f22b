"""What a peer's well-formed but expensive values cost: keys, collisions, text (issue 9).

Every test here would take minutes, hours or a crash without the defence it
covers (pbcore.keys, the tuple depth check in pbcore.jelly, pbcore.preview):
the bombs are a few hundred bytes that expand to 2**40 items or more.
"""

from __future__ import annotations

import logging
import tracemalloc
from typing import Any

import pytest

from pbcore import banana
from pbcore.banana import Limits
from pbcore.budget import MemoryBudget, OverBudget
from pbcore.errors import BananaError, JellyError
from pbcore.flavors import Cacheable, CopiedFailure, CopyableFailure, RemoteCache, Root
from pbcore.isolation import describe
from pbcore.jelly import jelly, qual, setUnjellyableForClass
from pbcore.jelly import unjelly as _unjelly
from pbcore.keys import KEY_WORK_SLACK, KeyMeter
from pbcore.preview import error_text, preview
from pbcore.serving import Dispatcher
from pbcore.testing import BrokerPair

P = 2**61 - 1  # hash(k * P) == 0 for every int k


def unjelly(sexp: Any, limits: Limits = Limits()) -> Any:
    """pbcore.jelly.unjelly of a hand-made expression (typed loosely: these are a peer's)."""
    return _unjelly(sexp, limits=limits)


def laughs(depth: int, first: int = 1) -> tuple[list[Any], int]:
    """Sibling definitions of tuples t_i = (t_{i-1}, t_{i-1}): t_depth has 2**depth leaves.

    Returns the definitions (to put in a list form) and the reference number of the last.
    """
    items: list[Any] = [[b"reference", first, [b"tuple", 1, 2]]]
    for ref in range(first + 1, first + depth):
        items.append([b"reference", ref, [b"tuple", [b"dereference", ref - 1], [b"dereference", ref - 1]]])
    return items, first + depth - 1


def with_laughs(depth: int, use: Any) -> list[Any]:
    """``[list, definitions..., use(last)]``: the bomb defined, then used as *use* says."""
    items, last = laughs(depth)
    return [b"list", *items, use([b"dereference", last])]


# -- keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "use",
    [
        pytest.param(lambda bomb: [b"dictionary", [bomb, 1]], id="dict-key"),
        pytest.param(lambda bomb: [b"set", bomb], id="set-member"),
        pytest.param(lambda bomb: [b"frozenset", bomb], id="frozenset-member"),
        pytest.param(lambda bomb: [b"tuple", [b"set", bomb]], id="nested-set"),
    ],
)
@pytest.mark.parametrize("depth", [24, 60, 99])
def test_a_shared_reference_bomb_used_as_a_key_is_refused(use: Any, depth: int) -> None:
    sexp = with_laughs(depth, use)
    assert len(banana.encode(sexp)) < 3000
    with pytest.raises(JellyError, match="keys of this message expand to more than"):
        unjelly(sexp)


def test_two_equal_bombs_in_one_set_are_refused_before_they_are_compared() -> None:
    # Equal hashes, distinct objects: comparing them would walk both expanded.
    first, one = laughs(40, first=1)
    second, two = laughs(40, first=100)
    sexp = [b"list", *first, *second, [b"set", [b"dereference", one], [b"dereference", two]]]
    with pytest.raises(JellyError, match="expand to more than"):
        unjelly(sexp)


def test_the_same_bomb_unused_as_a_key_is_fine() -> None:
    # Holding a shared structure costs its size on the wire; only walking it expanded is refused.
    value = unjelly(with_laughs(60, lambda bomb: [b"list", bomb]))
    leaf = value[-1][0]
    for _ in range(59):
        assert leaf[0] is leaf[1]
        leaf = leaf[0]
    assert leaf == (1, 2)


def test_shared_keys_within_the_budget_are_accepted() -> None:
    # One tuple key in 5,000 dictionaries: what Twisted sends for [{("a", ...): i} for i in ...],
    # where the key is a constant of the sender's code, one object.
    key = [b"tuple", *[[b"unicode", b"field%d" % index] for index in range(12)]]
    dicts = [[b"dictionary", [[b"dereference", 1], index]] for index in range(5000)]
    value = unjelly([b"list", [b"reference", 1, key], *dicts])
    assert len(value) == 5001 and all(next(iter(d.values())) == i for i, d in enumerate(value[1:]))


def test_the_key_budget_grows_with_the_message() -> None:
    key: Any = (1, 2)
    for _ in range(14):
        key = (key, key)  # 2**16 - 1 items expanded, 15 distinct tuples
    meter = KeyMeter(Limits(), message_items=0)
    meter.charge(key)  # the slack alone covers one such key
    assert meter.spent == 2**16 - 1
    with pytest.raises(JellyError):
        meter.charge(key)
    KeyMeter(Limits(), message_items=2**13).charge(key)  # a bigger message may hash more


def test_the_absolute_key_budget_holds_however_large_the_message() -> None:
    meter = KeyMeter(Limits(max_key_items=KEY_WORK_SLACK), message_items=10**9)
    with pytest.raises(JellyError, match=f"more than {KEY_WORK_SLACK} items"):
        meter.charge(tuple(range(KEY_WORK_SLACK)))


def test_the_expanded_size_is_memoized_so_measuring_is_linear() -> None:
    meter = KeyMeter(Limits(max_key_items=10**30), message_items=10**30)
    key: Any = ()
    for _ in range(90):
        key = (key, key)
    meter.charge(key)  # 2**91 items: counted, not walked
    assert meter.spent == 2**91 - 1


# -- depth ------------------------------------------------------------------------------


def deep_tuples(depth: int) -> list[Any]:
    """A tuple *depth* deep, each level defined as a sibling: the message itself is shallow."""
    items: list[Any] = [[b"reference", 1, [b"tuple"]]]
    items += [[b"reference", ref, [b"tuple", [b"dereference", ref - 1]]] for ref in range(2, depth + 1)]
    return [b"list", *items, [b"dictionary", [[b"dereference", depth], 1]]]


def test_a_tuple_nested_deep_through_references_is_refused_before_it_is_hashed() -> None:
    # CPython hashes tuples recursively without a guard: hashing this one would crash the process.
    with pytest.raises(JellyError, match="tuples nested deeper than the limit of 100"):
        unjelly(deep_tuples(100_000))


def test_tuples_nested_to_the_depth_limit_through_references_are_accepted() -> None:
    value = unjelly(deep_tuples(99))
    assert len(value) == 100
    with pytest.raises(JellyError):
        unjelly(deep_tuples(101))


# -- collisions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "entry"),
    [
        pytest.param(b"dictionary", lambda key: [key, 0], id="dict"),
        pytest.param(b"set", lambda key: key, id="set"),
        pytest.param(b"frozenset", lambda key: key, id="frozenset"),
    ],
)
def test_keys_that_all_hash_alike_are_refused_past_the_limit(form: bytes, entry: Any) -> None:
    limit = Limits().max_hash_collisions
    accepted = unjelly([form, *[entry(k * P) for k in range(1, limit + 1)]])
    assert len(accepted) == limit
    with pytest.raises(JellyError, match=f"more than {limit} keys of one .* have the same hash"):
        unjelly([form, *[entry(k * P) for k in range(1, 100_001)]])


def test_colliding_tuple_and_float_keys_are_counted_too() -> None:
    limit = Limits().max_hash_collisions
    with pytest.raises(JellyError, match="same hash"):
        unjelly([b"dictionary", *[[[b"tuple", k * P], 0] for k in range(1, 2 * limit)]])
    # Floats hash as the rational they are, modulo P: 2.0 ** (61 * k) all hash to 1.
    floats = [2.0 ** (61 * k) for k in range(16)]
    assert len({hash(f) for f in floats}) == 1
    with pytest.raises(JellyError, match="same hash"):
        unjelly([b"set", *floats], limits=Limits(max_hash_collisions=8))


def test_many_distinct_int_keys_are_accepted() -> None:
    value = unjelly([b"dictionary", *[[k, k] for k in range(100_000)]])
    assert len(value) == 100_000 and value[99_999] == 99_999


def test_text_keys_are_not_counted() -> None:
    # str hashes are salted per process: a peer cannot aim them, and they are most keys.
    limit = Limits(max_hash_collisions=1)
    value = unjelly([b"dictionary", *[[[b"unicode", b"k%d" % k], k] for k in range(1000)]], limits=limit)
    assert len(value) == 1000


def test_the_collision_limit_is_per_container() -> None:
    limit = Limits().max_hash_collisions
    one = [b"set", *[k * P for k in range(1, limit + 1)]]
    assert len(unjelly([b"list", one, one, one])) == 3


# -- text -------------------------------------------------------------------------------


def bomb(depth: int = 80) -> Any:
    value: Any = ("leaf",)
    for _ in range(depth):
        value = (value, [value, {"k": value}])
    return value


def test_a_preview_is_bounded_whatever_the_value() -> None:
    text = preview(bomb(), 300)
    assert len(text) <= 303 and text.endswith("...")
    assert text.startswith("((((")


def test_a_preview_of_a_small_value_is_its_repr() -> None:
    value = {"a": [1, 2.5, None, True, b"x"], "b": (1,), "c": frozenset(), "d": set()}
    assert preview(value, 10_000) == repr(value)


def test_a_preview_shows_other_objects_by_type_and_cuts_long_strings() -> None:
    class Secretive:
        def __repr__(self) -> str:
            raise AssertionError("a preview never calls an object's own repr")

    class Bare:
        __slots__ = ()

    thing = Secretive()
    thing.field = [1, "two"]  # type: ignore[attr-defined]
    assert preview([thing]) == f"[{Secretive.__qualname__}(field=[1, 'two'])]"
    assert preview(Bare()) == f"<{__name__}.{Bare.__qualname__} object>"
    assert preview("x" * 10**7, 50) == "'" + "x" * 49 + "..."


def test_error_text_does_not_render_a_value_argument_whole() -> None:
    assert len(error_text(ValueError(bomb()), 500)) <= 503
    assert len(error_text(KeyError(bomb()), 500)) <= 503
    assert error_text(ValueError("plain message")) == "plain message"
    assert error_text(KeyError("k")) == "'k'"
    assert error_text(OSError(2, "No such file")) == "[Errno 2] No such file"


def test_describe_keeps_the_traceback_and_bounds_the_text() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise ValueError(bomb()) from inner
    except ValueError as error:
        text = describe(error)
    assert text.count("Traceback (most recent call last):") == 2
    assert "The above exception was the direct cause of the following exception:" in text
    assert "KeyError: 'inner'" in text
    assert "test_describe_keeps_the_traceback" in text
    assert len(text) < 10_000


def test_a_failure_whose_value_is_a_bomb_becomes_bounded_text() -> None:
    # The state a hostile peer sends for a CopyableFailure: its value a shared structure.
    items, last = laughs(80)
    failure = [
        b"twisted.spread.pb.CopyableFailure",
        [
            b"dictionary",
            [[b"unicode", b"type"], b"exceptions.ValueError"],
            [[b"unicode", b"value"], [b"list", *items, [b"dereference", last]]],
            [[b"unicode", b"parents"], [b"list", [b"list", [b"dereference", last]]]],
        ],
    ]
    value = unjelly(failure)
    assert isinstance(value, CopiedFailure)
    assert value.type == "exceptions.ValueError"
    assert 100 < len(str(value)) < 5000
    assert len(value.parents[0]) < 5000


def test_a_local_exception_holding_a_bomb_is_sent_with_bounded_text() -> None:
    state = CopyableFailure(ValueError(bomb()), unsafeTracebacks=True).getStateToCopy()
    assert len(state["value"]) < 3000


# -- through a broker -------------------------------------------------------------------


class Echo(Root):
    def remote_echo(self, value: Any) -> Any:
        return value

    def remote_fail(self, value: Any) -> None:
        raise ValueError(value)


def raw_exchange(pair: BrokerPair, message: list[Any]) -> list[Any]:
    """Send *message* to the server as a hostile peer would (hand-made), run it, return what it sends back."""
    pair.server.receive_data(banana.encode(message))
    Dispatcher(pair.server, pair.driver.spawn_call).dispatch(pair.server.events())
    pair.driver.run_ready()
    return banana.decode(pair.server.data_to_send())


def call_message(request_id: int, method: bytes, arg: Any) -> list[Any]:
    return [b"message", request_id, b"root", method, 1, [b"tuple", arg], [b"dictionary"]]


@pytest.mark.parametrize(
    "use",
    [
        pytest.param(lambda bomb: [b"set", bomb], id="set-member"),
        pytest.param(lambda bomb: [b"dictionary", [bomb, 0]], id="dict-key"),
    ],
)
def test_a_bomb_in_a_call_is_an_error_answer_and_the_connection_lives_on(use: Any) -> None:
    pair = BrokerPair(server_root=Echo())
    (answer,) = raw_exchange(pair, call_message(7, b"echo", with_laughs(80, use)))
    assert answer[:2] == [b"error", 7]
    assert not pair.server.closed
    assert pair.run(pair.client.root().callRemote("echo", "still here")) == "still here"


def test_an_application_error_holding_a_peer_value_is_answered_and_logged_briefly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pair = BrokerPair(server_root=Echo())
    with caplog.at_level(logging.ERROR, logger="pbcore"):
        # The argument arrives shared (2**80 leaves); the method raises ValueError(argument).
        (answer,) = raw_exchange(pair, call_message(7, b"fail", with_laughs(80, lambda bomb: [b"list", bomb])))
    assert answer[:2] == [b"error", 7]
    assert len(banana.encode(answer)) < 10_000
    assert "ValueError" in caplog.text and len(caplog.text) < 20_000
    assert pair.run(pair.client.root().callRemote("echo", 1)) == 1


def test_a_bomb_answer_fails_the_call_and_a_bomb_failure_is_bounded() -> None:
    pair = BrokerPair(server_root=Echo())
    root = pair.client.root()
    answers: list[list[Any]] = [
        [b"answer", None, with_laughs(80, lambda bomb: [b"set", bomb])],
        [b"error", None, with_laughs(80, lambda bomb: [b"list", bomb])],
    ]
    for answer in answers:
        pending = root.callRemote("echo", 1)
        pair.client.data_to_send()  # the call never reaches the server: a hostile one answers
        answer[1] = pair.client._next_request
        pair.client.receive_data(banana.encode(answer))
        with pytest.raises(Exception) as raised:
            pending.unwrap()
        assert len(str(raised.value)) < 5000
        assert not pair.client.closed


# -- tables the peer fills ----------------------------------------------------------------


class Counter(Cacheable):
    def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> dict[str, Any]:
        return {}


class CounterCopy(RemoteCache):
    pass


setUnjellyableForClass(qual(Counter), CounterCopy)


class Caches(Root):
    def remote_many(self, count: int) -> list[Counter]:
        return [Counter() for _ in range(count)]


def test_the_caches_a_peer_makes_this_side_hold_are_bounded() -> None:
    pair = BrokerPair(server_root=Caches(), limits=Limits(max_caches=5))
    root = pair.client.root()
    held = pair.run(root.callRemote("many", 5))
    assert len(pair.client.locallyCachedObjects) == 5
    with pytest.raises(JellyError, match="more than 5 caches"):
        pair.run(root.callRemote("many", 1))
    assert not pair.client.closed and len(held) == 5


@pytest.mark.parametrize("number", [-1, P, 2**200])
def test_a_reference_number_a_table_could_not_hash_apart_is_refused(number: int) -> None:
    # k * P all hash to 0: 100,000 references numbered so would make the table quadratic.
    with pytest.raises(JellyError, match="reference number must be an int from 0"):
        unjelly([b"reference", number, [b"list"]])


# -- the decoder's memory ---------------------------------------------------------------


def held_by_decoder(data: bytes, limits: Limits) -> tuple[int, BaseException | None]:
    """Feed *data* in 64 KiB reads; the most bytes (tracemalloc's peak) the decoder held, and its error."""
    decoder = banana.Decoder(b"pb", limits)
    error: BaseException | None = None
    tracemalloc.start()
    try:
        for start in range(0, len(data), 65536):
            decoder.feed(data[start : start + 65536])
            decoder.next_expression()
    except BananaError as refused:
        error = refused
    held = tracemalloc.get_traced_memory()[1]  # the peak: a refused decoder lets go at once
    tracemalloc.stop()
    return held, error


def unfinished(item: bytes, count: int) -> bytes:
    """An outer list that never ends, holding lists of *count* copies of *item*."""
    chunk = banana.int_to_b128(count) + b"\x80" + item * count
    return banana.int_to_b128(1000) + b"\x80" + chunk * 999


WORST_SHAPES = [
    pytest.param(b"\x80", id="empty-lists"),
    pytest.param(b"\x01\x80\x81", id="one-item-lists"),
    pytest.param(b"\x02\x80\x81\x81", id="two-item-lists"),
    pytest.param(banana.int_to_b128(1000) + b"\x81", id="ints"),
    pytest.param(b"\x02\x82ab", id="short-strings"),
]


@pytest.mark.parametrize("item", WORST_SHAPES)
def test_an_unfinished_expression_holds_a_bounded_multiple_of_the_limit(item: bytes) -> None:
    limits = Limits(max_expression_bytes=256 * 1024, max_decoded_bytes=4 * 1024 * 1024)
    held, error = held_by_decoder(unfinished(item, 20_000), limits)
    assert error is not None  # refused, by one limit or the other
    # Before max_decoded_bytes, a stream of empty lists held 66 times its size.
    assert held < 1.3 * limits.max_decoded_bytes + 2 * limits.max_expression_bytes


def test_a_stream_of_lists_is_refused_by_its_decoded_size() -> None:
    limits = Limits(max_expression_bytes=10**9, max_decoded_bytes=100_000)
    with pytest.raises(BananaError, match="over the limit of 100000 bytes decoded"):
        banana.decode(banana.int_to_b128(2000) + b"\x80" + b"\x80" * 2000, limits=limits)
    assert banana.decode(banana.int_to_b128(700) + b"\x80" + b"\x80" * 700, limits=limits)[0] == [[]] * 700


@pytest.mark.parametrize("item", WORST_SHAPES)
def test_the_decoded_size_counted_is_close_to_the_memory_held(item: bytes) -> None:
    # What the decoder counts against max_decoded_bytes bounds what the objects take (tracemalloc),
    # within 2.5x: so the limit and the process-wide budget are in bytes of memory, whatever the shape.
    decoder = banana.Decoder(b"pb", Limits(max_expression_bytes=10**9, max_decoded_bytes=10**10))
    data = unfinished(item, 20_000)[: 256 * 1024]
    tracemalloc.start()
    decoder.feed(data)
    decoder.next_expression()
    decoder._buf = b""
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    counted = decoder.held - len(data)  # held: the wire bytes and the objects' count
    assert 0.9 * held < counted < 2.5 * held, (counted, held)  # an upper bound, and not a loose one


def test_a_pb_message_at_the_wire_limit_is_within_the_decoded_limit() -> None:
    # The codec benchmark's dicts, about 8 MB of them: about 7 times that decoded, as counted.
    payload = [{"name": f"user-{i}", "id": i, "score": i + 0.25, "note": None, "tags": ["a", i]} for i in range(50_000)]
    data = banana.encode(jelly(payload))
    assert 0.9 * Limits().max_expression_bytes < len(data) < Limits().max_expression_bytes
    (expression,) = banana.decode(data)
    assert isinstance(expression, list) and len(expression) == 50_001


# -- the process-wide budget ------------------------------------------------------------


def test_a_budget_counts_what_each_holder_holds_now() -> None:
    budget = MemoryBudget(1000)
    one, two = object(), object()
    assert budget.report(one, 600) and budget.report(two, 300)
    assert budget.held == 900
    assert not budget.report(two, 500)  # 1100: refused, and withdrawn
    assert budget.held == 600
    assert budget.report(one, 100) and budget.report(two, 500)
    assert budget.report(one, 0) and budget.held == 500


def unfinished_call(size: int) -> bytes:
    """About *size* bytes of a call whose argument is a long list of ints, never finished."""
    head = b"".join(banana.encode(atom) for atom in (b"message", 1, b"root", b"echo", 1))
    items = banana.int_to_b128(1000) + b"\x81"
    # The list claims what is sent: a claim is counted in full as soon as it arrives.
    return banana.int_to_b128(7) + b"\x80" + head + banana.int_to_b128(size // 3) + b"\x80" + items * (size // 3)


def test_connections_over_the_process_budget_are_closed_and_the_others_keep_theirs() -> None:
    budget = MemoryBudget(3_500_000)
    pairs = [BrokerPair(server_root=Echo(), budget=budget) for _ in range(3)]
    # 100 KB of ints each: about 1.4 MB decoded (a list slot and an int object each).
    pairs[0].server.receive_data(unfinished_call(100_000))
    pairs[1].server.receive_data(unfinished_call(100_000))
    assert 2_500_000 < budget.held < 3_500_000
    with pytest.raises(OverBudget, match="holds more than 3500000 bytes of unfinished messages"):
        pairs[2].server.receive_data(unfinished_call(100_000))
    assert pairs[2].server.closed and not pairs[0].server.closed and not pairs[1].server.closed
    assert budget.held < 3_500_000
    pairs[0].server.connection_lost(None)  # a connection that ends gives back what it held
    assert budget.held < 2_000_000
    # and a new connection has room again
    BrokerPair(server_root=Echo(), budget=budget).server.receive_data(unfinished_call(100_000))
