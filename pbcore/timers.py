"""Time, for a connection: handshake timeout, keepalive and dead-peer detection, call deadlines.

The core reads no clock. The adapter passes the time in and is told when to
come back, in the manner of aioquic's Sans-IO QUIC connection::

    timers = ConnectionTimers(broker)            # the broker's Timeouts
    deadline = timers.poll(now)                  # after connection_made, after every read,
                                                 # whenever the broker has new output,
                                                 # and when the deadline passes
    schedule a wake-up at *deadline* (None: nothing to wait for)

:meth:`ConnectionTimers.poll` does what is due at *now* and returns the next
time it wants to run:

* **Handshake.** A connection whose PB handshake has not completed
  ``Timeouts.handshake`` seconds after its first poll is closed with a
  :class:`~pbcore.errors.ConnectionTimedOut` that says what arrived, if
  anything (a silent port, or another protocol).
* **Keepalive.** After ``Timeouts.idle`` seconds with nothing received, the
  broker sends a probe: a call to object id 0, which no PB peer ever
  allocates, so that every peer, Twisted's included, answers at once with an
  "Invalid Object ID" error answer and logs nothing. Any byte received counts
  as life.
* **Dead peer.** If nothing at all arrives within ``Timeouts.probe``
  seconds of the probe, the connection is closed with a
  :class:`~pbcore.errors.ConnectionTimedOut` and every pending call fails
  with :class:`~pbcore.errors.PBConnectionLost` carrying it.
* **Call deadlines.** ``ref.callRemote(name, ..., pbtimeout=seconds)``: if
  no answer has come by then, the call fails with
  :class:`~pbcore.errors.CallTimedOut` (naming the method and the peer) and
  a late answer is dropped. The deadline runs from the first poll after the
  call was made, which the adapter makes as soon as the call's message is
  queued.
"""

from __future__ import annotations

import contextlib
import heapq
from typing import TYPE_CHECKING, Any

import attrs

from .errors import ConnectionTimedOut

if TYPE_CHECKING:
    from .broker import Broker

__all__ = ["DEFAULT_TIMEOUTS", "ConnectionTimers", "TcpKeepalive", "Timeouts"]


def _seconds(instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be a positive number of seconds or None, got {value!r}")


@attrs.frozen
class TcpKeepalive:
    """The kernel's own keepalive on a connection's socket, as well as PB's probes.

    ``idle`` seconds without traffic before the first TCP probe, then one every
    ``interval`` seconds, ``count`` of them unanswered and the kernel drops the
    connection. Where the platform lacks an option it is left out.
    """

    idle: int = attrs.field(default=60, validator=attrs.validators.gt(0))
    interval: int = attrs.field(default=10, validator=attrs.validators.gt(0))
    count: int = attrs.field(default=5, validator=attrs.validators.gt(0))

    def socket_options(self) -> list[tuple[str, str, int]]:
        """``(level, option, value)`` names, as the ``socket`` module spells them."""
        return [
            ("SOL_SOCKET", "SO_KEEPALIVE", 1),
            ("IPPROTO_TCP", "TCP_KEEPIDLE", self.idle),  # Linux, the BSDs
            ("IPPROTO_TCP", "TCP_KEEPALIVE", self.idle),  # macOS's name for it
            ("IPPROTO_TCP", "TCP_KEEPINTVL", self.interval),
            ("IPPROTO_TCP", "TCP_KEEPCNT", self.count),
        ]

    def apply(self, sock: Any, socket_module: Any) -> None:
        """Set the options on *sock*, those the platform has; *socket_module* is ``socket``.

        The adapter hands the module in: the core imports no I/O.
        """
        for level, name, value in self.socket_options():
            if hasattr(socket_module, level) and hasattr(socket_module, name):
                # OSError: not a TCP socket (a unix socket), or an option this kernel refuses.
                with contextlib.suppress(OSError):
                    sock.setsockopt(getattr(socket_module, level), getattr(socket_module, name), value)


@attrs.frozen
class Timeouts:
    """How long a connection waits, in seconds; None: for ever.

    ``handshake``: from the connection's start until the PB handshake is
    done. ``idle``: with nothing received for this long, send a keepalive
    probe. ``probe``: with nothing received for this long after a probe, the
    peer is taken for gone and the connection closed. So a dead peer is noticed
    within ``idle + probe`` seconds (by default 60 + 30). ``tcp_keepalive``:
    the kernel's keepalive on the socket as well (off by default; every
    adapter applies it to the sockets it accepts and opens).
    """

    handshake: float | None = attrs.field(default=30.0, validator=_seconds)
    idle: float | None = attrs.field(default=60.0, validator=_seconds)
    probe: float | None = attrs.field(default=30.0, validator=_seconds)
    tcp_keepalive: TcpKeepalive | None = None


DEFAULT_TIMEOUTS = Timeouts()


class ConnectionTimers:
    """The timers of one connection's broker (see the module docstring)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.timeouts: Timeouts = broker.timeouts
        self._started: float | None = None
        self._seen = -1  # broker.bytes_received at the last poll
        self._last_input = 0.0
        self._probed_at: float | None = None
        self._calls: list[tuple[float, int]] = []  # (deadline, request id), a heap

    def poll(self, now: float) -> float | None:
        """Do what is due at *now*; the next time to poll (None: only after new input or output)."""
        broker = self.broker
        if broker.closed:
            self._calls.clear()
            return None
        if self._started is None:
            self._started = now
        if broker.bytes_received != self._seen:
            self._seen = broker.bytes_received
            self._last_input = now
            self._probed_at = None
        for request_id, seconds in broker.take_new_deadlines():
            heapq.heappush(self._calls, (now + seconds, request_id))
        self._expire_calls(now)
        timeouts = self.timeouts
        if not broker.ready:
            if timeouts.handshake is not None and now >= self._started + timeouts.handshake:
                broker.close(ConnectionTimedOut(self._no_handshake()))
                return None
        elif self._probed_at is not None:
            if timeouts.probe is not None and now >= self._probed_at + timeouts.probe:
                silent = now - self._last_input
                why = f"{_who(broker)} sent nothing for {silent:.1f} s, not even the answer to a keepalive probe"
                broker.close(ConnectionTimedOut(f"{why}: taken for gone"))
                return None
        elif timeouts.idle is not None and now >= self._last_input + timeouts.idle:
            self._probed_at = now
            broker.send_probe()
        return self._next(now)

    def _expire_calls(self, now: float) -> None:
        calls, broker = self._calls, self.broker
        while calls and calls[0][0] <= now:
            _, request_id = heapq.heappop(calls)
            broker.expire_call(request_id)
        if len(calls) > 64 and len(calls) > 2 * (len(broker._deadline_names) + len(broker._watches)):
            # Most of these calls were answered long before their deadline: forget them.
            self._calls = [entry for entry in calls if broker.has_deadline(entry[1])]
            heapq.heapify(self._calls)

    def _next(self, now: float) -> float | None:
        broker, timeouts = self.broker, self.timeouts
        candidates: list[float] = []
        if self._calls:
            candidates.append(self._calls[0][0])
        if not broker.ready:
            if timeouts.handshake is not None and self._started is not None:
                candidates.append(self._started + timeouts.handshake)
        elif self._probed_at is not None:
            if timeouts.probe is not None:
                candidates.append(self._probed_at + timeouts.probe)
        elif timeouts.idle is not None:
            candidates.append(self._last_input + timeouts.idle)
        return min(candidates) if candidates else None

    def _no_handshake(self) -> str:
        broker = self.broker
        seconds = self.timeouts.handshake
        if broker.bytes_received == 0:
            seen = "nothing arrived (is anything speaking PB there?)"
        else:
            seen = f"{broker.bytes_received} bytes arrived, starting {broker.first_bytes[:32]!r}"
        return f"no PB handshake with {_who(broker)} within {seconds} s: {seen}"


def _who(broker: Broker) -> str:
    return "the peer" if broker.peer is None else f"peer {broker.peer}"
