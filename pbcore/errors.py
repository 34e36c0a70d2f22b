"""The exceptions pbcore raises.

Two families are kept apart on purpose:

* :class:`ProtocolError` and its subclasses mean *the peer sent something
  wrong*. Broken framing or a malformed message closes the connection that
  carried it (nothing else is affected); a :class:`JellyError` in the
  *value* of a well-formed call or answer fails just that call.
* The other classes are the PB object model's errors (a remote method that
  does not exist, a reference whose connection is gone, ...). They are
  ordinary exceptions that a program expects and handles.
"""

from __future__ import annotations

__all__ = [
    "BananaError",
    "CallTimedOut",
    "ConnectionTimedOut",
    "DeadReferenceError",
    "Error",
    "InsecureJelly",
    "JellyError",
    "NoSuchMethod",
    "NotJellyable",
    "PBConnectionLost",
    "ProtocolError",
    "RemoteError",
    "connection_lost_error",
]


class ProtocolError(Exception):
    """The peer sent something wrong (see the module docstring for what is closed)."""


class BananaError(ProtocolError):
    """A Banana byte stream is malformed or exceeds a configured limit.

    Also raised when asked to *encode* something Banana cannot carry (a string
    over the size limit, an int over the prefix limit), as Twisted does.
    """


class JellyError(ProtocolError):
    """A Banana expression is not valid Jelly (wrong shape, unknown reference...)."""


class InsecureJelly(JellyError):
    """The expression names a type that the :class:`~pbcore.jelly.SecurityOptions` refuse."""


class NotJellyable(TypeError):
    """A local value cannot be serialized: its type is neither built in nor registered.

    This is a programming error on the sending side, never a protocol error.
    """


class Error(Exception):
    """Raised by a remote method to report a known error condition to the caller.

    It crosses the wire with its message; the caller sees it as a remote error.
    """


class RemoteError(Exception):
    """An exception raised on the peer, carried back as its type name, value and traceback."""

    def __init__(self, remoteType: str, value: str, remoteTraceback: str) -> None:
        super().__init__(value)
        self.remoteType = remoteType
        self.remoteTraceback = remoteTraceback


class NoSuchMethod(AttributeError):
    """The remote object has no method of the requested name."""


class DeadReferenceError(Exception):
    """A call was made on a reference whose connection is gone."""


class PBConnectionLost(Exception):
    """The connection was lost before the call was answered."""


class ConnectionTimedOut(TimeoutError):
    """The connection was closed by a timer: no handshake in time, or a peer gone silent.

    Pending calls fail with a :class:`PBConnectionLost` carrying it.
    """


class CallTimedOut(TimeoutError):
    """A call got no answer within its deadline (``callRemote(..., pbtimeout=seconds)``)."""


def connection_lost_error(reason: BaseException | None) -> PBConnectionLost:
    """The PBConnectionLost a pending call fails with, carrying *reason* when there is one."""
    return PBConnectionLost(reason) if reason is not None else PBConnectionLost("the connection was lost")
