"""What a :class:`~pbcore.broker.Broker` reports: plain, immutable event objects.

Drain them with ``broker.events()`` after each ``receive_data``. Only
:class:`CallReceived` asks for action (run the call, then answer it); the
others are information: a pending call is resolved by the broker itself.
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


@attrs.frozen
class Ready:
    """The handshake is done: both sides speak ``dialect`` and PB version 6."""

    dialect: bytes


@attrs.frozen
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


@attrs.frozen
class AnswerReceived:
    """A call of ours was answered (its pending result is already resolved)."""

    request_id: int
    result: Any


@attrs.frozen
class ErrorReceived:
    """A call of ours failed on the peer (its pending result has already failed)."""

    request_id: int
    failure: BaseException


@attrs.frozen
class DecRefReceived:
    """The peer dropped one reference to a local object; ``freed`` once none are left."""

    object_id: Any
    freed: bool


@attrs.frozen
class NotUnderstood:
    """The peer did not understand a command we sent."""

    command: bytes


@attrs.frozen
class ConnectionClosed:
    """The broker is closed: ``reason`` is the ProtocolError or lost-connection cause, if any."""

    reason: BaseException | None


Event = Ready | CallReceived | AnswerReceived | ErrorReceived | DecRefReceived | NotUnderstood | ConnectionClosed
