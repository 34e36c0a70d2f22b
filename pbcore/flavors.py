"""PB's object flavors: how objects travel between brokers.

* :class:`Referenceable` travels as a *reference*: the peer gets a
  :class:`RemoteReference` whose ``callRemote("x", ...)`` runs ``remote_x``
  here. :class:`Root` is the one a connection starts from.
* :class:`Viewable` travels as a :class:`ViewPoint`: calls run ``view_x`` with
  the caller's perspective first.
* :class:`Copyable` travels as a *copy*: its state is sent, and the peer builds
  the :class:`RemoteCopy` registered for its copy tag.

The flavors talk to the broker only through ``jellier.invoker`` /
``unjellier.invoker`` (see :mod:`pbcore.jelly`), so this module does not
import the broker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final, Protocol, runtime_checkable

from .errors import DeadReferenceError, Error, JellyError, NoSuchMethod, PBConnectionLost, ProtocolError, RemoteError
from .isolation import describe, run_isolated
from .jelly import (
    Jellier,
    Jellyable,
    Unjellier,
    qual,
    setUnjellyableFactoryForClass,
    setUnjellyableForClass,
    setUnjellyableForClassTree,
)
from .jelly import unjellyableRegistry as copyTags
from .keys import PEER_ID_BOUND
from .preview import ERROR_TEXT_LIMIT, error_text, preview

log = logging.getLogger("pbcore.flavors")

__all__ = [
    "MAX_BROKER_REFS",
    "AsReferenceable",
    "Cacheable",
    "CopiedFailure",
    "Copyable",
    "CopyableFailure",
    "IPBRoot",
    "Jellyable",
    "Local",
    "Referenceable",
    "RemoteCache",
    "RemoteCacheObserver",
    "RemoteCopy",
    "RemoteMethod",
    "RemoteReference",
    "Root",
    "Serializable",
    "ViewPoint",
    "Viewable",
    "copyTags",
    "failure2Copyable",
    "setCopierForClass",
    "setCopierForClassTree",
    "setFactoryForClass",
]

#: How many objects one broker will hold references for; more is an Error,
#: and a peer that keeps trying is disconnected (as Twisted does).
MAX_BROKER_REFS = 1024

setCopierForClass = setUnjellyableForClass
setCopierForClassTree = setUnjellyableForClassTree
setFactoryForClass = setUnjellyableFactoryForClass


class Serializable(Jellyable):
    """An object that can be passed to or returned from a remote method."""

    def processUniqueID(self) -> Any:
        """What identifies this object for reference counting: ``id(self)`` by default."""
        return id(self)


class Referenceable(Serializable):
    """Sent by reference: the peer calls ``remote_*`` methods through a RemoteReference."""

    #: The perspective the object's results are serialized for (None: anonymous).
    perspective: Any = None

    def remoteMessageReceived(self, broker: Any, message: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        """Run ``remote_<message>(*args, **kw)`` and return its result (or awaitable).

        *args* and *kw* arrive already unjellied. A missing method is
        :class:`NoSuchMethod`, which the caller receives as an error answer.
        """
        method = getattr(self, "remote_" + message, None)
        if method is None:
            raise NoSuchMethod(f"No such method: remote_{message}")
        return method(*args, **kw)

    def jellyFor(self, jellier: Jellier) -> Any:
        """A reference: ``[b"remote", luid]``, counted by the broker doing the sending."""
        return [b"remote", _broker_of(jellier, self).registerReference(self)]


@runtime_checkable
class IPBRoot(Protocol):
    """Gives each connection its root object."""

    def rootObject(self, broker: Any) -> Any:
        """The object the peer reaches as ``b"root"`` on this connection."""
        ...


class Root(Referenceable):
    """The object a server's peers start from; by default the same one for every connection."""

    def rootObject(self, broker: Any) -> Any:
        """Return the root for *broker*'s connection (override for one per connection)."""
        return self


class AsReferenceable(Referenceable):
    """A reference whose calls go to ``object.<messageType>MessageReceived``.

    ``AsReferenceable(avatar, "perspective")`` sends the peer's calls to the
    avatar's ``perspectiveMessageReceived`` (its ``perspective_*`` methods).
    """

    def __init__(self, object: Any, messageType: str = "remote") -> None:
        self.remoteMessageReceived = getattr(object, messageType + "MessageReceived")  # type: ignore[method-assign]


class ViewPoint(Referenceable):
    """A reference to an object as seen by one perspective: calls run ``view_x(perspective, ...)``."""

    def __init__(self, perspective: Any, object: Any) -> None:
        self.perspective = perspective
        self.object = object

    def processUniqueID(self) -> Any:
        return (id(self.perspective), id(self.object))

    def remoteMessageReceived(self, broker: Any, message: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        method = getattr(self.object, "view_" + message, None)
        if method is None:
            raise NoSuchMethod(f"No such method: view_{message}")
        return method(self.perspective, *args, **kw)


class Viewable(Serializable):
    """Sent as a ViewPoint for the perspective it is being sent to."""

    def jellyFor(self, jellier: Jellier) -> Any:
        return ViewPoint(_broker_of(jellier, self).serializingPerspective, self).jellyFor(jellier)


class Copyable(Serializable):
    """Sent as a copy: ``[copy_tag, state]``; the peer builds the class registered for the tag."""

    def getStateToCopy(self) -> Any:
        """The state to send: the instance ``__dict__`` by default."""
        return self.__dict__

    def getStateToCopyFor(self, perspective: Any) -> Any:
        """The state to send to *perspective*: :meth:`getStateToCopy` by default."""
        return self.getStateToCopy()

    def getTypeToCopy(self) -> bytes:
        """The copy tag: the qualified class name by default."""
        return qual(type(self)).encode("utf-8")

    def getTypeToCopyFor(self, perspective: Any) -> bytes:
        """The copy tag for *perspective*: :meth:`getTypeToCopy` by default."""
        return self.getTypeToCopy()

    def jellyFor(self, jellier: Jellier) -> Any:
        perspective = getattr(jellier.invoker, "serializingPerspective", None)
        sexp = jellier.prepare(self)
        sexp.extend([self.getTypeToCopyFor(perspective), jellier.jelly(self.getStateToCopyFor(perspective))])
        return jellier.preserve(self, sexp)


class RemoteCopy:
    """The local representation of a peer's Copyable; register it with :func:`setCopierForClass`."""

    def setCopyableState(self, state: Any) -> None:
        """Take the state the peer sent: it becomes the instance ``__dict__`` by default."""
        if not isinstance(state, dict):
            raise JellyError(f"{type(self).__qualname__} expects its state as a dictionary")
        self.__dict__ = state

    def unjellyFor(self, unjellier: Unjellier, jellyList: list[Any]) -> Any:
        if len(jellyList) != 2:
            raise JellyError(f"a copy is [tag, state], got {len(jellyList)} items")
        self.setCopyableState(unjellier.unjelly(jellyList[1]))
        return self


class Cacheable(Copyable):
    """Sent as a cache: copied once per connection, then kept up to date by its owner.

    The first time it goes to a peer, its state from
    :meth:`getStateToCacheAndObserveFor` travels along with a
    :class:`RemoteCacheObserver`; calling ``observer.callRemote("x", ...)``
    runs ``observe_x`` on the peer's :class:`RemoteCache`. Later sends refer
    to the same cache. When the peer lets go of every copy (or the
    connection drops), :meth:`stoppedObserving` is called with an observer
    equal to the one given.
    """

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: RemoteCacheObserver) -> Any:
        """The state to send to *perspective*, whose cache *observer* can update."""
        return self.getStateToCopyFor(perspective)

    def stoppedObserving(self, perspective: Any, observer: RemoteCacheObserver) -> None:
        """The peer's cache behind *observer* is gone: stop sending it updates."""

    def jellyFor(self, jellier: Jellier) -> Any:
        if jellier.invoker is None:
            return super().jellyFor(jellier)
        broker = jellier.invoker
        luid = broker.cachedRemotelyAs(self, incref=True)
        if luid is not None:
            return [b"cached", luid]
        luid = broker.cacheRemotely(self)
        perspective = broker.serializingPerspective
        observer = RemoteCacheObserver(broker, self, perspective)
        sexp = jellier.prepare(self)
        sexp.extend(
            [
                self.getTypeToCopyFor(perspective),
                luid,
                jellier.jelly(self.getStateToCacheAndObserveFor(perspective, observer)),
            ]
        )
        return jellier.preserve(self, sexp)


class RemoteCacheObserver:
    """The owner's handle on one peer's cache: ``callRemote("x", ...)`` runs ``observe_x`` there."""

    def __init__(self, broker: Any, cached: Cacheable, perspective: Any) -> None:
        self.broker = broker
        self.cached = cached
        self.perspective = perspective

    def callRemote(self, _name: str | bytes, *args: Any, **kw: Any) -> Any:
        """Send ``observe_<_name>(*args, **kw)`` to the peer's cache; returns the pending result."""
        name = _name.decode("utf-8") if isinstance(_name, bytes) else _name
        luid = self.broker.cachedRemotelyAs(self.cached)
        if luid is None:
            raise Error("this cache is no longer held by the peer")
        answer, timeout = kw.pop("pbanswer", True), kw.pop("pbtimeout", None)
        return self.broker.send_call(
            self.perspective, luid, name, args, kw, answer=bool(answer), cache=True, timeout=timeout
        )

    def remoteMethod(self, key: str) -> RemoteMethod:
        """A callable for one ``observe_`` method."""
        return RemoteMethod(self, key)  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RemoteCacheObserver):
            return NotImplemented
        return (self.broker, self.cached, self.perspective) == (other.broker, other.cached, other.perspective)

    def __hash__(self) -> int:
        return hash((id(self.broker), id(self.cached), id(self.perspective)))

    def __repr__(self) -> str:
        return f"<RemoteCacheObserver of {self.cached!r}>"


class RemoteCache(RemoteCopy, Serializable):
    """The local copy of a peer's Cacheable, kept up to date by ``observe_*`` calls.

    Each time the cache arrives the application gets a distinct object that
    shares this cache's state (so each can be counted); they compare equal.
    When the last one is collected, the owner is told (``decache``).
    """

    broker: Any = None
    luid: Any = None

    def remoteMessageReceived(self, broker: Any, message: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        method = getattr(self, "observe_" + message, None)
        if method is None:
            raise NoSuchMethod(f"No such method: observe_{message}")
        return method(*args, **kw)

    def unjellyFor(self, unjellier: Unjellier, jellyList: list[Any]) -> Any:
        if unjellier.invoker is None or len(jellyList) != 3:
            raise JellyError(f"a cache is [tag, id, state] and needs a broker, got {len(jellyList)} items")
        broker = unjellier.invoker
        luid = jellyList[1]
        if type(luid) is not int or not 0 <= luid < PEER_ID_BOUND:
            raise JellyError(f"a cache id must be an int from 0 to 2**61 - 2, got {luid!r:.40}")
        # This first instance stays with the broker until the owner says
        # uncache; the application gets copies that share its state.
        broker.cacheLocally(luid, self)
        self.__dict__.update(broker=broker, luid=luid)
        copy = self._borgify()
        if type(self).__init__ is not object.__init__:
            copy.__init__()  # type: ignore[misc]  # as Twisted: caches are built with no arguments
        copy.setCopyableState(unjellier.unjelly(jellyList[2]))
        self.__dict__.update(broker=broker, luid=luid)
        return copy

    def setCopyableState(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise JellyError(f"{type(self).__qualname__} expects its state as a dictionary")
        self.__dict__.update(state)

    def _borgify(self) -> RemoteCache:
        """Another object sharing this one's state: one per reference the owner counted."""
        copy: RemoteCache = object.__new__(type(self))
        copy.__dict__ = self.__dict__
        return copy

    def jellyFor(self, jellier: Jellier) -> Any:
        """Sent back to its owner, a cache becomes ``[b"lcache", id]``: the original Cacheable."""
        if self.broker is None or jellier.invoker is not self.broker:
            raise DeadReferenceError("a RemoteCache can only be sent back over its own connection")
        return [b"lcache", self.luid]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RemoteCache):
            return NotImplemented
        return self.__dict__ is other.__dict__

    def __hash__(self) -> int:
        return id(self.__dict__)

    def __del__(self) -> None:
        # Each copy the application held counts one; the broker's own
        # instance goes only after uncache, which clears the broker first.
        broker = self.__dict__.get("broker")
        if broker is not None:
            broker.queueDecache(self.__dict__.get("luid"))


class Local:
    """The broker's entry for one object the peer holds references to."""

    def __init__(self, object: Any, perspective: Any = None) -> None:
        self.object = object
        self.perspective = perspective
        self.refcount = 1

    def __repr__(self) -> str:
        return f"<Local {self.object!r} refs={self.refcount}>"

    def incref(self) -> int:
        self.refcount += 1
        return self.refcount

    def decref(self) -> int:
        self.refcount -= 1
        return self.refcount


class RemoteReference(Serializable):
    """A reference to an object on the peer: ``await ref.callRemote("name", ...)``.

    Each one counts as one reference on the peer; when it is garbage
    collected, the broker tells the peer (a ``decref``). Two references to the
    same remote object compare equal.
    """

    def __init__(self, perspective: Any, broker: Any, luid: Any, doRefCount: bool) -> None:
        self.luid = luid
        self.broker = broker
        self.doRefCount = doRefCount
        self.perspective = perspective
        self._disconnect_callbacks: list[Callable[[RemoteReference], object]] = []

    def callRemote(self, _name: str | bytes, *args: Any, **kw: Any) -> Any:
        """Call ``remote_<_name>(*args, **kw)`` on the peer's object.

        Returns the pending result the broker's adapter makes (an awaitable in
        asyncio and trio). With ``pbanswer=False`` the call is one-way and
        returns None. With ``pbtimeout=seconds`` it fails with
        :class:`~pbcore.errors.CallTimedOut` if no answer has come by then
        (a keyword of PB's own, as ``pbanswer`` is, so that a remote method's
        own ``timeout`` argument still passes). Raises
        :class:`DeadReferenceError` once the connection is gone.
        """
        name = _name.decode("utf-8") if isinstance(_name, bytes) else _name
        answer, timeout = kw.pop("pbanswer", True), kw.pop("pbtimeout", None)
        return self.broker.send_call(self.perspective, self.luid, name, args, kw, answer=bool(answer), timeout=timeout)

    def remoteMethod(self, key: str) -> RemoteMethod:
        """A callable for one method: ``ref.remoteMethod("x")(1)`` is ``ref.callRemote("x", 1)``."""
        return RemoteMethod(self, key)

    def notifyOnDisconnect(self, callback: Callable[[RemoteReference], object]) -> None:
        """Call ``callback(self)`` once when the connection is lost."""
        self._disconnect_callbacks.append(callback)
        if len(self._disconnect_callbacks) == 1:
            self.broker.notifyOnDisconnect(self._disconnected)

    def dontNotifyOnDisconnect(self, callback: Callable[[RemoteReference], object]) -> None:
        """Undo :meth:`notifyOnDisconnect`."""
        self._disconnect_callbacks.remove(callback)
        if not self._disconnect_callbacks:
            self.broker.dontNotifyOnDisconnect(self._disconnected)

    def _disconnected(self) -> None:
        callbacks, self._disconnect_callbacks = self._disconnect_callbacks, []
        for callback in callbacks:
            run_isolated(log, f"disconnect callback {callback!r:.80}", callback, self)

    def jellyFor(self, jellier: Jellier) -> Any:
        """Sent back to its owner, a reference becomes ``[b"local", luid]``: the original object."""
        if jellier.invoker is not self.broker:
            raise DeadReferenceError("a RemoteReference can only be sent back over its own connection")
        return [b"local", self.luid]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RemoteReference):
            return NotImplemented
        return self.broker is other.broker and self.luid == other.luid

    def __hash__(self) -> int:
        return hash((id(self.broker), self.luid))

    def __repr__(self) -> str:
        return f"<RemoteReference {self.luid!r}>"

    def __preview__(self, limit: int) -> str:
        return repr(self)

    def __del__(self) -> None:
        # Runs in whatever thread the collector does; the broker only queues.
        if self.doRefCount:
            broker = getattr(self, "broker", None)
            if broker is not None:
                broker.queueDecRef(self.luid)


class RemoteMethod:
    """One method of a remote object, as a callable."""

    def __init__(self, obj: RemoteReference, name: str) -> None:
        self.obj = obj
        self.name = name

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.obj.callRemote(self.name, *args, **kw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteMethod) and (self.obj, self.name) == (other.obj, other.name)

    def __hash__(self) -> int:
        return hash((self.obj, self.name))


# -- failures ------------------------------------------------------------------

#: The copy tag errors travel under, as Twisted names it.
FAILURE_TAG = b"twisted.spread.pb.CopyableFailure"

# pbcore's PB errors travel under Twisted's names, so that a Twisted peer's
# failure.trap(pb.Error) matches ours, and ours matches theirs.
_WIRE_NAMES = {
    qual(Error): "twisted.spread.pb.Error",
    qual(NoSuchMethod): "twisted.spread.flavors.NoSuchMethod",
    qual(DeadReferenceError): "twisted.spread.pb.DeadReferenceError",
    qual(PBConnectionLost): "twisted.spread.pb.PBConnectionLost",
    qual(ProtocolError): "twisted.spread.pb.ProtocolError",
    qual(RemoteError): "twisted.spread.pb.RemoteError",
}


def set_wire_name(cls: type, name: str) -> None:
    """Send exceptions of *cls* under another class name (a Twisted peer's, say)."""
    _WIRE_NAMES[qual(cls)] = name


def wire_name(cls: type) -> str:
    """The class name an exception travels under (Twisted's, for pbcore's PB errors)."""
    name = qual(cls)
    return _WIRE_NAMES.get(name, name)


class CopyableFailure(Copyable):
    """An exception, as it is sent to the peer (the state Twisted's CopiedFailure reads).

    The traceback is sent only when ``unsafeTracebacks`` is set: it may show
    file names and code.
    """

    unsafeTracebacks = False

    def __init__(self, exception: BaseException, unsafeTracebacks: bool = False) -> None:
        self.exception = exception
        self.unsafeTracebacks = unsafeTracebacks

    def getTypeToCopy(self) -> bytes:
        return FAILURE_TAG

    def getStateToCopy(self) -> dict[str, Any]:
        exception = self.exception
        if isinstance(exception, CopiedFailure):
            # Relayed from another peer: it keeps that peer's type, value,
            # traceback and parents, as Twisted relays them.
            name, value, text, parents = exception.type, exception.value, exception.traceback, exception.parents
        else:
            kind = type(exception)
            name, parents = wire_name(kind), [wire_name(base) for base in kind.__mro__]
            # Not str(): the exception may hold a peer's value (see pbcore.preview).
            value = error_text(exception, WIRE_TEXT_LIMIT)
            text = describe(exception) + "\n" if self.unsafeTracebacks else "Traceback unavailable\n"
        return {
            "type": name.encode("utf-8"),
            "value": value,
            "traceback": text,
            "parents": parents,
            "frames": [],
            "stack": [],
            "tb": None,
            "captureVars": False,
            "unsafeTracebacks": self.unsafeTracebacks,
            "count": 0,
        }


def failure2Copyable(fail: BaseException, unsafeTracebacks: bool = False) -> CopyableFailure:
    """Wrap an exception for sending to the peer."""
    return CopyableFailure(fail, unsafeTracebacks)


class CopiedFailure(RemoteCopy, RemoteError):
    """An exception raised on the peer: awaiting the call raises it.

    ``remoteType`` (also ``type``) is the peer's exception class name, ``value``
    its message, ``remoteTraceback`` (also ``traceback``) the traceback if the
    peer sent one, ``parents`` the class names of its bases.
    """

    def __init__(self, remoteType: str, value: str, remoteTraceback: str = "", parents: list[str] | None = None):
        RemoteError.__init__(self, remoteType, value, remoteTraceback)
        self.type = remoteType
        self.value = value
        self.traceback = remoteTraceback
        self.parents = parents or [remoteType]

    def setCopyableState(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise JellyError("a failure's state must be a dictionary")
        parents = state.get("parents")
        self.__init__(  # type: ignore[misc]
            _peer_text(state.get("type")),
            _peer_text(state.get("value", "")),
            _peer_text(state.get("traceback", "")),
            [_peer_text(parent) for parent in parents[:_MAX_PARENTS]] if isinstance(parents, list) else None,
        )

    def check(self, *errorTypes: type[BaseException] | str) -> type[BaseException] | str | None:
        """The first of *errorTypes* the remote exception is an instance of (by name), or None."""
        for error in errorTypes:
            name = error if isinstance(error, str) else wire_name(error)
            if name in self.parents:
                return error
        return None

    def trap(self, *errorTypes: type[BaseException] | str) -> type[BaseException] | str:
        """Like :meth:`check`, but re-raise this failure if none matches."""
        found = self.check(*errorTypes)
        if found is None:
            raise self
        return found

    def __str__(self) -> str:
        return f"{self.type}: {self.value}"


setUnjellyableForClass(FAILURE_TAG, CopiedFailure)

#: How much of an exception's text a CopyableFailure carries (longer text is cut).
WIRE_TEXT_LIMIT: Final = 64 * 1024
_MAX_PARENTS: Final = 100


def _peer_text(value: object) -> str:
    """A failure field from the peer as text: strings as they are, anything else as a bounded preview."""
    if type(value) is str:
        return value
    if type(value) is bytes:
        return value.decode("utf-8", "replace")
    return preview(value, ERROR_TEXT_LIMIT)


def _broker_of(jellier: Jellier, obj: object) -> Any:
    if jellier.invoker is None:
        raise Error(f"{type(obj).__qualname__} can only be sent through a broker (jelly it with an invoker)")
    return jellier.invoker
