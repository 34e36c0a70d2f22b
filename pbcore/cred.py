"""Logging in over PB: challenge-response, a portal, realms, checkers, avatars.

The wire flow, as Twisted's (so either side can be Twisted)::

    root.callRemote("login", username)            -> (challenge, challenger)
    challenger.callRemote("respond", respond(challenge, password), mind)
                                                  -> a reference to the avatar
    root.callRemote("loginAnonymous", mind)       -> a reference to the avatar

The password never crosses: the client sends md5(md5(password) + challenge).
On the server, a :class:`Portal` asks its checkers who the credentials belong
to, then its realm for that user's avatar; calls on the avatar's reference run
its ``perspective_*`` methods, with the avatar as the perspective that
:class:`~pbcore.flavors.Viewable` results are seen through. The realm's logout
runs exactly once: when the client lets go of the avatar, or when the
connection drops. A wrong password and an unknown user are the same error,
:class:`Unauthorized`.

Checkers and realms may be plain or ``async`` (so a user store can be asked
over the network); the login methods are coroutines, which an adapter awaits.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import secrets
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from .errors import NoSuchMethod
from .flavors import AsReferenceable, Jellyable, Referenceable, RemoteReference, set_wire_name

__all__ = [
    "ANONYMOUS",
    "AllowAnonymousAccess",
    "Anonymous",
    "Avatar",
    "ICredentialsChecker",
    "IPerspective",
    "IRealm",
    "IUsernameMD5Password",
    "InMemoryPasswordChecker",
    "LoginFailed",
    "Portal",
    "Unauthorized",
    "UnhandledCredentials",
    "UsernamePassword",
    "challenge",
    "respond",
]


class LoginFailed(Exception):
    """A login did not succeed (it crosses as Twisted's ``twisted.cred.error.LoginFailed``)."""


class _Refusal(Exception):
    """Stands for Twisted's ``twisted.cred.error.Unauthorized`` among a refusal's parents."""


class Unauthorized(LoginFailed, _Refusal):
    """The credentials were refused. It never says whether the user or the password was wrong."""

    def __init__(self, message: str = "Unauthorized login") -> None:
        super().__init__(message)


class UnhandledCredentials(LoginFailed):
    """No checker of the portal takes this kind of credentials."""


# On the wire these are Twisted's classes, with Twisted's parents, so that a
# Twisted client's trap(UnauthorizedLogin), trap(LoginFailed) or
# trap(error.Unauthorized) matches a refusal from either side.
set_wire_name(LoginFailed, "twisted.cred.error.LoginFailed")
set_wire_name(_Refusal, "twisted.cred.error.Unauthorized")
set_wire_name(Unauthorized, "twisted.cred.error.UnauthorizedLogin")
set_wire_name(UnhandledCredentials, "twisted.cred.error.UnhandledCredentials")


def challenge() -> bytes:
    """A fresh random challenge (16 bytes from :mod:`secrets`)."""
    return secrets.token_bytes(16)


def respond(challenge: bytes, password: bytes | str) -> bytes:
    """The response to *challenge* for *password*: md5(md5(password) + challenge)."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    return hashlib.md5(hashlib.md5(password).digest() + challenge).digest()


# -- credentials ---------------------------------------------------------------------------


@runtime_checkable
class IUsernameMD5Password(Protocol):
    """A username and a way to check a password without having it."""

    username: bytes

    def checkPassword(self, password: bytes) -> bool:
        """Whether these credentials were made with *password*."""
        ...

    def checkMD5Password(self, md5Password: bytes) -> bool:
        """Whether these credentials were made with a password whose MD5 digest is *md5Password*."""
        ...


class UsernamePassword:
    """A username and password, as a client logs in with (the password stays on the client)."""

    def __init__(self, username: bytes | str, password: bytes | str) -> None:
        self.username = username.encode("utf-8") if isinstance(username, str) else username
        self.password = password.encode("utf-8") if isinstance(password, str) else password

    def checkPassword(self, password: bytes) -> bool:
        return hmac.compare_digest(self.password, password)


class Anonymous:
    """No credentials: an anonymous login."""


#: The avatar id an anonymous login is given.
ANONYMOUS = object()


class _ChallengeResponse:
    """What the server knows of a username/password login: the challenge and the response."""

    def __init__(self, username: bytes, challenge: bytes, response: bytes) -> None:
        self.username = username
        self.challenge = challenge
        self.response = response

    def checkPassword(self, password: bytes) -> bool:
        return self.checkMD5Password(hashlib.md5(password).digest())

    def checkMD5Password(self, md5Password: bytes) -> bool:
        expected = hashlib.md5(md5Password + self.challenge).digest()
        return hmac.compare_digest(expected, self.response)


# -- checkers, realms, the portal ------------------------------------------------------------


class ICredentialsChecker(Protocol):
    """Decides whose credentials these are."""

    #: The credential types this checker understands.
    credentialInterfaces: Sequence[type]

    def requestAvatarId(self, credentials: Any) -> Any:
        """The avatar id, or raise :class:`Unauthorized` (may be a coroutine)."""
        ...


class IRealm(Protocol):
    """Makes the avatar for an avatar id."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        """``(interface, avatar, logout)`` for *avatarId* (may be a coroutine)."""
        ...


class InMemoryPasswordChecker:
    """Usernames and passwords kept in memory: ``InMemoryPasswordChecker(alice=b"secret")``."""

    credentialInterfaces: Sequence[type] = (IUsernameMD5Password, UsernamePassword)

    def __init__(self, **users: bytes | str) -> None:
        self.users = {
            name.encode("utf-8"): password.encode("utf-8") if isinstance(password, str) else password
            for name, password in users.items()
        }

    def addUser(self, username: bytes | str, password: bytes | str) -> None:
        """Add or replace one user."""
        name = username.encode("utf-8") if isinstance(username, str) else username
        self.users[name] = password.encode("utf-8") if isinstance(password, str) else password

    def requestAvatarId(self, credentials: Any) -> bytes:
        # An unknown user is checked against a dummy password, so that both
        # failures take the same path and say the same thing.
        password = self.users.get(credentials.username, b"\0unknown user\0")
        known = credentials.username in self.users
        if credentials.checkPassword(password) and known:
            return credentials.username  # type: ignore[no-any-return]
        raise Unauthorized()


class AllowAnonymousAccess:
    """Lets anonymous logins through, as :data:`ANONYMOUS`."""

    credentialInterfaces: Sequence[type] = (Anonymous,)

    def requestAvatarId(self, credentials: Any) -> object:
        return ANONYMOUS


async def _settled(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class Portal:
    """Joins checkers (who is this?) and a realm (what do they get?)."""

    def __init__(self, realm: IRealm, checkers: Sequence[ICredentialsChecker] = ()) -> None:
        self.realm = realm
        self.checkers: list[ICredentialsChecker] = list(checkers)

    def registerChecker(self, checker: ICredentialsChecker) -> None:
        """Add a checker."""
        self.checkers.append(checker)

    async def login(self, credentials: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Callable[[], object]]:
        """Check *credentials*, then ask the realm: ``(interface, avatar, logout)``."""
        for checker in self.checkers:
            if any(isinstance(credentials, kind) for kind in checker.credentialInterfaces):
                avatar_id = await _settled(checker.requestAvatarId(credentials))
                result = await _settled(self.realm.requestAvatar(avatar_id, mind, *interfaces))
                interface, avatar, logout = result
                return interface, avatar, logout
        raise UnhandledCredentials(f"no checker for {type(credentials).__name__} credentials")

    def rootObject(self, broker: Any) -> _PortalWrapper:
        """A portal can be a server's root: each connection gets a login root."""
        return _PortalWrapper(self, broker)


# -- avatars ---------------------------------------------------------------------------------


@runtime_checkable
class IPerspective(Protocol):
    """A logged-in user's view of the service: the peer calls its ``perspective_*`` methods."""

    def perspectiveMessageReceived(self, broker: Any, message: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        """Run ``perspective_<message>``; its result may be an awaitable."""
        ...


class Avatar:
    """A default IPerspective: calls run ``perspective_<name>`` methods."""

    def perspectiveMessageReceived(self, broker: Any, message: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        method = getattr(self, "perspective_" + message, None)
        if method is None:
            raise NoSuchMethod(f"No such method: perspective_{message}")
        return method(*args, **kw)


class _JellyableAvatarMixin:
    """Turns a realm's answer into something to send, and arranges the logout."""

    broker: Any

    def _cbLogin(self, result: tuple[Any, Any, Callable[[], object]]) -> Any:
        _, avatar, logout = result
        if not isinstance(avatar, Jellyable):
            reference = AsReferenceable(avatar, "perspective")
            reference.perspective = avatar  # answers are serialized for the avatar
            avatar = reference
        pending = [logout]

        def logout_once() -> None:
            if pending:
                pending.pop()()

        self.broker.on_release(avatar, logout_once)
        self.broker.notifyOnDisconnect(logout_once)
        return avatar


class _PortalWrapper(Referenceable, _JellyableAvatarMixin):
    """The root a client logs in through (one per connection)."""

    def __init__(self, portal: Portal, broker: Any) -> None:
        self.portal = portal
        self.broker = broker

    def remote_login(self, username: bytes | str) -> tuple[bytes, _PortalAuthChallenger]:
        if not isinstance(username, (bytes, str)):
            raise Unauthorized()  # a list, say: refused like any wrong name, not a TypeError from a checker
        name = username.encode("utf-8") if isinstance(username, str) else username
        c = challenge()
        return c, _PortalAuthChallenger(self.portal, self.broker, name, c)

    async def remote_loginAnonymous(self, mind: RemoteReference | None) -> Any:
        return self._cbLogin(await self.portal.login(Anonymous(), mind, IPerspective))


class _PortalAuthChallenger(Referenceable, _JellyableAvatarMixin):
    """Holds one challenge until the client responds to it."""

    def __init__(self, portal: Portal, broker: Any, username: bytes, challenge: bytes) -> None:
        self.portal = portal
        self.broker = broker
        self.username = username
        self.challenge = challenge
        #: Whether the challenge has been answered (it takes one answer, right or wrong).
        self.answered = False

    async def remote_respond(self, response: bytes, mind: RemoteReference | None) -> Any:
        if self.answered or not isinstance(response, bytes):
            raise Unauthorized()
        self.answered = True  # a challenge is good for one answer, right or wrong
        credentials = _ChallengeResponse(self.username, self.challenge, response)
        return self._cbLogin(await self.portal.login(credentials, mind, IPerspective))


class _PortalRoot:
    """Makes a Portal usable as a server's root (Portal.rootObject does the same)."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    def rootObject(self, broker: Any) -> _PortalWrapper:
        return _PortalWrapper(self.portal, broker)
