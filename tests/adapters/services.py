"""What the adapters' test servers offer: the same API as the server of
tests/interop/twisted_peer.py (so Twisted's client scripts run against ours,
and our clients' scenarios against Twisted's server), and a login portal
(alice/secret, or anonymous) whose avatars offer a Viewable. Shared by the
asyncio, trio and blocking adapter tests and tests/interop/test_tcp_matrix.py;
each may add methods of its own framework.
"""

from __future__ import annotations

from typing import Any

from pbcore import Cacheable, Copyable, Referenceable, RemoteCache, RemoteCopy, Root, Viewable, flavors
from pbcore.broker import Broker
from pbcore.cred import ANONYMOUS, AllowAnonymousAccess, Avatar, InMemoryPasswordChecker, Portal
from pbcore.errors import Error
from pbcore.factory import PBServerFactory
from pbcore.flavors import RemoteReference


class Refused(Error):
    """An expected error of the application's own (twisted_peer's ``Refused`` is its twin)."""


class Thing(Referenceable):
    def __init__(self, n: Any) -> None:
        self.n = n

    def remote_n(self) -> Any:
        return self.n


class Point(Copyable):
    """Travels under the tag of twisted_peer's TwistedPoint, so both servers send the same copy."""

    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y

    def getTypeToCopy(self) -> bytes:
        return b"twisted_peer.TwistedPoint"


class PointCopy(RemoteCopy):
    x: int
    y: int


class Counter(Cacheable):
    def __init__(self) -> None:
        self.value = 0
        self.observers: list[flavors.RemoteCacheObserver] = []

    def getTypeToCopy(self) -> bytes:
        return b"twisted_peer.Counter"

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: flavors.RemoteCacheObserver) -> Any:
        self.observers.append(observer)
        return {"value": self.value}

    def stoppedObserving(self, perspective: Any, observer: flavors.RemoteCacheObserver) -> None:
        self.observers.remove(observer)

    def bump(self) -> int:
        self.value += 1
        for observer in self.observers:
            observer.callRemote("value", self.value)
        return self.value


class CounterCache(RemoteCache):
    value: int

    def observe_value(self, value: int) -> None:
        self.value = value


flavors.setCopierForClass(b"twisted_peer.TwistedPoint", PointCopy)
flavors.setCopierForClass(b"twisted_peer.Counter", CounterCache)


class Shared:
    """What every connection's root shares, for the tests to look at."""

    def __init__(self) -> None:
        self.counter = Counter()
        self.notes: list[Any] = []
        self.big_calls = 0


class PeerRoot(Root):
    """One per connection (so ``refs`` can count this connection's table)."""

    def __init__(self, broker: Broker, shared: Shared) -> None:
        self.broker = broker
        self.shared = shared
        self.kept: Any = None

    def remote_echo(self, *args: Any, **kw: Any) -> list[Any]:
        return [list(args), kw]

    def remote_thing(self, n: Any) -> Thing:
        return Thing(n)

    def remote_fail(self) -> None:
        raise ValueError("nope")

    def remote_known(self) -> None:
        raise Error("known")

    def remote_refused(self) -> None:
        raise Refused("refused")

    def remote_point(self) -> Point:
        return Point(3, 4)

    def remote_accept_point(self, point: Any) -> dict[str, Any]:
        return {"class": type(point).__name__, "x": point.x, "y": point.y}

    def remote_counter(self) -> Counter:
        return self.shared.counter

    def remote_bump(self) -> int:
        return self.shared.counter.bump()

    def remote_observers(self) -> int:
        return len(self.shared.counter.observers)

    def remote_keep_cache(self, cache: Any) -> Any:
        self.kept = cache
        return cache.value

    def remote_kept_value(self) -> Any:
        return self.kept.value

    def remote_drop_cache(self) -> None:
        self.kept = None

    def remote_refs(self) -> int:
        return len(self.broker.localObjects)

    def remote_call_back(self, ref: RemoteReference, x: Any) -> Any:
        return ref.callRemote("twice", x)

    def remote_note(self, value: Any) -> None:
        self.shared.notes.append(value)

    def remote_notes(self) -> list[Any]:
        return self.shared.notes

    def remote_big(self, size: int) -> bytes:
        self.shared.big_calls += 1
        return b"x" * size


class PeerRootMaker(Root):
    def __init__(self) -> None:
        self.shared = Shared()

    def rootObject(self, broker: Any) -> PeerRoot:
        return PeerRoot(broker, self.shared)


class Twice(Referenceable):
    def remote_twice(self, x: Any) -> Any:
        return 2 * x


class Board(Viewable):
    def view_whoami(self, perspective: User) -> str:
        return perspective.name


class User(Avatar):
    board = Board()

    def __init__(self, name: str) -> None:
        self.name = name

    def perspective_hello(self) -> str:
        return f"hello {self.name}"

    def perspective_echo(self, x: Any) -> Any:
        return x

    def perspective_board(self) -> Board:
        return self.board


class Realm:
    def __init__(self) -> None:
        self.logouts: list[str] = []

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        name = "anonymous" if avatar_id is ANONYMOUS else avatar_id.decode()
        return interfaces[0], User(name), lambda: self.logouts.append(name)


def login_factory(realm: Realm | None = None) -> PBServerFactory:
    portal = Portal(realm or Realm(), [InMemoryPasswordChecker(alice="secret"), AllowAnonymousAccess()])
    return PBServerFactory(portal)
