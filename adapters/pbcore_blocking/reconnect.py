"""A blocking client that stays connected: it logs in again whenever its connection is lost.

::

    from pbcore.cred import UsernamePassword
    from pbcore.reconnect import Backoff
    from pbcore_blocking.reconnect import ReconnectingClient

    client = ReconnectingClient("127.0.0.1", 8789, credentials=UsernamePassword("alice", "secret"),
                                on_connect=lambda avatar: print("logged in"), backoff=Backoff(initial=1.0))
    with client:                                   # the loop runs in a background thread
        print(client.call("hello", timeout=10))    # waits for a connection, calls the current avatar

The policy (when to try again, when to give up) is the core's
:class:`~pbcore.reconnect.Reconnector`; this module connects with
:func:`pbcore_blocking.connect`, logs in (or asks for the root object), hands
the avatar to ``on_connect``, waits for the connection to be lost and sleeps
until the policy's next attempt, with ``time.monotonic()`` as the clock.

Each attempt gets a fresh factory from *factory* (``PBClientFactory()`` by
default) so that the application can set timeouts, security or limits.
``on_connect(reference)`` runs in the loop's thread for each new avatar (or
root), once the client is connected (so it may use :meth:`call`; a loss
meanwhile is noticed, but the next attempt waits for it to return); an
``async def`` one is run with :meth:`BlockingConnection.run
<pbcore_blocking.BlockingConnection.run>`, so it may await PB calls over that
connection only. An exception in it is logged (``pbcore.blocking``) and the
client goes on.

:meth:`ReconnectingClient.start` runs the loop in a daemon thread;
:meth:`~ReconnectingClient.run` runs it in the calling thread until the
client stops (raising the error of a refused login if that stopped it);
``with client:`` starts it and stops it on exit. :meth:`~ReconnectingClient.stop`
closes the current connection and ends the loop; a stopped client stays
stopped. The client's state is read and changed under one
:class:`threading.Condition`, from any thread; no method of a connection is
called while it is held (the connection's reader thread takes it when the
connection is lost).

A reference of an earlier connection stays dead: calling it raises
:class:`~pbcore.errors.DeadReferenceError` at once. A call in flight when the
connection drops fails with :class:`~pbcore.errors.PBConnectionLost`; it is
not made again (a call may not be safe to repeat).
"""

from __future__ import annotations

import inspect
import logging
import ssl as ssl_module
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from pbcore.errors import connection_lost_error
from pbcore.factory import PBClientFactory
from pbcore.flavors import RemoteReference
from pbcore.reconnect import Backoff, ClientState, Reconnector, is_login_refusal

from . import JOIN_TIMEOUT, BlockingConnection, connect

__all__ = ["ReconnectingClient"]

log = logging.getLogger("pbcore.blocking")

#: The policy's default delays (Backoff is frozen: one instance serves every client).
DEFAULT_BACKOFF = Backoff()


class ReconnectingClient:
    """Connects to *host*:*port*, logs in, and does so again each time the connection is lost.

    *credentials*: a UsernamePassword or Anonymous to log in with (None: the
    root object, by getRootObject). *mind*: the client object passed to the
    login. *on_connect(reference)*: called with each new avatar (or root),
    plain or async. *backoff* and *retry_refused_login*: the policy's (see
    :mod:`pbcore.reconnect`). *factory*: returns a fresh PBClientFactory for
    each attempt. *timeout*, *ssl_context* and *server_hostname* go to
    :func:`pbcore_blocking.connect` (*timeout* bounds connecting, logging in
    and each write, and is the default timeout of :meth:`call`'s call once
    connected).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        credentials: Any = None,
        mind: Any = None,
        on_connect: Callable[[RemoteReference], object] | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        retry_refused_login: bool = False,
        factory: Callable[[], PBClientFactory] | None = None,
        timeout: float | None = 30.0,
        ssl_context: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.credentials = credentials
        self.mind = mind
        self.on_connect = on_connect
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self._factory: Callable[[], PBClientFactory] = factory if factory is not None else PBClientFactory
        #: The policy: state, backoff, when to try next (changed under the client's lock only).
        self.policy = Reconnector(backoff, retry_refused_login=retry_refused_login)
        self._changed = threading.Condition()
        self._attempt: BlockingConnection | None = None  # the connection being set up or in use
        self._current: tuple[BlockingConnection, RemoteReference] | None = None  # logged in
        self._stop_requested = False
        self._running = False
        self._thread: threading.Thread | None = None
        self._loop_thread: threading.Thread | None = None  # the thread running the loop (start()'s or run()'s)
        self._done = threading.Event()  # the loop has ended

    # -- what the application reads -------------------------------------------------

    @property
    def state(self) -> ClientState:
        """Where the client stands (connecting, connected, waiting, stopped)."""
        with self._changed:
            return self.policy.state

    @property
    def last_error(self) -> BaseException | None:
        """Why the last attempt failed or the last connection was lost (None: no trouble yet)."""
        with self._changed:
            return self.policy.last_error

    @property
    def reference(self) -> RemoteReference | None:
        """The current avatar (or root), or None while disconnected."""
        with self._changed:
            return None if self._current is None else self._current[1]

    @property
    def connection(self) -> BlockingConnection | None:
        """The current connection (logged in), or None while disconnected."""
        with self._changed:
            return None if self._current is None else self._current[0]

    def connected(self, timeout: float | None = None) -> RemoteReference:
        """The current avatar (or root), waiting for one while connecting or waiting.

        Raises the last error (a refused login, say) once the client is
        stopped, and TimeoutError after *timeout* seconds (None: no limit).
        """
        return self._wait_current(timeout)[1]

    def call(self, name: str, *args: Any, timeout: float | None = None, **kw: Any) -> Any:
        """Call *name* on the current avatar (or root) and wait for the answer.

        Waits for a connection first; *timeout* (None: no limit for the
        connection, then the connection's timeout for the answer) bounds both
        together.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        connection, reference = self._wait_current(timeout)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        return connection.call(reference, name, *args, timeout=remaining, **kw)

    # -- running --------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a background (daemon) thread, and return."""
        self._claim()
        self._thread = threading.Thread(target=self._run_loop, name="pbcore-blocking-reconnect", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run the loop in this thread until the client stops.

        Returns after :meth:`stop`; raises the error that stopped it otherwise
        (a refused login).
        """
        self._claim()
        self._run_loop()
        with self._changed:
            error = None if self._stop_requested else self.policy.last_error
        if error is not None:
            raise error

    def stop(self) -> None:
        """Try no more and close the current connection; waits (at most JOIN_TIMEOUT) for the loop to end."""
        with self._changed:
            self._stop_requested = True
            self.policy.stop()
            attempt = self._attempt
            running = self._running
            self._changed.notify_all()
        if attempt is not None:
            attempt.close()
        # Not from the loop's thread, nor from the connection's reader (serving a call, it holds the
        # connection's lock, which the loop may be waiting for in on_connect).
        me = threading.current_thread()
        if running and me is not self._loop_thread and (attempt is None or me is not attempt._reader):
            self._done.wait(JOIN_TIMEOUT)

    def __enter__(self) -> ReconnectingClient:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ReconnectingClient {self.host}:{self.port} {self.policy!r}>"

    # -- the loop -------------------------------------------------------------------

    def _claim(self) -> None:
        with self._changed:
            if self._running or self._done.is_set():
                raise RuntimeError("this ReconnectingClient is already running (or has run)")
            self._running = True

    def _run_loop(self) -> None:
        self._loop_thread = threading.current_thread()
        try:
            while self._sleep():
                self._attempt_once()
        except Exception as error:  # a bug of ours: do not leave the application waiting for ever
            log.exception("the reconnecting client to %s:%s failed; stopping it", self.host, self.port)
            with self._changed:
                self.policy.stop()
                self.policy.failed(error, time.monotonic())
        finally:
            with self._changed:
                self._running = False
                self._done.set()
                self._changed.notify_all()

    def _sleep(self) -> bool:
        """Wait until the policy's next attempt and start it; False: stopped."""
        with self._changed:
            while True:
                when = self.policy.next_attempt()
                if when is None:
                    return False  # stopped (by stop(), or a refused login)
                now = time.monotonic()
                if now >= when:
                    self.policy.attempt_started(now)
                    self._changed.notify_all()
                    return True
                self._changed.wait(when - now)

    def _attempt_once(self) -> None:
        connection: BlockingConnection | None = None
        try:
            connection = connect(
                self._factory(),
                self.host,
                self.port,
                timeout=self.timeout,
                ssl_context=self.ssl_context,
                server_hostname=self.server_hostname,
            )
            with self._changed:
                stopped = self.policy.stopped
                if not stopped:
                    self._attempt = connection  # stop() closes it, ending the login
            if stopped:
                connection.close()
                return
            credentials = self.credentials
            reference = connection.root() if credentials is None else connection.login(credentials, self.mind)
        except Exception as error:
            with self._changed:
                self._attempt = None
                self.policy.failed(error, time.monotonic())
                self._changed.notify_all()
                self._log_failure(error)
            if connection is not None:
                connection.close()
            return
        with self._changed:
            stopped = self.policy.stopped
            if not stopped:
                self.policy.connected(time.monotonic())
                self._current = (connection, reference)
                self._changed.notify_all()
        if stopped:
            connection.close()
            self._lost(connection)
            return
        # Forget the reference as soon as the broker closes (in its reader thread), then here at the latest.
        connection.broker.notifyOnDisconnect(lambda: self._lost(connection))
        if connection.broker.closed:
            self._lost(connection)  # closed before the notifier was in place
        log.debug("%s: connected to %s:%s", self, self.host, self.port)
        self._notify_application(connection, reference)
        # Not close(): that would join the reader, which may be the thread in stop() waiting for this loop.
        connection.wait_closed()
        self._lost(connection)

    def _lost(self, connection: BlockingConnection) -> None:
        """*connection* is gone (called once or more, from any thread): tell the policy once."""
        with self._changed:
            if self._attempt is connection:
                self._attempt = None
            if self._current is None or self._current[0] is not connection:
                return
            self._current = None
            reason = connection_lost_error(connection.broker.close_reason)
            self.policy.lost(reason, time.monotonic())
            self._changed.notify_all()
        log.debug("%s: connection to %s:%s lost (%s)", self, self.host, self.port, reason)

    def _notify_application(self, connection: BlockingConnection, reference: RemoteReference) -> None:
        if self.on_connect is None:
            return
        try:
            result = self.on_connect(reference)
            if inspect.isawaitable(result):
                connection.run(result)
        except Exception:
            log.exception("%s: on_connect(%r) raised; the client goes on", self, reference)

    def _log_failure(self, error: BaseException) -> None:
        # Holding the lock: the policy has just been told.
        if self.policy.stopped:
            if is_login_refusal(error):
                log.warning("%s:%s refused the login (%s); the client stops", self.host, self.port, error)
            return
        when = self.policy.next_attempt()
        wait = 0.0 if when is None else max(0.0, when - time.monotonic())
        log.debug("connecting to %s:%s failed (%s); trying again in %.2f s", self.host, self.port, error, wait)

    def _wait_current(self, timeout: float | None) -> tuple[BlockingConnection, RemoteReference]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._current is None or self.policy.stopped:
                if self.policy.stopped:
                    raise self.policy.stopped_error()
                if deadline is None:
                    self._changed.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no connection to {self.host}:{self.port} within {timeout} s")
                self._changed.wait(remaining)
            return self._current
