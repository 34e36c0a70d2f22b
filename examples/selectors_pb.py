"""PB over plain sockets, driven by hand with :mod:`selectors`: no asyncio, no trio.

This is what embedding pbcore's Sans-IO :class:`~pbcore.broker.Broker` in your
own event loop takes. One :class:`Loop` owns a selector, any number of
listening sockets and connections, a wake-up socket pair, and a
:class:`~pbcore.driver.CoroutineDriver` that runs coroutines (``async``
methods, a Portal's login among them, and client code) with no event loop.
Each :class:`Connection` is one socket, one broker and the broker's
:class:`~pbcore.serving.Dispatcher`; the loop moves bytes between them and
hands the calls the broker reports to the dispatcher::

    python examples/selectors_pb.py server 8787    # serve DemoRoot until Ctrl-C
    python examples/selectors_pb.py client 8787    # call it, log in, print the results
    python examples/selectors_pb.py demo           # both, in one process and one selector

The ``demo`` mode listens on an ephemeral port of 127.0.0.1, connects to
itself, makes a few calls, logs in as alice, prints what came back and exits 0.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import selectors
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pbcore import Broker, PBClientFactory, PendingCall, ProtocolError, Referenceable, RemoteReference
from pbcore.cred import Avatar, InMemoryPasswordChecker, IPerspective, Portal, UsernamePassword
from pbcore.driver import CoroutineDriver
from pbcore.events import DecRefReceived, Event
from pbcore.serving import Dispatcher
from pbcore.timers import DEFAULT_TIMEOUTS, ConnectionTimers, Timeouts

#: How long any one wait in this example may take before it gives up.
TIMEOUT = 5.0
#: Bytes read from a socket at a time.
CHUNK = 65536
#: Who may log in to the demo server, and with which password.
USERS = {"alice": "wonderland"}

T = TypeVar("T")


# -- what the server offers -------------------------------------------------------------


class Counter(Referenceable):
    """Handed out by reference: the client calls ``remote_increment`` on it."""

    def __init__(self, start: int) -> None:
        self.value = start

    def remote_increment(self, by: int = 1) -> int:
        self.value += by
        return self.value


class User(Avatar):
    """A logged-in user (the avatar): the client calls its ``perspective_*`` methods."""

    def __init__(self, name: str) -> None:
        self.name = name

    def perspective_whoami(self) -> str:
        return self.name


class DemoRealm:
    """Makes each user's avatar, and knows who is logged in."""

    def __init__(self) -> None:
        self.online: list[str] = []

    def requestAvatar(self, avatar_id: bytes, mind: Any, *interfaces: Any) -> tuple[Any, User, Callable[[], None]]:
        name = avatar_id.decode("utf-8")
        self.online.append(name)
        # The logout runs once: when the client lets go of the avatar, or its connection ends.
        return IPerspective, User(name), lambda: self.online.remove(name)


class Session(Referenceable):
    """What a client reaches first (``broker.root()`` on its side): one per connection."""

    def __init__(self, login: Any) -> None:
        self._login = login  # the portal's login root for this connection

    def remote_echo(self, value: Any) -> Any:
        return value

    def remote_add(self, a: int, b: int) -> int:
        return a + b

    def remote_counter(self, start: int) -> Counter:
        return Counter(start)

    def remote_login(self, username: bytes | str) -> Any:
        # The portal's first step (PBClientFactory.login calls it, Twisted's
        # too): a challenge, and a challenger whose respond() is async: the
        # checker and the realm run there, in the loop's CoroutineDriver.
        return self._login.remote_login(username)


class DemoRoot:
    """What the server serves: a :class:`Session` per connection, and a Portal to log in through."""

    def __init__(self) -> None:
        self.realm = DemoRealm()
        self.portal = Portal(self.realm, [InMemoryPasswordChecker(**USERS)])

    def rootObject(self, broker: Broker) -> Session:
        # The portal's login root is per connection: its avatars are logged
        # out when that connection ends.
        return Session(self.portal.rootObject(broker))


# -- the loop ---------------------------------------------------------------------------


class Connection:
    """One socket, the broker that speaks PB over it, and the dispatcher that runs the peer's calls."""

    def __init__(self, loop: Loop, sock: socket.socket, broker: Broker, factory: PBClientFactory | None = None) -> None:
        self.loop = loop
        self.sock = sock
        self.broker = broker
        #: The client's factory (its login), or None on the server's side.
        self.factory = factory
        # Calls start in arrival order; plain ones are answered at once, async
        # ones run in the loop's driver; every outcome is an answer; running
        # calls are cancelled when the broker closes.
        self.dispatcher = Dispatcher(broker, loop.driver.spawn_call)
        # The core keeps time (handshake timeout, keepalive, dead peers, call
        # deadlines) when given it: flush() polls, run_once() waits no longer
        # than the earliest deadline.
        self.timers = ConnectionTimers(broker)
        self.deadline: float | None = None
        #: Bytes the broker produced that the socket has not taken yet.
        self.outgoing = bytearray()
        self.closed = False
        self.close_reason: BaseException | None = None
        #: How many times send() took only part of what it was offered.
        self.partial_writes = 0
        sock.setblocking(False)
        loop.selector.register(sock, selectors.EVENT_READ, self)
        broker.connection_made()  # a server queues its dialect offer here
        self.flush()

    def __repr__(self) -> str:
        role = "client" if self.broker.is_client else "server"
        return f"<Connection {role} fd={self.sock.fileno()}>"

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:  # reset by the peer, ...
            self.close(error)
            return
        if not data:
            self.close(None)  # EOF: the peer closed
            return
        try:
            self.broker.receive_data(data)
        except ProtocolError as error:
            # The broker is already closed (pending calls failed, notifiers run);
            # all that is left is to drop this socket. Other connections go on.
            self.close(error)
            return
        self.handle_events()
        self.loop.driver.run_ready()  # coroutines whose calls were just answered
        self.flush()

    def handle_events(self) -> None:
        events = self.broker.events()
        self.dispatcher.dispatch(events)  # runs the calls among them
        if self.loop.on_event is not None:
            for event in events:
                self.loop.on_event(self, event)

    def flush(self) -> None:
        """Write what the broker has queued; keep the rest for when the socket is writable."""
        if self.closed:
            return
        self.deadline = self.timers.poll(time.monotonic())  # may probe, or close the broker
        if self.broker.closed:
            # The broker closed itself (a peer that kept exceeding
            # MAX_BROKER_REFS, or broker.close() from the application; it called
            # wake_up to get here at once). Write what it queued before (the
            # answers to earlier calls), as far as the socket takes it now, and
            # drop the socket.
            self.outgoing += self.broker.data_to_send()
            with contextlib.suppress(OSError):
                self.sock.send(self.outgoing)
            self.close(self.broker.close_reason)
            return
        self.outgoing += self.broker.data_to_send()
        if self.outgoing:
            try:
                sent = self.sock.send(self.outgoing)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                self.close(error)
                return
            del self.outgoing[:sent]  # send() may take fewer bytes than it was given
            if self.outgoing:
                self.partial_writes += 1
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outgoing else 0)
        if self.loop.selector.get_key(self.sock).events != wanted:
            self.loop.selector.modify(self.sock, wanted, self)

    def close(self, reason: BaseException | None = None) -> None:
        """Close the socket and tell the broker (fails its pending calls)."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.broker.connection_lost(reason)  # also cancels the calls still running
        self.handle_events()  # ConnectionClosed, and nothing to answer any more
        self.loop.selector.unregister(self.sock)
        self.loop.connections.discard(self)
        self.sock.close()


class Loop:
    """A selector, the sockets on it, a wake-up pair for other threads and the collector, and a coroutine driver."""

    def __init__(self, root: Any = None, on_event: Callable[[Connection, Event], None] | None = None) -> None:
        self.selector = selectors.DefaultSelector()
        #: Runs every connection's async calls, and :meth:`run`'s coroutines.
        #: (Loop.run raises what its coroutine raised: no need to log it too.)
        self.driver = CoroutineDriver(log_errors=False)
        self.root = root
        self.on_event = on_event
        self.connections: set[Connection] = set()
        self.listeners: list[socket.socket] = []
        self.stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    def wake_up(self) -> None:
        """Interrupt select() so that the next turn flushes every broker.

        The broker calls this when a RemoteReference was garbage collected and
        queued a decref, and when it closes. That can happen in any thread, at
        any moment (even in the middle of this loop's own code), so it only
        writes one byte.
        """
        with contextlib.suppress(OSError):  # full (a wake-up is already due) or closed
            self._wake_w.send(b"\0")

    def stop(self) -> None:
        """Make :meth:`run_forever` return (safe from another thread)."""
        self.stopping = True
        self.wake_up()

    def make_broker(self, peer: Any) -> Broker:
        """A server broker for the connection from *peer* (an address)."""
        return Broker(is_client=False, root=self.root, pending_factory=PendingCall, wake_up=self.wake_up, peer=peer)

    # -- sockets --------------------------------------------------------------------

    def listen(self, host: str, port: int) -> tuple[str, int]:
        """Accept PB clients on (host, port); port 0 picks a free one. Returns the address."""
        listener = socket.create_server((host, port))
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.listeners.append(listener)
        address: tuple[str, int] = listener.getsockname()[:2]
        return address

    def connect(self, host: str, port: int, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> Connection:
        """Connect to a PB server (a blocking connect) and turn the loop until the handshake is done."""
        sock = socket.create_connection((host, port), timeout=TIMEOUT)
        factory = PBClientFactory(timeouts=timeouts)

        def close() -> None:  # factory.disconnect(): closes the connection made below
            connection.close()

        broker = factory.make_broker(close=close, pending_factory=PendingCall, wake_up=self.wake_up, peer=(host, port))
        connection = Connection(self, sock, broker, factory)
        self.connections.add(connection)
        self.run_until(lambda: connection.broker.ready or connection.closed)
        if not connection.broker.ready:
            raise ConnectionError(f"PB handshake failed: {connection.close_reason!r}")
        return connection

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.connections.add(Connection(self, sock, self.make_broker(address)))

    # -- turning --------------------------------------------------------------------

    def run_once(self, timeout: float | None) -> None:
        """One turn: wait for sockets (at most *timeout* seconds), serve them, flush."""
        self.driver.run_ready()  # coroutines woken since the last turn (a connection closing fails their calls)
        self.flush_all()  # calls made since the last turn, decrefs queued by the collector; timers polled
        deadlines = [c.deadline for c in self.connections if c.deadline is not None]
        if deadlines:
            until = max(0.0, min(deadlines) - time.monotonic())
            timeout = until if timeout is None else min(timeout, until)
        for key, mask in self.selector.select(timeout):
            if key.fileobj is self._wake_r:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    while self._wake_r.recv(CHUNK):
                        pass
            elif key.data is None:
                assert isinstance(key.fileobj, socket.socket)
                self._accept(key.fileobj)  # a listener
            else:
                ready: Connection = key.data
                if ready.closed:  # closed earlier in this turn
                    continue
                if mask & selectors.EVENT_READ:
                    ready.on_readable()
                if mask & selectors.EVENT_WRITE:
                    ready.flush()
        self.driver.run_ready()
        self.flush_all()

    def flush_all(self) -> None:
        for connection in list(self.connections):
            connection.flush()

    def run_until(self, done: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Turn until ``done()`` is true; TimeoutError after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"gave up after {timeout} s")
            self.run_once(remaining)

    def run_forever(self) -> None:
        """Turn until :meth:`stop` is called (before or during the run)."""
        try:
            while not self.stopping:
                self.run_once(None)
        finally:
            self.stopping = False

    def call(self, ref: RemoteReference, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call a remote method and turn the loop until it is answered: its result, or raise its error."""
        pending = ref.callRemote(name, *args, **kwargs)
        assert isinstance(pending, PendingCall)
        self.run_until(lambda: pending.done)
        return pending.unwrap()

    def run(self, awaitable: Awaitable[T], timeout: float = TIMEOUT) -> T:
        """Run a coroutine that awaits PB calls (``await ref.callRemote(...)``), turning the loop until it ends.

        Returns its result, or raises its error; it is cancelled if it is not
        done within *timeout* seconds.
        """
        task = self.driver.spawn(awaitable)  # runs it up to its first wait
        try:
            self.run_until(lambda: task.done, timeout)
        finally:
            task.cancel()  # nothing, if it is done
        if task.error is not None:
            raise task.error
        result: T = task.result
        return result

    def close(self) -> None:
        """Close every connection and listener, then the loop itself."""
        for connection in list(self.connections):
            connection.close(None)
        for listener in self.listeners:
            self.selector.unregister(listener)
            listener.close()
        self.listeners.clear()
        self.selector.unregister(self._wake_r)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()


# -- the programs ------------------------------------------------------------------------


def client_calls(loop: Loop, connection: Connection) -> list[str]:
    """The calls the client makes, as printable lines."""
    root = connection.broker.root()
    lines = [
        f"echo('hello') -> {loop.call(root, 'echo', 'hello')!r}",
        f"add(2, 3) -> {loop.call(root, 'add', 2, 3)!r}",
    ]
    # Big enough that send() takes it in pieces on both sides.
    big = bytes(range(256)) * 2048
    lines.append(f"echo(<{len(big)} bytes>) -> same bytes: {loop.call(root, 'echo', big) == big}")
    counter = loop.call(root, "counter", 10)
    lines.append(f"counter(10) -> {counter!r}")
    lines.append(f"counter.increment() -> {loop.call(counter, 'increment')!r}")
    lines.append(f"counter.increment(by=5) -> {loop.call(counter, 'increment', by=5)!r}")
    try:
        loop.call(root, "missing")
    except Exception as error:
        lines.append(f"missing() -> {type(error).__name__}: {error}")
    # A Portal login: the factory's login is a coroutine (root.login, then
    # challenger.respond), run by the loop's driver; so is respond on the server.
    assert connection.factory is not None
    avatar = loop.run(connection.factory.login(UsernamePassword("alice", USERS["alice"])))
    lines.append(f"login(alice) -> {avatar!r}")
    lines.append(f"avatar.whoami() -> {loop.call(avatar, 'whoami')!r}")
    return lines


def demo() -> int:
    """Serve and call in one process, one selector; print the results."""
    released: list[DecRefReceived] = []

    def on_event(connection: Connection, event: Event) -> None:
        if isinstance(event, DecRefReceived) and not connection.broker.is_client:
            released.append(event)

    root = DemoRoot()
    loop = Loop(root=root, on_event=on_event)
    try:
        host, port = loop.listen("127.0.0.1", 0)
        client = loop.connect(host, port)
        for line in client_calls(loop, client):
            print(line)
        # The client's last RemoteReferences to the Counter and the avatar went
        # away with client_calls(): their decrefs reach the server on the next
        # turns, and letting go of the avatar logs alice out.
        gc.collect()
        loop.run_until(lambda: any(event.freed for event in released) and not root.realm.online)
        print(f"server released the counter: {released[0].freed}")
        print("server logged alice out")
        client.close()
        loop.run_until(lambda: not loop.connections)
        print("closed cleanly")
    finally:
        loop.close()
    return 0


def client(port: int, host: str = "127.0.0.1") -> int:
    loop = Loop()
    try:
        connection = loop.connect(host, port)
        for line in client_calls(loop, connection):
            print(line)
    finally:
        loop.close()
    return 0


def server(port: int, host: str = "127.0.0.1") -> int:
    loop = Loop(root=DemoRoot())
    try:
        host, port = loop.listen(host, port)
        print(f"serving PB on {host}:{port}", flush=True)
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    return 0


def main(argv: list[str]) -> int:
    usage = "usage: selectors_pb.py demo | server PORT | client PORT"
    if argv == ["demo"]:
        return demo()
    if len(argv) == 2 and argv[0] in ("server", "client") and argv[1].isdigit():
        return (server if argv[0] == "server" else client)(int(argv[1]))
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    # What pbcore logs (a served call that raised, a peer that broke the
    # protocol) goes to stderr, one record per line plus any traceback.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
