"""Raw PB peers for the attacks: a client that writes any s-expression, and a hostile server.

Neither ever unjellies what it receives (that is the victim's job): they do
the PB handshake with :mod:`pbcore.banana` alone, write s-expressions as they
are, and read the peer's messages as s-expressions. Every socket operation is
bounded by a timeout.

:class:`RawPeer` is the attacker's client::

    peer = RawPeer.connect("127.0.0.1", port)
    request = peer.send_call(b"root", b"login", bombs.args(bomb))
    reply = peer.wait_reply(request, timeout=5.0)       # Reply("error", failure sexp, seconds)

:class:`HostileServer` accepts PB clients in a thread of its own and answers
every call they make with what its *reply* function builds (a bomb answer, a
bomb error).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import attrs

from pbcore import banana
from pbcore.cred import respond
from pbcore.errors import BananaError

from . import bombs
from .bombs import Sexp

__all__ = ["HostileServer", "NoReply", "PeerClosed", "RawPeer", "Reply", "failure_fields", "preview"]

log = logging.getLogger("pbcore.tests.hostile")

PB_VERSION: Final = 6
#: What the raw peers accept from their peer: far more than any pbcore peer sends.
LIMITS: Final = banana.Limits(max_expression_bytes=64 * 1024 * 1024)
#: How often a wait looks at its give-up condition.
TICK: Final = 0.02
#: How long one write may block (a server busy with a bomb reads nothing meanwhile).
SEND_TIMEOUT: Final = 10.0


class PeerClosed(Exception):
    """The peer closed the connection (or reset it)."""


class NoReply(Exception):
    """No reply came: the wait ran out, or its give-up condition said to stop (the message says which)."""


@attrs.frozen
class Reply:
    """The peer's answer (``kind`` "answer") or error answer (``kind`` "error") to one call."""

    kind: str
    body: Sexp
    seconds: float


def _encode(sexp: Sexp, dialect: bytes) -> bytes:
    return banana.encode(sexp, dialect, LIMITS)


class _Stream:
    """One socket and its Banana decoder, in either PB role."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = banana.Decoder(b"none", LIMITS)
        self.dialect = b"none"
        self.closed = False

    def send(self, sexp: Sexp) -> None:
        self.send_raw(_encode(sexp, self.dialect))

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.settimeout(SEND_TIMEOUT)
            self.sock.sendall(data)
        except OSError as error:
            self.closed = True
            raise PeerClosed(f"sending failed: {error}") from None

    def set_dialect(self, dialect: bytes) -> None:
        self.dialect = dialect
        self.decoder.dialect = dialect

    def receive(self, timeout: float) -> Sexp:
        """The next expression; TimeoutError if none completes within *timeout*; PeerClosed at the end."""
        deadline = time.monotonic() + timeout
        while True:
            expression = self.decoder.next_expression()
            if expression is not None:
                return expression
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete expression within {timeout} s")
            self.sock.settimeout(min(left, TICK))
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as error:
                self.closed = True
                raise PeerClosed(f"receiving failed: {error}") from None
            if not data:
                self.closed = True
                raise PeerClosed("the peer closed the connection")
            self.decoder.feed(data)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


class RawPeer:
    """An attacker's PB client: the handshake by hand, then any s-expression it is given."""

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream
        self._next_request = 0
        #: Replies read while waiting for another one: request id -> Reply.
        self._early: dict[int, Reply] = {}
        #: Other messages the peer sent (decrefs, didNotUnderstand, ...), for diagnosis.
        self.other: list[Sexp] = []

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = 5.0) -> RawPeer:
        """Connect and do the client's half of the handshake (dialect ``pb``, version 6)."""
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = _Stream(sock)
        try:
            offer = stream.receive(timeout)
            if not isinstance(offer, list) or b"pb" not in offer:
                raise PeerClosed(f"unexpected dialect offer {offer!r:.80}")
            stream.send(b"pb")
            stream.set_dialect(b"pb")
            stream.send([b"version", PB_VERSION])
            version = stream.receive(timeout)
            if version != [b"version", PB_VERSION]:
                raise PeerClosed(f"unexpected version message {version!r:.80}")
        except BaseException:
            stream.close()
            raise
        return cls(stream)

    @property
    def closed(self) -> bool:
        return self._stream.closed

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, sexp: Sexp) -> None:
        """Write one s-expression (in the ``pb`` dialect)."""
        self._stream.send(sexp)

    def send_raw(self, data: bytes) -> None:
        self._stream.send_raw(data)

    def send_call(self, object_id: bytes | int, method: bytes, args_sexp: Sexp, kwargs_sexp: Sexp | None = None) -> int:
        """Send a call (answer required); its request id."""
        self._next_request += 1
        self.send(bombs.call(self._next_request, object_id, method, args_sexp, kwargs_sexp))
        return self._next_request

    def wait_reply(self, request_id: int, timeout: float, give_up: Callable[[], str | None] | None = None) -> Reply:
        """The reply to call *request_id*.

        NoReply when *timeout* runs out or *give_up* (looked at every few ms)
        returns a reason; PeerClosed if the connection ends first.
        """
        start = time.monotonic()
        while True:
            early = self._early.pop(request_id, None)
            if early is not None:
                return early
            if give_up is not None:
                reason = give_up()
                if reason is not None:
                    raise NoReply(reason)
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                raise NoReply(f"no reply within {timeout} s")
            try:
                message = self._stream.receive(min(TICK * 5, timeout - elapsed))
            except TimeoutError:
                continue
            seconds = time.monotonic() - start
            if (
                isinstance(message, list)
                and len(message) == 3
                and message[0] in (b"answer", b"error")
                and isinstance(message[1], int)
            ):
                self._early[message[1]] = Reply(message[0].decode(), message[2], seconds)
            else:
                self.other.append(message)

    def call(
        self,
        object_id: bytes | int,
        method: bytes,
        args_sexp: Sexp,
        kwargs_sexp: Sexp | None = None,
        timeout: float = 5.0,
    ) -> Reply:
        """Send a call and wait for its reply."""
        return self.wait_reply(self.send_call(object_id, method, args_sexp, kwargs_sexp), timeout)

    # -- logging in by hand ----------------------------------------------------------

    def login(self, username: str, password: str, timeout: float = 5.0) -> int:
        """The challenge-response login; the avatar's object id."""
        challenger = self.challenge(username, timeout)
        challenge, luid = challenger
        reply = self.call(luid, b"respond", bombs.args(respond(challenge, password), bombs.none()), timeout=timeout)
        return _remote_id(reply, "respond")

    def challenge(self, username: str, timeout: float = 5.0) -> tuple[bytes, int]:
        """The first login step: ``root.login(username)``; (the challenge, the challenger's object id)."""
        reply = self.call(b"root", b"login", bombs.args(username.encode()), timeout=timeout)
        body = reply.body
        if (
            reply.kind != "answer"
            or not isinstance(body, list)
            or len(body) != 3
            or body[0] != b"tuple"
            or not isinstance(body[1], bytes)
        ):
            raise AssertionError(f"login() was not answered with a challenge: {reply.kind} {preview(body)}")
        return body[1], _remote_id(Reply("answer", body[2], reply.seconds), "login")

    def login_anonymous(self, timeout: float = 5.0) -> int:
        """``root.loginAnonymous(None)``; the avatar's object id."""
        return _remote_id(self.call(b"root", b"loginAnonymous", bombs.args(bombs.none()), timeout=timeout), "login")


def _remote_id(reply: Reply, what: str) -> int:
    body = reply.body
    if reply.kind != "answer" or not isinstance(body, list) or len(body) != 2 or body[0] != b"remote":
        raise AssertionError(f"{what} was not answered with a reference: {reply.kind} {preview(body)}")
    luid = body[1]
    assert isinstance(luid, int)
    return luid


# ---------------------------------------------------------------------------
# Reading replies without unjellying them


def failure_fields(body: Sexp) -> dict[str, Sexp]:
    """The state of a failure copy (``[tag, [dictionary, [key, value], ...]]``), keys as str.

    Text values (``[unicode, bytes]``) come back as str, byte strings as
    str too; other values as they are (s-expressions). Empty if *body* is
    not a failure copy.
    """
    if not (isinstance(body, list) and len(body) == 2 and isinstance(body[0], bytes)):
        return {}
    state = body[1]
    if isinstance(state, list) and state[:1] == [b"reference"] and len(state) == 3:
        state = state[2]
    if not (isinstance(state, list) and state[:1] == [b"dictionary"]):
        return {}
    fields: dict[str, Sexp] = {"tag": body[0].decode("utf-8", "replace")}
    for pair in state[1:]:
        if isinstance(pair, list) and len(pair) == 2:
            key, value = _plain_text(pair[0]), pair[1]
            if isinstance(key, str):
                fields[key] = _plain_text(value)
    return fields


def _plain_text(sexp: Sexp) -> Any:
    if isinstance(sexp, bytes):
        return sexp.decode("utf-8", "replace")
    if isinstance(sexp, list) and len(sexp) == 2 and sexp[0] == b"unicode" and isinstance(sexp[1], bytes):
        return sexp[1].decode("utf-8", "replace")
    return sexp


def error_summary(body: Sexp) -> tuple[str, str]:
    """(the remote error's type name, its message) from an error answer's body, bounded."""
    fields = failure_fields(body)
    kind = fields.get("type", fields.get("tag", "?"))
    value = fields.get("value", body)
    return (kind if isinstance(kind, str) else preview(kind)), (value if isinstance(value, str) else preview(value))


def preview(sexp: Sexp, limit: int = 200) -> str:
    """A bounded rendering of an s-expression (an expanded value is never walked: these are trees)."""
    out: list[str] = []
    budget = [limit]

    def walk(item: Sexp) -> None:
        if budget[0] <= 0:
            return
        if isinstance(item, list):
            out.append("[")
            budget[0] -= 1
            for index, sub in enumerate(item):
                if budget[0] <= 0:
                    break
                if index:
                    out.append(", ")
                walk(sub)
            out.append("]")
        else:
            piece = repr(item)[: max(budget[0], 0) + 3]
            out.append(piece)
            budget[0] -= len(piece)

    walk(sexp)
    text = "".join(out)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------
# The hostile server


class HostileServer:
    """A PB server on 127.0.0.1 that answers every call with ``reply(request_id)``.

    *reply* returns a whole message (see :func:`bombs.answer` and
    :func:`bombs.error`). Each connection runs in a daemon thread; the
    server never unjellies anything. ``calls`` counts the calls answered.
    """

    def __init__(self, reply: Callable[[int], Sexp]) -> None:
        self._reply = reply
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TICK * 5)
        self.port: int = self._listener.getsockname()[1]
        self.calls = 0
        self._stop = threading.Event()
        self._streams: list[_Stream] = []
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept_loop, name="hostile-accept", daemon=True)
        self._accepter.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            stream = _Stream(sock)
            self._streams.append(stream)
            thread = threading.Thread(target=self._serve, args=(stream,), name="hostile-conn", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, stream: _Stream) -> None:
        try:
            stream.send([b"pb", b"none"])
            choice = stream.receive(5.0)
            if choice not in (b"pb", b"none"):
                return
            assert isinstance(choice, bytes)
            stream.set_dialect(choice)
            stream.send([b"version", PB_VERSION])
            while not self._stop.is_set():
                try:
                    message = stream.receive(TICK * 5)
                except TimeoutError:
                    continue
                if isinstance(message, list) and message[:1] == [b"message"] and len(message) == 7:
                    request_id = message[1]
                    assert isinstance(request_id, int)
                    stream.send(self._reply(request_id))
                    self.calls += 1
        except (PeerClosed, TimeoutError, BananaError, AssertionError) as error:
            log.debug("hostile server: connection ended: %s", error)
        finally:
            stream.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for stream in list(self._streams):
            stream.close()
        self._accepter.join(2.0)
        for thread in self._threads:
            thread.join(2.0)

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def capture(messages: list[Sexp]) -> bytes:
    """The bytes a client receives from a server that sends *messages* after the handshake.

    The dialect offer (``none`` dialect), the version, then each message in
    the ``pb`` dialect: what ``pbcore decode`` reads from a capture.
    """
    data = _encode([b"pb", b"none"], b"none") + _encode([b"version", PB_VERSION], b"pb")
    for message in messages:
        data += _encode(message, b"pb")
    return data
