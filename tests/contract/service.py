"""What the contract tests serve: one :class:`Session` root per connection, sharing a :class:`Shared` record.

The methods that wait do so on ``broker.pending_factory()`` (a pending call of their own
connection that nothing settles but the test or the connection's end), so the same service
runs on every adapter, the blocking one included, whose served coroutines may wait only for
their own connection's calls.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

from pbcore import Copyable, Referenceable, Root
from pbcore.cred import AllowAnonymousAccess, Avatar, InMemoryPasswordChecker, IPerspective, Portal
from pbcore.errors import Error
from pbcore.flavors import RemoteReference


class Refused(Error):
    """An expected error of the application's."""


class Boom(Copyable):
    """A result whose serializer raises: the application's bug, met while answering."""

    def getStateToCopy(self) -> Any:
        raise RuntimeError("getStateToCopy is broken")


class Exported(Referenceable):
    def remote_ping(self) -> str:
        return "pong"


class Shared:
    """What every connection's Session writes to, for the test to read."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = 0
        self.cancelled = 0
        self.exported: list[weakref.ref[Exported]] = []
        self.kept: list[Any] = []
        self.waiters: list[Any] = []
        self.brokers: list[Any] = []

    def count(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


class Session(Referenceable):
    """The root one connection sees."""

    def __init__(self, shared: Shared, broker: Any) -> None:
        self.shared = shared
        self.broker = broker

    def _forever(self) -> Any:
        return self.broker.pending_factory()

    def remote_echo(self, value: Any) -> Any:
        return value

    async def remote_async_echo(self, value: Any) -> Any:
        return value

    async def remote_hang(self) -> None:
        self.shared.count("started")
        try:
            await self._forever()
        finally:
            self.shared.count("cancelled")

    async def remote_ping_pong(self, client: RemoteReference, depth: int) -> int:
        if depth == 0:
            return 0
        result: int = await client.callRemote("pong", depth - 1)
        return result + 1

    async def remote_poll(self) -> Any:
        waiter = self._forever()
        self.shared.waiters.append(waiter)
        return await waiter

    def remote_post(self, news: str) -> int:
        waiters, self.shared.waiters = self.shared.waiters, []
        for waiter in waiters:
            waiter.resolve(news)
        return len(waiters)

    async def remote_busy(self, client: RemoteReference, seconds: float) -> Any:
        self.shared.count("started")
        return await client.callRemote("nap", seconds)

    # -- faults -----------------------------------------------------------------------------------

    def remote_raise(self) -> None:
        raise ValueError("the method is broken")

    async def remote_async_raise(self) -> None:
        raise ValueError("the async method is broken")

    def remote_refuse(self) -> None:
        raise Refused("no")

    def remote_boom(self) -> Boom:
        return Boom()

    async def remote_async_boom(self) -> Boom:
        return Boom()

    def remote_unsendable(self) -> object:
        return object()

    async def remote_async_unsendable(self) -> object:
        return object()

    def remote_bad_notifier(self) -> str:
        def bad() -> None:
            raise RuntimeError("a disconnect notifier is broken")

        self.broker.notifyOnDisconnect(bad)
        self.broker.notifyOnDisconnect(lambda: self.shared.count("cancelled"))
        return "armed"

    def remote_relay(self, other: RemoteReference) -> Any:
        return other.callRemote("fail")

    async def remote_async_relay(self, other: RemoteReference) -> Any:
        return await other.callRemote("fail")

    def remote_take(self, ref: RemoteReference) -> None:
        raise ValueError("refused the argument")

    async def remote_async_take(self, ref: RemoteReference) -> None:
        raise ValueError("refused the argument")

    # -- lifecycle --------------------------------------------------------------------------------

    def remote_thing(self) -> Exported:
        thing = Exported()
        self.shared.exported.append(weakref.ref(thing))
        return thing

    def remote_keep(self, ref: RemoteReference) -> None:
        self.shared.kept.append(ref)

    def remote_close_me(self, how: str) -> None:
        getattr(self.broker, how)(Error("the application closed this connection"))


class ContractRoot(Root):
    def __init__(self) -> None:
        self.shared = Shared()

    def rootObject(self, broker: Any) -> Session:
        self.shared.brokers.append(weakref.ref(broker))
        return Session(self.shared, broker)


class ClientSide(Referenceable):
    """What a client hands the server to call back."""

    def __init__(self, root: Any = None) -> None:
        self.root = root

    async def remote_pong(self, depth: int) -> int:
        result: int = await self.root.callRemote("ping_pong", self, depth)
        return result

    def remote_fail(self) -> None:
        raise KeyError("far away")

    def remote_nap(self, seconds: float) -> str:
        time.sleep(seconds)
        return "rested"


# -- a portal whose realm and checkers can be told to fail -----------------------------------------


class Faulty:
    """Which login callback raises next: 'checker', 'realm' or 'logout' (None: none)."""

    def __init__(self) -> None:
        self.fault: str | None = None
        self.logouts = 0


class FaultyChecker(InMemoryPasswordChecker):
    def __init__(self, faulty: Faulty) -> None:
        super().__init__(alice=b"secret")
        self.faulty = faulty

    def requestAvatarId(self, credentials: Any) -> bytes:
        if self.faulty.fault == "checker":
            raise RuntimeError("the checker is broken")
        return super().requestAvatarId(credentials)


class User(Avatar):
    def perspective_whoami(self) -> str:
        return "alice"


class FaultyRealm:
    def __init__(self, faulty: Faulty) -> None:
        self.faulty = faulty

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        if self.faulty.fault == "realm":
            raise RuntimeError("the realm is broken")

        def logout() -> None:
            self.faulty.logouts += 1
            if self.faulty.fault == "logout":
                raise RuntimeError("the logout is broken")

        return IPerspective, User(), logout


def faulty_portal(faulty: Faulty) -> Portal:
    checkers: list[Any] = [FaultyChecker(faulty), AllowAnonymousAccess()]
    return Portal(FaultyRealm(faulty), checkers)
