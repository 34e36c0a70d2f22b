"""A real Twisted PB peer in its own process, for interop tests over real sockets.

This script is run as a subprocess (see ``tests/interop/peers.py``); it imports only
Twisted, never pbcore, so it is the reference implementation talking for itself.

Server mode::

    python tests/interop/twisted_peer.py server [--port 0] [--login] [--timeout 60] [--log FILE]

listens on 127.0.0.1 (port 0 picks a free one), prints ``PORT <n>`` on stdout once
listening, and serves until its stdin is closed or ``--timeout`` seconds have passed.
With ``--log FILE`` Twisted's log (``twisted.python.log``) goes to that file.
Without ``--login`` the root object (one per connection) answers:

==========================  ======================================================
``echo(*a, **kw)``          ``[list(a), kw]``
``big(size)``               ``b"x" * size``
``thing(n)``                a Referenceable whose ``n()`` answers ``n``
``fail()``                  raises ``ValueError("nope")`` (an unexpected error)
``known()``                 raises ``pb.Error("known")`` (an expected error)
``refused()``               raises ``Refused("refused")``, a ``pb.Error`` subclass
                            named ``twisted_peer.Refused``
``point()``                 a Copyable, copy tag ``twisted_peer.TwistedPoint``, x=3, y=4
``accept_point(p)``         ``{"class": C, "x": p.x, "y": p.y}`` where ``C`` is the
                            class name of the copy received (``TwistedPointCopy`` for
                            the tag ``twisted_peer.TwistedPoint``)
``counter()``               a Cacheable, copy tag ``twisted_peer.Counter``, state
                            ``{"value": v}``; observers get ``callRemote("value", v)``
``bump()``                  increments the counter, notifies observers, answers the value
``observers()``             how many caches of the counter are observed
``keep_cache(c)``           keeps ``c`` (a cache of the peer's ``twisted_peer.Counter``),
                            answers its value
``kept_value()``            the kept cache's value now (as the peer's updates left it)
``drop_cache()``            lets go of the kept cache (the peer then stops observing)
``note(x)``                 appends ``x`` to this connection's notes, answers None
                            (for one-way calls)
``notes()``                 the notes so far, in order
``refs()``                  how many objects this connection's broker holds for the peer
                            (``len(broker.localObjects)``, the root included)
``call_back(ref, x)``       ``ref.callRemote("twice", x)``
``key_error()``             raises ``KeyError("missing")``
``async_fail(ref)``         a Deferred that errbacks with ``ValueError("later")``
                            once ``ref.callRemote("twice", 1)`` has answered
``unjellyable()``           an instance of ``twisted_peer.Opaque``, a class PB may
                            not send (Twisted sends an ``unpersistable`` placeholder)
``bad_copy()``              a Copyable whose ``getStateToCopy`` raises
                            ``RuntimeError("no state")``
``relay(ref)``              ``ref.callRemote("fail")``: the peer's failure, relayed
==========================  ======================================================

With ``--login`` the root is a Portal's login root instead: checkers are an
in-memory database (``alice`` / ``secret``) and anonymous access; the avatar answers
``perspective_hello()`` -> ``"hello <name>"`` (``anonymous`` for the anonymous
login), ``perspective_echo(x)`` -> ``x`` and ``perspective_board()`` -> a Viewable
whose ``view_whoami(perspective)`` answers the name of the perspective it was reached
through.

Client mode::

    python tests/interop/twisted_peer.py client --host H --port P --script NAME [--timeout 30]

connects with ``pb.PBClientFactory`` to a server offering the root above (or the
login root, for the ``login`` script), runs the script and prints one JSON object
per line per step, then exits 0.  A step that worked prints
``{"step": S, "ok": true, "value": V}``; one that failed prints
``{"step": S, "ok": false, "type": T, "message": M, "parents": P}`` where ``T`` is
the failure's type as a string (for a remote error, the qualified name of the remote
exception class, e.g. ``"builtins.ValueError"``) and ``P`` the qualified names of
that class and its bases, which ``Failure.check`` matches.  Values are made
JSON-friendly: tuples become lists, bytes become ``{"bytes": "<latin-1 text>"}``,
dict keys become strings, a RemoteReference becomes ``"<reference>"`` and anything
else its ``repr``.  If the connection fails or the whole run exceeds ``--timeout``, a
``{"step": "fatal", ...}`` line is printed and the exit status is 1.

Scripts (the step names are the JSON ``step`` values):

``basic``
    ``echo`` (``echo(1, "two", b"three", 4.5, None, [1, 2], key="value")``), ``big``
    (the length of ``big(300000)``), ``thing`` (``thing(5)`` then ``n()`` on the
    reference: value 5), ``point`` (``{"class": "TwistedPointCopy", "x": 3, "y": 4}``),
    ``accept_point`` (``accept_point(TwistedPoint(1, 2))``: the server's answer),
    ``call_back`` (``call_back(ref, 21)`` with a local Referenceable whose
    ``twice(x)`` is ``2 * x``: 42), ``note`` (20 one-way calls ``note(0)`` ...
    ``note(19)`` with ``pbanswer=False``: value true if each returned None) and
    ``notes`` (``notes()`` after them: ``[0, ..., 19]`` on a fresh server).
``errors``
    ``fail`` (type ``builtins.ValueError``), ``known`` (``twisted.spread.pb.Error``),
    ``refused`` (the server's ``pb.Error`` subclass), ``missing`` (a method the root
    does not have: ``twisted.spread.flavors.NoSuchMethod``), ``bad_args``
    (``thing(1, 2)``: ``builtins.TypeError``), ``alive`` (``echo("alive")`` after them).
``refs``
    ``before`` (``refs()``), ``thing`` (``thing(5).n()``), ``held`` (``refs()`` while
    the reference is alive: before + 1), ``after`` (``refs()`` once the reference is
    dropped and garbage collected: equal to before again), ``call_back``
    (``call_back(ref, 21)`` as in ``basic``: 42), ``after_call_back`` (``refs()`` again).
``cache``
    ``counter`` (the cached state, ``{"value": 0}`` on a fresh server), ``bump``
    (the answer), ``cached`` (the local cache's value after the bump's answer: the
    update arrives before the answer), ``bump2`` and ``cached2`` likewise,
    ``observed`` (``observers()`` while the cache is held: 1), ``released``
    (``observers()`` once the cache is dropped and garbage collected: 0); then a
    Cacheable of the client's own (a ``twisted_peer.Counter`` at 0) goes the other
    way: ``keep_cache`` (``keep_cache(counter)``: 0), ``observing`` (how many caches
    of it the client observes: 1), ``kept`` (``kept_value()`` after a local bump: 1),
    ``kept2`` (after another: 2), ``drop_cache``, and ``stopped`` (how many it
    observes once the server let go, polled with ``echo`` calls: 0).
``login``
    ``login`` (as alice/secret), ``hello`` (``hello()``: ``"hello alice"``), ``echo``
    (``echo("x")`` on the avatar), ``board`` (``board()``: a reference), ``whoami``
    (``whoami()`` on the board: ``"alice"``), ``wrong_password`` (the failure, type
    ``twisted.cred.error.UnauthorizedLogin``), ``unknown_user`` (login as ``mallory``:
    the same failure), ``anonymous_login``, ``anonymous`` (``hello()`` on the
    anonymous avatar: ``"hello anonymous"``) and ``anonymous_whoami`` (its board's
    ``whoami()``: ``"anonymous"``).

``faults``
    Each fault method above, called on the root: ``fail``, ``refused``, ``key_error``,
    ``async_fail`` (with a local Referenceable whose ``twice(x)`` is ``2 * x``),
    ``unjellyable``, ``bad_copy`` and ``relay`` (with a local Referenceable whose
    ``fail()`` raises ``KeyError("relayed")``).  Each step's value describes what came
    back (see ``describe_fault``): for a failure its class name, ``type`` (as a string
    and as received), ``value``, ``message``, ``parents``, ``traceback`` (the remote
    traceback's text), and what ``check`` and ``trap`` give for the original exception
    class and for ``pb.Error``; for an answer, the answer; and ``alive``, the answer to
    ``echo("alive")`` made right after it.

Every wait is bounded (each call by ``STEP_TIMEOUT``, the run by ``--timeout``), so the
process always exits.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import json
import sys
import threading
from collections.abc import Callable, Generator
from typing import Any

# Twisted is imported untyped on purpose: this is a peer to talk to, not code to check.
pb: Any = importlib.import_module("twisted.spread.pb")
checkers: Any = importlib.import_module("twisted.cred.checkers")
credentials: Any = importlib.import_module("twisted.cred.credentials")
portal: Any = importlib.import_module("twisted.cred.portal")
defer: Any = importlib.import_module("twisted.internet.defer")
task: Any = importlib.import_module("twisted.internet.task")
implementer: Any = importlib.import_module("zope.interface").implementer
THE_REACTOR: Any = importlib.import_module("twisted.internet.reactor")

STEP_TIMEOUT = 10.0
#: How many round trips a script waits for the peer to let go of something.
POLL_ROUNDS = 100

# -- server side ------------------------------------------------------------------------


class Thing(pb.Referenceable):  # type: ignore[misc]
    def __init__(self, n: Any) -> None:
        self.n = n

    def remote_n(self) -> Any:
        return self.n


class Refused(pb.Error):  # type: ignore[misc]
    """An expected error of the application's own: a ``pb.Error`` subclass."""


# Its peers see it as ``twisted_peer.Refused``, whether this file runs as a script or not.
Refused.__module__ = "twisted_peer"


class Opaque:
    """An instance PB may not send: neither Copyable nor allowed by the security options."""


Opaque.__module__ = "twisted_peer"


class BadCopy(pb.Copyable):  # type: ignore[misc]
    """A Copyable that cannot give its state."""

    def getStateToCopy(self) -> Any:
        raise RuntimeError("no state")


class TwistedPoint(pb.Copyable):  # type: ignore[misc]
    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y

    def getTypeToCopy(self) -> bytes:
        return b"twisted_peer.TwistedPoint"


class Counter(pb.Cacheable):  # type: ignore[misc]
    def __init__(self) -> None:
        self.value = 0
        self.observers: list[Any] = []

    def getTypeToCopy(self) -> bytes:
        return b"twisted_peer.Counter"

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> dict[str, int]:
        self.observers.append(observer)
        return {"value": self.value}

    def stoppedObserving(self, perspective: Any, observer: Any) -> None:
        if observer in self.observers:
            self.observers.remove(observer)

    def bump(self) -> int:
        self.value += 1
        for observer in self.observers:
            observer.callRemote("value", self.value)
        return self.value


class PeerRoot(pb.Root):  # type: ignore[misc]
    """The root object of one connection: it knows its broker."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.counter = Counter()
        self.kept: Any = None
        self.notes: list[Any] = []

    def remote_echo(self, *args: Any, **kw: Any) -> list[Any]:
        return [list(args), kw]

    def remote_big(self, size: int) -> bytes:
        return b"x" * size

    def remote_thing(self, n: Any) -> Thing:
        return Thing(n)

    def remote_fail(self) -> None:
        raise ValueError("nope")

    def remote_known(self) -> None:
        raise pb.Error("known")

    def remote_refused(self) -> None:
        raise Refused("refused")

    def remote_point(self) -> TwistedPoint:
        return TwistedPoint(3, 4)

    def remote_accept_point(self, point: Any) -> dict[str, Any]:
        return {"class": type(point).__name__, "x": point.x, "y": point.y}

    def remote_counter(self) -> Counter:
        return self.counter

    def remote_bump(self) -> int:
        return self.counter.bump()

    def remote_observers(self) -> int:
        return len(self.counter.observers)

    def remote_keep_cache(self, cache: Any) -> Any:
        self.kept = cache
        return cache.value

    def remote_kept_value(self) -> Any:
        return self.kept.value

    def remote_drop_cache(self) -> None:
        self.kept = None

    def remote_note(self, value: Any) -> None:
        self.notes.append(value)

    def remote_notes(self) -> list[Any]:
        return self.notes

    def remote_refs(self) -> int:
        return len(self.broker.localObjects)

    def remote_call_back(self, ref: Any, x: Any) -> Any:
        return ref.callRemote("twice", x)

    def remote_key_error(self) -> None:
        raise KeyError("missing")

    def remote_async_fail(self, ref: Any) -> Any:
        def fail(_: Any) -> None:
            raise ValueError("later")

        return ref.callRemote("twice", 1).addCallback(fail)

    def remote_unjellyable(self) -> Opaque:
        return Opaque()

    def remote_bad_copy(self) -> BadCopy:
        return BadCopy()

    def remote_relay(self, ref: Any) -> Any:
        return ref.callRemote("fail")


class RootPerConnection(pb.Root):  # type: ignore[misc]
    def rootObject(self, broker: Any) -> PeerRoot:
        return PeerRoot(broker)


class Board(pb.Viewable):  # type: ignore[misc]
    def view_whoami(self, perspective: User) -> str:
        return perspective.name


class User(pb.Avatar):  # type: ignore[misc]
    board = Board()

    def __init__(self, name: str) -> None:
        self.name = name

    def perspective_hello(self) -> str:
        return f"hello {self.name}"

    def perspective_echo(self, x: Any) -> Any:
        return x

    def perspective_board(self) -> Board:
        return self.board


@implementer(portal.IRealm)
class Realm:
    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("only pb.IPerspective")
        name = "anonymous" if avatar_id == checkers.ANONYMOUS else avatar_id.decode()
        return pb.IPerspective, User(name), lambda: None


def stop_when_stdin_closes() -> None:
    def wait() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        THE_REACTOR.callFromThread(stop)

    threading.Thread(target=wait, daemon=True).start()


def stop() -> None:
    if THE_REACTOR.running:
        THE_REACTOR.stop()


def run_server(port: int, login: bool, timeout: float, log_file: str | None = None) -> int:
    if log_file is not None:
        importlib.import_module("twisted.python.log").startLogging(open(log_file, "a"), setStdout=False)  # noqa: SIM115
    if login:
        the_portal = portal.Portal(
            Realm(),
            [checkers.InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret"), checkers.AllowAnonymousAccess()],
        )
        factory = pb.PBServerFactory(the_portal)
    else:
        factory = pb.PBServerFactory(RootPerConnection())
    listening = THE_REACTOR.listenTCP(port, factory, interface="127.0.0.1")
    print(f"PORT {listening.getHost().port}", flush=True)
    stop_when_stdin_closes()
    THE_REACTOR.callLater(timeout, stop)
    THE_REACTOR.run()
    return 0


# -- client side ------------------------------------------------------------------------


class TwistedPointCopy(pb.RemoteCopy):  # type: ignore[misc]
    x: int
    y: int


class CounterCache(pb.RemoteCache):  # type: ignore[misc]
    value: int

    def setCopyableState(self, state: dict[str, int]) -> None:
        self.value = state["value"]

    def observe_value(self, value: int) -> None:
        self.value = value


pb.setUnjellyableForClass(b"twisted_peer.TwistedPoint", TwistedPointCopy)
pb.setUnjellyableForClass(b"twisted_peer.Counter", CounterCache)


class Twice(pb.Referenceable):  # type: ignore[misc]
    def remote_twice(self, x: Any) -> Any:
        return 2 * x


class Faulty(pb.Referenceable):  # type: ignore[misc]
    def remote_fail(self) -> None:
        raise KeyError("relayed")


def plain(value: Any) -> Any:
    """A JSON-friendly form of a value received from the peer."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return {"bytes": value.decode("latin-1")}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {plain_key(key): plain(item) for key, item in value.items()}
    if isinstance(value, TwistedPointCopy):
        return {"class": "TwistedPointCopy", "x": value.x, "y": value.y}
    if isinstance(value, pb.RemoteReference):
        return "<reference>"
    return repr(value)


def plain_key(key: Any) -> str:
    return key.decode("latin-1") if isinstance(key, bytes) else str(key)


def report(step: str, ok: bool, **fields: Any) -> None:
    print(json.dumps({"step": step, "ok": ok, **fields}), flush=True)


def failure_type(reason: Any) -> str:
    kind = reason.type
    if isinstance(kind, bytes):
        return kind.decode("utf-8", "replace")
    if isinstance(kind, str):
        return kind
    return f"{kind.__module__}.{kind.__qualname__}"


StepGen = Generator[Any, Any, Any]


def inline_callbacks(function: Callable[..., StepGen]) -> Callable[..., Any]:
    """``defer.inlineCallbacks``, typed (a call returns a Deferred)."""
    wrapped: Callable[..., Any] = defer.inlineCallbacks(function)
    return wrapped


def step(name: str, make: Callable[[], Any], show: Callable[[Any], Any] = plain) -> Any:
    """Run one bounded step and print its outcome.

    Returns a Deferred that fires with the step's value, or None if it failed.  The
    failure is looked at as a Failure (not thrown into a generator, which would turn a
    CopiedFailure into a RemoteError), so its type is the remote exception's.
    """

    def ok(value: Any) -> Any:
        report(name, True, value=show(value))
        return value

    def failed(reason: Any) -> None:
        parents = [plain_key(parent) for parent in getattr(reason, "parents", [])]
        report(name, False, type=failure_type(reason), message=reason.getErrorMessage(), parents=parents)

    result = defer.maybeDeferred(make)
    result.addTimeout(STEP_TIMEOUT, THE_REACTOR)
    return result.addCallbacks(ok, failed)


@inline_callbacks
def settle() -> StepGen:
    """Collect garbage (so released references send their decrefs) and let them go out."""
    gc.collect()
    yield task.deferLater(THE_REACTOR, 0.05, lambda: None)


@inline_callbacks
def until_round_trip(root: Any, condition: Callable[[], bool]) -> StepGen:
    """Call ``echo`` until *condition* holds (at most ``POLL_ROUNDS`` round trips)."""
    for _ in range(POLL_ROUNDS):
        if condition():
            return
        gc.collect()
        yield root.callRemote("echo").addTimeout(STEP_TIMEOUT, THE_REACTOR)


@inline_callbacks
def script_basic(factory: Any) -> StepGen:
    root = yield factory.getRootObject().addTimeout(STEP_TIMEOUT, THE_REACTOR)
    yield step("echo", lambda: root.callRemote("echo", 1, "two", b"three", 4.5, None, [1, 2], key="value"))
    yield step("big", lambda: root.callRemote("big", 300_000), len)
    thing = yield root.callRemote("thing", 5).addTimeout(STEP_TIMEOUT, THE_REACTOR)
    yield step("thing", lambda: thing.callRemote("n"))
    yield step("point", lambda: root.callRemote("point"))
    yield step("accept_point", lambda: root.callRemote("accept_point", TwistedPoint(1, 2)))
    yield step("call_back", lambda: root.callRemote("call_back", Twice(), 21))
    returned = [root.callRemote("note", n, pbanswer=False) for n in range(20)]
    report("note", True, value=all(result is None for result in returned))
    yield step("notes", lambda: root.callRemote("notes"))


@inline_callbacks
def script_errors(factory: Any) -> StepGen:
    root = yield factory.getRootObject().addTimeout(STEP_TIMEOUT, THE_REACTOR)
    yield step("fail", lambda: root.callRemote("fail"))
    yield step("known", lambda: root.callRemote("known"))
    yield step("refused", lambda: root.callRemote("refused"))
    yield step("missing", lambda: root.callRemote("no_such_method"))
    yield step("bad_args", lambda: root.callRemote("thing", 1, 2))
    yield step("alive", lambda: root.callRemote("echo", "alive"))


@inline_callbacks
def script_refs(factory: Any) -> StepGen:
    root = yield factory.getRootObject().addTimeout(STEP_TIMEOUT, THE_REACTOR)
    yield step("before", lambda: root.callRemote("refs"))
    thing = yield root.callRemote("thing", 5).addTimeout(STEP_TIMEOUT, THE_REACTOR)
    yield step("thing", functools.partial(thing.callRemote, "n"))
    yield step("held", lambda: root.callRemote("refs"))
    del thing
    yield settle()
    yield step("after", lambda: root.callRemote("refs"))
    yield step("call_back", lambda: root.callRemote("call_back", Twice(), 21))
    yield settle()
    yield step("after_call_back", lambda: root.callRemote("refs"))


@inline_callbacks
def script_cache(factory: Any) -> StepGen:
    root = yield factory.getRootObject().addTimeout(STEP_TIMEOUT, THE_REACTOR)
    cache = yield step("counter", lambda: root.callRemote("counter"), lambda c: {"value": c.value})
    yield step("bump", lambda: root.callRemote("bump"))
    report("cached", cache is not None, value=getattr(cache, "value", None))
    yield step("bump2", lambda: root.callRemote("bump"))
    report("cached2", cache is not None, value=getattr(cache, "value", None))
    yield step("observed", lambda: root.callRemote("observers"))
    del cache
    yield settle()
    yield step("released", lambda: root.callRemote("observers"))

    mine = Counter()
    yield step("keep_cache", lambda: root.callRemote("keep_cache", mine))
    report("observing", True, value=len(mine.observers))
    mine.bump()
    yield step("kept", lambda: root.callRemote("kept_value"))
    mine.bump()
    yield step("kept2", lambda: root.callRemote("kept_value"))
    yield step("drop_cache", lambda: root.callRemote("drop_cache"))
    yield until_round_trip(root, lambda: not mine.observers)
    report("stopped", True, value=len(mine.observers))


@inline_callbacks
def script_login(factory: Any) -> StepGen:
    avatar = yield step(
        "login", lambda: factory.login(credentials.UsernamePassword(b"alice", b"secret")), lambda _: "<avatar>"
    )
    if avatar is not None:
        yield step("hello", lambda: avatar.callRemote("hello"))
        yield step("echo", lambda: avatar.callRemote("echo", "x"))
        board = yield step("board", lambda: avatar.callRemote("board"))
        if board is not None:
            yield step("whoami", lambda: board.callRemote("whoami"))
    yield step("wrong_password", lambda: factory.login(credentials.UsernamePassword(b"alice", b"wrong")))
    yield step("unknown_user", lambda: factory.login(credentials.UsernamePassword(b"mallory", b"secret")))
    anonymous = yield step("anonymous_login", lambda: factory.login(credentials.Anonymous()), lambda _: "<avatar>")
    if anonymous is not None:
        yield step("anonymous", lambda: anonymous.callRemote("hello"))
        anonymous_board = yield anonymous.callRemote("board").addTimeout(STEP_TIMEOUT, THE_REACTOR)
        yield step("anonymous_whoami", lambda: anonymous_board.callRemote("whoami"))


def describe_fault(reason: Any, original: Any) -> dict[str, Any]:
    """What a Twisted client sees of a failure, *original* being the exception class raised far away."""

    def trapped(kind: Any) -> str:
        try:
            return str(reason.trap(kind).__name__)
        except BaseException as error:  # trap re-raises what it does not match
            return f"raised {type(error).__name__}"

    def checked(kind: Any) -> Any:
        match = reason.check(kind)
        return None if match is None else match.__name__

    return {
        "class": type(reason).__name__,
        "type": failure_type(reason),
        "raw_type": repr(reason.type),
        "value": plain(reason.value),
        "message": reason.getErrorMessage(),
        "parents": [plain_key(parent) for parent in getattr(reason, "parents", [])],
        "traceback": plain(getattr(reason, "traceback", None)),
        "check": checked(original),
        "check_pb_error": checked(pb.Error),
        "trap": trapped(original),
        "trap_pb_error": trapped(pb.Error),
    }


@inline_callbacks
def script_faults(factory: Any) -> StepGen:
    root = yield factory.getRootObject().addTimeout(STEP_TIMEOUT, THE_REACTOR)
    faults: list[tuple[str, tuple[Any, ...], Any]] = [
        ("fail", (), ValueError),
        ("refused", (), Refused),
        ("key_error", (), KeyError),
        ("async_fail", (Twice(),), ValueError),
        ("unjellyable", (), TypeError),
        ("bad_copy", (), RuntimeError),
        ("relay", (Faulty(),), KeyError),
    ]
    for method, args, original in faults:
        outcome: dict[str, Any] = {}

        def answered(value: Any, outcome: dict[str, Any] = outcome) -> None:
            outcome["answer"] = plain(value)

        def failed(reason: Any, outcome: dict[str, Any] = outcome, original: Any = original) -> None:
            outcome["failure"] = describe_fault(reason, original)

        call = root.callRemote(method, *args).addTimeout(STEP_TIMEOUT, THE_REACTOR)
        yield call.addCallbacks(answered, failed)
        outcome["alive"] = plain((yield root.callRemote("echo", "alive").addTimeout(STEP_TIMEOUT, THE_REACTOR)))
        report(method, True, value=outcome)


SCRIPTS: dict[str, Callable[[Any], Any]] = {
    "basic": script_basic,
    "errors": script_errors,
    "refs": script_refs,
    "cache": script_cache,
    "login": script_login,
    "faults": script_faults,
}


def run_client(host: str, port: int, script: str, timeout: float) -> int:
    factory = pb.PBClientFactory()
    THE_REACTOR.connectTCP(host, port, factory, timeout=STEP_TIMEOUT)
    status = [1]

    def done(_: Any) -> None:
        status[0] = 0

    def fatal(reason: Any) -> None:
        report("fatal", False, type=failure_type(reason), message=reason.getErrorMessage())

    def finish(_: Any) -> None:
        factory.disconnect()
        THE_REACTOR.callLater(0.05, stop)

    def out_of_time() -> None:
        report("fatal", False, type="timeout", message=f"the script did not finish in {timeout} s")
        stop()

    run = defer.maybeDeferred(SCRIPTS[script], factory)
    run.addCallbacks(done, fatal)
    run.addBoth(finish)
    THE_REACTOR.callLater(timeout, out_of_time)
    THE_REACTOR.run()
    return status[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    modes = parser.add_subparsers(dest="mode", required=True)
    server = modes.add_parser("server")
    server.add_argument("--port", type=int, default=0)
    server.add_argument("--login", action="store_true")
    server.add_argument("--timeout", type=float, default=60.0)
    server.add_argument("--log", default=None)
    client = modes.add_parser("client")
    client.add_argument("--host", default="127.0.0.1")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--script", choices=sorted(SCRIPTS), required=True)
    client.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.mode == "server":
        return run_server(args.port, args.login, args.timeout, args.log)
    return run_client(args.host, args.port, args.script, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
