"""The demo service behind ``pbcore serve`` and ``pbcore demo``: one of each PB flavor.

It is plain object model, with no I/O: an adapter serves
:meth:`DemoService.server_factory` and calls :meth:`Ticker.tick` on a timer.

The root object (one per connection) answers:

=======================  ==============================================================
``echo(*args)``          its one argument, or the tuple of several
``note(text)``           a Copyable :class:`Note` (copy tag ``pbcore.demo.Note``)
``ticker()``             the Cacheable :class:`Ticker` (copy tag ``pbcore.demo.Ticker``);
                         each tick calls ``observe_tick(value)`` on every copy
``fail()``               raises :class:`DemoError`, an expected error (a ``pbcore.Error``)
``counter(name)``        the Referenceable :class:`Counter` of that name (made on first
                         use, at most 100, shared by every connection): a remote
                         reference, to call ``add(n=1)`` (the new count) and ``count()``
``login(username)``      the challenge-response login (see :mod:`pbcore.cred`)
``loginAnonymous(mind)`` an anonymous login (refused when ``open=False``)
=======================  ==============================================================

A login gives a :class:`Visitor` avatar, whose ``perspective_*`` methods are
the root's five (``echo``, ``note``, ``ticker``, ``fail``, ``counter``) plus
``whoami()`` (its name) and ``board()``: the :class:`Board`, a Viewable, so each visitor
holds a view of it that knows who they are (``post(text)``, ``read()``).

With ``open=False`` (``pbcore serve --user ... --password ...``) the root
answers only the login methods, and only the users can log in: everything
is behind the login.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from .cred import (
    ANONYMOUS,
    AllowAnonymousAccess,
    Avatar,
    ICredentialsChecker,
    InMemoryPasswordChecker,
    IPerspective,
    Portal,
    _PortalWrapper,
)
from .errors import Error
from .factory import PBServerFactory
from .flavors import Cacheable, Copyable, Referenceable, RemoteCache, RemoteCacheObserver, RemoteCopy, Viewable
from .jelly import setUnjellyableForClass
from .preview import PREVIEW_LIMIT, preview

__all__ = [
    "DEFAULT_PORT",
    "Board",
    "Counter",
    "DemoError",
    "DemoService",
    "Note",
    "NoteCopy",
    "Ticker",
    "TickerCache",
    "Visitor",
]

#: The port ``pbcore serve`` listens on unless told otherwise.
DEFAULT_PORT: Final = 8787

#: How many counters ``counter(name)`` makes at most (each name a new one).
MAX_COUNTERS: Final = 100

NOTE_TAG: Final = b"pbcore.demo.Note"
TICKER_TAG: Final = b"pbcore.demo.Ticker"


class DemoError(Error):
    """What ``fail()`` raises: an expected error, sent to the caller as itself."""


class Note(Copyable):
    """A short text and its author; travels as a copy."""

    def __init__(self, text: str, author: str) -> None:
        self.text = text
        self.author = author

    def getTypeToCopy(self) -> bytes:
        return NOTE_TAG


class NoteCopy(RemoteCopy):
    """The receiving side's copy of a :class:`Note`."""

    text: str
    author: str

    def __preview__(self, limit: int) -> str:
        # The fields came from the peer: shown bounded (see pbcore.preview), here and in repr.
        return f"Note({preview(self.text, limit)}, by {preview(self.author, 100)})"

    def __repr__(self) -> str:
        return self.__preview__(PREVIEW_LIMIT)


class Ticker(Cacheable):
    """A counter whose copies the server keeps up to date."""

    def __init__(self) -> None:
        self.value = 0
        self.observers: set[RemoteCacheObserver] = set()

    def getTypeToCopy(self) -> bytes:
        return TICKER_TAG

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: RemoteCacheObserver) -> dict[str, int]:
        self.observers.add(observer)
        return {"value": self.value}

    def stoppedObserving(self, perspective: Any, observer: RemoteCacheObserver) -> None:
        self.observers.discard(observer)

    def tick(self) -> int:
        """Count one more and tell every copy (one-way calls); the new value."""
        self.value += 1
        for observer in list(self.observers):
            observer.callRemote("tick", self.value, pbanswer=False)
        return self.value


class TickerCache(RemoteCache):
    """The receiving side's copy of the :class:`Ticker`, updated by its owner."""

    value: int

    def setCopyableState(self, state: Any) -> None:
        self.value = state["value"]

    def observe_tick(self, value: int) -> None:
        self.value = value

    def __preview__(self, limit: int) -> str:
        return f"Ticker(value={preview(self.value, limit)})"

    def __repr__(self) -> str:
        return self.__preview__(PREVIEW_LIMIT)


setUnjellyableForClass(NOTE_TAG, NoteCopy)
setUnjellyableForClass(TICKER_TAG, TickerCache)


class Counter(Referenceable):
    """A named count; it travels as a reference, so its methods are called where it lives."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0

    def remote_add(self, n: int = 1) -> int:
        if type(n) is not int:
            raise DemoError(f"add() takes an int, not {type(n).__name__}")
        self.value += n
        return self.value

    def remote_count(self) -> int:
        return self.value


class Board(Viewable):
    """Notes posted by visitors; each visitor reaches it through their own view."""

    def __init__(self) -> None:
        self.notes: list[Note] = []

    def view_post(self, visitor: Visitor, text: str) -> Note:
        note = Note(str(text), visitor.name)
        self.notes.append(note)
        return note

    def view_read(self, visitor: Visitor) -> list[Note]:
        return list(self.notes)


class Visitor(Avatar):
    """A logged-in user of the demo service."""

    def __init__(self, name: str, service: DemoService) -> None:
        self.name = name
        self.service = service

    def perspective_whoami(self) -> str:
        return self.name

    def perspective_board(self) -> Board:
        return self.service.board

    def perspective_echo(self, *args: Any) -> Any:
        return self.service.echo(*args)

    def perspective_note(self, text: str) -> Note:
        return self.service.note(text)

    def perspective_ticker(self) -> Ticker:
        return self.service.ticker

    def perspective_fail(self) -> None:
        self.service.fail()

    def perspective_counter(self, name: str) -> Counter:
        return self.service.counter(name)


class _OpenRoot(_PortalWrapper):
    """A root offering the demo's calls as well as the login."""

    def __init__(self, portal: Portal, broker: Any, service: DemoService) -> None:
        super().__init__(portal, broker)
        self.service = service

    def remote_echo(self, *args: Any) -> Any:
        return self.service.echo(*args)

    def remote_note(self, text: str) -> Note:
        return self.service.note(text)

    def remote_ticker(self) -> Ticker:
        return self.service.ticker

    def remote_fail(self) -> None:
        self.service.fail()

    def remote_counter(self, name: str) -> Counter:
        return self.service.counter(name)


class DemoService:
    """The demo: a ticker and a board shared by all connections, and a login.

    *users* maps names to passwords. With *open* (the default) the root
    answers the demo's calls and anonymous logins too; without it only the
    users can log in, and the root answers nothing but ``login``.
    """

    def __init__(self, users: Mapping[str, str] | None = None, open: bool = True) -> None:
        self.ticker = Ticker()
        self.board = Board()
        self.counters: dict[str, Counter] = {}
        self.open = open
        checkers: list[ICredentialsChecker] = [InMemoryPasswordChecker(**dict(users or {}))]
        if open:
            checkers.append(AllowAnonymousAccess())
        self.portal = Portal(self, checkers)

    def echo(self, *args: Any) -> Any:
        """One argument back as it is; several as a tuple."""
        return args[0] if len(args) == 1 else args

    def note(self, text: str) -> Note:
        """A note written by the server."""
        return Note(str(text), "server")

    def fail(self) -> None:
        """Raise the demo's expected error."""
        raise DemoError("this is what an error answer looks like")

    def counter(self, name: str) -> Counter:
        """The counter named *name*, made on first use."""
        name = str(name)
        counter = self.counters.get(name)
        if counter is None:
            if len(self.counters) >= MAX_COUNTERS:
                raise DemoError(f"there are {MAX_COUNTERS} counters already: use one of them")
            counter = self.counters[name] = Counter(name)
        return counter

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Visitor, Callable[[], None]]:
        """The realm: every login gets a :class:`Visitor`."""
        name = "anonymous" if avatarId is ANONYMOUS else bytes(avatarId).decode("utf-8", "replace")
        return IPerspective, Visitor(name, self), lambda: None

    def rootObject(self, broker: Any) -> _PortalWrapper:
        """The root for one connection."""
        if self.open:
            return _OpenRoot(self.portal, broker, self)
        return _PortalWrapper(self.portal, broker)

    def server_factory(self) -> PBServerFactory:
        """A factory serving this service."""
        return PBServerFactory(self)
