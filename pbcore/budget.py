"""A process-wide bound on the bytes held in messages not yet received whole.

``Limits.max_expression_bytes`` and ``Limits.max_decoded_bytes`` bound one
connection; but a peer can open many, each with an expression just under
the limits that it never finishes (341 such connections held 24 GB before
this bound). Every broker of a process reports what its decoder holds to one
:class:`MemoryBudget` (:data:`DEFAULT_BUDGET` unless told otherwise); a
connection whose next bytes would take the process over the budget is closed
with :class:`OverBudget`, and the others keep what they hold.

Brokers of one budget may run in several threads (pbcore_blocking): each
report is a single dictionary operation, atomic under the GIL, and the total
is summed over the connections that hold something, only when one of them
grows.
"""

from __future__ import annotations

from typing import Final

from .errors import ProtocolError

__all__ = ["DEFAULT_BUDGET", "MemoryBudget", "OverBudget"]


class OverBudget(ProtocolError):
    """The process holds too much in unfinished messages: this connection, which would add more, is closed."""


class MemoryBudget:
    """Bytes held in unfinished messages, across every connection that reports to it, and their limit.

    *limit* is in the decoder's units (a message's bytes, plus the upper
    bound ``Limits.max_decoded_bytes`` counts for its objects): the memory
    held is at most that, about 0.8 times it for PB messages.
    ``MemoryBudget(None)`` counts without a limit.
    """

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit <= 0:
            raise ValueError(f"a memory budget must be positive (or None), not {limit}")
        self.limit = limit
        self._held: dict[int, int] = {}  # id(holder) -> bytes, only for holders holding some

    @property
    def held(self) -> int:
        """What every holder holds now."""
        return sum(list(self._held.values()))  # list(): a snapshot, should another thread report meanwhile

    def report(self, holder: object, nbytes: int) -> bool:
        """Record that *holder* now holds *nbytes*; False if that takes the total over the limit.

        On False the report is already withdrawn: the caller closes the
        holder's connection (or lets go of what it holds).
        """
        key = id(holder)
        if nbytes <= 0:
            self._held.pop(key, None)
            return True
        before = self._held.get(key, 0)
        self._held[key] = nbytes
        if self.limit is None or nbytes <= before:
            return True
        if self.held <= self.limit:
            return True
        self._held.pop(key, None)
        return False


#: The budget every broker reports to unless given its own (512 MiB).
DEFAULT_BUDGET: Final = MemoryBudget(512 * 1024 * 1024)
