"""What a :class:`~pbcore.broker.Broker` reports: plain, inert event objects.

Drain them with ``broker.events()`` after each ``receive_data``. Only
:class:`CallReceived` asks for action (run the call, then answer it); the
others are information: a pending call is resolved by the broker itself.

They are slotted attrs classes that compare by value. Read them; do not
change them. They are not frozen: a frozen attrs class takes about three
times as long to make (each field goes through ``object.__setattr__``), and
a :class:`CallReceived` is made for every call served (about a tenth of a
small call's cost over loopback, frozen).
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = [
    "AnswerReceived",
    "CallReceived",
    "ConnectionClosed",
    "DecRefReceived",
    "ErrorReceived",
    "Event",
    "NotUnderstood",
    "Ready",
]


@attrs.define
class Ready:
    """The handshake is done: both sides speak ``dialect`` and PB version 6."""

    dialect: bytes


@attrs.define
class CallReceived:
    """The peer called a method; run it with :meth:`invoke`, then answer if ``answer_required``.

    ``args`` and ``kwargs`` are already unjellied. Answer with
    ``broker.send_answer(event.request_id, result, event.perspective)`` or
    ``broker.send_error(event.request_id, exception)``; the result of
    :meth:`invoke` may be an awaitable, to be awaited first.
    """

    request_id: int
    target: Any
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    answer_required: bool
    broker: Any = attrs.field(repr=False)

    @property
    def perspective(self) -> Any:
        """The perspective the answer is serialized for (the target's)."""
        return getattr(self.target, "perspective", None)

    def invoke(self) -> Any:
        """Run the method on the target (``remote_*``, ``view_*`` ... by its flavor)."""
        return self.target.remoteMessageReceived(self.broker, self.method, self.args, self.kwargs)


@attrs.define
class AnswerReceived:
    """A call of ours was answered (its pending result is already resolved)."""

    request_id: int
    result: Any


@attrs.define
class ErrorReceived:
    """A call of ours failed on the peer (its pending result has already failed)."""

    request_id: int
    failure: BaseException


@attrs.define
class DecRefReceived:
    """The peer dropped one reference to a local object; ``freed`` once none are left."""

    object_id: Any
    freed: bool


@attrs.define
class NotUnderstood:
    """The peer did not understand a command we sent."""

    command: bytes


@attrs.define
class ConnectionClosed:
    """The broker is closed: ``reason`` is the ProtocolError or lost-connection cause, if any."""

    reason: BaseException | None


Event = Ready | CallReceived | AnswerReceived | ErrorReceived | DecRefReceived | NotUnderstood | ConnectionClosed
