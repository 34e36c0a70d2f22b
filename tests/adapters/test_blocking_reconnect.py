"""pbcore_blocking.reconnect: the reconnecting client, over loopback, against our server and Twisted's."""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pbcore_blocking
import pytest
from pbcore_blocking.reconnect import ReconnectingClient

from pbcore import Referenceable, Root
from pbcore.cred import Anonymous, UsernamePassword
from pbcore.errors import DeadReferenceError, PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.flavors import CopiedFailure, RemoteReference
from pbcore.reconnect import Backoff, ClientState, ClientStopped, is_login_refusal
from tests.adapters.certs import make_certificate
from tests.adapters.services import PeerRootMaker, login_factory
from tests.interop.peers import PEER

HOST = "127.0.0.1"
#: Bounds every wait (generous: the machine may be busy).
WAIT = 10.0
FAST = Backoff(initial=0.05, maximum=0.2, jitter=0.0)
ALICE = UsernamePassword("alice", "secret")


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def has_length(items: list[Any], length: int) -> Callable[[], bool]:
    return lambda: len(items) == length


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class CallsBack(Root):
    def remote_call_back(self, mind: RemoteReference) -> Any:
        return mind.callRemote("stop")


class Attempts:
    """A factory that notes the (monotonic) time of each attempt."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self) -> PBClientFactory:
        self.times.append(time.monotonic())
        return PBClientFactory()


def test_logs_in_again_after_each_restart_of_the_server() -> None:
    server = pbcore_blocking.serve(login_factory(), HOST, 0)
    port = server.port
    avatars: list[RemoteReference] = []
    client = ReconnectingClient(HOST, port, credentials=ALICE, on_connect=avatars.append, backoff=FAST, timeout=WAIT)
    try:
        with client:
            avatar = client.connected(timeout=WAIT)
            assert client.state is ClientState.CONNECTED
            assert client.call("hello", timeout=WAIT) == "hello alice"
            assert wait_until(lambda: len(avatars) == 1) and avatars[0] is avatar
            for restart in range(1, 4):
                server.close()
                assert wait_until(lambda: client.state is not ClientState.CONNECTED)
                assert client.reference is None
                assert isinstance(client.last_error, PBConnectionLost)
                with pytest.raises(DeadReferenceError):
                    avatar.callRemote("hello")  # at once: it does not wait for a connection
                server = pbcore_blocking.serve(login_factory(), HOST, port)
                new = client.connected(timeout=WAIT)
                assert new is not avatar
                assert client.call("echo", restart, timeout=WAIT) == restart
                connection = client.connection
                assert connection is not None and connection.call(new, "hello") == "hello alice"
                assert wait_until(has_length(avatars, restart + 1)) and avatars[-1] is new
                avatar = new
            assert len({id(each) for each in avatars}) == 4
            assert client.policy.connections == 4 and client.policy.failures == 0
    finally:
        server.close()
    assert client.policy.stopped


def test_the_delays_between_attempts_follow_the_backoff() -> None:
    attempts = Attempts()
    backoff = Backoff(initial=0.05, factor=2.0, maximum=0.2, jitter=0.0)
    client = ReconnectingClient(HOST, free_port(), factory=attempts, backoff=backoff, timeout=WAIT)
    with client:
        assert wait_until(lambda: len(attempts.times) >= 7)
        assert client.state in (ClientState.WAITING, ClientState.CONNECTING)
        assert isinstance(client.last_error, ConnectionRefusedError)
        with pytest.raises(TimeoutError):
            client.connected(timeout=0.05)
    times = attempts.times[:7]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for gap, expected in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2, 0.2], strict=True):
        assert expected * 0.95 <= gap < expected + 2.0, gaps
    assert min(gaps[3:]) < 0.35, gaps  # capped at the maximum: not 0.4, 0.8, 1.6


def test_a_refused_login_stops_the_client_unless_told_to_retry() -> None:
    with pbcore_blocking.serve(login_factory(), HOST, 0) as server:
        wrong = UsernamePassword("alice", "wrong")
        attempts = Attempts()
        client = ReconnectingClient(HOST, server.port, credentials=wrong, factory=attempts, backoff=FAST, timeout=WAIT)
        with client:
            with pytest.raises(CopiedFailure) as caught:
                client.connected(timeout=WAIT)
            assert is_login_refusal(caught.value)
            assert client.state is ClientState.STOPPED and client.last_error is caught.value
            with pytest.raises(CopiedFailure):
                client.call("hello", timeout=WAIT)
            time.sleep(0.3)  # several backoff delays: no other attempt
            assert len(attempts.times) == 1

        # run() raises it (a timer stops the client if it went on trying: run() would then return).
        runner = ReconnectingClient(HOST, server.port, credentials=wrong, backoff=FAST, timeout=WAIT)
        guard = threading.Timer(WAIT, runner.stop)
        guard.start()
        try:
            with pytest.raises(CopiedFailure) as caught:
                runner.run()
            assert runner.state is ClientState.STOPPED and runner.last_error is caught.value
        finally:
            guard.cancel()

        stubborn = Attempts()
        retrying = ReconnectingClient(
            HOST,
            server.port,
            credentials=wrong,
            factory=stubborn,
            backoff=FAST,
            retry_refused_login=True,
            timeout=WAIT,
        )
        with retrying:
            assert wait_until(lambda: len(stubborn.times) >= 3)
            assert retrying.state is not ClientState.STOPPED
            assert is_login_refusal(retrying.last_error or Exception())


@contextmanager
def twisted_login_server(port: int) -> Iterator[subprocess.Popen[str]]:
    """tests/interop/twisted_peer.py's portal (alice/secret) on *port*; killed (SIGKILL) on exit."""
    command = [sys.executable, str(PEER), "server", "--port", str(port), "--login", "--timeout", "120"]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        stdout = process.stdout
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(20.0)
        assert line and line[0].split() == ["PORT", str(port)], f"the Twisted server did not start: {line!r}"
        yield process
    finally:
        process.kill()
        process.wait(timeout=WAIT)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


def test_reconnects_to_a_twisted_server_killed_and_restarted() -> None:
    pytest.importorskip("twisted.spread.pb")
    port = free_port()
    avatars: list[RemoteReference] = []
    client = ReconnectingClient(HOST, port, credentials=ALICE, on_connect=avatars.append, backoff=FAST, timeout=WAIT)
    with client:
        with twisted_login_server(port):
            avatar = client.connected(timeout=WAIT)
            assert client.call("hello", timeout=WAIT) == "hello alice"
        # killed: the client sees the connection go
        assert wait_until(lambda: client.state is not ClientState.CONNECTED)
        with pytest.raises(DeadReferenceError):
            avatar.callRemote("hello")
        with twisted_login_server(port):
            new = client.connected(timeout=WAIT)
            assert new is not avatar
            assert client.call("echo", [1, "two"], timeout=WAIT) == [1, "two"]
            assert wait_until(lambda: len(avatars) == 2) and avatars == [avatar, new]


def test_stop_while_connected_closes_the_connection() -> None:
    with pbcore_blocking.serve(login_factory(), HOST, 0) as server:
        attempts = Attempts()
        client = ReconnectingClient(HOST, server.port, credentials=ALICE, factory=attempts, backoff=FAST)
        client.start()
        avatar = client.connected(timeout=WAIT)
        connection = client.connection
        assert connection is not None and wait_until(lambda: len(server.connections) == 1)
        client.stop()
        assert connection.closed and client.state is ClientState.STOPPED and client.reference is None
        assert wait_until(lambda: not server.connections)  # the server saw it close
        with pytest.raises(DeadReferenceError):
            avatar.callRemote("hello")
        with pytest.raises(PBConnectionLost):
            client.connected(timeout=WAIT)
        time.sleep(0.3)  # several backoff delays: the client does not come back
        assert not server.connections and len(attempts.times) == 1


def test_stop_from_on_connect_or_from_a_call_the_server_makes() -> None:
    with pbcore_blocking.serve(login_factory(), HOST, 0) as server:
        seen: list[RemoteReference] = []

        def stop_at_once(avatar: RemoteReference) -> None:
            seen.append(avatar)
            client.stop()  # in the loop's own thread

        client = ReconnectingClient(HOST, server.port, credentials=ALICE, on_connect=stop_at_once, backoff=FAST)
        started = time.monotonic()
        client.run()  # returns: stopped by stop(), not by an error
        assert time.monotonic() - started < WAIT / 2
        assert len(seen) == 1 and client.state is ClientState.STOPPED and client.reference is None

    class Mind(Referenceable):
        def remote_stop(self) -> str:
            other.stop()  # in the connection's reader thread, serving the server's call
            return "stopping"

    with pbcore_blocking.serve(PBServerFactory(CallsBack()), HOST, 0) as server:
        other = ReconnectingClient(HOST, server.port, backoff=FAST, timeout=WAIT)
        with other:
            started = time.monotonic()
            with pytest.raises(PBConnectionLost):  # stop() closed the connection before the answer came
                other.call("call_back", Mind(), timeout=WAIT)
            assert wait_until(lambda: other.state is ClientState.STOPPED and other.reference is None)
            assert time.monotonic() - started < WAIT / 2  # nobody waited out a join timeout


def test_stop_while_waiting_ends_at_once() -> None:
    client = ReconnectingClient(HOST, free_port(), backoff=Backoff(initial=60.0, maximum=60.0, jitter=0.0))
    client.start()
    assert wait_until(lambda: client.state is ClientState.WAITING and client.last_error is not None)
    outcome: list[BaseException] = []

    def waiter() -> None:
        try:
            client.connected()  # no timeout: only stop() ends it
        except BaseException as error:
            outcome.append(error)

    waiting = threading.Thread(target=waiter, daemon=True)
    waiting.start()
    started = time.monotonic()
    client.stop()
    waiting.join(WAIT)
    assert time.monotonic() - started < WAIT / 2  # not the 60 s of the backoff
    assert client.state is ClientState.STOPPED
    assert len(outcome) == 1 and isinstance(outcome[0], ClientStopped)  # not the last attempt's refused connect


def test_on_connect_may_be_async_and_its_errors_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    greetings: list[str] = []

    async def greet(avatar: RemoteReference) -> None:
        greetings.append(await avatar.callRemote("hello"))

    def fail(avatar: RemoteReference) -> None:
        raise ValueError("on_connect broke")

    with pbcore_blocking.serve(login_factory(), HOST, 0) as server:
        with ReconnectingClient(HOST, server.port, credentials=Anonymous(), on_connect=greet, backoff=FAST):
            assert wait_until(lambda: greetings == ["hello anonymous"])
        caplog.set_level(logging.ERROR, logger="pbcore.blocking")
        with ReconnectingClient(HOST, server.port, credentials=ALICE, on_connect=fail, backoff=FAST) as client:
            assert wait_until(lambda: any(r.name == "pbcore.blocking" and r.exc_info for r in caplog.records))
            assert client.call("hello", timeout=WAIT) == "hello alice"
            assert client.state is ClientState.CONNECTED and client.policy.connections == 1
        errors = [r.exc_info[1] for r in caplog.records if r.name == "pbcore.blocking" and r.exc_info]
        assert len(errors) == 1 and isinstance(errors[0], ValueError) and "on_connect" in caplog.text


def test_root_object_over_tls(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    with pbcore_blocking.serve(PBServerFactory(PeerRootMaker()), HOST, 0, ssl_context=server_context) as server:
        client = ReconnectingClient(
            HOST, server.port, ssl_context=client_context, server_hostname="localhost", backoff=FAST, timeout=WAIT
        )
        with client:
            root: Any = client.connected(timeout=WAIT)
            assert isinstance(root, RemoteReference)
            assert client.call("echo", "secure", timeout=WAIT) == [["secure"], {}]
