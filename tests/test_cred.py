"""Logging in through a Portal over a broker pair, with pbcore on both sides."""

from __future__ import annotations

import gc
import hashlib
from typing import Any

import pytest

from pbcore import Viewable
from pbcore.broker import Broker
from pbcore.cred import (
    ANONYMOUS,
    AllowAnonymousAccess,
    Anonymous,
    Avatar,
    InMemoryPasswordChecker,
    IPerspective,
    LoginFailed,
    Portal,
    Unauthorized,
    UsernamePassword,
    challenge,
    respond,
)
from pbcore.errors import BananaError, Error, PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import CopiedFailure, Referenceable
from pbcore.testing import BrokerPair


class Document(Viewable):
    def view_whoami(self, perspective: Any) -> str:
        return perspective.name  # type: ignore[no-any-return]


class User(Avatar):
    def __init__(self, name: str, mind: Any) -> None:
        self.name = name
        self.mind = mind

    def perspective_hello(self) -> str:
        return f"hello {self.name}"

    def perspective_document(self) -> Document:
        return Document()

    def perspective_ping_mind(self) -> Any:
        return self.mind.callRemote("ping", pbanswer=False)


class Realm:
    def __init__(self) -> None:
        self.logouts: list[str] = []
        self.minds: list[Any] = []

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> tuple[Any, User, Any]:
        assert IPerspective in interfaces
        name = "anonymous" if avatar_id is ANONYMOUS else avatar_id.decode()
        self.minds.append(mind)
        return IPerspective, User(name, mind), lambda: self.logouts.append(name)


class AsyncChecker(InMemoryPasswordChecker):
    """A checker that asks its store asynchronously."""

    async def requestAvatarId(self, credentials: Any) -> bytes:  # type: ignore[override]
        return super().requestAvatarId(credentials)


def connect(portal: Portal) -> tuple[BrokerPair, PBClientFactory]:
    server_factory = PBServerFactory(portal)
    client_factory = PBClientFactory()

    def make(is_client: bool, root: Any, **options: Any) -> Broker:
        return client_factory.make_broker(**options) if is_client else server_factory.make_broker(**options)

    return BrokerPair(broker_factory=make), client_factory


def portal_for(realm: Realm, *, async_checker: bool = False) -> Portal:
    checker = (AsyncChecker if async_checker else InMemoryPasswordChecker)(alice="secret")
    return Portal(realm, [checker, AllowAnonymousAccess()])


@pytest.mark.parametrize("async_checker", [False, True])
def test_password_login_and_perspective_calls(async_checker: bool) -> None:
    realm = Realm()
    pair, factory = connect(portal_for(realm, async_checker=async_checker))
    avatar = pair.run(factory.login(UsernamePassword("alice", "secret")))
    assert pair.run(avatar.callRemote("hello")) == "hello alice"
    document = pair.run(avatar.callRemote("document"))
    assert pair.run(document.callRemote("whoami")) == "alice"  # viewed through the avatar


@pytest.mark.parametrize("credentials", [UsernamePassword("alice", "wrong"), UsernamePassword("bob", "secret")])
def test_wrong_password_and_unknown_user_are_the_same_error(credentials: UsernamePassword) -> None:
    realm = Realm()
    pair, factory = connect(portal_for(realm))
    with pytest.raises(CopiedFailure) as caught:
        pair.run(factory.login(credentials))
    assert caught.value.check(Unauthorized) is Unauthorized
    assert caught.value.value == "Unauthorized login"  # says nothing about which
    assert caught.value.type == "twisted.cred.error.UnauthorizedLogin"
    assert realm.logouts == [] and realm.minds == []
    assert not pair.server.closed and not pair.client.closed


def test_anonymous_login_with_a_mind() -> None:
    class Mind(Referenceable):
        pings = 0

        def remote_ping(self) -> None:
            self.pings += 1

    realm = Realm()
    pair, factory = connect(portal_for(realm))
    mind = Mind()
    avatar = pair.run(factory.login(Anonymous(), mind))
    assert pair.run(avatar.callRemote("hello")) == "hello anonymous"
    pair.run(avatar.callRemote("ping_mind"))
    pair.pump()
    assert mind.pings == 1  # the realm got the mind as a reference it can call


def test_logout_runs_once_when_the_avatar_is_released() -> None:
    realm = Realm()
    pair, factory = connect(portal_for(realm))
    avatar = pair.run(factory.login(UsernamePassword("alice", "secret")))
    assert realm.logouts == []
    del avatar
    pair.clear_events()
    gc.collect()
    pair.pump()
    assert realm.logouts == ["alice"]
    pair.disconnect()
    assert realm.logouts == ["alice"]


def test_logout_runs_once_when_the_connection_drops() -> None:
    realm = Realm()
    pair, factory = connect(portal_for(realm))
    avatar = pair.run(factory.login(UsernamePassword("alice", "secret")))
    pair.disconnect(ConnectionResetError("gone"))
    assert realm.logouts == ["alice"]
    del avatar
    gc.collect()
    assert realm.logouts == ["alice"]


def test_a_response_that_is_not_bytes_is_unauthorized() -> None:
    pair, factory = connect(portal_for(Realm()))
    root = pair.run(factory.getRootObject())
    _, challenger = pair.run(root.callRemote("login", "alice"))
    with pytest.raises(CopiedFailure) as caught:
        pair.run(challenger.callRemote("respond", "not bytes", None))
    assert caught.value.check(Unauthorized)


def test_a_username_of_the_wrong_type_is_unauthorized() -> None:
    pair, factory = connect(portal_for(Realm()))
    root = pair.run(factory.getRootObject())
    for name in ([b"alice"], {"a": 1}, 7):
        with pytest.raises(CopiedFailure) as caught:
            pair.run(root.callRemote("login", name))
        assert caught.value.check(Unauthorized), caught.value


def test_a_challenge_is_good_for_one_answer() -> None:
    pair, factory = connect(portal_for(Realm()))
    root = pair.run(factory.getRootObject())
    challenge_bytes, challenger = pair.run(root.callRemote("login", "alice"))
    answer = respond(challenge_bytes, "secret")
    assert pair.run(challenger.callRemote("respond", answer, None)) is not None
    with pytest.raises(CopiedFailure) as caught:  # the same right answer again: no second avatar
        pair.run(challenger.callRemote("respond", answer, None))
    assert caught.value.check(Unauthorized)
    # A wrong answer uses the challenge up too.
    challenge_bytes, challenger = pair.run(root.callRemote("login", "alice"))
    with pytest.raises(CopiedFailure):
        pair.run(challenger.callRemote("respond", b"wrong", None))
    with pytest.raises(CopiedFailure) as caught:
        pair.run(challenger.callRemote("respond", respond(challenge_bytes, "secret"), None))
    assert caught.value.check(Unauthorized)


def test_respond_is_double_md5_and_challenges_differ() -> None:
    c = challenge()
    assert respond(c, "pw") == hashlib.md5(hashlib.md5(b"pw").digest() + c).digest()
    assert len({challenge() for _ in range(50)}) == 50


def test_a_portal_without_a_checker_for_the_credentials_refuses() -> None:
    pair, factory = connect(Portal(Realm(), [InMemoryPasswordChecker(alice="secret")]))
    with pytest.raises(CopiedFailure) as caught:
        pair.run(factory.login(Anonymous()))
    # As Twisted's portal: UnhandledCredentials, a LoginFailed but not an Unauthorized.
    assert caught.value.type == "twisted.cred.error.UnhandledCredentials"
    assert caught.value.check(LoginFailed) is LoginFailed
    assert caught.value.check(Unauthorized) is None


def test_a_refusal_has_twisteds_class_names_and_parents() -> None:
    pair, factory = connect(portal_for(Realm()))
    with pytest.raises(CopiedFailure) as caught:
        pair.run(factory.login(UsernamePassword("alice", "wrong")))
    assert caught.value.parents == [
        "twisted.cred.error.UnauthorizedLogin",
        "twisted.cred.error.LoginFailed",
        "twisted.cred.error.Unauthorized",
        "builtins.Exception",
        "builtins.BaseException",
        "builtins.object",
    ]
    assert caught.value.check(Error) is None  # not a pb.Error, as in Twisted


@pytest.mark.parametrize("handshake_started", [False, True])
def test_waiting_for_the_root_fails_with_why_the_connection_was_lost(handshake_started: bool) -> None:
    factory = PBClientFactory()
    broker = factory.make_broker()
    broker.connection_made()
    waiting = factory.getRootObject()
    if handshake_started:
        waiting.send(None)  # now suspended until the handshake completes
    with pytest.raises(BananaError):
        broker.receive_data(b"\xff")  # no such type byte
    with pytest.raises(PBConnectionLost) as lost:
        waiting.send(None)
    assert isinstance(lost.value.args[0], BananaError)
    assert "unknown type byte 0xff" in str(lost.value)
