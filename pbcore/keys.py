"""What hashing a peer's values costs: bounds for the keys unjelly builds.

Jelly's ``reference``/``dereference`` forms let a message of a few hundred bytes
describe a tuple of 10**20 leaves. Holding it is cheap (it stays shared), but
hashing it, as a dictionary key or a set member, walks every leaf, and so does
comparing two such keys. Integer, float and tuple hashes are not salted, so a
peer can also send thousands of keys that all hash alike and make each insertion
walk all the others. This module keeps both linear:

* :class:`KeyMeter` measures each tuple or frozenset used as a key *expanded*
  (memoized, so in time linear in its distinct parts) before it is hashed, and
  refuses the message once the keys of one message expand to more than a
  small multiple of the items it has (and more than
  :attr:`Limits.max_key_items <pbcore.banana.Limits.max_key_items>`);
* :class:`Collisions` counts, in one container, the keys that share a hash, and
  refuses past :attr:`Limits.max_hash_collisions <pbcore.banana.Limits.max_hash_collisions>`;
* the numbers a peer picks for the unjellier's and the broker's own tables
  (reference numbers, cache ids) must be below :data:`PEER_ID_BOUND`.

Both raise :class:`~pbcore.errors.JellyError`: the message is refused (an error
answer for a call), the connection is kept.
"""

from __future__ import annotations

from typing import Any, Final

from .banana import Limits
from .errors import JellyError

__all__ = [
    "COMPOSITE",
    "KEY_WORK_FACTOR",
    "KEY_WORK_SLACK",
    "PEER_ID_BOUND",
    "SALTED",
    "Collisions",
    "KeyMeter",
    "items",
]

#: The keys of one message may expand to this many times the items it has (a tuple
#: key reused in many dictionaries arrives shared: a constant in the sender's code)...
KEY_WORK_FACTOR: Final = 16
#: ...plus this many (about a millisecond of hashing).
KEY_WORK_SLACK: Final = 100_000

#: Numbers a peer chooses that become keys of a table (reference numbers, cache ids) are
#: below this: distinct ints below 2**61 - 1 never share a hash.
PEER_ID_BOUND: Final = 2**61 - 1

#: str and bytes hashes are salted per process (PYTHONHASHSEED): a peer cannot aim them.
SALTED: Final = frozenset({str, bytes})
#: The keys whose hash walks their items.
COMPOSITE: Final = frozenset({tuple, frozenset})


class KeyMeter:
    """The hashing budget of one message: every tuple or frozenset key is charged its expanded size.

    *message_items* is how many items the message has (:func:`items`): keys
    that are not shared never expand to more than that.
    """

    __slots__ = ("_sizes", "allowed", "spent")

    def __init__(self, limits: Limits, message_items: int) -> None:
        #: Expanded items the message's keys may have in all.
        self.allowed = min(KEY_WORK_FACTOR * message_items + KEY_WORK_SLACK, limits.max_key_items)
        # id -> (the value, kept alive so that its id is not reused; its expanded size)
        self._sizes: dict[int, tuple[Any, int]] = {}
        #: Expanded items charged so far.
        self.spent = 0

    def charge(self, key: Any) -> None:
        """Charge hashing *key* (a tuple or frozenset) against the budget, before it is hashed."""
        self.spent += self._size(key)
        if self.spent > self.allowed:
            raise JellyError(
                f"the keys of this message expand to more than {self.allowed} items (shared references "
                "hashed expanded): refused"
            )

    def _size(self, root: Any) -> int:
        """The number of items *root* has when its shared parts are counted each time they occur."""
        sizes = self._sizes
        known = sizes.get(id(root))
        if known is not None:
            return known[1]
        # Post-order, without recursion: a key's depth is bounded, but need not be small.
        stack: list[tuple[Any, bool]] = [(root, False)]
        while stack:
            node, children_done = stack.pop()
            if children_done:
                total = 1
                for item in node:
                    total += sizes[id(item)][1] if type(item) in COMPOSITE else 1
                sizes[id(node)] = (node, total)
                continue
            if id(node) in sizes:
                continue
            stack.append((node, True))
            for item in node:
                if type(item) in COMPOSITE and id(item) not in sizes:
                    stack.append((item, False))
        return sizes[id(root)][1]


def items(sexp: Any) -> int:
    """How many items an s-expression has, lists and atoms alike (it is a tree: no sharing)."""
    count = 0
    pending = [sexp]
    while pending:
        item = pending.pop()
        count += 1
        if type(item) is list:
            pending.extend(item)
    return count


class Collisions:
    """Counts the keys of one container by hash, once it has enough of them for collisions to matter.

    Below *threshold* unsalted keys nothing is counted (a few collisions cost
    nothing); at the threshold the keys so far are counted, then each new one.
    """

    __slots__ = ("_counts", "_limit", "_plain", "_what")

    def __init__(self, limits: Limits, what: str) -> None:
        self._limit = limits.max_hash_collisions
        self._plain = 0
        self._counts: dict[int, int] | None = None
        self._what = what

    def add(self, key: Any, existing: Any) -> None:
        """Count *key*, about to join the container whose keys *existing* iterates (a dict or a set)."""
        if type(key) in SALTED:
            return
        self._plain += 1
        counts = self._counts
        if counts is None:
            if self._plain <= self._limit:
                return
            counts = self._counts = {}
            for old in existing:
                if type(old) not in SALTED:
                    self._count(counts, old)
        self._count(counts, key)

    def _count(self, counts: dict[int, int], key: Any) -> None:
        try:
            value = hash(key)
        except Exception:  # the container's own insertion says what is wrong
            return
        seen = counts.get(value, 0) + 1
        if seen > self._limit:
            raise JellyError(
                f"more than {self._limit} keys of one {self._what} have the same hash: refused "
                "(a hash-collision attack?)"
            )
        counts[value] = seen
