"""Logging in across implementations, in memory: a Twisted client through our
Portal, and our client through a Twisted Portal."""

from __future__ import annotations

import gc
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest

from pbcore.broker import PendingCall
from pbcore.cred import ANONYMOUS, AllowAnonymousAccess, Avatar, InMemoryPasswordChecker, Portal, Unauthorized
from pbcore.cred import Anonymous as OurAnonymous
from pbcore.cred import UsernamePassword as OurUsernamePassword
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import CopiedFailure
from tests.interop.test_twisted_broker import Connection

pb: Any = pytest.importorskip("twisted.spread.pb")
portal_module: Any = pytest.importorskip("twisted.cred.portal")
checkers: Any = pytest.importorskip("twisted.cred.checkers")
credentials: Any = pytest.importorskip("twisted.cred.credentials")
cred_error: Any = pytest.importorskip("twisted.cred.error")

T = TypeVar("T")


# -- a Twisted client, our server ----------------------------------------------------------


class OurUser(Avatar):
    def __init__(self, name: str) -> None:
        self.name = name

    def perspective_hello(self) -> str:
        return f"hello {self.name}"


class OurRealm:
    def __init__(self) -> None:
        self.logouts: list[str] = []

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        name = "anonymous" if avatar_id is ANONYMOUS else avatar_id.decode()
        return interfaces[0], OurUser(name), lambda: self.logouts.append(name)


def twisted_client_of_ours(realm: OurRealm) -> tuple[Connection, Any]:
    portal = Portal(realm, [InMemoryPasswordChecker(alice="secret"), AllowAnonymousAccess()])
    factory = pb.PBClientFactory()
    connection = Connection(PBServerFactory(portal).make_broker(), factory.buildProtocol(None))
    return connection, factory


def settle(connection: Connection, deferred: Any) -> tuple[str, Any]:
    outcome: list[tuple[str, Any]] = []
    deferred.addCallbacks(lambda v: outcome.append(("ok", v)), lambda f: outcome.append(("err", f)))
    for _ in range(10):
        connection.pump()
        if outcome:
            return outcome[0]
    raise AssertionError("the Deferred never fired")


def test_twisted_client_logs_in_with_a_password() -> None:
    realm = OurRealm()
    connection, factory = twisted_client_of_ours(realm)
    kind, avatar = settle(connection, factory.login(credentials.UsernamePassword(b"alice", b"secret")))
    assert kind == "ok"
    assert settle(connection, avatar.callRemote("hello")) == ("ok", "hello alice")
    del avatar
    gc.collect()
    connection.pump()
    assert realm.logouts == ["alice"]  # Twisted released the avatar: logged out


@pytest.mark.parametrize("user, password", [(b"alice", b"wrong"), (b"bob", b"secret")])
def test_twisted_client_is_refused_as_unauthorized_login(user: bytes, password: bytes) -> None:
    connection, factory = twisted_client_of_ours(OurRealm())
    kind, failure = settle(connection, factory.login(credentials.UsernamePassword(user, password)))
    assert kind == "err"
    assert failure.check(cred_error.UnauthorizedLogin) is not None


def test_twisted_client_logs_in_anonymously() -> None:
    connection, factory = twisted_client_of_ours(OurRealm())
    kind, avatar = settle(connection, factory.login(credentials.Anonymous()))
    assert kind == "ok"
    assert settle(connection, avatar.callRemote("hello")) == ("ok", "hello anonymous")


# -- our client, a Twisted server -------------------------------------------------------------


class TwistedUser(pb.Avatar):  # type: ignore[misc]
    def __init__(self, name: bytes) -> None:
        self.name = name

    def perspective_hello(self) -> bytes:
        return b"hello " + self.name


class TwistedRealm:
    def __init__(self) -> None:
        self.logouts: list[Any] = []

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        name = avatar_id if isinstance(avatar_id, bytes) else b"anonymous"
        return pb.IPerspective, TwistedUser(name), lambda: self.logouts.append(name)


def our_client_of_twisted(realm: TwistedRealm) -> tuple[Connection, PBClientFactory]:
    portal = portal_module.Portal(realm)
    checker = checkers.InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    portal.registerChecker(checker)
    portal.registerChecker(checkers.AllowAnonymousAccess())
    factory = PBClientFactory()
    connection = Connection(factory.make_broker(), pb.PBServerFactory(portal).buildProtocol(None))
    return connection, factory


def drive(connection: Connection, awaitable: Awaitable[T]) -> T:
    """Run a coroutine of ours, pumping the connection while it waits on a call."""
    steps = awaitable.__await__()
    value: Any = None
    for _ in range(20):
        try:
            waiting = steps.send(value)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        assert isinstance(waiting, PendingCall)
        connection.pump()
        assert waiting.done, "Twisted did not answer"
    raise AssertionError("too many steps")


def test_we_log_in_to_twisted_with_a_password() -> None:
    realm = TwistedRealm()
    connection, factory = our_client_of_twisted(realm)
    avatar = drive(connection, factory.login(OurUsernamePassword("alice", "secret")))
    assert drive(connection, avatar.callRemote("hello")) == b"hello alice"
    del avatar
    gc.collect()
    connection.pump()
    assert realm.logouts == [b"alice"]  # we released it: Twisted logged out


@pytest.mark.parametrize("user, password", [("alice", "wrong"), ("bob", "secret")])
def test_twisted_refuses_us_as_unauthorized(user: str, password: str) -> None:
    connection, factory = our_client_of_twisted(TwistedRealm())
    with pytest.raises(CopiedFailure) as caught:
        drive(connection, factory.login(OurUsernamePassword(user, password)))
    assert caught.value.check(Unauthorized) is Unauthorized  # Twisted's UnauthorizedLogin is ours


def test_we_log_in_to_twisted_anonymously() -> None:
    connection, factory = our_client_of_twisted(TwistedRealm())
    avatar = drive(connection, factory.login(OurAnonymous()))
    assert drive(connection, avatar.callRemote("hello")) == b"hello anonymous"
