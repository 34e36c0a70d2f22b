"""The core's timers on every adapter, over real sockets: silent ports, silent peers, keepalive, call deadlines."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pbcore.broker import Broker
from pbcore.errors import CallTimedOut, ConnectionTimedOut, PBConnectionLost
from pbcore.factory import PBClientFactory, PBServerFactory
from pbcore.timers import TcpKeepalive, Timeouts
from tests.contract.helpers import eventually, outcome, settled
from tests.contract.kits import Kit
from tests.contract.service import ContractRoot

QUICK = Timeouts(handshake=0.5, idle=0.3, probe=0.3)


@contextlib.contextmanager
def listening(serve: bool) -> Iterator[int]:
    """A port that accepts and never speaks (*serve* False), or speaks the PB handshake and then goes silent."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            sock, _ = listener.accept()
            accepted.append(sock)
            if serve:
                handshake(sock, Broker(is_client=False))

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for sock in accepted:
            sock.close()


def handshake(sock: socket.socket, broker: Broker) -> None:
    """Speak the PB handshake over *sock* with *broker*, then stop reading and writing for good."""
    sock.settimeout(5.0)
    broker.connection_made()
    sock.sendall(broker.data_to_send())
    while not broker.ready:
        data = sock.recv(65536)
        if not data:
            return
        broker.receive_data(data)
        sock.sendall(broker.data_to_send())


def test_a_port_that_never_speaks_fails_the_handshake_in_time(kit: Kit) -> None:
    with listening(serve=False) as port:
        factory = PBClientFactory(timeouts=QUICK)
        started = time.monotonic()
        client = kit.connect(factory, port)
        failed = client.run(settled, factory.getRootObject())
        assert isinstance(failed, PBConnectionLost), failed
        reason = failed.args[0]
        assert isinstance(reason, ConnectionTimedOut) and "nothing arrived" in str(reason)
        assert time.monotonic() - started < 10.0
        assert client.closed_within(5.0)


def test_a_server_that_goes_silent_is_taken_for_gone(kit: Kit) -> None:
    with listening(serve=True) as port:
        factory = PBClientFactory(timeouts=QUICK)
        client = kit.connect(factory, port)
        ref = client.root()
        failed = client.run(outcome, ref, "anything")
        assert isinstance(failed, PBConnectionLost), failed
        assert isinstance(failed.args[0], ConnectionTimedOut) and "taken for gone" in str(failed.args[0])
        assert client.closed_within(5.0)


def test_a_client_that_goes_silent_is_dropped_by_the_server(kit: Kit) -> None:
    server = kit.serve(PBServerFactory(ContractRoot(), timeouts=QUICK))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        handshake(sock, Broker(is_client=True))
        assert eventually(lambda: len(server.connections()) == 1, seconds=5.0)
        assert eventually(lambda: not server.connections(), seconds=10.0), "the silent client was kept"


def test_probes_keep_a_live_but_idle_connection(kit: Kit) -> None:
    keep = Timeouts(idle=0.2, probe=0.2)
    server = kit.serve(PBServerFactory(ContractRoot(), timeouts=keep))
    client = kit.connect(PBClientFactory(timeouts=keep), server.port)
    ref = client.root()
    time.sleep(1.5)  # several probes each way, nothing else
    assert client.run(outcome, ref, "echo", "still here") == "still here"
    assert len(server.connections()) == 1


def test_a_call_past_its_deadline_fails_and_the_connection_goes_on(kit: Kit) -> None:
    root = ContractRoot()
    server = kit.serve(PBServerFactory(root))
    client = kit.connect(PBClientFactory(), server.port)
    ref = client.root()

    async def hang_with_deadline() -> object:
        try:
            return await ref.callRemote("hang", pbtimeout=0.3)
        except Exception as error:
            return error

    failed = client.run(hang_with_deadline)
    assert isinstance(failed, CallTimedOut) and "hang" in str(failed), failed
    assert client.run(outcome, ref, "echo", 1) == 1
    assert client.call_soon(lambda: client.broker.calls_in_flight) == 0
    assert root.shared.started == 1 and server.connections()


def test_tcp_keepalive_is_set_on_both_ends_when_asked(kit: Kit) -> None:
    timeouts = Timeouts(tcp_keepalive=TcpKeepalive(idle=7, interval=3, count=2))
    server = kit.serve(PBServerFactory(ContractRoot(), timeouts=timeouts))
    client = kit.connect(PBClientFactory(timeouts=timeouts), server.port)
    client.root()
    plain = kit.connect(PBClientFactory(), server.port)
    plain.root()
    [accepted, *_] = server.connections()
    for sock in (kit.raw_socket(client.connection), kit.raw_socket(accepted)):
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 2
    assert kit.raw_socket(plain.connection).getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_a_twisted_server_stopped_with_sigstop_is_taken_for_gone(kit: Kit) -> None:
    """A real peer process that stops answering without closing (SIGSTOP): noticed within idle + probe."""
    peers = pytest.importorskip("tests.interop.peers")
    with peers.twisted_server_process() as (port, process):
        factory = PBClientFactory(timeouts=Timeouts(handshake=10.0, idle=0.3, probe=0.5))
        client = kit.connect(factory, port)
        ref = client.root()
        assert client.run(outcome, ref, "echo", 1) == [[1], {}]
        os.kill(process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            failed = client.run(outcome, ref, "echo", 2)
            assert isinstance(failed, PBConnectionLost), failed
            assert isinstance(failed.args[0], ConnectionTimedOut) and "taken for gone" in str(failed.args[0])
            assert time.monotonic() - started < 10.0
        finally:
            os.kill(process.pid, signal.SIGCONT)


def test_a_port_speaking_http_fails_the_handshake(kit: Kit) -> None:
    """An HTTP server waits for a request, so a PB client hears nothing: the handshake timeout says so."""
    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        factory = PBClientFactory(timeouts=QUICK)
        client = kit.connect(factory, httpd.server_address[1])
        failed = client.run(settled, factory.getRootObject())
        assert isinstance(failed, PBConnectionLost) and "nothing arrived" in str(failed.args[0]), failed
    finally:
        httpd.shutdown()
        httpd.server_close()
