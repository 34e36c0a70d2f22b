"""The Broker: PB's connection state machine, with no I/O in it.

::

    broker = Broker(is_client=False, root=my_root)
    broker.connection_made()            # a server queues its dialect offer
    broker.receive_data(data)           # bytes from the peer
    for event in broker.events(): ...   # Ready, CallReceived, AnswerReceived, ...
    transport.write(broker.data_to_send())
    broker.connection_lost(reason)      # fails pending calls, runs notifiers

The broker keeps the object tables of one connection: the local objects the
peer holds references to (with their counts), and the calls waiting for an
answer. A call's pending result is made by ``pending_factory`` (the adapter
installs one that its event loop can await); the broker resolves it when the
answer arrives.

Bad input raises a :class:`~pbcore.errors.ProtocolError` from
:meth:`Broker.receive_data`, after the broker has closed: every pending call
has failed with :class:`~pbcore.errors.PBConnectionLost` and a
:class:`~pbcore.events.ConnectionClosed` event is queued. A call to a
missing method or object, or arguments that cannot be unjellied (a
:class:`~pbcore.errors.JellyError`: an unknown copy tag, say), is an error
*answer* instead, and an answer whose value cannot be unjellied fails just
that call: the messages were well formed, so the connection lives on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Generator
from typing import Any, NoReturn, Protocol

from .banana import DEFAULT_LIMITS, DIALECTS, Decoder, Encoder, Limits, Sexp
from .budget import DEFAULT_BUDGET, MemoryBudget, OverBudget
from .codec import ValueEncoder
from .errors import (
    BananaError,
    CallTimedOut,
    DeadReferenceError,
    Error,
    JellyError,
    ProtocolError,
    RemoteError,
    connection_lost_error,
)
from .events import (
    AnswerReceived,
    CallReceived,
    ConnectionClosed,
    DecRefReceived,
    ErrorReceived,
    Event,
    NotUnderstood,
    Ready,
)
from .flavors import (
    MAX_BROKER_REFS,
    Cacheable,
    CopyableFailure,
    Local,
    RemoteCache,
    RemoteCacheObserver,
    RemoteReference,
)
from .isolation import run_isolated
from .jelly import NOT_FLAT, Handler, SecurityOptions, Unjellier, globalSecurity, plain_reader
from .preview import preview
from .timers import DEFAULT_TIMEOUTS, Timeouts

__all__ = ["PROTOCOL_VERSION", "Broker", "Pending", "PendingCall"]

#: The PB protocol version both sides announce.
PROTOCOL_VERSION = 6

log = logging.getLogger("pbcore.broker")


class Pending(Protocol):
    """A call's result-to-be, as the broker sees it."""

    def resolve(self, value: Any) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class PendingCall:
    """The default pending result: a plain object with callbacks (no event loop needed).

    ``done``, ``result`` and ``error`` say where it stands;
    :meth:`add_callbacks` runs a callback now if it is already settled.
    """

    def __init__(self) -> None:
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self._callbacks: list[tuple[Callable[[Any], object], Callable[[BaseException], object]]] = []

    def resolve(self, value: Any) -> None:
        self._settle(value, None)

    def fail(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, value: Any, error: BaseException | None) -> None:
        if self.done:
            return
        self.done, self.result, self.error = True, value, error
        callbacks, self._callbacks = self._callbacks, []
        for on_result, on_error in callbacks:
            self._run(on_result, on_error)

    def add_callbacks(
        self, on_result: Callable[[Any], object], on_error: Callable[[BaseException], object] = lambda e: None
    ) -> None:
        """Call ``on_result(value)`` or ``on_error(exception)`` once it settles."""
        if self.done:
            self._run(on_result, on_error)
        else:
            self._callbacks.append((on_result, on_error))

    def _run(self, on_result: Callable[[Any], object], on_error: Callable[[BaseException], object]) -> None:
        if self.error is None:
            on_result(self.result)
        else:
            on_error(self.error)

    def __await__(self) -> Generator[PendingCall, None, Any]:
        """Await the result: the driver is handed this object until it settles.

        With no event loop, a driver runs the coroutine, moves bytes while it
        waits on a PendingCall, and resumes it once settled (see
        :meth:`pbcore.testing.BrokerPair.run`).
        """
        while not self.done:
            yield self
        return self.unwrap()

    def unwrap(self) -> Any:
        """The result, or raise the error; LookupError if not settled yet."""
        if not self.done:
            raise LookupError("the call has not been answered yet")
        if self.error is not None:
            raise self.error
        return self.result


class MessageError(ProtocolError):
    """A PB message has the wrong shape (arity or types)."""


_ROOT = b"root"


class Broker:
    """One PB connection's state: handshake, object tables, calls in flight.

    *root* (a :class:`~pbcore.flavors.Root` or anything with
    ``rootObject(broker)``) is what the peer reaches as ``b"root"``.
    *security* decides what may be unjellied; *limits* bound what the peer
    may send; *unsafe_tracebacks* sends tracebacks with errors.
    *pending_factory* makes the pending result of each call; *wake_up* is
    called when there is something new to send (from any thread: a collected
    reference queues its ``decref`` from a finalizer), so the adapter can
    schedule a flush of :meth:`data_to_send`. It must only schedule.
    *on_output*, if given, is called instead of *wake_up* when an operation
    made in the thread driving the broker (a call, an answer) has queued new
    output; the broker is then in a consistent state, so the adapter may take
    :meth:`data_to_send` at once rather than schedule a flush.

    When the broker closes (:meth:`connection_lost` from the adapter, or
    :meth:`close` from the application, from bad input, or from the broker
    itself refusing a peer over :data:`~pbcore.flavors.MAX_BROKER_REFS`), it
    calls *on_output* (else *wake_up*) once more: an adapter that then finds
    :attr:`closed` set writes what :meth:`data_to_send` still has and closes
    its transport at once. *peer* is the peer's address, for logs and the
    application (``broker.peer``); the adapter sets it. *budget* is the
    process-wide bound on unfinished messages this connection counts against
    (:data:`pbcore.budget.DEFAULT_BUDGET` unless given). With
    *settled_events* False, no :class:`~pbcore.events.AnswerReceived` or
    :class:`~pbcore.events.ErrorReceived` is queued when a call of ours is
    settled (its pending result is settled either way): an adapter that
    reads only :class:`~pbcore.events.CallReceived` saves an object per call.
    """

    version = PROTOCOL_VERSION

    # A connection's state is about 45 attributes, more than an instance's
    # shared-key dict holds: as slots an idle broker costs 1.2 KiB less. An
    # application may still set its own attributes (``__dict__`` is made then).
    __slots__ = (
        "__dict__",
        "__weakref__",
        "_cached_luids",
        "_connects",
        "_deadline_names",
        "_decoder",
        "_disconnects",
        "_encoders",
        "_events",
        "_handlers",
        "_journal",
        "_last_watch",
        "_luids",
        "_new_deadlines",
        "_next_luid",
        "_next_request",
        "_on_release",
        "_out",
        "_plain",
        "_probes",
        "_read_plain",
        "_ref_violations",
        "_releases",
        "_root",
        "_settled_events",
        "_waiting",
        "_watches",
        "budget",
        "bytes_received",
        "close_reason",
        "closed",
        "dialect",
        "first_bytes",
        "is_client",
        "limits",
        "localObjects",
        "locallyCachedObjects",
        "on_output",
        "peer",
        "pending_factory",
        "ready",
        "remotelyCachedObjects",
        "security",
        "serializingPerspective",
        "timeouts",
        "unsafe_tracebacks",
        "unserializingPerspective",
        "wake_up",
    )

    def __init__(
        self,
        is_client: bool,
        root: Any = None,
        *,
        security: SecurityOptions = globalSecurity,
        limits: Limits = DEFAULT_LIMITS,
        unsafe_tracebacks: bool = False,
        pending_factory: Callable[[], Pending] = PendingCall,
        wake_up: Callable[[], None] | None = None,
        on_output: Callable[[], None] | None = None,
        peer: Any = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        budget: MemoryBudget = DEFAULT_BUDGET,
        settled_events: bool = True,
    ) -> None:
        self.is_client = is_client
        self._settled_events = settled_events
        #: Where this connection reports the bytes of unfinished messages it holds (see pbcore.budget).
        self.budget = budget
        #: The peer's address (as the transport gives it), or None.
        self.peer = peer
        #: How long this connection waits (run by :class:`pbcore.timers.ConnectionTimers`).
        self.timeouts = timeouts
        #: Bytes received so far, and the first few of them (for a handshake's diagnosis).
        self.bytes_received = 0
        self.first_bytes = b""
        self._new_deadlines: list[tuple[int, float]] = []  # (request id, seconds), not armed yet
        self._deadline_names: dict[int, str] = {}  # request id -> method, for calls with a deadline
        self._probes: dict[int, None] = {}  # keepalive probes not answered (a dict: smaller than a set)
        self._watches: dict[int, tuple[Pending, BaseException]] = {}  # see watch()
        self._last_watch = 0
        self.security = security
        self.limits = limits
        self.unsafe_tracebacks = unsafe_tracebacks
        self.pending_factory = pending_factory
        self.wake_up = wake_up
        self.on_output = on_output
        self.dialect: bytes | None = None
        self.ready = False
        self.closed = False
        self.close_reason: BaseException | None = None
        self._decoder = Decoder(b"none", limits, untracked=True)
        self._encoders, self._plain, self._read_plain = _encoders(limits, security)
        self._out = bytearray()
        self._events: list[Event] = []
        self._root = root.rootObject(self) if root is not None and hasattr(root, "rootObject") else root
        #: luid -> Local: the objects the peer holds references to.
        self.localObjects: dict[Any, Local] = {}
        if self._root is not None:
            self.localObjects[_ROOT] = Local(self._root)
        self._luids: dict[Any, int] = {}  # processUniqueID -> luid
        self._next_luid = 0
        self._next_request = 0
        self._waiting: dict[int, Pending] = {}
        #: luid -> Local: the Cacheables whose caches the peer holds (the observed ones).
        self.remotelyCachedObjects: dict[int, Local] = {}
        self._cached_luids: dict[Any, int] = {}  # processUniqueID -> luid
        #: luid -> the broker's own instance of each RemoteCache we hold.
        self.locallyCachedObjects: dict[int, RemoteCache] = {}
        # (command, luid) for collected references and caches; appended from
        # finalizers, possibly in other threads (list.append is atomic; see
        # _drain_releases). A list, not a deque: an empty deque is 600 bytes.
        self._releases: list[tuple[bytes, Any]] = []
        self._disconnects: list[Callable[[], object]] = []
        self._connects: list[Callable[[], object]] | None = []
        self._ref_violations = 0
        self._on_release: dict[Any, Callable[[], object]] = {}  # processUniqueID -> callback
        self._handlers: dict[bytes, Handler] | None = None  # see _unjellier
        #: The perspective being serialized for (read by Viewable/Copyable).
        self.serializingPerspective: Any = None
        #: The perspective being unserialized for (read by the references made).
        self.unserializingPerspective: Any = None
        # While a message is being encoded: every count taken, to undo on failure.
        self._journal: list[tuple[dict[Any, Local], dict[Any, int], Any]] | None = None

    # -- the Sans-IO surface ------------------------------------------------------

    def connection_made(self) -> None:
        """The transport is up: a server offers its dialects."""
        log.debug("%s: connected", self._who())
        if not self.is_client:
            self._send_plain(list(DIALECTS), b"none")

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Parse bytes from the peer; raises ProtocolError (after closing) on bad input."""
        if self.closed:
            return
        if len(self.first_bytes) < 64:
            self.first_bytes += bytes(data[: 64 - len(self.first_bytes)])
        self.bytes_received += len(data)
        try:
            self._decoder.feed(data)
            while not self.closed:
                expression = self._decoder.next_expression()
                if expression is None:
                    break
                self._dispatch(expression)
            if not self.budget.report(self, self._decoder.held) and not self.closed:
                limit = self.budget.limit
                raise OverBudget(
                    f"the process holds more than {limit} bytes of unfinished messages (its MemoryBudget): "
                    f"this connection, holding {self._decoder.held}, is closed"
                )
        except ProtocolError as error:
            level = logging.WARNING if isinstance(error, OverBudget) else logging.INFO
            log.log(level, "%s: closing the connection: %s: %s", self._who(), type(error).__name__, error)
            self.close(error)
            raise

    def events(self) -> list[Event]:
        """Take the events that have happened since the last call."""
        events, self._events = self._events, []
        return events

    @property
    def bytes_to_send(self) -> int:
        """How many bytes :meth:`data_to_send` would return, not counting queued decrefs."""
        return len(self._out)

    def data_to_send(self) -> bytes:
        """Take the bytes to write to the peer (including any queued decrefs)."""
        self._drain_releases()
        data = bytes(self._out)
        self._out.clear()
        return data

    def _drain_releases(self) -> None:
        releases = self._releases
        while releases:
            # Finalizers may append meanwhile: a copy and a del of its length
            # are each atomic, so what they add stays, in order, for the next turn.
            batch = releases[:]
            del releases[: len(batch)]
            if not self.closed:
                encoder = self._plain[self.dialect or b"none"]
                for command, luid in batch:
                    self._out += encoder.encode([command, luid])

    @property
    def calls_in_flight(self) -> int:
        """How many of our calls are waiting for an answer (keepalive probes not counted)."""
        return len(self._waiting) - len(self._probes)

    def connection_lost(self, reason: BaseException | None = None) -> None:
        """The connection is gone: fail pending calls, run disconnect notifiers, forget every object (once).

        Each callback runs isolated (one that raises is logged and the next
        still runs); then the tables are emptied, so that a reference the
        application keeps from this connection holds nothing the peer was
        given, :class:`~pbcore.events.ConnectionClosed` is queued and the
        adapter is told (see the class docstring). Output not yet taken is
        dropped: there is no transport to write it to.
        """
        self._shut(reason)
        self._out.clear()

    def close(self, reason: BaseException | None = None) -> None:
        """Close from this side, as :meth:`connection_lost` does, but keep what was queued to send.

        The adapter, told through its output hook, writes that output and
        then closes its transport (as Twisted's ``loseConnection`` does): the
        answers queued before the broker refused a peer over
        :data:`~pbcore.flavors.MAX_BROKER_REFS` still reach it.
        """
        self._shut(reason)

    def _shut(self, reason: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        # Let go of a message half received now, not when the adapter drops the broker.
        self._decoder = Decoder(b"none", self.limits)
        self.budget.report(self, 0)
        log.debug("%s: connection closed (%s)", self._who(), "no reason given" if reason is None else reason)
        waiting, self._waiting = self._waiting, {}
        for pending in waiting.values():
            run_isolated(log, "failing a pending call", pending.fail, connection_lost_error(reason))
        observed, self.remotelyCachedObjects = self.remotelyCachedObjects, {}
        for local in observed.values():
            self._stopped_observing(local)
        notifiers, self._disconnects = self._disconnects, []
        for notifier in notifiers:
            run_isolated(log, f"disconnect notifier {notifier!r:.80}", notifier)
        for instance in self.locallyCachedObjects.values():
            instance.__dict__["broker"] = None  # its copies no longer count on a dead connection
        self.localObjects.clear()
        self._luids.clear()
        self._cached_luids.clear()
        self.locallyCachedObjects.clear()
        self._on_release.clear()
        self._new_deadlines.clear()
        self._deadline_names.clear()
        self._probes.clear()
        self._watches.clear()
        self._connects = None
        self._root = None
        self._events.append(ConnectionClosed(reason))
        self._releases.clear()
        hook = self.on_output or self.wake_up
        if hook is not None:
            run_isolated(log, "the adapter's output hook", hook)

    def __preview__(self, limit: int) -> str:
        return f"<Broker {'client' if self.is_client else 'server'} {self._who()}>"

    def _who(self) -> str:
        return "peer" if self.peer is None else f"peer {self.peer}"

    # -- Twisted's names for notification --------------------------------------------

    def notifyOnConnect(self, notifier: Callable[[], object]) -> None:
        """Call *notifier* when the handshake completes (at once if it has)."""
        if self._connects is None:
            if not self.closed:
                notifier()
        else:
            self._connects.append(notifier)

    def notifyOnDisconnect(self, notifier: Callable[[], object]) -> None:
        """Call *notifier* once when the connection is lost."""
        self._disconnects.append(notifier)

    def dontNotifyOnDisconnect(self, notifier: Callable[[], object]) -> None:
        """Undo :meth:`notifyOnDisconnect` (no error if it was not registered)."""
        if notifier in self._disconnects:
            self._disconnects.remove(notifier)

    def notifyOnFail(self, notifier: Callable[[], object]) -> None:
        """Call *notifier* if the connection closes before the handshake completes."""
        self.notifyOnDisconnect(lambda: None if self.ready else notifier())

    # -- references ---------------------------------------------------------------------

    def remoteForName(self, name: str | bytes) -> RemoteReference:
        """A reference to the peer's object of that name (``"root"``), not reference-counted."""
        return RemoteReference(None, self, name.encode("utf-8") if isinstance(name, str) else name, False)

    def root(self) -> RemoteReference:
        """The peer's root object."""
        return self.remoteForName(_ROOT)

    def registerReference(self, obj: Any) -> int:
        """Count one more reference to *obj* held by the peer; return its luid."""
        puid = obj.processUniqueID()
        luid = self._luids.get(puid)
        if luid is not None:
            self.localObjects[luid].incref()
        else:
            self._check_room(self.localObjects)
            self._next_luid += 1
            luid = self._next_luid
            self.localObjects[luid] = Local(obj, self.serializingPerspective)
            self._luids[puid] = luid
        if self._journal is not None:
            self._journal.append((self.localObjects, self._luids, luid))
        return luid

    def _check_room(self, table: dict[Any, Local]) -> None:
        # As Twisted: refusing is an Error; a peer that keeps asking is dropped.
        if len(table) > MAX_BROKER_REFS:
            self._ref_violations += 1
            if self._ref_violations > 3:
                log.warning("%s: over MAX_BROKER_REFS (%d) a fourth time: closing", self._who(), MAX_BROKER_REFS)
                self.close(Error("Maximum PB reference count exceeded. Goodbye."))
                raise Error("Maximum PB reference count exceeded. Goodbye.")
            log.warning("%s: refused a reference: over MAX_BROKER_REFS (%d)", self._who(), MAX_BROKER_REFS)
            raise Error("Maximum PB reference count exceeded.")

    def on_release(self, obj: Any, callback: Callable[[], object]) -> None:
        """Call *callback* once the peer has released its last reference to *obj*."""
        self._on_release[obj.processUniqueID()] = callback

    def localObjectForID(self, luid: Any) -> Any:
        """The local object the peer knows as *luid*, or None."""
        local = self.localObjects.get(luid)
        return None if local is None else local.object

    def queueDecRef(self, luid: Any) -> None:
        """Note that a RemoteReference was collected (safe from any thread or finalizer)."""
        self._release(b"decref", luid)

    def queueDecache(self, luid: Any) -> None:
        """Note that a copy of a RemoteCache was collected (safe from any thread or finalizer)."""
        self._release(b"decache", luid)

    def _release(self, command: bytes, luid: Any) -> None:
        if self.closed:
            return
        self._releases.append((command, luid))
        wake_up = self.wake_up
        if wake_up is not None:
            wake_up()

    # -- caches (Twisted's names) ---------------------------------------------------------

    def cachedRemotelyAs(self, instance: Cacheable, incref: bool = False) -> int | None:
        """The id under which the peer caches *instance*, or None; *incref* counts one more copy."""
        luid = self._cached_luids.get(instance.processUniqueID())
        if luid is not None and incref:
            self.remotelyCachedObjects[luid].incref()
            if self._journal is not None:
                self._journal.append((self.remotelyCachedObjects, self._cached_luids, luid))
        return luid

    def cacheRemotely(self, instance: Cacheable) -> int:
        """Give *instance* a cache id on this connection (it is being sent for the first time)."""
        self._check_room(self.remotelyCachedObjects)
        self._next_luid += 1
        luid = self._next_luid
        self._cached_luids[instance.processUniqueID()] = luid
        self.remotelyCachedObjects[luid] = Local(instance, self.serializingPerspective)
        if self._journal is not None:
            self._journal.append((self.remotelyCachedObjects, self._cached_luids, luid))
        return luid

    def remotelyCachedForLUID(self, luid: Any) -> Cacheable:
        """The Cacheable the peer caches as *luid*."""
        return self.remotelyCachedObjects[luid].object  # type: ignore[no-any-return]

    def cacheLocally(self, cid: int, instance: RemoteCache) -> None:
        """Keep the broker's own instance of a cache the peer sent (refused past ``Limits.max_caches``)."""
        table = self.locallyCachedObjects
        if cid not in table and len(table) >= self.limits.max_caches:
            raise JellyError(f"the peer sent more than {self.limits.max_caches} caches (Limits.max_caches)")
        table[cid] = instance

    def cachedLocallyAs(self, cid: Any) -> RemoteCache:
        """The broker's own instance of the cache *cid*."""
        return self.locallyCachedObjects[cid]

    def _unjelly_cached(self, unjellier: Unjellier, expression: list[Any]) -> RemoteCache:
        if len(expression) != 2 or type(expression[1]) is not int or expression[1] not in self.locallyCachedObjects:
            raise JellyError(f"a cached reference to an unknown cache: {expression!r:.60}")
        return self.locallyCachedObjects[expression[1]]._borgify()

    def _unjelly_lcache(self, unjellier: Unjellier, expression: list[Any]) -> Cacheable:
        if len(expression) != 2 or type(expression[1]) is not int or expression[1] not in self.remotelyCachedObjects:
            raise JellyError(f"the peer sent back an unknown cache: {expression!r:.60}")
        return self.remotelyCachedForLUID(expression[1])

    def _unjelly_remote(self, unjellier: Unjellier, expression: list[Any]) -> RemoteReference:
        if len(expression) != 2 or type(expression[1]) is not int:
            raise JellyError(f"a remote reference is [remote, luid], got {expression!r:.60}")
        return RemoteReference(unjellier.invoker.unserializingPerspective, self, expression[1], True)

    def _unjelly_local(self, unjellier: Unjellier, expression: list[Any]) -> Any:
        if len(expression) != 2 or type(expression[1]) not in (int, bytes):
            raise JellyError(f"a local reference is [local, luid], got {expression!r:.60}")
        local = self.localObjects.get(expression[1])
        # Unknown is None, as for Twisted: a Twisted peer that returns a
        # reference it was given decrefs it before the answer that sends it back.
        return None if local is None else local.object

    # -- sending ------------------------------------------------------------------------

    def send_call(
        self,
        perspective: Any,
        objectID: Any,
        name: str,
        args: tuple[Any, ...],
        kw: dict[str, Any],
        *,
        answer: bool = True,
        cache: bool = False,
        timeout: float | None = None,
    ) -> Pending | None:
        """Send a call (to a peer's cache if *cache*); return its pending result (None if one-way).

        With a *timeout* (seconds), the call fails with
        :class:`~pbcore.errors.CallTimedOut` if no answer has come by then
        (the adapter's :class:`~pbcore.timers.ConnectionTimers` keeps the time).
        """
        if self.closed:
            raise DeadReferenceError("Calling Stale Broker")
        self._next_request += 1
        request_id = self._next_request
        command = b"cachemessage" if cache else b"message"
        head: list[Sexp] = [command, request_id, objectID, name.encode("utf-8"), 1 if answer else 0]
        if not answer:
            self._send_values(head, [tuple(args), dict(kw)], perspective)
            return None
        # Registered before the message is queued, so that the adapter's output
        # hook (which may poll the timers) sees the call and its deadline.
        pending = self.pending_factory()
        self._waiting[request_id] = pending
        if timeout is not None:
            self._new_deadlines.append((request_id, timeout))
            self._deadline_names[request_id] = name
        try:
            self._send_values(head, [tuple(args), dict(kw)], perspective)
        except BaseException:
            self._waiting.pop(request_id, None)
            self._deadline_names.pop(request_id, None)
            if timeout is not None and self._new_deadlines and self._new_deadlines[-1][0] == request_id:
                self._new_deadlines.pop()
            raise
        return pending

    def take_new_deadlines(self) -> list[tuple[int, float]]:
        """The ``(request id, seconds)`` of the calls made with a timeout since the last time."""
        new = self._new_deadlines
        if new:
            self._new_deadlines = []
        return new

    def watch(self, pending: Pending, seconds: float, error: BaseException) -> None:
        """Fail *pending* (anything waited for: the handshake, say) with *error* unless settled within *seconds*.

        The adapter's :class:`~pbcore.timers.ConnectionTimers` keeps the time,
        as for a call's deadline.
        """
        self._last_watch -= 1  # watches have negative ids: they are no calls
        self._watches[self._last_watch] = (pending, error)
        self._new_deadlines.append((self._last_watch, seconds))

    def expire_call(self, request_id: int) -> None:
        """Fail call *request_id* with CallTimedOut if it is still waiting; its late answer will be dropped."""
        watched = self._watches.pop(request_id, None)
        if watched is not None:
            watched[0].fail(watched[1])  # no effect once settled
            return
        name = self._deadline_names.pop(request_id, "a method")
        pending = self._waiting.pop(request_id, None)
        if pending is not None:
            peer = "the peer" if self.peer is None else f"peer {self.peer}"
            pending.fail(CallTimedOut(f"{name}: no answer from {peer} in time"))

    def send_probe(self) -> None:
        """Send a keepalive probe: a call to object id 0, which every PB peer answers at once, quietly.

        No PB peer allocates id 0, so the peer (Twisted's too) answers with an
        "Invalid Object ID" error answer and logs nothing; that answer is
        dropped here. What counts is that bytes come back.
        """
        if self.closed or not self.ready:
            return
        self._next_request += 1
        request_id = self._next_request
        self._send_values([b"message", request_id, 0, b"pbcore_keepalive", 1], [(), {}], None)
        self._waiting[request_id] = PendingCall()  # no one awaits it: not the adapter's kind
        self._probes[request_id] = None

    def send_answer(self, request_id: int, result: Any, perspective: Any = None) -> BaseException | None:
        """Answer the peer's call *request_id* with *result*.

        A result that cannot be sent (not jellyable, over a limit) is answered
        with an error instead, which this returns (None when all went well).
        """
        if self.closed:
            return None
        try:
            self._send_values([b"answer", request_id], [result], perspective)
        except Exception as error:  # NotJellyable, a limit, or the application's getStateToCopy raising
            if self.closed:  # serializing it closed the broker (over MAX_BROKER_REFS)
                return error
            self.send_error(request_id, error)
            return error
        return None

    def send_error(self, request_id: int, error: BaseException) -> None:
        """Answer the peer's call *request_id* with an error.

        An :class:`~pbcore.errors.Error` that can travel as itself (Jellyable
        or allowed by the security options) does; anything else travels as a
        CopyableFailure (with its traceback only if ``unsafe_tracebacks``).
        """
        if self.closed:
            return
        sendable = isinstance(error, Error) and (
            hasattr(type(error), "jellyFor") or self.security.isClassAllowed(type(error))
        )
        failure = error if sendable else CopyableFailure(error, self.unsafe_tracebacks)
        try:
            self._send_values([b"error", request_id], [failure], None)
        except Exception as problem:  # its message or state could not be serialized
            log.error("%s: an error answer could not be sent: %s; sending a plain one", self._who(), problem)
            plain = Error(f"{type(error).__name__} (its details could not be sent)")
            self._send_values([b"error", request_id], [CopyableFailure(plain)], None)

    def cancel(self, call: int | Pending) -> None:
        """Stop waiting for a call (its pending result or request id): a late answer is dropped."""
        if isinstance(call, int):
            self._waiting.pop(call, None)
            self._deadline_names.pop(call, None)
            return
        for request_id, pending in list(self._waiting.items()):
            if pending is call:
                del self._waiting[request_id]
                self._deadline_names.pop(request_id, None)

    def has_deadline(self, request_id: int) -> bool:
        """Whether call (or watch) *request_id* still waits under a deadline."""
        return request_id in self._deadline_names or request_id in self._watches

    def _send_values(self, head: list[Sexp], values: list[Any], perspective: Any) -> None:
        if self.dialect is None:
            raise Error("the PB handshake is not complete: wait for the Ready event")
        encoder = self._encoders[self.dialect]
        data = encoder.encode_plain_list(head, values)  # the common case: nothing to count
        if data is None:
            data = self._encode_counted(encoder, head, values, perspective)
        elif len(data) > self.limits.max_expression_bytes:
            raise self._too_long(data)
        self._queue(data)

    def _encode_counted(self, encoder: ValueEncoder, head: list[Sexp], values: list[Any], perspective: Any) -> bytes:
        # Values that may hold references, copies, caches: the jellier counts them here,
        # serializing for *perspective*, and the counts are taken back if the message fails.
        self.serializingPerspective = perspective
        self._journal = []
        try:
            data = encoder.encode_list(head, values, invoker=self)
            if len(data) > self.limits.max_expression_bytes:
                raise self._too_long(data)
        except BaseException:
            # Nothing was sent: take back the references counted meanwhile
            # (unless encoding closed the broker, which has forgotten them all).
            if not self.closed:
                self._undo(self._journal)
            raise
        finally:
            self.serializingPerspective = None
            self._journal = None
        return data

    def _too_long(self, data: bytes) -> BananaError:
        # A peer with the same (default) limits would refuse it and drop the
        # connection: refuse it here instead, as an error the caller sees.
        return BananaError(
            f"the message is {len(data)} bytes, over the limit of {self.limits.max_expression_bytes}"
            " (Limits.max_expression_bytes) that a peer with the same limits accepts"
        )

    def _queue(self, data: bytes | bytearray) -> None:
        # Releases queued by finalizers go out before anything newer, as
        # Twisted sends them: a call made after dropping a reference must not
        # overtake its decref.
        if self._releases:
            self._drain_releases()
        # Output made outside receive_data (an application's call, a late
        # answer) must reach the transport: tell the adapter once per batch.
        was_empty = not self._out
        self._out += data
        if was_empty:
            hook = self.on_output or self.wake_up
            if hook is not None:
                hook()

    def _undo(self, journal: list[tuple[dict[Any, Local], dict[Any, int], Any]]) -> None:
        for table, luids, luid in reversed(journal):
            local = table[luid]
            if local.decref() > 0:
                continue
            del table[luid]
            luids.pop(local.object.processUniqueID(), None)
            if table is self.remotelyCachedObjects:
                self._stopped_observing(local)

    def _stopped_observing(self, local: Local) -> None:
        observer = RemoteCacheObserver(self, local.object, local.perspective)
        what = f"{type(local.object).__name__}.stoppedObserving"
        run_isolated(log, what, local.object.stoppedObserving, local.perspective, observer)

    def _send_plain(self, sexp: Sexp, dialect: bytes | None = None) -> None:
        self._queue(self._plain[dialect or self.dialect or b"none"].encode(sexp))

    # -- receiving ----------------------------------------------------------------------

    def _dispatch(self, expression: Sexp) -> None:
        if self.dialect is None:
            self._handshake(expression)
            return
        if type(expression) is not list or not expression or type(expression[0]) is not bytes:
            raise MessageError(f"a PB message is a list starting with a command, got {expression!r:.80}")
        command = expression[0]
        handler = self._COMMANDS.get(command)
        if handler is None:
            self._send_plain([b"didNotUnderstand", command])
            return
        handler(self, expression)

    def _handshake(self, expression: Sexp) -> None:
        if self.is_client:
            offered = expression if type(expression) is list else []
            chosen = next((d for d in offered if type(d) is bytes and d in DIALECTS), None)
            if chosen is None:
                raise ProtocolError(f"the server offers no dialect we speak: {expression!r:.80}")
            self._send_plain(chosen, b"none")
        else:
            if type(expression) is not bytes or expression not in DIALECTS:
                raise ProtocolError(f"the client chose a dialect we did not offer: {expression!r:.80}")
            chosen = expression
        self.dialect = chosen
        self._decoder.dialect = chosen
        self._send_plain([b"version", self.version])

    def _version(self, expression: list[Any]) -> None:
        if len(expression) != 2:
            _wrong_arity(expression, 2)
        if expression[1] != self.version:
            raise ProtocolError(f"the peer speaks PB version {expression[1]!r:.20}, we speak {self.version}")
        if not self.ready:
            self.ready = True
            assert self.dialect is not None
            self._events.append(Ready(self.dialect))
            connects, self._connects = self._connects or [], None
            for notifier in connects:
                run_isolated(log, f"connect notifier {notifier!r:.80}", notifier)

    def _message(self, expression: list[Any]) -> None:
        if len(expression) != 7:
            _wrong_arity(expression, 7)
        command, request_id, object_id, name, answer, net_args, net_kw = expression
        if type(request_id) is not int or type(name) is not bytes or type(answer) is not int:
            raise MessageError(f"malformed message: {expression[:5]!r:.120}")
        try:
            method = name.decode("utf-8")
        except UnicodeDecodeError:
            raise MessageError(f"method name is not UTF-8: {name!r:.60}") from None
        if command == b"cachemessage":
            target: Any = self.locallyCachedObjects.get(object_id) if type(object_id) is int else None
        else:
            target = self.localObjectForID(object_id) if type(object_id) in (bytes, int) else None
        try:
            if target is None:
                raise Error("Invalid Object ID")
            args = self._read_plain(net_args)
            if args is NOT_FLAT:
                args = self._unjellier(getattr(target, "perspective", None)).unjellyFull(net_args)
            kwargs = self._read_plain(net_kw)
            if kwargs is NOT_FLAT:
                kwargs = self._unjellier(getattr(target, "perspective", None)).unjellyFull(net_kw)
            if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
                raise JellyError("a call's arguments must be a tuple and a dictionary")
            if kwargs:
                kwargs = {_keyword(k): v for k, v in kwargs.items()}
        except (Error, JellyError) as error:
            # The connection is fine; this call is not.
            if isinstance(error, JellyError):  # a peer's mistake, or an attack: the operator may want to know
                log.info("%s: refused a call of %s: %s: %s", self._who(), method, type(error).__name__, error)
            if answer:
                self.send_error(request_id, error)
            return
        self._events.append(CallReceived(request_id, target, method, tuple(args), kwargs, bool(answer), self))

    def _answer(self, expression: list[Any]) -> None:
        if len(expression) != 3:
            _wrong_arity(expression, 3)
        pending = self._take_pending(expression[1])
        try:
            result = self._read_plain(expression[2])
            if result is NOT_FLAT:
                result = self._unjellier(None).unjellyFull(expression[2])
        except JellyError as error:
            # The message was well formed; only its value is unreadable here.
            self._call_failed(expression[1], pending, error)
            return
        if pending is not None:
            pending.resolve(result)
            if self._settled_events:
                self._events.append(AnswerReceived(expression[1], result))

    def _error(self, expression: list[Any]) -> None:
        if len(expression) != 3:
            _wrong_arity(expression, 3)
        pending = self._take_pending(expression[1])
        try:
            failure = self._unjellier(None).unjellyFull(expression[2])
        except JellyError as error:
            failure = error
        if not isinstance(failure, BaseException):
            failure = RemoteError("unknown", preview(failure), "")
        self._call_failed(expression[1], pending, failure)

    def _call_failed(self, request_id: int, pending: Pending | None, failure: BaseException) -> None:
        if pending is not None:  # None: cancelled locally, dropped
            pending.fail(failure)
            if self._settled_events:
                self._events.append(ErrorReceived(request_id, failure))

    def _take_pending(self, request_id: Any) -> Pending | None:
        if type(request_id) is not int:
            raise MessageError(f"request id must be an int, got {request_id!r:.40}")
        if request_id not in self._waiting:
            if 0 < request_id <= self._next_request:
                return None  # cancelled locally: the late answer is dropped
            raise MessageError(f"answer to request {request_id}, which was never sent")
        self._deadline_names.pop(request_id, None)
        self._probes.pop(request_id, None)
        return self._waiting.pop(request_id)

    def _decref(self, expression: list[Any]) -> None:
        if len(expression) != 2:
            _wrong_arity(expression, 2)
        luid = expression[1]
        if luid == _ROOT:
            return  # the root is not counted; Twisted never sends this
        local = self.localObjects.get(luid) if type(luid) is int else None
        if local is None:
            raise MessageError(f"decref of unknown object {luid!r:.40}")
        freed = local.decref() <= 0
        if freed:
            del self.localObjects[luid]
            puid = local.object.processUniqueID()
            self._luids.pop(puid, None)
            callback = self._on_release.pop(puid, None)
            if callback is not None:
                run_isolated(log, "a release callback", callback)
        self._events.append(DecRefReceived(luid, freed))

    def _did_not_understand(self, expression: list[Any]) -> None:
        if len(expression) != 2:
            _wrong_arity(expression, 2)
        command = expression[1]
        self._events.append(NotUnderstood(command if type(command) is bytes else preview(command).encode()))

    def _decache(self, expression: list[Any]) -> None:
        if len(expression) != 2:
            _wrong_arity(expression, 2)
        luid = expression[1]
        local = self.remotelyCachedObjects.get(luid) if type(luid) is int else None
        if local is None:
            raise MessageError(f"decache of unknown cache {luid!r:.40}")
        if local.decref() > 0:
            return
        del self.remotelyCachedObjects[luid]
        self._cached_luids.pop(local.object.processUniqueID(), None)
        self._stopped_observing(local)
        self._send_plain([b"uncache", luid])

    def _uncache(self, expression: list[Any]) -> None:
        if len(expression) != 2:
            _wrong_arity(expression, 2)
        luid = expression[1]
        instance = self.locallyCachedObjects.pop(luid, None) if type(luid) is int else None
        if instance is None:
            raise MessageError(f"uncache of unknown cache {luid!r:.40}")
        instance.__dict__["broker"] = None  # shared by its copies: none of them counts any more

    _COMMANDS: dict[bytes, Callable[[Broker, list[Any]], None]]

    def _unjellier(self, perspective: Any) -> Unjellier:
        self.unserializingPerspective = perspective
        handlers = self._handlers
        if handlers is None:  # made once, when a value first needs more than the plain reader
            handlers = self._handlers = {
                b"remote": self._unjelly_remote,
                b"local": self._unjelly_local,
                b"cached": self._unjelly_cached,
                b"lcache": self._unjelly_lcache,
            }
        return Unjellier(self.security, self, handlers, self.limits)


Broker._COMMANDS = {
    b"version": Broker._version,
    b"message": Broker._message,
    b"answer": Broker._answer,
    b"error": Broker._error,
    b"decref": Broker._decref,
    b"didNotUnderstand": Broker._did_not_understand,
    b"cachemessage": Broker._message,
    b"decache": Broker._decache,
    b"uncache": Broker._uncache,
}


_Encoders = tuple[dict[bytes, ValueEncoder], dict[bytes, Encoder], Callable[[Any], Any]]


def _encoders(limits: Limits, security: SecurityOptions) -> _Encoders:
    # Encoders, and the plain reader, hold no state between messages: brokers
    # with the same limits and security share them (an idle connection costs a
    # few KiB, not 20).
    try:
        return _shared_encoders(limits, security)
    except TypeError:  # security options that cannot be hashed: this broker's own
        return _new_encoders(limits, security)


def _new_encoders(limits: Limits, security: SecurityOptions) -> _Encoders:
    return (
        {dialect: ValueEncoder(dialect, limits, security) for dialect in DIALECTS},
        {dialect: Encoder(dialect, limits) for dialect in DIALECTS},
        plain_reader(security, limits),
    )


_shared_encoders = functools.lru_cache(maxsize=64)(_new_encoders)


def _keyword(key: Any) -> str:
    # Twisted sends str keys; older peers sent bytes.
    if isinstance(key, bytes):
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            raise JellyError(f"keyword argument name is not UTF-8: {key!r:.40}") from None
    if not isinstance(key, str):
        raise JellyError(f"keyword argument names must be strings, got {type(key).__name__}")
    return key


def _wrong_arity(expression: list[Any], size: int) -> NoReturn:
    name = expression[0].decode("utf-8", "replace")
    raise MessageError(f"{name} message has {len(expression) - 1} items, expected {size - 1}")
